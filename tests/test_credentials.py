"""Credentials: no header a client can carry a credential in (or a person's identity) leaves
the proxy, and the upstream key never comes back, in every API and in open mode too.

The upstream's key goes in the one header its API reads (``api_key_header``,
UPSTREAM_API_KEY_HEADER: Bearer, x-api-key or api-key) and is the only credential that arrives.
No key (the upstream's or a client's, right or wrong) reaches a log line, an answer's
body or its headers, and a presented key is compared in constant time.
One place for what tests in four files checked.  Run by ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import unittest
from typing import Callable
from unittest import mock

import llm_proxy
from test_llm_proxy import CLIENT_KEY, OTHER_KEY, UPSTREAM_KEY, WAIT, AdversarialTestCase, ProxyTestCase

CREDENTIALS = {"x-api-key": CLIENT_KEY, "api-key": CLIENT_KEY,
               "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0", "Cookie": "session=s3cr3t"}


class CredentialTests(ProxyTestCase):
    """No header that can carry a client credential ever leaves the proxy."""

    config_overrides = {"client_keys": (CLIENT_KEY, OTHER_KEY)}

    def assert_no_credential_forwarded(self) -> None:
        for forwarded in self.upstream.requests:
            names = {name.lower() for name in forwarded["headers"]}
            for header in ("x-api-key", "api-key", "proxy-authorization", "cookie"):
                self.assertNotIn(header, names, forwarded["path"])
            self.assertEqual(forwarded["headers"].get("Authorization"), f"Bearer {UPSTREAM_KEY}")
            for secret in (CLIENT_KEY, "s3cr3t", "cHJveHk6c2VjcmV0"):
                self.assertNotIn(secret, forwarded["raw_headers"])

    def test_key_in_any_key_header_is_accepted_and_never_forwarded(self) -> None:
        routes = [("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                  ("GET", "/v1/models", None), ("POST", "/v1/embeddings", {"input": "x"})]
        for header in ("x-api-key", "api-key"):
            for method, path, body in routes:
                with self.subTest(header=header, path=path):
                    extra = {header: CLIENT_KEY, "Proxy-Authorization": CREDENTIALS["Proxy-Authorization"],
                             "Cookie": CREDENTIALS["Cookie"]}
                    response = self.request(method, path, body, key=None, headers=extra)
                    self.assertLess(response.status, 400, response.body)
        self.assertEqual(len(self.upstream.requests), 6)
        self.assert_no_credential_forwarded()

    def test_a_wrong_key_in_x_api_key_is_refused(self) -> None:
        response = self.request("GET", "/v1/models", key=None, headers={"x-api-key": "sk-wrong"})
        self.assert_openai_error(response, 401)
        self.assertEqual(self.upstream.requests, [])

    def test_open_mode_strips_credentials_too(self) -> None:
        self.start_proxy(client_keys=())
        self.chat(key=None, headers=CREDENTIALS)
        self.request("GET", "/v1/models", key=None, headers=CREDENTIALS)
        self.assertEqual(len(self.upstream.requests), 2)
        self.assert_no_credential_forwarded()



    def test_the_open_webui_token_never_reaches_the_upstream(self) -> None:
        for key in (CLIENT_KEY, None):
            self.start_proxy(client_keys=(CLIENT_KEY,) if key else (), max_tokens=10)
            self.chat(key=key, headers={"X-OpenWebUI-User-Jwt": "eyJhbGciOi.secret.token"})
            self.assertNotIn("x-openwebui-user-jwt", {n.lower() for n in self.upstream.requests[-1]["headers"]})

    def test_open_webui_personal_headers_stay_here(self) -> None:
        self.chat(headers={"X-OpenWebUI-User-Email": "kid@home.lan", "X-OpenWebUI-User-Name": "Kid",
                           "X-OpenWebUI-Chat-Id": "c1", "X-Other": "kept"})
        sent = {name.lower() for name in self.upstream.requests[-1]["headers"]}
        self.assertFalse({name for name in sent if name.startswith("x-openwebui-")})
        self.assertIn("x-other", sent)


class ForwardedHeadersTests(ProxyTestCase):
    """The upstream key goes upstream and nowhere else; hop-by-hop headers stay on their hop."""

    def test_client_key_never_reaches_upstream_and_upstream_key_never_returns(self) -> None:
        response = self.chat(headers={"Connection": "keep-alive, X-Hop", "X-Hop": "secret",
                                      "Keep-Alive": "timeout=5", "X-Custom": "kept"})
        forwarded = self.upstream.requests[-1]
        self.assertEqual(forwarded["headers"]["Authorization"], f"Bearer {UPSTREAM_KEY}")
        self.assertNotIn(CLIENT_KEY, forwarded["raw_headers"] + forwarded["body"].decode())
        self.assertNotIn("X-Hop", forwarded["headers"])
        self.assertNotIn("Keep-Alive", forwarded["headers"])
        self.assertEqual(forwarded["headers"]["X-Custom"], "kept")
        self.assertNotIn(UPSTREAM_KEY, str(response.headers) + response.body.decode())
        self.assertNotIn("X-Upstream-Hop", response.headers)
        written = self.written("POST /v1/chat/completions 200 served")
        self.assertIn("POST /v1/chat/completions 200 served", written)
        self.assertNotIn(UPSTREAM_KEY, written)
        self.assertNotIn(CLIENT_KEY, written)

    def test_without_upstream_key_no_authorization_goes_upstream(self) -> None:
        self.start_proxy(upstream_key=None)
        self.chat()
        self.assertNotIn("Authorization", self.upstream.requests[-1]["headers"])


# One request to each API the proxy meters, as its clients send it.
EVERY_API = [
    ("chat", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("completions", "/v1/completions", {"model": "m", "prompt": "hi"}),
    ("responses", "/v1/responses", {"model": "m", "input": "hi"}),
    ("messages", "/v1/messages", {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
    ("ollama chat", "/api/chat", {"model": "m", "stream": False, "messages": [{"role": "user", "content": "hi"}]}),
    ("ollama generate", "/api/generate", {"model": "m", "stream": False, "prompt": "hi"}),
    ("embeddings", "/v1/embeddings", {"model": "m", "input": "hi"}),
]


class EveryApiTests(ProxyTestCase):
    config_overrides = {"client_keys": (CLIENT_KEY, OTHER_KEY), "max_tokens": 100}

    def test_credentials_never_forwarded_and_x_api_key_accepted(self) -> None:
        for name, path, body in EVERY_API:
            with self.subTest(name):
                response = self.request("POST", path, body, key=None, headers={
                    "x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "x-2025"})
                self.assertEqual(response.status, 200)
                forwarded = self.upstream.requests[-1]
                self.assertNotIn(CLIENT_KEY, forwarded["raw_headers"] + forwarded["body"].decode())
                self.assertEqual(forwarded["headers"]["anthropic-version"], "2023-06-01")
                self.assertEqual(forwarded["headers"]["anthropic-beta"], "x-2025")


# The upstream's key header styles: (api_key_header / UPSTREAM_API_KEY_HEADER, the header that
# must arrive, its value).
KEY_HEADER_STYLES = [
    ("authorization", "authorization", f"Bearer {UPSTREAM_KEY}"),
    ("x-api-key", "x-api-key", UPSTREAM_KEY),
    ("api-key", "api-key", UPSTREAM_KEY),
]
# Each way a client may send its own key to the proxy, and the other credential headers it may carry
CLIENT_CREDENTIALS = [{"Authorization": f"Bearer {CLIENT_KEY}"}, {"x-api-key": CLIENT_KEY},
                      {"api-key": CLIENT_KEY, "Cookie": "session=s3cr3t"}]
# One request to each API a cloud upstream serves, and a model list
STYLE_CALLS = [("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
               ("POST", "/v1/messages", {"model": "m", "max_tokens": 8,
                                         "messages": [{"role": "user", "content": "x"}]}),
               ("GET", "/v1/models", None)]
KEY_VARIABLE = "LLM_PROXY_TEST_CLOUD_KEY"


class UpstreamKeyHeaderTests(ProxyTestCase):
    """The upstream's key goes in the header its API reads (Bearer, Anthropic's x-api-key,
    Azure's api-key), and it is the only credential that arrives, whatever the client sent."""

    config_overrides = {"client_keys": (CLIENT_KEY,), "max_tokens": 1000}

    def credential_lines(self, forwarded: dict) -> list[tuple[str, str]]:
        """Every credential header as it arrived, repeats included (the dict keeps one)."""
        lines = [line.partition(":") for line in forwarded["raw_headers"].splitlines()]
        return [(name.strip().lower(), value.strip()) for name, _, value in lines
                if name.strip().lower() in llm_proxy.CREDENTIAL_HEADERS]

    def assert_sent_in_style(self, header: str, value: str) -> None:
        self.assertTrue(self.upstream.requests)
        for forwarded in self.upstream.requests:
            self.assertEqual(self.credential_lines(forwarded), [(header, value)], forwarded["path"])
            self.assertNotIn(CLIENT_KEY, forwarded["raw_headers"] + forwarded["body"].decode())

    def call_every_way(self) -> None:
        for credentials in CLIENT_CREDENTIALS:
            for method, path, body in STYLE_CALLS:
                response = self.request(method, path, body, key=None,
                                        headers=dict(credentials, **{"anthropic-version": "2023-06-01"}))
                self.assertEqual(response.status, 200, (path, credentials, response.body))
        self.assertEqual(len(self.upstream.requests), len(CLIENT_CREDENTIALS) * len(STYLE_CALLS))
        for forwarded in self.upstream.requests:
            self.assertEqual(forwarded["headers"]["anthropic-version"], "2023-06-01")

    def test_the_default_server_sends_its_key_in_the_style_set(self) -> None:
        for style, header, value in KEY_HEADER_STYLES:
            with self.subTest(style):
                self.upstream.requests.clear()
                self.start_proxy(client_keys=(CLIENT_KEY,), max_tokens=1000, upstream_key_header=style)
                self.call_every_way()
                self.assert_sent_in_style(header, value)

    def test_the_default_is_bearer(self) -> None:
        self.assertEqual(llm_proxy.Config.from_env({}).upstream_key_header, "authorization")
        self.call_every_way()
        self.assert_sent_in_style("authorization", f"Bearer {UPSTREAM_KEY}")

    def cloud_models_file(self) -> Callable[[str], str]:
        """A MODELS_FILE whose one server, "cloud", takes UPSTREAM_KEY from the environment; the
        function returned writes it with the key header style given, and returns its path."""
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "models.json")
        patcher = mock.patch.dict(os.environ, {KEY_VARIABLE: UPSTREAM_KEY})
        patcher.start()
        self.addCleanup(patcher.stop)

        def write(style: str) -> str:
            with open(path, "w") as file:
                json.dump({"upstreams": {"cloud": {"url": self.upstream.url, "api_key_env": KEY_VARIABLE,
                                                   "api_key_header": style}},
                           "models": {"*": {"upstream": "cloud"}}}, file)
            return path

        return write

    def test_a_models_file_server_sends_its_key_in_its_style_also_when_probed(self) -> None:
        write = self.cloud_models_file()
        for style, header, value in KEY_HEADER_STYLES:
            with self.subTest(style):
                self.upstream.requests.clear()
                self.start_proxy(upstream_url=None, upstream_key=None, models_file=write(style),
                                 client_keys=(CLIENT_KEY,), max_tokens=1000)
                self.call_every_way()
                self.assertTrue(self.proxy.upstreams.table.upstreams["cloud"].answers(WAIT))  # a probe
                self.assert_sent_in_style(header, value)

    def test_a_reload_that_changes_the_style_takes_effect(self) -> None:
        write = self.cloud_models_file()
        self.start_proxy(upstream_url=None, upstream_key=None, models_file=write("authorization"),
                         client_keys=(CLIENT_KEY,))
        self.chat()
        write("x-api-key")
        self.assertTrue(self.proxy.upstreams.reload_if_changed(force=True))
        self.chat()
        self.assertEqual([self.credential_lines(r) for r in self.upstream.requests],
                         [[("authorization", f"Bearer {UPSTREAM_KEY}")], [("x-api-key", UPSTREAM_KEY)]])

    def test_every_style_is_a_header_stripped_from_clients(self) -> None:
        for style, (header, _) in llm_proxy.UPSTREAM_KEY_HEADERS.items():
            self.assertIn(header.lower(), llm_proxy.CREDENTIAL_HEADERS, style)
        self.assertEqual(sorted(llm_proxy.UPSTREAM_KEY_HEADERS), sorted(s for s, _, _ in KEY_HEADER_STYLES))


