"""Paid upstreams, diagnosable (issue 20, item 10): a private CA, and why a connection failed.

An https upstream is trusted by the system's CAs and UPSTREAM_CA_FILE's; a certificate
neither vouches for, a refused port or a failed handshake is the same generic 502 to the
caller, and says why (``failure_reason``) in the request's log line and the admin API's
``last_error``.  The fake upstream speaks TLS with the certificates in tests/certs (made
once with openssl, see its README; read here, never made).  Also: the MAX_TOKENS warning
only where some key pays under MAX_TOKENS.  Run by ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import ssl
import tempfile
import unittest
from dataclasses import replace

import llm_proxy
from llm_proxy import Config, ConfigError, KeyRing, ProxyServer
from test_llm_proxy import (ADMIN_KEY, CLIENT_KEY, HERE, UPSTREAM_KEY, FakeUpstream, ProxyTestCase, free_port,
                            serve, startup_output)

CERTS = os.path.join(HERE, "tests", "certs")
CA = os.path.join(CERTS, "ca.pem")
GENERIC_502 = "The model server could not be reached or sent an invalid response."


class TlsUpstream(FakeUpstream):
    """The fake upstream behind TLS, with one of tests/certs' certificates ("server" or "other")."""

    def __init__(self, certificate: str) -> None:
        super().__init__()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(os.path.join(CERTS, certificate + ".pem"),
                                os.path.join(CERTS, certificate + ".key"))
        self.socket = context.wrap_socket(self.socket, server_side=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}/v1"


class UpstreamTlsTests(ProxyTestCase):
    # (a server that cannot be reached is waited for up to QUEUE_TIMEOUT_SECONDS, then a 503)
    config_overrides = {"client_keys": (CLIENT_KEY,), "admin_key": ADMIN_KEY, "max_tokens": 100,
                        "queue_timeout": 0.05}

    def behind(self, upstream: FakeUpstream | None, url: str | None = None, **overrides: object) -> None:
        """This upstream (or none, at ``url``) in place of the plain one, and a proxy in front."""
        self.stop(self.upstream)
        if upstream is not None:
            self.upstream = upstream
            serve(upstream)
        else:
            self.upstream = FakeUpstream()  # (stopped at the end like the one it replaces; never asked)
            serve(self.upstream)
        self.start_proxy(upstream_url=url or self.upstream.url, **{**self.config_overrides, **overrides})

    def last_error(self) -> str | None:
        usage = self.request("GET", "/admin/api/usage", key=ADMIN_KEY).json()
        return usage["upstream"]["last_error"]

    def assert_failed_saying(self, reason: str, status: int = 502, answered: int | None = None) -> None:
        """The caller gets the generic answer (``answered``: another status than the failure's,
        as the 503 for a server that could not be reached); the log line and the admin API say why."""
        response = self.chat(headers={"X-Fake": "stall"})  # (a stall: only where a server answers)
        error = self.assert_openai_error(response, answered or status, "upstream_error")
        if (answered or status) == 502:
            self.assertEqual(error["message"], GENERIC_502)
        self.assertNotIn(reason.split(":")[0].encode(), response.body)
        self.assertEqual(self.level(), 100)  # never served: refunded
        line = self.written(f'upstream="{reason}')
        self.assertIn(f'upstream="{reason}', line)
        self.assertNotIn(UPSTREAM_KEY, line)
        self.assertTrue(self.last_error().startswith(f"{status} {reason}"), self.last_error())

    def test_a_private_ca_is_trusted_with_upstream_ca_file(self) -> None:
        self.behind(TlsUpstream("server"), upstream_ca_file=CA)
        response = self.chat()
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.json()["object"], "chat.completion")
        self.assertEqual(len(self.upstream.requests), 1)
        self.assertEqual(self.upstream.requests[0]["headers"]["Authorization"], f"Bearer {UPSTREAM_KEY}")
        self.assertIsNone(self.last_error())
        self.assertNotIn("upstream=", self.written(" served "))

    def test_a_certificate_nobody_vouches_for_is_a_502_that_says_why(self) -> None:
        cases = [("server", None, "unable to get local issuer certificate"),  # the test CA is not the system's
                 ("other", CA, "self-signed certificate")]  # signed by nobody the proxy trusts
        for certificate, ca_file, why in cases:
            with self.subTest(certificate=certificate, ca_file=ca_file):
                self.behind(TlsUpstream(certificate), upstream_ca_file=ca_file)
                self.assert_failed_saying("certificate verify failed", answered=503)
                self.assertIn(why.replace("-", "")[:8], self.last_error().replace("-", ""))
                self.assertEqual(self.upstream.requests, [])

    def test_a_refused_port_says_connection_refused(self) -> None:
        self.behind(None, url=f"http://127.0.0.1:{free_port()}/v1")
        self.assert_failed_saying("connection refused", answered=503)

    def test_tls_to_a_server_that_speaks_none_says_the_handshake_failed(self) -> None:
        plain = FakeUpstream()
        self.behind(plain, url=f"https://127.0.0.1:{plain.server_address[1]}/v1")
        self.assert_failed_saying("TLS handshake failed: ", answered=503)

    def test_a_timeout_says_timed_out(self) -> None:
        self.start_proxy(read_timeout=0.2, **self.config_overrides)
        self.upstream.requests.clear()
        self.assert_failed_saying("timed out", 504)
        self.assertEqual(len(self.upstream.requests), 1)  # sent, and no answer in time

    def test_the_access_log_says_why_too(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "access.log")
        self.behind(None, url=f"http://127.0.0.1:{free_port()}/v1", access_log=path)
        self.chat()
        self.logged(1)
        self.stop(self.proxy)
        self.proxy = None
        with open(path) as file:
            record = json.loads(file.readline())
        self.assertEqual((record["status"], record["upstream_error"]), (503, "connection refused"))


