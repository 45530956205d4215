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
import queue
import os
import re
import secrets
import select
import selectors
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import OrderedDict, deque
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from logging.handlers import QueueHandler, QueueListener
from typing import BinaryIO, Callable, Iterator, Sequence, TextIO

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
    """One environment variable: its names, the Config field it sets, its parser and help.

    ``names`` are looked up in order and the first one set wins, as in the
    prototype.  The same table drives parsing and ``--help``; defaults live on
    ``Config`` alone.
    """

    names: tuple[str, ...]
    attribute: str
    help: str
    parse: Callable[[str, str], object] = lambda name, text: text

    def read(self, environ: dict[str, str]) -> object | None:
        for name in self.names:
            text = environ.get(name, "").strip()
            if text:  # an empty value counts as unset, as in the prototype
                return self.parse(name, text)
        return None


def _positive(name: str, text: str) -> int:
    return _integer(name, text, minimum=1)


def _non_negative(name: str, text: str) -> int:
    return _integer(name, text, minimum=0)


def _port(name: str, text: str) -> int:
    return _integer(name, text, minimum=1, maximum=65535)


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, text: str) -> str:
        if text not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {text!r}")
        return text
    return parse


def _key_list(name: str, text: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in text.split(",") if key.strip())


SETTINGS: tuple[Setting, ...] = (
    Setting(("HOST",), "host", "address to listen on"),
    Setting(("PORT",), "port", "port to listen on", _port),
    Setting(("UPSTREAM_BASE_URL", "BASE_API_URL", "base_api_url"), "upstream_url",
            "upstream base URL including /v1, e.g. http://127.0.0.1:8080/v1 (required)"),
    Setting(("UPSTREAM_API_KEY", "BASE_API_KEY", "base_api_key"), "upstream_key",
            "key sent upstream as 'Authorization: Bearer ...'; never shown to clients"),
    Setting(("UPSTREAM_MODEL", "BASE_MODEL", "base_model"), "upstream_model",
            "replaces 'model' in forwarded completions; GET /v1/models lists only it"),
    Setting(("MAX_TOKENS",), "max_tokens", "bucket capacity; a new bucket starts full", _positive),
    Setting(("REFILL_TOKENS",), "refill_tokens", "tokens added per refill step", _positive),
    Setting(("REFILL_INTERVAL_SECONDS",), "refill_interval", "length of one refill step", _seconds),
    Setting(("REQUEST_TOKEN_COST",), "request_cost", "cost of one completion in 'request' mode", _positive),
    Setting(("TOKEN_COST_MODE",), "cost_mode",
            "'request' (fixed cost), 'estimate' (prompt chars / 4 + max output tokens) or "
            "'usage' (reserve the estimate, then settle to the upstream's reported usage)",
            _choice("request", "estimate", "usage")),
    Setting(("RESPONSE_TOKEN_RESERVE",), "response_reserve",
            "estimate and usage modes: output tokens assumed when a request sets no max_tokens",
            _positive),
    Setting(("PROXY_API_KEYS",), "client_keys",
            "comma-separated client keys; when set (or KEYS_FILE is), any other key gets 401",
            _key_list),
    Setting(("KEYS_FILE",), "keys_file",
            "JSON file of client keys with names and per-key limits; re-read on change or SIGHUP"),
    Setting(("LIMIT_RESPONSE",), "limit_response",
            "'message' (an assistant reply saying to wait) or 'error' (HTTP 429)",
            _choice("message", "error")),
    Setting(("UPSTREAM_MAX_CONCURRENT",), "upstream_max_concurrent",
            "requests in flight to the upstream at once, the rest queue fairly by key; 0 = no limit",
            _non_negative),
    Setting(("MAX_CONCURRENT_PER_KEY",), "max_concurrent_per_key",
            "requests one key may have in flight at once (more wait their turn); 0 = no limit",
            _non_negative),
    Setting(("QUEUE_TIMEOUT_SECONDS",), "queue_timeout",
            "longest wait for an upstream slot before a 503 (refunded)", _seconds),
    Setting(("STATE_FILE",), "state_file",
            "file where bucket levels survive restarts (saved every STATE_SAVE_SECONDS and at exit)"),
    Setting(("STATE_SAVE_SECONDS",), "state_save_interval", "seconds between state saves", _seconds),
    Setting(("ACCESS_LOG",), "access_log", "file that gets one JSON line per request (never prompts)"),
    Setting(("OPEN_TIMEOUT",), "open_timeout", "seconds to connect to the upstream", _seconds),
    Setting(("READ_TIMEOUT",), "read_timeout", "seconds to wait on the upstream", _seconds),
    Setting(("MAX_BODY_BYTES",), "max_body_bytes", "largest request body accepted", _positive),
    Setting(("CLIENT_TIMEOUT",), "client_timeout", "seconds a silent client may hold a connection",
            _seconds),
    Setting(("MAX_CONNECTIONS",), "max_connections",
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
    keys_file: str | None = None
    limit_response: str = "message"
    upstream_max_concurrent: int = 0
    max_concurrent_per_key: int = 0
    queue_timeout: float = 30.0
    state_file: str | None = None
    state_save_interval: float = 5.0
    access_log: str | None = None
    open_timeout: float = 10.0
    read_timeout: float = 120.0
    max_body_bytes: int = 10 * 1024 * 1024
    client_timeout: float = 60.0
    max_connections: int = 1024

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> Config:
        values = {setting.attribute: setting.read(environ) for setting in SETTINGS}
        return cls(**{name: value for name, value in values.items() if value is not None})

    @property
    def bucket(self) -> BucketSpec:
        return BucketSpec(self.max_tokens, self.refill_tokens, self.refill_interval)


def settings_help() -> str:
    defaults = {f.name: f.default for f in fields(Config)}
    lines = ["environment variables (an empty value counts as unset; of several names, the "
             "first one set wins):"]
    for setting in SETTINGS:
        names = " / ".join(setting.names)
        default = defaults[setting.attribute]
        shown = "unset" if default in (None, ()) else f"{default:g}" if isinstance(default, float) else default
        lines.append(f"  {names}\n      {setting.help} (default: {shown})")
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
    if not (config.client_keys or config.keys_file) and not _is_loopback(config.host):
        warnings.append(
            f"no PROXY_API_KEYS or KEYS_FILE and listening on {config.host}: anyone who can reach this port can "
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
    """The shape of one bucket: capacity and a stepwise refill.

    A key may have several (say, an hourly and a daily window); ``name`` is what
    the limit reply calls the one that blocks.
    """

    capacity: int
    refill_tokens: int
    interval: float
    name: str = ""


class Bucket:
    """A level and the time of its last refill step (on the store's monotonic clock).

    The level may go below zero in usage mode, when a request used more than
    its reservation: that debt is repaid by refills before the next request.
    """

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
        elif self.tokens > spec.capacity:  # the policy shrank
            self.tokens = spec.capacity

    def seconds_until(self, spec: BucketSpec, tokens: int, now: float) -> float:
        """Seconds until the level reaches ``tokens`` (0 if it already has)."""
        missing = tokens - self.tokens
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
    window: str = ""


class BucketStore:
    """All buckets, keyed by identity; one short lock makes each charge atomic.

    The lock guards arithmetic only and is never held during I/O, so a slow
    upstream or client cannot stall other callers.  A bucket that has refilled
    to full carries no information, so ``prune`` forgets it: memory follows the
    number of recently active callers, not the number ever seen.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, list[Bucket]] = {}

    def _current(self, identity: str, specs: Sequence[BucketSpec], now: float) -> list[Bucket]:
        buckets = self._buckets.get(identity)
        if buckets is None or len(buckets) != len(specs):
            # A new caller starts full; when a policy gains or loses windows, the
            # levels kept so far stay (by position), so an edit refills nobody early.
            kept = buckets or []
            buckets = kept[:len(specs)] + [Bucket(spec.capacity, now) for spec in specs[len(kept):]]
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
            # Report the tightest bucket: one too small, else the one blocking longest,
            # else the one nearest empty.
            index = max(range(len(specs)), key=lambda i: (
                cost > specs[i].capacity, waits[i], -buckets[i].tokens))
            spec = specs[index]
            return Admission(allowed, cost, spec.capacity, max(0, buckets[index].tokens),
                             0.0 if allowed else waits[index], spec.refill_tokens, spec.interval,
                             spec.name)

    def credit(self, identity: str, specs: Sequence[BucketSpec], amount: int) -> None:
        """Give back ``amount`` (never above capacity) or, when negative, take it (debt allowed)."""
        with self._lock:
            buckets = self._current(identity, specs, self.clock())
            for bucket, spec in zip(buckets, specs):
                bucket.tokens = min(spec.capacity, bucket.tokens + amount) if amount > 0 else (
                    bucket.tokens + amount)

    def snapshot(self, identity: str, specs: Sequence[BucketSpec]) -> list[dict]:
        """Each bucket's level and timing, for the quota endpoint; charges nothing."""
        with self._lock:
            now = self.clock()
            return [{"name": spec.name, "capacity": spec.capacity, "tokens": bucket.tokens,
                     "refill_tokens": spec.refill_tokens, "refill_interval_seconds": spec.interval,
                     "seconds_to_next_refill": round(bucket.step_at + spec.interval - now, 3),
                     "seconds_to_full": round(bucket.seconds_until(spec, spec.capacity, now), 3)}
                    for bucket, spec in zip(self._current(identity, specs, now), specs)]

    def prune(self, specs_of: Callable[[str], Sequence[BucketSpec]], batch: int = 2000) -> int:
        """Forget buckets that are full again; the lock is taken per batch, not for the sweep."""
        forgotten = 0
        identities = list(self._buckets)
        for start in range(0, len(identities), batch):
            with self._lock:
                now = self.clock()
                for identity in identities[start:start + batch]:
                    buckets = self._buckets.get(identity)
                    specs = specs_of(identity)
                    if buckets is None or len(buckets) != len(specs):
                        continue
                    for bucket, spec in zip(buckets, specs):
                        bucket.refill(spec, now)
                    if all(b.tokens >= s.capacity for b, s in zip(buckets, specs)):
                        del self._buckets[identity]
                        forgotten += 1
        if forgotten:
            with self._lock:
                self._buckets = dict(self._buckets)  # a dict never shrinks its table in place
        return forgotten

    def dump(self, wall_clock: Callable[[], float] = time.time, batch: int = 2000) -> dict:
        """Levels with their step clocks on the wall clock, which, unlike ours, survives a restart.

        Copied a batch at a time, so that saving many buckets never stalls a charge for long.
        """
        offset = wall_clock() - self.clock()
        identities = list(self._buckets)
        saved = {}
        for start in range(0, len(identities), batch):
            with self._lock:
                for identity in identities[start:start + batch]:
                    buckets = self._buckets.get(identity)
                    if buckets is not None:
                        saved[identity] = [[b.tokens, round(b.step_at + offset, 3)] for b in buckets]
        return saved

    def load(self, saved: dict, wall_clock: Callable[[], float] = time.time) -> None:
        """Restore dumped buckets; refill steps that fell during the downtime apply on next use."""
        offset = self.clock() - wall_clock()
        now = self.clock()
        restored = {}
        for identity, buckets in saved.items():
            if not isinstance(identity, str) or not isinstance(buckets, list):
                raise ValueError("unexpected bucket entry")
            restored[identity] = [Bucket(int(tokens), min(now, float(step_at) + offset))
                                  for tokens, step_at in buckets]
            if not all(math.isfinite(bucket.step_at) for bucket in restored[identity]):
                raise ValueError("a refill time is not a number")
        with self._lock:
            self._buckets.update(restored)

    def __len__(self) -> int:
        return len(self._buckets)


class Charge:
    """One admitted request's payment: kept once the upstream serves it, else refunded once.

    In usage mode the reservation is later settled to what the upstream reported.
    """

    def __init__(self, store: BucketStore, identity: str, specs: Sequence[BucketSpec],
                 admission: Admission) -> None:
        self.store = store
        self.identity = identity
        self.specs = specs
        self.admission = admission
        self.kept = False
        self.refunded = False
        self.settled: int | None = None

    def keep(self) -> None:
        self.kept = True

    def refund(self) -> None:
        if not (self.kept or self.refunded):
            self.refunded = True
            self.store.credit(self.identity, self.specs, self.admission.cost)
            self.admission = replace(self.admission, remaining=min(
                self.admission.limit, self.admission.remaining + self.admission.cost))

    def settle(self, used: int) -> None:
        """Replace the reservation by what was really used: refund the rest, or take the extra."""
        if self.settled is None and not self.refunded:
            self.kept = True
            self.settled = used
            self.store.credit(self.identity, self.specs, self.admission.cost - used)

    @property
    def headers(self) -> list[tuple[str, str]]:
        return rate_limit_headers(self.admission)


# --------------------------------------------------------------------------
# Keys and policies
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    """What one client key may do: its buckets, models and parallel requests."""

    name: str
    buckets: tuple[BucketSpec, ...]
    models: tuple[str, ...] | None = None  # None: every model
    max_concurrent: int = 0               # 0: no per-key limit

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def key_digest(key: str) -> str:
    """The name under which a key's buckets are kept and saved; the key itself never is."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


POLICY_FIELDS = {"name", "max_tokens", "refill_tokens", "refill_interval_seconds", "buckets",
                 "models", "max_concurrent"}
WINDOW_FIELDS = {"name", "max_tokens", "refill_tokens", "refill_interval_seconds"}


def parse_keys_file(text: str, config: Config) -> dict[str, tuple[bytes, Policy]]:
    """Policies by key digest from a keys file: ``{"<key>": {"name": ..., overrides...}}``.

    Errors name the entry by position and name, never by its key.
    """
    try:
        entries = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"not valid JSON ({error})") from None
    if not isinstance(entries, dict):
        raise ConfigError("must be a JSON object mapping each client key to its settings")
    policies = {}
    for position, (key, entry) in enumerate(entries.items(), 1):
        where = f"entry {position}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: settings must be an object")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']})"
        if not key.strip():
            raise ConfigError(f"{where}: the key is empty")
        policies[key_digest(key)] = (key.encode("utf-8", "surrogateescape"),
                                     _policy_from_entry(entry, config, where))
    return policies


def _policy_from_entry(entry: dict, config: Config, where: str) -> Policy:
    unknown = set(entry) - POLICY_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown setting {sorted(unknown)[0]!r}")
    name = entry.get("name", "")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name must be a string")
    base = {"max_tokens": config.max_tokens, "refill_tokens": config.refill_tokens,
            "refill_interval_seconds": config.refill_interval}
    base.update({k: entry[k] for k in base if k in entry})
    windows = entry.get("buckets", [{}])
    if not isinstance(windows, list) or not windows:
        raise ConfigError(f"{where}: buckets must be a non-empty list")
    buckets = tuple(_window(window, base, f"{where} bucket {index}")
                    for index, window in enumerate(windows, 1))
    models = entry.get("models")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        raise ConfigError(f"{where}: models must be a list of model names")
    limit = entry.get("max_concurrent", config.max_concurrent_per_key)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigError(f"{where}: max_concurrent must be a whole number, 0 for no limit")
    return Policy(name, buckets, None if models is None else tuple(models), limit)


def _window(window: object, base: dict, where: str) -> BucketSpec:
    if not isinstance(window, dict) or set(window) - WINDOW_FIELDS:
        raise ConfigError(f"{where}: must be an object with {', '.join(sorted(WINDOW_FIELDS))}")
    values = dict(base, **{k: v for k, v in window.items() if k != "name"})
    for field_name in ("max_tokens", "refill_tokens"):
        value = values[field_name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {field_name} must be a whole number of at least 1")
    interval = values["refill_interval_seconds"]
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
        raise ConfigError(f"{where}: refill_interval_seconds must be a positive number")
    name = window.get("name", "")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name must be a string")
    return BucketSpec(values["max_tokens"], values["refill_tokens"], float(interval), name)


class KeyRing:
    """The accepted client keys and the policy each one pays under.

    Keys come from PROXY_API_KEYS (the default policy) and KEYS_FILE (its own
    policies).  The file is re-read when it changes; a broken file keeps the
    previous policies.  With neither, the proxy is open: any caller pays under
    the default policy, by key or by IP.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.default = Policy("", (config.bucket,), None, config.max_concurrent_per_key)
        self._static = {key_digest(key): (key.encode("utf-8", "surrogateescape"), self.default)
                        for key in config.client_keys}
        self._policies = dict(self._static)
        self._file_stamp: tuple | None = None
        if config.keys_file:
            try:
                self.reload()
            except ConfigError as error:
                raise ConfigError(f"KEYS_FILE {config.keys_file}: {error}") from None

    @property
    def is_open(self) -> bool:
        return not self.config.client_keys and not self.config.keys_file

    def lookup(self, token: str) -> tuple[str, Policy | None]:
        """The key's digest, and its policy if it is an accepted key.

        The table is indexed by SHA-256, so the time a lookup takes depends on
        the digest of what was sent, never on how much of a real key it matched;
        the final comparison is constant-time as well.
        """
        presented = token.encode("utf-8", "surrogateescape")
        digest = key_digest(token)
        entry = self._policies.get(digest)
        if entry is None or not hmac.compare_digest(entry[0], presented):
            return digest, None
        return digest, entry[1]

    @property
    def key_count(self) -> int:
        return len(self._policies)

    def policy_of(self, identity: str) -> Policy:
        entry = self._policies.get(identity[len("key:"):]) if identity.startswith("key:") else None
        return entry[1] if entry else self.default

    def reload(self) -> None:
        """Read KEYS_FILE now; raises ConfigError (keeping the old policies) when it is broken."""
        path = self.config.keys_file
        assert path is not None
        try:
            with open(path, encoding="utf-8") as file:
                stamp = _file_stamp(os.fstat(file.fileno()))
                text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read it ({type(error).__name__})") from None
        self._file_stamp = stamp
        self._policies = {**self._static, **parse_keys_file(text, self.config)}

    def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read KEYS_FILE if it changed (or when forced, as on SIGHUP); True if reloaded."""
        path = self.config.keys_file
        if not path:
            return False
        try:
            stamp: tuple | None = _file_stamp(os.stat(path))
        except OSError:
            stamp = None
        if not force and stamp == self._file_stamp:
            return False
        self._file_stamp = stamp  # a missing or broken file is reported once, not every second
        try:
            self.reload()
        except ConfigError as error:
            log.error("KEYS_FILE %s: %s; keeping the previous keys", path, error)
            return False
        log.info("KEYS_FILE %s: loaded, %d client keys in all", path, self.key_count)
        return True


def _file_stamp(info: os.stat_result) -> tuple:
    return (info.st_ino, info.st_size, info.st_mtime_ns)


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
    allowance = output_allowance(payload)
    return max(1, prompt_tokens(payload) + (reserve if allowance is None else allowance))


def request_cost(payload: dict, config: Config) -> int:
    """What to charge before forwarding: fixed, or the estimate (reserved, in usage mode)."""
    if config.cost_mode == "request":
        output_allowance(payload)  # validated in every mode, so a bad value is a 400 everywhere
        return config.request_cost
    return estimate_tokens(payload, config.response_reserve)


def prompt_tokens(payload: dict) -> int:
    """Every string in the request but the model, at 4 characters a token."""
    return math.ceil(len(" ".join(_text_strings(payload))) / 4)


def reported_usage(value: object) -> int | None:
    """``usage.total_tokens`` from a completion or chunk, if the upstream reported it."""
    usage = value.get("usage") if isinstance(value, dict) else None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) and not isinstance(total, bool) and total >= 0 else None


class StreamUsage:
    """Reads a streamed completion on its way through: the usage report and the text so far.

    The proxy asks the upstream for a usage chunk (``stream_options.include_usage``)
    when the client did not; that chunk is then hidden from the client, which
    would not expect it.
    """

    def __init__(self, hide_usage_chunk: bool) -> None:
        self.hide_usage_chunk = hide_usage_chunk
        self.total: int | None = None
        self.characters = 0

    def filter(self, events: bytes) -> bytes:
        """Observe complete events; return those the client should see."""
        kept = []
        for event in events.replace(b"\r\n", b"\n").split(b"\n\n"):
            if event and self.observe(event):
                kept.append(event + b"\n\n")
        return b"".join(kept)

    def observe(self, event: bytes) -> bool:
        data = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data.startswith(b"{"):
            return True
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            return True
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        for choice in choices if isinstance(choices, list) else ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str):
                self.characters += len(text)
        total = reported_usage(chunk)
        if total is None:
            return True
        self.total = total
        return not (self.hide_usage_chunk and not choices)

    def generated_so_far(self, prompt: int) -> int:
        """What a stream cut short used: its reported usage, else prompt plus text / 4."""
        return self.total if self.total is not None else prompt + math.ceil(self.characters / 4)


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

# Encoded slashes would change where a path's segments begin, so they are refused.
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)
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
    if not path.startswith("/") or path.startswith("//") or _ENCODED_SEPARATOR.search(path):
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
# Every header a client may carry a credential in.  The same list finds the
# caller's key and strips the request: the proxy key is the proxy's secret, and
# a cookie or second key meant for the proxy is none of the upstream's business.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization", "cookie")
KEY_HEADERS = CREDENTIAL_HEADERS[:3]  # those that carry an API key, in order of preference
NOT_FORWARDED_UPSTREAM = HOP_BY_HOP | set(CREDENTIAL_HEADERS) | {
    "host", "content-length", "expect", "accept-encoding"}
# The upstream's Server header would tell callers what software and version the
# model server runs (nginx drops it too); the proxy names itself instead.
PROXY_RESPONSE_HEADERS = frozenset({
    "content-length", "server", "access-control-allow-origin", "access-control-expose-headers",
    "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-refill-tokens",
    "x-ratelimit-refill-seconds", "x-ratelimit-reset-seconds", "retry-after",
})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def is_safe_header(name: str, value: str) -> bool:
    """A header that can be written out verbatim: no CR, LF or NUL can smuggle a second one."""
    return bool(_TOKEN.fullmatch(name) and _FIELD_VALUE.fullmatch(value))


MAX_LINE = 65536
MAX_HEADERS = 100
MAX_UPSTREAM_BODY = 64 * 1024 * 1024  # a non-streamed answer is read whole, up to this
MAX_EVENT_BYTES = 1024 * 1024         # a streamed event is held back whole, up to this


class Headers:
    """A request's header fields in the order sent, looked up case-insensitively."""

    __slots__ = ("_items", "_index")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._index: dict[str, list[str]] = {}
        for name, value in items:
            self._index.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return self._index.get(name.lower(), [])

    def items(self) -> list[tuple[str, str]]:
        return self._items


class HeaderError(http.client.HTTPException):
    """A header block that ``read_headers`` refuses; ``status`` is what a client is told."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_headers(rfile: BinaryIO) -> Headers:
    """Read a header block strictly, for requests and upstream responses alike.

    A folded line, a line without a colon or a control character is an error,
    never reinterpreted: reinterpretation is how requests are smuggled past a
    proxy.  It also costs a fraction of the email parser that http.server and
    http.client use, which was the largest part of this proxy's work per request.
    """
    items = []
    while True:
        line = rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise HeaderError(431, "header line too long")
        if line in (b"\r\n", b"\n"):
            return Headers(items)
        if not line.endswith(b"\n"):
            raise HeaderError(400, "the message ended inside its headers")
        if len(items) == MAX_HEADERS:
            raise HeaderError(431, f"more than {MAX_HEADERS} headers")
        name, colon, value = line.decode("iso-8859-1").rstrip("\r\n").partition(":")
        value = value.strip(" \t")
        if not colon or not is_safe_header(name, value):
            raise HeaderError(400, "malformed header line")
        items.append((name, value))


def copied_headers(items: Sequence[tuple[str, str]], excluded: frozenset) -> list[tuple[str, str]]:
    """Headers passed from one side to the other, minus hop-by-hop ones and any named in Connection.

    Both sides' headers were read by ``read_headers``, so every value is already safe to write.
    """
    listed: set[str] = set()
    for name, value in items:
        if name.lower() == "connection":
            listed.update(token.strip().lower() for token in value.split(","))
    return [(name, value) for name, value in items
            if name.lower() not in excluded and name.lower() not in listed]


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def presented_key(headers: Headers) -> str | None:
    """The API key a client sent: ``Authorization: Bearer``, else ``x-api-key`` or ``api-key``.

    OpenAI clients use the first, Anthropic clients the second, Azure-style
    clients the third; ``KEY_HEADERS`` is the list that is also never forwarded.
    """
    for name in KEY_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        token = bearer_token(value) if name == "authorization" else value.strip()
        if token:
            return token
    return None


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


class UpstreamResponse(http.client.HTTPResponse):
    """http.client's response, its headers read by ``read_headers``.

    Only the header parsing differs from ``HTTPResponse.begin``: the email
    parser it replaces was, after the request side's, the largest cost per
    request, and it accepts folded lines that ``read_headers`` refuses.
    """

    def begin(self) -> None:
        version, status, reason = self._read_status()
        while status == http.client.CONTINUE:  # skip interim responses
            read_headers(self.fp)  # type: ignore[arg-type]
            version, status, reason = self._read_status()
        if not version.startswith("HTTP/1.") and version != "HTTP/0.9":
            raise http.client.UnknownProtocol(version)
        self.code = self.status = status
        self.reason = reason.strip()
        self.version = 11 if version.startswith("HTTP/1.") and version != "HTTP/1.0" else 10
        self.headers = self.msg = read_headers(self.fp)  # type: ignore[arg-type,assignment]
        self.chunked = (self.headers.get("Transfer-Encoding") or "").lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        length = self.headers.get("Content-Length") or ""
        self.length = int(length) if length.isascii() and length.isdigit() and not self.chunked else None
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True  # the body ends when the connection does


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

    def connect(self) -> http.client.HTTPConnection:
        if self.target.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.target.host, self.target.port, timeout=self.open_timeout)
        else:
            conn = http.client.HTTPConnection(self.target.host, self.target.port,
                                              timeout=self.open_timeout)
        conn.response_class = UpstreamResponse
        conn.connect()
        conn.sock.settimeout(self.read_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def take(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle pooled connection (reused=True) or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self.connect(), False

    def release(self, conn: http.client.HTTPConnection) -> None:
        """Keep a connection whose last response was read to the end, unless the upstream closed it."""
        if conn.sock is not None:
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


class UpstreamExchange:
    """One request and its response on a pooled connection, abortable from another thread."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.conn: http.client.HTTPConnection | None = None
        self.sock: socket.socket | None = None  # kept: http.client drops conn.sock on "close"
        self.aborted = False
        self.sent = False       # the request reached the upstream, which may be working on it
        self.completed = False  # the response was read to its end, so the connection is reusable
        self._lock = threading.Lock()

    def send(self, method: str, path: str, headers: dict[str, str],
             body: bytes | None) -> http.client.HTTPResponse:
        """Send the request and return the response head.

        A pooled connection that the upstream closed while idle fails before any
        response byte; only then is the request retried, once, on a fresh connection.
        """
        conn, reused = self.pool.take()
        try:
            return self._send_on(conn, method, path, headers, body)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not reused or self.aborted:
                raise
        return self._send_on(self.pool.connect(), method, path, headers, body)

    def _send_on(self, conn: http.client.HTTPConnection, method: str, path: str,
                 headers: dict[str, str], body: bytes | None) -> http.client.HTTPResponse:
        with self._lock:
            self.conn, self.sock = conn, conn.sock
            if self.aborted:
                conn.close()
                raise ConnectionAbortedError()
        self.sent = False
        try:
            conn.request(method, path, body, headers)
            self.sent = True
            return conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def abort(self) -> None:
        """Hang up on the upstream now, so that it stops generating an answer nobody will read."""
        with self._lock:
            self.aborted = True
            if self.sock is not None:
                with suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        """Return the connection to the pool if its response was read to the end, else close it."""
        if self.conn is None:
            return
        if self.completed and not self.aborted:
            self.pool.release(self.conn)
            return
        self.conn.close()
        if self.sock is not None:  # a response that will close holds the socket, not conn
            with suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


class Ticket:
    """One request's place at the gate: queued, then granted, or withdrawn if its client left."""

    __slots__ = ("identity", "key_limit", "event", "granted", "withdrawn")

    def __init__(self, identity: str, key_limit: int) -> None:
        self.identity = identity
        self.key_limit = key_limit
        self.event = threading.Event()
        self.granted = False
        self.withdrawn = False


class FairGate:
    """Admission to the upstream: a global cap, a per-key cap, and a fair queue.

    Waiting requests are served round-robin by key, so a key with twenty queued
    requests does not delay a key with one.  Every slot taken is given back by
    ``slot``'s context manager, whatever happens inside it.
    """

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit  # 0: no global limit
        self.timeout = timeout
        self.in_flight = 0
        self._per_key: dict[str, int] = {}
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, ticket: Ticket) -> Iterator[None]:
        self.acquire(ticket)
        try:
            yield
        finally:
            self.release(ticket.identity)

    def acquire(self, ticket: Ticket) -> None:
        """Wait for a slot; ClientGone if the ticket is withdrawn, a 503 after QUEUE_TIMEOUT."""
        identity = ticket.identity
        with self._lock:
            if ticket.withdrawn:
                raise ClientGone()
            if not self._queues and self._has_room(identity, ticket.key_limit):
                self._grant(ticket)
                return
            self._queues.setdefault(identity, deque()).append(ticket)
            self._dispatch()
        ticket.event.wait(self.timeout)
        with self._lock:
            if ticket.granted:  # possibly just as the wait ran out
                return
            self._dequeue(ticket)
        if ticket.withdrawn:
            raise ClientGone()
        raise ProxyError(503, "The model server is busy; try again shortly.", "server_error",
                         "queue_timeout")

    def withdraw(self, ticket: Ticket) -> None:
        """The ticket's client hung up: take it out of the queue so it never takes a slot.

        A ticket already granted keeps its slot until ``release``; its request
        finds its exchange aborted and is never sent.
        """
        with self._lock:
            ticket.withdrawn = True
            if not ticket.granted:
                self._dequeue(ticket)
                ticket.event.set()

    def _dequeue(self, ticket: Ticket) -> None:
        waiting = self._queues.get(ticket.identity)
        if waiting is not None and ticket in waiting:
            waiting.remove(ticket)
            if not waiting:
                del self._queues[ticket.identity]

    def release(self, identity: str) -> None:
        with self._lock:
            self.in_flight -= 1
            remaining = self._per_key[identity] - 1
            if remaining:
                self._per_key[identity] = remaining
            else:
                del self._per_key[identity]
            self._dispatch()

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def _has_room(self, identity: str, key_limit: int) -> bool:
        return ((not self.limit or self.in_flight < self.limit)
                and (not key_limit or self._per_key.get(identity, 0) < key_limit))

    def _grant(self, ticket: Ticket) -> None:
        self.in_flight += 1
        self._per_key[ticket.identity] = self._per_key.get(ticket.identity, 0) + 1
        ticket.granted = True
        ticket.event.set()

    def _dispatch(self) -> None:
        """Hand free slots to the first key in turn whose next request may go."""
        while self._queues and (not self.limit or self.in_flight < self.limit):
            for identity, waiting in self._queues.items():
                if self._has_room(identity, waiting[0].key_limit):
                    break
            else:
                return  # everyone waiting is at their own key's limit
            ticket = waiting.popleft()
            if waiting:
                self._queues.move_to_end(identity)
            else:
                del self._queues[identity]
            self._grant(ticket)


class _Watch:
    """One watched client: its callback runs at most once, and never after ``cancel``."""

    __slots__ = ("client", "on_gone", "active", "lock")

    def __init__(self, client: socket.socket, on_gone: Callable[[], None]) -> None:
        self.client = client
        self.on_gone = on_gone
        self.active = True
        self.lock = threading.Lock()


def _readable_now(sock: socket.socket) -> bool:
    """Whether a read would return at once; the socket's own timeout would make recv wait."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


class DisconnectWatcher:
    """One thread that notices clients hanging up while their request is upstream.

    Without it a client that gives up on a long, non-streamed answer would only
    be noticed when the answer is written, after the model finished generating
    it for nobody.  ``watch`` returns a cancel function; once it returns, the
    callback never runs.  Each watch has its own small lock, so handlers never
    queue behind one another here.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="disconnect-watcher", daemon=True)
        self._thread.start()

    def watch(self, client: socket.socket, on_gone: Callable[[], None]) -> Callable[[], None]:
        watch = _Watch(client, on_gone)
        self._selector.register(client, selectors.EVENT_READ, watch)

        def cancel() -> None:
            with watch.lock:
                if watch.active:
                    watch.active = False
                    self._forget(watch)
        return cancel

    def _forget(self, watch: _Watch) -> None:
        with suppress(KeyError, ValueError, OSError):
            self._selector.unregister(watch.client)

    def _run(self) -> None:
        # epoll and kqueue see sockets registered during a wait; the timeout bounds
        # the delay on platforms whose selectors do not.
        while not self._stopped:
            for key, _ in self._selector.select(timeout=0.5):
                if key.data is not None:
                    self._check(key.data)

    def _check(self, watch: _Watch) -> None:
        # Under the watch's lock: the handler cannot cancel, read the socket or close
        # it meanwhile, so the peek cannot block and the descriptor cannot be reused.
        with watch.lock:
            if not watch.active or not _readable_now(watch.client):  # a stale event: the socket
                return                                                # may be registered anew
            try:
                gone = watch.client.recv(1, socket.MSG_PEEK) == b""
            except (BlockingIOError, socket.timeout):
                return
            except OSError:
                gone = True
            watch.active = False
            self._forget(watch)  # pipelined data or gone: either way, stop watching
            if gone:
                try:
                    watch.on_gone()
                except Exception:  # this thread serves every request: it must not die
                    log.exception("disconnect callback failed")

    def close(self) -> None:
        self._stopped = True
        self._wake_writer.send(b"x")
        self._thread.join()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()


def read_whole(response: http.client.HTTPResponse, limit: int) -> bytes:
    """The whole body, however it is framed, refusing more than ``limit`` bytes.

    (``response.read(limit)`` would do, but Python 3.9 allocates ``limit`` bytes for it.)
    """
    if response.length is not None and response.length <= limit:
        return response.read()
    parts, size = [], 0
    while size <= limit:
        data = response.read1(65536)
        if not data:
            return b"".join(parts)
        parts.append(data)
        size += len(data)
    raise ProxyError(502, "The model server's answer is too large.", "upstream_error",
                     "upstream_response_too_large")


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
    limit = f"{admission.window} limit" if admission.window else "limit"
    if admission.cost > admission.limit:
        return (f"request too large: it costs {admission.cost} tokens but the {limit} is "
                f"{admission.limit}; shorten the conversation or lower max_tokens")
    minutes = max(1, math.ceil(admission.wait_seconds / 60))
    return f"{limit} reached, wait {minutes} min"


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


def model_list(ids: Sequence[str]) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                        "owned_by": "llm_proxy"} for model in ids]}


