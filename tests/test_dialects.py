"""Every API the model servers speak, metered and answered in its own shape (issue 9).

Table-driven: each row of ``DIALECTS`` names a route, a request, how its official
client reads an answer (plain stdlib parsing of the exact shapes), and what its
upstream reports as usage.  The fake upstream answers in the shapes llama.cpp's
server and Ollama really send (see shared/WIRE.md); the same tests run for every row.
Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from dataclasses import dataclass
from typing import Callable

import llm_proxy
from test_llm_proxy import (CLIENT_KEY, OTHER_KEY, UPSTREAM_KEY, WAIT, FakeUpstreamHandler,
                            ProxyTestCase, Response, write_keys_file)

PIECES = ["hi", " from", " upstream"]
TEXT = "".join(PIECES)


# --------------------------------------------------------------------------
# What the upstream sends, per API (shapes from real captures)
# --------------------------------------------------------------------------

def sse(data: dict, event: str | None = None) -> bytes:
    return (f"event: {event}\n" if event else "").encode() + b"data: " + json.dumps(data).encode() + b"\n\n"


def chat_stream(payload: dict) -> list[bytes]:
    base = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [sse(dict(base, choices=[{"index": 0, "delta": {"content": p}, "finish_reason": None}]))
              for p in PIECES]
    if (payload.get("stream_options") or {}).get("include_usage"):
        events.append(sse(dict(base, choices=[], usage={"prompt_tokens": 3, "completion_tokens": 4,
                                                         "total_tokens": 7})))
    return events + [b"data: [DONE]\n\n"]


def responses_reply(payload: dict) -> dict:
    return {"id": "resp_up", "object": "response", "status": "completed", "model": "gemma3-270m",
            "output": [{"content": [{"type": "output_text", "annotations": [], "logprobs": [],
                                     "text": TEXT}], "id": "msg_up", "role": "assistant",
                        "status": "completed", "type": "message"}],
            "usage": {"input_tokens": 26, "output_tokens": 3, "total_tokens": 29,
                      "input_tokens_details": {"cached_tokens": 21}}}


def responses_stream(payload: dict) -> list[bytes]:
    opening = {"id": "resp_up", "object": "response", "status": "in_progress"}
    events = [sse({"type": "response.created", "response": opening}, "response.created"),
              sse({"type": "response.in_progress", "response": opening}, "response.in_progress"),
              sse({"type": "response.output_item.added", "item": {"content": [], "id": "msg_up",
                   "role": "assistant", "status": "in_progress", "type": "message"}},
                  "response.output_item.added")]
    events += [sse({"type": "response.output_text.delta", "item_id": "msg_up", "delta": p},
                   "response.output_text.delta") for p in PIECES]
    done = dict(responses_reply(payload), usage={"input_tokens": 26, "output_tokens": 2,
                                                 "total_tokens": 28})
    events.append(sse({"type": "response.completed", "response": done}, "response.completed"))
    return events


def messages_reply(payload: dict) -> dict:
    return {"id": "chatcmpl-up", "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": TEXT}], "model": "gemma3-270m",
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"cache_read_input_tokens": 21, "input_tokens": 5, "output_tokens": 2}}


def messages_stream(payload: dict) -> list[bytes]:
    start = dict(messages_reply(payload), content=[], stop_reason=None,
                 usage={"cache_read_input_tokens": 21, "input_tokens": 5, "output_tokens": 0})
    events = [sse({"type": "message_start", "message": start}, "message_start"),
              sse({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}, "content_block_start")]
    events += [sse({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": p}}, "content_block_delta") for p in PIECES]
    events += [sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
               sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 1}}, "message_delta"),
               sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 2}}, "message_delta"),  # cumulative: the last one counts
               sse({"type": "message_stop"}, "message_stop")]
    return events


def ollama_line(field: str, text: str, done: bool) -> dict:
    line: dict = {"model": "llama3.2", "created_at": "2026-11-25T10:00:00.000000Z", "done": done}
    line.update({"message": {"role": "assistant", "content": text}} if field == "message"
                else {"response": text})
    if done:
        line.update(done_reason="stop", total_duration=1, load_duration=1, prompt_eval_count=26,
                    prompt_eval_duration=1, eval_count=4, eval_duration=1)
    return line


def ollama_stream(field: str) -> Callable[[dict], list[bytes]]:
    return lambda payload: [json.dumps(ollama_line(field, p, False)).encode() + b"\n" for p in PIECES] + [
        json.dumps(ollama_line(field, "", True)).encode() + b"\n"]


# --------------------------------------------------------------------------
# How each API's client reads an answer
# --------------------------------------------------------------------------

def sse_events(body: bytes) -> list[tuple[str | None, object]]:
    """(event name, parsed data) per server-sent event, as the SDKs' SSE decoders read them."""
    parsed = []
    for block in body.decode().replace("\r\n", "\n").split("\n\n"):
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            text = "\n".join(data)
            parsed.append((name, text if text == "[DONE]" else json.loads(text)))
    return parsed