class UpstreamKeyHeaderRefusalTests(unittest.TestCase):
    """A style that is not one of the three stops the load, naming the allowed ones, never the value."""

    ALLOWED = "must be one of authorization, x-api-key, api-key"
    PASTED_KEY = "sk-ant-api03-pasted-by-mistake"

    def test_the_setting(self) -> None:
        rows = [("X-API-Key", "x-api-key"), (" api-key ", "api-key"), ("Authorization", "authorization")]
        for text, style in rows:
            with self.subTest(text):
                self.assertEqual(llm_proxy.Config.from_env({"UPSTREAM_API_KEY_HEADER": text}).upstream_key_header,
                                 style)
        for text, said in [("x-api-kye", f"UPSTREAM_API_KEY_HEADER {self.ALLOWED} (did you mean 'x-api-key'?)"),
                           ("bearer", f"UPSTREAM_API_KEY_HEADER {self.ALLOWED};"),
                           (self.PASTED_KEY, f"UPSTREAM_API_KEY_HEADER {self.ALLOWED}")]:
            with self.subTest(text):
                with self.assertRaises(llm_proxy.ConfigError) as raised:
                    llm_proxy.Config.from_env({"UPSTREAM_API_KEY_HEADER": text})
                self.assertIn(said, str(raised.exception))
                self.assertNotIn(text, str(raised.exception))

    def test_the_models_file_field(self) -> None:
        where = "upstream 'cloud': 'api_key_header'"
        rows = {
            "misspelt": ("x-api-kye", f"{where} {self.ALLOWED} (did you mean 'x-api-key'?)"),
            "another scheme": ("basic", f"{where} {self.ALLOWED};"),
            "not a string": (1, f"{where} {self.ALLOWED}"),
            "a key pasted in": (self.PASTED_KEY, f"{where} {self.ALLOWED}"),
            "no key to send": (None, "upstream 'cloud': 'api_key_header' needs 'api_key_env'"),
        }
        for name, (value, said) in rows.items():
            with self.subTest(name):
                entry = {"url": "https://api.anthropic.com/v1", "api_key_header": value or "x-api-key"}
                if value is not None:
                    entry["api_key_env"] = "K"
                with self.assertRaises(llm_proxy.ConfigError) as raised:
                    llm_proxy.parse_upstreams({"upstreams": {"cloud": entry}}, {"K": "sk-cloud"},
                                              llm_proxy.Config())
                self.assertIn(said, str(raised.exception))
                self.assertNotIn(self.PASTED_KEY, str(raised.exception))
                self.assertNotIn("sk-cloud", str(raised.exception))

    def test_a_bad_style_stops_the_proxy_at_startup(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        models = os.path.join(directory.name, "models.json")
        with open(models, "w") as file:
            json.dump({"upstreams": {"cloud": {"url": "https://api.anthropic.com/v1", "api_key_env": "K",
                                               "api_key_header": "x-api-kye"}}}, file)
        with self.assertRaises(llm_proxy.ConfigError) as raised:
            llm_proxy.ProxyServer(llm_proxy.Config(host="127.0.0.1", port=0, models_file=models),
                                  environ={"K": "sk-cloud"})
        self.assertIn("did you mean 'x-api-key'?", str(raised.exception))


class SecretTests(AdversarialTestCase):
    """No key reaches a log, a body or a header; a presented key is checked in constant time."""

    WRONG_KEY = "sk-wrong-but-secret-4242"

    def test_keys_appear_in_no_log_body_or_header(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        access = os.path.join(directory.name, "access.log")
        self.start_proxy(client_keys=(CLIENT_KEY, OTHER_KEY), access_log=access, max_tokens=2)
        responses = [
            self.chat(), self.chat(stream=True), self.chat(),  # served, served, limited
            self.chat(key=self.WRONG_KEY), self.chat(key=None),
            self.request("GET", "/v1/models", key=self.WRONG_KEY),
            self.request("GET", "/v1/quota"),
            self.chat(key=OTHER_KEY, headers={"X-Fake": "status-500"}),
            self.chat(key=OTHER_KEY, headers={"X-Fake": "close"}),
            self.chat(key=OTHER_KEY, headers={"X-Fake": "non-json"}),
            self.request("POST", "/v1/chat/completions", b"{bad", key=OTHER_KEY),
        ]
        self.exchange(b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer " + CLIENT_KEY.encode() +
                      b"\r\nbroken header\r\n\r\n")
        self.stop(self.proxy)
        self.proxy = None
        with open(access) as file:
            written = self.written() + file.read()
        seen = written + "".join(str(r.headers) + r.body.decode("utf-8", "replace") for r in responses)
        for secret in (UPSTREAM_KEY, CLIENT_KEY, OTHER_KEY, self.WRONG_KEY):
            self.assertNotIn(secret, seen)
        self.assertIn(llm_proxy.key_digest(CLIENT_KEY)[:12], written, "a fingerprint stands in for the key")

    def test_keys_are_compared_in_constant_time(self) -> None:
        """The key a client presents is checked with hmac.compare_digest, and that check decides.

        The table is indexed by a prefix of SHA-256, so only a key whose prefix is
        found is compared, as a whole SHA-256, with the stored one.  To reach the
        comparison with a wrong key, the table is given the right key's entry under
        the wrong key's prefix (a stand-in for a collision); the comparison alone
        must then refuse it.
        """
        self.start_proxy(client_keys=(CLIENT_KEY,))
        wrong = CLIENT_KEY[:-1] + "X"
        right_hash = hashlib.sha256(CLIENT_KEY.encode()).digest()
        wrong_hash = hashlib.sha256(wrong.encode()).digest()
        real_compare = llm_proxy.hmac.compare_digest
        with mock.patch("hmac.compare_digest", side_effect=real_compare) as compare:
            self.assertEqual(self.chat().status, 200)
            self.assertIn(mock.call(right_hash, right_hash), compare.call_args_list)
            compare.reset_mock()
            keyring = self.proxy.keyring
            entry = keyring._policies[right_hash.hex()[:32]]
            keyring._policies = dict(keyring._policies, **{wrong_hash.hex()[:32]: entry})
            self.assert_openai_error(self.chat(key=wrong), 401, code="invalid_api_key")
            self.assertIn(sorted([right_hash, wrong_hash]),
                          [sorted(call.args) for call in compare.call_args_list],
                          "a digest hit is confirmed with compare_digest (stored, presented), never ==")
        self.assertEqual(len(self.upstream.requests), 1, "the wrong key was never forwarded")