class FailureReasonTests(unittest.TestCase):
    """Each transport failure in a few words, from its type: never the exception's own text."""

    def test_each_failure_has_its_words(self) -> None:
        secret = "https://user:sk-SECRET@api.example.com/v1"
        cases = [
            (ConnectionRefusedError(errno.ECONNREFUSED, secret), "connection refused"),
            (socket.gaierror(socket.EAI_NONAME, secret), "name does not resolve"),
            (socket.timeout(secret), "timed out"),
            (TimeoutError(errno.ETIMEDOUT, secret), "timed out"),
            (ConnectionResetError(errno.ECONNRESET, secret), "connection reset"),
            (http.client.RemoteDisconnected(secret), "closed the connection without answering"),
            (http.client.BadStatusLine(secret), "invalid HTTP answer"),
            (llm_proxy.TlsHandshakeFailed("WRONG_VERSION_NUMBER"), "TLS handshake failed: WRONG_VERSION_NUMBER"),
            (OSError(errno.ENETUNREACH, secret), "network is unreachable"),
            (OSError(errno.EHOSTUNREACH, secret), "no route to host"),
            (OSError(secret), "OSError"),
        ]
        for error, words in cases:
            with self.subTest(error=type(error).__name__, words=words):
                self.assertEqual(llm_proxy.failure_reason(error), words)
                failure = llm_proxy.upstream_failure(error)
                self.assertEqual(failure.detail, words)
                self.assertNotIn("SECRET", failure.message + json.dumps(llm_proxy.OPENAI.error_body(failure)))

    def test_the_admin_api_shows_the_reason_not_the_message(self) -> None:
        state = llm_proxy.UpstreamState()
        state.failed(llm_proxy.upstream_failure(ConnectionRefusedError(errno.ECONNREFUSED, "x")))
        self.assertEqual(state.last_error, "502 connection refused")


