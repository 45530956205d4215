"""Per-person limits behind a shared chat app (issue 10), over real sockets.

JWTs are minted the way Open WebUI mints them (HS256 with the standard library's
hmac, claims sub, email, name, role, iss, iat, exp = iat + 300).
Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
import unittest
from unittest import mock

import llm_proxy
from test_llm_proxy import CLIENT_KEY, WAIT, ProxyTestCase, Response, write_keys_file

APP_KEY = "sk-webui-3n5b8v2c7x1z"
SECRET = "jwt-secret-of-the-webui-0123456789"
JWT_HEADER = "X-OpenWebUI-User-Jwt"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(claims: dict, secret: str = SECRET, alg: str = "HS256") -> str:
    """A JWT as Open WebUI signs it (or, with alg 'none', unsigned)."""
    head = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    if alg == "none":
        return f"{head}.{body}."
    signature = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


class UserTestCase(ProxyTestCase):
    users: dict = {"from": "jwt", "secret_env": "OPENWEBUI_JWT_SECRET", "required": True,
                   "issuer": "open-webui", "max_tokens": 2, "refill_tokens": 2,
                   "refill_interval_seconds": 86400,
                   "overrides": {"kid@home.lan": {"max_tokens": 1}}}
    app_limit = 5

    def setUp(self) -> None:
        patcher = mock.patch.dict(os.environ, {"OPENWEBUI_JWT_SECRET": SECRET})
        patcher.start()
        self.addCleanup(patcher.stop)
        self.keys_path = self.write_keys(self.users)
        self.directory = os.path.dirname(self.keys_path)
        self.config_overrides = {"keys_file": self.keys_path}
        super().setUp()

    def write_keys(self, users: dict) -> str:
        """The app key with ``users``, and a plain key, as the keys file: its path."""
        return write_keys_file(self, {APP_KEY: {"name": "webui", "max_tokens": self.app_limit,
                                                "refill_tokens": self.app_limit,
                                                "refill_interval_seconds": 86400, "users": users},
                                      CLIENT_KEY: {"name": "plain", "max_tokens": 3}})

    def token(self, email: str | None, **claims: object) -> str:
        now = int(self.wall())
        base = {"sub": f"id-{email}", "name": "Someone", "role": "user", "iss": "open-webui",
                "iat": now, "exp": now + 300}
        if email is not None:
            base["email"] = email
        base.update(claims)
        return mint(base)

    def as_user(self, email: str | None, key: str = APP_KEY, token: str | None = None,
                path: str = "/v1/chat/completions", body: dict | None = None, **claims: object) -> Response:
        headers = {"X-OpenWebUI-Auth-Type": "jwt"}
        if token is not None or email is not None:
            headers[JWT_HEADER] = token if token is not None else self.token(email, **claims)
        body = body or {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        return self.request("POST", path, body, key=key, headers=headers)

    def text(self, response: Response) -> str:
        return response.json()["choices"][0]["message"]["content"]


class JwtUserTests(UserTestCase):
    def test_two_users_are_limited_independently(self) -> None:
        for _ in range(2):
            self.assertEqual(self.text(self.as_user("alice@home.lan")), "hi from upstream")
        limited = self.as_user("alice@home.lan")
        self.assertRegex(self.text(limited), r"^limit reached, wait (\d+ min|\d+ h( \d+ min)?|until .+)$")
        self.assertEqual(self.text(self.as_user("bob@home.lan")), "hi from upstream")
        self.assertEqual(len(self.upstream.requests), 3)

    def test_override_gives_one_user_less(self) -> None:
        self.assertEqual(self.text(self.as_user("kid@home.lan")), "hi from upstream")
        self.assertIn("limit reached", self.text(self.as_user("kid@home.lan")))

    def test_the_app_key_caps_all_its_users(self) -> None:
        for user in ("a@x", "a@x", "b@x", "b@x", "c@x"):  # 5: the app's whole window
            self.assertEqual(self.text(self.as_user(user)), "hi from upstream")
        self.assertIn("limit reached", self.text(self.as_user("d@x")))  # d has 2 of their own
        quota = self.request("GET", "/v1/quota", key=APP_KEY,
                             headers={JWT_HEADER: self.token("d@x")}).json()
        self.assertEqual(quota["user"], "d@x")
        self.assertEqual([b["tokens"] for b in quota["buckets"]], [2])
        self.assertEqual([b["tokens"] for b in quota["app"]["buckets"]], [0])

    def test_refused_identities_get_401_in_each_apis_shape_and_cost_nothing(self) -> None:
        now = int(self.wall())
        bad = {"forged": mint({"email": "a@x", "iss": "open-webui", "exp": now + 300}, secret="guess"),
               "expired": self.token("a@x", exp=now - 31),
               "alg none": mint({"email": "a@x", "iss": "open-webui", "exp": now + 300}, alg="none"),
               "alg HS512": mint({"email": "a@x", "iss": "open-webui", "exp": now + 300}, alg="HS512"),
               "wrong issuer": self.token("a@x", iss="someone-else"),
               "garbage": "not.a.jwt", "missing": None}
        for name, token in bad.items():
            with self.subTest(name):
                response = self.as_user(None, token=token)
                self.assert_openai_error(response, 401, "authentication_error", "invalid_user")
                anthropic = self.as_user(None, token=token, path="/v1/messages", body={
                    "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
                self.assertEqual(anthropic.status, 401)
                self.assertEqual(anthropic.json()["error"]["type"], "authentication_error")
                ollama = self.as_user(None, token=token, path="/api/chat", body={
                    "model": "m", "stream": False, "messages": [{"role": "user", "content": "hi"}]})
                self.assertEqual(ollama.status, 401)
                self.assertIsInstance(ollama.json()["error"], str)
        self.assertEqual(self.upstream.requests, [])
        # a token expired by less than the 30 s leeway is still accepted
        self.assertEqual(self.as_user("a@x", exp=now - 20).status, 200)

    def test_a_key_without_users_is_not_split(self) -> None:
        for email in ("a@x", "b@x", "c@x"):
            self.assertEqual(self.text(self.as_user(email, key=CLIENT_KEY)), "hi from upstream")
        self.assertIn("limit reached", self.text(self.as_user("d@x", key=CLIENT_KEY)))

    def test_logs_name_the_user_never_the_token_or_secret(self) -> None:
        path = os.path.join(self.directory, "access.log")
        self.start_proxy(keys_file=self.keys_path, access_log=path)
        token = self.token("alice@home.lan")
        self.as_user(None, token=token)
        self.as_user(None, token=mint({"email": "x@y", "exp": int(self.wall()) + 300}, secret="guess"))
        written = self.written("webui/alice@home.lan")
        self.assertIn("webui/alice@home.lan", written)
        self.stop(self.proxy)
        self.proxy = None
        with open(path) as file:
            records = [json.loads(line) for line in file]
        # (each request is logged after its answer: the refused one's record may come first)
        self.assertIn(("webui", "alice@home.lan"), [(record["key"], record["user"]) for record in records])
        everything = written + json.dumps(records)
        for secret in (token, token.split(".")[2], SECRET, APP_KEY):
            self.assertNotIn(secret, everything)

    def test_levels_survive_a_restart(self) -> None:
        state = os.path.join(self.directory, "state.json")
        self.start_proxy(keys_file=self.keys_path, state_file=state)
        self.as_user("alice@home.lan")
        self.as_user("alice@home.lan")
        self.start_proxy(keys_file=self.keys_path, state_file=state)  # saves at stop, loads at start
        self.assertIn("limit reached", self.text(self.as_user("alice@home.lan")))
        self.assertEqual(self.text(self.as_user("bob@home.lan")), "hi from upstream")

    def test_full_user_buckets_are_forgotten(self) -> None:
        for user in ("a@x", "b@x", "c@x"):
            self.as_user(user)
        self.assertEqual(len(self.proxy.buckets), 4)  # three users and the app
        self.clock.advance(86400)
        self.proxy.tidy()
        self.assertEqual(len(self.proxy.buckets), 0)

    def test_fair_queue_takes_turns_by_user(self) -> None:
        self.write_keys(dict(self.users, max_tokens=5))
        self.start_proxy(keys_file=self.keys_path, upstream_max_concurrent=1)
        results: list = []

        def send(email: str, content: str, fake: str = "") -> None:
            headers = {JWT_HEADER: self.token(email)}
            if fake:
                headers["X-Fake"] = fake
            try:
                results.append(self.chat(content, key=APP_KEY, headers=headers).status)
            except Exception as error:  # recorded, asserted below
                results.append(repr(error))

        deadline = time.monotonic() + WAIT
        threads = []
        # a@x holds the only slot; then a@x queues twice and b@x once
        for index, (email, content, fake) in enumerate((("a@x", "a1", "hold"), ("a@x", "a2", ""),
                                                        ("a@x", "a3", ""), ("b@x", "b1", ""))):
            threads.append(threading.Thread(target=send, args=(email, content, fake)))
            threads[-1].start()
            while (len(self.upstream.requests) + self.proxy.upstreams.waiting < index + 1
                   and time.monotonic() < deadline):
                time.sleep(0.005)
        self.upstream.release.set()
        for thread in threads:
            thread.join(WAIT)
        self.assertEqual(results.count(200), 4, results)
        order = [json.loads(r["body"])["messages"][0]["content"] for r in self.upstream.requests]
        self.assertEqual(order, ["a1", "a2", "b1", "a3"])  # b's one chat is not behind a's two
        for request in self.upstream.requests:
            self.assertNotIn(JWT_HEADER.lower(), {name.lower() for name in request["headers"]})


class HeaderAndFieldUserTests(UserTestCase):
    users = {"from": "header", "header": "X-OpenWebUI-User-Email", "required": False,
             "max_tokens": 1, "refill_tokens": 1, "refill_interval_seconds": 86400}

    def test_header_names_the_user_and_an_anonymous_call_pays_the_app_only(self) -> None:
        headers = {"X-OpenWebUI-User-Email": "alice@home.lan"}
        self.assertEqual(self.text(self.chat(key=APP_KEY, headers=headers)), "hi from upstream")
        self.assertIn("limit reached", self.text(self.chat(key=APP_KEY, headers=headers)))
        self.assertEqual(self.text(self.chat(key=APP_KEY)), "hi from upstream")  # not required
        quota = self.request("GET", "/v1/quota", key=APP_KEY).json()
        self.assertEqual([b["tokens"] for b in quota["buckets"]], [3])  # the app paid for both


class UserFieldTests(UserTestCase):
    users = {"from": "user_field", "required": True, "max_tokens": 1, "refill_tokens": 1,
             "refill_interval_seconds": 86400}

    def test_user_field_in_chat_and_metadata_in_messages(self) -> None:
        self.assertEqual(self.text(self.chat(key=APP_KEY, user="alice")), "hi from upstream")
        self.assertIn("limit reached", self.text(self.chat(key=APP_KEY, user="alice")))
        messages = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                    "metadata": {"user_id": "alice"}}
        limited = self.request("POST", "/v1/messages", messages, key=APP_KEY).json()
        self.assertIn("limit reached", limited["content"][0]["text"])
        messages["metadata"]["user_id"] = "bob"
        self.assertEqual(self.request("POST", "/v1/messages", messages, key=APP_KEY).status, 200)
        self.assert_openai_error(self.chat(key=APP_KEY), 401, "authentication_error")
        quota = self.request("GET", "/v1/quota?user=alice", key=APP_KEY).json()
        self.assertEqual((quota["user"], quota["buckets"][0]["tokens"]), ("alice", 0))


class ConfigTests(unittest.TestCase):
    def test_the_secret_must_come_from_the_environment(self) -> None:
        config = llm_proxy.Config(upstream_url="http://127.0.0.1:9/v1")
        entry = {"k": {"users": {"from": "jwt", "secret_env": "NOT_SET_ANYWHERE_42"}}}
        with self.assertRaisesRegex(llm_proxy.ConfigError, "NOT_SET_ANYWHERE_42 is not set"):
            llm_proxy.parse_keys_file(json.dumps(entry), config)
        entry = {"k": {"users": {"from": "jwt", "secret": SECRET}}}
        with self.assertRaises(llm_proxy.ConfigError) as raised:
            llm_proxy.parse_keys_file(json.dumps(entry), config)
        self.assertNotIn(SECRET, str(raised.exception))


class JwtVerificationTests(unittest.TestCase):
    """verify_jwt refuses an expiry that is no finite number and any signature spelt another way."""

    def test_jwt_expiry_must_be_a_finite_number_and_signatures_canonical(self) -> None:
        import base64
        import hashlib
        import hmac as hmac_module

        def mint(claims: dict) -> str:
            head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
            body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
            mac = hmac_module.new(b"k", f"{head}.{body}".encode(), hashlib.sha256).digest()
            return f"{head}.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
        for exp in ("NaN", "Infinity", "1e400"):
            token = mint({"email": "a@x"}).split(".")
            token[1] = base64.urlsafe_b64encode(('{"email": "a@x", "exp": %s}' % exp).encode()).rstrip(b"=").decode()
            mac = hmac_module.new(b"k", f"{token[0]}.{token[1]}".encode(), hashlib.sha256).digest()
            token[2] = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
            with self.assertRaises(ValueError, msg=exp):
                llm_proxy.verify_jwt(".".join(token), b"k", 1000.0)
        good = mint({"email": "a@x", "exp": 2000})
        self.assertEqual(llm_proxy.verify_jwt(good, b"k", 1000.0)["email"], "a@x")
        last = good[-1]
        variants = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                    if c != last]
        for variant in variants:
            forged = good[:-1] + variant
            with self.assertRaises(ValueError):
                llm_proxy.verify_jwt(forged, b"k", 1000.0)
