"""Fail-safe findings of a red-team review (issue 18), over real loopback sockets.

Each test failed before its fix.  Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import tempfile
import threading
import time
import unittest
import urllib.parse
from typing import Callable
from unittest import mock

import llm_proxy
from test_llm_proxy import (ADMIN_KEY, CLIENT_KEY, OTHER_KEY, WAIT, CapturingLog, ProxyTestCase,
                            Response, parse_exposition, write_keys_file)

CONFIG = llm_proxy.Config(upstream_url="http://127.0.0.1:9/v1")
APP_KEY = "sk-app-of-many-users-5309"
DEEP = "[" * 100_000 + "]" * 100_000

# Keys files the owner could write by mistake (or an attacker on purpose), each with the start
# of the one line the proxy must log for it, instead of an exception that ends the reading thread.
MALFORMED_KEYS = {
    "nested 100,000 deep": ('{"%s": {"name": "alice", "models": %s}}' % (CLIENT_KEY, DEEP),
                            "not valid JSON (nested too deeply)"),
    "an interval of 1e400": ('{"%s": {"name": "alice", "refill_interval_seconds": 1e400}}' % CLIENT_KEY,
                             "entry 1 (alice) bucket 1: refill_interval_seconds must be a number "
                             "of seconds from 0.001 to"),
    "a 400-digit interval": ('{"%s": {"name": "alice", "refill_interval_seconds": 1%s}}'
                             % (CLIENT_KEY, "0" * 400),
                             "entry 1 (alice) bucket 1: refill_interval_seconds must be a number"),
    "a 400-digit capacity": ('{"%s": {"name": "alice", "max_tokens": 1%s}}' % (CLIENT_KEY, "0" * 400),
                             "entry 1 (alice) bucket 1: max_tokens must be a whole number from 1 to"),
    "half a character": ('{"%s": {"name": "al\\ud800ice"}}' % CLIENT_KEY,
                         "not valid JSON (a \\u escape stands for half a character"),
    "a list for 'from'": ('{"%s": {"name": "alice", "users": {"from": []}}}' % CLIENT_KEY,
                          "entry 1 (alice) users: 'from' must be one of"),
    "a list for 'period'": ('{"%s": {"name": "alice", "buckets": [{"period": ["day"]}]}}' % CLIENT_KEY,
                            "entry 1 (alice) bucket 1: period must be"),
}


def capture_log(test: unittest.TestCase) -> CapturingLog:
    """The proxy's log records, for one test that starts no proxy (ProxyTestCase has its own)."""
    capture = CapturingLog()
    logger = logging.getLogger("llm_proxy")
    test.addCleanup(setattr, logger, "propagate", logger.propagate)
    test.addCleanup(logger.setLevel, logger.level)
    test.addCleanup(logger.removeHandler, capture)
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return capture


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    """Both ends of a fresh TCP connection on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=WAIT)
        server, _ = listener.accept()
    return server, client


# --------------------------------------------------------------------------
# 1. A malformed keys file, or any failing task, must not end a background thread
# --------------------------------------------------------------------------

class MalformedKeysTests(unittest.TestCase):
    def test_any_malformed_keys_file_is_a_config_error(self) -> None:
        for name, (text, message) in MALFORMED_KEYS.items():
            with self.subTest(name):
                with self.assertRaises(llm_proxy.ConfigError) as raised:
                    llm_proxy.parse_keys_file(text, CONFIG)
                self.assertTrue(str(raised.exception).startswith(message), raised.exception)
                self.assertNotIn(CLIENT_KEY, str(raised.exception))

    def test_the_keys_command_says_so_too(self) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "keys.json")
            with open(path, "w") as file:
                file.write(MALFORMED_KEYS["nested 100,000 deep"][0])
            error = io.StringIO()
            with mock.patch("sys.stderr", error):
                status = llm_proxy.main(["keys", "list"], {"KEYS_FILE": path})
        self.assertEqual((status, error.getvalue()),
                         (2, "llm_proxy keys: not valid JSON (nested too deeply)\n"))


class HousekeepingTests(ProxyTestCase):
    def setUp(self) -> None:
        self.keys_path = write_keys_file(self, self.keys(bob_enabled=True))
        self.config_overrides = {"keys_file": self.keys_path}
        super().setUp()

    @staticmethod
    def keys(bob_enabled: bool) -> dict:
        return {CLIENT_KEY: {"name": "alice"}, OTHER_KEY: {"name": "bob", "enabled": bob_enabled}}

    def write_keys(self, text: str) -> None:
        with open(self.keys_path + ".tmp", "w") as file:
            file.write(text)
        os.replace(self.keys_path + ".tmp", self.keys_path)

    def disable_bob_and_see_it_applied(self) -> None:
        """A good edit after the trouble: applied only if the housekeeping thread still runs."""
        write_keys_file(self, self.keys(bob_enabled=False))
        self.proxy.request_reload()
        self.wait_for(lambda: self.chat(key=OTHER_KEY).status == 401)
        self.assertEqual(self.chat(key=OTHER_KEY).json()["error"]["code"], "key_disabled")

    def test_malformed_edits_keep_the_previous_keys_and_a_later_edit_applies(self) -> None:
        for name, (text, message) in MALFORMED_KEYS.items():
            with self.subTest(name):
                self.log.lines.clear()
                self.write_keys(text)
                self.proxy.request_reload()
                expected = f"KEYS_FILE {self.keys_path}: {message}"
                self.wait_for(lambda: any(line.startswith(expected) for line in self.log.lines))
                reported = [line for line in self.log.lines if line.startswith(expected)]
                self.assertEqual(len(reported), 1, self.log.lines)
                self.assertTrue(reported[0].endswith("; keeping the previous keys"), reported)
                self.assertEqual(self.chat().status, 200)
                self.assertEqual(self.chat(key=OTHER_KEY).status, 200)
        self.disable_bob_and_see_it_applied()
        self.assertNotIn("Traceback", self.written())

    def test_a_failing_task_is_logged_once_and_the_loop_goes_on(self) -> None:
        calls: list[int] = []
        failing = threading.Event()
        failing.set()

        def drop_slow_requests() -> None:
            calls.append(1)
            if failing.is_set():
                raise RuntimeError("made to fail")

        def failures() -> list[str]:
            return [line for line in self.log.lines if "ending requests that arrive too slowly" in line]

        def rounds(count: int) -> None:
            """``count`` more housekeeping rounds, each finished (the next one has begun)."""
            target = len(calls) + count + 1
            while len(calls) < target:
                before = len(calls)
                self.proxy.request_reload()
                self.wait_for(lambda: len(calls) > before)

        self.proxy.drop_slow_requests = drop_slow_requests
        rounds(3)
        self.assertEqual(len(failures()), 1, self.log.lines)
        self.assertIn("housekeeping thread: ending requests that arrive too slowly failed; the "
                      "thread goes on", failures()[0])
        self.assertIn("Traceback (most recent call last)", failures()[0])
        self.assertIn("RuntimeError: made to fail", failures()[0])
        self.disable_bob_and_see_it_applied()  # the other tasks still run, round after round
        failing.clear()
        rounds(1)  # the task works again: a new failure is news
        failing.set()
        rounds(2)
        self.assertEqual(len(failures()), 2, self.log.lines)


class BackgroundThreadTests(unittest.TestCase):
    def setUp(self) -> None:
        self.log = capture_log(self)

    def wait_for(self, condition: Callable[[], bool], failure: str) -> None:
        """Poll for what another thread does, as ProxyTestCase.wait_for (no refill waits here)."""
        deadline = time.monotonic() + WAIT
        while not condition():
            self.assertLess(time.monotonic(), deadline, failure)
            time.sleep(0.005)

    def logged(self, text: str) -> list[str]:
        self.wait_for(lambda: any(text in line for line in self.log.lines), f"never logged: {text!r}")
        return [line for line in self.log.lines if text in line]

    def test_the_line_writer_survives_a_failing_write(self) -> None:
        class FlakyStream(io.StringIO):
            failures = 1

            def write(self, text: str) -> int:
                if self.failures:
                    self.failures -= 1
                    raise RuntimeError("made to fail")
                return super().write(text)

        stream = FlakyStream()
        writer = llm_proxy.LineWriter(stream, interval=0.01)
        self.addCleanup(writer.close)
        writer.write("lost with the failing write\n")
        self.wait_for(lambda: stream.failures == 0, "never written")
        writer.write("written after it\n")
        self.wait_for(lambda: "written after it" in stream.getvalue(), "the line writer stopped")
        self.assertEqual(stream.getvalue(), "written after it\n")
        failure = self.logged("line writer thread: writing the request log failed")
        self.assertIn("RuntimeError: made to fail", failure[0])

    def test_the_disconnect_watcher_survives_a_failing_check(self) -> None:
        real_readable_now = llm_proxy._readable_now
        failures = [RuntimeError("made to fail")]

        def readable_now(sock: socket.socket) -> bool:
            if failures:
                raise failures.pop()
            return real_readable_now(sock)

        watcher = llm_proxy.DisconnectWatcher()
        self.addCleanup(watcher.close)
        with mock.patch.object(llm_proxy, "_readable_now", readable_now):
            self.hang_up_under(watcher)
            self.wait_for(lambda: not failures, "never checked")
            noticed = self.hang_up_under(watcher)
            self.assertTrue(noticed.wait(WAIT), "the watcher stopped watching")
        failure = self.logged("disconnect watcher thread: checking a client that may have hung up failed")
        self.assertIn("RuntimeError: made to fail", failure[0])

    def hang_up_under(self, watcher: llm_proxy.DisconnectWatcher) -> threading.Event:
        """A connection ``watcher`` watches, whose client hangs up; the event is set when noticed."""
        server, client = loopback_pair()
        self.addCleanup(server.close)
        noticed = threading.Event()
        watcher.watch(server, noticed.set)
        client.close()
        return noticed


# --------------------------------------------------------------------------
# 2. /metrics tells apart as many callers as the usage history, then counts the rest as _other
# --------------------------------------------------------------------------

class AppKeyTestCase(ProxyTestCase):
    """An app key whose end users name themselves in the request's ``user`` field."""

    users: dict = {"from": "user_field", "required": True, "max_tokens": 1, "refill_tokens": 1,
                   "refill_interval_seconds": 86400}

    def setUp(self) -> None:
        self.keys_path = write_keys_file(self, {APP_KEY: {
            "name": "webui", "max_tokens": 1000, "refill_tokens": 1000, "refill_interval_seconds": 86400,
            "users": self.users}})
        self.config_overrides = {"keys_file": self.keys_path, "admin_key": ADMIN_KEY}
        super().setUp()

    def reply_text(self, response: Response) -> str:
        return response.json()["choices"][0]["message"]["content"]

    def admin(self, path: str) -> Response:
        return self.request("GET", path, key=ADMIN_KEY)


