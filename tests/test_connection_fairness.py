"""One client address cannot take every connection (issue 18: no caller can starve the accept loop).

MAX_CONNECTIONS was one pool for everyone: a client that opened as many idle
connections as it allows, without a key and without sending a byte, got every
other caller a fast 503 for as long as it kept renewing them.
MAX_CONNECTIONS_PER_CLIENT caps what one address may hold (half the pool unless
set), and past it that client gets the 503 itself.

The proxy tells clients apart by address only, so these tests connect from a
second loopback address, 127.0.0.2 (all of 127/8 is loopback on Linux), beside
the 127.0.0.1 the other fixtures use; where it cannot be bound they are skipped.
Each test failed before the fix.  Run by the README's command,
``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from unittest import mock

import llm_proxy
from llm_proxy import Config, ConfigError
from test_llm_proxy import WAIT, ProxyTestCase, read_to_close


HOLDER = "127.0.0.2"  # the client that holds connections
OTHER = "127.0.0.1"   # everyone else: what self.chat() and self.raw() connect from
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
CAP_LOG = "MAX_CONNECTIONS_PER_CLIENT"  # in the one warning line a capped client earns


def can_bind(host: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, 0))
        except OSError:
            return False
    return True


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


read_until_close = read_to_close  # (the shared fixture's)


def length(answer: bytes) -> int:
    """The Content-Length of an answer whose head has come (a 200 keeps the connection open)."""
    head = answer.partition(b"\r\n\r\n")[0].lower()
    return int(head.partition(b"\r\ncontent-length:")[2].partition(b"\r\n")[0])


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


class ConnectionFairnessTests(ProxyTestCase):
    """Connections counted per client address, beside the one pool of MAX_CONNECTIONS."""

    config_overrides = {"max_connections": 4}  # so each address's default share is 2

    def setUp(self) -> None:
        if not can_bind(HOLDER):
            self.skipTest(f"cannot bind a client socket to {HOLDER}")
        super().setUp()

    # -- helpers -------------------------------------------------------------

    def connect_from(self, host: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT,
                                        source_address=(host, 0))
        self.addCleanup(sock.close)
        return sock

    def open_idle(self, host: str, count: int) -> list[socket.socket]:
        """Open ``count`` connections from ``host`` that send nothing; those the proxy kept.

        Each is opened once the one before it was admitted (counted) or refused (answered
        and closed), so what the proxy did with each is known, not raced.
        """
        kept = []
        for _ in range(count):
            before = self.proxy.connection_count
            sock = self.connect_from(host)
            self.wait_for(lambda: self.proxy.connection_count > before or readable(sock))
            if readable(sock):
                self.assertEqual(status_of(read_until_close(sock)), 503)
                sock.close()
            else:
                kept.append(sock)
        return kept

    def ask_health(self, host: str) -> tuple[bytes, float]:
        """GET /health from ``host``: the whole answer, and how long it took to come."""
        started = time.monotonic()
        sock = self.connect_from(host)
        sock.sendall(HEALTH)
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # (a refusal may end in a reset)
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < length(answer):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        sock.close()
        return answer, time.monotonic() - started

    def close_all(self, sockets: list[socket.socket], remaining: int = 0) -> None:
        """Close ``sockets``, and wait for the proxy to have ended them (``remaining`` left)."""
        for sock in sockets:
            sock.close()
        self.wait_for(lambda: self.proxy.connection_count == remaining)

    def cap_warnings(self) -> list[str]:
        return [line for line in self.log.lines if CAP_LOG in line]

    # -- tests ---------------------------------------------------------------

    def test_an_address_holding_its_share_cannot_keep_another_from_being_served(self) -> None:
        held = self.open_idle(HOLDER, 4)  # as many as MAX_CONNECTIONS: the red team's attack
        self.assertEqual(self.chat().status, 200, "a keyed caller from another address is served")
        answer, _ = self.ask_health(OTHER)
        self.assertEqual(status_of(answer), 200)
        self.assertEqual(len(held), 2, "the holder kept half of MAX_CONNECTIONS, no more")
        self.wait_for(lambda: self.proxy.connections_by_client == {HOLDER: 2})  # the others ended
        self.close_all(held)

    def test_past_its_share_an_address_gets_the_fast_503_in_the_usual_shape(self) -> None:
        held = self.open_idle(HOLDER, 2)
        answer, took = self.ask_health(HOLDER)
        self.assertLess(took, 1.0, "the refusal is fast")
        head, _, body = answer.partition(b"\r\n\r\n")
        head += b"\r\n"
        self.assertEqual(status_of(answer), 503, answer[:300])
        self.assertIn(b"\r\nRetry-After: 1\r\n", head)
        self.assertIn(b"\r\nConnection: close\r\n", head)
        self.assertIn(b"\r\nContent-Type: application/json\r\n", head)
        self.assertEqual(json.loads(body), {"error": {
            "message": "Too many connections; try again shortly.", "type": "server_error",
            "param": None, "code": "too_many_connections"}})
        self.assertEqual(self.proxy.connections_by_client, {HOLDER: 2}, "the refused one is not counted")
        self.close_all(held)

    def test_a_capped_address_is_logged_once_until_it_holds_no_connection(self) -> None:
        held = self.open_idle(HOLDER, 2)
        for _ in range(3):
            self.assertEqual(status_of(self.ask_health(HOLDER)[0]), 503)
        self.assertEqual(len(self.cap_warnings()), 1, self.log.lines)
        self.assertIn(HOLDER, self.cap_warnings()[0])
        self.close_all(held[:1], remaining=1)
        held = held[1:] + self.open_idle(HOLDER, 2)
        self.assertEqual(len(held), 2, "one slot free again: taken, and the next refused")
        self.assertEqual(len(self.cap_warnings()), 1, "the same episode: it never let go of all")
        self.close_all(held)
        self.open_idle(HOLDER, 3)
        self.assertEqual(len(self.cap_warnings()), 2, "it held none in between: a new episode")

    def test_counts_return_to_zero_and_addresses_are_forgotten_when_connections_close(self) -> None:
        self.start_proxy(max_connections=64)
        held = self.open_idle(HOLDER, 32) + self.open_idle(OTHER, 1)
        self.assertEqual(len(held), 33, "its whole share of 32, and one from elsewhere")
        self.assertEqual(self.proxy.connections_by_client, {HOLDER: 32, OTHER: 1})
        self.close_all(held)
        self.assertEqual(self.proxy.connections_by_client, {})
        # Many addresses, one connection each: none is remembered once it has gone.
        addresses = [f"127.0.0.{last}" for last in range(3, 43)]
        many = [sock for address in addresses for sock in self.open_idle(address, 1)]
        self.assertEqual(len(self.proxy.connections_by_client), len(addresses))
        self.close_all(many)
        self.assertEqual(self.proxy.connections_by_client, {})
        self.assertEqual(self.proxy.connection_count, 0)

    def test_zero_turns_the_per_address_cap_off(self) -> None:
        self.start_proxy(max_connections=4, max_connections_per_client=0)
        held = self.open_idle(HOLDER, 5)
        self.assertEqual(len(held), 4, "one address may hold the whole pool; the fifth is refused")
        self.assertEqual(status_of(self.ask_health(OTHER)[0]), 503, "the pool is full")
        self.assertEqual(self.cap_warnings(), [], "the global cap is no client's cap")
        self.close_all(held)

    def test_the_setting_reads_zero_and_whole_numbers_and_defaults_to_unset(self) -> None:
        self.assertIsNone(Config.from_env({}).max_connections_per_client)
        self.assertEqual(Config.from_env({"MAX_CONNECTIONS_PER_CLIENT": "0"}).max_connections_per_client, 0)
        self.assertEqual(Config.from_env({"MAX_CONNECTIONS_PER_CLIENT": "3"}).max_connections_per_client, 3)
        for bad in ("-1", "half", "1.5"):
            with self.assertRaisesRegex(ConfigError, "MAX_CONNECTIONS_PER_CLIENT"):
                Config.from_env({"MAX_CONNECTIONS_PER_CLIENT": bad})
        self.assertIn("MAX_CONNECTIONS_PER_CLIENT", llm_proxy.settings_help())

    def test_the_default_is_half_of_max_connections_and_an_explicit_cap_stays(self) -> None:
        for max_connections, per_client, cap in ((1024, None, 512), (5, None, 2), (1, None, 1),
                                                  (4, 3, 3), (4, 0, 0)):
            with self.subTest(max_connections=max_connections, per_client=per_client):
                self.start_proxy(max_connections=max_connections,
                                 max_connections_per_client=per_client)
                self.assertEqual(self.proxy.connections_per_client_cap, cap)
        # A TrackedServer that is not the proxy (the demo's echo model, this fake upstream) has one
        # client, the proxy, which may need every connection.
        self.assertEqual(self.upstream.connections_per_client_cap, 0)

    def test_the_default_follows_max_connections_lowered_to_fit_the_descriptor_limit(self) -> None:
        self.start_proxy()  # MAX_CONNECTIONS 1024, the default
        room_for_six = self.proxy.descriptors_needed(6)
        with mock.patch.object(llm_proxy, "raise_descriptor_limit", return_value=room_for_six):
            warnings = self.proxy.fit_to_descriptor_limit()
        self.assertIn("MAX_CONNECTIONS lowered from 1024 to 6", warnings[0])
        held = self.open_idle(HOLDER, 6)
        self.assertEqual(len(held), 3, "half of the 6 connections fitted, not of the 1024 asked for")
        self.assertEqual(status_of(self.ask_health(OTHER)[0]), 200)
        self.close_all(held)

    def test_an_ipv4_mapped_ipv6_address_counts_as_its_ipv4_address(self) -> None:
        client_host = llm_proxy.client_host
        self.assertEqual(client_host(("::ffff:127.0.0.2", 40000, 0, 0)), HOLDER)
        self.assertEqual(client_host(("::FFFF:7f00:2", 40000, 0, 0)), HOLDER)
        self.assertEqual(client_host((HOLDER, 40000)), HOLDER)
        self.assertEqual(client_host(("::1", 40000, 0, 0)), "::1")
        # A connection that came as ::ffff:127.0.0.2 finds 127.0.0.2's share already taken.
        held = self.open_idle(HOLDER, 2)
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        self.proxy.process_request(theirs, ("::ffff:127.0.0.2", 40000, 0, 0))
        ours.settimeout(WAIT)
        self.assertEqual(status_of(read_until_close(ours)), 503)
        self.assertEqual(self.proxy.connections_by_client, {HOLDER: 2})
        self.close_all(held)
