"""Adversarial tests: hostile input, upstream and client faults, load, secrets, fuzzing.

Run by the README's command, ``python3 test_llm_proxy.py``, which also runs this
module.  Every test ends with the proxy still serving a normal request, no bucket
charged for a request that was not served, and (checked by the fixture's tear-down)
no thread left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import socket
import tempfile
import threading
import time
import unittest
from unittest import mock

import llm_proxy
from llm_proxy import BucketSpec, BucketStore
from test_llm_proxy import (CLIENT_KEY, OTHER_KEY, UPSTREAM_KEY, WAIT, FakeClock, ProxyTestCase,
                            Response)

VALID_BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


def status_of(answer: bytes) -> int:
    """The status code of the first response in raw bytes (0 if there is none)."""
    parts = answer.split(b" ", 2)
    return int(parts[1]) if answer.startswith(b"HTTP/1.") and len(parts) > 1 and parts[1].isdigit() else 0


def body_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


class AdversarialTestCase(ProxyTestCase):
    def exchange(self, data: bytes, half_close: bool = True) -> bytes:
        """Send raw bytes, optionally signal end of input, and read until the proxy closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(data)
            if half_close:
                with contextlib.suppress(OSError):  # the proxy may have answered and closed already
                    sock.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)

    def assert_error_answer(self, answer: bytes, status: int | None = None) -> dict:
        """One OpenAI-shaped error, without a stack trace, and the connection closed after it."""
        self.assertTrue(answer.startswith(b"HTTP/1.1 "), answer[:200])
        if status is not None:
            self.assertEqual(status_of(answer), status, answer[:300])
        self.assertGreaterEqual(status_of(answer), 400)
        self.assertNotEqual(status_of(answer), 500, answer[:300])
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Type: application/json", head)
        error = json.loads(body)["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertNotIn(b"Traceback", answer)
        return error

    def assert_nothing_charged_or_forwarded(self) -> None:
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.level(), 10)

    def assert_healthy(self) -> None:
        """The proxy still serves a normal, metered request."""
        self.assert_still_serving()
        response = self.request("POST", "/v1/chat/completions", {"messages": []}, key="sk-probe")
        self.assertEqual(response.json()["choices"][0]["message"]["content"], "hi from upstream")


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

