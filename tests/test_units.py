"""Units as objects, and usage in the parts a price needs (issue 19).

A window counts in a unit (``requests``, ``tokens``, or the cost mode's own); each unit
says what a call is charged before it is forwarded and what that becomes once the
answer is in.  Every API's usage arrives as a ``Usage`` with its parts: input (cached
and cache-written parts included), output (reasoning included).  Run by
``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import json
import os
import unittest

import llm_proxy
from llm_proxy import BucketSpec, Config, Meter, Usage
from test_llm_proxy import CLIENT_KEY, ProxyTestCase, write_keys_file

# What each API reports, in its own words (OpenAI and Anthropic references; llama.cpp's and
# Ollama's answers), and the parts the proxy must read from it.
REPORTS = [
    ("chat", {"usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
                        "prompt_tokens_details": {"cached_tokens": 100},
                        "completion_tokens_details": {"reasoning_tokens": 12}}},
     Usage(120, 30, cached_input=100, reasoning=12)),
    ("text", {"usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}, Usage(5, 7)),
    ("responses", {"usage": {"input_tokens": 26, "output_tokens": 3, "total_tokens": 29,
                             "input_tokens_details": {"cached_tokens": 21},
                             "output_tokens_details": {"reasoning_tokens": 2}}},
     Usage(26, 3, cached_input=21, reasoning=2)),
    ("messages", {"usage": {"input_tokens": 5, "cache_read_input_tokens": 21,
                            "cache_creation_input_tokens": 4, "output_tokens": 9}},
     Usage(30, 9, cached_input=21, cache_write=4)),
    ("ollama", {"prompt_eval_count": 11, "eval_count": 6}, Usage(11, 6)),
]


def dialect_named(name: str) -> llm_proxy.Dialect:
    return next(dialect for dialect in llm_proxy.DIALECTS if dialect.name == name)


class UsagePartsTests(unittest.TestCase):
    def test_every_api_reports_its_parts(self) -> None:
        for name, reply, expected in REPORTS:
            with self.subTest(api=name):
                dialect = dialect_named(name)
                meter = Meter(dialect, 0)
                dialect.read_reply(reply, meter)
                self.assertEqual(meter.reported, expected)

    def test_parts_never_exceed_their_whole(self) -> None:
        meter = Meter(dialect_named("chat"), 0)
        dialect_named("chat").read_reply({"usage": {
            "prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 99},
            "completion_tokens_details": {"reasoning_tokens": 99}}}, meter)
        self.assertEqual(meter.reported, Usage(3, 1, cached_input=3, reasoning=1))

    def test_a_stream_cut_short_counts_its_text_as_output(self) -> None:
        meter = Meter(dialect_named("messages"), 40)
        meter.report({"input_tokens": 5, "cache_read_input_tokens": 21, "output_tokens": 0})
        meter.characters = 41  # 11 tokens streamed before the hang-up
        self.assertEqual(meter.used(finished=False), Usage(26, 11, cached_input=21))
        meter = Meter(dialect_named("chat"), 40)
        meter.characters = 8
        self.assertEqual(meter.used(finished=False), Usage(40, 2))


class UnitTests(unittest.TestCase):
    def call(self, mode: str, payload: dict, capacity: int = 10_000) -> llm_proxy.CallCost:
        config = Config(cost_mode=mode, response_reserve=100, request_cost=3)
        return llm_proxy.CallCost(llm_proxy.CHAT, payload, config, capacity)

    def test_each_mode_gives_each_window_its_unit(self) -> None:
        payload = {"messages": [{"role": "user", "content": "12345678"}], "max_tokens": 500}
        expected = {  # window unit -> (charged before forwarding, settles to the reported usage)
            "request": {"": (3, False), "requests": (1, False), "tokens": (4 + 500, False)},
            "estimate": {"": (504, False), "requests": (1, False), "tokens": (504, False)},
            "usage": {"": (4 + 100, True), "requests": (1, False), "tokens": (104, True)},
        }
        for mode_name, units in expected.items():
            mode = Config(cost_mode=mode_name, response_reserve=100, request_cost=3).mode
            call = self.call(mode_name, payload)
            for unit_name, (charged, settles) in units.items():
                with self.subTest(mode=mode_name, unit=unit_name):
                    unit = mode.unit_of(BucketSpec(1000, 1, 60.0, unit=unit_name))
                    self.assertEqual(unit.estimate(call), charged)
                    self.assertEqual(unit.settle(Usage(7, 8)) is not None, settles)

    def test_a_reservation_stays_within_the_capacity_unless_the_prompt_does_not(self) -> None:
        self.assertEqual(self.call("usage", {"messages": [], "max_tokens": 90}, capacity=50).reservation, 50)
        long_prompt = {"messages": [{"role": "user", "content": "x" * 400}]}
        self.assertEqual(self.call("usage", long_prompt, capacity=50).reservation, 102 + 100)  # "user x..."

    def test_a_charge_settles_each_window_as_its_unit_says(self) -> None:
        """Usage mode, a token window and a request window: the first settles, the second keeps 1."""
        store = llm_proxy.BucketStore(clock=lambda: 0.0, wall_clock=lambda: 0.0)
        specs = (BucketSpec(1000, 1, 60.0, "tokens", "tokens"), BucketSpec(10, 1, 60.0, "requests", "requests"))
        mode = Config(cost_mode="usage").mode
        admission = store.charge("k", specs, lambda spec: {"tokens": 300, "requests": 1}[spec.unit])
        charge = llm_proxy.Charge(store, (("k", specs),), admission, mode)
        charge.close(True, Usage(20, 30))
        self.assertEqual([level["tokens"] for level in store.snapshot("k", specs)], [950, 9])
        self.assertEqual((charge.state, charge.charged, charge.paid), ("settled", 300, 50))


class UnitChargeRecordTests(ProxyTestCase):
    """``tokens_charged`` in the usage report and ACCESS_LOG is the token window's charge, not the
    request window's."""

    def test_tokens_charged_is_the_token_windows_charge(self) -> None:
        path = write_keys_file(self, {CLIENT_KEY: {"name": "ada", "buckets": [
            {"name": "rpm", "unit": "requests", "max_tokens": 10, "refill_tokens": 10,
             "refill_interval_seconds": 60},
            {"name": "daily", "unit": "tokens", "max_tokens": 50000, "period": "day"}]}})
        log = os.path.join(os.path.dirname(path), "access.log")
        self.start_proxy(keys_file=path, cost_mode="estimate", access_log=log, admin_key="adm")
        payload = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 40}
        self.request("POST", "/v1/chat/completions", payload)
        self.request("POST", "/v1/messages/count_tokens", {"model": "m", "messages": []})
        self.logged(2)
        estimate = llm_proxy.estimate_tokens(payload, 256)
        report = self.request("GET", "/admin/api/usage", key="adm").json()
        today = report["keys"][0]["usage"]["today"]
        self.assertEqual((today["requests"], today["tokens_charged"]), (1, estimate))  # free call not counted
        self.stop(self.proxy)
        self.proxy = None
        with open(log) as file:  # (each is written after its answer: in either order)
            records = {record["path"]: record for record in map(json.loads, file)}
        self.assertEqual(records["/v1/chat/completions"]["tokens_charged"], estimate)
