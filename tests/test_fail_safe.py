"""Fail-safe findings of a red-team review (issue 18), over real loopback sockets.

Each test failed before its fix.  Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import unittest
from unittest import mock

import llm_proxy
from test_llm_proxy import CLIENT_KEY, OTHER_KEY, ProxyTestCase

CONFIG = llm_proxy.Config(upstream_url="http://127.0.0.1:9/v1")
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


# --------------------------------------------------------------------------
# 1. A malformed keys file must not end the housekeeping thread
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
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.keys_path = os.path.join(directory.name, "keys.json")
        self.write_keys(json.dumps(self.keys(bob_enabled=True)))
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
        self.write_keys(json.dumps(self.keys(bob_enabled=False)))
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


if __name__ == "__main__":
    unittest.main()
