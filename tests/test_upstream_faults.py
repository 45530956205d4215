"""Faults of the upstream: what a client gets when the model server fails, over real sockets.

A name that does not resolve, a connection closed or a body cut short, an answer
that is no JSON, ten megabytes of headers, silence, a stream that breaks off or
stalls mid-event, a chunked answer: each is answered in the usual error shape
without the upstream's address, refunded, and leaks no connection.
Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from unittest import mock

from test_llm_proxy import VALID_BODY, WAIT, AdversarialTestCase, ProxyTestCase, Response, free_port


class FailureTests(ProxyTestCase):
    """A failing upstream's status passes through; no connection or no answer is a 502 or 504."""

    config_overrides = {"max_tokens": 3}

    def test_upstream_5xx_passes_through_and_is_refunded(self) -> None:
        response = self.chat(headers={"X-Fake": "status-503"})
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json()["error"]["message"], "upstream says 503")
        self.assertEqual(self.level(), 3)

    def test_refused_connection_is_a_503_without_details_and_refunded(self) -> None:
        port = free_port()
        self.start_proxy(max_tokens=3, upstream_url=f"http://127.0.0.1:{port}/v1", queue_timeout=0.05)
        error = self.assert_openai_error(self.chat(), 503, "upstream_error", "upstream_unavailable")
        self.assertNotIn("refused", error["message"].lower())
        self.assertNotIn(str(port), error["message"])
        self.assertEqual(self.level(), 3)

    def test_upstream_that_hangs_up_is_a_502_and_refunded(self) -> None:
        self.assert_openai_error(self.chat(headers={"X-Fake": "close"}), 502, "upstream_error")
        self.assert_openai_error(self.chat(headers={"X-Fake": "partial"}), 502, "upstream_error")
        self.assertEqual(self.level(), 3)

    def test_upstream_timeout_is_a_504_and_refunded(self) -> None:
        self.start_proxy(max_tokens=3, read_timeout=0.2)
        self.assert_openai_error(self.chat(headers={"X-Fake": "stall"}), 504, "upstream_error",
                                 "upstream_timeout")
        self.assertEqual(self.level(), 3)
        self.upstream.release.set()
        self.assertEqual(self.chat().status, 200)


class UpstreamFaultTests(AdversarialTestCase):
    """An upstream that fails in any way is a 502 or 504 in the usual shape, refunded."""

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
