"""Connections that only wait are held by the connection loop, not a thread (issue 12).

A new connection waits there for its first request, a kept-alive one for its next
request after a stream, and a stream is relayed from there as soon as its upstream
makes the handler's thread wait.  These tests check that each of those really
happens (the loop's own maps say so), that the client cannot tell (same bytes,
same keep-alive, pipelined requests answered in order), and that the thread's
guarantees hold in the loop too: the charge settles, the log line is written,
the gate slot is freed, a client that stops reading is dropped after
CLIENT_TIMEOUT, and closing the server ends what the loop holds.  The chunk
decoder the loop relies on is checked to resume at every byte boundary.
"""

from __future__ import annotations

import gc
import http.client
import json
import random
import socket
import unittest
import weakref

import llm_proxy
from test_llm_proxy import CLIENT_KEY, OTHER_KEY, WAIT, ProxyTestCase


def stream_request(fake: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "stream": True}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"X-Fake: %s\r\n%sContent-Length: %d\r\n\r\n%s"
            % (CLIENT_KEY.encode(), fake.encode(), extra, len(body), body))


def read_answer(sock: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """One whole answer (chunked or with a length): its head, its body and what came after it."""
    data = buffered
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"!"
    head, _, rest = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            while len(rest) < size + 2:
                rest += sock.recv(65536)
            body, rest = body + rest[:size], rest[size + 2:]
            if size == 0:
                return head, body, rest
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest[:length], rest[length:]


class ConnectionLoopTests(ProxyTestCase):
    config_overrides = {"client_keys": (CLIENT_KEY, OTHER_KEY)}

    def relayed(self) -> int:
        return len(self.proxy.loop.streams)

    def parked(self) -> int:
        return len(self.proxy.loop._parked)

    def test_a_new_connection_waits_in_the_loop_until_it_speaks(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            self.wait_for(lambda: self.parked() == 1)
            self.assertEqual(self.proxy.connection_count, 1)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body, _ = read_answer(sock)
            self.assertTrue(head.startswith(b"HTTP/1.1 200"))
            self.assertEqual(json.loads(body), {"status": "ok"})
        self.wait_for(lambda: self.proxy.connection_count == 0)

    def test_an_idle_connection_is_closed_after_client_timeout(self) -> None:
        self.start_proxy(client_timeout=0.2)
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            self.wait_for(lambda: self.parked() == 1)
            self.assertEqual(sock.recv(1), b"")  # closed by the loop, no thread involved
        self.assertIn("idle connection closed after 0.2 s", self.written("idle connection"))
        self.wait_for(lambda: self.parked() == 0 and self.proxy.connection_count == 0)

    def test_a_stream_that_waits_is_relayed_by_the_loop_then_the_connection_is_reused(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(stream_request("pause-after-first"))
            self.assertTrue(self.upstream.first_event_sent.wait(WAIT))
            self.wait_for(lambda: self.relayed() == 1)  # the handler's thread has let go of it
            self.wait_for(lambda: self.proxy.workers._idle == 1)  # its thread waits for other work
            self.assertEqual(self.proxy.upstreams.in_flight, 1, "its gate slot is held while it streams")
            self.upstream.release.set()
            head, body, rest = read_answer(sock)
            self.assertTrue(head.startswith(b"HTTP/1.1 200"))
            self.assertIn(b"x-ratelimit-remaining", head.lower())
            events = [line for line in body.split(b"\n\n") if line]
            self.assertEqual(len(events), 6)
            self.assertEqual(events[-1], b"data: [DONE]")
            self.assertIn(b'"w4"', events[4])
            self.wait_for(lambda: self.relayed() == 0 and self.parked() == 1)
            self.logged(1)
            self.assertIn(" 200 ", self.console.getvalue())
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection again
            head, body, _ = read_answer(sock, rest)
            self.assertEqual(json.loads(body), {"status": "ok"})
        self.assertEqual(self.proxy.upstreams.in_flight, 0, "and given back when it ended")
        self.logged(2)

    def test_a_connection_waiting_after_a_stream_holds_nothing_of_it(self) -> None:
        """Its headers, Call, relay and upstream response go; about 6 KiB an idle connection."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(stream_request("pause-after-first"))
            self.wait_for(lambda: self.relayed() == 1)
            stream = next(iter(self.proxy.loop.streams))
            handler = stream.handler
            gone = [weakref.ref(stream.call), weakref.ref(stream.relay)]  # (the relay holds the response)
            del stream
            self.upstream.release.set()
            read_answer(sock)
            self.wait_for(lambda: self.parked() == 1)
            # (the loop's thread may still be unwinding from the stream's last event)
            self.wait_for(lambda: gc.collect() >= 0 and [ref() for ref in gone] == [None, None])
            self.assertIs(handler.headers, llm_proxy.NO_HEADERS)
            self.assertEqual((handler.command, handler.path), ("", ""))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # and it serves the next one
            head, body, _ = read_answer(sock)
            self.assertEqual(json.loads(body), {"status": "ok"})
        self.logged(2)

    def test_a_request_pipelined_behind_a_relayed_stream_is_answered_after_it(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(stream_request("pause-after-first"))
            self.wait_for(lambda: self.relayed() == 1)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            self.upstream.release.set()
            head, body, rest = read_answer(sock)
            self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
            head, body, _ = read_answer(sock, rest)
            self.assertEqual(json.loads(body), {"status": "ok"})
        self.logged(2)

    def test_a_client_that_stops_reading_a_relayed_stream_is_dropped_and_pays(self) -> None:
        self.start_proxy(client_keys=(CLIENT_KEY, OTHER_KEY), client_timeout=0.3)
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(stream_request("pause-then-big"))  # then 2 MB of events, never read
            self.wait_for(lambda: self.relayed() == 1)
            self.upstream.release.set()
            self.wait_for(lambda: self.relayed() == 0)  # CLIENT_TIMEOUT after its writes stalled
            self.assertEqual(self.chat(key=OTHER_KEY).status, 200)
        self.logged(1)
        line = self.console.getvalue().splitlines()[0]
        self.assertIn("served", line)  # part of it reached the client: the charge is kept

    def test_closing_the_server_ends_relayed_streams_with_their_log_line(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(stream_request("pause-after-first"))
            self.wait_for(lambda: self.relayed() == 1)
            proxy, self.proxy = self.proxy, None
            self.stop(proxy)
            self.assertEqual(len(proxy.loop.streams), 0)
            self.assertEqual(self.console.getvalue().count("\n"), 1, "its line was written")
            sock.settimeout(WAIT)
            while sock.recv(65536):
                pass  # and the connection was closed

    def test_a_stream_handed_to_a_loop_that_just_closed_still_ends_its_call(self) -> None:
        """The server closes between a stream's start and its first wait: the loop, stopped,
        ends the stream at once, and its call ends as any other (log line, gate slot, connection)."""
        loop = self.proxy.loop
        can_relay = loop.can_relay
        def close_then_decide(*args: object) -> bool:
            loop.close()  # what server_close does first
            return can_relay(*args)
        loop.can_relay = close_then_decide  # this server's loop only
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(stream_request("pause-after-first"))
            self.logged(1)
            self.wait_for(lambda: self.proxy.upstreams.in_flight == 0)
            while sock.recv(65536):
                pass  # closed by the proxy
        self.wait_for(lambda: self.proxy.connection_count == 0)
        self.upstream.release.set()

    def test_a_failure_as_a_relayed_stream_ends_closes_its_connection(self) -> None:
        """Whatever fails at a relayed stream's end, its connection is closed, not forgotten
        (it would hold its slot, and its client would wait, for ever)."""
        def fail(call: object) -> None:
            raise RuntimeError("recording failed")
        self.proxy.admin.record = fail  # this server's view only
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(stream_request("pause-after-first"))
            self.wait_for(lambda: self.relayed() == 1)
            self.upstream.release.set()
            head, body, _ = read_answer(sock)
            self.assertTrue(head.startswith(b"HTTP/1.1 200"))
            self.assertEqual(sock.recv(1), b"")  # then closed by the loop
        self.wait_for(lambda: self.proxy.connection_count == 0 and self.parked() == 0)
        self.assertIn("next step failed", self.written("next step failed"))

    def test_streams_that_never_wait_stay_with_their_thread(self) -> None:
        """An upstream that sends the whole stream at once: no hand-over, nothing parked."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            for _ in range(3):
                answer = self.request("POST", "/v1/chat/completions", {
                    "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                    conn=conn)
                self.assertEqual(answer.status, 200)
                self.assertEqual(answer.events()[-1], "[DONE]")
        finally:
            conn.close()
        self.logged(3)


class ResumableChunkDecoderTests(unittest.TestCase):
    """The decoder keeps its state across NeedMore: any split of the bytes gives the same body."""

    CASES = [
        ("events", [b"data: a\n\n", b"x" * 300, b"data: [DONE]\n\n"], b"0\r\n\r\n"),
        ("trailers", [b"one", b"two"], b"0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n"),
        ("extension", [b"abc"], b"0;ext=1\r\n\r\n"),
    ]

    def setUp(self) -> None:
        self.upstream, self.proxy_end = socket.socketpair()
        self.addCleanup(self.upstream.close)
        self.addCleanup(self.proxy_end.close)
        self.upstream.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.reader = llm_proxy.SocketReader(self.proxy_end)
        self.response = llm_proxy.UpstreamResponse(self.reader, "POST")
        self.reader.nowait = True  # as when the connection loop may relay the stream

    def decode(self, raw: bytes, rng: random.Random) -> bytes:
        body, at = b"", 0
        while not self.response.done:
            try:
                body += self.response.read1(rng.choice([1, 5, 65536]))
            except llm_proxy.NeedMore:
                self.assertLess(at, len(raw), "asked for more after the whole body")
                step = rng.randint(1, 9)
                self.upstream.sendall(raw[at:at + step])
                at += step
        self.assertEqual(self.reader.buffer, b"")
        return body

    def test_every_split_decodes_to_the_same_body(self) -> None:
        for name, chunks, end in self.CASES:
            raw = b"".join(b"%x;x=y\r\n%s\r\n" % (len(c), c) if name == "extension" else
                           b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + end
            for seed in range(200):
                with self.subTest(name, seed=seed):
                    self.response.done, self.response.chunk_left = False, 0  # the next body
                    self.assertEqual(self.decode(raw, random.Random(seed)), b"".join(chunks))

    def test_a_chunk_without_its_crlf_is_refused(self) -> None:
        self.upstream.sendall(b"3\r\nabcXY0\r\n\r\n")
        with self.assertRaises(http.client.IncompleteRead):
            while not self.response.done:
                self.response.read1(65536)

    def test_readline_and_read_match_a_buffered_reader(self) -> None:
        import io
        data = b"line one\r\nline two is longer\nno end"
        for limit in (-1, 1, 5, 9, 10, 11, 100):
            with self.subTest(limit=limit):
                sender, receiver = socket.socketpair()
                self.addCleanup(receiver.close)
                with sender:
                    sender.sendall(data)
                ours = llm_proxy.SocketReader(receiver)
                theirs = io.BufferedReader(io.BytesIO(data))
                for _ in range(4):
                    self.assertEqual(ours.readline(limit), theirs.readline(limit))
                self.assertEqual(ours.read(3), theirs.read(3))


if __name__ == "__main__":
    unittest.main()
