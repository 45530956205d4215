"""Budgets that hold (issue 20): prices per model, money windows, budgets that never refill,
and the hard cap that keeps real spend within a window whatever the concurrency.

The upstream here is a stand-in for a paid API (``PaidUpstream``): it answers Chat
Completions, Responses and Anthropic Messages, streamed or not, with usage in each API's
real shape (cached, cache-written and reasoning tokens included), never generates more
than the output allowance it receives, and keeps its own bill at its own prices.  It may
be served over TLS (``ssl_context``).  Run by ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import json
import math
import os
import ssl
import tempfile
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from http.server import BaseHTTPRequestHandler

import llm_proxy
from llm_proxy import ConfigError, ModelCatalog, Usage, wait_phrase
from test_llm_proxy import CLIENT_KEY, OTHER_KEY, WAIT, ProxyTestCase, Response

# The stand-in's list prices per million tokens, as text: its bill is exact decimals.
PRICES = {
    "gpt-4.1-mini": {"input": "0.40", "cached_input": "0.10", "output": "1.60"},
    "gpt-4.1": {"input": "2.00", "cached_input": "0.50", "cache_write": "2.50", "output": "8.00"},
    "gpt-5-turbo": {"input": "1.25", "output": "10.00"},  # served and billed, but not in MODELS_FILE
}
IMAGE_PRICE = "0.04"  # per image, gpt-image-1's; dall-e-2 is served but has no price here
MODELS = {"currency": "USD", "models": {
    **{name: {"price": {part: float(value) for part, value in price.items()}, "max_output": 32768}
       for name, price in PRICES.items() if name != "gpt-5-turbo"},
    "gpt-image-1": {"price": {"per_call": float(IMAGE_PRICE)}}}}
TOKEN_MODELS = [name for name in PRICES if name != "gpt-5-turbo"]  # priced per token in MODELS
MILLION = 10 ** 6


def billed(model: str, prompt: int, cached: int, written: int, output: int) -> Fraction:
    """What the paid API charges for one answer, in dollars, exactly."""
    price = {part: Fraction(value) for part, value in PRICES[model].items()}
    cached_price = price.get("cached_input", price["input"])
    write_price = price.get("cache_write", price["input"])
    uncached = prompt - cached - written
    return (uncached * price["input"] + cached * cached_price + written * write_price
            + output * price["output"]) / MILLION


class PaidUpstream(llm_proxy.TrackedServer):
    """A paid API's stand-in that honours the output allowance and bills each answer.

    Steered per request by headers the proxy forwards: ``X-Want`` (output tokens the model
    would like to write, 400 by default), ``X-Cached``, ``X-Cache-Write`` and ``X-Reasoning``
    (parts of the prompt or output), ``X-Hold`` (wait for ``release`` before answering).
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.lock = threading.Lock()
        self.bill = Fraction(0)
        self.answers: list[dict] = []   # per answer: the body received and the usage billed
        self.unbounded = 0              # requests that reached it without an output allowance
        self.release = threading.Event()
        self.holding = threading.Semaphore(0)
        super().__init__(("127.0.0.1", 0), PaidHandler)
        self.scheme = "http"
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}/v1"

    def charge(self, body: dict, model: str, usage: dict, parts: tuple) -> None:
        with self.lock:
            self.bill += billed(model, *parts)
            self.answers.append({"body": body, "usage": usage, "parts": parts})


def content_tokens(value: object) -> int:
    """The stand-in's tokenizer: the characters of every text the model reads, 4 a token.

    Never more than the proxy's estimate, which counts every string of the body.
    """
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(content_tokens(item) for item in value)
    if isinstance(value, dict):
        return sum(content_tokens(item) for key, item in value.items() if key in ("content", "text"))
    return 0


class PaidHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: PaidUpstream

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if self.path == "/v1/images/generations":  # billed per image, no tokens reported
            with self.server.lock:
                self.server.bill += Fraction(IMAGE_PRICE) * body.get("n", 1)
                self.server.answers.append({"body": body, "usage": None, "parts": None})
            self.reply({"created": 1, "data": [{"url": "https://example.com/1.png"}]})
            return
        if self.headers.get("X-Hold"):
            self.server.holding.release()
            self.server.release.wait(WAIT)
        api = {"/v1/chat/completions": "chat", "/v1/responses": "responses",
               "/v1/messages": "messages"}[self.path.partition("?")[0]]
        allowance = self.allowance(api, body)
        if allowance is None:
            with self.server.lock:
                self.server.unbounded += 1
        want = int(self.headers.get("X-Want", "400"))
        output = want if allowance is None else min(want, allowance)
        reasoning = min(int(self.headers.get("X-Reasoning", "0")), output)
        prompt = math.ceil(content_tokens(body.get("messages", body.get("input", ""))) / 4) + 2
        if self.headers.get("X-Prompt-Tokens"):  # a tokenizer that counts otherwise (Chinese: a character)
            prompt = int(self.headers["X-Prompt-Tokens"]) + 2
        cached = min(int(self.headers.get("X-Cached", "0")), prompt)
        written = min(int(self.headers.get("X-Cache-Write", "0")), prompt - cached) if api == "messages" else 0
        finish = "length" if output < want else "stop"
        usage = self.usage(api, prompt, cached, written, output, reasoning)
        self.server.charge(body, body["model"], usage, (prompt, cached, written, output))
        text = f"{output} tokens"
        if body.get("stream"):
            self.stream(api, body, text, usage, finish)
        else:
            self.reply(self.answer(api, body["model"], text, usage, finish))

    @staticmethod
    def allowance(api: str, body: dict) -> int | None:
        names = {"chat": ("max_tokens", "max_completion_tokens"), "responses": ("max_output_tokens",),
                 "messages": ("max_tokens",)}[api]
        given = [body[name] for name in names if isinstance(body.get(name), int)]
        return min(given) if given else None

    @staticmethod
    def usage(api: str, prompt: int, cached: int, written: int, output: int, reasoning: int) -> dict:
        if api == "chat":
            return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
                    "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0}}
        if api == "responses":
            return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                    "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
                    "total_tokens": prompt + output}
        return {"input_tokens": prompt - cached - written, "cache_read_input_tokens": cached,
                "cache_creation_input_tokens": written, "output_tokens": output}

    @staticmethod
    def answer(api: str, model: str, text: str, usage: dict, finish: str) -> dict:
        if api == "chat":
            return {"id": "chatcmpl-paid", "object": "chat.completion", "created": 1, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish}], "usage": usage}
        if api == "responses":
            return {"id": "resp_paid", "object": "response", "model": model,
                    "status": "incomplete" if finish == "length" else "completed",
                    "output": [{"type": "message", "role": "assistant",
                                "content": [{"type": "output_text", "text": text}]}], "usage": usage}
        return {"id": "msg_paid", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "max_tokens" if finish == "length" else "end_turn", "usage": usage}

    def stream(self, api: str, body: dict, text: str, usage: dict, finish: str) -> None:
        if api == "chat":
            events = [{"id": "chatcmpl-paid", "choices": [{"index": 0, "delta": {"content": text},
                                                            "finish_reason": None}]},
                      {"id": "chatcmpl-paid", "choices": [{"index": 0, "delta": {},
                                                            "finish_reason": finish}]}]
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append({"id": "chatcmpl-paid", "choices": [], "usage": usage})
            frames = [f"data: {json.dumps(event)}\n\n" for event in events] + ["data: [DONE]\n\n"]
        elif api == "responses":
            done = self.answer(api, body["model"], text, usage, finish)
            frames = [f"event: {kind}\ndata: {json.dumps(dict(event, type=kind))}\n\n" for kind, event in (
                ("response.created", {"response": dict(done, status="in_progress", usage=None)}),
                ("response.output_text.delta", {"delta": text}),
                ("response.completed", {"response": done}))]
        else:
            start = dict(self.answer(api, body["model"], "", dict(usage, output_tokens=1), finish),
                         content=[], stop_reason=None)
            frames = [f"event: {kind}\ndata: {json.dumps(dict(event, type=kind))}\n\n" for kind, event in (
                ("message_start", {"message": start}),
                ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}}),
                ("message_delta", {"delta": {"stop_reason": "end_turn"},
                                   "usage": {"output_tokens": usage["output_tokens"]}}),
                ("message_stop", {}))]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.headers.get("X-Break"):  # billed in full, but the stream breaks off after its first event
            frames, self.close_connection = frames[:1], True
            data = frames[0].encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            return
        for frame in frames + [""]:
            data = frame.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def reply(self, value: object) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class BudgetTestCase(ProxyTestCase):
    """A proxy in front of the paid stand-in, with MODELS_FILE and a keys file of its own."""

    cost_mode = "request"  # a money window settles to the usage whatever the mode

    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.keys_path = os.path.join(directory.name, "keys.json")
        self.models_path = os.path.join(directory.name, "models.json")
        self.write(self.models_path, MODELS)
        self.write(self.keys_path, {CLIENT_KEY: {"name": "ada", "buckets": [
            {"name": "course", "unit": "money", "max_amount": 1.00, "period": "total"}]}})
        self.config_overrides = {"keys_file": self.keys_path, "models_file": self.models_path,
                                 "cost_mode": self.cost_mode}
        super().setUp()
        self.paid = PaidUpstream()
        threading.Thread(target=self.paid.serve_forever, kwargs={"poll_interval": 0.01},
                         daemon=True).start()
        self.costs: list[float] = []
        self.start_proxy(upstream_url=self.paid.url, **self.config_overrides)

    def tearDown(self) -> None:
        self.paid.release.set()
        if self.proxy is not None:
            self.stop(self.proxy)
            self.proxy = None
        self.stop(self.paid)
        super().tearDown()

    def start_proxy(self, **overrides: object) -> llm_proxy.ProxyServer:
        proxy = super().start_proxy(**overrides)
        record = proxy.admin.record

        def recording(call: llm_proxy.Call) -> None:  # what the proxy says each call cost
            if call.charge is not None:
                self.costs.append(call.cost)
            record(call)
        proxy.admin.record = recording  # type: ignore[method-assign]
        return proxy

    @staticmethod
    def write(path: str, value: object) -> None:
        with open(path + ".tmp", "w") as file:
            file.write(value if isinstance(value, str) else json.dumps(value))
        os.replace(path + ".tmp", path)

    def use_budget(self, amount: float, **window: object) -> None:
        self.write(self.keys_path, {
            CLIENT_KEY: {"name": "ada", "buckets": [dict(
                {"name": "course", "unit": "money", "max_amount": amount, "period": "total"}, **window)]},
            OTHER_KEY: {"name": "bob", "max_tokens": 1000}})
        self.start_proxy(upstream_url=self.paid.url, **self.config_overrides)

    def ask(self, api: str = "chat", model: str = "gpt-4.1", stream: bool = False,
            key: str = CLIENT_KEY, allowance: int | None = 1000, headers: dict | None = None,
            content: str = "Explain the hard cap in one paragraph, please.") -> Response:
        body: dict = {"model": model, "stream": stream}
        if api == "responses":
            body["input"] = content
            path = "/v1/responses"
            if allowance is not None:
                body["max_output_tokens"] = allowance
        else:
            body["messages"] = [{"role": "user", "content": content}]
            path = "/v1/chat/completions" if api == "chat" else "/v1/messages"
            if allowance is not None:
                body["max_tokens"] = allowance
        return self.request("POST", path, body, key=key, headers=headers)

    def quota(self, key: str = CLIENT_KEY) -> dict:
        return self.request("GET", "/v1/quota", key=key).json()

    def text(self, response: Response) -> str:
        return response.json()["choices"][0]["message"]["content"]

    def prompt_error(self) -> Fraction:
        """The most one prompt's estimate may fall short of the stand-in's count, priced."""
        short = max((answer["parts"][0] - llm_proxy.prompt_tokens(answer["body"])
                     for answer in self.paid.answers), default=0)
        return max(0, short) * Fraction(PRICES["gpt-4.1"]["cache_write"]) / MILLION


