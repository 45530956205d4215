"""Limits that must hold whatever a client sends, however many connect (issue 18).

A red-team review found four ways around them: a request line dripped in a byte
at a time escaped CLIENT_TIMEOUT; running out of file descriptors before
MAX_CONNECTIONS left new clients unanswered and the accept loop spinning; a
request's method, model or names reached the logs raw and unbounded; and errors
refused before routing came in OpenAI's shape whatever API the path belongs to.
Each test here failed before its fix.  Run by the README's command,
``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import select
import socket
import time

from test_llm_proxy import WAIT, ProxyTestCase


def drip(sock: socket.socket, data: bytes, every: float) -> float | None:
    """Send ``data`` a byte at a time; how long until the proxy hung up, None if it never did."""
    started = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
            time.sleep(every)
            if select.select([sock], [], [], 0)[0] and sock.recv(65536) == b"":
                return time.monotonic() - started
        except OSError:  # reset: the proxy closed while bytes were still coming
            return time.monotonic() - started
    return None


class RequestLineDeadlineTests(ProxyTestCase):
    """CLIENT_TIMEOUT bounds a whole request from its first byte, the request line included."""

    def test_a_request_line_dripping_in_is_dropped_after_the_client_timeout(self) -> None:
        self.start_proxy(client_timeout=0.5, state_save_interval=0.1)  # deadlines checked every 0.1 s
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            # Each byte well within the socket's timeout: only the request's deadline can end it.
            held = drip(sock, b"GET /" + b"a" * 40, every=0.1)
        self.assertIsNotNone(held, "a request line dripping in held its connection for 4 s")
        self.assertLess(held, 2.0)
        self.assert_still_serving()
        self.assertEqual(self.chat().status, 200)