def rate_limit_headers(admission: Admission) -> list[tuple[str, str]]:
    headers = [
        ("X-RateLimit-Limit", str(admission.limit)),
        ("X-RateLimit-Remaining", str(admission.remaining)),
        ("X-RateLimit-Refill-Tokens", str(admission.refill_tokens)),
        ("X-RateLimit-Refill-Seconds", _whole_seconds(admission.refill_seconds)),
        ("X-RateLimit-Reset-Seconds", _whole_seconds(admission.wait_seconds)),
    ]
    if not admission.allowed and admission.cost <= admission.limit:
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
SERVER_HEADER = f"Server: llm_proxy/{__version__}"  # on every answer; the upstream's is dropped
SSE_TYPE = ("Content-Type", "text/event-stream; charset=utf-8")


class ProxyHandler(BaseHTTPRequestHandler):
    """One client connection: HTTP/1.1 with keep-alive, one request at a time."""

    protocol_version = "HTTP/1.1"
    server_version = "llm_proxy/" + __version__
    server: ProxyServer
    body_pending = True  # until read_body: an unread body forces the connection closed
    body_length = 0

    def setup(self) -> None:
        self.timeout = self.server.config.client_timeout  # idle clients must not hold a thread
        self.unwatch: Callable[[], None] = _nothing
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # Every method goes through one dispatcher; http.server answers 501 for others.
    def do_GET(self) -> None:
        self.handle_request()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    # -- request handling --------------------------------------------------

    def begin_request(self) -> None:
        """Fresh per-request state; the head and body must arrive within CLIENT_TIMEOUT."""
        self.started = time.monotonic()
        self.arrived = time.time()  # for the access log's timeline
        self.path = ""
        self.server.expect_request_by(self.connection, self.started + self.server.config.client_timeout)
        self.status = 0
        self.label = "-"           # who, for the logs: key name or fingerprint, never the key
        self.identity = ""         # whose buckets pay
        self.policy: Policy = self.server.keyring.default
        self.body_pending = True
        self.body_length = 0
        self.model: str | None = None
        self.charge: Charge | None = None
        self.stream_usage: StreamUsage | None = None
        self.prompt_estimate = 0
        self.limited = False
        self.streamed = False      # the answer went out as an event stream
        self.stream_finished = False
        self.client_gone = False
        self.upstream_reached = False
        self.upstream_ms: float | None = None
        self.unwatch = _nothing

    def handle_request(self) -> None:
        try:
            self.route()
        except ProxyError as error:
            if error.close:
                self.close_connection = True
            self.send_json(error.status, error.body())
        except ClientGone:
            self.client_gone = True
            self.close_connection = True
        except Exception:
            log.exception("internal error on %s %s", self.command, ascii(self.path.partition("?")[0]))
            self.close_connection = True
            if not self.status:
                self.send_json(500, error_body("Internal proxy error.", "server_error"))
        finally:
            self.server.request_arrived(self.connection)
            self.log_outcome()

    def route(self) -> None:
        self.check_framing()
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
        self.authenticate()
        kind = target.metered_kind
        if kind is not None and self.command != "POST":
            raise ProxyError(405, f"{target.path} takes POST", code="method_not_allowed")
        if kind is not None:
            self.handle_completion(kind, target)
        elif target.path == "/v1/quota" and self.command in ("GET", "HEAD"):
            self.send_json(200, self.quota())
        elif target.path == "/v1/models" and self.command in ("GET", "HEAD"):
            self.handle_models(target)
        else:
            body = self.read_body()
            if self.command == "POST":
                self.check_model(body)
            self.forward(target, body)

    def check_model(self, body: bytes) -> None:
        """Enforce the key's model list on any JSON request that names a model (embeddings ...)."""
        if self.policy.models is None or not body.startswith(b"{"):
            return
        with suppress(ValueError, RecursionError):
            model = json.loads(body).get("model")
            if isinstance(model, str):
                self.model = model
                self.require_allowed_model()

    def require_allowed_model(self) -> None:
        if not self.policy.allows(self.model or ""):
            raise ProxyError(403, f"The model '{self.model}' is not available to this key.",
                             "permission_error", "model_not_allowed", "model")

    def parse_request(self) -> bool:
        """Parse the request line and headers; http.server's hook, made strict and cheap.

        http.server reads headers with the lenient email parser, which accepts
        folded and colon-less lines and was over a third of this proxy's work per
        request; ``read_headers`` refuses both, at a fraction of the cost.
        """
        self.begin_request()
        self.command = None
        self.request_version = "HTTP/1.0"
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            return self.refuse_request(ProxyError(400, "Bad request syntax", code="invalid_request"))
        command, path, version = words
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            return self.refuse_request(ProxyError(505, "Only HTTP/1.0 and HTTP/1.1 are supported",
                                                  "server_error", "http_version_not_supported"))
        self.command, self.path, self.request_version = command, path, version
        try:
            self.headers = read_headers(self.rfile)  # type: ignore[assignment]
        except HeaderError as error:
            return self.refuse_request(ProxyError(error.status, error.message, code="invalid_header"))
        except socket.timeout:
            return self.refuse_request(ProxyError(408, "timed out waiting for the request headers",
                                                  code="timeout"))
        connection = {token.strip().lower() for token in self.headers.get("Connection", "").split(",")}
        self.close_connection = "close" in connection or (
            version == "HTTP/1.0" and "keep-alive" not in connection)
        if self.headers.get("Expect", "").lower() == "100-continue" and version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def refuse_request(self, error: ProxyError) -> bool:
        """Answer a request that never got as far as routing, log it, and end the connection."""
        self.close_connection = True
        with suppress(ClientGone):
            self.send_json(error.status, error.body())
        self.server.request_arrived(self.connection)
        self.log_outcome()
        return False

    def check_framing(self) -> None:
        """Refuse body framing that another parser could read differently (request smuggling)."""
        lengths = self.headers.get_all("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            if lengths:
                raise ProxyError(400, "both Content-Length and Transfer-Encoding were sent",
                                 code="invalid_framing", close=True)
            raise ProxyError(411, "chunked request bodies are not supported; send Content-Length",
                             code="length_required", close=True)
        self.body_length = self.declared_length(lengths) if lengths else 0

    def authenticate(self) -> None:
        """Find whose buckets pay for this request, or raise 401."""
        keyring = self.server.keyring
        token = presented_key(self.headers)
        if token is not None:
            digest, policy = keyring.lookup(token)
            if policy is not None or keyring.is_open:
                self.policy = policy or keyring.default
                self.identity = "key:" + digest
                self.label = self.policy.name or digest[:12]
                return
        elif keyring.is_open:
            self.identity = self.label = "ip:" + self.client_address[0]
            return
        raise ProxyError(401, "Missing or invalid proxy API key", "authentication_error",
                         "invalid_api_key")

    def read_body(self) -> bytes:
        """Read exactly the declared body (framing was checked with the headers)."""
        self.body_pending = False
        try:
            body = self.rfile.read(self.body_length)
        except socket.timeout:
            raise ProxyError(408, "timed out waiting for the request body", code="timeout",
                             close=True) from None
        except OSError:
            raise ClientGone() from None
        if len(body) < self.body_length:
            raise ProxyError(400, "request body is shorter than its Content-Length",
                             code="invalid_framing", close=True)
        self.server.request_arrived(self.connection)
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
        """Refuse a badly framed or oversized body, or an unknown key, before the body is sent."""
        try:
            self.check_framing()
            if parse_target(self.path).is_api:
                self.authenticate()
        except ProxyError as error:
            return self.refuse_request(error)
        return super().handle_expect_100()

    def parse_json_object(self, body: bytes) -> dict:
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None
        if not isinstance(payload, dict):
            raise ProxyError(400, "request body must be a JSON object", code="invalid_json")
        return payload

    # -- local answers -------------------------------------------------------

    def quota(self) -> dict:
        policy = self.policy
        return {"object": "quota", "name": policy.name or None,
                "models": None if policy.models is None else list(policy.models),
                "max_concurrent": policy.max_concurrent or None,
                "buckets": self.server.buckets.snapshot(self.identity, policy.buckets)}

    def handle_models(self, target: Target) -> None:
        """BASE_MODEL is answered here; otherwise the upstream's list, cut to the key's models."""
        base_model = self.server.config.upstream_model
        if base_model:
            self.send_json(200, model_list([base_model] if self.policy.allows(base_model) else []))
        elif self.policy.models is None:
            self.forward(target, self.read_body())
        else:
            self.forward(target, self.read_body(), transform=self.visible_models)

    def visible_models(self, data: bytes) -> bytes:
        try:
            listing = json.loads(data)
            listing["data"] = [m for m in listing["data"] if self.policy.allows(m.get("id"))]
        except (ValueError, RecursionError, TypeError, KeyError, AttributeError):
            return json_bytes(model_list([]))  # unreadable: show nothing rather than everything
        return json_bytes(listing)

    # -- completions ---------------------------------------------------------

    def handle_completion(self, kind: str, target: Target) -> None:
        config = self.server.config
        body = self.read_body()
        payload = self.parse_json_object(body)
        validate_completion(kind, payload)
        self.model = config.upstream_model or payload.get("model") or ""
        self.require_allowed_model()
        cost = request_cost(payload, config)
        admission = self.server.buckets.charge(self.identity, self.policy.buckets, cost)
        stream = payload.get("stream") is True
        if not admission.allowed:
            self.send_limit_reply(kind, payload.get("model") or self.model, stream, admission)
            return
        body = self.upstream_body(body, payload, stream)
        self.charge = Charge(self.server.buckets, self.identity, self.policy.buckets, admission)
        try:
            self.forward(target, body, transform=self.checked_completion)
        except ClientGone:
            self.client_gone = True
            raise
        finally:
            self.finish_charge()

    def upstream_body(self, body: bytes, payload: dict, stream: bool) -> bytes:
        """The body to forward: the client's own bytes unless something had to change."""
        config = self.server.config
        changed = False
        if config.upstream_model and payload.get("model") != config.upstream_model:
            payload["model"] = config.upstream_model
            changed = True
        if config.cost_mode == "usage" and stream:
            self.prompt_estimate = prompt_tokens(payload)
            options = payload.get("stream_options")
            asked = isinstance(options, dict) and options.get("include_usage") is True
            self.stream_usage = StreamUsage(hide_usage_chunk=not asked)
            if not asked:
                payload["stream_options"] = dict(options if isinstance(options, dict) else {},
                                                 include_usage=True)
                changed = True
        return json_bytes(payload) if changed else body

    def checked_completion(self, data: bytes) -> bytes:
        """A successful, non-streamed completion must be a JSON object; else it was no answer.

        In usage mode its ``usage`` settles the charge.
        """
        try:
            reply = json.loads(data)
        except (ValueError, RecursionError):
            reply = None
        if not isinstance(reply, dict):
            raise ProxyError(502, "The model server sent an invalid response.", "upstream_error",
                             "upstream_invalid_response")
        total = reported_usage(reply)
        if self.server.config.cost_mode == "usage" and total is not None and self.charge is not None:
            self.charge.settle(total)
        return data

    def finish_charge(self) -> None:
        """Keep, settle or refund this request's charge; safe to call more than once.

        A client that hangs up after its request reached the upstream pays for what
        it asked for: the reservation, or in usage mode what was generated before it
        left.  One that leaves while still queued pays nothing.  A stream cut short
        from either end is settled the same way: the upstream's usage if it reported
        any, else the prompt plus what was streamed.
        """
        charge = self.charge
        if charge is None:
            return
        if self.client_gone and self.upstream_reached:
            charge.keep()
        usage = self.stream_usage
        if usage is not None and charge.kept:
            if usage.total is not None:
                charge.settle(usage.total)
            elif not self.stream_finished:
                charge.settle(usage.generated_so_far(self.prompt_estimate))
        charge.refund()

    def send_limit_reply(self, kind: str, model: str, stream: bool, admission: Admission) -> None:
        self.limited = True
        text = limit_message(admission)
        headers = rate_limit_headers(admission)
        if self.server.config.limit_response == "error":
            too_large = admission.cost > admission.limit
            self.send_json(400 if too_large else 429, error_body(
                text, "invalid_request_error" if too_large else "rate_limit_exceeded",
                "request_too_large" if too_large else "rate_limit_exceeded"), headers)
        elif stream:
            self.streamed = True
            self.send_bytes(200, headers + [SSE_TYPE, ("Cache-Control", "no-cache")],
                            limit_stream(kind, model, text))
        else:
            self.send_json(200, completion(kind, model, text), headers)

    # -- forwarding ----------------------------------------------------------

    def forward(self, target: Target, body: bytes,
                transform: Callable[[bytes], bytes] | None = None) -> None:
        """Relay one request upstream and its answer back, settling ``self.charge`` on the way.

        ``transform`` sees a successful, non-streamed answer before the client does.
        """
        server = self.server
        headers = dict(copied_headers(self.headers.items(), NOT_FORWARDED_UPSTREAM))
        if server.config.upstream_key:
            headers["Authorization"] = "Bearer " + server.config.upstream_key
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        path = target.upstream_path(server.upstream.target.base_path)
        exchange = UpstreamExchange(server.upstream)
        ticket = Ticket(self.identity, self.policy.max_concurrent)
        # Watched from the moment it queues: a client that leaves while waiting is
        # taken out of the queue and its request never sent.
        self.unwatch = server.watcher.watch(self.connection,
                                            lambda: self.client_left(ticket, exchange))
        try:
            with server.gate.slot(ticket):
                started = time.monotonic()
                try:
                    response = exchange.send(self.command, path, headers, body or None)
                    self.upstream_ms = (time.monotonic() - started) * 1000
                    exchange.completed = self.relay(response, transform)
                except (OSError, http.client.HTTPException) as error:
                    if self.client_gone:
                        raise ClientGone() from None
                    raise upstream_failure(error) from None
        finally:
            self.unwatch()
            self.upstream_reached = exchange.sent
            exchange.finish()

    def client_left(self, ticket: Ticket, exchange: UpstreamExchange) -> None:
        """Called by the disconnect watcher's thread when the client hangs up mid-request."""
        self.client_gone = True
        self.server.gate.withdraw(ticket)
        exchange.abort()

    def relay(self, response: http.client.HTTPResponse,
              transform: Callable[[bytes], bytes] | None) -> bool:
        """Pass the upstream's answer on; True when it was read to its end.

        Event streams, and bodies of unknown length that nothing needs to inspect,
        are relayed as they arrive; everything else is read whole first, so that
        ``transform`` sees it however the upstream framed it.
        """
        headers = copied_headers(response.getheaders(), HOP_BY_HOP | PROXY_RESPONSE_HEADERS)
        sse = response.getheader("Content-Type", "").startswith("text/event-stream")
        if sse or (response.length is None and transform is None and not response.isclosed()):
            return self.relay_stream(response, headers, sse)
        data = read_whole(response, MAX_UPSTREAM_BODY)
        served = response.status < 400
        if served and transform is not None:
            data = transform(data)
        self.settle(served)
        self.send_bytes(response.status, headers + self.meter_headers(), data, reason=response.reason)
        return True

    def settle(self, served: bool) -> None:
        if self.charge is None:
            return
        if served:
            self.charge.keep()
        else:
            self.charge.refund()

    def meter_headers(self) -> list[tuple[str, str]]:
        return self.charge.headers if self.charge is not None else []

    def relay_stream(self, response: http.client.HTTPResponse, headers: list[tuple[str, str]],
                     sse: bool) -> bool:
        """Pass the body on as it arrives; server-sent events go out whole, one write each.

        The charge is kept once anything reached the client; a stream that ends
        before its first complete event counts as never served.
        """
        served = response.status < 400
        self.streamed = sse
        if not served:
            self.settle(False)
        self.start_chunked(response.status, headers + self.meter_headers(), response.reason)
        usage = self.stream_usage if sse and served else None
        pending = b""
        try:
            while True:
                data = response.read1(65536)
                whole_events = sse
                if not data:
                    data, pending = pending, b""  # a last event without its blank line
                    if not data:
                        break
                elif sse and len(pending) + len(data) <= MAX_EVENT_BYTES:
                    pending += data
                    end = sse_event_end(pending)
                    if not end:
                        continue
                    data, pending = pending[:end], pending[end:]
                else:  # not events, or one too large to hold: pass on what there is
                    data, pending, whole_events = pending + data, b"", False
                if usage is not None and whole_events:
                    data = usage.filter(data)
                    if not data:
                        continue
                self.write_chunk(data)
                if served:
                    self.settle(True)
        except (OSError, http.client.HTTPException) as error:
            if self.client_gone:
                raise ClientGone() from None
            log.warning("upstream stream to %s broke off: %s", self.label, type(error).__name__)
            completed = False
            if sse:
                self.write_chunk(b"data: " + json_bytes(upstream_failure(error).body()) + b"\n\n")
            else:  # no final chunk: the client must see the body as cut short
                self.close_connection = True
        else:
            completed = True
        self.stream_finished = completed
        self.finish_charge()
        if completed or sse:
            self.end_chunked()
        return completed

    # -- writing -------------------------------------------------------------

    def response_head(self, status: int, headers: Sequence[tuple[str, str]],
                      reason: str | None = None) -> list[str]:
        self.status = status
        if self.body_pending and self.body_length:
            self.close_connection = True  # an unread body would be taken for the next request
        if reason is None or not _FIELD_VALUE.fullmatch(reason):  # an upstream's could carry a CR
            reason = self.responses.get(status, ("",))[0]
        lines = [f"{self.protocol_version} {status} {reason}", SERVER_HEADER]
        lines.extend(f"{name}: {value}" for name, value in headers)
        lines.extend(f"{name}: {value}" for name, value in CORS_HEADERS)
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")  # an HTTP/1.0 client assumes close otherwise
        return lines

    def send_bytes(self, status: int, headers: Sequence[tuple[str, str]], body: bytes,
                   reason: str | None = None) -> None:
        self.unwatch()  # once the client has its answer it may send the next request at once
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
        self.unwatch()
        if self.chunked and self.command != "HEAD":
            self.write(b"0\r\n\r\n")

    def write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError:
            raise ClientGone() from None

    # -- http.server hooks ---------------------------------------------------

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a request line over 64 KiB, an unknown method) as OpenAI JSON."""
        if not self.command:  # refused before parse_request ran
            self.begin_request()
        kind = "server_error" if code >= 500 else "invalid_request_error"
        self.refuse_request(ProxyError(code, message or self.responses.get(code, ("",))[0], kind))

    def log_message(self, format: str, *args: object) -> None:
        """http.server's own notes (timeouts, bad requests); they never include a key."""
        log.info("%s %s", self.client_address[0], format % args)

    def log_request(self, code: object = "-", size: object = "-") -> None:
        pass  # one line per request is written by log_outcome instead

    def log_outcome(self) -> None:
        """One line per request on the console, and one JSON record for ACCESS_LOG; never a key."""
        status = self.status or (499 if self.client_gone else 0)
        if self.limited:
            outcome = "limited"
        elif status >= 500 or status == 499 or not status:
            outcome = "error"
        else:
            outcome = "rejected" if status >= 400 else "served"
        charge = self.charge
        charged = 0 if charge is None or charge.refunded else charge.admission.cost
        settled = charge.settled if charge is not None and charge.settled is not None else charged
        path = ascii(self.path.partition("?")[0][:200])[1:-1]
        elapsed = (time.monotonic() - self.started) * 1000
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
        self.server.console.write(
            f"{stamp} INFO {self.client_address[0]} {self.label} {self.command} {path} {status} "
            f"{outcome} {elapsed:.1f}ms charged={charged} settled={settled}\n")
        if self.server.access_log is not None:
            arrived = self.arrived
            self.server.access_log.write(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(arrived))
                + f".{int(arrived % 1 * 1000):03d}Z", "key": self.label,
                "ip": self.client_address[0], "method": self.command, "path": path,
                "model": self.model, "status": status, "stream": self.streamed,
                "tokens_charged": charged, "tokens_settled": settled,
                "duration_ms": round(elapsed, 1), "upstream_ms": None if self.upstream_ms is None
                else round(self.upstream_ms, 1), "outcome": outcome}, separators=(",", ":")) + "\n")


