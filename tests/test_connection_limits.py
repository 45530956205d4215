"""Limits that must hold whatever a client sends, however many connect (issue 18).

A red-team review found four ways around them: a request line dripped in a byte
at a time escaped CLIENT_TIMEOUT; running out of file descriptors before
MAX_CONNECTIONS left new clients unanswered and the accept loop spinning; a
request's method, model or names reached the logs raw and unbounded; and errors
refused before routing came in OpenAI's shape whatever API the path belongs to.
Each test here failed before its fix.  Beside them: slowloris, slow readers, idle
connections by the hundred, the connection cap, and bucket memory that stays
bounded however many callers come and go.  Run by the README's command,
``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import socket
import subprocess
import sys
import time
import unittest

from llm_proxy import BucketSpec, BucketStore

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

from test_llm_proxy import (CLIENT_KEY, HERE, OTHER_KEY, WAIT, AdversarialTestCase, FakeClock,
                            ProxyTestCase, Response, body_of, clean_environment, dechunk, free_port,
                            send_raw, write_keys_file)


exchange = send_raw  # the proxy closes after every refusal here


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


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


# --------------------------------------------------------------------------
# Errors in the API's own shape, whichever stage refuses the request
# --------------------------------------------------------------------------

def is_openai_error(body: dict) -> bool:
    return set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}


def is_anthropic_error(body: dict) -> bool:
    return (set(body) == {"type", "error"} and body["type"] == "error"
            and set(body["error"]) == {"type", "message"})


def is_ollama_error(body: dict) -> bool:
    return set(body) == {"error"} and isinstance(body["error"], str)


SHAPES = {"/v1/chat/completions": is_openai_error, "/v1/messages": is_anthropic_error,
          "/api/chat": is_ollama_error}
TOO_MANY_HEADERS = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
# What each refusal adds to a POST's head, its status, and what refuses it: route's framing check,
# parse_request's header reading, handle_expect_100 before the body is asked for.
REFUSALS = {
    "413 body too large": (b"Content-Length: 2000\r\n", 413),                               # route
    "411 chunked body": (b"Transfer-Encoding: chunked\r\n", 411),                           # route
    "431 too many headers": (TOO_MANY_HEADERS, 431),                                         # headers
    "413 before 100 Continue": (b"Expect: 100-continue\r\nContent-Length: 2000\r\n", 413),  # expect
}


class ErrorShapeTests(ProxyTestCase):
    """An Anthropic or Ollama client cannot read an OpenAI-shaped error, whatever refused it."""

    config_overrides = {"max_body_bytes": 1000}

    def test_every_early_refusal_is_in_the_shape_of_the_paths_api(self) -> None:
        for path, is_its_shape in SHAPES.items():
            for refusal, (headers, status) in REFUSALS.items():
                with self.subTest(path=path, refusal=refusal):
                    answer = exchange(self.port, b"POST %s HTTP/1.1\r\nHost: x\r\n%s\r\n"
                                      % (path.encode(), headers))
                    self.assertEqual(status_and_body(answer)[0], status, answer[:300])
                    self.assertNotIn(b"100 Continue", answer)
                    body = json.loads(status_and_body(answer)[1])
                    self.assertTrue(is_its_shape(body), body)
        self.assertEqual(self.upstream.requests, [])
        self.assert_still_serving()


# --------------------------------------------------------------------------
# Logs: what a client sends is shown escaped and bounded, never raw
# --------------------------------------------------------------------------

LINE_BOUND = 3000  # a request's line or record, with every value at its longest once escaped


class LoggedValueTests(ProxyTestCase):
    """A method, model or name is written to the console and ACCESS_LOG escaped and cut."""

    def assert_logs_bounded_and_printable(self, *extra: str) -> None:
        """Every console line, log record and ``extra`` line: short, without a control character."""
        self.proxy.console.flush()
        lines = self.console.getvalue().splitlines() + self.log.lines + list(extra)
        self.assertTrue(lines)
        for line in lines:
            self.assertLess(len(line), LINE_BOUND, line[:300])
            self.assertTrue(line.isprintable(), ascii(line[:300]))

    def test_a_method_that_is_no_token_is_refused_and_never_logged_raw(self) -> None:
        answer = exchange(self.port, b"\x1b[2J\x1b]0;owned\x07GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = status_and_body(answer)
        self.assertEqual(status, 400, answer[:300])
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_method")
        self.logged(1)
        self.assert_logs_bounded_and_printable()

    def test_a_10_kb_method_is_refused_and_never_logged_whole(self) -> None:
        answer = exchange(self.port, b"A" * 10_000 + b" /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status_and_body(answer)[0], 501, answer[:300])
        self.assertLess(len(answer), 2000, "the answer repeats the method")
        self.logged(1)
        self.assert_logs_bounded_and_printable()

    def test_a_huge_model_and_a_key_name_with_escapes_are_logged_escaped_and_cut(self) -> None:
        name = "ops\x1b[2J" + "n" * 5000
        keys = write_keys_file(self, {CLIENT_KEY: {"name": name}})
        access_log = os.path.join(os.path.dirname(keys), "access.log")
        self.start_proxy(keys_file=keys, access_log=access_log)
        model = "\x1b]0;owned\x07" + "m" * 1_000_000
        self.assertEqual(self.chat(model=model).status, 200)
        self.logged(1)
        self.proxy.access_log.flush()
        with open(access_log, encoding="utf-8") as file:
            written = file.read()
        self.assertEqual(written.count("\n"), 1)
        record = json.loads(written)
        for field in ("model", "key"):  # the values, as a reader of the JSON gets them back
            self.assertLess(len(record[field]), LINE_BOUND, field)
            self.assertTrue(record[field].isprintable(), field)
        self.assertTrue(record["model"].startswith("\\x1b]0;owned\\x07mmm"), record["model"][:50])
        self.assertIn("more characters", record["model"])
        self.assert_logs_bounded_and_printable(written.rstrip("\n"))


# --------------------------------------------------------------------------
# File descriptors: the proxy as started, with a low limit on them
# --------------------------------------------------------------------------

SCRIPT = os.path.join(HERE, "llm_proxy.py")
# Starts the script with RLIMIT_NOFILE at argv[1] (soft and hard), by exec: the same process.
WITH_FILE_LIMIT = ("import os, resource, sys\n"
                   "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]),) * 2)\n"
                   "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n")
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"  # answered, and the connection kept


def cpu_seconds(pid: int) -> float:
    """User and system time a process has used so far (Linux: /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def answer_status(sock: socket.socket) -> int:
    """The status of the next answer on ``sock``; its body read if kept alive, 0 if none came."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"HTTP/1.1 200 "):
            while not data.endswith(b'{"status":"ok"}'):
                data += sock.recv(65536)
    except OSError:  # no answer in time, or reset
        pass
    return status_and_body(data)[0] if data.startswith(b"HTTP/1.1 ") else 0


@unittest.skipUnless(sys.platform.startswith("linux") and resource is not None,
                     "reads /proc and sets descriptor limits (Linux)")
class DescriptorLimitTests(unittest.TestCase):
    """Out of file descriptors, a client still gets its fast 503, and the proxy does not spin."""

    def start(self, file_limit: int | None = None) -> subprocess.Popen:
        """The proxy as a user starts it, listening once this returns; stopped after the test."""
        env = clean_environment()
        env.update(BASE_API_URL="http://127.0.0.1:9/v1", HOST="127.0.0.1", PORT=str(free_port()),
                   MAX_CONNECTIONS_PER_CLIENT="0")  # the whole pool, from this one address
        command = [sys.executable, SCRIPT] if file_limit is None else \
            [sys.executable, "-c", WITH_FILE_LIMIT, str(file_limit), SCRIPT]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        self.addCleanup(self.stop, process)
        self.assertIn("listening", process.stdout.readline())
        self.port = int(env["PORT"])
        return process

    def stop(self, process: subprocess.Popen) -> None:
        if process.returncode is None:
            process.terminate()
            self.stderr = process.communicate(timeout=WAIT)[1]

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2.0)
        self.addCleanup(sock.close)
        return sock

    def fill(self, attempts: int) -> int:
        """Hold kept-alive connections until one is refused (fast); how many were served before."""
        for held in range(attempts):
            sock = self.connect()
            sock.sendall(HEALTH)
            started = time.monotonic()
            status = answer_status(sock)
            if status == 503:
                self.assertLess(time.monotonic() - started, 1.0, "the 503 is fast")
                return held
            self.assertEqual(status, 200, f"connection {held + 1} got no answer")
        self.fail(f"{attempts} connections and none refused")

    def test_max_connections_is_lowered_to_fit_the_descriptor_limit(self) -> None:
        process = self.start(file_limit=128)
        served = self.fill(attempts=200)
        self.stop(process)
        warnings = [line for line in self.stderr.splitlines() if "MAX_CONNECTIONS lowered" in line]
        self.assertEqual(len(warnings), 1, self.stderr)
        self.assertIn(f"MAX_CONNECTIONS lowered from 1024 to {served}: ", warnings[0])
        self.assertIn("128 files (RLIMIT_NOFILE)", warnings[0])

    def test_out_of_descriptors_the_next_client_gets_a_503_and_the_proxy_rests(self) -> None:
        process = self.start()
        # Room for four more descriptors, set from outside once the proxy has fitted its
        # connections to a roomy limit: the cap never refuses, accept() is what runs out.
        # A new descriptor takes the lowest free number, and a number closed at startup is free:
        # the limit goes just past the fourth free number, not four past the highest.
        in_use = {int(name) for name in os.listdir(f"/proc/{process.pid}/fd")}
        limit = free = 0
        while free < 4:
            free += limit not in in_use
            limit += 1
        hard = resource.prlimit(process.pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (limit, hard))
        self.assertLessEqual(self.fill(attempts=20), 4)
        waiting = [self.connect() for _ in range(3)]
        used = cpu_seconds(process.pid)
        time.sleep(0.5)  # the clients wait: a loop spinning on accept() would use all of this
        self.assertLess(cpu_seconds(process.pid) - used, 0.2, "the accept loop spins")
        for sock in waiting:
            self.assertEqual(answer_status(sock), 503)
        self.stop(process)
        warnings = [line for line in self.stderr.splitlines() if "out of file descriptors" in line]
        self.assertEqual(len(warnings), 1, self.stderr)
        self.assertIn("(EMFILE)", warnings[0])


class ClientFaultTests(AdversarialTestCase):
    """Slow, stalled and idle clients are dropped or held without delaying anyone else."""

    def test_slowloris_is_dropped_while_others_are_served(self) -> None:
        self.start_proxy(client_timeout=0.3)
        stalled = [socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) for _ in range(20)]
        try:
            for sock in stalled:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            for _ in range(5):
                self.assertEqual(self.chat().status, 200)
            for sock in stalled:  # each gets a 408, then the proxy closes the connection
                answer = b"".join(iter(lambda: sock.recv(65536), b""))
                self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        finally:
            for sock in stalled:
                sock.close()
        self.assert_healthy()

    def test_slow_reader_gets_everything_and_delays_no_one(self) -> None:
        body = json.dumps({"messages": [], "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Fake: big-stream\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.assertTrue(self.upstream.first_event_sent.wait(WAIT))
            self.assertEqual(self.chat(key=OTHER_KEY).status, 200)  # served while the reader dawdles
            received = []
            while True:
                chunk = sock.recv(32768)
                if not chunk:
                    break
                received.append(chunk)
                time.sleep(0.005)  # about 6 MB/s: the proxy's writes wait on this reader
        answer = b"".join(received)
        parsed = Response(200, http.client.HTTPMessage(), dechunk(body_of(answer))).events()
        self.assertEqual(len(parsed), 201)
        self.assertEqual(parsed[-1], "[DONE]")
        self.assertEqual(parsed[199]["choices"][0]["delta"]["content"], "w199" + "x" * 10_000)

    def test_300_idle_connections_do_not_stop_service(self) -> None:
        idle = [socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) for _ in range(300)]
        try:
            deadline = time.monotonic() + WAIT
            while self.proxy.connection_count < 300 and time.monotonic() < deadline:
                time.sleep(0.01)
            self.assertEqual(self.proxy.connection_count, 300, "all 300 idle connections are open")
            for _ in range(5):
                self.assertEqual(self.chat().status, 200)
            self.assertGreaterEqual(self.proxy.connection_count, 300, "no idle connection was dropped")
            for sock in idle[:10]:  # each is still a live connection the proxy would serve
                sock.setblocking(False)
                with self.assertRaises(BlockingIOError):
                    sock.recv(1)
        finally:
            for sock in idle:
                sock.close()
        self.assert_healthy()


class SlowDripTests(AdversarialTestCase):
    def test_a_request_dripping_in_is_dropped_after_the_client_timeout(self) -> None:
        self.start_proxy(client_timeout=0.3, state_save_interval=0.1)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400
            try:
                for byte in request:  # one byte every 20 ms: no single read ever times out
                    sock.sendall(bytes([byte]))
                    time.sleep(0.02)
            except OSError:
                pass  # dropped while still sending
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
        self.assertLess(time.monotonic() - started, 4.0, "a dripping client held its connection")
        self.assert_healthy()


class BoundedResourceTests(AdversarialTestCase):
    """Connections past the cap get a fast 503; buckets of callers gone quiet are forgotten."""

    def test_connection_cap_answers_a_fast_503(self) -> None:
        self.start_proxy(max_connections=5, max_connections_per_client=0)  # the whole pool, from here
        held = [socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) for _ in range(5)]
        try:
            deadline = time.monotonic() + WAIT
            while self.proxy.connection_count < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            answer = self.exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertLess(time.monotonic() - started, 1.0)
            error = self.assert_error_answer(answer, 503)
            self.assertEqual(error["code"], "too_many_connections")
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + WAIT
        while self.proxy.connection_count and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assert_healthy()

    def test_200000_identities_are_forgotten_once_full_again(self) -> None:
        clock = FakeClock()
        store = BucketStore(clock)
        spec = (BucketSpec(10, 2, 300),)
        for index in range(200_000):
            store.charge(f"ip:10.{index >> 16}.{(index >> 8) & 255}.{index & 255}", spec, 1)
        self.assertEqual(len(store), 200_000)
        clock.advance(299)
        self.assertEqual(store.prune(lambda identity: spec), 0, "not full yet: nothing to forget")
        clock.advance(1)
        self.assertEqual(store.prune(lambda identity: spec), 200_000)
        self.assertEqual(len(store), 0)

    def test_churning_keys_through_the_proxy_leave_nothing_behind(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            for index in range(500):
                self.request("POST", "/v1/chat/completions", {"messages": []}, key=f"sk-churn-{index}",
                             conn=conn)
        finally:
            conn.close()
        self.assertEqual(len(self.proxy.buckets), 500)
        self.clock.advance(300)
        self.proxy.tidy()
        self.assertEqual(len(self.proxy.buckets), 0)