class IdentityCapTests(AppKeyTestCase):
    def test_metrics_and_history_count_the_same_number_of_callers_apart(self) -> None:
        proxy = self.proxy  # (the server keeps the history for its state file, the view records in it)
        proxy.usage = proxy.admin.usage = llm_proxy.UsageBook(max_identities=3)
        proxy.metrics = proxy.admin.metrics = llm_proxy.Metrics(max_identities=3)
        users = [f"user{n}@home.lan" for n in range(6)]
        for user in users:  # two series each: one request served, one limited
            self.assertEqual(self.reply_text(self.chat(key=APP_KEY, user=user)), "hi from upstream")
            self.assertIn("limit reached", self.reply_text(self.chat(key=APP_KEY, user=user)))
        self.logged(12)  # (a request is counted just before its line is written)

        samples = parse_exposition(self.admin("/metrics").body.decode())["llm_proxy_requests_total"]["samples"]
        counted: dict = {}
        for _, labels, value in samples:
            caller = (labels["key"], labels.get("user"))
            counted[caller] = counted.get(caller, 0) + value
        self.assertEqual(counted, {("webui", users[0]): 2, ("webui", users[1]): 2,
                                   ("webui", users[2]): 2, ("_other", None): 6})
        self.assertEqual(len(samples), 8)  # served and limited for each of the four

        history = {ledger.user or identity: ledger.total[0] for identity, ledger in self.proxy.usage.items()}
        app = "key:" + llm_proxy.key_digest(APP_KEY)  # the app's own ledger is one of the three
        self.assertEqual(history, {users[0]: 2, app: 12, users[1]: 2, "_other": 8})


