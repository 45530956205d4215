"""Regression tests for defects found with real clients and a soak run (issue 8).

Each test failed before its fix.  Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import unittest

import llm_proxy
from test_llm_proxy import (CLIENT_KEY, HERE, WAIT, ProxyTestCase,
                            clean_environment, free_port, write_keys_file)

class KeysFileEditTests(unittest.TestCase):
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

