"""The hot path's shortcuts answer exactly as the general code they stand in for (issue 12).

Each shortcut (a header block read in one match, JSON handed to the C scanner
directly ...) is checked against the slower path it skips, over inputs chosen to
sit on the edges: whatever one accepts the other accepts, with the same result,
and whatever one refuses the other refuses.  The system calls saved keep their
promises too: the disconnect watch, made once per connection, still notices every
request's client leaving (with epoll and with selectors), and timeouts kept by the
kernel still end a silent read and a write nobody takes, as Python's did.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import threading
import time
import unittest
from unittest import mock

import llm_proxy
from test_llm_proxy import WAIT, ProxyTestCase


class NoPeek(io.BufferedReader):
    """A reader with nothing buffered in advance: read_headers must go line by line."""

    def peek(self, size: int = 0) -> bytes:
        return b""


def headers_both_ways(block: bytes) -> list[tuple[object, bytes]]:
    """What each path makes of ``block`` followed by a body: fields (or the error), and what is left."""
    results = []
    for reader_class in (io.BufferedReader, NoPeek):  # the first with room for any block
        reader = reader_class(io.BytesIO(block + b"BODY\r\n\r\nX: y\r\n\r\n"), 1 << 20)
        try:
            headers = llm_proxy.read_headers(reader)
            outcome: object = (headers.items(), headers.lowered)
        except llm_proxy.HeaderError as error:
            outcome = ("error", error.status)
        results.append((outcome, reader.read()))
    return results


HEADER_BLOCKS = [
    b"\r\n",
    b"Host: a\r\n\r\n",
    b"Host: a\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n",
    b"X-Blank:\r\n\r\n",
    b"X-Spaces:   padded value \t \r\n\r\n",
    b"X-Inner: a  b\tc\r\n\r\n",
    b"X-Latin: caf\xe9\r\n\r\n",
    b"X-Dup: 1\r\nx-dup: 2\r\nX-DUP: 3\r\n\r\n",
    b"Host: a\n\n",                         # bare LF endings
    b"Host: a\r\nX: b\n\r\n",                # mixed endings
    b"Host: a\r\n\nX: b\r\n\r\n",            # a bare LF blank line ends the block early
    b"Host a\r\n\r\n",                       # no colon
    b"Host : a\r\n\r\n",                     # blank before the colon
    b" Host: a\r\n\r\n",                     # folded (obs-fold) first line
    b"Host: a\r\n continued\r\n\r\n",        # folded line
    b"Host: a\rb\r\n\r\n",                   # a bare CR in a value
    b"Host: a\x00b\r\n\r\n",                 # a control character
    b"Host: a\x7f\r\n\r\n",
    b"H\xe9st: a\r\n\r\n",                   # a non-token name
    b":\r\n\r\n",
    b"Host: a\r\n",                          # ends inside the headers (no blank line)
    b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n",
    b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
    b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n",   # one line over MAX_LINE
    b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80)) + b"\r\n",  # a long block
]


class HeaderBlockTests(unittest.TestCase):
    def test_the_one_match_path_agrees_with_the_line_by_line_path(self) -> None:
        for block in HEADER_BLOCKS:
            with self.subTest(block=block[:60]):
                fast, slow = headers_both_ways(block)
                self.assertEqual(fast, slow)

    def test_what_the_paths_make_of_a_block(self) -> None:
        (outcome, rest), _ = headers_both_ways(b"X-Dup: 1\r\nContent-Type:  json \r\nx-dup: 2\r\n\r\n")
        self.assertEqual(outcome, ([("X-Dup", "1"), ("Content-Type", "json"), ("x-dup", "2")],
                                   ["x-dup", "content-type", "x-dup"]))
        self.assertEqual(rest, b"BODY\r\n\r\nX: y\r\n\r\n")  # the body is left where it was
        for block, status in ((b"Host a\r\n\r\n", 400),
                              (b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", 431)):
            (outcome, _), _ = headers_both_ways(block)
            self.assertEqual(outcome, ("error", status))

    def test_lookups_with_and_without_repeated_names(self) -> None:
        reader = io.BufferedReader(io.BytesIO(b"Connection: a\r\nHost: h\r\nconnection: b\r\n\r\n"))
        headers = llm_proxy.read_headers(reader)
        self.assertEqual(headers.get("CONNECTION"), "a")
        self.assertEqual(headers.get_all("Connection"), ["a", "b"])
        self.assertEqual(headers.get_all("host"), ["h"])
        self.assertEqual(headers.get_all("x-none"), [])
        self.assertIsNone(headers.get("x-none"))
        single = llm_proxy.read_headers(io.BufferedReader(io.BytesIO(b"Host: h\r\n\r\n")))
        self.assertEqual(single.get_all("HOST"), ["h"])
        self.assertEqual(single.get_all("x-none"), [])


JSON_INPUTS = [
    b'{"a": 1}', b'{"a": 1}  \r\n\t', b'{"a": 1} x', b'{"a": 1} \r\n x', b'{"a": 1}{}',
    b"{", b"{}", b"{ }",
    b' {"a": 1}', b'\xef\xbb\xbf{"a": 1}', b'{"a": "caf\xc3\xa9"}', b'{"a": "\xff"}',
    b'{"a": "\\ud800"}', b'{"a": NaN, "b": -Infinity}', b'{"a": 1e400}', b'{"a": [1, 2.5, null]}',
    b"[1]", b'"s"', b"", b"   ", b'{"a": "\x01"}', b'{"a": 1,}', b"{" * 100_000,
    '{"a": "x"}'.encode("utf-16"), '{"a": "x"}'.encode("utf-16-le"), '{"a": "x"}'.encode("utf-32-le"),
    '{"a": "x"}'.encode("utf-16-be"),
]


class JsonTests(unittest.TestCase):
    def test_parse_json_is_json_loads(self) -> None:
        for data in JSON_INPUTS:
            with self.subTest(data=data[:40]):
                expected = outcome(json.loads, data)
                got = outcome(llm_proxy.parse_json, data)
                self.assertEqual(repr(got), repr(expected))


class ReusedWatchTests(ProxyTestCase):
    """A connection's disconnect watch is made once and armed for each request in turn.

    With epoll the connection is registered once, for the client closing its side
    (or resetting); elsewhere each request registers through ``selectors``.  Every
    test runs with both.
    """

    REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s"
    BODY = json.dumps({"messages": []}).encode()

    def each_mechanism(self) -> list[str]:
        names = ["epoll"] if llm_proxy._EPOLL_HANG_UP else []
        return names + ["selectors"]

    def use(self, mechanism: str) -> None:
        if mechanism == "selectors":
            patch = mock.patch.object(llm_proxy, "_EPOLL_HANG_UP", 0)
            patch.start()
            self.addCleanup(patch.stop)
        self.start_proxy()
        self.upstream.closed_early.clear()
        self.assertEqual(self.proxy.watcher._epoll is None, mechanism == "selectors")

    def answered(self, sock: socket.socket) -> None:
        sock.sendall(self.REQUEST % (b"", len(self.BODY), self.BODY))
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
            reply += sock.recv(65536)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:40])

    def held(self, sock: socket.socket, requests_before: int) -> None:
        sock.sendall(self.REQUEST % (b"X-Fake: hold-until-closed\r\n", len(self.BODY), self.BODY))
        self.wait_for(lambda: len(self.upstream.requests) == requests_before + 1)

    def test_a_later_request_on_a_kept_connection_is_still_watched(self) -> None:
        for mechanism in self.each_mechanism():
            with self.subTest(mechanism):
                self.use(mechanism)
                before = len(self.upstream.requests)
                with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
                    for _ in range(2):  # answered: the watch is armed, then cancelled, twice
                        self.answered(sock)
                    self.held(sock, before + 2)
                self.assertTrue(self.upstream.closed_early.wait(1.0), "upstream kept generating")
                self.wait_for(lambda: self.proxy.upstreams.in_flight == 0)

    def test_a_client_that_closes_its_side_after_its_next_request_is_noticed(self) -> None:
        # The close can arrive before that request is armed: the watch must be renewed.
        # Noticed early, the request is never sent; later, the upstream is hung up on.
        for mechanism in self.each_mechanism():
            for trial in range(3):
                with self.subTest(mechanism, trial=trial):
                    self.use(mechanism)
                    self.proxy.console.flush()
                    lines = self.console.getvalue().count("\n")
                    with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
                        self.answered(sock)
                        before = len(self.upstream.requests)
                        sock.sendall(self.REQUEST % (b"X-Fake: hold-until-closed\r\n", len(self.BODY),
                                                     self.BODY))
                        sock.shutdown(socket.SHUT_WR)
                        self.logged(lines + 2)
                    self.assertIn(" 499 error ", self.console.getvalue().splitlines()[-1])
                    if len(self.upstream.requests) > before:
                        self.assertTrue(self.upstream.closed_early.wait(WAIT), "upstream kept generating")
                    self.wait_for(lambda: self.proxy.upstreams.in_flight == 0)

    def test_a_client_that_resets_is_noticed(self) -> None:
        for mechanism in self.each_mechanism():
            with self.subTest(mechanism):
                self.use(mechanism)
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
                self.answered(sock)
                self.held(sock, len(self.upstream.requests))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # a reset, not a FIN
                self.assertTrue(self.upstream.closed_early.wait(1.0), "upstream kept generating")
                self.wait_for(lambda: self.proxy.upstreams.in_flight == 0)

    def test_a_connection_that_ends_leaves_no_watch_behind(self) -> None:
        for mechanism in self.each_mechanism():
            with self.subTest(mechanism):
                self.use(mechanism)
                for _ in range(20):
                    with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
                        self.answered(sock)
                # (threads waiting in the worker pool for the next connection are not left behind)
                self.wait_for(lambda: not self.proxy.watcher._watches
                              and threading.active_count() - self.proxy.workers._idle
                              <= self.baseline_threads + 8)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


@unittest.skipUnless(llm_proxy.KERNEL_TIMEOUTS, "kernel socket timeouts are used on Linux only")
class TimedSocketTests(unittest.TestCase):
    """Timeouts kept by the kernel behave as Python's own: socket.timeout, whole writes bounded."""

    def pair(self, seconds: float) -> tuple[socket.socket, socket.socket]:
        near, far = tcp_pair()
        near.settimeout(5.0)  # made non-blocking by a Python timeout, as create_connection does
        timed = llm_proxy.TimedSocket.adopt(near, seconds)
        self.addCleanup(timed.close)
        self.addCleanup(far.close)
        return timed, far

    def test_adopted_socket_blocks_and_the_kernel_keeps_the_timeout(self) -> None:
        timed, far = self.pair(0.25)
        self.assertIsInstance(timed, llm_proxy.TimedSocket)
        self.assertIsNone(timed.gettimeout())
        far.sendall(b"ping")
        self.assertEqual(timed.recv(4), b"ping")  # blocking: waits for data, no EAGAIN
        buffer = bytearray(4)
        far.sendall(b"pong")
        self.assertEqual(timed.recv_into(buffer), 4)

    def test_a_silent_peer_is_a_socket_timeout(self) -> None:
        timed, _ = self.pair(0.2)
        began = time.monotonic()
        with self.assertRaises(socket.timeout):
            timed.recv(10)
        with self.assertRaises(socket.timeout):
            timed.recv_into(bytearray(10))
        self.assertLess(time.monotonic() - began, 2.0)

    def test_a_write_nobody_reads_ends_within_the_timeout(self) -> None:
        timed, _ = self.pair(0.5)
        began = time.monotonic()
        with self.assertRaises(socket.timeout):
            timed.sendall(b"x" * (64 << 20))
        self.assertLess(time.monotonic() - began, 1.5)  # the whole write, not a timeout per send
        # (3 x the timeout: copying 64 MiB into the socket takes its time on a busy machine)

    def test_a_trickling_reader_cannot_hold_a_write_open(self) -> None:
        timed, far = self.pair(0.3)
        timed.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # small buffers both ends:
        far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)    # each read frees room at once
        stop = threading.Event()

        def trickle() -> None:  # a little now and then: every kernel send makes some progress
            with contextlib.suppress(OSError):
                while not stop.wait(0.01):
                    far.recv(2048)

        reader = threading.Thread(target=trickle)
        reader.start()
        self.addCleanup(reader.join)
        self.addCleanup(stop.set)
        began = time.monotonic()
        with self.assertRaises(socket.timeout):
            timed.sendall(b"x" * (8 << 20))
        self.assertLess(time.monotonic() - began, 2.0)  # not the 40 s the reader would take


def outcome(parse, data: bytes) -> object:
    try:
        return parse(data)
    except RecursionError:
        return "RecursionError"
    except ValueError as error:  # and where: a JSONDecodeError's message ends with its position
        return f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    unittest.main()