class MalformedRequestTests(AdversarialTestCase):
    def test_malformed_request_lines(self) -> None:
        for line in (b"GARBAGE", b"GET", b"GET /health HTTP/9.9", b"GET /health HTTP/1.1 extra",
                     b"\x00\x01\x02 / HTTP/1.1", b"GET /health HTTX/1.1", b"GET  HTTP/1.1",
                     b"POST /v1/chat/completions HTTP/1.1\x00"):
            with self.subTest(line=line):
                self.assert_error_answer(self.exchange(line + b"\r\nHost: x\r\n\r\n"))
        self.assert_nothing_charged_or_forwarded()
        self.assert_healthy()

    def test_unknown_method_is_501(self) -> None:
        error = self.assert_error_answer(self.exchange(b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"), 501)
        self.assertEqual(error["type"], "server_error")
        self.assert_healthy()

    def test_head_gets_headers_without_a_body(self) -> None:
        answer = self.exchange(b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"Content-Length: 15", head)
        self.assertEqual(body, b"")

    def test_header_line_without_a_colon(self) -> None:
        answer = self.exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nno colon here\r\n"
                               b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(VALID_BODY), VALID_BODY))
        self.assert_error_answer(answer, 400)
        self.assert_nothing_charged_or_forwarded()
        self.assert_healthy()

    def test_two_hundred_headers(self) -> None:
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        self.assert_error_answer(self.exchange(b"GET /health HTTP/1.1\r\n" + headers + b"\r\n"), 431)
        self.assert_healthy()

    def test_64_kib_header_line(self) -> None:
        answer = self.exchange(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
        self.assert_error_answer(answer, 431)
        answer = self.exchange(b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\n\r\n")
        self.assert_error_answer(answer, 414)
        self.assert_healthy()

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

    def test_content_length_that_lies(self) -> None:
        for value, status in ((b"-1", 400), (b"abc", 400), (b"1e3", 400), (b"+5", 400), (b" 0x10", 400),
                              (b"99999999999999999999", 413)):
            with self.subTest(value=value):
                answer = self.exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                       b"Content-Length: " + value + b"\r\n\r\n" + VALID_BODY)
                self.assert_error_answer(answer, status)
        short = self.exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 500\r\n\r\n" + VALID_BODY)
        self.assert_error_answer(short, 400)
        self.assert_nothing_charged_or_forwarded()
        self.assert_healthy()

    def test_a_body_that_never_comes_times_out(self) -> None:
        self.start_proxy(client_timeout=0.2)
        answer = self.exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: 500\r\n\r\n" + VALID_BODY, half_close=False)
        self.assert_error_answer(answer, 408)
        self.assert_nothing_charged_or_forwarded()
        self.assert_healthy()

    def test_chunked_request_body_is_refused_not_misread(self) -> None:
        answer = self.exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                               b"\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(VALID_BODY), VALID_BODY))
        self.assert_error_answer(answer, 411)
        self.assertEqual(answer.count(b"HTTP/1.1 "), 1, "the chunks must not be read as a request")
        self.assert_nothing_charged_or_forwarded()

    def test_request_smuggling_is_refused_and_the_connection_closed(self) -> None:
        smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        attempts = [
            b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled,
            b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n" + smuggled,
            b"Content-Length: 4\r\nContent-Length: 40\r\n\r\n" + VALID_BODY + smuggled,
            b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n" + smuggled,
        ]
        for attempt in attempts:
            with self.subTest(attempt=attempt[:40]):
                answer = self.exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + attempt)
                self.assertIn(status_of(answer), (400, 411))
                self.assertIn(b"Connection: close", answer)
                self.assertEqual(answer.count(b"HTTP/1.1 "), 1)
        self.assert_nothing_charged_or_forwarded()
        self.assert_healthy()

    def test_hostile_paths_reach_no_other_host_or_path_and_skip_no_bucket(self) -> None:
        targets = [b"http://evil.example/v1/chat/completions", b"//evil.example/v1/chat/completions",
                   b"/v1/../admin", b"/v1/%2e%2e/admin", b"/v1/%2E%2E%2Fadmin", b"/v1/chat%2fcompletions",
                   b"/v1/chat/completions%00", b"/v1/chat/completions/..", b"/v1/./chat/completions",
                   b"/v1\\chat\\completions", b"/v1/chat/completions;jsessionid=1", b"/v1//chat/completions",
                   b"/v1/%ZZ", b"/v1/\xc3\xa9", b"*", b"evil.example:443"]
        for target in targets:
            with self.subTest(target=target):
                answer = self.exchange(b"POST " + target + b" HTTP/1.1\r\nHost: evil.example\r\n"
                                       b"Content-Length: %d\r\n\r\n%s" % (len(VALID_BODY), VALID_BODY))
                self.assert_error_answer(answer)
                self.assertEqual(status_of(answer), 400)
        self.assert_nothing_charged_or_forwarded()
        self.assert_healthy()

    def test_every_spelling_of_a_completion_is_metered(self) -> None:
        for path in ("/v1/chat/completions/", "/v1/chat/completions//", "/v1/chat/completions?a=b",
                     "/V1/CHAT/COMPLETIONS", "/v1/%63hat/completions", "/v1/completions/"):
            with self.subTest(path=path):
                before = self.level()
                response = self.request("POST", path, {"messages": [], "prompt": "x"})
                self.assertEqual(self.level(), before - 1, path)
                self.assertEqual(response.headers["X-RateLimit-Remaining"], str(before - 1))
        self.assertTrue(all(r["path"].startswith("/v1/") for r in self.upstream.requests))

    def test_no_header_injection_either_way(self) -> None:
        folded = self.exchange(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\r\n X-Injected: 1\r\n\r\n")
        self.assert_error_answer(folded, 400)
        response = self.chat(headers={"X-Fake": "folded-header"})
        self.assertIsNone(response.headers["X-Injected"])
        self.assertIsNone(response.headers["X-Folded"])
        self.start_proxy(max_tokens=1)
        self.chat()
        limited = self.chat(model="m\r\nX-Injected: 1")
        self.assertIsNone(limited.headers["X-Injected"])
        self.assertEqual(limited.json()["model"], "m\r\nX-Injected: 1")
        self.request("GET", "/v1/models?q=%0d%0aX-Injected:%201")
        self.assertEqual(self.upstream.requests[-1]["path"], "/v1/models?q=%0d%0aX-Injected:%201")
        self.assertNotIn("X-Injected", self.upstream.requests[-1]["headers"])


# --------------------------------------------------------------------------
# Faults of the upstream
# --------------------------------------------------------------------------

class UpstreamFaultTests(AdversarialTestCase):
    config_overrides = {"read_timeout": 0.3}

    def assert_failed_and_refunded(self, response: Response, status: int) -> None:
        self.assert_openai_error(response, status, "upstream_error")
        self.assertNotIn(b"127.0.0.1", response.body)
        self.assertEqual(self.level(), 10)
        self.assert_healthy()

    def test_dns_failure_is_a_503_after_the_queue_timeout(self) -> None:
        real = socket.getaddrinfo

        def lookup(host: str, *args: object, **kwargs: object) -> list:
            if host == "model.invalid":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real(host, *args, **kwargs)

        self.start_proxy(upstream_url="http://model.invalid:8080/v1", queue_timeout=0.05)
        with mock.patch("socket.getaddrinfo", lookup):
            response = self.chat()
        self.assert_openai_error(response, 503, "upstream_error", "upstream_unavailable")
        self.assertNotIn(b"model.invalid", response.body)
        self.assertEqual(self.level(), 10)

    def test_accept_then_close(self) -> None:
        self.assert_failed_and_refunded(self.chat(headers={"X-Fake": "close"}), 502)

    def test_response_that_stops_mid_body(self) -> None:
        self.assert_failed_and_refunded(self.chat(headers={"X-Fake": "partial"}), 502)

    def test_non_json_200_is_not_an_answer(self) -> None:
        self.assert_failed_and_refunded(self.chat(headers={"X-Fake": "non-json"}), 502)

    def test_ten_megabytes_of_headers(self) -> None:
        self.assert_failed_and_refunded(self.chat(headers={"X-Fake": "huge-headers"}), 502)

    def test_silent_upstream_is_a_504(self) -> None:
        self.assert_failed_and_refunded(self.chat(headers={"X-Fake": "stall"}), 504)

    def test_stream_that_stops_mid_event_ends_cleanly(self) -> None:
        response = self.chat(stream=True, headers={"X-Fake": "break-after-first"})
        events = response.events()  # parses: no half event reached the client
        self.assertEqual(events[-1]["error"]["code"], "upstream_unavailable")
        self.assertEqual(self.level(), 9, "the first event was served")
        self.assert_healthy()

    def test_stream_that_stalls_past_the_read_timeout_ends_cleanly(self) -> None:
        response = self.chat(stream=True, headers={"X-Fake": "stall-mid-stream"})
        events = response.events()
        self.assertEqual(events[0]["choices"][0]["delta"]["content"], "w0")
        self.assertEqual(events[-1]["error"]["code"], "upstream_timeout")
        self.assert_healthy()

    def test_malformed_event_is_relayed_and_the_stream_still_ends_cleanly(self) -> None:
        response = self.chat(stream=True, headers={"X-Fake": "malformed-event"})
        self.assertIn(b"data: {this is not json\n\n", response.body)
        self.assertTrue(response.body.endswith(b"data: [DONE]\n\n"))
        self.assert_healthy()

    def test_faults_leak_no_connections(self) -> None:
        for behaviour in ("close", "partial", "non-json", "huge-headers", "stall", "break-after-first"):
            self.chat(stream=behaviour == "break-after-first", headers={"X-Fake": behaviour})
        # Seen from the upstream: once the stalled handler is let go, at most one
        # connection (the pooled one) is still open; the proxy kept none of the
        # faulty ones, and the next requests all reuse that single connection.
        self.upstream.release.set()
        deadline = time.monotonic() + WAIT
        while self.upstream.connection_count > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertLessEqual(self.upstream.connection_count, 1, "upstream connections leaked")
        self.upstream.peers.clear()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:  # one keep-alive client, so each answer's upstream connection is pooled before the next
            for _ in range(3):
                self.assertEqual(self.request("POST", "/v1/chat/completions", VALID_BODY, conn=conn).status, 200)
        finally:
            conn.close()
        self.assertEqual(len(self.upstream.peers), 1, "sequential requests share one pooled connection")
        # (The stalled handler may still be ending: the wait above is met by it alone when no
        # connection was pooled, and the requests then opened one.)
        deadline = time.monotonic() + WAIT
        while self.upstream.connection_count > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertLessEqual(self.upstream.connection_count, 1)
        deadline = time.monotonic() + WAIT
        while self.proxy.connection_count and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(self.proxy.connection_count, 0)


class UpstreamFramingTests(AdversarialTestCase):
    """Answers without a Content-Length (chunked, as Go servers send larger bodies)."""

    def test_chunked_answer_is_checked_and_settled(self) -> None:
        self.start_proxy(cost_mode="usage", max_tokens=100)
        response = self.chat(max_tokens=20, headers={"X-Fake": "chunked-json", "X-Usage": "9"})
        self.assertEqual(response.json()["choices"][0]["message"]["content"], "hi from upstream")
        self.assertEqual(self.request("GET", "/v1/quota").json()["buckets"][0]["tokens"], 91)
        self.assert_openai_error(self.chat(max_tokens=20, headers={"X-Fake": "chunked-text"}), 502,
                                 "upstream_error")
        self.assertEqual(self.request("GET", "/v1/quota").json()["buckets"][0]["tokens"], 91)

    def test_client_leaving_closes_an_upstream_that_said_connection_close(self) -> None:
        body = json.dumps({"messages": [], "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Close: 1\r\n"
                         b"X-Fake: until-client-leaves\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.assertTrue(self.upstream.first_event_sent.wait(WAIT))
            sock.recv(1)
        self.assertTrue(self.upstream.closed_early.wait(1.0), "upstream kept streaming to nobody")
        self.assert_healthy()


# --------------------------------------------------------------------------
# Faults of the client
# --------------------------------------------------------------------------

class ClientFaultTests(AdversarialTestCase):
    def test_slowloris_is_dropped_while_others_are_served(self) -> None:
        self.start_proxy(client_timeout=0.3)
        stalled = [socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) for _ in range(20)]
        try:
            for sock in stalled:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            for _ in range(5):
                self.assertEqual(self.chat().status, 200)
            for sock in stalled:  # each gets a 408, then the proxy closes the connection
                answer = b"".join(iter(lambda: sock.recv(65536), b""))
                self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        finally:
            for sock in stalled:
                sock.close()
        self.assert_healthy()

    def test_slow_reader_gets_everything_and_delays_no_one(self) -> None:
        body = json.dumps({"messages": [], "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Fake: big-stream\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.assertTrue(self.upstream.first_event_sent.wait(WAIT))
            self.assertEqual(self.chat(key=OTHER_KEY).status, 200)  # served while the reader dawdles
            received = []
            while True:
                chunk = sock.recv(32768)
                if not chunk:
                    break
                received.append(chunk)
                time.sleep(0.005)  # about 6 MB/s: the proxy's writes wait on this reader
        answer = b"".join(received)
        parsed = Response(200, http.client.HTTPMessage(), dechunk(body_of(answer))).events()
        self.assertEqual(len(parsed), 201)
        self.assertEqual(parsed[-1], "[DONE]")
        self.assertEqual(parsed[199]["choices"][0]["delta"]["content"], "w199" + "x" * 10_000)

    def test_300_idle_connections_do_not_stop_service(self) -> None:
        idle = [socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) for _ in range(300)]
        try:
            deadline = time.monotonic() + WAIT
            while self.proxy.connection_count < 300 and time.monotonic() < deadline:
                time.sleep(0.01)
            self.assertEqual(self.proxy.connection_count, 300, "all 300 idle connections are open")
            for _ in range(5):
                self.assertEqual(self.chat().status, 200)
            self.assertGreaterEqual(self.proxy.connection_count, 300, "no idle connection was dropped")
            for sock in idle[:10]:  # each is still a live connection the proxy would serve
                sock.setblocking(False)
                with self.assertRaises(BlockingIOError):
                    sock.recv(1)
        finally:
            for sock in idle:
                sock.close()
        self.assert_healthy()


class SlowDripTests(AdversarialTestCase):
    def test_a_request_dripping_in_is_dropped_after_the_client_timeout(self) -> None:
        self.start_proxy(client_timeout=0.3, state_save_interval=0.1)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400
            try:
                for byte in request:  # one byte every 20 ms: no single read ever times out
                    sock.sendall(bytes([byte]))
                    time.sleep(0.02)
            except OSError:
                pass  # dropped while still sending
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
        self.assertLess(time.monotonic() - started, 4.0, "a dripping client held its connection")
        self.assert_healthy()


class MethodAndModelTests(AdversarialTestCase):
    def test_other_methods_on_a_metered_path_are_405(self) -> None:
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            with self.subTest(method=method):
                self.assert_openai_error(self.request(method, "/v1/chat/completions", VALID_BODY), 405)
        self.assert_nothing_charged_or_forwarded()

    def test_model_list_applies_to_every_endpoint_that_names_a_model(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        keys = os.path.join(directory.name, "keys.json")
        with open(keys, "w") as file:
            json.dump({CLIENT_KEY: {"models": ["small"]}}, file)
        self.start_proxy(keys_file=keys)
        response = self.request("POST", "/v1/embeddings", {"model": "large", "input": "x"})
        self.assert_openai_error(response, 403, code="model_not_allowed")
        self.assertEqual(self.upstream.requests, [])

    def test_expect_100_with_an_unknown_key_is_refused_before_the_body(self) -> None:
        self.start_proxy(client_keys=(CLIENT_KEY,))
        answer = self.exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                               b"Authorization: Bearer sk-nobody\r\nContent-Length: 5000000\r\n\r\n",
                               half_close=False)
        self.assert_error_answer(answer, 401)
        self.assertNotIn(b"100 Continue", answer)

    def test_http_1_0_keep_alive_is_confirmed(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            for _ in range(2):
                sock.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                answer = b""
                while not answer.endswith(b'{"status":"ok"}'):
                    answer += sock.recv(65536)
                self.assertIn(b"Connection: keep-alive", answer)


def dechunk(data: bytes) -> bytes:
    """Decode an HTTP/1.1 chunked body."""
    out, rest = [], data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2:]
    return b"".join(out)


# --------------------------------------------------------------------------
# Limits that hold
# --------------------------------------------------------------------------

class ExactAdmissionTests(AdversarialTestCase):
    BUDGETS = {"sk-a": 37, "sk-b": 100, "sk-c": 5, "sk-d": 0}

    def run_contention(self, cost: int, **config: object) -> None:
        """64 threads x 20 requests against keys whose budgets are known: exactly that many served."""
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        keys_path = os.path.join(directory.name, "keys.json")
        with open(keys_path, "w") as file:
            json.dump({key: {"max_tokens": max(budget * cost, 1), "refill_tokens": 1,
                             "refill_interval_seconds": 86400}
                       for key, budget in self.BUDGETS.items()}, file)
        self.start_proxy(keys_file=keys_path, **config)
        if self.BUDGETS["sk-d"] == 0:  # an empty bucket: spend its one token first
            self.assertEqual(self.chat(key="sk-d", max_tokens=1).status, 200)
        served = {key: 0 for key in self.BUDGETS}
        lock = threading.Lock()
        keys = list(self.BUDGETS)
        start = threading.Barrier(64)

        def worker(index: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
            start.wait(WAIT)
            try:
                for round_ in range(20):
                    key = keys[(index + round_) % len(keys)]
                    response = self.request("POST", "/v1/chat/completions",
                                            {"messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 10}, key=key, conn=conn,
                                            headers={"X-Usage": str(cost)})
                    if response.json()["choices"][0]["message"]["content"] == "hi from upstream":
                        with lock:
                            served[key] += 1
            finally:
                conn.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 6)
        self.assertEqual(served, self.BUDGETS)

    def test_request_mode(self) -> None:
        self.run_contention(cost=1)

    def test_estimate_mode(self) -> None:
        self.run_contention(cost=12, cost_mode="estimate")  # "user hi" is 2 tokens, plus 10

    def test_usage_mode(self) -> None:
        self.run_contention(cost=12, cost_mode="usage")


class BoundedResourceTests(AdversarialTestCase):
    def test_connection_cap_answers_a_fast_503(self) -> None:
        self.start_proxy(max_connections=5, max_connections_per_client=0)  # the whole pool, from here
        held = [socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) for _ in range(5)]
        try:
            deadline = time.monotonic() + WAIT
            while self.proxy.connection_count < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            answer = self.exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertLess(time.monotonic() - started, 1.0)
            error = self.assert_error_answer(answer, 503)
            self.assertEqual(error["code"], "too_many_connections")
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + WAIT
        while self.proxy.connection_count and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assert_healthy()

    def test_200000_identities_are_forgotten_once_full_again(self) -> None:
        clock = FakeClock()
        store = BucketStore(clock)
        spec = (BucketSpec(10, 2, 300),)
        for index in range(200_000):
            store.charge(f"ip:10.{index >> 16}.{(index >> 8) & 255}.{index & 255}", spec, 1)
        self.assertEqual(len(store), 200_000)
        clock.advance(299)
        self.assertEqual(store.prune(lambda identity: spec), 0, "not full yet: nothing to forget")
        clock.advance(1)
        self.assertEqual(store.prune(lambda identity: spec), 200_000)
        self.assertEqual(len(store), 0)

    def test_churning_keys_through_the_proxy_leave_nothing_behind(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            for index in range(500):
                self.request("POST", "/v1/chat/completions", {"messages": []}, key=f"sk-churn-{index}",
                             conn=conn)
        finally:
            conn.close()
        self.assertEqual(len(self.proxy.buckets), 500)
        self.clock.advance(300)
        self.proxy.tidy()
        self.assertEqual(len(self.proxy.buckets), 0)


# --------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------

class SecretTests(AdversarialTestCase):
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


# --------------------------------------------------------------------------
# Fuzzing
# --------------------------------------------------------------------------

class FuzzTests(AdversarialTestCase):
    SEED = 20261123
    CASES = 3000
    TIME_LIMIT = 25.0

    TEMPLATES = [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-fuzz\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
        b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Pad: %d\r\n\r\n%s",
        b"GET /health HTTP/1.0\r\nX-Pad: %d\r\n\r\n%s",
        b"OPTIONS /v1/chat/completions HTTP/1.1\r\nX-Pad: %d\r\n\r\n%s",
    ]
    BODIES = [VALID_BODY, b'{"prompt": "hi", "stream": true}', b'{"messages": [], "max_tokens": 5}',
              b'{"messages": [{"role": "user", "content": "\\u00e9\\ud83d"}], "stream": true}']
    NASTY = [b"\r\n", b"\n", b"\r", b"\x00", b":", b" ", b"%", b"%00", b"..", b"/", b"\xff", b"{", b"}",
             b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 99\r\n", b"\t", b"?", b"#"]

    def mutate(self, rng: random.Random, data: bytes) -> bytes:
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            choice = rng.random()
            position = rng.randrange(len(data) + 1)
            if choice < 0.3 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif choice < 0.55:
                data[position:position] = rng.choice(self.NASTY)
            elif choice < 0.75 and data:
                del data[position:position + rng.randint(1, 8)]
            elif choice < 0.9:
                data = data[:position]
            else:
                data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return bytes(data)

    def test_thousands_of_mutated_requests(self) -> None:
        self.start_proxy(client_timeout=0.5, read_timeout=1.0, max_tokens=1_000_000)
        rng = random.Random(self.SEED)
        cases = []
        for _ in range(self.CASES):
            body = rng.choice(self.BODIES)
            request = rng.choice(self.TEMPLATES) % (len(body), body)
            cases.append(request if rng.random() < 0.1 else self.mutate(rng, request))
        deadline = time.monotonic() + self.TIME_LIMIT
        problems: list[str] = []
        counts = {"answered": 0, "closed": 0}
        lock = threading.Lock()

        def worker(share: list[bytes]) -> None:
            for data in share:
                if time.monotonic() > deadline:
                    return
                answer = self.exchange_quietly(data)
                with lock:
                    counts["answered" if answer else "closed"] += 1
                    if answer and not answer.startswith(b"HTTP/1."):
                        problems.append(f"not HTTP: {answer[:60]!r} for {data[:80]!r}")
                    elif status_of(answer) == 500:
                        problems.append(f"500 for {data[:120]!r}")

        threads = [threading.Thread(target=worker, args=(cases[i::8],)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.TIME_LIMIT + WAIT)
        self.assertEqual(problems, [])
        self.assertGreater(counts["answered"], self.CASES // 2, counts)
        self.assertNotIn("internal error", self.written())
        self.assert_healthy()

    def exchange_quietly(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            chunks = []
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except OSError:
                pass
            return b"".join(chunks)


if __name__ == "__main__":
    unittest.main()