def _nothing() -> None:
    pass


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
        head = (f"HTTP/1.1 503 Service Unavailable\r\n{SERVER_HEADER}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            request.setblocking(False)
            request.sendall(head.encode() + body)  # fits an empty send buffer: never blocks
            request.recv(65536)  # drop what the client already sent, so closing sends FIN, not RST
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

    def handle_error(self, request: socket.socket, client_address: tuple) -> None:
        """A connection that broke outside a request (a reset while idle, say): one line, no trace."""
        error = sys.exc_info()[1]
        log.info("%s connection ended: %s", client_address[0], type(error).__name__)

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


class BackgroundLog:
    """Hands a logger's records to a thread of its own, which does the writing.

    A handler writes while holding its lock; with many request threads, every
    one of them would queue behind each write.  Putting a record on a queue
    costs no system call and holds no lock that a write holds.
    """

    def __init__(self, logger: logging.Logger, handler: logging.Handler) -> None:
        self.logger = logger
        self.target = handler
        records: queue.SimpleQueue = queue.SimpleQueue()
        self.handler = QueueHandler(records)
        self.listener = QueueListener(records, handler)
        self.listener.start()
        logger.addHandler(self.handler)

    def close(self) -> None:
        """Write out what is queued, then stop."""
        self.logger.removeHandler(self.handler)
        self.listener.stop()
        self.target.close()


class LineWriter:
    """Writes lines to a stream from a thread of its own, a batch every 0.1 s.

    Request threads only append to a deque: no lock held across a write, no
    system call and no thread woken per line.  The per-request log lines go
    this way; the ``logging`` module, at a few times the cost, keeps the rest.
    """

    def __init__(self, stream: TextIO, owns_stream: bool = False, interval: float = 0.1) -> None:
        self._stream = stream
        self._owns_stream = owns_stream
        self._interval = interval
        self._lines: deque[str] = deque()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="line-writer", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        self._lines.append(line)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.flush()

    def flush(self) -> None:
        batch = []
        with suppress(IndexError):
            while True:
                batch.append(self._lines.popleft())
        if batch:
            try:
                self._stream.write("".join(batch))
                self._stream.flush()
            except (OSError, ValueError) as error:  # a full disk or closed console stops no request
                log.error("cannot write the request log: %s", type(error).__name__)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()
        self.flush()
        if self._owns_stream:
            self._stream.close()


def open_access_log(path: str) -> LineWriter:
    try:
        return LineWriter(open(path, "a", encoding="utf-8"), owns_stream=True)
    except OSError as error:
        raise ConfigError(f"ACCESS_LOG {path}: cannot open it ({error.strerror})") from None


def write_atomically(path: str, data: bytes) -> None:
    """Write a file so that a crash leaves either the old or the new version, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=".llm_proxy-", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise
    directory_descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_descriptor)  # make the rename itself durable
    finally:
        os.close(directory_descriptor)


class ProxyServer(TrackedServer):
    """The proxy: keys, buckets, the fair gate and the upstream pool, plus housekeeping.

    A housekeeping thread re-reads KEYS_FILE when it changes, forgets full
    buckets and saves the rest to STATE_FILE every STATE_SAVE_SECONDS.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, console: TextIO | None = None) -> None:
        if not config.upstream_url:
            raise ConfigError("BASE_API_URL is not set: point it at the model server, "
                              "e.g. http://127.0.0.1:8080/v1 (or run with --demo)")
        self.config = config
        self.max_connections = config.max_connections
        self.wall_clock = wall_clock
        self.keyring = KeyRing(config)
        self.buckets = BucketStore(clock)
        self.gate = FairGate(config.upstream_max_concurrent, config.queue_timeout)
        self.upstream = UpstreamPool(UpstreamTarget.parse(config.upstream_url),
                                     config.open_timeout, config.read_timeout)
        if config.state_file:
            self.load_state()
        self.access_log = open_access_log(config.access_log) if config.access_log else None
        try:
            super().__init__((config.host, config.port), ProxyHandler)
        except OSError:
            if self.access_log is not None:
                self.access_log.close()
            raise
        self.console = LineWriter(sys.stderr if console is None else console)
        self.watcher = DisconnectWatcher()
        self._reading: dict[socket.socket, float] = {}  # connection -> when its request must be in
        self._wake = threading.Event()
        self._closing = False
        self._reload_requested = False
        self._housekeeper = threading.Thread(target=self._housekeeping, name="housekeeping",
                                             daemon=True)
        self._housekeeper.start()

    # -- housekeeping ----------------------------------------------------------

    def expect_request_by(self, connection: socket.socket, deadline: float) -> None:
        """The connection's request head and body must have arrived by ``deadline``."""
        self._reading[connection] = deadline

    def request_arrived(self, connection: socket.socket) -> None:
        self._reading.pop(connection, None)

    def drop_slow_requests(self) -> None:
        """End connections whose request is still trickling in after CLIENT_TIMEOUT.

        The socket timeout alone bounds each read, not the whole request: a client
        sending one byte a minute would otherwise hold its thread for ever.
        """
        now = time.monotonic()
        for connection, deadline in list(self._reading.items()):
            if deadline < now and self._reading.pop(connection, None) is not None:
                with suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def request_reload(self) -> None:
        """Re-read KEYS_FILE soon (SIGHUP); safe to call from a signal handler."""
        self._reload_requested = True
        self._wake.set()

    def _housekeeping(self) -> None:
        next_tidy = time.monotonic() + self.config.state_save_interval
        while True:
            self._wake.wait(min(1.0, self.config.state_save_interval))
            self._wake.clear()
            if self._closing:
                return
            forced, self._reload_requested = self._reload_requested, False
            self.keyring.reload_if_changed(force=forced)
            self.drop_slow_requests()
            if time.monotonic() >= next_tidy:
                self.tidy()
                next_tidy = time.monotonic() + self.config.state_save_interval

    def tidy(self) -> None:
        """Forget buckets that are full again, then save the others if STATE_FILE is set."""
        self.buckets.prune(lambda identity: self.keyring.policy_of(identity).buckets)
        if self.config.state_file:
            self.save_state()

    def save_state(self) -> None:
        path = self.config.state_file
        assert path is not None
        state = {"version": 1, "saved_at": self.wall_clock(),
                 "buckets": self.buckets.dump(self.wall_clock)}
        try:
            write_atomically(path, json_bytes(state))
        except OSError as error:
            log.error("STATE_FILE %s: cannot save (%s)", path, error.strerror)

    def load_state(self) -> None:
        """Restore saved buckets; a missing or broken file means starting clean, said once."""
        path = self.config.state_file
        try:
            with open(path, "rb") as file:
                state = json.loads(file.read())
            if state.get("version") != 1:
                raise ValueError("unknown version")
            self.buckets.load(state["buckets"], self.wall_clock)
        except FileNotFoundError:
            log.info("STATE_FILE %s: not found; every bucket starts full", path)
        except (OSError, ValueError, ArithmeticError, RecursionError, KeyError, TypeError,
                AttributeError) as error:
            log.error("STATE_FILE %s: unreadable (%s); every bucket starts full",
                      path, type(error).__name__)
        else:
            log.info("STATE_FILE %s: restored %d callers' buckets", path, len(self.buckets))

    def server_close(self) -> None:
        """Stop everything, then save the buckets a last time."""
        self._closing = True
        self._wake.set()
        self._housekeeper.join()
        super().server_close()
        self.watcher.close()
        self.upstream.close()
        if self.config.state_file:
            self.tidy()
        self.console.close()
        if self.access_log is not None:
            self.access_log.close()


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

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

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
    keys = ("open (no client keys)" if server.keyring.is_open
            else f"{server.keyring.key_count} client keys")
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
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.setLevel(logging.INFO)
    background = BackgroundLog(log, console)
    try:
        return run(args, environ)
    finally:
        background.close()


