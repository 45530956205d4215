"""ACCESS_LOG, the audit trail: one JSON line per request, over real sockets.

Each line has the request's outcome, status and charge, names the key by a short
fingerprint (never the key, never the prompt), and times the request from its
arrival (UTC, milliseconds) to its last byte.
Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time

import llm_proxy
from test_llm_proxy import CLIENT_KEY, OTHER_KEY, UPSTREAM_KEY, WAIT, ProxyTestCase


class AccessLogTests(ProxyTestCase):
    """ACCESS_LOG: one JSON line per request, naming keys by fingerprint, never a prompt."""

    def test_one_json_line_per_request_without_keys_or_prompts(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "access.log")
        self.start_proxy(access_log=path, max_tokens=1, refill_tokens=1)
        # each record is written just after its answer: wait for it, to keep the order
        self.chat(content="my secret prompt")
        self.written(" served ")
        self.chat(content="my secret prompt")
        self.written(" limited ")
        self.chat(key=None, model=5)
        self.written(" rejected ")
        self.chat(headers={"X-Fake": "status-503"}, key=OTHER_KEY)
        self.stop(self.proxy)
        self.proxy = None
        with open(path) as file:
            text = file.read()
        records = [json.loads(line) for line in text.splitlines()]
        self.assertEqual([r["outcome"] for r in records], ["served", "limited", "rejected", "error"])
        self.assertEqual([r["status"] for r in records], [200, 200, 400, 503])
        self.assertEqual([r["tokens_charged"] for r in records], [1, 0, 0, 0])
        first = records[0]
        self.assertEqual(first["key"], llm_proxy.key_digest(CLIENT_KEY)[:12])
        self.assertEqual((first["ip"], first["method"], first["path"], first["model"]),
                         ("127.0.0.1", "POST", "/v1/chat/completions", "client-model"))
        self.assertIsInstance(first["upstream_ms"], float)
        self.assertEqual(set(first), {"time", "key", "user", "ip", "method", "path", "model", "status",
                                      "stream", "tokens_charged", "tokens_settled", "duration_ms",
                                      "upstream_ms", "outcome"})
        for secret in (CLIENT_KEY, OTHER_KEY, UPSTREAM_KEY, "my secret prompt"):
            self.assertNotIn(secret, text)


class AccessLogTimelineTests(ProxyTestCase):
    """``time`` is the arrival in UTC with milliseconds; ``duration_ms`` runs to the last byte."""

    def test_arrival_duration_and_stream_flag(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "access.log")
        self.start_proxy(access_log=path)
        self.chat()
        self.logged(1)
        self.wall.now = 1_800_000_000.25  # 2027-01-15T08:00:00.250Z on the proxy's wall clock
        streamer = threading.Thread(target=lambda: self.chat(stream=True, headers={
            "X-Fake": "pause-after-first"}))
        streamer.start()
        self.upstream.first_event_sent.wait(WAIT)
        self.wall.advance(100)  # the answer ends much later than it began
        time.sleep(0.3)  # the stream stays open this long after its first event
        self.upstream.release.set()
        streamer.join(WAIT)
        self.stop(self.proxy)
        self.proxy = None
        with open(path) as file:
            records = [json.loads(line) for line in file]
        self.assertEqual([r["stream"] for r in records], [False, True])
        for record in records:
            self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        streamed = records[1]
        self.assertEqual(streamed["time"], "2027-01-15T08:00:00.250Z", "time is the arrival, not the end")
        self.assertGreaterEqual(streamed["duration_ms"], 300)
        self.assertLess(streamed["upstream_ms"], streamed["duration_ms"])
