"""The forwarded body is the one the proxy checked (issue 18), over real sockets.

A body is parsed once, strictly; what is charged, checked against the key's models
and forwarded is that parse.  Every test here was an attack that worked: a field
spelled so that the model server reads it and the proxy does not, an allowance
the server reads in another field, a batch charged as one answer, a model named in
a form, a body smuggled on a GET.  Bodies that are no JSON object at all are refused,
charging nothing.  Run by ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from unittest import mock

import llm_proxy
from test_llm_proxy import (CLIENT_KEY, OTHER_KEY, WAIT, AdversarialTestCase, FakeUpstreamHandler, ProxyTestCase,
                            Response, write_keys_file)

LIMITED = CLIENT_KEY  # may use the model "small" only
OPEN = OTHER_KEY      # any model
APP_KEY = "sk-app-with-users-0123456789"
KEYS = {
    LIMITED: {"name": "limited", "max_tokens": 100_000, "refill_tokens": 1, "models": ["small"]},
    OPEN: {"name": "open", "max_tokens": 100_000, "refill_tokens": 1},
    APP_KEY: {"name": "app", "max_tokens": 100_000, "refill_tokens": 1,
              "users": {"from": "header", "header": "X-App-User", "max_tokens": 100_000,
                        "overrides": {"kid": {"models": ["small"]}}}},
}
CHAT = {"model": "small", "messages": [{"role": "user", "content": "hi"}]}


def error_shape(path: str, body: dict) -> str:
    """Which API's error envelope ``body`` is: each dialect answers in its own."""
    if path.startswith("/v1/messages"):
        return "anthropic" if body.get("type") == "error" and set(body["error"]) == {"type", "message"} else "?"
    if path.startswith("/api/"):
        return "ollama" if set(body) == {"error"} and isinstance(body["error"], str) else "?"
    return "openai" if set(body.get("error", {})) == {"message", "type", "param", "code"} else "?"


class BodyUpstreamHandler(FakeUpstreamHandler):
    """The fake upstream, with Ollama's list of running models, and llama.cpp's answer to a batch
    of prompts: a JSON list of completions."""

    def do_POST(self) -> None:
        if self.headers.get("X-Fake") != "batch-array":
            super().do_POST()
            return
        self.record(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        usage = {"prompt_tokens": 2, "completion_tokens": 1000, "total_tokens": 1002}
        self.reply(200, [{"id": f"cmpl-{n}", "object": "text_completion", "usage": usage,
                          "choices": [{"index": 0, "text": "x", "finish_reason": "length"}]}
                         for n in range(3)])

    def do_GET(self) -> None:
        if self.path == "/api/ps":
            self.record(b"")
            self.reply(200, {"models": [{"name": name, "model": name, "size": 1}
                                        for name in ("small", "big")]})
        else:
            super().do_GET()


class BodyTestCase(ProxyTestCase):
    config_overrides = {"cost_mode": "estimate", "response_reserve": 256}
    upstream_handler = BodyUpstreamHandler

    def setUp(self) -> None:
        self.keys_path = write_keys_file(self, KEYS)
        self.config_overrides = dict(self.config_overrides, keys_file=self.keys_path)
        super().setUp()

    def post(self, path: str, body: bytes | dict, key: str = OPEN,
             content_type: str = "application/json", headers: dict | None = None) -> Response:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return self.request("POST", path, data, key=key,
                            headers=dict(headers or {}, **{"Content-Type": content_type}))

    def tokens_left(self, key: str = OPEN) -> int:
        return self.request("GET", "/v1/quota", key=key).json()["buckets"][0]["tokens"]

    def assert_refused(self, response: Response, path: str, status: int, key: str = OPEN,
                       before: int = 100_000) -> None:
        """Refused in the API's own shape, free, and never forwarded."""
        self.assertEqual(response.status, status, response.body)
        expected = "anthropic" if path.startswith("/v1/messages") else (
            "ollama" if path.startswith("/api/") else "openai")
        self.assertEqual(error_shape(path, response.json()), expected, response.body)
        self.assertNotIn(b"Traceback", response.body)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.tokens_left(key), before)


