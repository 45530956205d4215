"""The fair queue in front of the upstream (UPSTREAM_MAX_CONCURRENT), over real sockets.

Calls wait their turn round-robin by key, a per-key limit holds one key back without
stopping others, a queue timeout is a refunded 503, a client that leaves while queued
is withdrawn and never sent, and no slot leaks however calls fail.
Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import json
import socket
import threading

from test_llm_proxy import CLIENT_KEY, OTHER_KEY, WAIT, ProxyTestCase


class FairQueueTests(ProxyTestCase):
    """Queued calls take turns by key; a per-key limit holds one key back and no slot leaks."""

    config_overrides = {"upstream_max_concurrent": 1, "max_tokens": 100}

    def setUp(self) -> None:
        self.jobs: list[tuple[threading.Thread, int, list, dict]] = []
        super().setUp()

    def tearDown(self) -> None:
        try:
            self.finish()  # before the proxy stops, so no background request is cut off
        finally:
            super().tearDown()

    def background(self, expected_status: int = 200, **kwargs: object) -> threading.Thread:
        """Send ``self.chat(**kwargs)`` from a thread; ``finish`` checks it got ``expected_status``."""
        outcome: list = []

        def send() -> None:
            try:
                outcome.append(self.chat(**kwargs).status)
            except Exception as error:  # recorded for finish() to report, never printed
                outcome.append(error)

        thread = threading.Thread(target=send)
        thread.start()
        self.addCleanup(thread.join, WAIT)
        self.jobs.append((thread, expected_status, outcome, kwargs))
        return thread

    def finish(self) -> None:
        """Let held requests go; every background request must have completed with its status."""
        self.upstream.release.set()
        jobs, self.jobs = self.jobs, []
        for thread, expected_status, outcome, kwargs in jobs:
            thread.join(WAIT)
            self.assertFalse(thread.is_alive(), f"background request {kwargs} never completed")
            self.assertEqual(outcome, [expected_status], f"background request {kwargs}")

    def test_queue_serves_keys_round_robin(self) -> None:
        gate = self.proxy.upstreams.default.gate
        self.background(headers={"X-Fake": "hold", "X-Tag": "hold"})
        self.wait_for(lambda: gate.in_flight == 1 and len(self.upstream.requests) == 1)
        for index in range(3):
            self.background(headers={"X-Tag": f"a{index}"})
            self.wait_for(lambda: gate.waiting == index + 1)
        self.background(key=OTHER_KEY, headers={"X-Tag": "b0"})
        self.wait_for(lambda: gate.waiting == 4)
        self.finish()  # all five answered 200
        order = [r["headers"]["X-Tag"] for r in self.upstream.requests]
        self.assertEqual(order, ["hold", "a0", "b0", "a1", "a2"])

    def test_queue_timeout_is_a_refunded_503(self) -> None:
        self.start_proxy(upstream_max_concurrent=1, queue_timeout=0.1, max_tokens=100)
        self.background(key=OTHER_KEY, headers={"X-Fake": "hold"})
        self.wait_for(lambda: self.proxy.upstreams.in_flight == 1)
        self.assert_openai_error(self.chat(), 503, "server_error", "queue_timeout")
        self.assertEqual(self.level(), 100)
        self.finish()  # the held request is still answered 200

    def test_per_key_limit_holds_one_key_back_but_not_others(self) -> None:
        self.start_proxy(max_concurrent_per_key=1, max_tokens=100)
        gate = self.proxy.upstreams.default.gate
        self.background(headers={"X-Fake": "hold"})
        self.wait_for(lambda: gate.in_flight == 1)
        self.background()
        self.wait_for(lambda: gate.waiting == 1)
        self.assertEqual(self.chat(key=OTHER_KEY).status, 200)  # not stuck behind alice
        self.assertEqual(gate.waiting, 1)
        self.finish()  # both of alice's requests are answered 200
        self.wait_for(lambda: gate.in_flight == 0 and gate.waiting == 0)

    def test_client_leaving_closes_a_non_streamed_upstream_request_at_once(self) -> None:
        body = json.dumps({"messages": []}).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Fake: hold-until-closed\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            self.wait_for(lambda: len(self.upstream.requests) == 1)
        self.assertTrue(self.upstream.closed_early.wait(1.0), "upstream kept generating for nobody")
        self.wait_for(lambda: self.proxy.upstreams.in_flight == 0)

    def test_no_slot_leaks_after_200_mixed_failing_requests(self) -> None:
        self.start_proxy(upstream_max_concurrent=3, max_concurrent_per_key=2, read_timeout=0.1,
                         max_tokens=1000)
        behaviours = ["status-500", "close", "partial", "stall", "status-400", "", "leave",
                      "break-after-first"]

        def one(index: int) -> None:
            behaviour = behaviours[index % len(behaviours)]
            key = [CLIENT_KEY, OTHER_KEY, "sk-third"][index % 3]
            if behaviour == "leave":  # asks for a long stream, reads its first event, hangs up
                body = b'{"messages": [], "stream": true}'
                with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Fake: until-client-leaves"
                                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    sock.recv(1)
                return
            self.chat(key=key, stream=index % 2 == 0, headers={"X-Fake": behaviour})

        threads = [threading.Thread(target=lambda i=i: [one(j) for j in range(i, 200, 8)]) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 3)
        gate = self.proxy.upstreams.default.gate
        self.wait_for(lambda: gate.in_flight == 0)
        self.assertEqual((gate.in_flight, gate.waiting), (0, 0))
        for key in (CLIENT_KEY, OTHER_KEY, "sk-third", None):  # None: the IP identity of the leavers
            # Each identity still gets both of its per-key slots at once: a leaked
            # slot would queue the second stream (until QUEUE_TIMEOUT, 30 s).
            auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
            body = b'{"messages": [], "stream": true}'
            streams = [socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) for _ in range(2)]
            try:
                for sock in streams:
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Fake: until-client-leaves"
                                 b"\r\n%sContent-Length: %d\r\n\r\n%s" % (auth, len(body), body))
                self.wait_for(lambda: gate.in_flight + gate.waiting == 2)
                self.assertEqual((gate.in_flight, gate.waiting), (2, 0), f"a slot of {key} leaked")
                for sock in streams:
                    self.assertTrue(sock.recv(12).startswith(b"HTTP/1.1 200"))
            finally:
                for sock in streams:
                    sock.close()
            self.wait_for(lambda: gate.in_flight == 0)
        self.assertEqual(self.chat().status, 200)


class QueuedLeaverTests(ProxyTestCase):
    """A client that leaves while queued is dropped from the queue, refunded and never sent."""

    config_overrides = {"client_keys": (CLIENT_KEY, OTHER_KEY), "upstream_max_concurrent": 1}

    def test_leaver_is_withdrawn_at_once_never_sent_and_not_charged(self) -> None:
        results = []
        holder = threading.Thread(target=lambda: results.append(self.chat(headers={"X-Fake": "hold"})))
        holder.start()
        gate = self.proxy.upstreams.default.gate
        self.wait_for(lambda: len(self.upstream.requests) == 1)
        body = json.dumps({"messages": [{"role": "user", "content": "queued"}]}).encode()
        leaver = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        leaver.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       + OTHER_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.wait_for(lambda: gate.waiting == 1)
        leaver.close()
        self.wait_for(lambda: gate.waiting == 0)  # withdrawn while the slot is still taken
        self.assertEqual(gate.in_flight, 1)
        self.upstream.release.set()
        holder.join(WAIT)
        self.assertEqual(results[0].status, 200)
        self.written("499")
        self.assertEqual(len(self.upstream.requests), 1, "the leaver's request was sent upstream")
        self.assertEqual(self.level(OTHER_KEY), 10)
        self.assertEqual(self.level(CLIENT_KEY), 9)
        self.assertEqual(self.chat(key=OTHER_KEY).status, 200)  # no slot was kept by the leaver
        self.wait_for(lambda: (gate.in_flight, gate.waiting) == (0, 0))  # released after the answer