# --------------------------------------------------------------------------
# 3. `keys disable NAME` acts on every entry of that name, and says how many
# --------------------------------------------------------------------------

class DuplicateNameTests(unittest.TestCase):
    TEXT = ('{\n  "%s": {"name": "bob", "max_tokens": 5},\n  "sk-ada-0000000001": {"name": "ada"},\n'
            '  "%s": {"name": "bob", "max_tokens": 7}\n}\n' % (CLIENT_KEY, OTHER_KEY))

    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.path = os.path.join(directory.name, "keys.json")
        with open(self.path, "w") as file:
            file.write(self.TEXT)

    def keys(self, *args: str) -> tuple[int, str]:
        """``llm_proxy keys ARGS``: its exit status and what it printed."""
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            status = llm_proxy.main(["keys", *args], {"KEYS_FILE": self.path})
        return status, printed.getvalue()

    def enabled(self) -> dict:
        with open(self.path) as file:
            return {entry["name"] + str(entry.get("max_tokens", "")): entry.get("enabled", True)
                    for entry in json.load(file).values()}

    def test_disable_enable_and_remove_act_on_every_key_of_the_name(self) -> None:
        status, listing = self.keys("list")
        self.assertEqual(status, 0)
        bobs = [line for line in listing.splitlines() if line.startswith("bob ")]
        self.assertEqual(len(bobs), 2)
        for line in bobs:
            self.assertTrue(line.endswith("  one of 2 keys named 'bob'"), line)
        self.assertNotIn("one of", [line for line in listing.splitlines() if line.startswith("ada ")][0])

        self.assertEqual(self.keys("disable", "bob"), (0, "bob: disabled (2 keys)\n"))
        self.assertEqual(self.enabled(), {"bob5": False, "ada": True, "bob7": False})
        self.assertEqual(self.keys("enable", "bob"), (0, "bob: enabled (2 keys)\n"))
        self.assertEqual(self.enabled(), {"bob5": True, "ada": True, "bob7": True})
        self.assertEqual(self.keys("disable", "ada"), (0, "ada: disabled\n"))  # one: said as before
        self.assertEqual(self.keys("remove", "bob"), (0, "bob: removed (2 keys)\n"))
        with open(self.path) as file:
            self.assertEqual(file.read(), '{\n  "sk-ada-0000000001": {"name": "ada", "enabled": false}\n}\n')


