"""The owner's view in money (issue 20, item 8): cost, cached and reasoning tokens by model
in the usage history, across a restart; the CSV export; the cost in /metrics.

A call's ``cost`` is set at settlement by the price list (MODELS_FILE); here a stand-in
prices each answer from its reported usage, so that the history's sums can be checked
to the last digit.  Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import unittest
from unittest import mock

import llm_proxy
from test_llm_proxy import (ADMIN_KEY, CLIENT_KEY, OTHER_KEY, FakeUpstreamHandler, ProxyTestCase,
                            parse_exposition)

APP_KEY = "sk-app-classroom-5555"
# Per million tokens: input, cached input, output (reasoning tokens are output tokens).
PRICES = {"small": (0.40, 0.10, 1.60), "large": (2.00, 0.50, 8.00)}
# What the stand-in upstream reports for every answer.
PROMPT, CACHED, COMPLETION, REASONING = 1000, 400, 300, 120


def price(model: str, usage: llm_proxy.Usage) -> float:
    given, cached, output = PRICES[model]
    return ((usage.input - usage.cached_input) * given + usage.cached_input * cached
            + usage.output * output) / 1e6


ANSWER_COST = {model: price(model, llm_proxy.Usage(PROMPT, COMPLETION, CACHED, 0, REASONING))
               for model in PRICES}


class DetailedUsage(FakeUpstreamHandler):
    """Answers with OpenAI's usage details: cached prompt tokens and reasoning tokens."""

    def completion(self, payload: dict) -> dict:
        reply = super().completion(payload)
        reply["usage"] = {"prompt_tokens": PROMPT, "completion_tokens": COMPLETION,
                          "total_tokens": PROMPT + COMPLETION,
                          "prompt_tokens_details": {"cached_tokens": CACHED},
                          "completion_tokens_details": {"reasoning_tokens": REASONING}}
        return reply


def priced_close_charge(original):
    """Call.close_charge, then the call's cost from its reported usage, as the price list does."""

    def close_charge(call: llm_proxy.Call) -> None:
        original(call)
        usage = call.meter.reported if call.meter is not None else None
        if call.served and usage is not None and call.model in PRICES:
            call.cost = price(call.model, usage)
    return close_charge


class HistoryTestCase(ProxyTestCase):
    upstream_handler = DetailedUsage

    def setUp(self) -> None:
        patcher = mock.patch.object(llm_proxy.Call, "close_charge",
                                    priced_close_charge(llm_proxy.Call.close_charge))
        patcher.start()
        self.addCleanup(patcher.stop)
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.directory = directory.name
        self.keys_path = os.path.join(self.directory, "keys.json")
        self.state_path = os.path.join(self.directory, "state.json")
        self.write_keys()
        self.config_overrides = {"admin_key": ADMIN_KEY, "keys_file": self.keys_path,
                                 "state_file": self.state_path}
        super().setUp()

    def write_keys(self, ada: str = "ada") -> None:
        with open(self.keys_path, "w") as file:
            json.dump({CLIENT_KEY: {"name": ada, "max_tokens": 10 ** 9},
                       OTHER_KEY: {"name": "bob", "max_tokens": 10 ** 9},
                       APP_KEY: {"name": "class", "max_tokens": 10 ** 9, "users": {
                           "from": "user_field", "required": False, "max_tokens": 10 ** 9}}}, file)

    def restart(self) -> None:
        self.start_proxy(**self.config_overrides)  # saves at stop, restores at start

    def admin(self, path: str, key: str | None = ADMIN_KEY):
        return self.request("GET", path, key=key)

    def keys(self) -> dict:
        return {entry["name"]: entry for entry in self.admin("/admin/api/usage").json()["keys"]}

    def csv_rows(self, query: str = "") -> list[dict]:
        response = self.admin("/admin/api/usage.csv" + query)
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.headers["Content-Type"], "text/csv; charset=utf-8")
        return list(csv.DictReader(io.StringIO(response.body.decode("utf-8"))))

    def next_day(self) -> None:
        self.wall.advance(86400)
        self.clock.advance(86400)


