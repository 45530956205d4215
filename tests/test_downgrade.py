"""Downgrade instead of refusal (issue 21, item 6): ``"when_limited": {"model": "small"}``.

A call whose windows for the model asked are empty is served by the named model when that
model's windows can pay: the body forwarded names it, its windows pay (and only they), the
answer's ``model`` is the upstream's (the fallback's) and ``X-LLM-Proxy-Model`` says so.
Table-driven over Chat Completions, Responses, Anthropic Messages and Ollama chat, each
answered by the demo echo server (which names the model it was asked for).
Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from dataclasses import dataclass

import llm_proxy
from llm_proxy import ConfigError
from test_llm_proxy import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, ProxyTestCase, Response, write_keys_file

APP_KEY = "sk-app-classroom-7777"
CONTENT = "Hello there, what is a token bucket?"


class RecordingEcho(llm_proxy.EchoModelHandler):
    """The demo model server, unpaced, keeping every body it receives (as parsed)."""

    word_delay = 0.0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append({"path": self.path, "body": json.loads(body)})
        self.rfile = io.BytesIO(body)
        super().do_POST()


@dataclass(frozen=True)
class Api:
    name: str
    path: str
    allowance: tuple[str, ...]  # where the request's output allowance is written

    def body(self, model: str, stream: bool = False, allowance: int | None = None) -> dict:
        body: dict = {"model": model, "stream": stream}
        if self.name == "responses":
            body["input"] = CONTENT
        else:
            body["messages"] = [{"role": "user", "content": CONTENT}]
        if self.name == "messages":
            body["max_tokens"] = 100
        if allowance is not None:
            self.set_allowance(body, allowance)
        return body

    def set_allowance(self, body: dict, value: int) -> None:
        *outer, last = self.allowance
        for name in outer:
            body = body.setdefault(name, {})
        body[last] = value

    def allowance_of(self, body: dict) -> int:
        for name in self.allowance:
            body = body[name]
        return body  # type: ignore[return-value]


APIS = [Api("chat", "/v1/chat/completions", ("max_tokens",)),
        Api("responses", "/v1/responses", ("max_output_tokens",)),
        Api("messages", "/v1/messages", ("max_tokens",)),
        Api("ollama", "/api/chat", ("options", "num_predict"))]


def models_named(body: bytes) -> set[str]:
    """Every ``model`` an answer names, whole or streamed (SSE events or JSON lines)."""
    return set(re.findall(r'"model":\s*"([^"]*)"', body.decode()))


def window(name: str, size: int, models: list[str] | None = None, **more: object) -> dict:
    """A window of requests that never refills (counted by model when ``models`` is given)."""
    spec: dict = {"name": name, "unit": "requests", "max_tokens": size, "period": "total", **more}
    if models is not None:
        spec["models"] = models
    return spec


BY_MODEL = [window("big", 1, ["big"]), window("small", 5, ["small"]), window("all", 10)]


class DowngradeTestCase(ProxyTestCase):
    upstream_handler = RecordingEcho

    def setUp(self) -> None:
        super().setUp()
        self.keys({CLIENT_KEY: {"name": "ada", "models": ["big", "small"], "buckets": BY_MODEL,
                                "when_limited": {"model": "small"}}})

    def keys(self, entries: dict, **settings: object) -> None:
        self.start_proxy(keys_file=write_keys_file(self, entries), admin_key=ADMIN_KEY, **settings)

    def ask(self, api: Api, model: str = "big", stream: bool = False, key: str = CLIENT_KEY,
            allowance: int | None = None, **fields: object) -> Response:
        return self.request("POST", api.path, dict(api.body(model, stream, allowance), **fields), key=key)

    def forwarded(self) -> list[str]:
        """The model each request that reached the upstream named."""
        return [request["body"]["model"] for request in self.upstream.requests]

    def levels(self, key: str = CLIENT_KEY) -> dict:
        return {bucket["name"]: bucket["tokens"]
                for bucket in self.request("GET", "/v1/quota", key=key).json()["buckets"]}

    def assert_served_by(self, response: Response, model: str, downgraded: bool) -> None:
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(models_named(response.body), {model})
        self.assertEqual(response.headers.get("X-LLM-Proxy-Model"), model if downgraded else None)
        self.assertNotIn(b"limit reached", response.body)


class FallbackServesTests(DowngradeTestCase):
    def test_an_empty_window_is_served_by_the_fallback_whose_windows_pay(self) -> None:
        for api in APIS:
            with self.subTest(api.name):
                self.upstream.requests.clear()
                self.keys({CLIENT_KEY: {"name": "ada", "models": ["big", "small"], "buckets": BY_MODEL,
                                        "when_limited": {"model": "small"}}})
                self.assert_served_by(self.ask(api), "big", downgraded=False)
                response = self.ask(api)
                self.assert_served_by(response, "small", downgraded=True)
                self.assertEqual(self.forwarded(), ["big", "small"])
                self.assertEqual(self.upstream.requests[1]["body"]["messages" if api.name != "responses"
                                                                  else "input"],
                                 self.upstream.requests[0]["body"]["messages" if api.name != "responses"
                                                                   else "input"])
                # the fallback's window paid, the empty one was not touched, the shared one once each
                self.assertEqual(self.levels(), {"big": 0, "small": 4, "all": 8})
                self.assertIn("X-LLM-Proxy-Model", response.headers["Access-Control-Expose-Headers"])

    def test_a_streamed_answer_carries_the_header(self) -> None:
        for api in APIS:
            with self.subTest(api.name):
                self.upstream.requests.clear()
                self.keys({CLIENT_KEY: {"name": "ada", "buckets": BY_MODEL,
                                        "when_limited": {"model": "small"}}})
                self.assert_served_by(self.ask(api, stream=True), "big", downgraded=False)
                response = self.ask(api, stream=True)
                self.assert_served_by(response, "small", downgraded=True)
                self.assertIn(response.headers["Content-Type"].split(";")[0],
                              ("text/event-stream", "application/x-ndjson"))
                self.assertEqual(self.forwarded(), ["big", "small"])
                self.assertEqual(self.levels(), {"big": 0, "small": 4, "all": 8})

    def test_the_log_and_the_history_name_the_model_served(self) -> None:
        self.ask(APIS[0])
        self.assert_served_by(self.ask(APIS[0]), "small", downgraded=True)
        self.assertIn("model=small asked=big", self.written("model=small asked=big"))
        self.logged(2)
        usage = {entry["name"]: entry for entry in
                 self.request("GET", "/admin/api/usage", key=ADMIN_KEY).json()["keys"]}["ada"]
        by_model = usage["usage"]["today"]["by_model"]
        self.assertEqual((by_model["big"]["served"], by_model["small"]["served"]), (1, 1))

    def test_a_window_names_its_own_fallback_and_others_refuse_as_before(self) -> None:
        self.keys({CLIENT_KEY: {"name": "ada", "buckets": [
            window("big", 1, ["big"], when_limited={"model": "small"}), window("huge", 1, ["huge"]),
            window("small", 5, ["small"])]}})
        for model in ("big", "huge"):
            self.assert_served_by(self.ask(APIS[0], model), model, downgraded=False)
        self.assert_served_by(self.ask(APIS[0], "big"), "small", downgraded=True)
        refused = self.ask(APIS[0], "huge")  # its window names no fallback, nor does the key
        self.assertIn("huge limit reached", refused.json()["choices"][0]["message"]["content"])
        self.assertNotIn("X-LLM-Proxy-Model", refused.headers)
        self.assertEqual(self.forwarded(), ["big", "huge", "small"])

    def test_an_app_users_fallback_is_paid_by_the_user_and_the_app(self) -> None:
        self.keys({APP_KEY: {"name": "class", "models": ["big", "small"], "buckets": [window("app", 10)],
                             "users": {"from": "user_field", "buckets": BY_MODEL[:2],
                                       "overrides": {"ada@home.lan": {"when_limited": {"model": "small"}}}}}})
        for user, served in (("ada@home.lan", "big"), ("ada@home.lan", "small"), ("bob@home.lan", "big")):
            self.assert_served_by(self.ask(APIS[0], user=user, key=APP_KEY), served, served == "small")
        bob = self.ask(APIS[0], user="bob@home.lan", key=APP_KEY)  # no fallback for bob
        self.assertIn("big limit reached", bob.json()["choices"][0]["message"]["content"])
        self.assertEqual(self.forwarded(), ["big", "small", "big"])
        self.assertEqual(self.levels(APP_KEY), {"app": 7})


class MoneyTests(DowngradeTestCase):
    """A money window too small for the big model's least answer pays the cheap one's."""

    PRICES = {"big": {"input": 1000.0, "output": 1000.0}, "small": {"input": 0.10, "output": 1.00}}

    def use_models(self, prices: dict) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "models.json")
        with open(path, "w") as file:
            json.dump({"currency": "USD", "models": {name: {"price": price} for name, price in prices.items()}},
                      file)
        self.keys({CLIENT_KEY: {"name": "ada", "when_limited": {"model": "small"}, "buckets": [
            {"name": "course", "unit": "money", "max_amount": 0.001, "period": "total"}]}},
                  models_file=path)

    def test_a_priced_fallback_is_served_capped_to_what_the_budget_holds(self) -> None:
        for api in APIS:
            with self.subTest(api.name):
                self.upstream.requests.clear()
                self.use_models(self.PRICES)
                response = self.ask(api, allowance=1000)
                self.assert_served_by(response, "small", downgraded=True)
                self.assertEqual(self.forwarded(), ["small"])
                # the hard cap of the fallback's admission: a little less than 1000 output tokens
                self.assertTrue(900 < api.allowance_of(self.upstream.requests[0]["body"]) < 1000,
                                self.upstream.requests[0]["body"])
                quota = self.request("GET", "/v1/quota").json()["buckets"][0]
                self.assertGreater(quota["spent"], 0)
                self.assertLess(quota["spent"], 0.0001)  # small's price of a short echo, not big's

    def test_a_fallback_without_a_price_leaves_the_limit_reply(self) -> None:
        self.use_models({"big": self.PRICES["big"]})
        response = self.ask(APIS[0], allowance=1000)
        self.assertEqual(response.status, 200)
        self.assertIn("the course limit is 0.001 USD", response.json()["choices"][0]["message"]["content"])
        self.assertNotIn("X-LLM-Proxy-Model", response.headers)
        self.assertEqual(self.upstream.requests, [])


class RefusalTests(DowngradeTestCase):
    def test_the_fallback_also_empty_gets_the_limit_reply_for_the_model_asked(self) -> None:
        for api in APIS:
            with self.subTest(api.name):
                self.upstream.requests.clear()
                self.keys({CLIENT_KEY: {"name": "ada", "when_limited": {"model": "small"},
                                        "buckets": [window("big", 1, ["big"]), window("small", 1, ["small"]),
                                                    window("all", 10)]}})
                self.assert_served_by(self.ask(api, "small"), "small", downgraded=False)
                self.assert_served_by(self.ask(api, "big"), "big", downgraded=False)
                refused = self.ask(api, "big")
                self.assertEqual(refused.status, 200, refused.body)
                self.assertIn(b"big limit reached: budget used up", refused.body)
                self.assertEqual(models_named(refused.body), {"big"})
                self.assertNotIn("X-LLM-Proxy-Model", refused.headers)
                self.assertEqual(self.forwarded(), ["small", "big"])
                self.assertEqual(self.levels(), {"big": 0, "small": 0, "all": 8})

    def test_without_when_limited_nothing_changes(self) -> None:
        self.keys({CLIENT_KEY: {"name": "ada", "buckets": BY_MODEL}})
        for api in APIS:
            with self.subTest(api.name):
                self.upstream.requests.clear()
                self.keys({CLIENT_KEY: {"name": "ada", "buckets": BY_MODEL}})
                self.ask(api)
                refused = self.ask(api)
                self.assertIn(b"big limit reached", refused.body)
                self.assertNotIn("X-LLM-Proxy-Model", refused.headers)
                self.assertEqual(self.forwarded(), ["big"])
                self.assertEqual(self.levels(), {"big": 0, "small": 5, "all": 9})

    def test_embeddings_are_never_served_by_another_model(self) -> None:
        self.keys({CLIENT_KEY: {"name": "ada", "buckets": BY_MODEL, "when_limited": {"model": "small"}}},
                  limit_response="error")
        for expected in (200, 429):
            response = self.request("POST", "/v1/embeddings", {"model": "big", "input": CONTENT})
            self.assertEqual(response.status, expected, response.body)
        self.assertNotIn("X-LLM-Proxy-Model", response.headers)
        self.assertEqual(self.forwarded(), ["big"])

    def test_a_downgrade_is_tried_once_never_followed_on(self) -> None:
        """big's fallback is small, whose own fallback (tiny, or big again) is never followed."""
        for then in ("tiny", "big"):
            with self.subTest(then):
                self.upstream.requests.clear()
                self.keys({CLIENT_KEY: {"name": "ada", "buckets": [
                    window("big", 1, ["big"], when_limited={"model": "small"}),
                    window("small", 1, ["small"], when_limited={"model": then}), window("tiny", 5, ["tiny"])]}})
                self.ask(APIS[0], "big")
                self.ask(APIS[0], "small")
                refused = self.ask(APIS[0], "big")
                self.assertIn(b"big limit reached", refused.body)
                self.assertNotIn("X-LLM-Proxy-Model", refused.headers)
                self.assertEqual(self.forwarded(), ["big", "small"])
                self.assertEqual(self.levels(), {"big": 0, "small": 0, "tiny": 5})


