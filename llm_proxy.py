#!/usr/bin/env python3
"""llm_proxy: share one OpenAI-compatible model server, fairly and safely.

Every caller's API key (or, without one, its IP address) gets a refillable
token bucket.  While the bucket can pay, requests are forwarded to the
upstream (llama.cpp server, Ollama, vLLM, LM Studio ...); when it cannot, the
caller gets an ordinary assistant reply saying "limit reached, wait N min", so
any chat UI simply shows the message.

Configuration is read from environment variables, like the Ruby prototype this
replaces; run ``python3 llm_proxy.py --help`` for the list, or
``python3 llm_proxy.py --demo`` to try it without a model server.

Standard library only, Python 3.9 or newer.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, Sequence

__version__ = "1.0.0"

log = logging.getLogger("llm_proxy")


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

class ConfigError(ValueError):
    """A setting is invalid; the message names the variable, for one clear line."""


def _integer(name: str, text: str, minimum: int = 0, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return value


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a positive number of seconds, got {text!r}")
    return value


@dataclass(frozen=True)
class Setting:
    """One environment variable: its names, default, parser and help text.

    The same table drives parsing and ``--help``, so the two cannot drift.
    """

    name: str
    attribute: str
    default: object
    help: str
    parse: Callable[[str, str], object] = lambda name, text: text
    aliases: tuple[str, ...] = ()

    def read(self, environ: dict[str, str]) -> object:
        for name in (self.name, *self.aliases):
            text = environ.get(name, "").strip()
            if text:  # an empty value counts as unset, as in the prototype
                return self.parse(name, text)
        return self.default


def _positive(name: str, text: str) -> int:
    return _integer(name, text, minimum=1)


def _port(name: str, text: str) -> int:
    return _integer(name, text, minimum=1, maximum=65535)


def _cost_mode(name: str, text: str) -> str:
    if text not in ("request", "estimate"):
        raise ConfigError(f"{name} must be 'request' or 'estimate', got {text!r}")
    return text


def _key_list(name: str, text: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in text.split(",") if key.strip())


SETTINGS: tuple[Setting, ...] = (
    Setting("HOST", "host", "0.0.0.0", "address to listen on"),
    Setting("PORT", "port", 8899, "port to listen on", _port),
    Setting("BASE_API_URL", "upstream_url", None,
            "upstream base URL including /v1, e.g. http://127.0.0.1:8080/v1 (required)",
            aliases=("UPSTREAM_BASE_URL", "base_api_url")),
    Setting("BASE_API_KEY", "upstream_key", None,
            "key sent upstream as 'Authorization: Bearer ...'; never shown to clients",
            aliases=("UPSTREAM_API_KEY", "base_api_key")),
    Setting("BASE_MODEL", "upstream_model", None,
            "replaces 'model' in forwarded completions; GET /v1/models lists only it",
            aliases=("UPSTREAM_MODEL", "base_model")),
    Setting("MAX_TOKENS", "max_tokens", 10, "bucket capacity; a new bucket starts full", _positive),
    Setting("REFILL_TOKENS", "refill_tokens", 2, "tokens added per refill step", _positive),
    Setting("REFILL_INTERVAL_SECONDS", "refill_interval", 300.0, "length of one refill step", _seconds),
    Setting("REQUEST_TOKEN_COST", "request_cost", 1, "cost of one completion in 'request' mode", _positive),
    Setting("TOKEN_COST_MODE", "cost_mode", "request",
            "'request' (fixed cost) or 'estimate' (prompt chars / 4 + max output tokens)", _cost_mode),
    Setting("RESPONSE_TOKEN_RESERVE", "response_reserve", 256,
            "estimate mode: output tokens assumed when a request sets no max_tokens", _positive),
    Setting("PROXY_API_KEYS", "client_keys", (),
            "comma-separated client keys; when set, any other key gets 401", _key_list),
    Setting("OPEN_TIMEOUT", "open_timeout", 10.0, "seconds to connect to the upstream", _seconds),
    Setting("READ_TIMEOUT", "read_timeout", 120.0, "seconds to wait on the upstream", _seconds),
    Setting("MAX_BODY_BYTES", "max_body_bytes", 10 * 1024 * 1024, "largest request body accepted", _positive),
    Setting("CLIENT_TIMEOUT", "client_timeout", 60.0, "seconds a silent client may hold a connection",
            _seconds),
    Setting("MAX_CONNECTIONS", "max_connections", 1024,
            "simultaneous client connections; more get a fast 503", _positive),
)


@dataclass(frozen=True)
class Config:
    """Everything the proxy reads from its environment, validated once at startup."""

    host: str = "0.0.0.0"
    port: int = 8899
    upstream_url: str | None = None
    upstream_key: str | None = None
    upstream_model: str | None = None
    max_tokens: int = 10
    refill_tokens: int = 2
    refill_interval: float = 300.0
    request_cost: int = 1
    cost_mode: str = "request"
    response_reserve: int = 256
    client_keys: tuple[str, ...] = ()
    open_timeout: float = 10.0
    read_timeout: float = 120.0
    max_body_bytes: int = 10 * 1024 * 1024
    client_timeout: float = 60.0
    max_connections: int = 1024

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> Config:
        return cls(**{setting.attribute: setting.read(environ) for setting in SETTINGS})

    @property
    def bucket(self) -> BucketSpec:
        return BucketSpec(self.max_tokens, self.refill_tokens, self.refill_interval)


def settings_help() -> str:
    lines = ["environment variables (an empty value counts as unset):"]
    for setting in SETTINGS:
        names = " / ".join((setting.name, *setting.aliases))
        default = setting.default if setting.default not in (None, ()) else "unset"
        lines.append(f"  {names}\n      {setting.help} (default: {default})")
    return "\n".join(lines)


def startup_warnings(config: Config) -> list[str]:
    """Problems that do not stop the proxy but would surprise its owner."""
    warnings = []
    smallest = config.request_cost if config.cost_mode == "request" else config.response_reserve
    if smallest > config.max_tokens:
        variable = "REQUEST_TOKEN_COST" if config.cost_mode == "request" else "RESPONSE_TOKEN_RESERVE"
        warnings.append(
            f"a request without max_tokens costs at least {smallest} tokens but MAX_TOKENS is "
            f"{config.max_tokens}: such requests can never be served; raise MAX_TOKENS "
            f"(or lower {variable})")
    if not config.client_keys and not _is_loopback(config.host):
        warnings.append(
            f"no PROXY_API_KEYS and listening on {config.host}: anyone who can reach this port can "
            "use the model, and per-key or per-IP buckets are the only limit (a caller picks "
            "its own bucket by picking a key)")
    return warnings


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


# --------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class BucketSpec:
    """The shape of one bucket: capacity and a stepwise refill."""

    capacity: int
    refill_tokens: int
    interval: float


class Bucket:
    """A level and the time of its last refill step (on the store's monotonic clock)."""

    __slots__ = ("tokens", "step_at")

    def __init__(self, tokens: int, step_at: float) -> None:
        self.tokens = tokens
        self.step_at = step_at

    def refill(self, spec: BucketSpec, now: float) -> None:
        """Add one refill per whole interval elapsed; the step clock moves by whole steps only."""
        steps = int((now - self.step_at) // spec.interval)
        if steps > 0:
            self.tokens = min(spec.capacity, self.tokens + steps * spec.refill_tokens)
            self.step_at += steps * spec.interval

    def seconds_until(self, spec: BucketSpec, cost: int, now: float) -> float:
        missing = cost - self.tokens
        if missing <= 0:
            return 0.0
        steps = math.ceil(missing / spec.refill_tokens)
        return self.step_at + steps * spec.interval - now


@dataclass(frozen=True)
class Admission:
    """The outcome of one charge: what the rate-limit headers and limit reply report."""

    allowed: bool
    cost: int
    limit: int
    remaining: int
    wait_seconds: float
    refill_tokens: int
    refill_seconds: float


class BucketStore:
    """All buckets, keyed by identity; one short lock makes each charge atomic.

    The lock guards arithmetic only and is never held during I/O, so a slow
    upstream or client cannot stall other callers.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, list[Bucket]] = {}

    def _current(self, identity: str, specs: Sequence[BucketSpec], now: float) -> list[Bucket]:
        buckets = self._buckets.get(identity)
        if buckets is None or len(buckets) != len(specs):
            buckets = [Bucket(spec.capacity, now) for spec in specs]
            self._buckets[identity] = buckets
        for bucket, spec in zip(buckets, specs):
            bucket.refill(spec, now)
        return buckets

    def charge(self, identity: str, specs: Sequence[BucketSpec], cost: int) -> Admission:
        """Take ``cost`` from every bucket of ``identity``, or from none of them."""
        with self._lock:
            now = self.clock()
            buckets = self._current(identity, specs, now)
            waits = [bucket.seconds_until(spec, cost, now) for bucket, spec in zip(buckets, specs)]
            allowed = max(waits) <= 0 and all(cost <= spec.capacity for spec in specs)
            if allowed:
                for bucket in buckets:
                    bucket.tokens -= cost
            # Report the tightest bucket: the one blocking, else the one nearest empty.
            index = max(range(len(specs)), key=lambda i: (waits[i], -buckets[i].tokens))
            spec = specs[index]
            return Admission(allowed, cost, spec.capacity, max(0, buckets[index].tokens),
                             0.0 if allowed else waits[index], spec.refill_tokens, spec.interval)

    def refund(self, identity: str, specs: Sequence[BucketSpec], amount: int) -> None:
        """Give back a charge for a request the upstream never served (never above capacity)."""
        with self._lock:
            buckets = self._current(identity, specs, self.clock())
            for bucket, spec in zip(buckets, specs):
                bucket.tokens = min(spec.capacity, bucket.tokens + amount)

    def level(self, identity: str, specs: Sequence[BucketSpec]) -> list[int]:
        with self._lock:
            return [bucket.tokens for bucket in self._current(identity, specs, self.clock())]

    def __len__(self) -> int:
        return len(self._buckets)


class Charge:
    """One admitted request's payment: kept once the upstream serves it, else refunded once."""

    def __init__(self, store: BucketStore, identity: str, specs: Sequence[BucketSpec],
                 admission: Admission) -> None:
        self.store = store
        self.identity = identity
        self.specs = specs
        self.admission = admission
        self.kept = False
        self.refunded = False

    def keep(self) -> None:
        self.kept = True

    def refund(self) -> None:
        if not (self.kept or self.refunded):
            self.refunded = True
            self.store.refund(self.identity, self.specs, self.admission.cost)
            self.admission = replace(self.admission, remaining=min(
                self.admission.limit, self.admission.remaining + self.admission.cost))

    @property
    def headers(self) -> list[tuple[str, str]]:
        return rate_limit_headers(self.admission)


# --------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------

def _text_strings(value: object) -> Iterator[str]:
    """Every string in a JSON value except under ``model`` keys, iteratively (no recursion limit)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k != "model")
        elif isinstance(item, list):
            stack.extend(item)


def output_allowance(payload: dict) -> int | None:
    """The client's cap on output tokens, validated: a negative cap must not become a discount."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProxyError(400, f"'{name}' must be a non-negative integer", param=name,
                             code="invalid_value")
        return value
    return None


def estimate_tokens(payload: dict, reserve: int) -> int:
    """ceil(prompt characters / 4) plus the output allowance (or the reserve), at least 1."""
    characters = len(" ".join(_text_strings(payload)))
    allowance = output_allowance(payload)
    return max(1, math.ceil(characters / 4) + (reserve if allowance is None else allowance))


def request_cost(payload: dict, config: Config) -> int:
    if config.cost_mode == "estimate":
        return estimate_tokens(payload, config.response_reserve)
    output_allowance(payload)  # validated in every mode, so a bad value is a 400 everywhere
    return config.request_cost


# --------------------------------------------------------------------------
# Errors, paths and headers
# --------------------------------------------------------------------------

class ProxyError(Exception):
    """A failure the client should see as an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.close = close  # the connection's framing can no longer be trusted

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.code, self.param)


class ClientGone(Exception):
    """The client closed its connection; there is nobody left to answer."""


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


METERED_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "text"}

# Characters allowed in a decoded path: RFC 3986 pchar minus ';' and '%'.
_PATH_CHARACTERS = re.compile(r"[A-Za-z0-9._~:@!$&'()*+,=/-]*")
_QUERY_CHARACTERS = re.compile(r"[\x21-\x7e]*")


@dataclass(frozen=True)
class Target:
    """A request target reduced to one canonical form, so no spelling can skip the bucket."""

    path: str   # decoded, no trailing slash, e.g. /v1/chat/completions
    query: str  # raw query string, checked for control characters

    @property
    def is_api(self) -> bool:
        return self.path.lower() == "/v1" or self.path.lower().startswith("/v1/")

    @property
    def metered_kind(self) -> str | None:
        return METERED_PATHS.get(self.path.lower())

    def upstream_path(self, base_path: str) -> str:
        suffix = self.path[len("/v1"):]
        quoted = urllib.parse.quote(base_path + suffix, safe="/:@!$&'()*+,=-._~")
        return f"{quoted}?{self.query}" if self.query else quoted


def parse_target(raw: str) -> Target:
    """Decode and vet a request target; anything ambiguous is a 400, never a guess."""
    path, _, query = raw.partition("?")
    if not path.startswith("/") or path.startswith("//"):
        raise ProxyError(400, "request target must be a path such as /v1/chat/completions",
                         code="invalid_path")
    try:
        decoded = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise ProxyError(400, "request path is not valid UTF-8", code="invalid_path") from None
    segments = decoded.split("/")[1:]
    while len(segments) > 1 and segments[-1] == "":
        segments.pop()  # trailing slashes name the same resource
    bad_segment = any(s in ("", ".", "..") for s in segments) and decoded != "/"
    if bad_segment or not _PATH_CHARACTERS.fullmatch(decoded) or not _QUERY_CHARACTERS.fullmatch(query):
        raise ProxyError(400, "request path contains characters or segments that are not allowed",
                         code="invalid_path")
    return Target("/" + "/".join(segments), query)


# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus
# those the proxy sets itself.  They are never copied from one side to the other.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
NOT_FORWARDED_UPSTREAM = HOP_BY_HOP | {"authorization", "host", "content-length", "expect",
                                       "accept-encoding"}
PROXY_RESPONSE_HEADERS = frozenset({
    "content-length", "access-control-allow-origin", "access-control-expose-headers",
    "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-refill-tokens",
    "x-ratelimit-refill-seconds", "x-ratelimit-reset-seconds", "retry-after",
})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def is_safe_header(name: str, value: str) -> bool:
    """A header that can be written out verbatim: no CR, LF or NUL can smuggle a second one."""
    return bool(_TOKEN.fullmatch(name) and _FIELD_VALUE.fullmatch(value))


def copied_headers(items: Sequence[tuple[str, str]], excluded: frozenset) -> list[tuple[str, str]]:
    """Headers passed from one side to the other, minus hop-by-hop ones and any named in Connection."""
    listed: set[str] = set()
    for name, value in items:
        if name.lower() == "connection":
            listed.update(token.strip().lower() for token in value.split(","))
    return [(name, value) for name, value in items
            if name.lower() not in excluded and name.lower() not in listed
            and is_safe_header(name, value)]


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def fingerprint(key: str) -> str:
    """A short, stable, non-reversible name for a key, safe to log."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def key_matches(presented: str, accepted: Sequence[str]) -> bool:
    """Compare against every accepted key in constant time, without stopping at a match."""
    candidate = presented.encode("utf-8", "surrogateescape")
    found = False
    for key in accepted:
        found |= hmac.compare_digest(candidate, key.encode("utf-8", "surrogateescape"))
    return found


# --------------------------------------------------------------------------
# Upstream
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class UpstreamTarget:
    """The parsed BASE_API_URL; ``display`` is safe to print (no credentials)."""

    scheme: str
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, url: str) -> UpstreamTarget:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"BASE_API_URL must be an http:// or https:// URL, got {url!r}")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ConfigError("BASE_API_URL must not contain credentials, a query or a fragment; "
                              "put the key in BASE_API_KEY")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ConfigError(f"BASE_API_URL has an invalid port: {url!r}") from None
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.base_path}"