class SpellingTests(BodyTestCase):
    """Go's encoding/json (Ollama) reads keys without regard to case, Kelvin sign and long s
    included; of two equal keys each parser keeps a different one.  Both are refused."""

    ROUTES = {  # a valid body per API
        "/v1/chat/completions": CHAT,
        "/v1/messages": dict(CHAT, max_tokens=10),
        "/api/chat": CHAT,
        "/v1/completions": {"model": "small", "prompt": "hi"},
        "/v1/responses": {"model": "small", "input": "hi"},
    }
    SPELLINGS = [  # (what is added to the body as raw JSON text, the field it hides)
        ('"MODEL": "big"', "model"),
        ('"Model": "big"', "model"),
        ('"model": "big"', "model"),  # the same key twice
        ('"max_to\\u212aens": 100000', "max_tokens"),  # Kelvin sign: Go folds it to "k"
        ('"\\u017ftream": false', "stream"),             # long s: Go folds it to "s"
        ('"STREAM_OPTIONS": {"include_usage": false}', "stream_options"),
        ('"OPTIONS": {"num_predict": 100000}', "options"),
        ('"options": {"num_predict": 5, "NUM_PREDICT": -1}', "num_predict"),
        ('"N": 64', "n"),
        ('"metadata": {"user_id": "a", "USER_ID": "b"}', "user_id"),
    ]

    def test_other_spellings_of_read_fields_are_refused_in_each_apis_shape(self) -> None:
        for path, body in self.ROUTES.items():
            for added, field_name in self.SPELLINGS:
                with self.subTest(path=path, added=added):
                    text = json.dumps(body)[:-1] + ", " + added + "}"
                    response = self.post(path, text.encode(), key=LIMITED)
                    self.assert_refused(response, path, 400, key=LIMITED)

    def test_a_key_twice_anywhere_is_refused(self) -> None:
        body = b'{"model": "small", "messages": [{"role": "user", "content": "a", "content": "b"}]}'
        response = self.post("/v1/chat/completions", body)
        self.assert_refused(response, "/v1/chat/completions", 400)
        self.assertEqual(response.json()["error"]["code"], "duplicate_key")

    def test_what_json_has_no_words_for_is_refused(self) -> None:
        for body in (b'{"messages": [], "temperature": NaN}', b'{"messages": [], "top_p": 1e400}',
                     b'{"messages": [{"role": "user", "content": "\\ud800"}]}',  # half a surrogate pair
                     b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # encoded as bytes
                     b'\xef\xbb\xbf{"messages": []}'):
            with self.subTest(body=body):
                response = self.post("/v1/chat/completions", body)
                self.assert_refused(response, "/v1/chat/completions", 400)
        self.assert_still_serving()

    def test_the_upstream_receives_exactly_what_was_checked(self) -> None:
        self.post("/api/chat", b'  {"model": "small", "messages": [], "keep_alive": "5m",'
                               b' "options": {"temperature": 0.5}}\n', key=LIMITED)
        forwarded = self.upstream.requests[-1]["body"]
        # (with the output allowance the hard cap writes into a request that sets none)
        self.assertEqual(forwarded, b'{"model":"small","messages":[],"keep_alive":"5m",'
                                    b'"options":{"temperature":0.5,"num_predict":4096}}')