def run(args: argparse.Namespace, environ: dict[str, str] | None) -> int:
    """Configure, start and serve until Ctrl-C or SIGTERM; 2 when the configuration is bad."""
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
    signal.signal(signal.SIGTERM, _interrupt)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: server.request_reload())
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop cleanly, saving state
        pass
    finally:
        server.server_close()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _demo_config(config: Config, echo_port: int, environ: dict[str, str]) -> Config:
    """Point the proxy at the echo model; listen on loopback unless HOST says otherwise."""
    host = config.host if environ.get("HOST") else "127.0.0.1"
    return replace(config, host=host, upstream_url=f"http://127.0.0.1:{echo_port}/v1",
                   upstream_key=None, upstream_model=config.upstream_model or "echo")


def demo_key(config: Config) -> str:
    """A key the demo's curl line can use: any key in open mode, else the first configured one."""
    if config.client_keys:
        return config.client_keys[0]
    return "<a key from your KEYS_FILE>" if config.keys_file else "demo-key"


def _print_demo_help(server: ProxyServer) -> None:
    port = server.server_address[1]
    print(f"""
demo mode: the upstream is a built-in echo model. Try, in another terminal:
  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Authorization: Bearer {demo_key(server.config)}' \\
       -H 'Content-Type: application/json' -d '{{"messages":[{{"role":"user","content":"hello"}}]}}'
Add "stream": true to see tokens arrive; repeat {server.config.max_tokens + 1} times to see the limit reply.
""", flush=True)


if __name__ == "__main__":
    sys.exit(main())
