#!/usr/bin/env python3
"""Tests for llm_proxy: the real proxy and a fake upstream, over loopback sockets.

Run: python3 test_llm_proxy.py    (standard library only; ends with "N passed, N failed")

Every test starts its own fake upstream and proxy on 127.0.0.1 port 0, talks
to them over real sockets, and shuts both down.  Refill time comes from an
injected clock, never from sleeping.  The fake upstream is steered by an
``X-Fake`` request header, which the proxy forwards like any other header.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import weakref
from typing import Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler

import llm_proxy
from llm_proxy import (BucketSpec, BucketStore, Config, ConfigError, ProxyServer, TrackedServer,
                       estimate_tokens, parse_target)

HERE = os.path.dirname(os.path.abspath(__file__))
UPSTREAM_KEY = "sk-upstream-SECRET-0123456789"
CLIENT_KEY = "sk-client-alice-9876543210"
OTHER_KEY = "sk-client-bob-1111111111"
ADMIN_KEY = "adm-9f3k-owner-secret"
WAIT = 10.0  # upper bound for any single wait in a test; reaching it means a failure


# --------------------------------------------------------------------------
# Fixtures: clock, fake upstream, proxy, client helpers
# --------------------------------------------------------------------------

def levels(store: BucketStore, identity: str, specs: tuple) -> list:
    return [bucket["tokens"] for bucket in store.snapshot(identity, specs)]


def tokens_of(quota: dict) -> list:
    return [bucket["tokens"] for bucket in quota["buckets"]]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CapturingLog(logging.Handler):
    """Collects the proxy's log lines so tests can search them (for keys, for instance)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class FakeUpstream(TrackedServer):
    """A scriptable OpenAI-compatible upstream that records what reaches it."""

    def __init__(self, handler: type | None = None, port: int = 0) -> None:
        self.requests: list[dict] = []
        self.peers: set[tuple] = set()
        self.release = threading.Event()      # lets a paused stream or stall continue
        self.first_event_sent = threading.Event()
        self.closed_early = threading.Event()  # the proxy hung up on a stream
        self.dropped = threading.Event()  # a "close-first" request was dropped (the next is answered)
        super().__init__(("127.0.0.1", port), handler or FakeUpstreamHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class FakeUpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeUpstream

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.record(b"")
        if self.path.partition("?")[0].endswith("/models"):
            listing = {"object": "list", "data": [{"id": "upstream-model", "object": "model"},
                                                  {"id": "small", "object": "model"}]}
            if self.headers.get("X-Fake") == "chunked-json":
                self.reply_chunked(json.dumps(listing).encode())
            else:
                self.reply(200, listing)
        elif self.command == "GET" and "/models/" in self.path:  # a model's card, by the name asked
            self.reply(200, {"id": self.path.partition("?")[0].rsplit("/models/", 1)[1],
                             "object": "model", "owned_by": "fake"})
        else:
            self.reply(404, {"error": {"message": "no such thing", "type": "invalid_request_error",
                                       "param": None, "code": None}})

    do_DELETE = do_GET

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.record(body)
        behaviour = self.headers.get("X-Fake", "")
        payload = json.loads(body) if body.startswith(b"{") else {}
        if behaviour.startswith("status-"):
            status = int(behaviour[len("status-"):])
            self.reply(status, {"error": {"message": f"upstream says {status}", "type": "x",
                                          "param": None, "code": None}})
        elif behaviour == "close":
            self.close_connection = True
        elif behaviour.startswith("close-first") and not self.server.dropped.is_set():  # the first: dropped
            if behaviour == "close-first-late":  # ... after working on it a while
                time.sleep(0.5)
            self.server.dropped.set()
            self.close_connection = True
        elif behaviour == "stall":
            self.server.release.wait(WAIT)
            self.close_connection = True
        elif behaviour == "partial":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"id": "cut')
            self.close_connection = True
        elif behaviour == "hold":  # a long generation: answers once the test releases it
            self.server.release.wait(WAIT)
            self.reply(200, self.completion(payload))
        elif behaviour == "hold-until-closed":  # generates until the proxy hangs up on it
            self.server.closed_early.set() if self.wait_for_hang_up() else None
            self.close_connection = True
        elif behaviour == "chunked-json":  # as Go servers send larger bodies: no Content-Length
            self.reply_chunked(json.dumps(self.completion(payload)).encode())
        elif behaviour == "chunked-text":
            self.reply_chunked(b"hello, not json")
        elif behaviour == "non-json":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")
        elif behaviour == "folded-header":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Folded: a\r\n"
                             b" X-Injected: 1\r\nContent-Length: 2\r\n\r\n{}")
        elif behaviour == "huge-headers":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.write(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 1000 + b"\r\n")
                for _ in range(10_000):  # 10 MB of headers
                    self.wfile.write(b"X-Pad: " + b"p" * 1000 + b"\r\n")
        elif behaviour == "odd-usage":
            reply = self.completion(payload)
            reply["usage"] = dict(reply.get("usage") or {}, self=1, **{"": 2})
            self.reply(200, reply)
        elif behaviour == "upstream-cors":
            self.reply(200, self.completion(payload), [("Access-Control-Allow-Origin", "https://x"),
                                                       ("X-RateLimit-Limit", "999")])
        elif payload.get("stream"):
            self.stream(payload, behaviour)
        else:
            self.reply(200, self.completion(payload), [("Connection", "keep-alive, X-Upstream-Hop"),
                                                       ("X-Upstream-Hop", "1")])

    def wait_for_hang_up(self) -> bool:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.connection], [], [], 0.01)
            if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                return True
        return False

    def record(self, body: bytes) -> None:
        self.server.requests.append({"method": self.command, "path": self.path,
                                     "headers": dict(self.headers.items()),
                                     "raw_headers": str(self.headers), "body": body})
        self.server.peers.add(self.client_address)

    def completion(self, payload: dict) -> dict:
        reply = {"id": "chatcmpl-up", "object": "chat.completion", "created": 1,
                 "model": payload.get("model"),
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi from upstream"},
                              "finish_reason": "stop"}]}
        if self.usage() is not None:
            reply["usage"] = {"prompt_tokens": 3, "completion_tokens": self.usage() - 3,
                              "total_tokens": self.usage()}
        return reply

    def usage(self) -> int | None:
        """Total tokens to report: 7, or as ``X-Usage`` says ('none' for no usage at all)."""
        value = self.headers.get("X-Usage", "7")
        return None if value == "none" else int(value)

    def stream(self, payload: dict, behaviour: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        if self.headers.get("X-Close"):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        count, filler = (200, "x" * 10_000) if behaviour in ("big-stream", "pause-then-big") else (5, "")
        events = [{"choices": [{"index": 0, "delta": {"content": f"w{i}{filler}"}, "finish_reason": None}]}
                  for i in range(count)]
        try:
            for index, event in enumerate(events):
                self.chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
                if index == 0:
                    self.server.first_event_sent.set()
                    if behaviour in ("pause-after-first", "pause-then-big"):
                        self.server.release.wait(WAIT)
                    elif behaviour == "break-after-first":
                        self.chunk(b'data: {"choices": [{"ind')  # half an event, then hang up
                        self.close_connection = True
                        return
                    elif behaviour == "stall-mid-stream":
                        self.server.release.wait(WAIT)
                    elif behaviour == "malformed-event":
                        self.chunk(b"data: {this is not json\n\n")
                    elif behaviour == "until-client-leaves":
                        for _ in range(int(WAIT / 0.01)):
                            self.chunk(b": keep-alive\n\n")
                            time.sleep(0.01)
            options = payload.get("stream_options") or {}
            if options.get("include_usage") and self.usage() is not None:
                usage = {"prompt_tokens": 3, "completion_tokens": self.usage() - 3,
                         "total_tokens": self.usage()}
                self.chunk(b"data: " + json.dumps({"id": "chatcmpl-up", "choices": [], "usage": usage}
                                                  ).encode() + b"\n\n")
            if behaviour == "hold-before-done":  # as llama-server can: the client leaves first
                self.server.closed_early.set() if self.wait_for_hang_up() else None
                self.close_connection = True
                return
            self.chunk(b"data: [DONE]\n\n")
            self.chunk(b"")
        except OSError:
            self.server.closed_early.set()
            self.close_connection = True

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def reply_chunked(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        half = len(body) // 2
        self.chunk(body[:half])
        self.chunk(body[half:])
        self.chunk(b"")

    def reply(self, status: int, value: object, headers: list = ()) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, header_value in headers:
            self.send_header(name, header_value)
        self.end_headers()
        self.wfile.write(body)


def serve(server: TrackedServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                              daemon=True)
    thread.start()
    return thread


class Response:
    """What a client received: status, headers (case-insensitive) and body."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict:
        return json.loads(self.body)

    def events(self) -> list:
        """Parse an SSE body as a client library would: data lines, JSON unless [DONE]."""
        parsed = []
        for block in self.body.decode().split("\n\n"):
            data = "\n".join(line[5:].strip() for line in block.splitlines() if line.startswith("data:"))
            if data:
                parsed.append(data if data == "[DONE]" else json.loads(data))
        return parsed


# --------------------------------------------------------------------------
# A parser of the Prometheus text exposition format 0.0.4, from its rules
# --------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(\{{(.*)\}})? (\S+)( -?\d+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"\s*(,|$)')


def unescape(value: str) -> str:
    return re.sub(r'\\([\\"n])', lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_exposition(text: str) -> dict[str, dict]:
    """Families by name: type, help, samples [(name, labels, value)]; AssertionError if malformed."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    families: dict[str, dict] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                family = families.setdefault(parts[2], {"type": None, "help": None, "samples": []})
                if parts[1] == "TYPE":
                    assert family["type"] is None and not family["samples"], f"late TYPE: {line}"
                    assert parts[3] in ("counter", "gauge", "histogram", "summary", "untyped"), line
                    family["type"] = parts[3]
                else:
                    family["help"] = parts[3] if len(parts) > 3 else ""
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, _, label_text, value = match.group(1), match.group(2), match.group(3), match.group(4)
        labels = {}
        position = 0
        while label_text and position < len(label_text):
            label = _LABEL.match(label_text, position)
            assert label, f"bad labels in {line!r}"
            labels[label.group(1)] = unescape(label.group(2))
            position = label.end()
        float(value)  # a number, +Inf, -Inf or NaN
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in families else name
        assert base in families and families[base]["type"], f"sample before its TYPE: {line!r}"
        families[base]["samples"].append((name, labels, float(value)))
    for name, family in families.items():
        if family["type"] != "histogram":
            continue
        series: dict[tuple, list] = {}  # a histogram per set of labels other than le
        for sample, labels, value in family["samples"]:
            if sample == name + "_bucket":
                series.setdefault(tuple(sorted((k, v) for k, v in labels.items() if k != "le")),
                                  []).append((labels["le"], value))
        for labels, buckets in series.items():
            counts = [value for _, value in buckets]
            assert counts == sorted(counts), f"{name}{labels}: buckets are not cumulative"
            assert buckets[-1][0] == "+Inf", f"{name}{labels}: no +Inf bucket"
            total = [value for sample, sample_labels, value in family["samples"]
                     if sample == name + "_count" and tuple(sorted(sample_labels.items())) == labels]
            assert total == [counts[-1]], f"{name}{labels}: _count is not the +Inf bucket"
    return families


def send_raw(port: int, data: bytes, read_until_close: bool = True) -> bytes:
    """Send raw bytes to 127.0.0.1:``port`` and return all that comes back before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(data)
        return read_to_close(sock) if read_until_close else b""


def read_to_close(sock: socket.socket) -> bytes:
    """Everything a socket receives until it closes (a reset after the answer, as a refusing
    server may send, ends it too)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


_KEYS_DIRECTORIES: "weakref.WeakKeyDictionary[unittest.TestCase, str]" = weakref.WeakKeyDictionary()


def write_keys_file(test: unittest.TestCase, entries: list[dict] | dict, name: str = "keys.json") -> str:
    """Write ``entries`` as a KEYS_FILE (JSON) and return its path.

    The file lives in a directory of the test's own, removed when the test ends, so
    other files the test needs (an access log, a state file) can sit beside it.
    Called again in the same test with the same name, it replaces the file at the
    same path, atomically as an editor would, so a running proxy re-reads a whole
    file.  A dict is the usual ``{key: settings}``; a list is written as it is (a file
    the proxy must refuse).
    """
    directory = _KEYS_DIRECTORIES.get(test)
    if directory is None or not os.path.isdir(directory):
        holder = tempfile.TemporaryDirectory()
        test.addCleanup(holder.cleanup)
        directory = _KEYS_DIRECTORIES[test] = holder.name
    path = os.path.join(directory, name)
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(entries, file)
    os.replace(path + ".tmp", path)
    return path


class ProxyTestCase(unittest.TestCase):
    """Starts a fake upstream and a proxy per test; everything is torn down afterwards."""

    config_overrides: dict = {}
    upstream_handler: type | None = None  # the fake upstream's handler, FakeUpstreamHandler by default

    def setUp(self) -> None:
        self.baseline_threads = threading.active_count()
        self.clock = FakeClock()
        self.wall = FakeClock(1_800_000_000.0)
        self.upstream = FakeUpstream(self.upstream_handler)
        serve(self.upstream)
        self.log = CapturingLog()
        self.console = io.StringIO()  # the per-request lines
        logger = logging.getLogger("llm_proxy")
        logger.addHandler(self.log)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        self.addCleanup(logger.removeHandler, self.log)
        self.proxy: ProxyServer | None = None
        self.start_proxy(**self.config_overrides)

    def start_proxy(self, **overrides: object) -> ProxyServer:
        if self.proxy is not None:
            self.stop(self.proxy)
        settings = dict(host="127.0.0.1", port=0, upstream_url=self.upstream.url,
                        upstream_key=UPSTREAM_KEY, read_timeout=WAIT, open_timeout=WAIT)
        settings.update(overrides)
        self.config = Config(**settings)
        self.proxy = ProxyServer(self.config, clock=self.clock, wall_clock=self.wall, console=self.console)
        serve(self.proxy)
        return self.proxy

    def wait_for(self, condition: Callable[[], bool]) -> None:
        """Poll for something another thread does (the clock is injected; this is no refill)."""
        deadline = time.monotonic() + WAIT
        while not condition():
            self.assertLess(time.monotonic(), deadline, "condition not reached")
            time.sleep(0.005)

    @staticmethod
    def stop(server: TrackedServer) -> None:
        server.shutdown()
        server.server_close()

    def tearDown(self) -> None:
        self.upstream.release.set()
        if self.proxy is not None:
            self.stop(self.proxy)
        self.stop(self.upstream)
        deadline = time.monotonic() + WAIT
        while threading.active_count() > self.baseline_threads and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertLessEqual(threading.active_count(), self.baseline_threads,
                             "a server or handler thread outlived its test")

    # -- client helpers ------------------------------------------------------

    @property
    def port(self) -> int:
        return self.proxy.server_address[1]

    def request(self, method: str, path: str, body: object = None, key: str | None = CLIENT_KEY,
                headers: dict | None = None, conn: http.client.HTTPConnection | None = None) -> Response:
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            conn.request(method, path, body, all_headers)
            response = conn.getresponse()
            return Response(response.status, response.msg, response.read())
        finally:
            if own:
                conn.close()

    def chat(self, content: str = "hello", key: str | None = CLIENT_KEY, path: str = "/v1/chat/completions",
             headers: dict | None = None, **fields: object) -> Response:
        payload = {"model": "client-model", "messages": [{"role": "user", "content": content}]}
        payload.update(fields)
        return self.request("POST", path, payload, key=key, headers=headers)

    def raw(self, data: bytes, read_until_close: bool = True) -> bytes:
        """Send raw bytes and return everything the proxy answers before closing."""
        return send_raw(self.port, data, read_until_close)

    def level(self, key: str = CLIENT_KEY) -> int:
        return levels(self.proxy.buckets, "key:" + llm_proxy.key_digest(key), (self.config.bucket,))[0]

    def assert_openai_error(self, response: Response, status: int, kind: str | None = None,
                            code: str | None = None) -> dict:
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        error = response.json()["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertTrue(error["message"])
        if kind:
            self.assertEqual(error["type"], kind)
        if code:
            self.assertEqual(error["code"], code)
        self.assertNotIn("Traceback", response.body.decode())
        return error

    def written(self, expected: str = "") -> str:
        """Everything the proxy has logged: log records and per-request lines.

        A request's line is written just after its answer, so wait for ``expected``.
        """
        deadline = time.monotonic() + WAIT
        while True:
            if self.proxy is not None:
                self.proxy.console.flush()
            text = "\n".join(self.log.lines) + "\n" + self.console.getvalue()
            if expected in text or time.monotonic() > deadline:
                return text
            time.sleep(0.005)

    def logged(self, count: int) -> None:
        """Wait until ``count`` requests were logged (each is counted just after its answer)."""
        deadline = time.monotonic() + WAIT
        while self.console.getvalue().count("\n") < count and time.monotonic() < deadline:
            if self.proxy is not None:
                self.proxy.console.flush()
            time.sleep(0.005)

    def assert_still_serving(self) -> None:
        self.assertEqual(self.request("GET", "/health").json(), {"status": "ok"})


# --------------------------------------------------------------------------
# Raw exchanges, for hostile input and faults (tests in several feature files)
# --------------------------------------------------------------------------

VALID_BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


def status_of(answer: bytes) -> int:
    """The status code of the first response in raw bytes (0 if there is none)."""
    parts = answer.split(b" ", 2)
    return int(parts[1]) if answer.startswith(b"HTTP/1.") and len(parts) > 1 and parts[1].isdigit() else 0


def body_of(answer: bytes) -> bytes:
    """The body of the first response in raw bytes (everything after its header block)."""
    return answer.partition(b"\r\n\r\n")[2]


class AdversarialTestCase(ProxyTestCase):
    """Hostile clients and faulty upstreams: raw exchanges, and checks that nothing was charged
    or forwarded for a refused request and that the proxy still serves afterwards."""

    def exchange(self, data: bytes, half_close: bool = True) -> bytes:
        """Send raw bytes, optionally signal end of input, and read until the proxy closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(data)
            if half_close:
                with contextlib.suppress(OSError):  # the proxy may have answered and closed already
                    sock.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)

    def assert_error_answer(self, answer: bytes, status: int | None = None) -> dict:
        """One OpenAI-shaped error, without a stack trace, and the connection closed after it."""
        self.assertTrue(answer.startswith(b"HTTP/1.1 "), answer[:200])
        if status is not None:
            self.assertEqual(status_of(answer), status, answer[:300])
        self.assertGreaterEqual(status_of(answer), 400)
        self.assertNotEqual(status_of(answer), 500, answer[:300])
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Type: application/json", head)
        error = json.loads(body)["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertNotIn(b"Traceback", answer)
        return error

    def assert_nothing_charged_or_forwarded(self) -> None:
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.level(), 10)

    def assert_healthy(self) -> None:
        """The proxy still serves a normal, metered request."""
        self.assert_still_serving()
        response = self.request("POST", "/v1/chat/completions", {"messages": []}, key="sk-probe")
        self.assertEqual(response.json()["choices"][0]["message"]["content"], "hi from upstream")


def dechunk(data: bytes) -> bytes:
    """Decode an HTTP/1.1 chunked body."""
    out, rest = [], data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2:]
    return b"".join(out)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

class ConfigurationTests(unittest.TestCase):
    def test_defaults_match_the_prototype(self) -> None:
        config = Config.from_env({"BASE_API_URL": "http://127.0.0.1:8080/v1"})
        self.assertEqual((config.host, config.port), ("0.0.0.0", 8899))
        self.assertEqual((config.max_tokens, config.refill_tokens, config.refill_interval), (10, 2, 300))
        self.assertEqual((config.request_cost, config.cost_mode, config.response_reserve),
                         (1, "request", 256))
        self.assertEqual((config.open_timeout, config.read_timeout), (10, 120))
        self.assertEqual(config.max_body_bytes, 10 * 1024 * 1024)
        self.assertEqual(config.client_timeout, 60)

    def test_prototype_precedence_among_spellings(self) -> None:
        config = Config.from_env({"BASE_API_URL": "http://b/v1", "UPSTREAM_BASE_URL": "http://u/v1",
                                  "base_api_url": "http://l/v1"})
        self.assertEqual(config.upstream_url, "http://u/v1")

    def test_aliases_and_empty_values(self) -> None:
        config = Config.from_env({"UPSTREAM_BASE_URL": "http://h/v1", "base_api_key": "k",
                                  "UPSTREAM_MODEL": "m", "MAX_TOKENS": "", "PORT": " ",
                                  "PROXY_API_KEYS": " a , b ,, "})
        self.assertEqual((config.upstream_url, config.upstream_key, config.upstream_model),
                         ("http://h/v1", "k", "m"))
        self.assertEqual((config.max_tokens, config.port), (10, 8899))
        self.assertEqual(config.client_keys, ("a", "b"))

    def test_invalid_values_name_the_variable(self) -> None:
        cases = {"PORT": "0", "MAX_TOKENS": "0", "REFILL_TOKENS": "x", "TOKEN_COST_MODE": "free",
                 "REFILL_INTERVAL_SECONDS": "-5", "READ_TIMEOUT": "nan", "MAX_BODY_BYTES": "1.5"}
        for name, value in cases.items():
            with self.subTest(name=name), self.assertRaises(ConfigError) as raised:
                Config.from_env({name: value})
            self.assertIn(name, str(raised.exception))

    def test_absurd_numbers_are_refused_at_startup_not_at_the_first_request(self) -> None:
        """A refill step of 1e-320 s overflowed the count of steps on every request (a 500)."""
        cases = [("REFILL_INTERVAL_SECONDS", "1e-320"), ("REFILL_INTERVAL_SECONDS", "1e300"),
                 ("READ_TIMEOUT", "inf"), ("MAX_TOKENS", str(10**16)), ("REQUEST_TOKEN_COST", "9" * 400)]
        for name, value in cases:
            with self.subTest(name=name, value=value), self.assertRaises(ConfigError) as raised:
                Config.from_env({name: value})
            self.assertIn(name, str(raised.exception))

    def test_bad_upstream_url_is_refused(self) -> None:
        for url in ("ftp://h/v1", "http://user:pw@h/v1", "not a url"):
            with self.subTest(url=url), self.assertRaises(ConfigError):
                ProxyServer(Config(host="127.0.0.1", port=0, upstream_url=url))
        with self.assertRaises(ConfigError):
            ProxyServer(Config(host="127.0.0.1", port=0))

    def test_help_documents_every_variable(self) -> None:
        """``--help`` and the README's configuration table name the same variables."""
        process = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py"), "--help"],
                                 env=clean_environment(), capture_output=True, text=True, timeout=WAIT)
        self.assertEqual(process.returncode, 0, process.stderr)
        _, found, section = process.stdout.partition("\nenvironment variables")
        self.assertTrue(found, "the help has an environment variables section")
        in_help = set()
        for line in section.splitlines()[1:]:
            if line.startswith("  ") and not line.startswith("   "):  # a name line; meanings are indented more
                in_help.update(re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*", name).group(1)
                               for name in line.split("/"))
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
            readme = file.read()
        _, found, configuration = readme.partition("\n## Configuration\n")
        self.assertTrue(found, "the README has a Configuration section")
        rows = [line.strip().strip("|").split("|") for line in configuration.split("\n## ")[0].splitlines()
                if line.startswith("|")]
        column = [cell.strip().lower() for cell in rows[0]].index("variable")
        in_readme = {name for row in rows[2:] for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", row[column])}
        self.assertGreaterEqual(len(in_help), 20, process.stdout)
        self.assertGreaterEqual(len(in_readme), 20, configuration)
        self.assertEqual(sorted(in_help - in_readme), [], "in --help but missing from the README's table")
        self.assertEqual(sorted(in_readme - in_help), [], "in the README's table but missing from --help")

    def test_estimate_mode_warns_when_no_request_can_fit(self) -> None:
        warnings = llm_proxy.startup_warnings(Config(host="127.0.0.1", cost_mode="estimate"))
        self.assertEqual(len(warnings), 1)
        self.assertIn("MAX_TOKENS", warnings[0])
        self.assertEqual(llm_proxy.startup_warnings(
            Config(host="127.0.0.1", cost_mode="estimate", max_tokens=4000)), [])

    def test_open_mode_beyond_loopback_warns(self) -> None:
        self.assertTrue(any("anyone" in w for w in llm_proxy.startup_warnings(Config())))
        self.assertEqual(llm_proxy.startup_warnings(Config(client_keys=("k",))), [])


class CommandLineTests(unittest.TestCase):
    """The real command, as a user starts it."""

    def run_proxy(self, env: dict, args: tuple = ()) -> subprocess.Popen:
        full_env = clean_environment()
        full_env.update(env)
        return subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py"), *args],
                                env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def test_invalid_setting_stops_startup_with_one_line(self) -> None:
        process = self.run_proxy({"BASE_API_URL": "http://127.0.0.1:9/v1", "PORT": "70000"})
        out, err = process.communicate(timeout=WAIT)
        self.assertEqual(process.returncode, 2)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn("PORT", err)

    def test_a_port_in_use_stops_startup_with_one_line(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            process = self.run_proxy({"BASE_API_URL": "http://127.0.0.1:9/v1", "HOST": "127.0.0.1",
                                      "PORT": str(port)})
            out, err = process.communicate(timeout=WAIT)
        self.assertEqual(process.returncode, 2, err)
        self.assertEqual(err.strip().splitlines(), [f"llm_proxy: cannot listen on 127.0.0.1:{port}: "
                                                    "Address already in use"])
        self.assertEqual(out, "")

    def test_startup_line_names_upstream_without_its_key(self) -> None:
        line, _, err = startup_output({"BASE_API_URL": "http://127.0.0.1:9/v1", "BASE_API_KEY": UPSTREAM_KEY,
                                       "HOST": "127.0.0.1", "PORT": str(free_port())})
        self.assertIn("listening on http://127.0.0.1:", line)
        self.assertIn("http://127.0.0.1:9/v1", line)
        self.assertIn("10 tokens, +2 every 300s", line)
        self.assertNotIn(UPSTREAM_KEY, line + err)

    def test_demo_mode_serves_a_reply_and_a_stream(self) -> None:
        port = free_port()
        process = self.run_proxy({"PORT": str(port)}, ("--demo",))
        try:
            self.assertIn("listening", process.stdout.readline())
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
            body = json.dumps({"messages": [{"role": "user", "content": "hi demo"}]})
            conn.request("POST", "/v1/chat/completions", body, {"Authorization": "Bearer d"})
            response = conn.getresponse()
            reply = json.loads(response.read())
            self.assertEqual(reply["choices"][0]["message"]["content"], "echo: hi demo")
            self.assertEqual(response.getheader("X-RateLimit-Remaining"), "9")
            stream_body = json.dumps({"messages": [{"role": "user", "content": "hi demo stream"}],
                                      "stream": True})
            conn.request("POST", "/v1/chat/completions", stream_body, {"Authorization": "Bearer d"})
            response = conn.getresponse()
            self.assertEqual(response.status, 200)
            self.assertTrue(response.getheader("Content-Type").startswith("text/event-stream"))
            self.assertEqual(response.getheader("X-RateLimit-Remaining"), "8")
            streamed = Response(response.status, response.msg, response.read())
            events = streamed.events()
            self.assertEqual(events[-1], "[DONE]")
            self.assertTrue(streamed.body.endswith(b"data: [DONE]\n\n"))
            pieces = [event["choices"][0]["delta"].get("content") for event in events[:-1]]
            self.assertGreaterEqual(len([piece for piece in pieces if piece]), 3, "streamed word by word")
            self.assertEqual("".join(piece or "" for piece in pieces), "echo: hi demo stream")
            conn.close()
        finally:
            process.terminate()
            process.communicate(timeout=WAIT)


def clean_environment() -> dict[str, str]:
    """This process's environment without any llm_proxy setting, for starting the real command."""
    names = {name for setting in llm_proxy.SETTINGS for name in setting.names}
    return {key: value for key, value in os.environ.items() if key not in names}


def startup_output(env: dict[str, str], *args: str) -> tuple[str, str, str]:
    """The real command started with ``env`` (over a clean environment) and stopped as soon as
    it wrote its first line (the listening line: startup is over): that line, the rest of its
    output, and what it wrote to stderr."""
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py"), *args],
                               env={**clean_environment(), **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
    finally:
        process.terminate()
        output, errors = process.communicate(timeout=WAIT)
    return line, output, errors


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------
# Buckets and cost, as units
# --------------------------------------------------------------------------

class BucketTests(unittest.TestCase):
    spec = BucketSpec(capacity=10, refill_tokens=2, interval=300)

    def setUp(self) -> None:
        self.clock = FakeClock()
        self.store = BucketStore(self.clock)

    def charge(self, cost: int = 1, identity: str = "a"):
        return self.store.charge(identity, (self.spec,), cost)

    def test_new_bucket_starts_full_and_charges_down(self) -> None:
        admissions = [self.charge() for _ in range(11)]
        self.assertEqual([a.remaining for a in admissions[:10]], list(range(9, -1, -1)))
        self.assertTrue(all(a.allowed for a in admissions[:10]))
        self.assertFalse(admissions[10].allowed)
        self.assertEqual(admissions[10].wait_seconds, 300)

    def test_refill_is_stepwise_and_capped(self) -> None:
        for _ in range(10):
            self.charge()
        self.clock.advance(299.9)
        self.assertEqual(levels(self.store, "a", (self.spec,)), [0])
        self.clock.advance(0.1)
        self.assertEqual(levels(self.store, "a", (self.spec,)), [2])
        self.clock.advance(3 * 300 + 299)
        self.assertEqual(levels(self.store, "a", (self.spec,)), [8])
        self.clock.advance(10 * 300)
        self.assertEqual(levels(self.store, "a", (self.spec,)), [10])

    def test_wait_counts_down_to_the_next_step(self) -> None:
        for _ in range(10):
            self.charge()
        self.clock.advance(60)
        limited = self.charge()
        self.assertEqual(limited.wait_seconds, 240)
        self.assertEqual(llm_proxy.limit_message(limited), "limit reached, wait 4 min")
        self.assertEqual(self.charge(cost=5).wait_seconds, 240 + 2 * 300)

    def test_refund_restores_but_never_above_capacity(self) -> None:
        self.charge(cost=3)
        self.store.credit("a", (self.spec,), 3)
        self.assertEqual(levels(self.store, "a", (self.spec,)), [10])
        self.store.credit("a", (self.spec,), 3)
        self.assertEqual(levels(self.store, "a", (self.spec,)), [10])

    def test_cost_above_capacity_is_never_allowed(self) -> None:
        admission = self.charge(cost=11)
        self.assertFalse(admission.allowed)
        self.assertIn("request too large", llm_proxy.limit_message(admission))
        self.assertEqual(levels(self.store, "a", (self.spec,)), [10])

    def test_a_policy_gaining_a_window_keeps_the_levels_it_had(self) -> None:
        for _ in range(8):
            self.charge()
        daily = BucketSpec(100, 100, 86400, "daily")
        self.assertEqual(levels(self.store, "a", (self.spec, daily)), [2, 100])
        self.assertEqual(levels(self.store, "a", (self.spec,)), [2])

    def test_identities_are_independent(self) -> None:
        for _ in range(10):
            self.charge(identity="a")
        self.assertTrue(self.charge(identity="b").allowed)


class CostTests(unittest.TestCase):
    def test_estimate_is_prompt_quarter_plus_output(self) -> None:
        payload = {"model": "a-very-long-model-name", "messages": [{"role": "user", "content": "12345678"}]}
        # "user 12345678" is 13 characters -> 4 tokens; plus the reserve
        self.assertEqual(estimate_tokens(payload, 256), 4 + 256)
        self.assertEqual(estimate_tokens(dict(payload, max_tokens=10), 256), 14)
        # Servers read different caps (OpenAI prefers max_completion_tokens, Ollama knows only
        # max_tokens): the largest counts
        self.assertEqual(estimate_tokens(dict(payload, max_tokens=10, max_completion_tokens=3), 256), 14)
        self.assertEqual(estimate_tokens({"max_tokens": 0}, 256), 1)

    def test_negative_or_fractional_output_caps_are_rejected(self) -> None:
        for value in (-1, 1.5, "10", True):
            with self.subTest(value=value), self.assertRaises(llm_proxy.ProxyError) as raised:
                estimate_tokens({"max_tokens": value}, 256)
            self.assertEqual(raised.exception.status, 400)

    def test_deeply_nested_prompt_does_not_recurse(self) -> None:
        payload: dict = {"messages": []}
        for _ in range(900):
            payload = {"x": [payload]}
        self.assertEqual(estimate_tokens(payload, 1), 1)


class TargetTests(unittest.TestCase):
    def test_metered_spellings(self) -> None:
        for raw, name in (("/v1/chat/completions", "chat"), ("/v1/chat/completions/", "chat"),
                          ("/v1/chat/completions?x=1", "chat"), ("/V1/Chat/Completions", "chat"),
                          ("/v1/%63hat/completions", "chat"), ("/v1/completions//", "text")):
            with self.subTest(raw=raw):
                route = llm_proxy.route_for(parse_target(raw).path.lower(), "POST")
                self.assertEqual((route.answer, route.dialect.name), ("metered", name))

    def test_rejected_targets(self) -> None:
        for raw in ("http://evil.example/v1/chat/completions", "//evil.example/v1/x", "/v1/../admin",
                    "/v1/%2e%2e/admin", "/v1/a%2f..%2fb", "/v1/x%00", "/v1/a\\b", "/v1//x",
                    "/v1/./chat/completions", "/v1/chat/completions;x", "*"):
            with self.subTest(raw=raw), self.assertRaises(llm_proxy.ProxyError):
                parse_target(raw)

    def test_upstream_path_stays_under_the_base(self) -> None:
        self.assertEqual(parse_target("/v1/chat/completions/?a=b").upstream_path("/base/v1", False),
                         "/base/v1/chat/completions?a=b")
        self.assertEqual(parse_target("/api/chat").upstream_path("/base/v1", True), "/base/api/chat")


# --------------------------------------------------------------------------
# The proxy over real sockets
# --------------------------------------------------------------------------

class ForwardingTests(ProxyTestCase):
    def test_served_reply_carries_rate_limit_headers(self) -> None:
        response = self.chat()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json()["choices"][0]["message"]["content"], "hi from upstream")
        self.assertEqual(response.headers["X-RateLimit-Limit"], "10")
        self.assertEqual(response.headers["X-RateLimit-Remaining"], "9")
        self.assertEqual(response.headers["X-RateLimit-Refill-Tokens"], "2")
        self.assertEqual(response.headers["X-RateLimit-Refill-Seconds"], "300")
        self.assertEqual(response.headers["X-RateLimit-Reset-Seconds"], "0")
        self.assertEqual(response.headers["Access-Control-Allow-Origin"], "*")
        self.assertIsNone(response.headers["Retry-After"])

    def test_proxy_headers_are_not_duplicated_by_upstream_ones(self) -> None:
        response = self.chat(headers={"X-Fake": "upstream-cors"})
        self.assertEqual(response.headers.get_all("Access-Control-Allow-Origin"), ["*"])
        self.assertEqual(response.headers.get_all("X-RateLimit-Limit"), ["10"])

    def test_base_model_replaces_the_model_and_answers_models_locally(self) -> None:
        self.start_proxy(upstream_model="served-model")
        self.chat()
        self.assertEqual(json.loads(self.upstream.requests[-1]["body"])["model"], "served-model")
        models = self.request("GET", "/v1/models")
        self.assertEqual([m["id"] for m in models.json()["data"]], ["served-model"])
        self.assertEqual(len(self.upstream.requests), 1)

    def test_the_body_forwarded_is_the_one_checked(self) -> None:
        """What the upstream reads is the proxy's own parse, serialised again: the same value,
        so nothing reaches it that another parser could read differently (key order kept)."""
        body = '{"messages": [{"role": "user", "content": "x \\u00e9\u00e9"}],   "model": "m"}'.encode()
        self.request("POST", "/v1/chat/completions", body)
        forwarded = self.upstream.requests[-1]["body"]
        self.assertEqual(forwarded, '{"messages":[{"role":"user","content":"x \u00e9\u00e9"}],"model":"m"}'.encode())
        self.assertEqual(json.loads(forwarded), json.loads(body))

    def test_other_v1_routes_are_forwarded_unmetered(self) -> None:
        response = self.request("GET", "/v1/models?verbose=1")
        self.assertEqual(response.json()["data"][0]["id"], "upstream-model")
        self.assertEqual(self.upstream.requests[-1]["path"], "/v1/models?verbose=1")
        self.assertIsNone(response.headers["X-RateLimit-Limit"])
        self.assertEqual(self.level(), 10)

    def test_upstream_errors_pass_through(self) -> None:
        response = self.chat(headers={"X-Fake": "status-404"})
        self.assertEqual(response.status, 404)
        self.assertEqual(response.json()["error"]["message"], "upstream says 404")

    def test_keep_alive_clients_and_pooled_upstream_connections(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            for _ in range(3):
                response = self.request("POST", "/v1/chat/completions",
                                        {"messages": [{"role": "user", "content": "x"}]}, conn=conn)
                self.assertEqual(response.status, 200)
                self.assertNotEqual(response.headers["Connection"], "close")
        finally:
            conn.close()
        self.assertEqual(len(self.upstream.peers), 1, "the upstream connection should be reused")

    def test_health_needs_no_key_and_reveals_nothing(self) -> None:
        self.start_proxy(client_keys=(CLIENT_KEY,))
        response = self.request("GET", "/health", key=None)
        self.assertEqual(response.json(), {"status": "ok"})
        self.assertNotIn(str(self.upstream.server_address[1]), response.body.decode())

    def test_cors_preflight(self) -> None:
        response = self.request("OPTIONS", "/v1/chat/completions", key=None,
                                headers={"Access-Control-Request-Method": "POST"})
        self.assertEqual(response.status, 204)
        self.assertEqual(response.headers["Access-Control-Allow-Origin"], "*")
        self.assertIn("Authorization", response.headers["Access-Control-Allow-Headers"])
        self.assertIn("POST", response.headers["Access-Control-Allow-Methods"])

    def test_unknown_paths_outside_v1(self) -> None:
        self.assert_openai_error(self.request("GET", "/admin"), 404)
        self.assertEqual(self.upstream.requests, [])


class AuthenticationTests(ProxyTestCase):
    config_overrides = {"client_keys": (CLIENT_KEY, OTHER_KEY)}

    def test_unknown_or_missing_key_gets_401(self) -> None:
        for key in (None, "sk-wrong", CLIENT_KEY + "x", ""):
            with self.subTest(key=key):
                error = self.assert_openai_error(self.chat(key=key), 401, "authentication_error",
                                                 "invalid_api_key")
                self.assertIsNone(error["param"])
        self.assert_openai_error(self.request("GET", "/v1/models", key="sk-wrong"), 401)
        self.assertEqual(self.upstream.requests, [])

    def test_known_keys_get_their_own_buckets(self) -> None:
        for _ in range(10):
            self.assertEqual(self.chat().headers["X-RateLimit-Reset-Seconds"], "0")
        self.assertIn("limit reached", self.chat().json()["choices"][0]["message"]["content"])
        self.assertEqual(self.chat(key=OTHER_KEY).json()["choices"][0]["message"]["content"],
                         "hi from upstream")

    def test_bearer_scheme_is_case_insensitive(self) -> None:
        response = self.request("POST", "/v1/chat/completions", {"messages": []}, key=None,
                                headers={"Authorization": f"bEaReR {CLIENT_KEY}"})
        self.assertEqual(response.status, 200)


class IdentityTests(ProxyTestCase):
    config_overrides = {"max_tokens": 2, "refill_tokens": 1}

    def test_requests_without_a_key_share_the_ip_bucket_whatever_x_forwarded_for_says(self) -> None:
        statuses = [self.chat(key=None, headers={"X-Forwarded-For": f"10.0.0.{i}"}) for i in range(3)]
        texts = [r.json()["choices"][0]["message"]["content"] for r in statuses]
        self.assertEqual(texts[:2], ["hi from upstream"] * 2)
        self.assertEqual(texts[2], "limit reached, wait 5 min")
        self.assertEqual(levels(self.proxy.buckets, "ip:127.0.0.1", (self.config.bucket,)), [0])


class LimitReplyTests(ProxyTestCase):
    config_overrides = {"max_tokens": 1, "refill_tokens": 1, "refill_interval": 300}

    def exhaust(self) -> None:
        self.assertEqual(self.chat().status, 200)

    def test_chat_limit_reply_is_a_normal_completion(self) -> None:
        self.exhaust()
        response = self.chat(model="my-model")
        self.assertEqual(response.status, 200)
        reply = response.json()
        self.assertEqual(reply["object"], "chat.completion")
        self.assertTrue(reply["id"].startswith("chatcmpl-"))
        self.assertEqual(reply["model"], "my-model")
        self.assertEqual(reply["choices"], [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                             "message": {"role": "assistant",
                                                         "content": "limit reached, wait 5 min"}}])
        self.assertEqual(reply["usage"], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
        self.assertEqual(response.headers["Retry-After"], "300")
        self.assertEqual(response.headers["X-RateLimit-Remaining"], "0")
        self.assertEqual(response.headers["X-RateLimit-Reset-Seconds"], "300")
        self.assertEqual(len(self.upstream.requests), 1)

    def test_completions_limit_reply(self) -> None:
        self.exhaust()
        self.clock.advance(61)
        response = self.request("POST", "/v1/completions", {"model": "m", "prompt": "x"})
        reply = response.json()
        self.assertEqual(reply["object"], "text_completion")
        self.assertTrue(reply["id"].startswith("cmpl-"))
        self.assertEqual(reply["choices"][0]["text"], "limit reached, wait 4 min")
        self.assertEqual(reply["choices"][0]["finish_reason"], "stop")
        self.assertEqual(response.headers["Retry-After"], "239")

    def test_streamed_chat_limit_reply(self) -> None:
        self.exhaust()
        response = self.chat(stream=True)
        self.assertTrue(response.headers["Content-Type"].startswith("text/event-stream"))
        events = response.events()
        self.assertEqual(events[-1], "[DONE]")
        chunks = events[:-1]
        self.assertTrue(all(c["object"] == "chat.completion.chunk" for c in chunks))
        self.assertEqual(len({c["id"] for c in chunks}), 1)
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        self.assertEqual(text, "limit reached, wait 5 min")
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(chunks[-1]["choices"][0]["delta"], {})
        self.assertEqual(response.headers["Retry-After"], "300")

    def test_streamed_completions_limit_reply(self) -> None:
        self.exhaust()
        response = self.request("POST", "/v1/completions", {"prompt": "x", "stream": True})
        events = response.events()
        self.assertEqual(events[-1], "[DONE]")
        self.assertTrue(all(c["object"] == "text_completion" for c in events[:-1]))
        self.assertEqual("".join(c["choices"][0]["text"] for c in events[:-1]), "limit reached, wait 5 min")
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "stop")

    def test_refill_admits_again(self) -> None:
        self.exhaust()
        self.clock.advance(300)
        self.assertEqual(self.chat().json()["choices"][0]["message"]["content"], "hi from upstream")

    def test_model_falls_back_to_base_model(self) -> None:
        self.start_proxy(max_tokens=1, refill_tokens=1, upstream_model="base")
        self.exhaust()
        payload = {"messages": [{"role": "user", "content": "x"}]}
        self.assertEqual(self.request("POST", "/v1/chat/completions", payload).json()["model"], "base")


class EstimateModeTests(ProxyTestCase):
    config_overrides = {"cost_mode": "estimate", "max_tokens": 100, "refill_tokens": 10}

    def test_estimate_is_charged(self) -> None:
        response = self.chat(content="x" * 35, max_tokens=20)  # "user " + 35 = 40 chars -> 10 tokens
        self.assertEqual(response.headers["X-RateLimit-Remaining"], str(100 - 30))

    def test_a_request_that_can_never_fit_says_so(self) -> None:
        response = self.chat(content="x" * 400)  # the prompt alone exceeds the 100 capacity
        text = response.json()["choices"][0]["message"]["content"]
        self.assertIn("request too large", text)
        self.assertNotIn("wait", text)
        self.assertEqual(self.level(), 100)
        self.assertEqual(self.upstream.requests, [])

    def test_negative_max_tokens_is_a_400_not_a_discount(self) -> None:
        error = self.assert_openai_error(self.chat(max_tokens=-1000), 400, "invalid_request_error")
        self.assertEqual(error["param"], "max_tokens")
        self.assertEqual(self.level(), 100)
        self.assertEqual(self.upstream.requests, [])


class ConcurrencyTests(ProxyTestCase):
    config_overrides = {"max_tokens": 10}

    def test_exact_admission_under_50_concurrent_requests(self) -> None:
        start = threading.Barrier(50)
        texts: list[str] = []

        def one() -> None:
            start.wait(WAIT)
            texts.append(self.chat().json()["choices"][0]["message"]["content"])

        threads = [threading.Thread(target=one) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        self.assertEqual(len(texts), 50)
        self.assertEqual(texts.count("hi from upstream"), 10)
        self.assertEqual(texts.count("limit reached, wait 5 min"), 40)
        self.assertEqual(len(self.upstream.requests), 10)


class StreamingTests(ProxyTestCase):
    def test_first_event_arrives_before_the_upstream_finishes(self) -> None:
        """The upstream holds the rest of its stream until the client has seen the first event."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            payload = json.dumps({"messages": [], "stream": True})
            conn.request("POST", "/v1/chat/completions", payload,
                         {"Authorization": f"Bearer {CLIENT_KEY}", "X-Fake": "pause-after-first"})
            response = conn.getresponse()
            self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
            self.assertEqual(response.getheader("X-RateLimit-Remaining"), "9")
            first = response.read1(65536)
            self.assertFalse(self.upstream.release.is_set())
            self.assertTrue(first.startswith(b"data: ") and first.endswith(b"\n\n"), first)
            self.assertIn(b'"w0"', first)
            self.upstream.release.set()
            rest = response.read()
        finally:
            conn.close()
        self.assertTrue(rest.endswith(b"data: [DONE]\n\n"))
        self.assertEqual((first + rest).count(b"data: "), 6)

    def test_stream_broken_mid_event_ends_cleanly_with_an_error_event(self) -> None:
        response = self.chat(stream=True, headers={"X-Fake": "break-after-first"})
        self.assertEqual(response.status, 200)
        events = response.events()
        self.assertEqual(events[0]["choices"][0]["delta"]["content"], "w0")
        self.assertEqual(events[-1]["error"]["type"], "upstream_error")
        self.assertEqual(response.body.count(b"data: "), 2, "the half event must not be relayed")
        self.assertEqual(self.level(), 9, "a partly served stream is charged")
        self.assert_still_serving()

    def test_client_leaving_mid_stream_closes_the_upstream_request(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        body = json.dumps({"messages": [], "stream": True}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Fake: until-client-leaves\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertTrue(self.upstream.first_event_sent.wait(WAIT))
        sock.recv(100)
        sock.close()
        self.assertTrue(self.upstream.closed_early.wait(2.0), "upstream kept streaming to nobody")
        self.assert_still_serving()


class BadInputTests(ProxyTestCase):
    config_overrides = {"max_body_bytes": 1000}

    def test_body_that_is_not_a_json_object(self) -> None:
        for body in (b"not json", b"[1, 2]", b'"text"', b"\xff\xfe", b""):
            with self.subTest(body=body):
                self.assert_openai_error(self.request("POST", "/v1/chat/completions", body), 400,
                                         "invalid_request_error")
        self.assertEqual(self.level(), 10)
        self.assertEqual(self.upstream.requests, [])

    def test_invalid_fields(self) -> None:
        for fields in ({"messages": "hi"}, {"messages": [], "model": 5}, {"messages": [], "stream": "yes"}):
            with self.subTest(fields=fields):
                self.assert_openai_error(self.request("POST", "/v1/chat/completions", fields), 400)
        self.assertEqual(self.level(), 10)

    def test_oversized_body_is_a_413(self) -> None:
        response = self.chat(content="x" * 2000)
        self.assert_openai_error(response, 413, code="request_too_large")
        self.assertEqual(response.headers["Connection"], "close")
        self.assertEqual(self.level(), 10)
        self.assert_still_serving()

    def test_expect_100_continue(self) -> None:
        body = json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()
        answer = self.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                          b"Content-Length: 5000\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            reply = b"".join(iter(lambda: sock.recv(65536), b""))
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 OK"), reply)
        self.assertIn(b"hi from upstream", reply)

    def test_trailing_slash_and_query_are_still_metered(self) -> None:
        for path in ("/v1/chat/completions/", "/v1/chat/completions?x=1", "/V1/CHAT/COMPLETIONS"):
            with self.subTest(path=path):
                before = self.level()
                response = self.chat(path=path)
                self.assertEqual(response.headers["X-RateLimit-Remaining"], str(before - 1))
        self.assertEqual([r["path"] for r in self.upstream.requests],
                         ["/v1/chat/completions", "/v1/chat/completions?x=1", "/v1/CHAT/COMPLETIONS"])

    def test_idle_client_is_dropped(self) -> None:
        self.start_proxy(client_timeout=0.2)
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
            answer = b"".join(iter(lambda: sock.recv(65536), b""))  # then the proxy closes
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assert_still_serving()


# --------------------------------------------------------------------------
# Sharing: usage accounting, key policies, quota, state (fair queueing and the access log:
# tests/test_fair_queue.py, tests/test_access_log.py)
# --------------------------------------------------------------------------



class UsageModeTests(ProxyTestCase):
    config_overrides = {"cost_mode": "usage", "max_tokens": 100, "refill_tokens": 10}

    def quota(self, key: str = CLIENT_KEY) -> dict:
        return self.request("GET", "/v1/quota", key=key).json()

    def test_reservation_is_settled_to_reported_usage(self) -> None:
        response = self.chat(content="x" * 35, max_tokens=20)  # reserves 10 + 20
        self.assertEqual(response.headers["X-RateLimit-Remaining"], "70")
        self.assertEqual(tokens_of(self.quota()), [100 - 7])

    def test_usage_above_the_reservation_becomes_debt(self) -> None:
        self.chat(max_tokens=10, headers={"X-Usage": "150"})
        self.assertEqual(tokens_of(self.quota()), [-50])
        limited = self.chat(max_tokens=10)
        self.assertEqual(limited.json()["choices"][0]["message"]["content"], "limit reached, wait 35 min")
        self.clock.advance(300 * 7)
        self.assertEqual(self.chat(max_tokens=10).json()["choices"][0]["message"]["content"],
                         "hi from upstream")

    def test_without_reported_usage_the_estimate_stays(self) -> None:
        self.chat(max_tokens=20, headers={"X-Usage": "none"})  # prompt "user hello": 3 tokens
        self.assertEqual(tokens_of(self.quota()), [100 - 3 - 20])

    def test_stream_usage_is_requested_read_and_hidden(self) -> None:
        response = self.chat(max_tokens=20, stream=True, headers={"X-Usage": "12"})
        forwarded = json.loads(self.upstream.requests[-1]["body"])
        self.assertEqual(forwarded["stream_options"], {"include_usage": True})
        events = response.events()
        self.assertEqual(events[-1], "[DONE]")
        self.assertFalse(any("usage" in event for event in events[:-1]), events)
        self.assertEqual(len(events), 6)
        self.assertEqual(tokens_of(self.quota()), [100 - 12])

    def test_client_that_asked_for_usage_gets_it_unchanged(self) -> None:
        response = self.chat(max_tokens=20, stream=True, stream_options={"include_usage": True},
                             headers={"X-Usage": "12"})
        usage_events = [e for e in response.events()[:-1] if "usage" in e]
        self.assertEqual(usage_events, [{"id": "chatcmpl-up", "choices": [], "usage": {
            "prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}])

    def test_client_leaving_mid_stream_pays_for_what_was_generated(self) -> None:
        body = json.dumps({"messages": [{"role": "user", "content": "x" * 39}], "max_tokens": 50,
                           "stream": True}).encode()  # prompt "user x...x" = 44 chars: 11 tokens
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Fake: until-client-leaves\r\n"
                         b"Authorization: Bearer " + CLIENT_KEY.encode() +
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            received = b""
            while b'"w0"' not in received:
                received += sock.recv(65536)
        self.assertTrue(self.upstream.closed_early.wait(WAIT))
        expected = [100 - 11 - 1]  # the prompt, plus "w0" at 4 characters a token
        deadline = time.monotonic() + WAIT
        while tokens_of(self.quota()) != expected and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler settles just after it notices the hang-up
        self.assertEqual(tokens_of(self.quota()), expected)


class KeysFileTests(ProxyTestCase):
    KEYS = {
        CLIENT_KEY: {"name": "alice", "max_tokens": 3, "refill_tokens": 1, "models": ["small"]},
        OTHER_KEY: {"name": "bob", "buckets": [
            {"name": "hourly", "max_tokens": 3, "refill_tokens": 3, "refill_interval_seconds": 3600},
            {"name": "daily", "max_tokens": 5, "refill_tokens": 5, "refill_interval_seconds": 86400}]},
    }

    def setUp(self) -> None:
        self.keys_path = write_keys_file(self, self.KEYS)
        self.config_overrides = {"keys_file": self.keys_path, "client_keys": ("sk-env-key",)}
        super().setUp()

    def write_keys(self, keys: object) -> None:
        """Replace the keys file: with ``keys`` as JSON, or with the text itself if a string."""
        if not isinstance(keys, str):
            write_keys_file(self, keys)
            return
        with open(self.keys_path + ".tmp", "w") as file:
            file.write(keys)
        os.replace(self.keys_path + ".tmp", self.keys_path)

    def text(self, response: Response) -> str:
        return response.json()["choices"][0]["message"]["content"]

    def test_keys_from_the_file_and_the_environment_are_accepted(self) -> None:
        self.assertEqual(self.chat(model="small").status, 200)
        self.assertEqual(self.chat(key=OTHER_KEY).status, 200)
        self.assertEqual(self.chat(key="sk-env-key").status, 200)
        self.assert_openai_error(self.chat(key="sk-nobody"), 401, code="invalid_api_key")

    def test_per_key_capacity_and_quota(self) -> None:
        for _ in range(3):
            self.assertEqual(self.text(self.chat(model="small")), "hi from upstream")
        self.assertEqual(self.text(self.chat(model="small")), "limit reached, wait 5 min")
        quota = self.request("GET", "/v1/quota").json()
        self.assertEqual((quota["name"], quota["models"]), ("alice", ["small"]))
        self.assertEqual(quota["buckets"], [{"name": "", "capacity": 3, "tokens": 0, "refill_tokens": 1,
                                             "refill_interval_seconds": 300.0, "unit": None,
                                             "period": None, "models": None,
                                             "seconds_to_next_refill": 300.0, "seconds_to_full": 900.0}])

    def test_the_longer_window_blocks_too_and_is_named(self) -> None:
        for _ in range(3):
            self.assertEqual(self.text(self.chat(key=OTHER_KEY)), "hi from upstream")
        self.assertEqual(self.text(self.chat(key=OTHER_KEY)), "hourly limit reached, wait 60 min")
        self.clock.advance(3600)
        for _ in range(2):
            self.assertEqual(self.text(self.chat(key=OTHER_KEY)), "hi from upstream")
        self.assertEqual(self.text(self.chat(key=OTHER_KEY)), "daily limit reached, wait 23 h")
        quota = self.request("GET", "/v1/quota", key=OTHER_KEY).json()
        self.assertEqual([(b["name"], b["tokens"]) for b in quota["buckets"]], [("hourly", 1), ("daily", 0)])

    def test_a_model_off_the_list_is_403_and_free(self) -> None:
        error = self.assert_openai_error(self.chat(model="large"), 403, code="model_not_allowed")
        self.assertEqual(error["param"], "model")
        self.assertEqual(tokens_of(self.request("GET", "/v1/quota").json()), [3])
        self.assertEqual(self.upstream.requests, [])

    def test_models_list_shows_only_the_keys_models(self) -> None:
        # the fake upstream lists "upstream-model" and "small"; alice may use "small" only
        for framing in ("", "chunked-json"):
            with self.subTest(framing=framing):
                listed = self.request("GET", "/v1/models", headers={"X-Fake": framing}).json()["data"]
                self.assertEqual([m["id"] for m in listed], ["small"])
        listed = self.request("GET", "/v1/models", key=OTHER_KEY).json()["data"]
        self.assertEqual([m["id"] for m in listed], ["upstream-model", "small"])
        self.start_proxy(keys_file=self.keys_path, upstream_model="small")
        self.assertEqual([m["id"] for m in self.request("GET", "/v1/models").json()["data"]], ["small"])

    def test_changes_apply_without_restart_and_a_broken_file_keeps_the_old_keys(self) -> None:
        self.write_keys({"sk-new": {"name": "carol"}})
        self.assertTrue(self.proxy.keyring.reload_if_changed())
        self.assertEqual(self.chat(key="sk-new").status, 200)
        self.assert_openai_error(self.chat(key=OTHER_KEY), 401)
        self.write_keys("{broken")
        self.assertFalse(self.proxy.keyring.reload_if_changed())
        self.assertEqual(self.chat(key="sk-new").status, 200)
        errors = [line for line in self.log.lines if "KEYS_FILE" in line and "keeping" in line]
        self.assertEqual(len(errors), 1, self.log.lines)
        self.assertFalse(self.proxy.keyring.reload_if_changed(), "a broken file is reported once")

    def test_invalid_files_are_refused_at_startup_without_showing_keys(self) -> None:
        for keys in ({"sk-secret-1": {"max_tokens": 0}}, {"sk-secret-1": {"colour": "red"}},
                     {"sk-secret-1": {"models": "small"}}, ["sk-secret-1"], "{"):
            with self.subTest(keys=keys):
                self.write_keys(keys)
                with self.assertRaises(ConfigError) as raised:
                    ProxyServer(replace(self.config, keys_file=self.keys_path))
                self.assertIn("KEYS_FILE", str(raised.exception))
                self.assertNotIn("sk-secret-1", str(raised.exception))

    def test_example_keys_file_is_the_readmes_and_valid(self) -> None:
        with open(os.path.join(HERE, "examples", "keys.json")) as file:
            example = file.read()
        with open(os.path.join(HERE, "README.md")) as file:
            self.assertIn(example.strip(), file.read())
        policies = llm_proxy.parse_keys_file(example, Config())
        ada = next(policy for _, policy in policies.values() if policy.name == "ada")
        self.assertEqual(ada, llm_proxy.Policy("ada", (BucketSpec(20000, 20000, 86400.0),),
                                               ("llama-3.1-8b-instruct",), 2))


class LimitErrorModeTests(ProxyTestCase):
    config_overrides = {"limit_response": "error", "max_tokens": 1, "refill_tokens": 1}

    def test_limit_is_a_429_with_retry_after(self) -> None:
        self.chat()
        response = self.chat()
        error = self.assert_openai_error(response, 429, "rate_limit_exceeded", "rate_limit_exceeded")
        self.assertEqual(error["message"], "limit reached, wait 5 min")
        self.assertEqual(response.headers["Retry-After"], "300")
        self.assertEqual(response.headers["X-RateLimit-Remaining"], "0")

    def test_a_request_that_can_never_fit_is_a_400(self) -> None:
        self.start_proxy(limit_response="error", cost_mode="estimate", max_tokens=100)
        response = self.chat(content="x" * 400)
        self.assert_openai_error(response, 400, code="request_too_large")
        self.assertIsNone(response.headers["Retry-After"])


class StateFileTests(ProxyTestCase):
    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.state_path = os.path.join(directory.name, "state.json")
        self.config_overrides = {"state_file": self.state_path}
        super().setUp()

    def restart(self, downtime: float) -> None:
        """Stop (which saves), let ``downtime`` pass, start again from the state file."""
        self.stop(self.proxy)
        self.proxy = None
        self.wall.advance(downtime)
        self.clock.advance(5000)  # a new process's monotonic clock has nothing to do with the old one
        self.start_proxy(state_file=self.state_path)

    def test_levels_survive_a_restart_and_downtime_refills_apply(self) -> None:
        for _ in range(7):
            self.chat()
        self.clock.advance(100)
        self.restart(downtime=0)
        self.assertEqual(self.level(), 3)
        self.restart(downtime=250)  # one step, due 200 s after the save, fell in the downtime
        self.assertEqual(self.level(), 5)
        self.clock.advance(249)  # the step clock kept its phase: next step 300 s after the last
        self.assertEqual(self.level(), 5)
        self.clock.advance(1)
        self.assertEqual(self.level(), 7)

    def test_full_buckets_are_not_kept(self) -> None:
        self.chat()
        self.chat(key=OTHER_KEY)
        self.clock.advance(300)
        self.proxy.tidy()
        self.assertEqual(len(self.proxy.buckets), 0)
        with open(self.state_path) as file:
            self.assertEqual(json.load(file)["buckets"], {})

    def test_corrupt_or_missing_state_starts_clean_with_one_line(self) -> None:
        self.chat()
        self.stop(self.proxy)
        self.proxy = None
        for corrupt in ('{"version": 1, "buckets": {"key:x": [["a"]]}}', '{"version": 1, "buckets": '
                        '{"key:x": [[1e400, 0]]}}', '{"version": 1, "buckets": {"key:x": [[1, NaN]]}}',
                        "\x00garbage", "[]"):
            with self.subTest(corrupt=corrupt):
                with open(self.state_path, "w") as file:
                    file.write(corrupt)
                self.log.lines.clear()
                self.start_proxy(state_file=self.state_path)
                self.assertEqual(self.level(), 10)
                self.assertEqual(len([l for l in self.log.lines if "STATE_FILE" in l]), 1, self.log.lines)
                self.stop(self.proxy)
                self.proxy = None
        os.unlink(self.state_path)
        self.start_proxy(state_file=self.state_path + ".missing")
        self.assertIn("not found", self.log.lines[-1])


class RestartTests(unittest.TestCase):
    """The real process: SIGKILL loses at most one save interval; SIGHUP re-reads KEYS_FILE."""

    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.directory = directory.name
        self.echo = llm_proxy.start_echo_model(word_delay=0)
        self.addCleanup(lambda: (self.echo.shutdown(), self.echo.server_close()))

    def start(self, **env: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        full_env = clean_environment()
        full_env.update(HOST="127.0.0.1", PORT=str(port),
                        BASE_API_URL=f"http://127.0.0.1:{self.echo.server_address[1]}/v1", **env)
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py")], env=full_env,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.addCleanup(lambda: (process.kill(), process.communicate(timeout=WAIT)))
        self.assertIn("listening", process.stdout.readline())
        return process, port

    def call(self, port: int, path: str, key: str, body: object = None) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        try:
            conn.request("POST" if body is not None else "GET", path,
                         None if body is None else json.dumps(body), {"Authorization": f"Bearer {key}"})
            response = conn.getresponse()
            return {"status": response.status, **json.loads(response.read())}
        finally:
            conn.close()

    def test_sigkill_loses_at_most_one_save_interval(self) -> None:
        state = os.path.join(self.directory, "state.json")
        process, port = self.start(STATE_FILE=state, STATE_SAVE_SECONDS="0.2")
        for _ in range(6):
            self.call(port, "/v1/chat/completions", CLIENT_KEY, {"messages": []})
        digest = "key:" + llm_proxy.key_digest(CLIENT_KEY)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:  # wait for a save that includes the traffic
            with contextlib.suppress(OSError, ValueError):
                with open(state) as file:
                    if json.load(file)["buckets"].get(digest, [[None]])[0][0] == 4:
                        break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=WAIT)
        _, port = self.start(STATE_FILE=state)
        self.assertEqual(tokens_of(self.call(port, "/v1/quota", CLIENT_KEY)), [4])

    def test_sigterm_saves_the_state_before_exiting(self) -> None:
        state = os.path.join(self.directory, "state.json")
        process, port = self.start(STATE_FILE=state, STATE_SAVE_SECONDS="3600")
        self.call(port, "/v1/chat/completions", CLIENT_KEY, {"messages": []})
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(WAIT), 0)
        with open(state) as file:
            saved = json.load(file)["buckets"]
        self.assertEqual(saved["key:" + llm_proxy.key_digest(CLIENT_KEY)][0][0], 9)

    def test_sighup_reloads_the_keys_file(self) -> None:
        keys = write_keys_file(self, {"sk-old": {"name": "old"}})
        process, port = self.start(KEYS_FILE=keys)
        self.assertEqual(self.call(port, "/v1/quota", "sk-old")["name"], "old")
        self.assertEqual(write_keys_file(self, {"sk-new": {"name": "new"}}), keys)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while self.call(port, "/v1/quota", "sk-new")["status"] != 200:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        self.assertEqual(self.call(port, "/v1/quota", "sk-old")["status"], 401)


# --------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------

def all_tests() -> list[unittest.TestCase]:
    """This module's tests and those under tests/, flattened, in a stable order."""
    sys.modules.setdefault("test_llm_proxy", sys.modules[__name__])  # one copy of the fixtures
    loader = unittest.defaultTestLoader
    suite = unittest.TestSuite([loader.loadTestsFromModule(sys.modules[__name__]),
                                loader.discover(os.path.join(HERE, "tests"), top_level_dir=HERE)])
    flat: list[unittest.TestCase] = []
    pending: list = [suite]
    while pending:
        item = pending.pop(0)
        if isinstance(item, unittest.TestSuite):
            pending[:0] = list(item)
        else:
            flat.append(item)
    return flat


def run_shard(index: int, count: int) -> int:
    """Run every ``count``-th test from ``index``; the last line is a JSON tally for the parent."""
    tests = [test for position, test in enumerate(all_tests()) if position % count == index]
    result = unittest.TextTestRunner(verbosity=1, stream=sys.stdout).run(unittest.TestSuite(tests))
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    print(json.dumps({"run": result.testsRun, "failed": failed, "skipped": len(result.skipped)}))
    return 0 if result.wasSuccessful() else 1


def main() -> int:
    """Run all tests in six processes at once, then print the closing tally.

    Each test starts its own servers on port 0, so the shards share nothing.
    ``--serial`` runs everything in this process instead.
    """
    if len(sys.argv) > 2 and sys.argv[1] == "--shard":
        index, count = (int(n) for n in sys.argv[2].split("/"))
        return run_shard(index, count)
    if "--serial" in sys.argv:
        return run_shard(0, 1)
    count = 6  # (more than the cores: many tests mostly wait, on timeouts and sockets)
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--shard", f"{i}/{count}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(count)]
    run = failed = skipped = 0
    for worker in workers:
        output, _ = worker.communicate()
        lines = output.rstrip("\n").split("\n")
        try:
            tally = json.loads(lines[-1])
        except ValueError:  # the worker died before its tally: count it as a failure
            tally = {"run": 0, "failed": 1, "skipped": 0}
        else:
            lines = lines[:-1]
        print("\n".join(lines))
        run, failed, skipped = run + tally["run"], failed + tally["failed"], skipped + tally["skipped"]
    passed = run - failed - skipped
    shown_skipped = f", {skipped} skipped" if skipped else ""
    print(f"{passed} passed, {failed} failed{shown_skipped}")
    return 0 if failed == 0 and all(w.returncode == 0 for w in workers) else 1


if __name__ == "__main__":
    sys.exit(main())