class HardCapTests(BudgetTestCase):
    def test_a_hundred_parallel_requests_never_pass_the_budget(self) -> None:
        self.use_budget(0.02)
        start = threading.Barrier(100)
        replies: list[str] = []

        def one(index: int) -> None:
            start.wait()
            response = self.ask(api=("chat", "responses", "messages")[index % 3], allowance=2000,
                                headers={"X-Want": "2000", "X-Reasoning": "300"})
            replies.append(response.body.decode())
        threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 3)
        self.assertEqual(len(replies), 100)
        self.assertLessEqual(self.paid.bill, Fraction("0.02") + self.prompt_error())
        self.assertGreater(self.paid.bill, Fraction("0.019"))  # the budget was used, not refused
        self.assertEqual(self.paid.unbounded, 0)
        self.assertTrue(any("budget used up" in reply for reply in replies))
        self.wait_for(lambda: len(self.costs) == len(self.paid.answers))
        self.assertAlmostEqual(sum(self.costs), float(self.paid.bill), places=6)

    def test_a_long_sequence_never_passes_the_budget(self) -> None:
        self.use_budget(0.02)
        served = 0
        for index in range(60):
            response = self.ask(api=("chat", "responses", "messages")[index % 3], stream=index % 2 == 0,
                                allowance=None if index % 4 == 0 else 900,
                                headers={"X-Want": "900", "X-Cached": "5"})
            self.assertEqual(response.status, 200)
            if b"budget used up" in response.body:
                break
            served += 1
        else:
            self.fail("a $0.02 budget paid for 60 answers of up to 900 tokens at $8 a million")
        self.assertGreater(served, 1)
        self.assertLessEqual(self.paid.bill, Fraction("0.02") + self.prompt_error())
        self.assertEqual(self.paid.unbounded, 0)  # an allowance was written where none was sent
        quota = self.quota()["buckets"][0]
        self.assertAlmostEqual(quota["spent"], float(self.paid.bill), places=8)
        self.assertGreaterEqual(quota["remaining"], -float(self.prompt_error()))

    def test_a_burst_of_prompts_the_estimate_undercounts_stays_within_the_budget(self) -> None:
        """Chinese text is about a token a character, four times the estimate: a money window
        reserves the prompt's bytes, so a burst of such requests cannot overrun the budget."""
        self.use_budget(0.02)
        prompt = "预算" * 1000  # 2,000 characters: the stand-in counts them as 2,000 tokens

        def ask(_: int) -> int:
            return self.ask(model="gpt-4.1", allowance=200, content=prompt,
                            headers={"X-Want": "200", "X-Prompt-Tokens": "2000"}).status
        with ThreadPoolExecutor(50) as pool:
            self.assertEqual(set(pool.map(ask, range(50))), {200})
        self.assertLessEqual(self.paid.bill, Fraction("0.02"))
        self.assertGreater(len(self.paid.answers), 0)

    def test_a_nearly_spent_key_gets_a_shorter_answer(self) -> None:
        self.use_budget(0.004)
        self.ask(allowance=400, headers={"X-Want": "400"})  # $0.0032 and the prompt: little is left
        left = round(self.quota()["buckets"][0]["remaining"] * llm_proxy.NANOS)
        response = self.ask(allowance=1000, headers={"X-Want": "1000"})
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json()["choices"][0]["finish_reason"], "length")
        forwarded = self.paid.answers[-1]["body"]
        prompt = llm_proxy.prompt_tokens({k: v for k, v in forwarded.items() if k != "max_tokens"},
                                         bound=True)  # (a money window reserves the prompt's bound)
        price = ModelCatalog.parse(json.dumps(MODELS)).price("gpt-4.1")
        expected = (left - price.input_nanos(prompt)) // 8000  # $8 a million: 8,000 nano-dollars a token
        self.assertEqual(forwarded["max_tokens"], expected)
        self.assertLess(expected, 1000)
        self.assertGreaterEqual(expected, self.config.min_output)
        self.assertGreaterEqual(self.quota()["buckets"][0]["remaining"], 0)
        limited = self.ask(allowance=1000)
        self.assertEqual(self.text(limited), "course limit reached: budget used up")
        self.assertEqual(len(self.paid.answers), 2)

    def test_a_request_without_an_allowance_gets_the_models_max_output(self) -> None:
        self.ask(allowance=None, headers={"X-Want": "20"})
        self.assertEqual(self.paid.answers[-1]["body"]["max_tokens"], 32768)
        self.ask(api="responses", allowance=None, headers={"X-Want": "20"})
        self.assertEqual(self.paid.answers[-1]["body"]["max_output_tokens"], 32768)
        self.assertEqual(self.paid.unbounded, 0)

    def test_a_request_held_back_by_its_own_requests_waits_for_them(self) -> None:
        self.use_budget(0.02)
        first: list[Response] = []
        holder = threading.Thread(target=lambda: first.append(self.ask(
            allowance=2490, headers={"X-Hold": "1", "X-Want": "100"})))  # reserves nearly all of it
        holder.start()
        self.assertTrue(self.paid.holding.acquire(timeout=WAIT))
        second: list[Response] = []
        waiter = threading.Thread(target=lambda: second.append(self.ask(allowance=2400)))
        waiter.start()
        waiter.join(0.3)
        self.assertTrue(waiter.is_alive(), "refused instead of waiting for the caller's own request")
        self.paid.release.set()
        holder.join(WAIT)
        waiter.join(WAIT)
        self.assertEqual(self.text(second[0]), "400 tokens")  # served once the first settled
        self.assertEqual(len(self.paid.answers), 2)

    def test_a_token_window_caps_too_and_overdraft_keeps_the_old_way(self) -> None:
        self.write(self.keys_path, {
            CLIENT_KEY: {"name": "ada", "buckets": [{"max_tokens": 200, "period": "total"}]},
            OTHER_KEY: {"name": "bob", "buckets": [{"max_tokens": 200, "period": "total",
                                                    "overdraft": True}]}})
        self.start_proxy(upstream_url=self.paid.url, keys_file=self.keys_path,
                         models_file=self.models_path, cost_mode="usage", response_reserve=50)
        for key in (CLIENT_KEY, OTHER_KEY):
            self.ask(key=key, allowance=1000, headers={"X-Want": "1000"})
        capped, overdrawn = (answer["body"]["max_tokens"] for answer in self.paid.answers)
        self.assertLess(capped, 200)
        self.assertEqual(overdrawn, 1000)  # forwarded as asked, and the usage taken as debt
        short = self.paid.answers[0]["parts"][0] - llm_proxy.prompt_tokens(
            {k: v for k, v in self.paid.answers[0]["body"].items() if k != "max_tokens"})
        self.assertGreaterEqual(self.quota(CLIENT_KEY)["buckets"][0]["tokens"], -max(0, short))
        self.assertEqual(self.quota(OTHER_KEY)["buckets"][0]["tokens"],
                         200 - self.paid.answers[1]["parts"][0] - 1000)


