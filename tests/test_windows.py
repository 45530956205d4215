"""Windows people mean (issue 11): calendar periods, request and token units, per-model windows.

The proxy's clocks are injected: the wall clock decides calendar boundaries in the
local time zone (TZ), so these tests set TZ and move the wall clock by hand.
Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
import unittest

import llm_proxy
from test_llm_proxy import CLIENT_KEY, ProxyTestCase, write_keys_file


def local(text: str) -> float:
    """Seconds since the epoch of a local time 'YYYY-MM-DD HH:MM:SS' (in the current TZ)."""
    return time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


class WindowTestCase(ProxyTestCase):
    zone = "Asia/Tokyo"  # not the machine's: boundaries must follow TZ, not UTC

    def setUp(self) -> None:
        previous = os.environ.get("TZ")
        os.environ["TZ"] = self.zone
        time.tzset()

        def restore() -> None:
            if previous is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = previous
            time.tzset()
        self.addCleanup(restore)
        super().setUp()

    def use_windows(self, windows: list, cost_mode: str = "request") -> None:
        self.keys_path = write_keys_file(self, {CLIENT_KEY: {"name": "ada", "buckets": windows}})
        self.start_proxy(keys_file=self.keys_path, cost_mode=cost_mode)

    def at(self, text: str) -> None:
        """Move both clocks to a local time (the monotonic one by the same amount)."""
        target = local(text)
        self.clock.advance(target - self.wall())
        self.wall.now = target

    def reply(self, **fields: object) -> str:
        return self.chat(**fields).json()["choices"][0]["message"]["content"]

    def quota(self) -> list:
        return self.request("GET", "/v1/quota").json()["buckets"]


class CalendarTests(WindowTestCase):
    def test_a_day_window_is_full_again_at_local_midnight(self) -> None:
        self.at("2026-11-24 23:58:00")
        self.use_windows([{"name": "daily", "max_tokens": 2, "period": "day"}])
        self.reply()
        self.reply()
        self.assertEqual(self.reply(), "daily limit reached, wait 2 min")
        self.assertEqual(self.quota()[0]["seconds_to_full"], 120.0)
        self.at("2026-11-24 23:59:59")
        self.assertIn("limit reached", self.reply())
        self.at("2026-11-25 00:00:00")
        self.assertEqual(self.quota()[0]["tokens"], 2)
        self.assertEqual(self.reply(), "hi from upstream")

    def test_a_week_window_starts_on_monday_and_a_month_on_the_first(self) -> None:
        self.at("2026-11-29 12:00:00")  # a Sunday
        self.use_windows([{"name": "weekly", "max_tokens": 1, "period": "week"},
                          {"name": "monthly", "max_tokens": 3, "period": "month"}])
        self.reply()
        self.assertEqual(self.reply(), "weekly limit reached, wait 12 h")  # until Monday 00:00
        self.at("2026-11-30 00:00:01")  # Monday: a new week, the same month
        self.reply()
        self.at("2026-12-01 00:00:00")
        self.assertEqual([b["tokens"] for b in self.quota()], [0, 3])
        self.at("2026-12-07 00:00:00")
        self.reply()
        self.assertEqual([b["tokens"] for b in self.quota()], [0, 2])

    def test_state_file_keeps_a_calendar_window_until_its_boundary(self) -> None:
        self.at("2026-11-24 10:00:00")
        self.keys_path = write_keys_file(self, {CLIENT_KEY: {"name": "ada", "buckets": [
            {"name": "daily", "max_tokens": 1, "period": "day"}]}})
        state = os.path.join(os.path.dirname(self.keys_path), "state.json")
        self.start_proxy(keys_file=self.keys_path, state_file=state)
        self.reply()
        self.start_proxy(keys_file=self.keys_path, state_file=state)
        self.at("2026-11-24 20:00:00")
        self.assertIn("daily limit reached", self.reply(max_tokens=5))
        self.at("2026-11-25 00:00:01")
        self.assertEqual(self.reply(), "hi from upstream")


class UnitTests(WindowTestCase):
    def test_a_request_window_beside_a_token_window(self) -> None:
        self.use_windows([{"name": "rpm", "unit": "requests", "max_tokens": 2, "refill_tokens": 2,
                           "refill_interval_seconds": 60},
                          {"name": "daily", "unit": "tokens", "max_tokens": 50, "period": "day"}],
                         cost_mode="usage")
        self.chat(headers={"X-Usage": "9"}, max_tokens=5)  # each reserves prompt + 5 tokens
        self.chat(headers={"X-Usage": "12"}, max_tokens=5)
        self.assertEqual([b["tokens"] for b in self.quota()], [0, 50 - 9 - 12])
        self.assertEqual(self.reply(max_tokens=5), "rpm limit reached, wait 1 min")
        self.clock.advance(60)
        self.wall.advance(60)
        self.chat(headers={"X-Usage": "40"}, max_tokens=5)  # the token window goes into debt, the request one by 1
        self.assertEqual([b["tokens"] for b in self.quota()], [1, 50 - 9 - 12 - 40])
        self.assertIn("daily limit reached", self.reply(max_tokens=5))

    def test_request_mode_charges_a_token_window_the_estimate(self) -> None:
        self.use_windows([{"name": "daily", "unit": "tokens", "max_tokens": 1000, "period": "day"},
                          {"name": "requests", "max_tokens": 5, "refill_tokens": 5,
                           "refill_interval_seconds": 60}])
        payload = {"model": "client-model", "messages": [{"role": "user", "content": "hello"}],
                   "max_tokens": 20}
        self.request("POST", "/v1/chat/completions", payload)
        estimate = llm_proxy.estimate_tokens(payload, 256)
        self.assertEqual([b["tokens"] for b in self.quota()], [1000 - estimate, 4])


class ModelWindowTests(WindowTestCase):
    def test_a_window_for_some_models_counts_only_their_requests(self) -> None:
        self.use_windows([{"name": "big model", "max_tokens": 1, "refill_tokens": 1,
                           "refill_interval_seconds": 3600, "models": ["big"]},
                          {"name": "all", "max_tokens": 5, "refill_tokens": 5,
                           "refill_interval_seconds": 3600}])
        self.assertEqual(self.reply(model="big"), "hi from upstream")
        self.assertEqual(self.reply(model="big"), "big model limit reached, wait 60 min")
        self.assertEqual(self.reply(model="small"), "hi from upstream")
        self.assertEqual(self.reply(model="small"), "hi from upstream")
        self.assertEqual([b["tokens"] for b in self.quota()], [0, 2])

    def test_bad_windows_are_refused_at_load(self) -> None:
        config = llm_proxy.Config(upstream_url="http://127.0.0.1:9/v1")
        for window, message in (({"period": "year"}, "period"), ({"unit": "bytes"}, "unit"),
                                ({"models": "big"}, "models")):
            with self.subTest(window):
                with self.assertRaisesRegex(llm_proxy.ConfigError, message):
                    llm_proxy.parse_keys_file(json.dumps({"k": {"buckets": [window]}}), config)


class ModelWindowDebtTests(ProxyTestCase):
    """A model's window in debt (usage beyond its limit) does not block the other models."""

    def test_a_model_window_in_debt_does_not_block_other_models(self) -> None:
        path = write_keys_file(self, {CLIENT_KEY: {"name": "ada", "buckets": [
            {"name": "big model", "max_tokens": 20, "refill_tokens": 20,
             "refill_interval_seconds": 3600, "models": ["big"]},
            {"name": "all", "max_tokens": 1000, "refill_tokens": 1000,
             "refill_interval_seconds": 3600}]}})
        self.start_proxy(keys_file=path, cost_mode="usage")
        self.chat(model="big", max_tokens=5, headers={"X-Usage": "90"})  # 90 used: the big window in debt
        reply = self.chat(model="small", max_tokens=5).json()["choices"][0]["message"]["content"]
        self.assertEqual(reply, "hi from upstream")


