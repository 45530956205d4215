"""Adversarial tests: hostile input, upstream and client faults, load, secrets, fuzzing.

Run by the README's command, ``python3 test_llm_proxy.py``, which also runs this
module.  Every test ends with the proxy still serving a normal request, no bucket
charged for a request that was not served, and (checked by the fixture's tear-down)
no thread left behind.
"""

from __future__ import annotations

import hashlib
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
