#!/usr/bin/env python3
"""Benchmark llm_proxy against a direct connection to the same upstream.

    python3 bench/bench_llm_proxy.py            # the full run; its table is in the README
    python3 bench/bench_llm_proxy.py --quick    # a small version, as CI runs it
    python3 bench/bench_llm_proxy.py --compare ../other-checkout   # this proxy against another's

Three processes on loopback: a fast fake upstream (stdlib http.server), the
proxy (``llm_proxy.py``, started as a user would), and this script as the
clients.  Every figure is measured through the proxy and directly against the
upstream in the same run, alternating, and the median of several rounds is
reported with the ratio, because machines are noisy.  Nothing is asserted:
this prints figures.  Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "bench-key"
FORGET_AFTER = 3.0  # seconds: a 1 s refill step plus a housekeeping pass (every 1 s), with room


# --------------------------------------------------------------------------
# The fake upstream (run in its own process with --serve-upstream)
# --------------------------------------------------------------------------

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The quick brown fox."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}).encode()
# The same answer in the Responses and Anthropic Messages APIs (shapes as llama.cpp's server sends).
REPLIES = {
    "/v1/chat/completions": COMPLETION,
    "/v1/responses": json.dumps({
        "id": "resp_bench", "object": "response", "status": "completed", "model": "bench",
        "output": [{"type": "message", "id": "msg_bench", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": "The quick brown fox.",
                                 "annotations": []}]}],
        "usage": {"input_tokens": 12, "output_tokens": 5, "total_tokens": 17}}).encode(),
    "/v1/messages": json.dumps({
        "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench",
        "content": [{"type": "text", "text": "The quick brown fox."}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 2, "cache_read_input_tokens": 10,
                                         "output_tokens": 5}}).encode(),
}


class BenchUpstream(BaseHTTPRequestHandler):
    """A trivial OpenAI-style upstream: parses the request, answers at once.

    Streams carry ``max_tokens`` events, ``pace_ms`` apart, each stamped with the
    monotonic time it was sent (one clock for every process on this machine), so
    a client can tell how long each event took to reach it.
    """

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not payload.get("stream"):
            reply = REPLIES.get(self.path.partition("?")[0], COMPLETION)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pace = payload.get("pace_ms", 10) / 1000
        for index in range(payload.get("max_tokens", 50)):
            if index:
                time.sleep(pace)
            event = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}],"t":%r}\n\n' % time.monotonic()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


class BenchServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog is set when the server is created


def serve_upstream() -> None:
    server = BenchServer(("127.0.0.1", 0), BenchUpstream)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def serve_byte_relay(upstream_port: int) -> None:
    """The floor for any proxy written in Python: bytes copied both ways, nothing parsed.

    A thread per direction per connection, as ``socket`` makes it; what llm_proxy
    adds on top of this is the work it does (parsing, keys, buckets, records).
    """
    def copy(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        for end in (client, upstream):
            end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=copy, args=(client, upstream), daemon=True).start()
        threading.Thread(target=copy, args=(upstream, client), daemon=True).start()


_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


def serve_http_forwarder(upstream_port: int) -> None:
    """The floor for a Python proxy that reads HTTP messages, which any accounting needs.

    Each request and response is read whole (head to the blank line, body by
    Content-Length) and passed on, over one keep-alive upstream connection per client
    and one thread per connection; nothing is checked, counted or logged.  What
    llm_proxy adds on top of this is its work: the strict parser, keys, buckets, JSON,
    usage, records.
    """
    def read_message(sock: socket.socket, buffer: bytearray) -> bytes:
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError
            buffer += data
        end += 4
        length = _LENGTH.search(buffer, 0, end)
        end += int(length.group(1)) if length else 0
        while len(buffer) < end:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError
            buffer += data
        message = bytes(buffer[:end])
        del buffer[:end]
        return message

    def forward(client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        from_client, from_upstream = bytearray(), bytearray()
        with suppress(OSError), client, upstream:
            while True:
                upstream.sendall(read_message(client, from_client))
                client.sendall(read_message(upstream, from_upstream))

    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=forward, args=(client,), daemon=True).start()


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

class Process:
    """A child process whose first stdout line says it is ready; RSS from /proc."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self.first_line = self.popen.stdout.readline()

    def memory_kib(self, field: str = "VmRSS") -> int:
        with open(f"/proc/{self.popen.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)


def start_byte_relay(upstream_port: int) -> tuple[Process, int]:
    process = Process([sys.executable, os.path.abspath(__file__), "--serve-byte-relay",
                       str(upstream_port)])
    return process, int(process.first_line)


def start_http_forwarder(upstream_port: int) -> tuple[Process, int]:
    process = Process([sys.executable, os.path.abspath(__file__), "--serve-http-forwarder",
                       str(upstream_port)])
    return process, int(process.first_line)


def start_upstream() -> tuple[Process, int]:
    process = Process([sys.executable, os.path.abspath(__file__), "--serve-upstream"])
    return process, int(process.first_line)


def start_proxy(upstream_port: int, root: str = ROOT, **env: str) -> tuple[Process, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = {"HOST": "127.0.0.1", "PORT": str(port), "MAX_TOKENS": "1000000000",
                "REFILL_TOKENS": "1", "BASE_API_URL": f"http://127.0.0.1:{upstream_port}/v1",
                # every benchmark client comes from 127.0.0.1: no share per address
                "MAX_CONNECTIONS_PER_CLIENT": "0"}
    settings.update(env)
    environment = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    environment.update(settings)
    process = Process([sys.executable, os.path.join(root, "llm_proxy.py")], environment)
    if "listening" not in process.first_line:
        raise SystemExit(f"proxy did not start: {process.first_line!r}")
    return process, port


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------

def request_bytes(payload: dict, key: str = KEY, path: str = "/v1/chat/completions") -> bytes:
    body = json.dumps(payload).encode()
    return (b"POST %s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), key.encode(), len(body), body))


CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Say something short."}]}


class KeepAliveClient:
    """One persistent connection that sends a request and reads a Content-Length answer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def call(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.receive()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():  # a stream: read to its last chunk
            while not rest.endswith(b"0\r\n\r\n"):
                rest += self.receive()
            self.buffer = b""
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head[:80].decode())
            return rest
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += self.receive()
        self.buffer = rest[length:]
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:80].decode())
        return rest[:length]

    def receive(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        return data

    def close(self) -> None:
        self.sock.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def throughput(port: int, clients: int, seconds: float, request: bytes = b"") -> dict:
    """Keep-alive clients in a closed loop for ``seconds``: requests per second, p50/p99 latency."""
    request = request or request_bytes(CHAT)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    connections = [KeepAliveClient(port) for _ in range(clients)]
    for connection in connections:
        connection.call(request)  # warm up: connection, pool, caches
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(index: int) -> None:
        connection, mine = connections[index], latencies[index]
        start.wait()
        while True:
            began = time.perf_counter()
            if began >= stop_at[0]:
                return
            connection.call(request)
            mine.append(time.perf_counter() - began)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    for connection in connections:
        connection.close()
    every = [value for mine in latencies for value in mine]
    return {"rps": len(every) / elapsed, "p50_ms": percentile(every, 0.5) * 1000,
            "p99_ms": percentile(every, 0.99) * 1000}


def stream_delays(port: int, events: int, pace_ms: int) -> dict:
    """One streamed completion: each event's delay from the upstream's send to our receipt."""
    request = request_bytes(dict(CHAT, stream=True, max_tokens=events, pace_ms=pace_ms))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = time.monotonic()
        sock.sendall(request)
        delays, first, buffer = [], None, b""
        while b"[DONE]" not in buffer:
            data = sock.recv(65536)
            if not data:
                break
            now = time.monotonic()
            buffer += data
            while True:  # take each complete event out of the buffer
                start = buffer.find(b'"t":')
                end = buffer.find(b"}", start)
                if start < 0 or end < 0:
                    break
                if first is None:
                    first = now - sent
                delays.append(now - float(buffer[start + 4:end]))
                buffer = buffer[end:]
    return {"first_ms": first * 1000, "delays_ms": [d * 1000 for d in delays], "events": len(delays)}


def idle_then_active(port: int, count: int, events: int) -> dict:
    """``count`` connections open idle, then all ask for a stream at once; all must complete."""
    selector = selectors.DefaultSelector()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sockets.append(sock)
    time.sleep(0.5)  # idle
    request = request_bytes(dict(CHAT, stream=True, max_tokens=events, pace_ms=10))
    finished, failed = 0, 0
    for sock in sockets:
        sock.sendall(request)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, b"")
    began = time.perf_counter()
    deadline = began + 120
    while finished + failed < count and time.perf_counter() < deadline:
        for key, _ in selector.select(timeout=1):
            try:
                data = key.fileobj.recv(65536)
            except OSError:
                data = b""
            seen = key.data + data
            if b"data: [DONE]" in seen:
                finished += 1
            elif data:
                selector.modify(key.fileobj, selectors.EVENT_READ, seen[-32:])
                continue
            else:
                failed += 1
            selector.unregister(key.fileobj)
    elapsed = time.perf_counter() - began
    for sock in sockets:
        sock.close()
    return {"completed": finished, "failed": count - finished, "seconds": elapsed}


def connect_burst(port: int, count: int) -> dict:
    """``count`` simultaneous connects, each with one request: how many were refused or reset."""
    request = request_bytes(CHAT)
    errors, answered = [0], [0]
    barrier = threading.Barrier(count)
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        try:
            client = KeepAliveClient(port)
            client.call(request)
            client.close()
            with lock:
                answered[0] += 1
        except (OSError, RuntimeError):
            with lock:
                errors[0] += 1

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"answered": answered[0], "errors": errors[0]}


def many_keys(port: int, keys: int, first: int) -> None:
    """Send one request for each of ``keys`` distinct keys, 8 connections in parallel."""
    def run(offset: int) -> None:
        client = KeepAliveClient(port)
        for index in range(first + offset, first + keys, 8):
            client.call(request_bytes(CHAT, key=f"sk-churn-{index:07d}"))
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------

def shown(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


def median_of(rounds: list[dict], field: str) -> float:
    return statistics.median(r[field] for r in rounds)


def ratio_spread(direct: list[dict], proxied: list[dict], field: str) -> str:
    """Each round's proxy/direct ratio, lowest to highest (rounds are paired: they ran in turn)."""
    ratios = sorted(p[field] / d[field] for d, p in zip(direct, proxied))
    return f"rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x"


def added_spread(direct: list[dict], proxied: list[dict], field: str) -> str:
    """Each round's proxy minus direct, lowest to highest."""
    added = sorted(p[field] - d[field] for d, p in zip(direct, proxied))
    return f"rounds +{added[0]:.3f} to +{added[-1]:.3f}"


def alternate(rounds: int, direct: callable, proxied: callable) -> tuple[list, list]:
    """Run direct and proxied measurements in turn, so drift hits both alike."""
    direct_results, proxy_results = [], []
    for _ in range(rounds):
        direct_results.append(direct())
        proxy_results.append(proxied())
    return direct_results, proxy_results


def compare(other: str, rounds: int, seconds: float) -> None:
    """Two checkouts' proxies and the upstream alone, measured in turn: what a change did."""
    upstream, upstream_port = start_upstream()
    proxies = {"this checkout": start_proxy(upstream_port), other: start_proxy(upstream_port, root=other)}
    try:
        for clients in (1, 32):
            direct: list[dict] = []
            results: dict[str, list[dict]] = {name: [] for name in proxies}
            for _ in range(rounds):
                direct.append(throughput(upstream_port, clients, seconds))
                for name, (_, port) in proxies.items():
                    results[name].append(throughput(port, clients, seconds))
            d_rps, d_p50 = median_of(direct, "rps"), median_of(direct, "p50_ms")
            print(f"{clients} client(s), direct: {shown(d_rps)} req/s, p50 {d_p50:.3f} ms", flush=True)
            for name, rounds_of in results.items():
                rps, p50 = median_of(rounds_of, "rps"), median_of(rounds_of, "p50_ms")
                print(f"  {name}: {rps / d_rps:.2f}x direct ({ratio_spread(direct, rounds_of, 'rps')}), "
                      f"added p50 +{p50 - d_p50:.3f} ms ({added_spread(direct, rounds_of, 'p50_ms')})",
                      flush=True)
    finally:
        for process, _ in proxies.values():
            process.stop()
        upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast version (CI)")
    parser.add_argument("--compare", metavar="CHECKOUT",
                        help="only throughput and latency, this checkout's proxy against another's "
                             "(e.g. a `git worktree` of an older commit), both against one upstream")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-byte-relay", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-http-forwarder", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream()
        return
    if args.serve_byte_relay:
        serve_byte_relay(args.serve_byte_relay)
        return
    if args.serve_http_forwarder:
        serve_http_forwarder(args.serve_http_forwarder)
        return
    if args.compare:
        compare(args.compare, 3 if args.quick else 5, 0.5 if args.quick else 2.0)
        return
    quick = args.quick
    rounds = 3 if quick else 5
    seconds = 0.5 if quick else 2.0
    upstream, upstream_port = start_upstream()
    proxy, proxy_port = start_proxy(upstream_port)
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, proxied: float, direct: float | None, unit: str, ratio: str = "") -> None:
        direct_text = "" if direct is None else f"{shown(direct)} {unit}"
        rows.append((name, f"{shown(proxied)} {unit}", direct_text, ratio))
        print(f"  {name}: proxy {shown(proxied)} {unit}" + (f", direct {direct_text}" if direct_text else "")
              + (f", {ratio}" if ratio else ""), flush=True)

    try:
        print(f"llm_proxy benchmark ({'quick' if quick else 'full'}), {rounds} rounds, "
              f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
        for clients in (1, 32):
            direct, proxied = alternate(rounds, lambda: throughput(upstream_port, clients, seconds),
                                        lambda: throughput(proxy_port, clients, seconds))
            d_rps, p_rps = median_of(direct, "rps"), median_of(proxied, "rps")
            row(f"non-streaming, {clients} client(s): requests/s", p_rps, d_rps, "req/s",
                f"{p_rps / d_rps:.2f}x direct ({ratio_spread(direct, proxied, 'rps')})")
            for field in ("p50_ms", "p99_ms"):
                d, p = median_of(direct, field), median_of(proxied, field)
                row(f"non-streaming, {clients} client(s): {field[:3]} latency", p, d, "ms",
                    f"+{p - d:.3f} ms ({added_spread(direct, proxied, field)})")

        byte_relay, relay_port = start_byte_relay(upstream_port)  # the floor, for scale
        try:
            for clients in (1, 32):
                direct, relayed = alternate(rounds, lambda: throughput(upstream_port, clients, seconds),
                                            lambda: throughput(relay_port, clients, seconds))
                d_rps, r_rps = median_of(direct, "rps"), median_of(relayed, "rps")
                row(f"for scale, a byte relay in Python (nothing parsed), {clients} client(s): "
                    "requests/s", r_rps, d_rps, "req/s", f"{r_rps / d_rps:.2f}x direct")
                d, r = median_of(direct, "p50_ms"), median_of(relayed, "p50_ms")
                row(f"for scale, a byte relay in Python, {clients} client(s): p50 latency", r, d, "ms",
                    f"+{r - d:.3f} ms")
        finally:
            byte_relay.stop()
        forwarder, forwarder_port = start_http_forwarder(upstream_port)
        try:
            direct, forwarded = alternate(rounds, lambda: throughput(upstream_port, 1, seconds),
                                          lambda: throughput(forwarder_port, 1, seconds))
            d, f = median_of(direct, "p50_ms"), median_of(forwarded, "p50_ms")
            row("for scale, a minimal HTTP forwarder in Python (messages read whole, nothing else), "
                "1 client: p50 latency", f, d, "ms", f"+{f - d:.3f} ms")
        finally:
            forwarder.stop()

        events = 20 if quick else 50
        direct, proxied = alternate(rounds, lambda: stream_delays(upstream_port, events, 10),
                                    lambda: stream_delays(proxy_port, events, 10))
        d_first, p_first = median_of(direct, "first_ms"), median_of(proxied, "first_ms")
        row(f"streaming, {events} events 10 ms apart: time to first event", p_first, d_first, "ms",
            f"+{p_first - d_first:.3f} ms ({added_spread(direct, proxied, 'first_ms')})")
        d_delay = [d for r in direct for d in r["delays_ms"]]
        p_delay = [d for r in proxied for d in r["delays_ms"]]
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            d, p = percentile(d_delay, fraction), percentile(p_delay, fraction)
            row(f"streaming: {name} delay per event (upstream send to client)", p, d, "ms",
                f"+{p - d:.3f} ms added")
        row("streaming: worst delay of any event", max(p_delay), max(d_delay), "ms",
            f"+{max(p_delay) - max(d_delay):.3f} ms")

        burst = 64 if quick else 256
        d, p = connect_burst(upstream_port, burst), connect_burst(proxy_port, burst)
        row(f"burst of {burst} simultaneous connects: refused or reset", p["errors"], d["errors"],
            "errors", f"{p['answered']} of {burst} answered")

        limited_proxy, limited_port = start_proxy(upstream_port, MAX_TOKENS="1",
                                                  REFILL_INTERVAL_SECONDS="86400")
        try:
            KeepAliveClient(limited_port).call(request_bytes(CHAT))  # empties the bucket
            direct, proxied = alternate(rounds, lambda: throughput(upstream_port, 32, seconds),
                                        lambda: throughput(limited_port, 32, seconds))
            d_rps, p_rps = median_of(direct, "rps"), median_of(proxied, "rps")
            row("limit replies only, 32 clients: requests/s", p_rps, d_rps, "req/s",
                f"{p_rps / d_rps:.2f}x direct ({ratio_spread(direct, proxied, 'rps')})")
        finally:
            limited_proxy.stop()

        streams = 200 if quick else 1000
        baseline = proxy.memory_kib()
        direct = idle_then_active(upstream_port, streams, 10)
        result = idle_then_active(proxy_port, streams, 10)
        row(f"{streams} idle-then-active streams: completed", result["completed"], direct["completed"],
            "streams", f"all done in {result['seconds']:.2f} s (direct {direct['seconds']:.2f} s)")
        row(f"{streams} idle-then-active streams: proxy peak RSS", proxy.memory_kib("VmHWM") / 1024,
            None, "MiB", f"{baseline / 1024:.1f} MiB before")

        keys = 5_000 if quick else 100_000
        before = [throughput(proxy_port, 1, seconds)["p50_ms"] for _ in range(rounds)]
        rss_before = proxy.memory_kib()
        began = time.perf_counter()
        many_keys(proxy_port, keys, first=0)
        churn_rate = keys / (time.perf_counter() - began)
        rss_after = proxy.memory_kib()
        after = [throughput(proxy_port, 1, seconds)["p50_ms"] for _ in range(rounds)]
        row(f"{keys:,} distinct keys, all remembered: proxy RSS", rss_after / 1024, rss_before / 1024,
            "MiB", f"before the keys in the second column; {(rss_after - rss_before) / keys * 1024:.0f} "
            f"bytes per key; {churn_rate:,.0f} new keys/s")
        b, a = statistics.median(before), statistics.median(after)
        row(f"{keys:,} distinct keys: p50 latency, 1 client, after vs before", a, b, "ms",
            f"{a / b:.2f}x")

        churn = 2 * keys
        forgetting, forgetting_port = start_proxy(upstream_port, REFILL_INTERVAL_SECONDS="1",
                                                  STATE_SAVE_SECONDS="1")
        try:
            rss_start = forgetting.memory_kib()
            many_keys(forgetting_port, churn, first=0)
            rss_peak = forgetting.memory_kib("VmHWM")
            time.sleep(FORGET_AFTER)  # every bucket refills to full and housekeeping forgets it
            rss_end = forgetting.memory_kib()
        finally:
            forgetting.stop()
        row(f"{churn:,} keys churned, buckets refilling within 1 s: proxy RSS at the end",
            rss_end / 1024, rss_start / 1024, "MiB", f"at the start in the second column; peak "
            f"{rss_peak / 1024:.1f} MiB")
    finally:
        proxy.stop()
        upstream.stop()

    print("\n| scenario | through the proxy | direct | ratio / difference |")
    print("|---|---|---|---|")
    for name, proxied, direct, ratio in rows:
        print(f"| {name} | {proxied} | {direct} | {ratio} |")


if __name__ == "__main__":
    main()