class CostByModelTests(HistoryTestCase):
    def test_cost_cached_and_reasoning_tokens_by_model_survive_a_restart(self) -> None:
        for model in ("small", "small", "large"):
            self.assertEqual(self.chat(model=model).status, 200)
        self.assertEqual(self.chat(model="small", stream=True, stream_options={"include_usage": True}).status, 200)
        self.logged(4)
        streamed = price("small", llm_proxy.Usage(3, 4))  # the fake's stream reports 3 + 4 tokens
        expected = 2 * ANSWER_COST["small"] + streamed + ANSWER_COST["large"]
        for moment in ("before", "after"):
            with self.subTest(moment):
                ada = self.keys()["ada"]
                for period in ("today", "last_7_days", "last_30_days", "all_time"):
                    usage = ada["usage"][period]
                    self.assertAlmostEqual(usage["cost"], expected, places=12)
                    small = usage["by_model"]["small"]
                    self.assertEqual((small["requests"], small["served"]), (3, 3))
                    self.assertAlmostEqual(small["cost"], 2 * ANSWER_COST["small"] + streamed, places=12)
                    self.assertEqual(usage["by_model"]["large"]["cached_tokens"], CACHED)
                    self.assertEqual(usage["by_model"]["large"]["reasoning_tokens"], REASONING)
                self.assertEqual(ada["usage"]["today"]["completion_tokens"], 3 * COMPLETION + 4)
                today = ada["daily"][-1]
                self.assertEqual(set(today["by_model"]), {"small", "large"})
                self.assertAlmostEqual(today["cost"], expected, places=12)
                self.assertEqual(ada["daily"][-2]["by_model"], {})
            self.restart()

    def test_an_older_state_file_loads_under_other_and_keeps_counting(self) -> None:
        self.stop(self.proxy)
        self.proxy = None
        identity = "key:" + llm_proxy.key_digest(CLIENT_KEY)
        today = llm_proxy.local_day(self.wall())
        with open(self.state_path, "w") as file:  # as the proxy saved it before models and cost
            json.dump({"version": 1, "saved_at": self.wall(), "buckets": {}, "stored_answers": {},
                       "usage": {identity: {"key": "ada", "user": None, "last_seen": self.wall(),
                                            "days": {today: [2, 2, 0, 0, 0, 30, 40, 9]},
                                            "total": [5, 4, 1, 0, 0, 60, 80, 20]}}}, file)
        self.restart()
        self.assertNotIn("unreadable", self.written())
        self.chat(model="small")
        self.logged(1)
        usage = self.keys()["ada"]["usage"]
        self.assertEqual(usage["today"]["requests"], 3)
        self.assertEqual(usage["today"]["by_model"]["_other"]["prompt_tokens"], 30)
        self.assertEqual(usage["today"]["by_model"]["_other"]["cost"], 0)
        self.assertEqual(usage["all_time"]["requests"], 6)
        self.assertEqual(usage["all_time"]["by_model"]["small"]["requests"], 1)


