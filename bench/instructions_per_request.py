#!/usr/bin/env python3
"""Instructions the proxy (or the bare upstream) executes per request, counted by callgrind.

    python3 bench/instructions_per_request.py            # needs valgrind (apt-get install valgrind)

Timings on a shared two-core machine wander by 20% from run to run; instruction
counts do not (two runs agree to 0.1%), so this is how changes to the hot path
were judged.  The process under test runs twice under ``valgrind --tool=callgrind``,
serving 100 and then 400 sequential keep-alive requests from one client; the
difference divided by 300 is the cost of one request, start-up excluded.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_llm_proxy as bench  # noqa: E402  (the benchmark's upstream, client and request)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# What is measured: (name, path, payload).  The stream asks the bench upstream for 5 events, unpaced.
ROWS = [
    ("non-streamed chat", "/v1/chat/completions", bench.CHAT),
    ("streamed chat, 5 events", "/v1/chat/completions",
     dict(bench.CHAT, stream=True, max_tokens=5, pace_ms=0)),
    ("non-streamed Responses", "/v1/responses", {"model": "bench", "input": "Say something short."}),
    ("non-streamed Anthropic Messages", "/v1/messages",
     {"model": "bench", "max_tokens": 64, "messages": [{"role": "user", "content": "Say something short."}]}),
]


def count(command: list[str], env: dict[str, str] | None, requests: int,
          port_of: Callable[[str], int], request: bytes) -> int:
    """Instructions callgrind counted for ``command`` serving ``requests`` requests."""
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={directory}/out", *command],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        port = port_of(process.stdout.readline())
        client = bench.KeepAliveClient(port)
        for _ in range(requests):
            client.call(request)
        client.close()
        process.terminate()
        _, errors = process.communicate(timeout=60)
    return int(re.search(r"Collected : (\d+)", errors).group(1))


def per_request(command: list[str], env: dict[str, str] | None,
                port_of: Callable[[str], int], request: bytes) -> float:
    return (count(command, env, 400, port_of, request) - count(command, env, 100, port_of, request)) / 300


def main() -> None:
    """Each row: the bare upstream, then the proxy (request mode, a client key configured)."""
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    only = sys.argv[1:]  # optional: names of rows to run, e.g. "non-streamed chat", or "forwarder"
    upstream, upstream_port = bench.start_upstream()
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
        env.update(HOST="127.0.0.1", PORT=str(port), MAX_TOKENS="1000000000",
                   PROXY_API_KEYS=bench.KEY, BASE_API_URL=f"http://127.0.0.1:{upstream_port}/v1")
        print(f"{'request':34} {'upstream alone':>15} {'llm_proxy':>11}  ratio")
        for name, path, payload in ROWS:
            if only and name not in only:
                continue
            request = bench.request_bytes(payload, path=path)
            direct = per_request([sys.executable, bench.__file__, "--serve-upstream"], None, int, request)
            proxied = per_request([sys.executable, os.path.join(ROOT, "llm_proxy.py")], env,
                                  lambda line: port, request)
            print(f"{name:34} {direct / 1000:>14,.0f}k {proxied / 1000:>10,.0f}k  "
                  f"{proxied / direct:.2f}x", flush=True)
        if not only or "forwarder" in only:  # the floor: a Python forwarder that only reads messages
            forwarded = per_request([sys.executable, bench.__file__, "--serve-http-forwarder",
                                     str(upstream_port)], None, int, bench.request_bytes(bench.CHAT))
            print(f"{'for scale: the minimal HTTP forwarder, non-streamed chat':60} "
                  f"{forwarded / 1000:,.0f}k", flush=True)
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
