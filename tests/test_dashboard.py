"""The dashboard in a real browser: headless Chromium logs in and reads the table (issue 11).

Chromium is driven over ``--remote-debugging-pipe`` (DevTools protocol messages on
file descriptors 3 and 4, separated by NUL), which needs nothing beyond the standard
library.  Where Chromium is not installed the test is reported as skipped, never as
passed; ``.ci/run`` installs Debian's ``chromium`` when it is missing.  Set
``DASHBOARD_SCREENSHOT=/path/file.png`` to keep a screenshot of what it saw.
Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import unittest
from unittest import mock

import llm_proxy
from test_llm_proxy import CLIENT_KEY, OTHER_KEY, WAIT, ProxyTestCase, write_keys_file

ADMIN_KEY = "adm-7Hq2-secret-dashboard"
SIGN_OUT_SHOWN = "document.getElementById('logout').offsetParent !== null"
CHROMIUM = next((path for path in (shutil.which("chromium"), shutil.which("chromium-browser"),
                                   shutil.which("google-chrome")) if path), None)


class Chromium:
    """One headless Chromium and one page, spoken to in the DevTools protocol."""

    def __init__(self) -> None:
        self.profile = tempfile.TemporaryDirectory()
        commands_read, self.commands = os.pipe()
        self.events, events_write = os.pipe()

        def wire_pipes() -> None:  # the browser reads commands on fd 3 and answers on fd 4
            os.dup2(commands_read, 3)
            os.dup2(events_write, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-extensions", "--window-size=1280,900",
             f"--user-data-dir={self.profile.name}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=wire_pipes)
        os.close(commands_read)
        os.close(events_write)
        self.buffer = b""
        self.next_id = 0
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, session: bool = False, **params: object) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            while b"\0" in self.buffer:
                raw, _, self.buffer = self.buffer.partition(b"\0")
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            data = os.read(self.events, 1 << 20)
            if not data:
                raise RuntimeError("Chromium closed its pipe")
            self.buffer += data
        raise TimeoutError(method)

    def page(self, method: str, **params: object) -> dict:
        return self.send(method, session=True, **params)

    def evaluate(self, expression: str) -> object:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str) -> object:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"never true in the page: {expression}")

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.page("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):  # already gone
            self.send("Browser.close")
        try:
            self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(WAIT)
        os.close(self.commands)
        os.close(self.events)
        self.profile.cleanup()


@unittest.skipIf(CHROMIUM is None, "Chromium is not installed (apt-get install chromium)")
class DashboardBrowserTests(ProxyTestCase):
    config_overrides = {"admin_key": ADMIN_KEY, "client_keys": (CLIENT_KEY, OTHER_KEY)}

    def test_log_in_with_enter_and_read_the_table(self) -> None:
        keys = write_keys_file(self, {CLIENT_KEY: {"name": "ada", "max_tokens": 20, "buckets": [
            {"name": "hourly", "max_tokens": 20, "refill_tokens": 20, "refill_interval_seconds": 3600},
            {"name": "daily", "max_tokens": 50, "refill_tokens": 50, "refill_interval_seconds": 86400}]},
            OTHER_KEY: {"name": "alan<script>", "max_tokens": 5}})
        self.start_proxy(admin_key=ADMIN_KEY, keys_file=keys)
        close_charge = llm_proxy.Call.close_charge

        def priced(call: llm_proxy.Call) -> None:  # as MODELS_FILE's prices would
            close_charge(call)
            call.cost = 0.0123 if call.served else 0.0
        patcher = mock.patch.object(llm_proxy.Call, "close_charge", priced)
        patcher.start()
        self.addCleanup(patcher.stop)
        patcher = mock.patch.object(llm_proxy.AdminView, "currency", lambda view: "USD")
        patcher.start()
        self.addCleanup(patcher.stop)
        for _ in range(3):
            self.chat()
        self.chat(key=OTHER_KEY)
        browser = Chromium()
        self.addCleanup(browser.close)
        browser.page("Page.enable")
        browser.page("Page.navigate", url=f"http://127.0.0.1:{self.port}/admin")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('key')")
        browser.evaluate("document.getElementById('key').focus()")
        browser.page("Input.insertText", text=ADMIN_KEY)
        browser.press_enter()
        rows = browser.wait_for("""(() => { const rows = [...document.querySelectorAll('#rows tr')];
            return rows.length >= 2 && rows.map(r => [...r.cells].map(c => c.innerText)); })()""")
        by_name = {cells[0]: cells for cells in rows}
        self.assertEqual(set(by_name), {"ada", "alan<script>"})  # shown as text, never as markup
        ada = by_name["ada"]
        self.assertEqual(ada[1], "active")
        self.assertIn("hourly: 17 / 20", ada[2])
        self.assertIn("daily: 47 / 50", ada[2])
        self.assertEqual(ada[4], "3 / 3 / 3")  # requests today / 7 days / 30 days
        self.assertEqual(ada[6], "$0.0369 / $0.0369 / $0.0369")  # cost, in the currency
        totals = browser.evaluate("document.getElementById('totals').innerText")
        self.assertIn("$0.0492\ncost, 30 days", totals)
        self.assertEqual(browser.evaluate("document.querySelectorAll('script').length"), 1)
        self.assertTrue(browser.evaluate("document.querySelector('#chart svg rect') !== null"))
        self.assertIn("upstream up", browser.evaluate("document.getElementById('upstream').innerText"))
        self.assertEqual(browser.evaluate("sessionStorage.getItem('llm_proxy_admin')"), ADMIN_KEY)
        self.assertIsNone(browser.evaluate("localStorage.getItem('llm_proxy_admin')"))
        self.assertEqual(browser.evaluate("document.getElementById('key').value"), "")
        self.assertTrue(browser.evaluate(SIGN_OUT_SHOWN))
        shot = os.environ.get("DASHBOARD_SCREENSHOT")
        if shot:
            with open(shot, "wb") as file:
                file.write(base64.b64decode(browser.page("Page.captureScreenshot", format="png")["data"]))
        browser.evaluate("document.getElementById('logout').click()")
        browser.wait_for("document.readyState === 'complete' && !document.getElementById('login').hidden")
        self.assertFalse(browser.evaluate(SIGN_OUT_SHOWN))  # signed out: nothing to sign out of

    def test_a_wrong_key_is_told_and_gets_nothing(self) -> None:
        browser = Chromium()
        self.addCleanup(browser.close)
        browser.page("Page.navigate", url=f"http://127.0.0.1:{self.port}/admin")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('key')")
        self.assertFalse(browser.evaluate(SIGN_OUT_SHOWN))  # nobody signed in yet (issue 20)
        browser.evaluate("document.getElementById('key').focus()")
        browser.page("Input.insertText", text=CLIENT_KEY)  # a client key is not the admin key
        browser.press_enter()
        message = browser.wait_for("document.getElementById('message').innerText")
        self.assertIn("not accepted", message)
        self.assertFalse(browser.evaluate(SIGN_OUT_SHOWN))
        self.assertTrue(browser.evaluate("document.getElementById('view').hidden"))
