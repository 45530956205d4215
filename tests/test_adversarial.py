"""Adversarial tests: hostile input, upstream and client faults, load, secrets, fuzzing.

Run by the README's command, ``python3 test_llm_proxy.py``, which also runs this
module.  Every test ends with the proxy still serving a normal request, no bucket
charged for a request that was not served, and (checked by the fixture's tear-down)
no thread left behind.
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import threading
import unittest
from unittest import mock

import llm_proxy
from test_llm_proxy import (CLIENT_KEY, OTHER_KEY, UPSTREAM_KEY, WAIT, AdversarialTestCase,
                            FakeClock, Response, body_of, dechunk, status_of, write_keys_file)


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


# --------------------------------------------------------------------------
# Fuzzing
# --------------------------------------------------------------------------

if __name__ == "__main__":
    unittest.main()