class WindowIdentityTests(unittest.TestCase):
    """A level belongs to its window, not to a position in the policy's list of windows."""

    HOURLY = llm_proxy.BucketSpec(1000, 1000, 3600.0, name="hourly")
    BUDGET = llm_proxy.BucketSpec(10 ** 9, 0, 1e9, name="budget", unit="money", period="total")
    DAILY = llm_proxy.BucketSpec(5000, 5000, 86400.0)

    def store(self) -> llm_proxy.BucketStore:
        return llm_proxy.BucketStore(clock=lambda: 100.0, wall_clock=lambda: 1_000_000.0)

    def test_removing_or_adding_a_window_before_another_keeps_each_level(self) -> None:
        store = self.store()
        store.charge_all((("k", (self.HOURLY, self.BUDGET)),),
                         lambda spec: 990_000_000 if spec is self.BUDGET else 10)
        store.charge("k", (self.BUDGET,), 0)  # the owner removed the hourly window
        self.assertEqual(store.snapshot("k", (self.BUDGET,))[0]["tokens"], 0.01)  # (in the currency)
        store.charge("k", (self.DAILY, self.BUDGET), 0)  # and put a daily one in front
        levels = store.snapshot("k", (self.DAILY, self.BUDGET))
        self.assertEqual((levels[0]["tokens"], levels[1]["tokens"]), (5000, 0.01))

    def test_a_call_settled_with_its_old_windows_leaves_a_new_window_alone(self) -> None:
        store = self.store()
        old, new = (self.HOURLY,), (self.HOURLY, self.BUDGET)
        self.assertTrue(store.charge("k", old, 800).allowed)   # a call in flight ...
        store.charge_all((("k", new),), lambda spec: 900_000_000 if spec is self.BUDGET else 0)  # ... the
        # owner adds a budget, and it is spent
        store.credit("k", old, 300)                              # the first call settles, cheaper
        levels = store.snapshot("k", new)
        self.assertEqual(levels[0]["tokens"], 500)               # its own window got the refund
        self.assertAlmostEqual(levels[1]["tokens"], 0.1)         # the budget still spent

    def test_unnamed_windows_alike_are_told_apart_by_their_order(self) -> None:
        store = self.store()
        hour = llm_proxy.BucketSpec(100, 100, 3600.0)
        day = llm_proxy.BucketSpec(500, 500, 86400.0)
        store.charge("k", (hour, day), 50)
        self.assertEqual([level["tokens"] for level in store.snapshot("k", (hour, day))], [50, 450])

    def test_levels_saved_without_their_window_are_taken_by_position_once(self) -> None:
        store = self.store()
        store.load({"k": [[7, 1_000_000.0, 1000]]}, wall_clock=lambda: 1_000_000.0)  # an older file
        self.assertEqual(store.snapshot("k", (self.HOURLY,))[0]["tokens"], 7)
        saved = store.dump(wall_clock=lambda: 1_000_000.0)["k"][0]
        self.assertEqual(saved[3], ["hourly", "", None, 0])


class SpecHashTests(unittest.TestCase):
    def test_a_spec_from_another_process_hashes_as_its_equal_here(self) -> None:
        """A window spec works its hash out once; one pickled elsewhere, where strings hash
        otherwise, must not bring that process's hash along."""
        made = "import pickle, sys, llm_proxy; sys.stdout.buffer.write(pickle.dumps(llm_proxy.BucketSpec(" \
               "10, 1, 60.0, 'hourly', models=('m',))))"
        pickled = subprocess.run([sys.executable, "-c", made], capture_output=True, check=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 env=dict(os.environ, PYTHONHASHSEED="1")).stdout
        here = llm_proxy.BucketSpec(10, 1, 60.0, "hourly", models=("m",))
        spec = pickle.loads(pickled)
        self.assertEqual(spec, here)
        self.assertEqual(hash(spec), hash(here))
        self.assertEqual({here: "level"}[spec], "level")
