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
import socket
import tempfile
import threading
import time
import unittest
from unittest import mock

import llm_proxy
from llm_proxy import BucketSpec, BucketStore
from test_llm_proxy import (CLIENT_KEY, OTHER_KEY, UPSTREAM_KEY, WAIT, AdversarialTestCase,
                            FakeClock, Response, body_of, dechunk, status_of, write_keys_file)


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


# --------------------------------------------------------------------------
# Limits that hold
# --------------------------------------------------------------------------

class ExactAdmissionTests(AdversarialTestCase):
    BUDGETS = {"sk-a": 37, "sk-b": 100, "sk-c": 5, "sk-d": 0}

    def run_contention(self, cost: int, **config: object) -> None:
        """64 threads x 20 requests against keys whose budgets are known: exactly that many served."""
        keys_path = write_keys_file(self, {key: {"max_tokens": max(budget * cost, 1), "refill_tokens": 1,
                                                 "refill_interval_seconds": 86400}
                                           for key, budget in self.BUDGETS.items()})
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

if __name__ == "__main__":
    unittest.main()
