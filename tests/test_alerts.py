"""Alerts (issue 20, item 9): a webhook told once when a window passes each threshold.

A fake webhook on 127.0.0.1 port 0 records what it is sent, and can fail or hold its
answers.  Refills come from the injected clocks, never from sleeping.
Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler

import llm_proxy
from llm_proxy import TrackedServer
from test_llm_proxy import (ADMIN_KEY, CLIENT_KEY, OTHER_KEY, UPSTREAM_KEY, WAIT, ProxyTestCase,
                            free_port, serve)

APP_KEY = "sk-app-classroom-7777"
HOOK_SECRET = "XoXb-hook-token-0123456789"  # what makes a Slack or Discord webhook URL a secret
SECRETS = (CLIENT_KEY, OTHER_KEY, APP_KEY, ADMIN_KEY, UPSTREAM_KEY, HOOK_SECRET)


class FakeHook(TrackedServer):
    """A webhook: answers each POST with the next of ``statuses`` (then 200), or holds it."""

    def __init__(self) -> None:
        self.received: list[dict] = []   # every POST: status answered, payload, path, headers
        self.statuses: list[int] = []
        self.hold = False
        self.release = threading.Event()
        self.held = threading.Event()
        super().__init__(("127.0.0.1", 0), FakeHookHandler)

    def url(self, path: str = f"/services/T000/B000/{HOOK_SECRET}") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def payloads(self, status: int = 200) -> list[dict]:
        return [post["payload"] for post in self.received if post["status"] == status]


class FakeHookHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHook

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.hold:
            self.server.held.set()
            self.server.release.wait(WAIT)
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.server.received.append({"status": status, "payload": json.loads(body), "path": self.path,
                                     "headers": dict(self.headers.items())})
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


class AlertTestCase(ProxyTestCase):
    thresholds = (50, 100)

    def setUp(self) -> None:
        self.hook = FakeHook()
        serve(self.hook)
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.keys_path = os.path.join(directory.name, "keys.json")
        self.state_path = os.path.join(directory.name, "state.json")
        self.write_keys()
        self.config_overrides = {"keys_file": self.keys_path, "alert_webhook_url": self.hook.url(),
                                 "alert_thresholds": self.thresholds}
        super().setUp()

    def write_keys(self, hourly: int = 10, cost_mode_window: str = "") -> None:
        with open(self.keys_path, "w") as file:
            json.dump({CLIENT_KEY: {"name": "ada", "buckets": [
                {"name": "hourly", "max_tokens": hourly, "refill_tokens": hourly,
                 "refill_interval_seconds": 3600},
                {"name": "daily", "max_tokens": 20, "refill_tokens": 20,
                 "refill_interval_seconds": 86400, "period": "day"}]},
                OTHER_KEY: {"max_tokens": 1000},
                APP_KEY: {"name": "class", "max_tokens": 1000, "users": {
                    "from": "user_field", "max_tokens": 2, "refill_tokens": 2,
                    "refill_interval_seconds": 3600}}}, file)

    def tearDown(self) -> None:
        self.hook.release.set()
        if self.proxy is not None:  # first the proxy, whose alert thread may be posting
            self.stop(self.proxy)
            self.proxy = None
        self.stop(self.hook)
        super().tearDown()

    def use_one_window(self, **overrides: object) -> None:
        """ada gets one unnamed window of 100 tokens, refilled each hour."""
        with open(self.keys_path, "w") as file:
            json.dump({CLIENT_KEY: {"name": "ada", "max_tokens": 100, "refill_tokens": 100,
                                    "refill_interval_seconds": 3600}}, file)
        self.start_proxy(**dict(self.config_overrides, **overrides))

    def chats(self, count: int, **fields: object) -> None:
        for _ in range(count):
            self.chat(**fields)

    def alerts(self) -> list[tuple]:
        """(window, threshold) of the alerts delivered so far, once every alert queued is out."""
        self.wait_for(lambda: self.proxy.alerts.sender.drained)
        return [(p["window"], p["threshold"]) for p in self.hook.payloads()]

    def settle(self, count: int) -> None:
        """Wait until ``count`` requests were recorded: their alerts are queued by then."""
        self.logged(count)


class CrossingTests(AlertTestCase):
    def test_each_threshold_is_told_once_with_its_fields_and_no_secret(self) -> None:
        self.chats(4)
        self.settle(4)
        self.assertEqual(self.alerts(), [])  # 40%
        self.chats(1)
        self.settle(5)
        self.assertEqual(self.alerts(), [("hourly", 50)])
        self.chats(5)  # the hourly window is empty, the daily one half used
        self.chats(3)  # limited: nothing is told twice
        self.settle(13)
        self.assertEqual(self.alerts(), [("hourly", 50), ("hourly", 100), ("daily", 50)])
        first, full, daily = self.hook.payloads()
        self.assertEqual(first, {
            "key": "ada", "user": None, "window": "hourly", "unit": "tokens", "used": 5,
            "capacity": 10, "percent": 50.0, "threshold": 50,
            "resets": llm_proxy._iso_time(self.wall() + 3600),  # full again at the next step
            "currency": None,  # (a money window's amounts are in MODELS_FILE's currency)
            "text": first["text"], "content": first["text"], "allowed_mentions": {"parse": []}})
        self.assertEqual(first["text"], "llm_proxy: ada: window hourly is 50% used (5 of 10 tokens), "
                                        f"past the 50% alert; resets {first['resets']}")
        self.assertEqual((full["used"], full["percent"]), (10, 100.0))
        midnight = llm_proxy.period_bounds(self.wall(), "day")[1]
        self.assertEqual((daily["used"], daily["capacity"], daily["resets"]),
                         (10, 20, llm_proxy._iso_time(midnight)))
        posts = json.dumps(self.hook.payloads()) + self.written()
        for secret in SECRETS:
            self.assertNotIn(secret, posts)
        self.assertEqual(self.hook.received[0]["headers"]["Content-Type"], "application/json")
        self.assertEqual(self.hook.received[0]["path"], f"/services/T000/B000/{HOOK_SECRET}")

    def test_a_refilling_window_is_told_again_after_it_was_below_a_calendar_one_each_period(self) -> None:
        self.chats(5)
        self.settle(5)
        self.clock.advance(3600)  # the hourly window is full again
        self.chats(5)
        self.settle(10)
        self.assertEqual(self.alerts(), [("hourly", 50), ("hourly", 50), ("daily", 50)])
        self.wall.advance(86400)  # the next day: the daily window starts a new period
        self.clock.advance(86400)
        self.chats(10)
        self.settle(20)
        self.assertEqual(self.alerts()[3:], [("hourly", 50), ("hourly", 100), ("daily", 50)])

    def test_a_refilled_window_seen_below_only_by_housekeeping_is_told_again(self) -> None:
        self.use_one_window(cost_mode="estimate")
        self.chat(content="hi", max_tokens=58)  # 60 of 100 in one request
        self.settle(1)
        self.clock.advance(3600)  # full again, and no request sees it so
        self.proxy.tidy()  # housekeeping does
        self.chat(content="hi", max_tokens=58)  # from empty to past 50% again in one request
        self.settle(2)
        self.assertEqual(self.alerts(), [("0", 50), ("0", 50)])

    def test_a_restart_does_not_tell_a_crossing_again(self) -> None:
        self.start_proxy(**dict(self.config_overrides, state_file=self.state_path))
        self.chats(5)
        self.settle(5)
        self.assertEqual(self.alerts(), [("hourly", 50)])
        self.start_proxy(**dict(self.config_overrides, state_file=self.state_path))
        self.chats(1)  # 60%: the same crossing
        self.settle(6)
        self.assertEqual(self.alerts(), [("hourly", 50)])

    def test_an_end_user_is_named_and_cannot_ping_the_channel(self) -> None:
        user = "<!channel> @here kim"
        self.chats(2, key=APP_KEY, user=user)
        self.settle(2)
        self.assertEqual(self.alerts(), [("0", 50), ("0", 100)])  # an unnamed window by its place
        alert = self.hook.payloads()[1]
        self.assertEqual((alert["key"], alert["user"]), ("class", user))
        self.assertIn("class / user &lt;!channel&gt; @\u200bhere kim: window 0 is 100% used", alert["text"])
        self.assertNotIn("<!", alert["text"])

    def test_a_window_that_refuses_a_request_short_of_empty_counts_as_full(self) -> None:
        self.use_one_window(cost_mode="estimate")
        self.chats(3, content="hi", max_tokens=30)  # 32 each (the prompt is 2): 96 used
        self.settle(3)
        self.assertEqual(self.alerts(), [("0", 50)])
        self.assertIn("limit reached", self.chat(content="hi", max_tokens=30).body.decode())
        self.settle(4)
        self.assertEqual(self.alerts(), [("0", 50), ("0", 100)])
        self.assertEqual(self.hook.payloads()[1]["percent"], 96.0)

    def test_a_slow_hook_never_delays_a_request(self) -> None:
        self.hook.hold = True
        started = time.monotonic()
        self.chats(13)
        elapsed = time.monotonic() - started
        self.assertTrue(self.hook.held.wait(WAIT))
        self.assertLess(elapsed, WAIT / 2, "requests waited for the webhook")
        self.assertEqual(self.hook.received, [])  # the first alert is still being posted
        self.hook.release.set()
        self.settle(13)
        self.assertEqual(len(self.alerts()), 3)

    def test_without_a_webhook_nothing_is_watched(self) -> None:
        self.start_proxy(keys_file=self.keys_path)
        self.assertIsNone(self.proxy.alerts)
        self.chats(10)
        self.settle(10)
        self.assertEqual(self.hook.received, [])


class MarkTests(unittest.TestCase):
    """When a crossing is new, without a server: the rules, one by one."""

    def test_refilling_windows_rearm_below_calendar_windows_per_period(self) -> None:
        watch = llm_proxy.AlertWatch((80,), sender=None)  # (crossed() sends nothing)
        refilling, calendar = ("key:a", "hourly", 80), ("key:a", "daily", 80)
        self.assertEqual([watch.crossed(refilling, above, None) for above in (True, True, False, True)],
                         [True, False, False, True])
        day_one, day_two = 1_800_000_000.0, 1_800_086_400.0
        self.assertEqual([watch.crossed(calendar, True, day_one), watch.crossed(calendar, False, day_one),
                          watch.crossed(calendar, True, day_one), watch.crossed(calendar, True, day_two)],
                         [True, False, False, True])
        restored = llm_proxy.AlertWatch((80,), sender=None)
        restored.load(json.loads(json.dumps(watch.dump())))
        self.assertFalse(restored.crossed(refilling, True, None))
        self.assertFalse(restored.crossed(calendar, True, day_two))
        with self.assertRaises(ValueError):
            restored.load([["key:a", "hourly", 80, "yes"]])


class SenderTests(ProxyTestCase):
    """The webhook's thread: retries, one log line per outage, a bounded queue."""

    def setUp(self) -> None:
        self.hook = FakeHook()
        serve(self.hook)
        self.senders: list[llm_proxy.AlertSender] = []
        super().setUp()

    def tearDown(self) -> None:
        self.hook.release.set()
        for sender in self.senders:
            sender.close()
        self.stop(self.hook)
        super().tearDown()

    def sender(self, url: str | None = None, **options: object) -> llm_proxy.AlertSender:
        options = dict({"timeout": WAIT, "backoff": (0.01, 0.01, 0.01)}, **options)
        sender = llm_proxy.AlertSender(url or self.hook.url(), **options)
        self.senders.append(sender)
        return sender

    def warnings(self) -> list[str]:
        return [line for line in self.log.lines if "alert webhook" in line]

    def test_a_failing_hook_is_retried_and_logged_once_per_outage(self) -> None:
        sender = self.sender()
        self.hook.statuses = [500, 503, 429]
        sender.send({"text": "one"})
        self.wait_for(lambda: sender.drained)
        self.assertEqual([p["status"] for p in self.hook.received], [500, 503, 429, 200])
        self.assertEqual(self.warnings(), [
            f"alert webhook http://127.0.0.1:{self.hook.server_address[1]}/... is failing (HTTP 500); "
            "alerts are retried 3 times; not logged again until it works",
            f"alert webhook http://127.0.0.1:{self.hook.server_address[1]}/... works again "
            "(0 alerts lost meanwhile)"])
        self.hook.statuses = [500] * 8  # a second outage: two alerts lost, one line
        sender.send({"text": "two"})
        sender.send({"text": "three"})
        self.wait_for(lambda: sender.drained)
        self.assertEqual(len(self.warnings()), 3)
        sender.send({"text": "four"})
        self.wait_for(lambda: sender.drained)
        self.assertEqual(self.hook.payloads()[-1], {"text": "four"})
        self.assertIn("works again (2 alerts lost meanwhile)", self.warnings()[-1])
        self.assertEqual((sender.sent, sender.lost), (2, 2))
        self.assertNotIn(HOOK_SECRET, "\n".join(self.log.lines))

    def test_a_refusal_is_not_retried_and_an_unreachable_hook_says_why(self) -> None:
        sender = self.sender()
        self.hook.statuses = [404]
        sender.send({"text": "one"})
        self.wait_for(lambda: sender.drained)
        self.assertEqual(len(self.hook.received), 1)
        self.assertIn("is failing (HTTP 404)", self.warnings()[0])
        closed = self.sender(f"http://127.0.0.1:{free_port()}/{HOOK_SECRET}")
        closed.send({"text": "two"})
        self.wait_for(lambda: closed.drained)
        self.assertIn("is failing (connection refused)", self.warnings()[-1])
        self.assertEqual(closed.lost, 1)
        self.assertNotIn(HOOK_SECRET, "\n".join(self.log.lines))

    def test_the_queue_is_bounded_and_sending_never_waits(self) -> None:
        self.hook.hold = True
        sender = self.sender()
        sender.send({"n": 0})
        self.assertTrue(self.hook.held.wait(WAIT))  # the thread is stuck posting the first one
        started = time.monotonic()
        for n in range(1, 151):
            sender.send({"n": n})
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(sender.lost, 150 - llm_proxy.ALERT_QUEUE)
        self.hook.release.set()
        self.wait_for(lambda: sender.drained)
        self.assertEqual([p["n"] for p in self.hook.payloads()], list(range(llm_proxy.ALERT_QUEUE + 1)))

    def test_closing_cuts_off_a_hook_that_does_not_answer(self) -> None:
        self.hook.hold = True
        sender = self.sender(backoff=llm_proxy.ALERT_BACKOFF)
        sender.send({"n": 0})
        self.assertTrue(self.hook.held.wait(WAIT))
        started = time.monotonic()
        sender.close()
        self.assertLess(time.monotonic() - started, WAIT / 2)


class SettingTests(unittest.TestCase):
    def test_thresholds_and_url_are_checked_and_the_url_never_repeated(self) -> None:
        config = llm_proxy.Config.from_env({"ALERT_THRESHOLDS": "100, 80,92.5",
                                            "ALERT_WEBHOOK_URL": "https://hooks.example/x"})
        self.assertEqual(config.alert_thresholds, (80, 92.5, 100))
        self.assertEqual(llm_proxy.Config().alert_thresholds, (80, 100))
        for text in ("0", "80,-1", "eighty", "nan", ","):
            with self.subTest(text), self.assertRaises(llm_proxy.ConfigError):
                llm_proxy.Config.from_env({"ALERT_THRESHOLDS": text})
        for url in (f"ftp://hooks.example/{HOOK_SECRET}", f"hooks.example/{HOOK_SECRET}",
                    f"https:///{HOOK_SECRET}", f"https://hooks.example/{HOOK_SECRET} x"):
            with self.subTest(url), self.assertRaises(llm_proxy.ConfigError) as caught:
                llm_proxy.Config.from_env({"ALERT_WEBHOOK_URL": url})
            self.assertNotIn(HOOK_SECRET, str(caught.exception))


if __name__ == "__main__":
    unittest.main()