class CsvExportTests(HistoryTestCase):
    def test_one_row_per_day_key_user_and_model_adding_up_to_the_report(self) -> None:
        day_one = llm_proxy.local_day(self.wall())
        self.chat(model="small")
        self.chat(model="large", key=OTHER_KEY)
        self.next_day()
        day_two = llm_proxy.local_day(self.wall())
        self.chat(model="small")
        self.chat(model="small", key=APP_KEY, user="kim")
        self.chat(model="small", key=APP_KEY, user="kim")
        self.chat(model="large", key=APP_KEY, user="lee")
        self.chat(model="large", key=APP_KEY)  # the app itself, without a user
        self.logged(7)
        rows = self.csv_rows()
        self.assertEqual(list(rows[0]), ["date", "key", "user", "model", "requests", "served", "limited",
                                         "prompt_tokens", "cached_tokens", "completion_tokens",
                                         "reasoning_tokens", "cost"])
        table = {(r["date"], r["key"], r["user"], r["model"]): (int(r["requests"]), float(r["cost"]))
                 for r in rows}
        self.assertEqual(table, {
            (day_one, "ada", "", "small"): (1, round(ANSWER_COST["small"], 9)),
            (day_one, "bob", "", "large"): (1, round(ANSWER_COST["large"], 9)),
            (day_two, "ada", "", "small"): (1, round(ANSWER_COST["small"], 9)),
            (day_two, "class", "kim", "small"): (2, round(2 * ANSWER_COST["small"], 9)),
            (day_two, "class", "lee", "large"): (1, round(ANSWER_COST["large"], 9)),
            (day_two, "class", "", "large"): (1, round(ANSWER_COST["large"], 9))})
        self.assertEqual({(r["prompt_tokens"], r["cached_tokens"], r["reasoning_tokens"])
                          for r in rows if r["requests"] == "1"}, {(str(PROMPT), str(CACHED), str(REASONING))})
        self.assertEqual([r["date"] for r in rows], sorted(r["date"] for r in rows))
        report = self.keys()
        for name in ("ada", "bob", "class"):  # no request in two rows: the app's own row is what is left
            self.assertAlmostEqual(sum(float(r["cost"]) for r in rows if r["key"] == name),
                                   report[name]["usage"]["all_time"]["cost"], places=8)
            self.assertEqual(sum(int(r["requests"]) for r in rows if r["key"] == name),
                             report[name]["usage"]["all_time"]["requests"])
        only = self.csv_rows(f"?from={day_one}&to={day_one}")
        self.assertEqual({r["date"] for r in only}, {day_one})
        self.assertEqual(len(only), 2)
        self.assertEqual([r["date"] for r in self.csv_rows(f"?from={day_two}")], [day_two] * 4)
        self.restart()
        self.assertEqual(len(self.csv_rows()), 6)

    def test_names_that_a_spreadsheet_would_run_are_escaped(self) -> None:
        self.write_keys(ada="=cmd|' /C calc'!A0")
        self.proxy.request_reload()
        self.wait_for(lambda: "=cmd" in self.admin("/admin/api/usage").body.decode())
        for user in ("=HYPERLINK(\"http://x\",\"y\")", "+1", "-2", "@SUM(1)", "plain"):
            self.assertEqual(self.chat(model="small", key=APP_KEY, user=user).status, 200)
        self.assertEqual(self.chat(model="=2+3").status, 200)  # a model is a client's word too
        self.logged(6)
        rows = self.csv_rows()
        self.assertEqual({r["user"] for r in rows if r["key"] == "class"},
                         {"'=HYPERLINK(\"http://x\",\"y\")", "'+1", "'-2", "'@SUM(1)", "plain"})
        self.assertEqual({(r["key"], r["model"]) for r in rows if r["user"] == ""},
                         {("'=cmd|' /C calc'!A0", "'=2+3")})
        for row in rows:
            for column in ("requests", "cost"):
                float(row[column])  # numbers stay numbers

    def test_bad_dates_and_queries_are_a_400_and_the_admin_key_is_needed(self) -> None:
        for query in ("?from=2026-13-01", "?to=yesterday", "?from=20261201", "?from=2026-1-01",
                      "?from=2026-12-02&to=2026-12-01", "?form=2026-12-01", "?from=2026-12-01&from=2026-12-02",
                      "?from=%00", "?from", "?=&&"):
            with self.subTest(query):
                response = self.admin("/admin/api/usage.csv" + query)
                self.assert_openai_error(response, 400, "invalid_request_error")
        self.assert_openai_error(self.admin("/admin/api/usage.csv", key=CLIENT_KEY), 401)
        self.assert_openai_error(self.admin("/admin/api/usage.csv", key=None), 401)
        self.assertEqual(self.request("POST", "/admin/api/usage.csv", {}, key=ADMIN_KEY).status, 405)
        self.start_proxy(keys_file=self.keys_path)  # without ADMIN_KEY the route does not exist
        self.assertEqual(self.admin("/admin/api/usage.csv").status, 404)

    def test_an_empty_history_is_a_header_row(self) -> None:
        response = self.admin("/admin/api/usage.csv?from=2020-01-01&to=2020-01-31")
        self.assertEqual(response.body, b"date,key,user,model,requests,served,limited,prompt_tokens,"
                                        b"cached_tokens,completion_tokens,reasoning_tokens,cost\r\n")
        self.assertEqual(response.headers["Content-Disposition"], 'attachment; filename="usage.csv"')