class KeysFileTests(DowngradeTestCase):
    def parse(self, entry: dict) -> llm_proxy.Policy:
        policies = llm_proxy.parse_keys_file(json.dumps({OTHER_KEY: entry}), self.config)
        return next(iter(policies.values()))[1]

    def test_a_fallback_is_read_on_a_key_a_user_and_a_window(self) -> None:
        policy = self.parse({"name": "app", "models": ["big", "small"], "when_limited": {"model": "small"},
                             "buckets": [window("big", 1, ["big"], when_limited={"model": "small"})],
                             "users": {"from": "user_field", "when_limited": {"model": "small"},
                                       "overrides": {"ada": {"models": ["small"]}}}})
        self.assertEqual(policy.when_limited, "small")
        self.assertEqual(policy.buckets[0].when_limited, "small")
        self.assertEqual(policy.users.default.when_limited, "small")
        self.assertEqual(self.parse({"name": "bob"}).when_limited, None)

    def test_a_bad_fallback_stops_the_file_with_a_clear_error(self) -> None:
        rows = {
            "a plain string": ({"when_limited": "small"}, "when_limited must be {\"model\""),
            "an empty name": ({"when_limited": {"model": " "}}, "when_limited must be"),
            "another field": ({"when_limited": {"model": "small", "price": 1}}, "when_limited must be"),
            "a number on a window": ({"buckets": [window("w", 1, when_limited={"model": 3})]},
                                     "bucket 1: when_limited must be"),
            "a line break": ({"when_limited": {"model": "small\r\nX-Evil: 1"}}, "when_limited must be"),
            "off the key's list": ({"models": ["big"], "when_limited": {"model": "small"}},
                                   "when_limited model 'small' is not on the key's models list (big)"),
            "a window's, off the list": ({"models": ["big"], "buckets": [
                window("w", 1, when_limited={"model": "small"})]}, "when_limited model 'small' is not"),
            "a user's, off the app's list": ({"models": ["big"], "users": {
                "from": "user_field", "overrides": {"ada": {"models": ["small"],
                                                            "when_limited": {"model": "small"}}}}},
                "users: when_limited model 'small' is not on the key's models list"),
        }
        for name, (entry, message) in rows.items():
            with self.subTest(name):
                with self.assertRaises(ConfigError) as caught:
                    self.parse(dict({"name": "bob"}, **entry))
                self.assertIn(message, str(caught.exception))
                self.assertIn("entry 1 (bob)", str(caught.exception))