class AllowanceTests(BodyTestCase):
    """Every field that caps or multiplies the work is charged, in every dialect."""

    CASES = [  # (path, extra fields, answers x allowance each, or None for the reserve)
        ("/v1/chat/completions", {"max_tokens": 10}, 10),
        ("/v1/chat/completions", {"max_tokens": 10, "n_predict": 900}, 900),  # llama.cpp's wins
        ("/v1/chat/completions", {"max_tokens": 10, "n_predict": -1}, None),  # "no limit"
        ("/v1/chat/completions", {"max_tokens": 10, "max_completion_tokens": 30}, 30),
        ("/v1/chat/completions", {"max_completion_tokens": 10}, None),  # Ollama ignores it
        ("/v1/chat/completions", {"max_tokens": 10, "n": 4}, 40),
        ("/v1/chat/completions", {"max_tokens": 10, "n_cmpl": 6}, 60),
        ("/v1/chat/completions", {"max_tokens": 10, "max_output_tokens": 90}, 90),
        # llama.cpp reads max_completion_tokens on every route (a red team's finding)
        ("/v1/completions", {"max_tokens": 1, "max_completion_tokens": 500}, 500),
        ("/v1/responses", {"max_output_tokens": 1, "max_completion_tokens": 500}, 500),
        ("/v1/messages", {"max_tokens": 1, "max_completion_tokens": 600}, 600),
        ("/v1/completions", {"max_tokens": 10, "best_of": 5, "n": 2}, 50),
        ("/v1/completions", {"max_tokens": 10, "prompt": ["a", "b", "c"]}, 30),  # a batch
        ("/v1/completions", {"max_tokens": 10, "prompt": [[1, 2], [3, 4]]}, 20),
        ("/v1/completions", {"max_tokens": 10, "prompt": [{"prompt_string": "a"}] * 5}, 50),
        ("/v1/responses", {"max_output_tokens": 10, "n_predict": 70}, 70),
        ("/v1/messages", {"max_tokens": 10, "n_predict": 80}, 80),
        ("/api/chat", {"options": {"num_predict": 10}}, 10),
        ("/api/chat", {"options": {"num_predict": 0}}, None),  # older runners: no limit
        ("/api/chat", {"options": {"num_predict": -2}}, None),
    ]

    def test_every_allowance_and_multiplier_is_charged(self) -> None:
        for path, extra, output in self.CASES:
            with self.subTest(path=path, extra=extra):
                body = dict(CHAT, **extra)
                if path in ("/v1/completions", "/v1/responses"):
                    body = {"model": "small", "prompt": "hi", **extra} if path == "/v1/completions" \
                        else {"model": "small", "input": "hi", **extra}
                before = self.tokens_left()
                response = self.post(path, body)
                self.assertEqual(response.status, 200, response.body)
                # no bound: the hard cap writes (and charges) DEFAULT_MAX_OUTPUT_TOKENS
                expected = llm_proxy.prompt_tokens(body) + (self.config.default_max_output
                                                            if output is None else output)
                self.assertEqual(before - self.tokens_left(), expected)

    def test_a_batch_answered_as_a_list_is_settled_to_its_added_usage(self) -> None:
        """llama.cpp answers a batch with a JSON list: once refused as no answer and refunded,
        so a batch of any size was free."""
        self.start_proxy(**dict(self.config_overrides, cost_mode="usage"))
        body = {"model": "small", "prompt": ["a", "b", "c"], "max_tokens": 1000}
        response = self.post("/v1/completions", body, headers={"X-Fake": "batch-array"})
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(len(response.json()), 3)
        self.assertEqual(100_000 - self.tokens_left(), 3 * 1002)

    def test_a_token_id_is_a_token(self) -> None:
        body = {"model": "small", "prompt": list(range(8000)), "max_tokens": 1}
        before = self.tokens_left()
        self.post("/v1/completions", body)
        self.assertEqual(before - self.tokens_left(), 8000 + 1)

    def test_bad_multipliers_and_caps_are_refused(self) -> None:
        """Not numbers, or numbers a server keeps in 32 bits, where they wrap around."""
        cases = [("/v1/chat/completions", {"n": value}) for value in (0, -1, 1.5, "2", True, 2**31)]
        cases += [("/v1/chat/completions", {"max_tokens": 2**64 + 1}),
                  ("/v1/chat/completions", {"n_predict": -3}),
                  ("/api/chat", {"options": {"num_predict": 2**32}})]
        for path, extra in cases:
            with self.subTest(path=path, extra=extra):
                self.assert_refused(self.post(path, dict(CHAT, **extra)), path, 400)

    def test_a_stream_that_ends_without_its_usage_pays_for_its_text(self) -> None:
        """A server that ignores stream_options reports nothing: the text relayed is the measure,
        not the small reservation."""
        self.start_proxy(**dict(self.config_overrides, cost_mode="usage"))
        body = dict(CHAT, stream=True, max_tokens=10)
        response = self.post("/v1/chat/completions", body, headers={"X-Usage": "none", "X-Fake": "big-stream"})
        text = "".join(event["choices"][0]["delta"]["content"] for event in response.events()[:-1])
        self.assertEqual(100_000 - self.tokens_left(), llm_proxy.prompt_tokens(body) + -(-len(text) // 4))

    def test_background_responses_are_refused(self) -> None:
        response = self.post("/v1/responses", {"model": "small", "input": "hi", "background": True})
        self.assert_refused(response, "/v1/responses", 400)
        self.assertEqual(response.json()["error"]["param"], "background")


MULTIPART = (b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\n%s\r\n'
             b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
             b'Content-Type: audio/wav\r\n\r\nRIFF\x00\x01\r\n--XyZ--\r\n')
FORM = "multipart/form-data; boundary=XyZ"


class ModelListTests(BodyTestCase):
    """A key's model list holds for every body it sends, whatever its framing."""

    def test_a_model_off_the_list_is_refused_in_any_framing(self) -> None:
        cases = [
            ("/v1/audio/transcriptions", MULTIPART % b"big", FORM),
            ("/v1/audio/transcriptions", MULTIPART.replace(b'name="model"', b'name=model') % b"big", FORM),
            ("/v1/images/generations", b' \n{"model": "big", "prompt": "a cat"}', "application/json"),
            ("/v1/images/generations", b'{"model": "big"}', "text/plain"),  # llama.cpp reads it anyway
            ("/v1/rerank", b"model=big&query=x", "application/x-www-form-urlencoded"),
            ("/v1/messages/count_tokens", b'{"model": "big", "messages": []}', "application/json"),
            ("/api/show", b'{"name": "big"}', "application/json"),
            ("/v1/audio/transcriptions?model=big", MULTIPART % b"small", FORM),  # Go's FormValue
            # JSON is JSON whatever its Content-Type says: llama.cpp and Ollama read it so
            ("/v1/rerank", b'{"model": "big", "x": "="}', "application/x-www-form-urlencoded"),
            ("/v1/rerank", b'{"model": "big"}', FORM),
            # a body that names no model gets the server's default one
            ("/v1/rerank", b'{"query": "x", "documents": ["a"]}', "application/json"),
            ("/v1/audio/transcriptions", MULTIPART.replace(b'name="model"', b'name="language"') % b"en", FORM),
        ]
        for path, body, content_type in cases:
            with self.subTest(path=path, body=body[:40]):
                response = self.post(path, body, key=LIMITED, content_type=content_type)
                self.assert_refused(response, path, 403, key=LIMITED)

    def test_a_body_that_names_its_model_two_ways_or_cannot_show_it_is_refused(self) -> None:
        cases = [
            (MULTIPART.replace(b'name="model"', b'name="MODEL"') % b"big", FORM, 400),
            (MULTIPART.replace(b'name="file"', b'name="model"') % b"small", FORM, 400),
            (MULTIPART.replace(b'name="model"', b"name*=utf-8''model") % b"big", FORM, 400),
            (MULTIPART % b"small", "multipart/form-data", 400),  # no boundary
            (MULTIPART.replace(b"\r\n", b"\n") % b"big", FORM, 400),  # Go's reader takes bare LFs
            (b"RIFF\x00\x01 raw audio", "audio/wav", 415),
        ]
        for body, content_type, status in cases:
            with self.subTest(body=body[:50], content_type=content_type):
                response = self.post("/v1/audio/transcriptions", body, key=LIMITED,
                                     content_type=content_type)
                self.assert_refused(response, "/v1/audio/transcriptions", status, key=LIMITED)

    def test_allowed_forms_are_forwarded_as_sent(self) -> None:
        body = MULTIPART % b"small"
        response = self.post("/v1/audio/transcriptions", body, key=LIMITED, content_type=FORM)
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(self.upstream.requests[-1]["body"], body)
        raw = b"RIFF\x00\x01 raw audio"  # a key without a model list: nothing to check
        self.post("/v1/audio/transcriptions", raw, key=OPEN, content_type="audio/wav")
        self.assertEqual(self.upstream.requests[-1]["body"], raw)
        self.post("/v1/rerank", {"query": "x", "documents": ["a"]}, key=OPEN)  # nor a model to name
        self.assertEqual(self.upstream.requests[-1]["path"], "/v1/rerank")

    def test_a_users_own_model_list_holds_on_flat_rate_calls(self) -> None:
        response = self.post("/v1/images/generations", {"model": "big", "prompt": "a cat"},
                             key=APP_KEY, headers={"X-App-User": "kid"})
        self.assertEqual(response.status, 403, response.body)
        self.assertEqual(self.upstream.requests, [])
        response = self.post("/v1/images/generations", {"model": "big", "prompt": "a cat"},
                             key=APP_KEY, headers={"X-App-User": "parent"})
        self.assertEqual(response.status, 200, response.body)

    def test_model_cards_and_running_models_are_cut_to_the_list(self) -> None:
        missing = self.request("GET", "/v1/models/big", key=LIMITED)
        self.assertEqual(missing.status, 404)
        self.assertEqual(missing.json()["error"]["code"], "model_not_found")
        self.assertEqual(self.upstream.requests, [])
        self.request("GET", "/v1/models/small", key=LIMITED)
        self.assertEqual(self.upstream.requests[-1]["path"], "/v1/models/small")
        running = self.request("GET", "/api/ps", key=LIMITED)
        self.assertEqual(running.status, 200)
        self.assertEqual([model["name"] for model in running.json()["models"]], ["small"])
        everything = self.request("GET", "/api/ps", key=OPEN)
        self.assertEqual([model["name"] for model in everything.json()["models"]], ["small", "big"])


class ForwardingTests(BodyTestCase):
    def test_a_body_on_a_get_is_never_forwarded(self) -> None:
        smuggled = json.dumps(dict(CHAT, model="big")).encode()
        request = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + OPEN.encode()
                   + b"\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
        answer = self.raw(request + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(answer.count(b"HTTP/1.1 200"), 2, answer[:300])
        self.assertEqual([(r["method"], r["body"]) for r in self.upstream.requests], [("GET", b"")])
        self.assertNotIn("Content-Length", self.upstream.requests[0]["headers"])

    def test_no_body_is_forwarded_on_a_delete_either(self) -> None:
        self.request("DELETE", "/v1/rerank/r-1", json.dumps(dict(CHAT, model="big")).encode(), key=OPEN)
        self.assertEqual([r["method"] for r in self.upstream.requests], ["DELETE"])
        self.assertNotIn("Content-Length", self.upstream.requests[0]["headers"])  # (the fake reads none)

    def test_account_apis_and_server_management_are_closed(self) -> None:
        """A batch runs unmetered later, realtime hands out a credential for the upstream itself,
        files and jobs are every caller's, adapters are the owner's (a red team's finding)."""
        cases = [("POST", "/v1/batches"), ("GET", "/v1/files"), ("POST", "/v1/files"),
                 ("POST", "/v1/realtime/client_secrets"), ("POST", "/v1/realtime/sessions"),
                 ("GET", "/v1/conversations/conv_1/items"), ("POST", "/v1/fine_tuning/jobs"),
                 ("GET", "/v1/vector_stores"), ("POST", "/v1/Assistants"), ("POST", "/v1/threads/runs"),
                 ("GET", "/v1/organization/usage/completions"), ("POST", "/v1/uploads"),
                 ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/evals"), ("POST", "/v1/containers")]
        for method, path in cases:
            with self.subTest(method=method, path=path):
                response = self.request(method, path, {"model": "small"} if method == "POST" else None)
                self.assertEqual(response.status, 403, response.body)
                self.assertEqual(response.json()["error"]["code"], "endpoint_not_allowed")
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.tokens_left(), 100_000)

    def test_an_internal_error_after_the_charge_refunds_it(self) -> None:
        with mock.patch.object(llm_proxy.UpstreamExchange, "send", side_effect=RuntimeError("bug")):
            response = self.post("/v1/chat/completions", CHAT)
        self.assertEqual(response.status, 500)
        self.assertNotIn(b"Traceback", response.body)
        self.assertEqual(self.tokens_left(), 100_000)
        self.assert_still_serving()


class StoredAnswerTests(BodyTestCase):
    """A stored answer (OpenAI keeps responses) is read, continued or deleted only by its key."""

    STORED = "/v1/responses/chatcmpl-up"  # the fake upstream's answer id

    def forwarded_paths(self) -> list[str]:
        return [request["path"] for request in self.upstream.requests]

    def test_only_the_key_that_made_an_answer_reaches_it(self) -> None:
        self.post("/v1/responses", {"model": "small", "input": "hi"}, key=OPEN)
        for method in ("GET", "DELETE"):
            with self.subTest(method=method):
                refused = self.request(method, self.STORED, key=LIMITED)
                self.assertEqual(refused.status, 404)
                self.assertEqual(refused.json()["error"]["code"], "not_found")
        continued = self.post("/v1/responses", {"model": "small", "input": "go on",
                                                 "previous_response_id": "chatcmpl-up"}, key=LIMITED)
        self.assertEqual(continued.status, 404)
        self.assertEqual(self.forwarded_paths(), ["/v1/responses"])
        self.assertEqual(self.tokens_left(LIMITED), 100_000)
        self.request("GET", self.STORED + "/input_items", key=OPEN)
        self.post("/v1/responses", {"model": "small", "input": "go on",
                                    "previous_response_id": "chatcmpl-up"}, key=OPEN)
        self.assertEqual(self.forwarded_paths()[1:], [self.STORED + "/input_items", "/v1/responses"])

    def test_other_calls_cannot_refer_to_anothers_answer_or_to_stored_conversations(self) -> None:
        self.post("/v1/responses", {"model": "small", "input": "hi"}, key=OPEN)
        for path in ("/v1/responses/compact", "/v1/responses/input_tokens"):
            with self.subTest(path=path):
                response = self.post(path, {"model": "small", "previous_response_id": "chatcmpl-up"},
                                     key=LIMITED)
                self.assertEqual(response.status, 404, response.body)
        response = self.post("/v1/responses", {"model": "small", "input": "hi", "conversation": "conv_1"})
        self.assertEqual((response.status, response.json()["error"]["param"]), (400, "conversation"))
        self.assertEqual(self.forwarded_paths(), ["/v1/responses"])

    def test_an_answer_is_the_callers_before_the_caller_has_it(self) -> None:
        """A client may ask for its answer the moment it arrives: the proxy has recorded it as
        the caller's before sending it, not at the end of the request, after the answer went."""
        proxy, answered = self.proxy, threading.Event()
        request_arrived = proxy.request_arrived
        def end_of_request_held_back(connection: object) -> None:  # (only the first request's)
            answered.wait(WAIT)
            request_arrived(connection)
        proxy.request_arrived = end_of_request_held_back
        self.post("/v1/responses", {"model": "small", "input": "hi"}, key=OPEN)
        proxy.request_arrived = request_arrived
        try:
            self.request("GET", self.STORED, key=OPEN)
        finally:
            answered.set()
        self.assertEqual(self.forwarded_paths(), ["/v1/responses", self.STORED])  # not refused

    def test_an_id_the_proxy_never_relayed_is_found_by_nobody(self) -> None:
        self.assertEqual(self.request("GET", "/v1/responses/resp_elsewhere", key=OPEN).status, 404)
        self.assertEqual(self.request("GET", "/v1/chat/completions/chatcmpl-x", key=OPEN).status, 404)
        self.assertEqual(self.upstream.requests, [])

    def test_a_streamed_completion_is_stored_for_its_key_and_survives_a_restart(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        state = os.path.join(directory.name, "state.json")
        self.start_proxy(**dict(self.config_overrides, state_file=state))
        response = self.post("/v1/chat/completions", dict(CHAT, stream=True,
                                                          stream_options={"include_usage": True}))
        answer_id = response.events()[-2]["id"]  # the usage event's, as every chunk's
        self.start_proxy(**dict(self.config_overrides, state_file=state))  # saves, then restores
        self.assertEqual(self.request("GET", f"/v1/chat/completions/{answer_id}", key=LIMITED).status, 404)
        self.request("GET", f"/v1/chat/completions/{answer_id}", key=OPEN)
        self.assertEqual(self.forwarded_paths()[-1], f"/v1/chat/completions/{answer_id}")


class BadBodyTests(AdversarialTestCase):
    """A body the proxy cannot read, or one naming a model off the key's list, is refused for free."""

    def test_bad_bodies_are_400_and_free(self) -> None:
        nested = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        bodies = [b"{not json", b"[]", b'"string"', b'{"messages": "hi"}', b'{"messages": [], "model": 7}',
                  nested, b'{"messages": [], "x": "\xff\xfe"}', b'{"messages": [], "max_tokens": -1}',
                  b'{"messages": [], "max_tokens": 1.5}', b'{"messages": [], "stream": "yes"}']
        self.start_proxy(max_body_bytes=1_000_000)
        for body in bodies:
            with self.subTest(body=body[:40]):
                response = self.request("POST", "/v1/chat/completions", body)
                self.assert_openai_error(response, 400, "invalid_request_error")
        self.assert_nothing_charged_or_forwarded()
        self.assert_healthy()

    def test_model_list_applies_to_every_endpoint_that_names_a_model(self) -> None:
        self.start_proxy(keys_file=write_keys_file(self, {CLIENT_KEY: {"models": ["small"]}}))
        response = self.request("POST", "/v1/embeddings", {"model": "large", "input": "x"})
        self.assert_openai_error(response, 403, code="model_not_allowed")
        self.assertEqual(self.upstream.requests, [])
