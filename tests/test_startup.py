"""Startup warnings for variables that look like a misspelt setting (issue 19).

A misspelt setting is ignored without a word: ``ADMIN_API_KEY`` leaves the dashboard
off, ``MAX_TOKEN`` leaves every bucket at 10.  Each test failed before the warning
existed.  Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import unittest

import llm_proxy
from llm_proxy import Config
from test_llm_proxy import clean_environment, free_port, startup_output

SECRET = "sk-admin-SECRET-0123456789"

# What a shell, systemd, Docker or Kubernetes commonly sets: none of it is the proxy's
UNRELATED = {
    "PATH": "/usr/bin:/bin", "HOME": "/home/ada", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
    "USER": "ada", "LOGNAME": "ada", "SHELL": "/bin/bash", "TERM": "xterm", "PWD": "/opt",
    "OLDPWD": "/", "SHLVL": "1", "TZ": "Europe/Berlin", "TMPDIR": "/tmp", "EDITOR": "vi",
    "HOSTNAME": "gpu-box", "HOSTTYPE": "x86_64", "DISPLAY": ":0", "MAIL": "/var/mail/ada",
    "PYTHONPATH": "/opt", "PYTHONUNBUFFERED": "1", "VIRTUAL_ENV": "/opt/venv",
    "INVOCATION_ID": "0f3c", "JOURNAL_STREAM": "8:1234", "NOTIFY_SOCKET": "/run/systemd/notify",
    "HTTP_PROXY": "http://squid:3128", "HTTPS_PROXY": "http://squid:3128", "NO_PROXY": "localhost",
    "KUBERNETES_PORT": "tcp://10.0.0.1:443", "KUBERNETES_SERVICE_HOST": "10.0.0.1",
    "KUBERNETES_SERVICE_PORT": "443", "DOCKER_HOST": "unix:///run/docker.sock",
    "OLLAMA_HOST": "0.0.0.0", "OPENAI_API_KEY": "sk-other", "ANTHROPIC_API_KEY": "sk-other",
    "LLM_PROXY_SETTINGS": "/etc/llm_proxy.env", "PROXY_URL": "http://127.0.0.1:8899",
    "PROXY_KEY": "alice-key", "MODEL": "local-model",  # curl_local_proxy.sh's own variables
}


def warnings_for(environ: dict[str, str]) -> list[str]:
    """startup_warnings for this environment, listening on loopback (no open-mode warning)."""
    return llm_proxy.startup_warnings(Config.from_env({"HOST": "127.0.0.1", **environ}))


class NearMissTests(unittest.TestCase):
    def test_a_close_name_warns_naming_it_and_the_setting(self) -> None:
        cases = {"ADMIN_API_KEY": "ADMIN_KEY", "MAX_TOKEN": "MAX_TOKENS", "BASE_URL": "BASE_API_URL",
                 "UPSTREAM_URL": "UPSTREAM_BASE_URL", "KEY_FILE": "KEYS_FILE",
                 "PROXY_API_KEY": "PROXY_API_KEYS", "ACCESS_LOG_FILE": "ACCESS_LOG",
                 "max_tokens": "MAX_TOKENS", "Base_Api_Url": "BASE_API_URL"}
        for variable, setting in cases.items():
            with self.subTest(variable=variable):
                warnings = warnings_for({variable: "20000"})
                self.assertEqual(len(warnings), 1, warnings)
                self.assertIn(variable, warnings[0])
                self.assertIn(f"did you mean {setting}?", warnings[0])

    def test_the_value_never_appears(self) -> None:
        warnings = warnings_for({"ADMIN_API_KEY": SECRET, "BASE_KEY": SECRET})
        self.assertEqual(len(warnings), 2, warnings)
        for warning in warnings:
            self.assertNotIn(SECRET, warning)
            self.assertNotIn("0123456789", warning)

    def test_unrelated_variables_never_warn(self) -> None:
        environ = {**clean_environment(), **UNRELATED, "MAX_TOKEN": "20000"}  # and this machine's
        warnings = warnings_for(environ)
        self.assertEqual(len(warnings), 1, warnings)  # MAX_TOKEN's, and nothing else
        self.assertIn("MAX_TOKEN is set", warnings[0])

    def test_a_correct_name_does_not_warn(self) -> None:
        environ = {"ADMIN_KEY": SECRET, "MAX_TOKENS": "20000", "REFILL_TOKENS": "20000",
                   "KEYS_FILE": "keys.json", "PROXY_API_KEYS": "a,b", "STATE_FILE": "state.json",
                   "UPSTREAM_BASE_URL": "http://127.0.0.1:8080/v1", "BASE_API_URL": "http://x/v1",
                   "base_api_url": "http://y/v1", "base_api_key": "k", "base_model": "m",
                   "ACCESS_LOG": "access.log", "MAX_CONNECTIONS": "100",
                   "ADMIN_API_KEY": SECRET, "REFILL_TOKEN": ""}  # empty: unset, as for a setting
        warnings = warnings_for(environ)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertTrue(warnings[0].startswith("ADMIN_API_KEY is set"), warnings)
        self.assertIn("did you mean ADMIN_KEY?", warnings[0])

    def test_the_running_proxy_logs_the_warning_without_the_value(self) -> None:
        line, output, errors = startup_output({"PORT": str(free_port()), "ADMIN_API_KEY": SECRET}, "--demo")
        self.assertIn("listening on", line)
        logged = [entry for entry in errors.splitlines() if "ADMIN_API_KEY" in entry]
        self.assertEqual(len(logged), 1, errors)
        self.assertIn(" WARNING ADMIN_API_KEY is set", logged[0])
        self.assertIn("did you mean ADMIN_KEY?", logged[0])
        self.assertNotIn(SECRET, line + output + errors)


if __name__ == "__main__":
    unittest.main()
