"""The owner's view (issue 11): admin key, usage history, Prometheus metrics, over real sockets,
and the ``keys`` command that edits the keys file the proxy serves from.

Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import unittest

import llm_proxy
from test_llm_proxy import (ADMIN_KEY, CLIENT_KEY, HERE, OTHER_KEY, WAIT, ProxyTestCase,
                            clean_environment, parse_exposition, write_keys_file)

APP_KEY = "sk-app-family-1234"


def sample(families: dict, name: str, **labels: str) -> float | None:
    family = families.get(name) or families[re.sub(r"_(bucket|sum|count)$", "", name)]
    for sample_name, sample_labels, value in family["samples"]:
        if sample_name == name and sample_labels == labels:
            return value
    return None


class OwnerTestCase(ProxyTestCase):
    def setUp(self) -> None:
        self.keys_path = write_keys_file(self, {CLIENT_KEY: {"name": "ada", "buckets": [
            {"name": "hourly", "max_tokens": 5, "refill_tokens": 5, "refill_interval_seconds": 3600},
            {"name": "daily", "max_tokens": 20, "refill_tokens": 20, "refill_interval_seconds": 86400}]},
            OTHER_KEY: {"max_tokens": 3},
            APP_KEY: {"name": "fam\"ily\\\n", "max_tokens": 50, "users": {
                "from": "user_field", "max_tokens": 2}}})
        self.directory = os.path.dirname(self.keys_path)
        self.config_overrides = {"admin_key": ADMIN_KEY, "keys_file": self.keys_path}
        super().setUp()

    def admin(self, path: str, key: str | None = ADMIN_KEY):
        return self.request("GET", path, key=key)


class AdminKeyTests(OwnerTestCase):
    def test_routes_exist_only_with_an_admin_key(self) -> None:
        self.start_proxy(keys_file=self.keys_path)
        for path in ("/admin", "/admin/api/usage", "/metrics"):
            with self.subTest(path):
                self.assertEqual(self.admin(path).status, 404)

    def test_client_keys_never_open_admin_routes_and_the_admin_key_is_no_client_key(self) -> None:
        for key in (CLIENT_KEY, OTHER_KEY, None, ADMIN_KEY + "x"):
            for path in ("/admin/api/usage", "/metrics"):
                with self.subTest(key=key, path=path):
                    self.assert_openai_error(self.admin(path, key), 401, "authentication_error")
        self.assert_openai_error(self.chat(key=ADMIN_KEY), 401)
        self.start_proxy(admin_key=ADMIN_KEY)  # open mode: any other key gets a bucket, not this one
        self.assert_openai_error(self.chat(key=ADMIN_KEY), 401)
        self.assertEqual(self.chat(key="anything-else").status, 200)
        written = self.written()
        self.assertNotIn(ADMIN_KEY, written)

    def test_the_page_loads_nothing_from_elsewhere(self) -> None:
        page = self.admin("/admin", key=None)
        self.assertEqual(page.status, 200)
        policy = page.headers["Content-Security-Policy"]
        self.assertIn("default-src 'none'", policy)
        self.assertIn("connect-src 'self'", policy)
        self.assertNotIn("unsafe-inline", policy)
        html = page.body.decode()
        self.assertIsNone(re.search(r"(src|href)=\"?(https?:)?//", html))
        self.assertNotIn(ADMIN_KEY, html)


class UsageReportTests(OwnerTestCase):
    def test_usage_per_key_and_user_with_outcomes_and_tokens(self) -> None:
        for _ in range(6):  # 5 served, then the hourly window is empty
            self.chat(headers={"X-Usage": "9"})
        self.chat(model=5)  # rejected: 400
        self.chat(key=APP_KEY, user="kid")
        self.request("GET", "/v1/quota")  # a quota check is no call to the model: not in the history
        self.logged(9)
        report = self.admin("/admin/api/usage").json()
        self.assertEqual(set(report), {"now", "currency", "upstream", "upstreams", "in_flight", "queued",
                                       "keys"})
        self.assertEqual(report["upstream"], {"url": self.upstream.url, "up": True, "last_error": None})
        keys = {entry["name"]: entry for entry in report["keys"]}
        ada = keys["ada"]
        counts = {"requests": 7, "served": 5, "limited": 1, "rejected": 1, "error": 0, "prompt_tokens": 15,
                  "completion_tokens": 30, "tokens_charged": 5, "cached_tokens": 0, "reasoning_tokens": 0,
                  "cost": 0}
        rejected = dict.fromkeys(counts, 0)  # a model that is no name is no model: counted as _other
        rejected.update(requests=1, rejected=1)
        served = {name: counts[name] - rejected[name] for name in counts}
        self.assertEqual(ada["usage"]["today"], dict(counts, by_model={"client-model": served,
                                                                       "_other": rejected}))
        self.assertEqual(ada["usage"]["all_time"]["requests"], 7)
        self.assertEqual([b["tokens"] for b in ada["buckets"]], [0, 15])
        self.assertEqual(len(ada["daily"]), 30)
        self.assertEqual(ada["daily"][-1]["served"], 5)
        self.assertTrue(ada["last_seen"].endswith("Z"))
        self.assertEqual(ada["enabled"], True)
        family = keys['fam"ily\\\n']
        self.assertEqual([(u["name"], u["usage"]["today"]["served"]) for u in family["users"]], [("kid", 1)])
        self.assertEqual(family["usage"]["today"]["served"], 1, "an app's history includes its users'")
        unnamed = keys[llm_proxy.key_digest(OTHER_KEY)[:12]]
        self.assertEqual(unnamed["usage"]["today"]["requests"], 0)
        for secret in (CLIENT_KEY, OTHER_KEY, APP_KEY, ADMIN_KEY):
            self.assertNotIn(secret, json.dumps(report))

    def test_history_survives_a_restart_and_counts_by_local_day(self) -> None:
        state = os.path.join(self.directory, "state.json")
        self.start_proxy(admin_key=ADMIN_KEY, keys_file=self.keys_path, state_file=state)
        self.chat()
        self.logged(1)
        self.wall.advance(86400)
        self.clock.advance(86400)
        self.chat()
        self.logged(2)
        self.start_proxy(admin_key=ADMIN_KEY, keys_file=self.keys_path, state_file=state)
        ada = {e["name"]: e for e in self.admin("/admin/api/usage").json()["keys"]}["ada"]
        self.assertEqual(ada["usage"]["today"]["served"], 1)
        self.assertEqual(ada["usage"]["last_7_days"]["served"], 2)
        self.assertEqual([d["served"] for d in ada["daily"][-2:]], [1, 1])

    def test_upstream_down_is_reported_without_details(self) -> None:
        self.start_proxy(admin_key=ADMIN_KEY, keys_file=self.keys_path, upstream_url="http://127.0.0.1:9/v1",
                         queue_timeout=0.05)
        self.chat()
        upstream = self.admin("/admin/api/usage").json()["upstream"]
        self.assertIs(upstream["up"], False)
        self.assertTrue(upstream["last_error"].startswith("502"))
        self.assertNotIn("Errno", upstream["last_error"])


class MetricsTests(OwnerTestCase):
    def test_families_parse_and_count(self) -> None:
        self.chat(headers={"X-Usage": "9"})
        self.chat(stream=True)
        self.chat(key=OTHER_KEY)
        self.chat(key=APP_KEY, user='ki"d')
        self.written("/ki\"d ")  # counted before its log line is written
        response = self.admin("/metrics")
        self.assertEqual(response.headers["Content-Type"].split(";")[0:2], ["text/plain", " version=0.0.4"])
        families = parse_exposition(response.body.decode())
        self.assertEqual({name: f["type"] for name, f in families.items()}, {
            "llm_proxy_requests_total": "counter", "llm_proxy_tokens_total": "counter",
            "llm_proxy_cost_total": "counter", "llm_proxy_bucket_tokens": "gauge", "llm_proxy_in_flight": "gauge",
            "llm_proxy_queued": "gauge", "llm_proxy_upstream_up": "gauge",
            "llm_proxy_request_duration_seconds": "histogram",
            "llm_proxy_time_to_first_byte_seconds": "histogram"})
        requests = "llm_proxy_requests_total"
        self.assertEqual(sample(families, requests, key="ada", endpoint="chat", outcome="served",
                                upstream="default"), 2)
        self.assertEqual(sample(families, requests, key="_other", endpoint="chat", outcome="served",
                                upstream="default"), 1)
        self.assertEqual(sample(families, requests, key='fam"ily\\\n', user='ki"d', endpoint="chat",
                                outcome="served", upstream="default"), 1)
        self.assertEqual(sample(families, "llm_proxy_tokens_total", key="ada", type="prompt"), 3)
        self.assertEqual(sample(families, "llm_proxy_tokens_total", key="ada", type="charged"), 2)
        self.assertEqual(sample(families, "llm_proxy_bucket_tokens", key="ada", window="hourly"), 3)
        self.assertEqual(sample(families, "llm_proxy_upstream_up", upstream="default"), 1)
        self.assertEqual(sample(families, "llm_proxy_request_duration_seconds_count", upstream="default"), 4)
        text = response.body.decode()
        for secret in (CLIENT_KEY, OTHER_KEY, APP_KEY, ADMIN_KEY):
            self.assertNotIn(secret, text)


class KeysCommandTests(ProxyTestCase):
    """``python3 llm_proxy.py keys ...`` against a keys file a running proxy serves from."""

    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.keys_path = os.path.join(directory.name, "keys.json")
        self.original = ('{\n    "%s": {"name": "ada",  "max_tokens": 5},\n'
                         '    "%s": {"name": "bob", "max_tokens": 2}\n}\n' % (CLIENT_KEY, OTHER_KEY))
        with open(self.keys_path, "w") as file:
            file.write(self.original)
        self.config_overrides = {"keys_file": self.keys_path}
        super().setUp()

    def keys(self, *args: str) -> subprocess.CompletedProcess:
        env = clean_environment()
        env["KEYS_FILE"] = self.keys_path
        return subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py"), "keys", *args],
                              env=env, capture_output=True, text=True, timeout=WAIT)

    def wait_until(self, condition) -> None:
        deadline = time.monotonic() + WAIT
        while not condition():
            self.assertLess(time.monotonic(), deadline, "the proxy never picked the change up")
            time.sleep(0.02)

    def test_add_prints_the_key_once_and_stores_only_its_digest(self) -> None:
        added = self.keys("add", "carol", "--max-tokens", "3", "--models", "m1,m2", "--expires", "2099-12-31")
        self.assertEqual(added.returncode, 0, added.stderr)
        key = added.stdout.strip().splitlines()[-1]
        self.assertRegex(key, r"^sk-[A-Za-z0-9_-]{32}$")
        with open(self.keys_path) as file:
            text = file.read()
        self.assertNotIn(key, text)
        self.assertIn("sha256:" + hashlib.sha256(key.encode()).hexdigest(), text)
        self.assertTrue(text.startswith(self.original[:-3]), "the other entries kept their formatting")
        started = time.monotonic()
        self.wait_until(lambda: self.chat(key=key, model="m1").status == 200)  # no restart
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertEqual(self.chat(key=key, model="other").status, 403)
        listing = self.keys("list").stdout
        self.assertIn("carol  enabled  3 ", listing)
        self.assertIn("expires 2099-12-31", listing)
        for secret in (key, CLIENT_KEY, OTHER_KEY):
            self.assertNotIn(secret, listing)

    def test_disable_enable_remove_and_expiry(self) -> None:
        self.assertEqual(self.keys("disable", "bob").returncode, 0)
        self.proxy.request_reload()
        self.wait_until(lambda: self.chat(key=OTHER_KEY).status == 401)
        error = self.chat(key=OTHER_KEY).json()["error"]
        self.assertEqual((error["code"], error["message"]), ("key_disabled", "This key is disabled."))
        self.assertEqual(self.keys("enable", "bob").returncode, 0)
        self.proxy.request_reload()
        self.wait_until(lambda: self.chat(key=OTHER_KEY).status == 200)
        self.assertEqual(self.keys("remove", "bob").returncode, 0)
        self.proxy.request_reload()
        self.wait_until(lambda: self.chat(key=OTHER_KEY).status == 401)
        self.assertEqual(self.chat(key=OTHER_KEY).json()["error"]["code"], "invalid_api_key")
        with open(self.keys_path) as file:
            self.assertEqual(json.load(file), {CLIENT_KEY: {"name": "ada", "max_tokens": 5}})
        missing = self.keys("remove", "nobody")
        self.assertEqual(missing.returncode, 2)
        self.assertIn("no key named 'nobody'", missing.stderr)
        day = llm_proxy.local_day(self.wall())  # the proxy's (injected) today
        dora = self.keys("add", "dora", "--expires", day).stdout.strip().splitlines()[-1]
        self.proxy.request_reload()
        self.wait_until(lambda: self.chat(key=dora).status == 200)  # works through its last day
        self.wall.advance(86400)
        error = self.chat(key=dora).json()["error"]
        self.assertEqual((error["code"], error["message"]), ("key_expired", f"This key expired on {day}."))
        self.assertEqual(self.keys("add", "ada").returncode, 2)  # names are unique


class KeysFileEditTests(unittest.TestCase):
    """``keys`` edits: parallel adds all land, a symlink and the file's mode are kept, no JWT
    secret is needed, and entries are found as json reads them."""

    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.directory = directory.name
        self.path = os.path.join(directory.name, "keys.json")

    def keys(self, *args: str, **env: str) -> subprocess.Popen:
        full = clean_environment()
        full.update(KEYS_FILE=self.path, **env)
        return subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py"), "keys", *args],
                                env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def test_parallel_adds_all_land(self) -> None:
        with open(self.path, "w") as file:
            file.write("{}\n")
        processes = [self.keys("add", f"user{n}") for n in range(8)]
        for process in processes:
            process.communicate(timeout=WAIT)
            self.assertEqual(process.returncode, 0)
        with open(self.path) as file:
            names = sorted(entry["name"] for entry in json.load(file).values())
        self.assertEqual(names, sorted(f"user{n}" for n in range(8)))

    def test_an_edit_keeps_mode_and_follows_a_symlink(self) -> None:
        real = os.path.join(self.directory, "real.json")
        with open(real, "w") as file:
            file.write('{"k1": {"name": "a"}}\n')
        os.chmod(real, 0o644)
        os.symlink(real, self.path)
        process = self.keys("add", "b")
        process.communicate(timeout=WAIT)
        self.assertEqual(process.returncode, 0)
        self.assertTrue(os.path.islink(self.path))
        self.assertEqual(os.stat(real).st_mode & 0o777, 0o644)

    def test_editing_needs_no_jwt_secret_in_this_shell(self) -> None:
        self.path = write_keys_file(self, {"app": {"name": "app", "users": {
            "from": "jwt", "secret_env": "SECRET_ELSEWHERE"}}, "k2": {"name": "ada"}})
        process = self.keys("disable", "ada")
        _, err = process.communicate(timeout=WAIT)
        self.assertEqual(process.returncode, 0, err)

    def test_entries_are_found_as_json_reads_them(self) -> None:
        """Keys with escapes, and the errors json gives for keys it refuses."""
        text = '{ "a\\u00e9\\"x" : {"n": [1, 2]},\n  "\\ud800": 1 }'
        spans = llm_proxy.entry_spans(text)
        self.assertEqual([key for key, _, _, _ in spans], list(json.loads(text)))
        self.assertEqual([text[at] for _, at, _, _ in spans], ['"', '"'])
        self.assertEqual([json.loads(text[start:end]) for _, _, start, end in spans],
                         list(json.loads(text).values()))
        for refused in ('{"a\\x": 1}', '{"a', '{"a\n": 1}'):
            with self.subTest(refused), self.assertRaises(json.JSONDecodeError):
                llm_proxy.entry_spans(refused)