class CostMetricTests(HistoryTestCase):
    def test_cost_total_by_key_and_model_beside_the_families_as_they_were(self) -> None:
        for key, model in ((CLIENT_KEY, "small"), (CLIENT_KEY, "large"), (CLIENT_KEY, "large"),
                           (OTHER_KEY, "small")):
            self.chat(model=model, key=key)
        self.chat(model="small", key=APP_KEY, user="kim")
        self.chat(model="unpriced")
        self.logged(6)
        families = parse_exposition(self.admin("/metrics").body.decode())
        self.assertEqual({name: f["type"] for name, f in families.items()}, {
            "llm_proxy_requests_total": "counter", "llm_proxy_tokens_total": "counter",
            "llm_proxy_cost_total": "counter",
            "llm_proxy_bucket_tokens": "gauge", "llm_proxy_in_flight": "gauge",
            "llm_proxy_queued": "gauge", "llm_proxy_upstream_up": "gauge",
            "llm_proxy_request_duration_seconds": "histogram",
            "llm_proxy_time_to_first_byte_seconds": "histogram"})
        cost = {(labels["key"], labels["model"]): value
                for _, labels, value in families["llm_proxy_cost_total"]["samples"]}
        self.assertEqual(set(cost), {("ada", "small"), ("ada", "large"), ("bob", "small"), ("class", "small")})
        self.assertAlmostEqual(cost[("ada", "large")], 2 * ANSWER_COST["large"], places=12)
        self.assertAlmostEqual(cost[("class", "small")], ANSWER_COST["small"], places=12)
        self.assertEqual({tuple(sorted(labels)) for _, labels, _ in families["llm_proxy_tokens_total"]["samples"]},
                         {("key", "type"), ("key", "type", "user")}, "the tokens family is as it was")


class BoundsTests(unittest.TestCase):
    """Memory stays bounded however many model names clients send."""

    def test_models_past_the_cap_count_as_other_and_made_up_names_take_no_place(self) -> None:
        book = llm_proxy.UsageBook()
        served, rejected = llm_proxy.OUTCOME_COLUMNS["served"], llm_proxy.OUTCOME_COLUMNS["rejected"]
        for n in range(50):  # refused names never served: no place taken
            book.record("key:a", "ada", None, "2026-12-01", 0.0, rejected, llm_proxy.NO_AMOUNTS,
                        f"made-up-{n}", names_model=False)
        cap = llm_proxy.MAX_MODELS_PER_CALLER
        labels = [book.record("key:a", "ada", None, "2026-12-01", 0.0, served, llm_proxy.NO_AMOUNTS,
                              f"model-{n}") for n in range(cap + 3)]
        self.assertEqual(labels, [f"model-{n}" for n in range(cap)] + ["_other"] * 3)
        ledger = book.get("key:a")
        self.assertEqual(set(ledger.models), {f"model-{n}" for n in range(cap)} | {"_other"})
        self.assertEqual(ledger.models["_other"][0], 53)
        metrics = llm_proxy.Metrics()
        for n in range(cap + 5):
            metrics.add_cost("ada", f"model-{n}", 0.5)
        self.assertEqual(len(metrics.cost["ada"]), cap + 1)
        self.assertEqual(metrics.cost["ada"]["_other"], 2.5)

    def test_users_past_the_cap_are_their_apps_other_user(self) -> None:
        book = llm_proxy.UsageBook(max_identities=2)
        served = llm_proxy.OUTCOME_COLUMNS["served"]
        for user in ("u1", "u2", "u3"):
            book.record("key:app", "class", None, "2026-12-01", 0.0, served, llm_proxy.NO_AMOUNTS, "m")
            book.record(f"key:app/user:{user}", "class", user, "2026-12-01", 0.0, served,
                        llm_proxy.NO_AMOUNTS, "m")
        rows = book.rows("2026-12-01", "2026-12-01", {})
        self.assertEqual([(key, user, counts[0]) for _, key, user, _, counts in rows],
                         [("class", "_other", 2), ("class", "u1", 1)])


if __name__ == "__main__":
    unittest.main()