class CaFileStartupTests(unittest.TestCase):
    """UPSTREAM_CA_FILE is read at startup: a file that cannot serve stops the proxy with one line."""

    def start(self, ca_file: str, url: str = "https://127.0.0.1:9/v1") -> None:
        server = ProxyServer(Config(host="127.0.0.1", port=0, upstream_url=url, upstream_ca_file=ca_file))
        server.server_close()

    def test_an_unusable_file_is_a_startup_error(self) -> None:
        cases = {os.path.join(CERTS, "missing.pem"): "cannot read it",
                 CERTS: "cannot read it",  # a directory
                 os.path.join(CERTS, "README.md"): "no PEM certificate in it",
                 os.path.join(CERTS, "server.key"): "no PEM certificate in it"}  # a key, no certificate
        for path, words in cases.items():
            with self.subTest(path=os.path.basename(path)), self.assertRaises(ConfigError) as caught:
                self.start(path)
            self.assertIn(f"UPSTREAM_CA_FILE {path}: {words}", str(caught.exception))

    def test_a_good_file_starts(self) -> None:
        self.start(CA)
        self.start(CA, url="http://127.0.0.1:9/v1")

    def test_the_setting_is_read_and_warned_about_on_plain_http(self) -> None:
        config = Config.from_env({"UPSTREAM_CA_FILE": CA, "BASE_API_URL": "http://127.0.0.1:9/v1",
                                  "HOST": "127.0.0.1"})
        self.assertEqual(config.upstream_ca_file, CA)
        self.assertEqual(llm_proxy.startup_warnings(config),
                         ["UPSTREAM_CA_FILE is set but the upstream is not https: it is not used"])
        self.assertEqual(llm_proxy.startup_warnings(replace(config, upstream_url="https://127.0.0.1:9/v1")), [])


class MaxTokensWarningTests(unittest.TestCase):
    """'MAX_TOKENS is 10: such requests can never be served' only where a key pays under MAX_TOKENS."""

    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.path = os.path.join(directory.name, "keys.json")

    def warnings(self, keys: dict | None, **settings: object) -> list[str]:
        if keys is not None:
            with open(self.path, "w") as file:
                json.dump(keys, file)
            settings["keys_file"] = self.path
        config = Config(host="127.0.0.1", cost_mode="usage", **settings)
        return [w for w in llm_proxy.startup_warnings(config, KeyRing(config)) if "MAX_TOKENS" in w]

    def test_only_when_some_key_uses_the_environments_limits(self) -> None:
        own = {"name": "a", "max_tokens": 125000}
        cases = [
            ("every key sets its own", {"sk-a": own, "sk-b": {"buckets": [{"max_tokens": 5000},
                                                                          {"unit": "requests"}]}}, {}, 0),
            ("a request window under the environment's", {"sk-a": {"buckets": [{"unit": "requests"},
                                                                               {"max_tokens": 900}]}}, {}, 0),
            ("one key without limits", {"sk-a": own, "sk-b": {"name": "b"}}, {}, 1),
            ("a window without max_tokens", {"sk-a": {"buckets": [{"refill_tokens": 5}]}}, {}, 1),
            ("end users under the environment's", {"sk-a": dict(own, users={"from": "header",
                                                                            "header": "X-User"})}, {}, 1),
            ("PROXY_API_KEYS", {"sk-a": own}, {"client_keys": ("k",)}, 1),
            ("open mode", None, {}, 1),
            ("MAX_TOKENS large enough", {"sk-b": {"name": "b"}}, {"max_tokens": 4000}, 0),
        ]
        for label, keys, settings, expected in cases:
            with self.subTest(label):
                self.assertEqual(len(self.warnings(keys, **settings)), expected)

    def test_the_command_says_nothing_when_every_key_sets_its_own(self) -> None:
        """The issue's start: usage mode, MAX_TOKENS unset (10), every key with its own budget."""
        with open(self.path, "w") as file:
            json.dump({"sk-a": {"name": "a", "max_tokens": 125000},
                       "sk-b": {"name": "b", "buckets": [{"max_tokens": 5000}]}}, file)
        line, _, err = startup_output({"BASE_API_URL": "http://127.0.0.1:9/v1", "KEYS_FILE": self.path,
                                       "TOKEN_COST_MODE": "usage", "HOST": "127.0.0.1", "PORT": str(free_port())})
        self.assertIn("listening on", line)
        self.assertNotIn("MAX_TOKENS", err)


if __name__ == "__main__":
    unittest.main()
