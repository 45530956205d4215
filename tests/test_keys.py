"""Keys for a whole class (issue 20, items 6 and 7): ``keys import|add|set|topup|rotate|list``
and the same over HTTP at /admin/api/keys.

The command runs in this process (``llm_proxy.main``) where only its files matter, and
as a real process where its output does (a closed pipe); the proxy is the real one
over loopback sockets, with injected clocks.  Run by ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import unittest
from unittest import mock

import llm_proxy
from llm_proxy import BucketSpec, BucketStore, Config, ConfigError
from test_llm_proxy import (ADMIN_KEY, CLIENT_KEY, HERE, OTHER_KEY, WAIT, FakeClock, ProxyTestCase,
                            clean_environment, tokens_of, write_keys_file)


def proxy_takes_money() -> bool:
    """Whether the proxy reads money windows and ``"period": "total"`` (items 1-3 of the issue,
    built beside this): the budget tests below wait for it."""
    try:
        llm_proxy.parse_keys_file(json.dumps({"k": {"buckets": [llm_proxy.budget_window(1.0)]}}), Config())
    except ConfigError:
        return False
    return True


NEEDS_MONEY = unittest.skipUnless(proxy_takes_money(), "the proxy does not read money windows yet")


def keys_command(*args: str, path: str) -> tuple[int, str, str]:
    """``llm_proxy keys ARGS`` in this process: its status, what it printed and what it complained."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = llm_proxy.main(["keys", *args], {"KEYS_FILE": path})
    return status, out.getvalue(), err.getvalue()


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def stored(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class FileTestCase(unittest.TestCase):
    """A directory of the test's own, with a keys file holding one hand-written entry."""

    ORIGINAL = {CLIENT_KEY: {"name": "ada", "max_tokens": 5}}

    def setUp(self) -> None:
        self.keys_path = write_keys_file(self, self.ORIGINAL)
        self.directory = os.path.dirname(self.keys_path)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def roster(self, data: bytes, name: str = "roster.csv") -> str:
        path = self.path(name)
        with open(path, "wb") as file:
            file.write(data)
        return path

    def keys(self, *args: str) -> tuple[int, str, str]:
        return keys_command(*args, path=self.keys_path)


# --------------------------------------------------------------------------
# keys import
# --------------------------------------------------------------------------

# A roster as spreadsheets save it: (what, the file's bytes, Bo's email); each holds Bo and Cy.
ROSTERS = [
    ("plain", b"name,email\nBo,bo@uni.example\nCy,\n", "bo@uni.example"),
    ("CRLF", b"name,email\r\nBo,bo@uni.example\r\nCy,\r\n", "bo@uni.example"),
    ("BOM and CRLF (Excel's CSV UTF-8)", b"\xef\xbb\xbfname,email\r\nBo,bo@uni.example\r\nCy,\r\n",
     "bo@uni.example"),
    ("spaces around values and header", b" Name , Email \n  Bo ,  bo@uni.example \n Cy \n", "bo@uni.example"),
    ("blank lines, quotes, other columns", b'id,email,name\n\n7,"bo@uni.example","Bo"\n\n8,,"Cy"\n,,\n',
     "bo@uni.example"),
    ("no email column, a CR ending the last line", b"name\r\nBo\r\nCy\r", None),
]

# A roster that is refused: (what, its bytes, what the message says); nothing is written.
REFUSED_ROSTERS = [
    ("a control character", b"name\nBo\nC\x07y\n", "line 3: the name 'C\\x07y' contains a control character"),
    ("a carriage return inside a name", b'name\r\n"B\ro"\r\nCy\r\n', "line 2: the name 'B\\ro' contains"),
    ("a tab", b"name\nB\to\n", "line 2: the name 'B\\to' contains a control character"),
    ("a name twice", b"name\nBo\nCy\n Bo \n", "line 4: the name 'Bo' is on line 2 already"),
    ("a name the keys file has", b"name\nBo\nada\n", "line 3: a key named 'ada' exists already"),
    ("an empty name", b"name,email\nBo,\n,x@y\n", "line 3: the name is empty"),
    ("no name column", b"student,email\nBo,\n", "line 1: no 'name' column"),
    ("not UTF-8", b"name\nB\xf6\n", "not UTF-8"),
    ("a control character in an email", b"name,email\nBo,b\x1bo@x\n", "line 2: the email"),
]


class RosterImportTests(FileTestCase):
    def test_a_roster_saved_by_any_spreadsheet_imports_in_one_edit(self) -> None:
        for what, data, bos_email in ROSTERS:
            with self.subTest(what):
                self.keys_path = write_keys_file(self, self.ORIGINAL)
                out = self.path("class-keys.csv")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(out)
                status, printed, complained = self.keys("import", self.roster(data), "--max-tokens", "100",
                                                        "--models", "m1,m2", "--out", out)
                self.assertEqual((status, complained), (0, ""))
                self.assertIn("imported 2 keys", printed)
                with open(out, newline="") as file:
                    lines = file.read().split("\n")
                self.assertEqual(lines[0], "name,key")
                self.assertEqual(lines[-1], "")
                listed = dict(line.split(",") for line in lines[1:-1])
                self.assertEqual(list(listed), ["Bo", "Cy"])
                entries = read_json(self.keys_path)
                self.assertEqual(entries[CLIENT_KEY], self.ORIGINAL[CLIENT_KEY])
                for name, email in (("Bo", bos_email), ("Cy", None)):
                    entry = entries[stored(listed[name])]
                    expected = {"name": name, "id": entry["id"], "max_tokens": 100, "models": ["m1", "m2"]}
                    if email:
                        expected["email"] = email
                    self.assertEqual(entry, expected)
                    self.assertRegex(entry["id"], r"^[0-9a-f]{16}$")
                    self.assertNotIn(listed[name], read_bytes(self.keys_path).decode())

    def test_a_refused_roster_writes_nothing_and_names_the_line(self) -> None:
        before = read_bytes(self.keys_path)
        out = self.path("class-keys.csv")
        for what, data, message in REFUSED_ROSTERS:
            with self.subTest(what):
                status, printed, complained = self.keys("import", self.roster(data), "--out", out)
                self.assertEqual(status, 2)
                self.assertIn(message, complained)
                self.assertEqual(complained.count("\n"), 1, "one line, no traceback")
                self.assertEqual(read_bytes(self.keys_path), before)
                self.assertFalse(os.path.exists(out))

    def test_an_existing_key_list_is_never_overwritten(self) -> None:
        out = self.path("class-keys.csv")
        with open(out, "w") as file:
            file.write("name,key\nZed,sk-still-in-use\n")
        before = read_bytes(self.keys_path)
        status, _, complained = self.keys("import", self.roster(b"name\nBo\n"), "--out", out)
        self.assertEqual(status, 2)
        self.assertIn("exists already", complained)
        self.assertEqual(read_bytes(self.keys_path), before)
        self.assertEqual(read_bytes(out), b"name,key\nZed,sk-still-in-use\n")

    def test_the_key_list_is_created_readable_by_its_owner_only(self) -> None:
        """Made with mode 0600 (whatever the umask), never made wider and narrowed afterwards."""
        out = self.path("class-keys.csv")
        opened = []
        real_open = os.open

        def watching_open(path, flags, mode=0o777, *args, **kwargs):
            opened.append((path, flags, mode))
            return real_open(path, flags, mode, *args, **kwargs)

        old_umask = os.umask(0)
        try:
            with mock.patch.object(llm_proxy.os, "open", watching_open):
                status, _, complained = self.keys("import", self.roster(b"name\nBo\n"), "--out", out)
        finally:
            os.umask(old_umask)
        self.assertEqual(status, 0, complained)
        self.assertEqual(os.stat(out).st_mode & 0o777, 0o600)
        made = [(flags, mode) for path, flags, mode in opened if path == out]
        self.assertEqual(len(made), 1)
        flags, mode = made[0]
        self.assertEqual(mode, 0o600)
        self.assertTrue(flags & os.O_CREAT and flags & os.O_EXCL)

    def test_a_budget_entry_is_a_money_window(self) -> None:
        """What ``--budget`` writes (read by the proxy once money windows land)."""
        for options, windows in (
                ({"budget": 1.0}, [{"name": "budget", "unit": "money", "max_amount": 1.0, "period": "total"}]),
                ({"budget": 2.5, "period": "week"},
                 [{"name": "budget", "unit": "money", "max_amount": 2.5, "period": "week"}]),
                ({"budget": 1.0, "max_tokens": 9000, "refill_tokens": 100},
                 [{"name": "budget", "unit": "money", "max_amount": 1.0, "period": "total"},
                  {"name": "tokens", "max_tokens": 9000, "refill_tokens": 100}]),
                ({"max_tokens": 50, "period": "day"}, [{"name": "tokens", "max_tokens": 50, "period": "day"}])):
            with self.subTest(options):
                entry = llm_proxy.new_entry("Bo", dict(options, models=["m1"], email="bo@x"))
                self.assertEqual(entry, {"name": "Bo", "id": entry["id"], "email": "bo@x",
                                         "buckets": windows, "models": ["m1"]})

    @NEEDS_MONEY
    def test_a_class_with_a_budget_each(self) -> None:
        out = self.path("class-keys.csv")
        status, _, complained = self.keys("import", self.roster(b"name\r\nBo\r\nCy\r\n"), "--budget", "1.00",
                                          "--period", "total", "--models", "m1", "--out", out)
        self.assertEqual(status, 0, complained)
        entries = [entry for entry in read_json(self.keys_path).values() if entry["name"] in ("Bo", "Cy")]
        self.assertEqual([e["buckets"] for e in entries], [[llm_proxy.budget_window(1.0)]] * 2)
        llm_proxy.parse_keys_file(read_bytes(self.keys_path).decode(), Config())


# --------------------------------------------------------------------------
# keys add, set, topup, rotate, list
# --------------------------------------------------------------------------

class KeysEditTests(FileTestCase):
    def test_add_refuses_a_name_in_use_or_a_control_character(self) -> None:
        before = read_bytes(self.keys_path)
        for name, message in (("ada", "a key named 'ada' exists already"),
                              (" ada ", "a key named 'ada' exists already"),
                              ("b\ro", "the name 'b\\ro' contains a control character"),
                              ("  ", "the name is empty")):
            with self.subTest(name=name):
                status, _, complained = self.keys("add", name)
                self.assertEqual(status, 2)
                self.assertIn(message, complained)
                self.assertEqual(read_bytes(self.keys_path), before)

    def test_set_changes_only_what_it_names(self) -> None:
        hourly = {"name": "hourly", "max_tokens": 5, "refill_interval_seconds": 3600}
        daily = {"name": "daily", "max_tokens": 50, "period": "day"}
        for before, args, after in (
                ({"max_tokens": 5}, ["--max-tokens", "8"], {"max_tokens": 8}),
                ({"max_tokens": 5, "models": ["a"]}, ["--models", ""], {"max_tokens": 5}),
                ({"expires": "2099-01-01"}, ["--expires", "", "--max-concurrent", "2"], {"max_concurrent": 2}),
                ({}, ["--models", "a, b", "--refill-tokens", "3"], {"models": ["a", "b"], "refill_tokens": 3}),
                ({}, ["--endpoints", "chat, batches"], {"endpoints": ["chat", "batches"]}),
                ({"endpoints": ["chat"]}, ["--endpoints", ""], {}),
                ({"max_tokens": 5}, ["--period", "week"], {"max_tokens": 5, "buckets": [{"period": "week"}]}),
                ({"buckets": [hourly]}, ["--max-tokens", "9"], {"buckets": [dict(hourly, max_tokens=9)]}),
                ({"buckets": [hourly, daily]}, ["--window", "daily", "--max-tokens", "70"],
                 {"buckets": [hourly, dict(daily, max_tokens=70)]})):
            with self.subTest(args=args, before=before):
                self.keys_path = write_keys_file(self, {CLIENT_KEY: dict({"name": "ada"}, **before)})
                status, printed, complained = self.keys("set", "ada", *args)
                self.assertEqual(status, 0, complained)
                self.assertEqual(read_json(self.keys_path), {CLIENT_KEY: dict({"name": "ada"}, **after)})

    def test_endpoints_are_checked_before_anything_is_written(self) -> None:
        before = read_bytes(self.keys_path)
        for action in (("add", "bo"), ("set", "ada")):
            with self.subTest(action):
                status, _, complained = self.keys(*action, "--endpoints", "chat,batchs")
                self.assertEqual(status, 2)
                self.assertIn("unknown endpoint 'batchs' (did you mean 'batches'?)", complained)
                self.assertEqual(read_bytes(self.keys_path), before)
        status, _, complained = self.keys("add", "bo", "--endpoints", "embeddings")
        self.assertEqual(status, 0, complained)
        self.assertEqual([entry.get("endpoints") for entry in read_json(self.keys_path).values()],
                         [None, ["embeddings"]])

    def test_set_says_which_window_when_it_cannot_tell(self) -> None:
        windows = [{"name": "hourly", "max_tokens": 5}, {"name": "daily", "max_tokens": 50}]
        self.keys_path = write_keys_file(self, {CLIENT_KEY: {"name": "ada", "buckets": windows}})
        for args, message in ((["--max-tokens", "9"], "has 2 token windows: say which with --window"),
                              (["--window", "weekly", "--max-tokens", "9"], "no windows named 'weekly'"),
                              ([], "say what to change")):
            with self.subTest(args):
                status, _, complained = self.keys("set", "ada", *args)
                self.assertEqual(status, 2)
                self.assertIn(message, complained)
        self.assertEqual(self.keys("set", "nobody", "--max-tokens", "3")[2],
                         f"llm_proxy keys: no key named 'nobody' in {self.keys_path}\n")

    def test_money_changes_go_to_the_money_window(self) -> None:
        tokens = {"name": "tokens", "max_tokens": 9000}
        budget = llm_proxy.budget_window(1.0)
        for before, options, after in (
                ({"buckets": [tokens, budget]}, {"budget": 2.0}, [tokens, dict(budget, max_amount=2.0)]),
                ({"buckets": [tokens, budget]}, {"budget": 2.0, "max_tokens": 10},
                 [dict(tokens, max_tokens=10), dict(budget, max_amount=2.0)]),
                ({"buckets": [budget]}, {"budget": 3.0, "period": "month"},
                 [dict(budget, max_amount=3.0, period="month")]),
                ({"max_tokens": 5}, {"budget": 1.0}, [{}, budget])):
            with self.subTest(options=options, before=before):
                changed = llm_proxy.changed_entry(dict({"name": "ada"}, **before), options)
                self.assertEqual(changed["buckets"], after)
        with self.assertRaisesRegex(ConfigError, "counts money"):
            llm_proxy.changed_entry({"name": "a", "buckets": [budget]}, {"window": "budget", "max_tokens": 3})

    def test_topup_raises_one_limit_by_the_amount(self) -> None:
        config = Config(max_tokens=10)
        budget = llm_proxy.budget_window(1.1)
        for entry, amount, window, raised in (
                ({}, 5, None, {"max_tokens": 15}),  # the environment's limit, raised
                ({"max_tokens": 7}, 3, None, {"max_tokens": 10}),
                ({"buckets": [{"name": "h", "max_tokens": 4}]}, 2, None, {"buckets": [{"name": "h", "max_tokens": 6}]}),
                ({"max_tokens": 7, "buckets": [{"name": "h"}, {"name": "d", "max_tokens": 9}]}, 1, "h",
                 {"max_tokens": 7, "buckets": [{"name": "h", "max_tokens": 8}, {"name": "d", "max_tokens": 9}]}),
                ({"buckets": [{"name": "t", "max_tokens": 4}, budget]}, 0.2, None,
                 {"buckets": [{"name": "t", "max_tokens": 4}, dict(budget, max_amount=1.3)]})):
            with self.subTest(entry=entry, amount=amount):
                self.assertEqual(llm_proxy.raised_limit(entry, amount, window, config)[0], raised)
        for entry, amount, message in (({}, 0.5, "whole number of tokens"),
                                       ({"buckets": [{"name": "h"}, {"name": "d"}]}, 1, "say which")):
            with self.subTest(entry=entry), self.assertRaisesRegex(ConfigError, message):
                llm_proxy.raised_limit(entry, amount, None, config)
        status, printed, _ = self.keys("topup", "ada", "3")
        self.assertEqual((status, printed), (0, "ada: limit raised by 3 to 8 tokens\n"))
        self.assertEqual(read_json(self.keys_path)[CLIENT_KEY]["max_tokens"], 8)
        self.assertEqual(self.keys("topup", "ada", "-3")[0], 2)

    def test_rotate_gives_the_entry_a_new_key_and_keeps_the_rest(self) -> None:
        status, printed, _ = self.keys("add", "bo", "--max-tokens", "4")
        first = printed.splitlines()[-1]
        entry = read_json(self.keys_path)[stored(first)]
        status, printed, complained = self.keys("rotate", "bo")
        self.assertEqual(status, 0, complained)
        second = printed.splitlines()[-1]
        self.assertRegex(second, r"^sk-[A-Za-z0-9_-]{32}$")
        entries = read_json(self.keys_path)
        self.assertNotIn(stored(first), entries)
        self.assertEqual(entries[stored(second)], entry)
        # An entry written before ids keeps its buckets by taking its old key's digest as its id.
        status, printed, _ = self.keys("rotate", "ada")
        entries = read_json(self.keys_path)
        self.assertNotIn(CLIENT_KEY, entries)
        self.assertEqual(entries[stored(printed.splitlines()[-1])],
                         {"name": "ada", "max_tokens": 5, "id": llm_proxy.key_digest(CLIENT_KEY)})

    def test_ids_are_checked_and_unique(self) -> None:
        for entries, message in (
                ({"k1": {"id": "a b"}}, "id must be"),
                ({"k1": {"id": "x1"}, "k2": {"id": "x1"}}, "id 'x1' is another entry's already"),
                ({"k1": {}, "k2": {"id": llm_proxy.key_digest("k1")}}, "is another entry's already"),
                ({"k1": {"email": 3}}, "email must be a string")):
            with self.subTest(entries), self.assertRaisesRegex(ConfigError, message):
                llm_proxy.parse_keys_file(json.dumps(entries), Config())

    @NEEDS_MONEY
    def test_add_set_and_topup_a_budget(self) -> None:
        status, _, complained = self.keys("add", "bo", "--budget", "1.00")
        self.assertEqual(status, 0, complained)
        self.assertEqual(self.keys("set", "bo", "--budget", "1.5")[0], 0)
        self.assertEqual(self.keys("topup", "bo", "0.2")[1], "bo: limit raised by 0.2 to 1.7\n")
        entry = [e for e in read_json(self.keys_path).values() if e["name"] == "bo"][0]
        self.assertEqual(entry["buckets"], [llm_proxy.budget_window(1.7)])


class ClosedPipeTests(unittest.TestCase):
    def test_list_into_a_closed_pipe_ends_quietly(self) -> None:
        """``keys list | head -1``: more lines than a pipe holds, and the reader stops after one."""
        path = write_keys_file(self, {f"sk-student-{n:05d}": {"name": f"student {n}", "max_tokens": 100}
                                      for n in range(2000)})
        env = clean_environment()
        env["KEYS_FILE"] = path
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py"), "keys", "list"],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = process.stdout.readline()
        process.stdout.close()  # as head does once it has its line
        complained = process.stderr.read()
        process.stderr.close()
        self.assertEqual(process.wait(timeout=WAIT), 141)  # as a shell reports a command ended by SIGPIPE
        self.assertTrue(first.startswith(b"student 0  enabled  100 "), first)
        self.assertEqual(complained, b"")


# --------------------------------------------------------------------------
# Limits that change keep what was spent
# --------------------------------------------------------------------------

class ResizedBucketTests(unittest.TestCase):
    def test_a_new_limit_moves_the_level_by_the_difference(self) -> None:
        for capacity, level, new, expected in ((10, 0, 15, 5), (10, 4, 20, 14), (10, 4, 6, 0),
                                               (10, 4, 2, -4), (10, 10, 5, 5), (10, -3, 12, -1)):
            with self.subTest(capacity=capacity, level=level, new=new):
                store = BucketStore(FakeClock())
                spec = BucketSpec(capacity, 1, 3600.0)
                store.charge("a", (spec,), capacity - max(level, 0))
                store.credit("a", (spec,), min(level, 0))  # a debt: usage above the reservation
                self.assertEqual(store.snapshot("a", (spec,))[0]["tokens"], level)
                resized = BucketSpec(new, 1, 3600.0)
                self.assertEqual(store.snapshot("a", (resized,))[0]["tokens"], expected)

    def test_state_files_carry_the_limit_and_older_ones_still_load(self) -> None:
        clock, wall = FakeClock(), FakeClock(1_800_000_000.0)
        store = BucketStore(clock, wall)
        spec = BucketSpec(10, 1, 3600.0)
        store.charge("a", (spec,), 10)
        saved = store.dump(wall)
        self.assertEqual(saved["a"][0][2], 10)
        for entry, expected in ((saved["a"], 5), ([saved["a"][0][:2]], 0)):  # an older file: level as saved
            with self.subTest(entry=entry):
                restored = BucketStore(clock, wall)
                restored.load({"a": entry}, wall)
                self.assertEqual(restored.snapshot("a", (BucketSpec(15, 1, 3600.0),))[0]["tokens"], expected)
        for broken in ([[1]], [[1, 2, 3, 4]], [["x", 2, 3]]):
            with self.subTest(broken=broken), self.assertRaises(llm_proxy.BROKEN_STATE):
                BucketStore(clock, wall).load({"a": broken}, wall)


class KeysThroughTheProxyTests(ProxyTestCase):
    """The command edits the file the running proxy serves from; the proxy re-reads it."""

    def setUp(self) -> None:
        self.keys_path = write_keys_file(self, {
            CLIENT_KEY: {"name": "ada", "max_tokens": 3, "refill_tokens": 1, "refill_interval_seconds": 3600}})
        self.config_overrides = {"keys_file": self.keys_path, "admin_key": ADMIN_KEY}
        super().setUp()

    def keys(self, *args: str) -> str:
        status, printed, complained = keys_command(*args, path=self.keys_path)
        self.assertEqual(status, 0, complained)
        self.proxy.request_reload()  # as SIGHUP does; the housekeeping re-reads within a second anyway
        return printed

    def quota(self, key: str = CLIENT_KEY) -> dict:
        return self.request("GET", "/v1/quota", key=key).json()

    def wait_for_capacity(self, capacity: int, key: str = CLIENT_KEY) -> None:
        self.wait_for(lambda: self.quota(key)["buckets"][0]["capacity"] == capacity)

    def spend(self, count: int, key: str = CLIENT_KEY) -> None:
        for _ in range(count):
            self.assertEqual(self.chat(key=key).json()["choices"][0]["message"]["content"], "hi from upstream")

    def assert_limited(self, key: str = CLIENT_KEY) -> None:
        text = self.chat(key=key).json()["choices"][0]["message"]["content"]
        self.assertTrue(text.startswith("limit reached"), text)

    def test_a_raised_limit_serves_a_blocked_caller_and_keeps_what_was_spent(self) -> None:
        self.spend(3)
        self.assert_limited()
        self.keys("set", "ada", "--max-tokens", "5")
        self.wait_for_capacity(5)
        self.assertEqual(tokens_of(self.quota()), [2])  # 3 spent of 5, not a full new bucket
        self.spend(2)
        self.assert_limited()
        self.keys("set", "ada", "--max-tokens", "4")  # lowered below the 5 spent: 1 owed
        self.wait_for_capacity(4)
        self.assertEqual(tokens_of(self.quota()), [-1])
        self.clock.advance(3600)
        self.assert_limited()
        self.clock.advance(3600)
        self.spend(1)

    def test_topup_adds_to_what_is_left(self) -> None:
        self.spend(3)
        self.assertEqual(self.keys("topup", "ada", "2"), "ada: limit raised by 2 to 5 tokens\n")
        self.wait_for_capacity(5)
        self.assertEqual(tokens_of(self.quota()), [2])
        self.spend(2)
        self.assert_limited()

    def test_rotate_keeps_balance_and_history_and_the_old_key_stops(self) -> None:
        for rotation in range(2):  # the first from an entry without an id, then from one with it
            with self.subTest(rotation=rotation):
                old = CLIENT_KEY if rotation == 0 else new
                self.spend(1, key=old)
                new = self.keys("rotate", "ada").splitlines()[-1]
                self.wait_for(lambda: self.request("GET", "/v1/quota", key=old).status == 401)  # (free)
                self.assertEqual(self.chat(key=old).json()["error"]["code"], "invalid_api_key")
                self.assertEqual(tokens_of(self.quota(new)), [2 - rotation])
        self.spend(1, key=new)
        self.assert_limited(new)
        self.logged(6)
        report = self.request("GET", "/admin/api/usage", key=ADMIN_KEY).json()
        ada = [entry for entry in report["keys"] if entry["name"] == "ada"]
        self.assertEqual(len(ada), 1)
        self.assertEqual((ada[0]["usage"]["today"]["served"], ada[0]["usage"]["today"]["limited"]), (3, 1))

    def test_a_rotated_key_keeps_its_balance_across_a_restart(self) -> None:
        state = os.path.join(os.path.dirname(self.keys_path), "state.json")
        self.start_proxy(keys_file=self.keys_path, state_file=state)
        self.spend(2)
        new = self.keys("rotate", "ada").splitlines()[-1]
        self.keys("set", "ada", "--max-tokens", "6")
        self.start_proxy(keys_file=self.keys_path, state_file=state)  # stops (saving), then starts
        self.assertEqual(tokens_of(self.quota(new)), [4])


# --------------------------------------------------------------------------
# The same over HTTP
# --------------------------------------------------------------------------

class KeysApiTests(ProxyTestCase):
    def setUp(self) -> None:
        self.keys_path = write_keys_file(self, {
            CLIENT_KEY: {"name": "ada", "max_tokens": 3, "refill_tokens": 1, "refill_interval_seconds": 3600},
            OTHER_KEY: {"name": "bo", "max_tokens": 9}})
        self.config_overrides = {"keys_file": self.keys_path, "admin_key": ADMIN_KEY}
        super().setUp()

    def api(self, method: str, path: str, body: object = None, key: str | None = ADMIN_KEY):
        return self.request(method, "/admin/api/keys" + path, body, key=key)

    def entry(self, name: str) -> dict:
        return [e for e in read_json(self.keys_path).values() if e["name"] == name][0]

    def test_list_shows_settings_and_levels_never_a_key(self) -> None:
        self.chat()
        response = self.api("GET", "")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["Cache-Control"], "no-store")
        listed = response.json()["keys"]
        self.assertEqual([(k["name"], k["id"], k["enabled"], k["windows"]) for k in listed], [
            ("ada", None, True, [{"max_tokens": 3, "refill_tokens": 1, "refill_interval_seconds": 3600}]),
            ("bo", None, True, [{"max_tokens": 9}])])
        self.assertEqual([tokens_of(k) for k in listed], [[2], [9]])
        for secret in (CLIENT_KEY, OTHER_KEY, llm_proxy.key_digest(CLIENT_KEY), llm_proxy.key_digest(OTHER_KEY),
                       hashlib.sha256(CLIENT_KEY.encode()).hexdigest()):
            self.assertNotIn(secret, response.body.decode())

    def test_a_keys_endpoints_are_set_and_cleared_over_http(self) -> None:
        created = self.api("POST", "", {"name": "cy", "endpoints": ["embeddings"]})
        self.assertEqual((created.status, created.json()["endpoints"]), (201, ["embeddings"]))
        key = created.json()["key"]
        self.assertEqual(self.chat(key=key).json()["error"]["code"], "endpoint_not_allowed")
        misspelt = self.api("PATCH", "/cy", {"endpoints": ["chats"]})
        self.assertEqual(misspelt.status, 400)
        self.assertIn("unknown endpoint 'chats' (did you mean 'chat'?)", misspelt.json()["error"]["message"])
        for empty in ([], ["", " "]):  # in the file, [] closes every API: not a way to clear the list
            refused = self.api("PATCH", "/cy", {"endpoints": empty})
            self.assertEqual(refused.status, 400, empty)
            self.assertIn("an empty list would close every API", refused.json()["error"]["message"])
            self.assertEqual(self.entry("cy")["endpoints"], ["embeddings"])
        cleared = self.api("PATCH", "/cy", {"endpoints": None})
        self.assertEqual((cleared.status, cleared.json()["endpoints"]), (200, None))
        self.assertNotIn("endpoints", self.entry("cy"))
        self.assertEqual(self.chat(key=key).status, 200)

    def test_each_edit_answers_changes_the_file_and_applies_at_once(self) -> None:
        created = self.api("POST", "", {"name": "cy", "max_tokens": 2, "models": ["m1"], "email": "cy@x"})
        self.assertEqual(created.status, 201, created.body)
        self.assertEqual(created.headers["Cache-Control"], "no-store")
        body = created.json()
        key = body["key"]
        self.assertEqual((body["name"], body["email"], body["models"], body["windows"]),
                         ("cy", "cy@x", ["m1"], [{"max_tokens": 2}]))
        self.assertEqual(read_json(self.keys_path)[stored(key)],
                         {"name": "cy", "id": body["id"], "email": "cy@x", "max_tokens": 2, "models": ["m1"]})
        self.assertNotIn(key, read_bytes(self.keys_path).decode())
        self.assertEqual(self.chat(key=key, model="m1").status, 200)  # no wait: the ring was re-read
        self.assertEqual(self.chat(key=key, model="m1").status, 200)
        self.assertEqual(self.chat(key=key, model="m1").json()["choices"][0]["message"]["content"][:13],
                         "limit reached")

        changed = self.api("PATCH", "/cy", {"max_tokens": 4, "models": None})
        self.assertEqual(changed.status, 200, changed.body)
        self.assertEqual(self.entry("cy"), {"name": "cy", "id": body["id"], "email": "cy@x", "max_tokens": 4})
        self.assertEqual(tokens_of(changed.json()), [2])  # 2 spent of 4
        self.assertEqual(self.chat(key=key, model="other").status, 200)

        topped = self.api("POST", f"/{body['id']}/topup", {"amount": 3})  # by id, as well as by name
        self.assertEqual((topped.status, tokens_of(topped.json())), (200, [4]))
        self.assertEqual(self.entry("cy")["max_tokens"], 7)

        rotated = self.api("POST", "/cy/rotate")
        self.assertEqual(rotated.status, 200, rotated.body)
        new = rotated.json()["key"]
        self.assertEqual(self.chat(key=key).status, 401)
        self.assertEqual(tokens_of(self.request("GET", "/v1/quota", key=new).json()), [4])
        self.assertEqual(read_json(self.keys_path)[stored(new)]["id"], body["id"])

        disabled = self.api("POST", "/cy/disable")
        self.assertEqual((disabled.status, disabled.json()), (200, {"name": "cy", "enabled": False, "count": 1}))
        self.assertIs(self.entry("cy")["enabled"], False)
        self.assertEqual(self.chat(key=new).json()["error"]["code"], "key_disabled")
        self.assertEqual(self.api("POST", "/cy/enable").status, 200)
        self.assertEqual(self.chat(key=new).status, 200)

        removed = self.api("DELETE", "/cy")
        self.assertEqual((removed.status, removed.json()), (200, {"name": "cy", "removed": 1}))
        self.assertEqual([e["name"] for e in read_json(self.keys_path).values()], ["ada", "bo"])
        self.assertEqual(self.chat(key=new).json()["error"]["code"], "invalid_api_key")

    def test_refusals_are_openai_errors_and_change_nothing(self) -> None:
        before = read_bytes(self.keys_path)
        for method, path, body, key, status, code in (
                ("GET", "", None, None, 401, "invalid_admin_key"),
                ("POST", "", {"name": "x"}, CLIENT_KEY, 401, "invalid_admin_key"),
                ("DELETE", "/ada", None, ADMIN_KEY + "x", 401, "invalid_admin_key"),
                ("POST", "", {"name": "ada"}, ADMIN_KEY, 409, "name_in_use"),
                ("POST", "", {"name": "x\ry"}, ADMIN_KEY, 400, "invalid_key_settings"),
                ("POST", "", {"name": "x", "max_tokens": "9"}, ADMIN_KEY, 400, "invalid_key_settings"),
                ("POST", "", {"name": "x", "colour": "red"}, ADMIN_KEY, 400, "invalid_key_settings"),
                ("POST", "", {"name": "x", "max_tokens": 0}, ADMIN_KEY, 400, "invalid_key_settings"),
                ("POST", "", b'{"name": "x", "refill_interval_seconds": 1' + b"0" * 400 + b"}", ADMIN_KEY, 400,
                 "invalid_key_settings"),
                ("POST", "", b'{"name": "x", "max_tokens": 1' + b"0" * 400 + b"}", ADMIN_KEY, 400,
                 "invalid_key_settings"),
                ("POST", "", [1], ADMIN_KEY, 400, "invalid_json"),
                ("POST", "", b"{", ADMIN_KEY, 400, "invalid_json"),
                ("PATCH", "/ada", {}, ADMIN_KEY, 400, "invalid_key_settings"),
                ("PATCH", "/ada", {"window": "weekly", "max_tokens": 3}, ADMIN_KEY, 400, "invalid_key_settings"),
                ("PATCH", "/nobody", {"max_tokens": 3}, ADMIN_KEY, 404, "key_not_found"),
                ("POST", "/ada/topup", {}, ADMIN_KEY, 400, "invalid_key_settings"),
                ("POST", "/ada/topup", {"amount": -1}, ADMIN_KEY, 400, "invalid_key_settings"),
                ("POST", "/ada/rotate", {"key": "sk-mine"}, ADMIN_KEY, 400, "invalid_key_settings"),
                ("POST", "/nobody/disable", None, ADMIN_KEY, 404, "key_not_found"),
                ("POST", "/ada/explode", None, ADMIN_KEY, 404, "not_found"),
                ("POST", "/ada/rotate/again", None, ADMIN_KEY, 404, "not_found"),
                ("GET", "/ada", None, ADMIN_KEY, 405, "method_not_allowed"),
                ("PATCH", "", {"max_tokens": 3}, ADMIN_KEY, 405, "method_not_allowed")):
            with self.subTest(method=method, path=path, body=body):
                response = self.api(method, path, body, key=key)
                self.assert_openai_error(response, status, code=code)
                self.assertEqual(read_bytes(self.keys_path), before)

    def test_the_api_needs_an_admin_key_and_a_keys_file(self) -> None:
        self.start_proxy(keys_file=self.keys_path)
        self.assert_openai_error(self.api("GET", ""), 404, code="not_found")
        self.start_proxy(admin_key=ADMIN_KEY, client_keys=(CLIENT_KEY,))
        error = self.assert_openai_error(self.api("POST", "", {"name": "x"}), 404, code="not_found")
        self.assertIn("KEYS_FILE", error["message"])

    def test_parallel_edits_all_land(self) -> None:
        answers: list = []
        threads = [threading.Thread(target=lambda n=n: answers.append(self.api("POST", "", {"name": f"s{n}"})))
                   for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        self.assertEqual(sorted(answer.status for answer in answers), [201] * 8)
        self.assertEqual(sorted(e["name"] for e in read_json(self.keys_path).values()),
                         ["ada", "bo"] + [f"s{n}" for n in range(8)])
        for answer in answers:
            self.assertEqual(self.request("GET", "/v1/quota", key=answer.json()["key"]).status, 200)

    def test_a_broken_keys_file_is_the_servers_fault(self) -> None:
        with open(self.keys_path, "w") as file:
            file.write('{"sk-x": {"name": "ada"},')  # a hand edit, half saved
        for method, path, body in (("GET", "", None), ("POST", "", {"name": "cy"}), ("POST", "/ada/disable", None)):
            with self.subTest(method=method, path=path):
                self.assert_openai_error(self.api(method, path, body), 500, "server_error")
        self.assertIn("KEYS_FILE", self.written("KEYS_FILE"))

    def test_two_names_one_edit_refused_for_one_key_only(self) -> None:
        """A hand edit may leave two entries with one name: disable acts on both, rotate on neither."""
        write_keys_file(self, {CLIENT_KEY: {"name": "ada"}, OTHER_KEY: {"name": "ada"}})
        self.proxy.keyring.reload()
        self.assert_openai_error(self.api("POST", "/ada/rotate"), 409, code="name_in_use")
        self.assertEqual(self.api("POST", "/ada/disable").json(), {"name": "ada", "enabled": False, "count": 2})

    @NEEDS_MONEY
    def test_a_budget_over_http(self) -> None:
        created = self.api("POST", "", {"name": "cy", "budget": 1.0, "period": "total"})
        self.assertEqual(created.status, 201, created.body)
        self.assertEqual(self.entry("cy")["buckets"], [llm_proxy.budget_window(1.0)])
        self.assertEqual(self.api("POST", "/cy/topup", {"amount": 0.5}).status, 200)
        self.assertEqual(self.entry("cy")["buckets"], [llm_proxy.budget_window(1.5)])


if __name__ == "__main__":
    unittest.main()
