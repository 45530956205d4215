"""HTTP/1.1 as the proxy reads and answers it, over raw sockets.

Malformed request lines and headers, lying or doubled framing (smuggling), header
injection either way, Expect: 100-continue, HTTP/1.0 keep-alive, the Server header,
and thousands of mutated requests.  Every refusal is one error in the OpenAI shape,
nothing is charged or forwarded, and the proxy still serves afterwards.
Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import random
import socket
import threading
import time

import llm_proxy
from test_llm_proxy import (CLIENT_KEY, VALID_BODY, WAIT, AdversarialTestCase, ProxyTestCase,
                            status_of)


class MalformedRequestTests(AdversarialTestCase):
    """Request lines, headers and framing that break HTTP/1.1: one error, nothing charged or sent."""

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


class ContinueAndKeepAliveTests(AdversarialTestCase):
    """Expect: 100-continue and HTTP/1.0 keep-alive, as their clients expect them."""

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


class ServerHeaderTests(ProxyTestCase):
    """The upstream's Server header is dropped; every answer names the proxy, once."""

    config_overrides = {"client_keys": (CLIENT_KEY,), "max_tokens": 1, "refill_tokens": 1}

    def test_every_answer_names_the_proxy_once(self) -> None:
        answers = {"served": self.chat(), "limited": self.chat(),
                   "streamed limit": self.chat(stream=True),
                   "forwarded": self.request("GET", "/v1/models"),
                   "401": self.chat(key="sk-nobody"), "health": self.request("GET", "/health"),
                   "404": self.request("GET", "/nowhere")}
        for name, response in answers.items():
            with self.subTest(name):
                self.assertEqual(response.headers.get_all("Server"),
                                 [f"llm_proxy/{llm_proxy.__version__}"])
        self.assertIn("limit reached", answers["limited"].json()["choices"][0]["message"]["content"])


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