# --------------------------------------------------------------------------
# 4. An end user is one person however they capitalise
# --------------------------------------------------------------------------

class UserCaseTests(AppKeyTestCase):
    users = dict(AppKeyTestCase.users, max_tokens=2, refill_tokens=2,
                 overrides={"kid@home.lan": {"max_tokens": 1}})

    def test_an_override_applies_in_any_case_and_the_spellings_share_one_bucket(self) -> None:
        self.assertEqual(self.reply_text(self.chat(key=APP_KEY, user="KID@Home.LAN")), "hi from upstream")
        self.logged(1)  # recorded (it is recorded after its answer): "first sent" is this spelling
        self.assertIn("limit reached", self.reply_text(self.chat(key=APP_KEY, user=" kid@home.lan")))
        quota = self.request("GET", "/v1/quota?user=Kid@home.lan", key=APP_KEY).json()
        self.assertEqual([(b["capacity"], b["tokens"]) for b in quota["buckets"]], [(1, 0)])
        self.assertEqual(quota["user"], "Kid@home.lan")  # what this request sent
        self.logged(3)

        webui = self.admin("/admin/api/usage").json()["keys"][0]
        self.assertEqual([(user["name"], user["usage"]["all_time"]["requests"]) for user in webui["users"]],
                         [("KID@Home.LAN", 2)])  # shown as first sent
        samples = parse_exposition(self.admin("/metrics").body.decode())["llm_proxy_requests_total"]["samples"]
        self.assertEqual({labels["user"] for _, labels, _ in samples}, {"KID@Home.LAN"})

    def test_two_overrides_for_one_user_are_refused(self) -> None:
        users = dict(self.users, overrides={"Kid@home.lan": {}, "kid@HOME.lan": {"max_tokens": 2}})
        with self.assertRaises(llm_proxy.ConfigError) as raised:
            llm_proxy.parse_keys_file(json.dumps({APP_KEY: {"name": "webui", "users": users}}), CONFIG)
        self.assertEqual(str(raised.exception), "entry 1 (webui) users: overrides 'Kid@home.lan' and "
                                                "'kid@HOME.lan' are one user (case is ignored)")


class UserFoldingTests(AppKeyTestCase):
    """Open WebUI lowers emails: boß@home.lan and boſs@home.lan are other accounts than
    boss@home.lan, which casefold() would merge with it (a red team's finding)."""

    users = dict(AppKeyTestCase.users, max_tokens=1, refill_tokens=1,
                 overrides={"boss@home.lan": {"max_tokens": 5, "refill_tokens": 5}})

    def capacity_and_level(self, user: str) -> list[tuple[int, int]]:
        quota = self.request("GET", f"/v1/quota?user={urllib.parse.quote(user)}", key=APP_KEY).json()
        return [(bucket["capacity"], bucket["tokens"]) for bucket in quota["buckets"]]

    def test_only_case_is_ignored_not_other_foldings(self) -> None:
        for other in ("boß@home.lan", "bo\u017fs@home.lan"):
            with self.subTest(user=other):
                self.assertEqual(self.reply_text(self.chat(key=APP_KEY, user=other)), "hi from upstream")
                self.assertEqual(self.capacity_and_level(other), [(1, 0)])  # the default, spent
        self.assertEqual(self.capacity_and_level("BOSS@home.lan"), [(5, 5)])  # untouched