class UpstreamPool:
    """Persistent HTTP/1.1 connections to the upstream, reused across requests.

    A connection goes back to the pool only after its response was read to the
    end; anything else (errors, abandoned streams) closes it, which is also how
    a local model learns that nobody is listening any more.
    """

    def __init__(self, target: UpstreamTarget, open_timeout: float, read_timeout: float,
                 max_idle: int = 64) -> None:
        self.target = target
        self.open_timeout = open_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        if self.target.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.target.host, self.target.port, timeout=self.open_timeout)
        else:
            conn = http.client.HTTPConnection(self.target.host, self.target.port,
                                              timeout=self.open_timeout)
        conn.connect()
        conn.sock.settimeout(self.read_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def request(self, method: str, path: str, headers: dict[str, str],
                body: bytes | None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request and return its connection and response head.

        A pooled connection that the upstream closed while idle fails before any
        response byte; only then is the request retried, once, on a fresh connection.
        """
        while True:
            conn, reused = self._take()
            try:
                conn.request(method, path, body, headers)
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                if not reused:
                    raise
            except BaseException:
                conn.close()
                raise

    def release(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Keep the connection if its response is complete and the upstream keeps it open."""
        if response.isclosed() and conn.sock is not None:
            with self._lock:
                if len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def upstream_failure(error: BaseException) -> ProxyError:
    """Map a transport failure to 502 or 504 without revealing socket or host details."""
    if isinstance(error, socket.timeout):
        return ProxyError(504, "The model server did not answer in time.", "upstream_error",
                          "upstream_timeout")
    return ProxyError(502, "The model server could not be reached or sent an invalid response.",
                      "upstream_error", "upstream_unavailable")


def sse_event_end(buffer: bytes) -> int:
    """Offset just past the last complete server-sent event in ``buffer`` (0 if none)."""
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


# --------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------

def json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def limit_message(admission: Admission) -> str:
    if admission.cost > admission.limit:
        return (f"request too large: it costs {admission.cost} tokens but the limit is "
                f"{admission.limit}; shorten the conversation or lower max_tokens")
    minutes = max(1, math.ceil(admission.wait_seconds / 60))
    return f"limit reached, wait {minutes} min"


def completion(kind: str, model: str, text: str, tag: str = "limit") -> dict:
    """A normal, finished completion whose answer is ``text``; every client just shows it."""
    choice: dict = ({"index": 0, "message": {"role": "assistant", "content": text}}
                    if kind == "chat" else {"index": 0, "text": text})
    choice.update(logprobs=None, finish_reason="stop")
    return dict(_completion_base(kind, model, tag, chunk=False), choices=[choice],
                usage={"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})


def completion_event(base: dict, kind: str, text: str | None = None,
                     finish: str | None = None) -> bytes:
    """One SSE event of a streamed completion; for chat, ``text=None`` opens with the role."""
    if kind == "chat":
        delta = ({} if finish else {"role": "assistant", "content": ""}) if text is None else {
            "content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return b"data: " + json_bytes(dict(base, choices=[choice])) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def limit_stream(kind: str, model: str, text: str) -> bytes:
    """The limit reply as a complete SSE stream: (role,) content, finish, [DONE]."""
    base = _completion_base(kind, model, "limit", chunk=True)
    opening = [completion_event(base, kind)] if kind == "chat" else []
    return b"".join(opening + [completion_event(base, kind, text),
                               completion_event(base, kind, finish="stop"), SSE_DONE])


def _completion_base(kind: str, model: str, tag: str, chunk: bool) -> dict:
    if kind == "chat":
        prefix, object_name = "chatcmpl-", "chat.completion.chunk" if chunk else "chat.completion"
    else:
        prefix, object_name = "cmpl-", "text_completion"
    return {"id": f"{prefix}{tag}-{secrets.token_hex(12)}", "object": object_name,
            "created": int(time.time()), "model": model, "system_fingerprint": None}


def rate_limit_headers(admission: Admission) -> list[tuple[str, str]]:
    headers = [
        ("X-RateLimit-Limit", str(admission.limit)),
        ("X-RateLimit-Remaining", str(admission.remaining)),
        ("X-RateLimit-Refill-Tokens", str(admission.refill_tokens)),
        ("X-RateLimit-Refill-Seconds", _whole_seconds(admission.refill_seconds)),
        ("X-RateLimit-Reset-Seconds", _whole_seconds(admission.wait_seconds)),
    ]
    if not admission.allowed:
        headers.append(("Retry-After", _whole_seconds(max(1.0, admission.wait_seconds))))
    return headers


def _whole_seconds(seconds: float) -> str:
    return str(math.ceil(seconds))


# --------------------------------------------------------------------------
# Handler
# --------------------------------------------------------------------------

CORS_HEADERS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Expose-Headers", "X-RateLimit-Limit, X-RateLimit-Remaining, "
     "X-RateLimit-Refill-Tokens, X-RateLimit-Refill-Seconds, X-RateLimit-Reset-Seconds, "
     "Retry-After"),
]
PREFLIGHT_HEADERS = [
    ("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "Authorization, *"),
    ("Access-Control-Max-Age", "86400"),
]
JSON_TYPE = ("Content-Type", "application/json")
SSE_TYPE = ("Content-Type", "text/event-stream; charset=utf-8")


class ProxyHandler(BaseHTTPRequestHandler):
    """One client connection: HTTP/1.1 with keep-alive, one request at a time."""

    protocol_version = "HTTP/1.1"
    server_version = "llm_proxy/" + __version__
    server: ProxyServer

    def setup(self) -> None:
        self.timeout = self.server.config.client_timeout  # idle clients must not hold a thread
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # Every method goes through one dispatcher; http.server answers 501 for others.
    def do_GET(self) -> None:
        self.handle_request()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    # -- request handling --------------------------------------------------

    def handle_request(self) -> None:
        self.started = time.monotonic()
        self.status = 0
        self.who = self.client_address[0]
        self.body_pending = True
        self.cost_note = ""
        self.charge: Charge | None = None
        try:
            self.route()
        except ProxyError as error:
            if error.close:
                self.close_connection = True
            self.send_json(error.status, error.body())
        except ClientGone:
            self.close_connection = True
        except Exception:
            log.exception("internal error on %s %s", self.command, self.path)
            self.close_connection = True
            if not self.status:
                self.send_json(500, error_body("Internal proxy error.", "server_error"))
        finally:
            self.log_outcome()

    def route(self) -> None:
        self.check_headers()
        if self.command == "OPTIONS":
            self.send_bytes(204, PREFLIGHT_HEADERS, b"")
            return
        target = parse_target(self.path)
        if target.path == "/health":
            self.send_json(200, {"status": "ok"})
            return
        if not target.is_api:
            raise ProxyError(404, f"Unknown path {target.path}; the API lives under /v1",
                             code="not_found")
        identity = self.authenticate()
        kind = target.metered_kind
        if kind is not None and self.command == "POST":
            self.handle_completion(kind, target, identity)
        elif target.path == "/v1/models" and self.command == "GET" and self.server.config.upstream_model:
            self.send_json(200, self.server.local_models())
        else:
            self.forward(target, self.read_body())

    def check_headers(self) -> None:
        """Reject header blocks a downstream parser could read differently than this one."""
        if self.headers.defects:
            raise ProxyError(400, "malformed header line", code="invalid_header", close=True)
        for name, value in self.headers.items():
            if not is_safe_header(name, value):
                raise ProxyError(400, "invalid characters in a header", code="invalid_header",
                                 close=True)

    def authenticate(self) -> str:
        """Return the bucket identity for this request, or raise 401."""
        token = bearer_token(self.headers.get("Authorization"))
        keys = self.server.config.client_keys
        if keys and (token is None or not key_matches(token, keys)):
            raise ProxyError(401, "Missing or invalid proxy API key", "authentication_error",
                             "invalid_api_key")
        if token is None:
            return "ip:" + self.client_address[0]
        self.who = "key:" + fingerprint(token)
        return self.who

    def read_body(self) -> bytes:
        """Read exactly the declared body; refuse any framing that two parsers could disagree on."""
        self.body_pending = False
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding"):
            if lengths:
                raise ProxyError(400, "both Content-Length and Transfer-Encoding were sent",
                                 code="invalid_framing", close=True)
            raise ProxyError(411, "chunked request bodies are not supported; send Content-Length",
                             code="length_required", close=True)
        if not lengths:
            return b""
        length = self.declared_length(lengths)
        body = self.rfile.read(length)
        if len(body) < length:
            raise ClientGone()
        return body

    def declared_length(self, lengths: list[str]) -> int:
        if len(set(value.strip() for value in lengths)) > 1:
            raise ProxyError(400, "conflicting Content-Length headers", code="invalid_framing",
                             close=True)
        text = lengths[0].strip()
        if not text.isdigit() or not text.isascii():
            raise ProxyError(400, "Content-Length must be a non-negative integer",
                             code="invalid_framing", close=True)
        length = int(text)
        if length > self.server.config.max_body_bytes:
            raise ProxyError(413, f"request body is larger than {self.server.config.max_body_bytes} "
                             "bytes", code="request_too_large", close=True)
        return length

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it."""
        lengths = self.headers.get_all("Content-Length") or []
        if lengths:
            try:
                self.declared_length(lengths)
            except ProxyError as error:
                self.status = 0
                self.body_pending = True
                self.close_connection = True
                self.send_json(error.status, error.body())
                return False
        return super().handle_expect_100()

    def parse_json_object(self, body: bytes) -> dict:
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None
        if not isinstance(payload, dict):
            raise ProxyError(400, "request body must be a JSON object", code="invalid_json")
        return payload

    def handle_completion(self, kind: str, target: Target, identity: str) -> None:
        config = self.server.config
        body = self.read_body()
        payload = self.parse_json_object(body)
        validate_completion(kind, payload)
        cost = request_cost(payload, config)
        model = payload.get("model") or config.upstream_model or ""
        specs = (config.bucket,)
        admission = self.server.buckets.charge(identity, specs, cost)
        self.cost_note = f"cost={cost}"
        if not admission.allowed:
            self.send_limit_reply(kind, model, payload.get("stream") is True, admission)
            return
        if config.upstream_model and payload.get("model") != config.upstream_model:
            payload["model"] = config.upstream_model
            body = json_bytes(payload)
        self.charge = Charge(self.server.buckets, identity, specs, admission)
        try:
            self.forward(target, body)
        finally:
            self.charge.refund()  # a no-op once the upstream served the request
            if self.charge.refunded:
                self.cost_note += " refunded"

    def send_limit_reply(self, kind: str, model: str, stream: bool, admission: Admission) -> None:
        text = limit_message(admission)
        headers = rate_limit_headers(admission)
        self.cost_note += " limited"
        if stream:
            self.send_bytes(200, headers + [SSE_TYPE, ("Cache-Control", "no-cache")],
                            limit_stream(kind, model, text))
        else:
            self.send_json(200, completion(kind, model, text), headers)

    # -- forwarding ----------------------------------------------------------

    def forward(self, target: Target, body: bytes) -> None:
        """Relay one request upstream and its answer back, settling ``self.charge`` on the way."""
        server = self.server
        headers = dict(copied_headers(self.headers.items(), NOT_FORWARDED_UPSTREAM))
        if server.config.upstream_key:
            headers["Authorization"] = "Bearer " + server.config.upstream_key
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        path = target.upstream_path(server.upstream.target.base_path)
        try:
            conn, response = server.upstream.request(self.command, path, headers, body or None)
        except (OSError, http.client.HTTPException) as error:
            raise upstream_failure(error) from None
        try:
            reply_headers = copied_headers(response.getheaders(), HOP_BY_HOP | PROXY_RESPONSE_HEADERS)
            content_type = response.getheader("Content-Type", "")
            sse = content_type.startswith("text/event-stream")
            if sse or (response.length is None and not response.isclosed()):
                self.relay_stream(response, reply_headers, sse)
            else:
                try:
                    data = response.read()
                except (OSError, http.client.HTTPException) as error:
                    raise upstream_failure(error) from None
                self.settle(response.status < 400)
                self.send_bytes(response.status, reply_headers + self.meter_headers(), data,
                                reason=response.reason)
        finally:
            server.upstream.release(conn, response)

    def settle(self, served: bool) -> None:
        if self.charge is not None:
            self.charge.keep() if served else self.charge.refund()

    def meter_headers(self) -> list[tuple[str, str]]:
        return self.charge.headers if self.charge is not None else []

    def relay_stream(self, response: http.client.HTTPResponse, headers: list[tuple[str, str]],
                     sse: bool) -> None:
        """Pass the body on as it arrives; server-sent events go out whole, one write each.

        The charge is kept once anything reached the client; a stream that ends
        before its first complete event counts as never served.
        """
        if response.status >= 400:
            self.settle(False)
        self.start_chunked(response.status, headers + self.meter_headers(), response.reason)
        pending = b""
        try:
            while True:
                data = response.read1(65536)
                if not data:
                    break
                if sse:
                    pending += data
                    end = sse_event_end(pending)
                    if not end:
                        continue
                    data, pending = pending[:end], pending[end:]
                self.write_chunk(data)
                self.settle(response.status < 400)
        except (OSError, http.client.HTTPException) as error:
            log.warning("upstream stream to %s broke off: %s", self.who, type(error).__name__)
            response.close()
            if sse:
                failure = upstream_failure(error)
                self.write_chunk(b"data: " + json_bytes(failure.body()) + b"\n\n")
        if self.charge is not None:
            self.charge.refund()
        self.end_chunked()

    # -- writing -------------------------------------------------------------

    def response_head(self, status: int, headers: Sequence[tuple[str, str]],
                      reason: str | None = None) -> list[str]:
        self.status = status
        if self.body_pending and self.headers and self.headers.get("Content-Length", "0") != "0":
            self.close_connection = True  # the unread body would be taken for the next request
        if reason is None:
            reason = self.responses.get(status, ("",))[0]
        lines = [f"{self.protocol_version} {status} {reason}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        lines.extend(f"{name}: {value}" for name, value in CORS_HEADERS)
        if self.close_connection:
            lines.append("Connection: close")
        return lines

    def send_bytes(self, status: int, headers: Sequence[tuple[str, str]], body: bytes,
                   reason: str | None = None) -> None:
        lines = self.response_head(status, headers, reason)
        if status >= 200 and status not in (204, 304):
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        self.write(head if self.command == "HEAD" else head + body)

    def send_json(self, status: int, value: object, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_bytes(status, [*headers, JSON_TYPE], json_bytes(value))

    def start_chunked(self, status: int, headers: Sequence[tuple[str, str]], reason: str) -> None:
        self.chunked = self.request_version == "HTTP/1.1"
        if not self.chunked:
            self.close_connection = True  # an HTTP/1.0 client reads until the connection closes
        lines = self.response_head(status, headers, reason)
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace"))

    def write_chunk(self, data: bytes) -> None:
        if self.command == "HEAD":
            return
        self.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def end_chunked(self) -> None:
        if self.chunked and self.command != "HEAD":
            self.write(b"0\r\n\r\n")

    def write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError:
            raise ClientGone() from None

    # -- http.server hooks ---------------------------------------------------

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, huge headers ...) as OpenAI JSON."""
        self.close_connection = True
        self.status = 0
        self.body_pending = True
        if not hasattr(self, "headers"):
            self.headers = None  # type: ignore[assignment]
        kind = "server_error" if code >= 500 else "invalid_request_error"
        try:
            self.send_json(code, error_body(message or self.responses.get(code, ("",))[0], kind))
        except ClientGone:
            pass

    def log_message(self, format: str, *args: object) -> None:
        """http.server's own notes (timeouts, bad requests); they never include a key."""
        log.info("%s %s", self.client_address[0], format % args)

    def log_request(self, code: object = "-", size: object = "-") -> None:
        pass  # one line per request is written by log_outcome instead

    def log_outcome(self) -> None:
        elapsed = (time.monotonic() - self.started) * 1000
        path = self.path.partition("?")[0][:200]
        log.info("%s %s %s %s %d %.1fms %s", self.client_address[0], self.who, self.command,
                 ascii(path)[1:-1], self.status, elapsed, self.cost_note)


def validate_completion(kind: str, payload: dict) -> None:
    """Catch malformed requests here, where they cost nothing, instead of upstream."""
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise ProxyError(400, "'model' must be a string", param="model", code="invalid_type")
    if kind == "chat" and not isinstance(payload.get("messages"), list):
        raise ProxyError(400, "'messages' must be a list", param="messages", code="invalid_type")
    if not isinstance(payload.get("stream", False), bool):
        raise ProxyError(400, "'stream' must be true or false", param="stream", code="invalid_type")


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------

class TrackedServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its open connections.

    Counting them lets a flood get a fast 503 instead of an unbounded number of
    threads, and lets ``server_close`` end keep-alive connections instead of
    leaving their threads behind.
    """

    daemon_threads = True
    request_queue_size = 1024  # a burst of connects waits in the backlog instead of being refused
    max_connections = 1024

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        with self._connections_lock:
            admitted = len(self._connections) < self.max_connections
            if admitted:
                self._connections.add(request)
        if admitted:
            super().process_request(request, client_address)
        else:
            self.refuse(request)

    def refuse(self, request: socket.socket) -> None:
        body = json_bytes(error_body("Too many connections; try again shortly.", "server_error",
                                     "too_many_connections"))
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            request.settimeout(1.0)
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def server_close(self) -> None:
        """Stop listening and end every open connection, so no handler thread outlives us."""
        super().server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ProxyServer(TrackedServer):
    """The proxy: listening socket, shared buckets and the upstream pool."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        if not config.upstream_url:
            raise ConfigError("BASE_API_URL is not set: point it at the model server, "
                              "e.g. http://127.0.0.1:8080/v1 (or run with --demo)")
        self.config = config
        self.max_connections = config.max_connections
        self.buckets = BucketStore(clock)
        self.upstream = UpstreamPool(UpstreamTarget.parse(config.upstream_url),
                                     config.open_timeout, config.read_timeout)
        super().__init__((config.host, config.port), ProxyHandler)

    def local_models(self) -> dict:
        return {"object": "list", "data": [{"id": self.config.upstream_model, "object": "model",
                                            "created": 0, "owned_by": "llm_proxy"}]}

    def server_close(self) -> None:
        super().server_close()
        self.upstream.close()


# --------------------------------------------------------------------------
# Demo model
# --------------------------------------------------------------------------

class EchoModelHandler(BaseHTTPRequestHandler):
    """A tiny OpenAI-compatible 'model' that echoes the last user message.

    It lets ``--demo`` show the whole flow without a model server, and serves as
    a fast upstream for the benchmark.  ``word_delay`` paces streamed words.
    """

    protocol_version = "HTTP/1.1"
    word_delay = 0.05

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self.reply({"object": "list", "data": [
                {"id": "echo", "object": "model", "created": 0, "owned_by": "llm_proxy"}]})
        else:
            self.reply({"error": {"message": "not found", "type": "invalid_request_error",
                                  "param": None, "code": None}}, 404)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            payload = json.loads(self.rfile.read(length))
        except ValueError:
            payload = {}
        kind = "chat" if "chat" in self.path else "text"
        text = "echo: " + last_user_text(payload)
        model = payload.get("model") or "echo"
        usage = {"prompt_tokens": len(text) // 4, "completion_tokens": len(text) // 4,
                 "total_tokens": len(text) // 4 * 2}
        if payload.get("stream"):
            self.stream(kind, model, text, usage, payload)
        else:
            self.reply(dict(completion(kind, model, text, tag="echo"), usage=usage))

    def stream(self, kind: str, model: str, text: str, usage: dict, payload: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = _completion_base(kind, model, "echo", chunk=True)
        if kind == "chat":
            self.chunk(completion_event(base, kind))
        for index, word in enumerate(text.split(" ")):
            self.chunk(completion_event(base, kind, word if index == 0 else " " + word))
            time.sleep(self.word_delay)
        self.chunk(completion_event(base, kind, finish="stop"))
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            self.chunk(b"data: " + json_bytes(dict(base, choices=[], usage=usage)) + b"\n\n")
        self.chunk(SSE_DONE)
        self.chunk(b"")

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def reply(self, value: object, status: int = 200) -> None:
        body = json_bytes(value)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def last_user_text(payload: dict) -> str:
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                return content if isinstance(content, str) else json.dumps(content)
    prompt = payload.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def start_echo_model(word_delay: float = 0.05) -> TrackedServer:
    """Serve the echo model on a free loopback port, in a background thread."""
    handler = type("EchoModel", (EchoModelHandler,), {"word_delay": word_delay})
    server = TrackedServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="echo-model", daemon=True).start()
    return server


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def describe(config: Config, server: ProxyServer) -> str:
    host, port = config.host, server.server_address[1]
    limits = (f"{config.max_tokens} tokens, +{config.refill_tokens} every "
              f"{config.refill_interval:g}s, cost mode {config.cost_mode}")
    keys = f"{len(config.client_keys)} client keys" if config.client_keys else "open (no client keys)"
    model = f" model {config.upstream_model}" if config.upstream_model else ""
    return (f"llm_proxy {__version__} listening on http://{host}:{port} -> "
            f"{server.upstream.target.display}{model}; buckets: {limits}; {keys}")


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="OpenAI-compatible proxy with a refillable token bucket per API key.",
        epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true",
                        help="use a built-in echo model as the upstream (no model server needed)")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    environ = dict(os.environ if environ is None else environ)
    try:
        config = Config.from_env(environ)
        if args.demo:
            echo = start_echo_model()
            config = _demo_config(config, echo.server_address[1], environ)
        server = ProxyServer(config)
    except ConfigError as error:
        print(f"llm_proxy: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"llm_proxy: cannot listen on {config.host}:{config.port}: {error.strerror}",
              file=sys.stderr)
        return 2
    for warning in startup_warnings(config):
        log.warning("%s", warning)
    print(describe(config, server), flush=True)
    if args.demo:
        _print_demo_help(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _demo_config(config: Config, echo_port: int, environ: dict[str, str]) -> Config:
    """Point the proxy at the echo model; listen on loopback unless HOST says otherwise."""
    host = config.host if environ.get("HOST") else "127.0.0.1"
    return replace(config, host=host, upstream_url=f"http://127.0.0.1:{echo_port}/v1",
                   upstream_key=None, upstream_model=config.upstream_model or "echo")


def _print_demo_help(server: ProxyServer) -> None:
    port = server.server_address[1]
    print(f"""
demo mode: the upstream is a built-in echo model. Try, in another terminal:
  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Authorization: Bearer demo-key' \\
       -H 'Content-Type: application/json' -d '{{"messages":[{{"role":"user","content":"hello"}}]}}'
Add "stream": true to see tokens arrive; repeat {server.config.max_tokens + 1} times to see the limit reply.
""", flush=True)


if __name__ == "__main__":
    sys.exit(main())