def read_chat(body: bytes) -> str:
    reply = json.loads(body)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["finish_reason"], reply
    return reply["choices"][0]["message"]["content"]


def read_chat_stream(body: bytes) -> str:
    events = sse_events(body)
    assert events[-1] == (None, "[DONE]"), events[-1]
    return "".join(e["choices"][0]["delta"].get("content") or "" for _, e in events[:-1] if e["choices"])


def read_text(body: bytes) -> str:
    reply = json.loads(body)
    assert reply["object"] == "text_completion", reply
    return reply["choices"][0]["text"]


def read_text_stream(body: bytes) -> str:
    events = sse_events(body)
    assert events[-1] == (None, "[DONE]")
    return "".join(e["choices"][0]["text"] for _, e in events[:-1] if e["choices"])


def read_response(body: bytes) -> str:
    """``response.output_text`` as the openai SDK computes it."""
    reply = json.loads(body)
    assert reply["object"] == "response" and reply["status"] == "completed", reply
    return "".join(part["text"] for item in reply["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


def typed_events(body: bytes) -> tuple[list[tuple[str | None, object]], list[str | None]]:
    """Named events whose data's ``type`` repeats the name (Responses and Messages streams)."""
    events = sse_events(body)
    for name, event in events:
        assert name == event["type"], (name, event)
    return events, [name for name, _ in events]


def read_response_stream(body: bytes) -> str:
    events, names = typed_events(body)
    assert names[0] == "response.created" and names[-1] == "response.completed", names
    numbers = [event.get("sequence_number") for _, event in events]
    if None not in numbers:  # the proxy's own replies number their events
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), numbers
    return "".join(e["delta"] for name, e in events if name == "response.output_text.delta")


def read_message(body: bytes) -> str:
    reply = json.loads(body)
    assert reply["type"] == "message" and reply["role"] == "assistant", reply
    assert reply["stop_reason"] in ("end_turn", "max_tokens") and "usage" in reply, reply
    return "".join(block["text"] for block in reply["content"] if block["type"] == "text")


def read_message_stream(body: bytes) -> str:
    """As the anthropic SDK's stream accumulator: named events, data.type equal to the name."""
    events, names = typed_events(body)
    assert names[0] == "message_start" and names[-1] == "message_stop", names
    assert "content_block_start" in names and "message_delta" in names, names
    return "".join(e["delta"]["text"] for name, e in events if name == "content_block_delta")


def ndjson(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


def read_ollama(field: str) -> Callable[[bytes], str]:
    def read(body: bytes) -> str:
        reply = json.loads(body)
        assert reply["done"] is True and reply["done_reason"], reply
        return reply["message"]["content"] if field == "message" else reply["response"]
    return read


def read_ollama_stream(field: str) -> Callable[[bytes], str]:
    def read(body: bytes) -> str:
        lines = ndjson(body)
        assert lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1]), lines
        return "".join(line["message"]["content"] if field == "message" else line["response"]
                       for line in lines)
    return read


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    name: str
    path: str
    payload: dict
    read: Callable[[bytes], str]
    read_stream: Callable[[bytes], str]
    reply: Callable[[dict], dict]
    stream: Callable[[dict], list[bytes]]
    usage: int          # what the upstream reports for a non-streamed answer
    stream_usage: int   # ... and for a streamed one
    stream_type: str = "text/event-stream"
    error: str = "openai"
    allowance: str = "max_tokens"   # where the output allowance goes in a request

    def request(self, stream: bool | None, **extra: object) -> dict:
        payload = dict(self.payload, **extra)
        if stream is not None:
            payload["stream"] = stream
        return payload


