"""What the README tells a user to run works as written, and every file it names is there.

The two scripts end to end against the echo model, the demo's printed curl line,
every keys-file example in the README, and every path the README and the scripts
name (a .gitignore can hide one).  Run by ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import unittest
import urllib.request
from unittest import mock

import llm_proxy
from test_llm_proxy import HERE, WAIT, clean_environment, free_port


class ScriptTests(unittest.TestCase):
    """run_local_proxy.sh and curl_local_proxy.sh, end to end against the echo model."""

    def test_run_script_with_saved_settings_and_curl_script(self) -> None:
        echo = llm_proxy.start_echo_model(word_delay=0)
        self.addCleanup(lambda: (echo.shutdown(), echo.server_close()))
        port = free_port()
        with open(os.path.join(self.tmp(), "saved.env"), "w") as saved:  # (curl's script reads
            saved.write("# saved\nMAX_TOKENS=7\nREFILL_TOKENS=3\nBASE_API_URL='http://127.0.0.1:9/v1'\n"
                        f"PORT={port}\r\nPROXY_API_KEYS='saved-key,other'\n")  # its port and key too)
        env = clean_environment()
        env.update(LLM_PROXY_SETTINGS=saved.name, REFILL_TOKENS="4",
                   BASE_API_URL=f"http://127.0.0.1:{echo.server_address[1]}/v1")
        process = subprocess.Popen(["bash", os.path.join(HERE, "run_local_proxy.sh")], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = process.stdout.readline()
            self.assertIn(f"listening on http://127.0.0.1:{port}", line)
            self.assertIn("7 tokens, +4 every", line)  # saved file read, environment wins
            result = subprocess.run(["bash", os.path.join(HERE, "curl_local_proxy.sh")], env=env,
                                    capture_output=True, text=True, timeout=WAIT)
        finally:
            process.terminate()
            process.communicate(timeout=WAIT)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("status: 200", result.stdout)
        self.assertIn("X-RateLimit-Remaining: 6", result.stdout)
        self.assertIn("reply: echo: Reply with exactly: proxy ok", result.stdout)

    def tmp(self) -> str:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        return directory.name


class DemoBannerTests(unittest.TestCase):
    """The demo's curl line works as printed, also when keys are set."""

    def test_printed_curl_command_is_served(self) -> None:
        env = clean_environment()
        env.update({"PROXY_API_KEYS": "key-a,key-b", "PORT": str(free_port())})
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py"), "--demo"],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            banner = ""
            while "Add \"stream\"" not in banner:
                line = process.stdout.readline()
                self.assertTrue(line, "the demo banner ended early")
                banner += line
            match = re.search(r"curl -s (http://\S+) -H 'Authorization: Bearer ([^']+)'", banner)
            self.assertIsNotNone(match, banner)
            url, key = match.groups()
            request = urllib.request.Request(url, json.dumps(
                {"messages": [{"role": "user", "content": "hello"}]}).encode(),
                {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=WAIT) as answer:
                self.assertEqual(json.loads(answer.read())["choices"][0]["message"]["content"],
                                 "echo: hello")
        finally:
            process.terminate()
            process.communicate(timeout=WAIT)


class ReadmeFilesTests(unittest.TestCase):
    """Every file the README and the scripts name is in the repository (a .gitignore can hide one)."""

    def test_named_files_are_tracked(self) -> None:
        text = ""
        for name in ("README.md", "run_local_proxy.sh", "curl_local_proxy.sh"):
            with open(os.path.join(HERE, name), encoding="utf-8") as file:
                text += file.read()
        named = set(re.findall(r"\b((?:examples|bench|tests|\.ci)/[A-Za-z0-9_.\-/]*[A-Za-z0-9_])", text))
        self.assertTrue(named)
        if os.path.isdir(os.path.join(HERE, ".git")):
            listed = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True)
            tracked = set(listed.stdout.split())
        else:  # an exported tree: the files must at least be there
            tracked = {name for name in named if os.path.exists(os.path.join(HERE, name))}
        missing = sorted(name for name in named
                         if name not in tracked and not any(t.startswith(name + "/") for t in tracked))
        self.assertEqual(missing, [], "named in the README or a script but not in the repository")

    def test_every_keys_file_example_in_the_readme_is_accepted(self) -> None:
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
            blocks = re.findall(r"```json\n(.*?)```", file.read(), re.S)
        config = llm_proxy.Config(upstream_url="http://127.0.0.1:9/v1")
        examples = 0
        with mock.patch.dict(os.environ, {"OPENWEBUI_JWT_SECRET": "s" * 32}):
            for block in blocks:
                try:
                    data = json.loads(block)
                except ValueError:
                    continue  # a reply or a record shown with "...", not a keys file
                if isinstance(data, dict) and data and all(
                        isinstance(v, dict) and ("name" in v or "buckets" in v) for v in data.values()):
                    self.assertEqual(len(llm_proxy.parse_keys_file(block, config)), len(data))
                    examples += 1
        self.assertGreaterEqual(examples, 3)
