"""What a call pays, over real sockets: exactly its budget under contention, and usage
settled as reported, or counted from what was streamed when the report never came.

Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading

import llm_proxy
from test_llm_proxy import CLIENT_KEY, WAIT, AdversarialTestCase, ProxyTestCase, write_keys_file


class ExactAdmissionTests(AdversarialTestCase):
    """Under contention each key is served exactly as many calls as its budget pays for."""

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


class BrokenStreamTests(ProxyTestCase):
    """An upstream that breaks off mid-stream is charged like a client that hangs up."""

    config_overrides = {"cost_mode": "usage", "max_tokens": 1000}

    def test_charge_is_prompt_plus_what_was_streamed(self) -> None:
        payload = {"model": "client-model", "messages": [{"role": "user", "content": "hello"}],
                   "stream": True}
        response = self.request("POST", "/v1/chat/completions", payload,
                                headers={"X-Fake": "break-after-first", "X-Usage": "none"})
        self.assertEqual(response.status, 200)
        streamed = "w0"
        expected = llm_proxy.prompt_tokens(payload) + -(-len(streamed) // 4)
        self.assertEqual(self.level(), 1000 - expected)

    def test_reported_usage_wins_over_the_count(self) -> None:
        # the fake reports usage only at the end, so a complete stream settles to it
        self.chat(stream=True, headers={"X-Usage": "40"})
        self.assertEqual(self.level(), 960)


class FinalUsageTests(ProxyTestCase):
    """Found with a real llama-server: the openai SDK closes a stream at [DONE] without reading on."""

    config_overrides = {"client_keys": (CLIENT_KEY,), "cost_mode": "usage", "max_tokens": 1000}

    def test_a_hang_up_after_the_final_usage_pays_that_usage(self) -> None:
        body = json.dumps({"model": "m", "stream": True, "stream_options": {"include_usage": True},
                           "messages": [{"role": "user", "content": "hello"}]}).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + CLIENT_KEY.encode() + b"\r\nX-Fake: hold-before-done\r\nX-Usage: 4\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            received = b""
            while b'"usage"' not in received:
                received += sock.recv(65536)
        self.assertTrue(self.upstream.closed_early.wait(WAIT))
        self.logged(1)
        self.assertEqual(self.level(), 1000 - 4)  # not the larger count of the streamed text

    def test_a_streamed_limit_reply_reports_usage_when_asked(self) -> None:
        self.start_proxy(client_keys=(CLIENT_KEY,), max_tokens=1, refill_tokens=1)
        self.chat()
        asked = self.chat(stream=True, stream_options={"include_usage": True})
        chunks = [e for e in asked.events() if e != "[DONE]"]
        self.assertEqual(chunks[-1]["usage"], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
        self.assertNotIn(b'"usage"', self.chat(stream=True).body)


class OddUsageTests(ProxyTestCase):
    """A usage object the upstream fills oddly is settled, not a 500."""

    def test_an_odd_usage_object_from_the_upstream_is_no_500(self) -> None:
        self.start_proxy(client_keys=(CLIENT_KEY,), cost_mode="usage", max_tokens=1000)
        # the fake's usage numbers, plus a key that no keyword argument may be called
        response = self.chat(headers={"X-Fake": "odd-usage"})
        self.assertEqual(response.status, 200)