CHAT_REPLY = {"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
TEXT_REPLY = {"id": "cmpl-up", "object": "text_completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "text": TEXT, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}


def text_stream(payload: dict) -> list[bytes]:
    base = {"id": "cmpl-up", "object": "text_completion", "created": 1, "model": "m"}
    events = [sse(dict(base, choices=[{"index": 0, "text": p, "finish_reason": None}])) for p in PIECES]
    if (payload.get("stream_options") or {}).get("include_usage"):
        events.append(sse(dict(base, choices=[], usage={"prompt_tokens": 3, "completion_tokens": 4,
                                                         "total_tokens": 7})))
    return events + [b"data: [DONE]\n\n"]


ROWS = [
    Row("chat", "/v1/chat/completions",
        {"model": "client-model", "messages": [{"role": "user", "content": "hello"}]},
        read_chat, read_chat_stream, lambda p: CHAT_REPLY, chat_stream, 7, 7),
    Row("text", "/v1/completions", {"model": "client-model", "prompt": "hello"},
        read_text, read_text_stream, lambda p: TEXT_REPLY, text_stream, 7, 7),
    Row("responses", "/v1/responses", {"model": "client-model", "input": "hello"},
        read_response, read_response_stream, responses_reply, responses_stream, 29, 28,
        allowance="max_output_tokens"),
    Row("messages", "/v1/messages",
        {"model": "client-model", "max_tokens": 100, "messages": [{"role": "user", "content": "hello"}]},
        read_message, read_message_stream, messages_reply, messages_stream, 28, 28, error="anthropic"),
    Row("ollama chat", "/api/chat",
        {"model": "client-model", "messages": [{"role": "user", "content": "hello"}]},
        read_ollama("message"), read_ollama_stream("message"), lambda p: ollama_line("message", TEXT, True),
        ollama_stream("message"), 30, 30, "application/x-ndjson", "ollama", "num_predict"),
    Row("ollama generate", "/api/generate", {"model": "client-model", "prompt": "hello"},
        read_ollama("response"), read_ollama_stream("response"),
        lambda p: ollama_line("response", TEXT, True), ollama_stream("response"), 30, 30,
        "application/x-ndjson", "ollama", "num_predict"),
]
BY_PATH = {row.path: row for row in ROWS}
ROW = {row.name: row for row in ROWS}  # a row chosen by name, never by its place in ROWS
OLLAMA_ROWS = [ROW["ollama chat"], ROW["ollama generate"]]


WIRE_BEHAVIOURS = ("", "pause-after-first", "hold-until-closed", "break-after-first", "long-stream",
                   "no-final-event")
LONG_STREAM_EVENTS = 12_000  # as many as one of Codex's longest measured replies


class WireUpstreamHandler(FakeUpstreamHandler):
    """The test suite's fake upstream, answering each API as real servers do.

    ``X-Fake`` steers it as for chat: ``pause-after-first`` (waits for the test),
    ``hold-until-closed`` (generates until the proxy hangs up), ``break-after-first``.
    """

    def do_POST(self) -> None:
        path = self.path.partition("?")[0]
        row = BY_PATH.get(path)
        if path in ("/v1/embeddings", "/api/embed", "/v1/rerank", "/v1/messages/count_tokens"):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.record(body)
            self.reply(200, {"/v1/embeddings": {"object": "list", "data": [{"embedding": [0.1]}],
                                                 "usage": {"prompt_tokens": 5, "total_tokens": 5}},
                             "/api/embed": {"embeddings": [[0.1]], "prompt_eval_count": 5},
                             "/v1/rerank": {"results": []},
                             "/v1/messages/count_tokens": {"input_tokens": 26}}[path])
            return
        if row is None or self.headers.get("X-Fake", "") not in WIRE_BEHAVIOURS:
            super().do_POST()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.record(body)
        payload = json.loads(body)
        stream = payload.get("stream", path.startswith("/api/"))
        if not stream:
            self.reply(200, row.reply(payload))
            return
        self.send_response(200)
        self.send_header("Content-Type", row.stream_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        behaviour = self.headers.get("X-Fake", "")
        events = row.stream(payload)
        if behaviour == "long-stream":  # the first piece repeated, between the same opening and end
            events = events[:3] + [events[3]] * LONG_STREAM_EVENTS + events[-1:]
        elif behaviour == "no-final-event":  # ends cleanly, but before the usage that closes it
            events = [e for e in events if b"message_delta" not in e and b"message_stop" not in e]
        try:
            for index, event in enumerate(events):
                self.chunk(event)
                if index == 0:
                    self.server.first_event_sent.set()
                    if behaviour == "pause-after-first":
                        self.server.release.wait(WAIT)
                    elif behaviour == "hold-until-closed":
                        if self.wait_for_hang_up():
                            self.server.closed_early.set()
                        self.close_connection = True
                        return
                    elif behaviour == "break-after-first":
                        self.chunk(event[: len(event) // 2])
                        self.close_connection = True
                        return
            self.chunk(b"")
        except OSError:
            self.server.closed_early.set()
            self.close_connection = True

    def do_GET(self) -> None:
        if self.path.startswith("/api/"):
            self.record(b"")
            listing = {"/api/tags": {"models": [{"name": "upstream-model", "model": "upstream-model"},
                                                {"name": "small", "model": "small"}]},
                       "/api/version": {"version": "0.14.0"}}.get(self.path)
            self.reply(200 if listing else 404, listing or {"error": "not found"})
        else:
            super().do_GET()


class DialectTestCase(ProxyTestCase):
    upstream_handler = WireUpstreamHandler
    config_overrides = {"client_keys": (CLIENT_KEY, OTHER_KEY)}

    def call(self, row: Row, stream: bool | None = False, key: str | None = CLIENT_KEY,
             headers: dict | None = None, **extra: object) -> Response:
        return self.request("POST", row.path, row.request(stream, **extra), key=key, headers=headers)

    def assert_error_shape(self, row: Row, response: Response, status: int, anthropic_type: str) -> None:
        self.assertEqual(response.status, status, response.body)
        self.assertNotIn(b"Traceback", response.body)
        body = response.json()
        if row.error == "anthropic":
            self.assertEqual(body["type"], "error")
            self.assertEqual(body["error"]["type"], anthropic_type)
            self.assertTrue(body["error"]["message"])
        elif row.error == "ollama":
            self.assertIsInstance(body["error"], str)
            self.assertTrue(body["error"])
        else:
            self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})

    def use_keys(self, entries: dict) -> None:
        """Restart the proxy with a keys file holding ``entries``."""
        self.start_proxy(client_keys=(), keys_file=write_keys_file(self, entries))


class ServedTests(DialectTestCase):
    config_overrides = {"client_keys": (CLIENT_KEY, OTHER_KEY), "max_tokens": 100}

    def test_served_in_its_shape_and_charged(self) -> None:
        for row in ROWS:
            with self.subTest(row.name):
                before = self.level()
                for stream in (False, True):
                    response = self.call(row, stream)
                    self.assertEqual(response.status, 200, response.body)
                    self.assertEqual(response.headers["Server"], f"llm_proxy/{llm_proxy.__version__}")
                    self.assertIsNotNone(response.headers["X-RateLimit-Remaining"])
                    read = row.read_stream if stream else row.read
                    self.assertEqual(read(response.body), TEXT)
                    if stream:
                        self.assertTrue(response.headers["Content-Type"].startswith(row.stream_type))
                self.assertEqual(self.level(), before - 2)
                forwarded = self.upstream.requests[-1]
                self.assertEqual(forwarded["path"], row.path)  # Ollama's own API: under the root
                self.assertEqual(forwarded["headers"]["Authorization"], f"Bearer {UPSTREAM_KEY}")

    def test_ollama_streams_by_default(self) -> None:
        for row in OLLAMA_ROWS:
            with self.subTest(row.name):
                response = self.call(row, stream=None)
                self.assertEqual(row.read_stream(response.body), TEXT)

    def test_base_model_replaces_the_model_in_every_api(self) -> None:
        self.start_proxy(client_keys=(CLIENT_KEY,), upstream_model="served-model")
        for row in ROWS:
            with self.subTest(row.name):
                self.call(row)
                self.assertEqual(json.loads(self.upstream.requests[-1]["body"])["model"], "served-model")

    def test_messages_query_string_is_kept(self) -> None:
        response = self.request("POST", "/v1/messages?beta=true", ROW["messages"].request(False))
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.requests[-1]["path"], "/v1/messages?beta=true")


class LimitReplyTests(DialectTestCase):
    config_overrides = {"client_keys": (CLIENT_KEY, OTHER_KEY), "max_tokens": 1, "refill_tokens": 1}

    def test_empty_bucket_gets_a_reply_its_client_reads(self) -> None:
        for row in ROWS:
            with self.subTest(row.name):
                self.clock.advance(10_000)  # full again
                self.assertEqual(self.call(row).status, 200)
                served = len(self.upstream.requests)
                for stream in (False, True):
                    response = self.call(row, stream)
                    self.assertEqual(response.status, 200)
                    text = (row.read_stream if stream else row.read)(response.body)
                    self.assertRegex(text, r"^limit reached, wait \d+ min$")
                    self.assertEqual(response.headers["X-RateLimit-Remaining"], "0")
                    self.assertIsNotNone(response.headers["Retry-After"])
                self.assertEqual(len(self.upstream.requests), served, "a limited call went upstream")

    def test_error_mode_is_a_429_in_the_apis_error_shape(self) -> None:
        self.start_proxy(client_keys=(CLIENT_KEY,), max_tokens=1, refill_tokens=1, limit_response="error")
        for row in ROWS:
            with self.subTest(row.name):
                self.clock.advance(10_000)
                self.call(row)
                response = self.call(row, True)
                self.assert_error_shape(row, response, 429, "rate_limit_error")
                self.assertIsNotNone(response.headers["Retry-After"])

    def test_embeddings_and_other_calls_get_a_429(self) -> None:
        for path, payload in (("/v1/embeddings", {"model": "m", "input": "hello"}),
                              ("/api/embed", {"model": "m", "input": "hello"}),
                              ("/v1/rerank", {"model": "m", "query": "q", "documents": ["a"]})):
            with self.subTest(path):
                self.clock.advance(10_000)
                self.assertEqual(self.request("POST", path, payload).status, 200)
                response = self.request("POST", path, payload)
                self.assertEqual(response.status, 429)
                self.assertIsNotNone(response.headers["Retry-After"])
                error = response.json()["error"]
                self.assertIn("limit reached", error if isinstance(error, str) else error["message"])


class ErrorShapeTests(DialectTestCase):
    config_overrides = {"keys_file": None, "client_keys": (CLIENT_KEY,)}

    def test_errors_in_each_apis_shape(self) -> None:
        for row in ROWS:
            with self.subTest(row.name):
                self.assert_error_shape(row, self.call(row, key="sk-wrong"), 401, "authentication_error")
                response = self.request("POST", row.path, b"{not json")
                self.assert_error_shape(row, response, 400, "invalid_request_error")
                self.assert_error_shape(row, self.call(row, stream="yes"), 400, "invalid_request_error")
                bad = {row.allowance: -5} if row.allowance != "num_predict" else {
                    "options": {"num_predict": "many"}}
                self.assert_error_shape(row, self.call(row, **bad), 400, "invalid_request_error")
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.level(), 10)

    def test_model_allow_list_is_a_403_in_each_shape(self) -> None:
        self.use_keys({CLIENT_KEY: {"name": "ada", "models": ["allowed"]}})
        for row in ROWS:
            with self.subTest(row.name):
                self.assert_error_shape(row, self.call(row), 403, "permission_error")
        self.assertEqual(self.upstream.requests, [])

    def test_unreachable_upstream_is_a_503_in_each_shape(self) -> None:
        self.start_proxy(client_keys=(CLIENT_KEY,), upstream_url="http://127.0.0.1:9/v1", queue_timeout=0.05)
        for row in ROWS:
            with self.subTest(row.name):
                self.assert_error_shape(row, self.call(row), 503, "overloaded_error")
        self.assertEqual(self.level(), 10)


class UsageModeTests(DialectTestCase):
    config_overrides = {"client_keys": (CLIENT_KEY,), "cost_mode": "usage", "max_tokens": 20_000}

    def test_settled_to_each_apis_reported_usage(self) -> None:
        for row in ROWS:
            for stream in (False, True):
                with self.subTest(row.name, stream=stream):
                    before = self.level()
                    response = self.call(row, stream)
                    self.assertEqual((row.read_stream if stream else row.read)(response.body), TEXT)
                    self.assertEqual(before - self.level(), row.stream_usage if stream else row.usage)

    def test_injected_usage_request_stays_hidden(self) -> None:
        response = self.call(ROW["chat"], True)
        self.assertTrue(json.loads(self.upstream.requests[-1]["body"])["stream_options"]["include_usage"])
        self.assertNotIn(b"usage", response.body)

    def test_a_huge_allowance_reserves_at_most_the_reserve(self) -> None:
        """Claude Code asks for 32,000 output tokens; under a 20,000 limit it must still be served."""
        for row in ROWS:
            with self.subTest(row.name):
                extra = {row.allowance: 32_000} if row.allowance != "num_predict" else {
                    "options": {"num_predict": 32_000}}
                response = self.call(row, **extra)
                self.assertEqual(row.read(response.body), TEXT)

    def test_a_prompt_larger_than_the_limit_is_too_large(self) -> None:
        self.start_proxy(client_keys=(CLIENT_KEY,), cost_mode="usage", max_tokens=100)
        row = ROW["messages"]
        payload = row.request(False, messages=[{"role": "user", "content": "x" * 2000}])
        response = self.request("POST", row.path, payload)
        self.assertIn("request too large", read_message(response.body))

    def test_upstream_breaking_off_mid_stream_charges_what_was_streamed(self) -> None:
        for row in [ROW["responses"], *OLLAMA_ROWS]:
            with self.subTest(row.name):
                before = self.level()
                payload = row.request(True)
                response = self.request("POST", row.path, payload, headers={"X-Fake": "break-after-first"})
                self.assertEqual(response.status, 200)
                charged = before - self.level()
                self.assertEqual(charged, llm_proxy.prompt_tokens(
                    dict(payload, model="x")) + self.streamed_tokens(row))

    def test_upstream_breaking_off_after_reporting_usage_charges_that(self) -> None:
        # Messages report the prompt's usage in their first event, message_start
        before = self.level()
        self.request("POST", "/v1/messages", ROW["messages"].request(True), headers={"X-Fake": "break-after-first"})
        self.assertEqual(before - self.level(), 26)

    def test_a_stream_ending_before_its_final_usage_pays_for_its_text(self) -> None:
        """message_start says output 0; a stream that stops before message_delta is not free."""
        before = self.level()
        response = self.request("POST", "/v1/messages", ROW["messages"].request(True),
                                headers={"X-Fake": "no-final-event"})
        self.assertEqual("".join(e["delta"]["text"] for name, e in sse_events(response.body)
                                 if name == "content_block_delta"), TEXT)
        self.assertEqual(before - self.level(), 26 + -(-len(TEXT) // 4))

    @staticmethod
    def streamed_tokens(row: Row) -> int:
        # the first event carries the first piece, but Responses' opens the answer without text
        return 0 if row.name == "responses" else -(-len(PIECES[0]) // 4)


class LiveStreamTests(DialectTestCase):
    def test_first_event_arrives_before_the_upstream_finishes(self) -> None:
        for row in ROWS:
            with self.subTest(row.name):
                self.upstream.release.clear()
                self.upstream.first_event_sent.clear()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
                try:
                    conn.request("POST", row.path, json.dumps(row.request(True)),
                                 {"Authorization": f"Bearer {CLIENT_KEY}", "X-Fake": "pause-after-first"})
                    response = conn.getresponse()
                    first = response.read1(65536)
                    self.assertTrue(first, "nothing arrived while the upstream was paused")
                    self.assertFalse(self.upstream.release.is_set())
                    self.upstream.release.set()
                    self.assertEqual(row.read_stream(first + response.read()), TEXT)
                finally:
                    conn.close()

    def test_client_leaving_mid_stream_stops_the_upstream(self) -> None:
        for row in ROWS:
            with self.subTest(row.name):
                self.upstream.closed_early.clear()
                self.upstream.first_event_sent.clear()
                body = json.dumps(row.request(True)).encode()
                with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
                    sock.sendall(f"POST {row.path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}"
                                 f"\r\nX-Fake: hold-until-closed\r\nContent-Length: {len(body)}\r\n\r\n"
                                 .encode() + body)
                    self.assertTrue(self.upstream.first_event_sent.wait(WAIT))
                    sock.recv(1)
                self.assertTrue(self.upstream.closed_early.wait(WAIT), "the upstream kept generating")
        self.wait_for(lambda: self.proxy.upstreams.in_flight == 0)


class LongStreamTests(DialectTestCase):
    config_overrides = {"client_keys": (CLIENT_KEY,), "cost_mode": "usage", "max_tokens": 20_000}

    def test_twelve_thousand_events_are_relayed_one_by_one(self) -> None:
        row = ROW["responses"]  # as Codex streams it
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            conn.request("POST", row.path, json.dumps(row.request(True)),
                         {"Authorization": f"Bearer {CLIENT_KEY}", "X-Fake": "long-stream"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        self.assertEqual(row.read_stream(body), PIECES[0] * LONG_STREAM_EVENTS)
        self.assertEqual(20_000 - self.level(), 28)  # settled to response.completed's usage


class ClaudeCodePatternTests(DialectTestCase):
    # Two requests allowing themselves 32,000 tokens each at once: an agent on a local model,
    # whose owner lets it overdraw (the hard cap would make the second wait for the first).
    config_overrides = {"client_keys": (CLIENT_KEY,), "cost_mode": "usage", "max_tokens": 20_000,
                        "upstream_max_concurrent": 2, "overdraft": True}

    def test_cancelled_stream_and_parallel_request_free_every_slot(self) -> None:
        row = ROW["messages"]
        results = []
        for _ in range(3):  # three turns: a streamed request cancelled, and a non-streamed one
            self.upstream.first_event_sent.clear()
            self.upstream.closed_early.clear()
            body = json.dumps(row.request(True, max_tokens=32_000)).encode()
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
            sock.sendall(f"POST /v1/messages?beta=true HTTP/1.1\r\nHost: x\r\nx-api-key: {CLIENT_KEY}"
                         f"\r\nX-Fake: hold-until-closed\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            side = threading.Thread(target=lambda: results.append(self.call(row, max_tokens=32_000)))
            side.start()
            self.assertTrue(self.upstream.first_event_sent.wait(WAIT))
            received = b""
            while b"message_start" not in received:  # relayed, so the proxy has read its usage
                received += sock.recv(65536)
            side.join(WAIT)
            sock.close()
            self.assertTrue(self.upstream.closed_early.wait(WAIT))
        self.wait_for(lambda: (self.proxy.upstreams.in_flight, self.proxy.upstreams.waiting) == (0, 0))
        self.assertEqual([read_message(r.body) for r in results], [TEXT] * 3)
        # each non-streamed call paid its usage (28); each cancelled stream what it reported (26 in)
        self.wait_for(lambda: self.level() == 20_000 - 3 * 28 - 3 * 26)


class RoutesTests(DialectTestCase):
    config_overrides = {"client_keys": (CLIENT_KEY,), "max_tokens": 3, "refill_tokens": 1}

    def test_root_answers_probes_without_a_key(self) -> None:
        for method in ("GET", "HEAD"):
            response = self.request(method, "/", key=None)
            self.assertEqual(response.status, 200)
        self.assertEqual(self.request("GET", "/", key=None).json()["name"], "llm_proxy")

    def test_free_routes_cost_nothing_but_need_a_key(self) -> None:
        free = [("GET", "/v1/responses/resp_1", None), ("DELETE", "/v1/responses/resp_1", None),
                ("POST", "/v1/messages/count_tokens", {"model": "m", "messages": []}),
                ("GET", "/api/version", None), ("GET", "/api/tags", None), ("GET", "/v1/models", None)]
        for method, path, body in free:
            with self.subTest(path=path, method=method):
                self.assertEqual(self.request(method, path, body, key="sk-wrong").status, 401)
                self.assertLess(self.request(method, path, body).status, 500)
        self.assertEqual(self.level(), 3)

    def test_model_management_is_refused(self) -> None:
        for path in ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"):
            with self.subTest(path):
                response = self.request("POST", path, {"model": "x"})
                self.assertEqual(response.status, 403)
                self.assertIsInstance(response.json()["error"], str)
        self.assertEqual(self.upstream.requests, [])

    def test_metered_routes_refuse_get(self) -> None:
        for row in ROWS:
            with self.subTest(row.name):
                self.assertEqual(self.request("GET", row.path).status, 405)
        self.assertEqual(self.level(), 3)

    def test_ollama_tags_follow_the_allow_list_and_base_model(self) -> None:
        self.use_keys({CLIENT_KEY: {"name": "ada", "models": ["small"]}})
        tags = self.request("GET", "/api/tags").json()
        self.assertEqual([m["name"] for m in tags["models"]], ["small"])
        self.start_proxy(client_keys=(CLIENT_KEY,), upstream_model="served-model")
        tags = self.request("GET", "/api/tags").json()
        self.assertEqual([m["name"] for m in tags["models"]], ["served-model"])

    def test_every_other_v1_call_costs_a_request(self) -> None:
        self.assertEqual(self.request("POST", "/v1/rerank", {"query": "q"}).status, 200)
        self.assertEqual(self.request("POST", "/v1/embeddings", {"input": "x"}).status, 200)
        self.assertEqual(self.level(), 1)


class DemoDialectTests(ProxyTestCase):
    """The demo's echo model speaks every API, so each README recipe works against it."""

    def setUp(self) -> None:
        super().setUp()
        self.echo = llm_proxy.start_echo_model(word_delay=0)
        self.start_proxy(upstream_url=f"http://127.0.0.1:{self.echo.server_address[1]}/v1",
                         upstream_key=None, max_tokens=100)

    def test_echo_in_every_api(self) -> None:
        for row in ROWS:
            for stream in (False, True):
                with self.subTest(row.name, stream=stream):
                    response = self.call_row(row, stream)
                    self.assertEqual((row.read_stream if stream else row.read)(response.body),
                                     "echo: hello")

    def tearDown(self) -> None:
        self.stop(self.echo)
        super().tearDown()

    def call_row(self, row: Row, stream: bool) -> Response:
        return self.request("POST", row.path, row.request(stream))