class PricingTests(BudgetTestCase):
    def test_a_mixed_run_costs_what_the_paid_api_bills(self) -> None:
        runs = [(api, model, stream, headers)
                for api in ("chat", "responses", "messages") for model in TOKEN_MODELS
                for stream in (False, True)
                for headers in ({"X-Want": "120"}, {"X-Want": "300", "X-Cached": "9", "X-Reasoning": "200"},
                                {"X-Want": "50", "X-Cached": "4", "X-Cache-Write": "6"})]
        for api, model, stream, headers in runs:
            with self.subTest(api=api, model=model, stream=stream, headers=headers):
                self.assertEqual(self.ask(api=api, model=model, stream=stream, headers=headers,
                                          content="x" * 200).status, 200)
        self.wait_for(lambda: len(self.costs) == len(runs))
        self.assertEqual(len(self.paid.answers), len(runs))
        self.assertAlmostEqual(sum(self.costs), float(self.paid.bill), places=6)
        spent = self.quota()["buckets"][0]["spent"]
        self.assertEqual(round(spent * 10 ** 6), round(self.paid.bill * 10 ** 6))
        each = sorted(float(billed(answer["body"]["model"], *answer["parts"])) for answer in self.paid.answers)
        for cost, bill in zip(sorted(self.costs), each):  # (a call is recorded just after its answer)
            self.assertAlmostEqual(cost, bill, places=9)

    def test_every_call_has_a_cost_even_without_money_windows(self) -> None:
        self.use_budget(1.0)
        self.ask(key=OTHER_KEY, model="gpt-4.1-mini", headers={"X-Want": "10"})
        self.ask(key=OTHER_KEY, model="gpt-5-turbo", headers={"X-Want": "10"})
        self.wait_for(lambda: len(self.costs) == 2)
        self.assertAlmostEqual(self.costs[0], float(billed("gpt-4.1-mini", *self.paid.answers[0]["parts"])), 9)
        self.assertEqual(self.costs[1], 0.0)

    def test_an_unpriced_model_is_a_free_403_for_a_money_key_only(self) -> None:
        for api in ("chat", "messages"):
            with self.subTest(api=api):
                response = self.ask(api=api, model="gpt-5-turbo")
                self.assertEqual(response.status, 403)
                if api == "chat":
                    error = self.assert_openai_error(response, 403, "permission_error", "model_not_priced")
                    self.assertEqual(error["param"], "model")
                else:
                    self.assertEqual(response.json()["type"], "error")
                    self.assertEqual(response.json()["error"]["type"], "permission_error")
        self.assertEqual(self.paid.answers, [])
        self.assertEqual(self.quota()["buckets"][0]["spent"], 0)
        self.use_budget(1.0)
        self.assertEqual(self.ask(key=OTHER_KEY, model="gpt-5-turbo", headers={"X-Want": "5"}).status, 200)

    def test_a_stream_cut_short_before_its_usage_keeps_its_whole_reservation(self) -> None:
        """What a cut stream used cannot be counted (a paid API bills what it wrote), so a
        money window keeps what it reserved: the prompt's bound and the whole allowance."""
        for api in ("chat", "responses", "messages"):
            with self.subTest(api=api):
                before = self.quota()["buckets"][0]["spent"]
                self.ask(api=api, model="gpt-4.1", stream=True, allowance=500,
                         headers={"X-Want": "500", "X-Break": "1"})
                spent = self.quota()["buckets"][0]["spent"] - before
                self.assertGreaterEqual(spent, 500 * 8.00 / MILLION)  # the allowance, at least
                self.assertGreaterEqual(spent, float(billed("gpt-4.1", *self.paid.answers[-1]["parts"])))

    def test_fallback_models_are_refused_to_a_money_key_for_free(self) -> None:
        body = {"model": "gpt-4.1-mini", "models": ["gpt-4.1", "o1-pro"], "max_tokens": 10,
                "messages": [{"role": "user", "content": "hi"}]}
        refused = self.request("POST", "/v1/chat/completions", body)
        self.assert_openai_error(refused, 400, code="fallback_models_not_allowed")
        self.assertEqual(self.paid.answers, [])
        self.use_budget(1.0)
        self.assertEqual(self.request("POST", "/v1/chat/completions", body, key=OTHER_KEY).status, 200)

    def test_what_would_be_billed_beyond_its_tokens_is_refused_to_a_money_key_for_free(self) -> None:
        chat = {"model": "gpt-4.1", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        responses = {"model": "gpt-4.1", "max_output_tokens": 10, "input": "hi"}
        stored = self.request("POST", "/v1/responses", responses).json()["id"]  # this key's own
        answered = len(self.paid.answers)
        for path, body, field in (
                ("/v1/chat/completions", dict(chat, service_tier="priority"), "service_tier"),
                ("/v1/chat/completions", dict(chat, modalities=["text", "audio"]), "audio"),
                ("/v1/responses", dict(responses, tools=[{"type": "web_search_preview"}]), "tools"),
                ("/v1/responses", dict(responses, previous_response_id=stored), "previous_response_id")):
            with self.subTest(field=field):
                refused = self.request("POST", path, body)
                error = self.assert_openai_error(refused, 400, code="not_priced_for_this_key")
                self.assertEqual(error["param"], field)
        self.assertEqual(len(self.paid.answers), answered)
        self.assertEqual(self.request("POST", "/v1/responses", dict(
            responses, tools=[{"type": "function", "name": "f", "parameters": {}}])).status, 200)

    def test_an_image_costs_its_price_per_call_and_an_unpriced_one_is_refused(self) -> None:
        image = {"model": "gpt-image-1", "prompt": "a red apple", "n": 1}
        self.assertEqual(self.request("POST", "/v1/images/generations", image).status, 200)
        self.wait_for(lambda: len(self.costs) == 1)
        self.assertEqual(self.costs, [float(IMAGE_PRICE)])
        self.assertAlmostEqual(self.quota()["buckets"][0]["spent"], float(IMAGE_PRICE), places=9)
        four = self.request("POST", "/v1/images/generations", dict(image, n=4))  # four images, four prices
        self.assertEqual(four.status, 200)
        self.wait_for(lambda: len(self.costs) == 2)
        self.assertEqual(self.costs[1], 4 * float(IMAGE_PRICE))
        self.assertAlmostEqual(self.quota()["buckets"][0]["spent"], 5 * float(IMAGE_PRICE), places=9)
        self.assertEqual(self.request("POST", "/v1/images/generations", dict(image, n=0)).status, 400)
        refused = self.request("POST", "/v1/images/generations", dict(image, model="dall-e-2"))
        self.assert_openai_error(refused, 403, "permission_error", "model_not_priced")
        self.assertEqual(len(self.paid.answers), 2)  # (the refused ones never reached it)
        self.assertEqual(self.paid.bill, 5 * Fraction(IMAGE_PRICE))

    def test_quota_shows_money_in_the_currency(self) -> None:
        served = self.ask(model="gpt-4.1-mini", headers={"X-Want": "100"})
        self.assertEqual(served.headers["X-RateLimit-Limit"], "1")  # amounts in the currency
        self.assertLess(float(served.headers["X-RateLimit-Remaining"]), 1.0)
        self.assertIsNone(served.headers["X-RateLimit-Refill-Seconds"])  # a total window never refills
        quota = self.quota()
        window = quota["buckets"][0]
        self.assertEqual(quota["currency"], "USD")
        self.assertEqual((window["unit"], window["period"], window["capacity"]), ("money", "total", 1.0))
        self.assertAlmostEqual(window["spent"], float(self.paid.bill), places=9)
        self.assertAlmostEqual(window["remaining"], 1.0 - float(self.paid.bill), places=9)
        self.assertIsNone(window["seconds_to_next_refill"])
        self.assertIsNone(window["seconds_to_full"])
        self.assertIsNone(window["refill_interval_seconds"])

    def test_the_price_of_every_part(self) -> None:
        price = ModelCatalog.parse(json.dumps(MODELS)).price("gpt-4.1")
        for used, dollars in ((Usage(1_000_000, 0), "2.00"), (Usage(0, 1_000_000, reasoning=400_000), "8.00"),
                              (Usage(1_000_000, 0, cached_input=1_000_000), "0.50"),
                              (Usage(1_000_000, 0, cache_write=1_000_000), "2.50"),
                              (Usage(7, 3, cached_input=2, cache_write=1), "0.0000355")):
            with self.subTest(used=used):
                self.assertEqual(price.nanos(used), Fraction(dollars) * llm_proxy.NANOS)
        mini = ModelCatalog.parse(json.dumps(MODELS)).price("gpt-4.1-mini")
        self.assertEqual(mini.cache_write, mini.input)  # not given: the input price


class ModelsFileTests(BudgetTestCase):
    def test_an_edit_is_picked_up_and_a_broken_one_keeps_the_last_good(self) -> None:
        cheaper = json.loads(json.dumps(MODELS))
        cheaper["models"]["gpt-4.1"]["price"]["output"] = 4.0
        self.write(self.models_path, cheaper)
        self.proxy.request_reload()
        self.wait_for(lambda: any("MODELS_FILE" in line and "loaded" in line for line in self.log.lines))
        self.assertEqual(self.proxy.models_file.catalog.price("gpt-4.1").output, 4)
        self.write(self.models_path, '{"models": {"gpt-4.1": {"price": {"input": 2, "ouptut": 1}}}}')
        self.proxy.request_reload()
        self.wait_for(lambda: any("keeping the previous prices" in line for line in self.log.lines))
        self.assertIn("did you mean 'output'?", self.written("keeping the previous prices"))
        self.assertEqual(self.proxy.models_file.catalog.price("gpt-4.1").output, 4)
        self.ask(headers={"X-Want": "100"})
        self.wait_for(lambda: len(self.costs) == 1)
        prompt, _, _, output = self.paid.answers[0]["parts"]
        self.assertAlmostEqual(self.costs[0], (prompt * 2.0 + output * 4.0) / MILLION, places=9)

    def test_strict_validation_says_what_is_wrong(self) -> None:
        for text, message in (
                ('{"models": {"m": {"price": {"input": 1, "output": 1, "cached_imput": 1}}}}',
                 "did you mean 'cached_input'"),
                ('{"models": {"m": {"price": {"input": -1, "output": 1}}}}', "0 or more"),
                ('{"models": {"m": {"price": {"input": "1", "output": 1}}}}', "must be a number"),
                ('{"models": {"m": {"price": {"input": 1}}}}', "output is missing"),
                ('{"models": {"m": {"price": {"input": 1, "output": 1}, "max_ouput": 5}}}', "max_output"),
                ('{"models": {"m": {"max_output": 0}}}', "max_output"),
                ('{"currency": "USD", "modles": {}}', "did you mean 'models'"),
                ('{"models": {}, "models": {}}', "appears twice"),
                ('{"models": {"m": {"price": {"input": 1e999, "output": 1}}}}', "not valid JSON"),
                ('[1]', "must be an object")):
            with self.subTest(text=text):
                with self.assertRaisesRegex(ConfigError, message):
                    ModelCatalog.parse(text)

    def test_a_broken_file_stops_startup(self) -> None:
        self.write(self.models_path, "{")
        with self.assertRaisesRegex(ConfigError, "MODELS_FILE"):
            llm_proxy.ProxyServer(llm_proxy.Config(upstream_url=self.paid.url, port=0, host="127.0.0.1",
                                                   models_file=self.models_path))

    def test_money_windows_are_checked_at_load(self) -> None:
        config = llm_proxy.Config(upstream_url="http://127.0.0.1:9/v1")
        for window, message in (({"unit": "money", "max_tokens": 5}, "max_amount"),
                                ({"unit": "money", "max_amount": 0}, "above 0"),
                                ({"unit": "money", "max_amount": True}, "max_amount"),
                                ({"max_amount": 1}, "money"),
                                ({"period": "forever"}, "total"),
                                ({"overdraft": "yes"}, "overdraft")):
            with self.subTest(window):
                with self.assertRaisesRegex(ConfigError, message):
                    llm_proxy.parse_keys_file(json.dumps({"k": {"buckets": [window]}}), config)


class TotalPeriodTests(ProxyTestCase):
    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.keys_path = os.path.join(directory.name, "keys.json")
        with open(self.keys_path, "w") as file:
            json.dump({CLIENT_KEY: {"name": "ada", "buckets": [
                {"name": "trial", "unit": "requests", "max_tokens": 2, "period": "total"}]}}, file)
        self.config_overrides = {"keys_file": self.keys_path}
        super().setUp()

    def test_a_total_window_never_refills(self) -> None:
        for _ in range(2):
            self.assertEqual(self.chat().json()["choices"][0]["message"]["content"], "hi from upstream")
        for years in (0, 1, 50):
            self.clock.advance(years * 366 * 86400)
            self.wall.advance(years * 366 * 86400)
            limited = self.chat()
            self.assertEqual(limited.json()["choices"][0]["message"]["content"],
                             "trial limit reached: budget used up")
            self.assertIsNone(limited.headers["Retry-After"])
            self.assertIsNone(limited.headers["X-RateLimit-Reset-Seconds"])
            self.assertIsNone(limited.headers["X-RateLimit-Refill-Seconds"])
            self.assertEqual(limited.headers["X-RateLimit-Remaining"], "0")
        window = self.request("GET", "/v1/quota").json()["buckets"][0]
        self.assertEqual((window["tokens"], window["period"]), (0, "total"))
        self.assertEqual((window["seconds_to_next_refill"], window["seconds_to_full"]), (None, None))
        self.assertEqual(len(self.upstream.requests), 2)

    def test_as_an_error_it_is_a_429_without_retry_after(self) -> None:
        self.start_proxy(keys_file=self.keys_path, limit_response="error")
        self.chat()
        self.chat()
        response = self.chat()
        error = self.assert_openai_error(response, 429, code="rate_limit_exceeded")
        self.assertEqual(error["message"], "trial limit reached: budget used up")
        self.assertIsNone(response.headers["Retry-After"])


class WaitPhraseTests(unittest.TestCase):
    def test_waits_as_people_say_them(self) -> None:
        previous = os.environ.get("TZ")
        os.environ["TZ"] = "Europe/Berlin"
        time.tzset()
        try:
            now = time.mktime((2026, 11, 25, 10, 0, 0, 0, 0, -1))  # a Wednesday, 10:00
            for seconds, said in ((1, "1 min"), (299, "5 min"), (3600, "60 min"), (3601, "1 h 1 min"),
                                  (3 * 3600 + 20 * 60, "3 h 20 min"), (5 * 3600, "5 h"),
                                  (86399, "24 h"), (86400, "until Thursday 10:00"),
                                  (4 * 86400 + 14 * 3600, "until Monday"),
                                  (4 * 86400 + 14 * 3600 + 1, "until Monday 00:01"),
                                  (40 * 86400, "until 4 January 10:00")):
                with self.subTest(seconds=seconds):
                    self.assertEqual(wait_phrase(seconds, now), said)
        finally:
            if previous is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = previous
            time.tzset()


if __name__ == "__main__":
    unittest.main()