# --------------------------------------------------------------------------
# 5. The JWT secret is at least 32 bytes long
# --------------------------------------------------------------------------

class JwtSecretTests(unittest.TestCase):
    VARIABLE = "ISSUE_18_JWT_SECRET"
    KEYS = json.dumps({APP_KEY: {"name": "webui", "users": {"from": "jwt", "secret_env": VARIABLE}}})

    def parse(self, secret: str, require_secrets: bool = True) -> dict:
        with mock.patch.dict(os.environ, {self.VARIABLE: secret}):
            return llm_proxy.parse_keys_file(self.KEYS, CONFIG, require_secrets)

    def test_a_shorter_secret_is_refused_naming_its_variable_not_its_value(self) -> None:
        for short in ("shared-secret-of-31-bytes-12345", "é" * 15):  # 31 bytes; 15 characters, 30 bytes
            with self.subTest(short=short):
                with self.assertRaises(llm_proxy.ConfigError) as raised:
                    self.parse(short)
                self.assertEqual(str(raised.exception),
                                 f"entry 1 (webui) users: the JWT secret in {self.VARIABLE} is shorter "
                                 "than 32 bytes (make one with: openssl rand -hex 32)")
                self.assertEqual(len(self.parse(short, require_secrets=False)), 1)  # as `keys` reads it
        for enough in ("shared-secret-of-32-bytes-123456", "é" * 16):
            self.assertEqual(len(self.parse(enough)), 1)

    def test_the_keys_command_still_edits_a_file_whose_secret_it_cannot_see(self) -> None:
        path = write_keys_file(self, json.loads(self.KEYS))
        printed = io.StringIO()
        with mock.patch.dict(os.environ, {self.VARIABLE: "short"}), contextlib.redirect_stdout(printed):
            self.assertEqual(llm_proxy.main(["keys", "disable", "webui"], {"KEYS_FILE": path}), 0)
        self.assertEqual(printed.getvalue(), "webui: disabled\n")


# --------------------------------------------------------------------------
# 6. A state file's two sections are restored, and reported, each on its own
# --------------------------------------------------------------------------

class StateSectionTests(ProxyTestCase):
    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.state_path = os.path.join(directory.name, "state.json")
        self.config_overrides = {"client_keys": (CLIENT_KEY,), "state_file": self.state_path}
        super().setUp()

    def test_a_broken_usage_section_costs_the_buckets_nothing_and_the_log_says_so(self) -> None:
        for _ in range(3):
            self.chat()
        self.logged(3)
        self.stop(self.proxy)  # saves
        self.proxy = None
        with open(self.state_path) as file:
            state = json.load(file)
        ledger = state["usage"]["key:" + llm_proxy.key_digest(CLIENT_KEY)]
        ledger["total"][0] = "three"  # one count damaged
        with open(self.state_path, "w") as file:
            json.dump(state, file)

        self.log.lines.clear()
        self.start_proxy(**self.config_overrides)
        self.assertEqual(self.level(), 7)
        self.assertEqual(self.proxy.usage.items(), [])
        self.assertEqual([line for line in self.log.lines if "STATE_FILE" in line], [
            f"STATE_FILE {self.state_path}: restored 1 callers' buckets",
            f"STATE_FILE {self.state_path}: usage history unreadable (ValueError); starting empty"])

    def test_a_request_still_ending_at_shutdown_is_in_the_last_save(self) -> None:
        """Stopping waited for no running request: one still recording its outcome (here made
        slow) was missing from the state saved at exit, its spending forgotten by the restart."""
        original = llm_proxy.AdminView.record

        def slow_record(view: llm_proxy.AdminView, call: llm_proxy.Call) -> None:
            time.sleep(0.3)  # (not a refill: a request slow to end, as under load)
            original(view, call)

        with mock.patch.object(llm_proxy.AdminView, "record", slow_record):
            self.assertEqual(self.chat().status, 200)  # answered; its handler is still ending
            self.stop(self.proxy)
        self.proxy = None
        with open(self.state_path) as file:
            ledger = json.load(file)["usage"]["key:" + llm_proxy.key_digest(CLIENT_KEY)]
        self.assertEqual(ledger["total"][0], 1)


if __name__ == "__main__":
    unittest.main()
