#!/usr/bin/env python3
"""llm_proxy: share one local model server (or a paid API) fairly and safely.

Every caller (an API key, or a person behind a shared chat app) has refillable
windows of tokens or requests; while they can pay, requests go to the upstream
(llama.cpp server, Ollama, vLLM, LM Studio ...); when they cannot, the caller gets
an ordinary assistant reply, "limit reached, wait N min", in its API's own shape.
Settings come from environment variables (``python3 llm_proxy.py --help``);
``python3 llm_proxy.py --demo`` runs without a model server.  Standard library
only, Python 3.9 or newer.

The map: the sections in the order they appear, from the entry down to the sockets.

Main            ``main`` and ``run``: parse, start, serve until a signal.
Configuration   ``SETTINGS`` and ``Config``: what the environment says, checked once.

The domain, no sockets:
Buckets         ``BucketSpec`` (a window), ``BucketStore`` (every caller's levels, one
                short lock; ``WindowCost``: the hard cap cuts the output allowance to
                what the windows hold), ``Charge`` (one request's payment: reserved,
                then kept, settled or refunded).
Units           ``Unit`` (what a window counts: requests, tokens, ``MoneyUnit``),
                ``CostMode`` (TOKEN_COST_MODE), ``CallCost`` and ``window_costs``: what
                a call costs each window.
Cost            ``prompt_tokens``, ``Usage`` (in the parts a price needs) and ``Meter``
                (what an answer used, read on its way through).
Stream framings Server-sent events and JSON lines, cut into whole events.
Request bodies  ``request_object`` and ``check_body``: a body parsed once, strictly;
                what is forwarded is that parse (``body_bytes``).
Dialects        One ``Dialect`` per API (chat, completions, Responses, Messages,
                Ollama, embeddings): validation, allowance, usage, replies, errors.
Prices          ``ModelCatalog`` (MODELS_FILE: currency, each model's ``Price`` and
                ``max_output``), ``ModelsFile`` (re-read on change, the last good kept).
Keys and        ``KeyRing`` finds the caller's ``Policy`` (models, windows, an app's
policies        end users, ``UserSpec``); ``StoredAnswers`` keeps whose answer is whose.

The HTTP front:
Routes          ``ROUTES`` and ``route_for``: every path, whether it needs a key, its
                dialect, the endpoint group a key lists it by, and which handler
                method answers it.
Errors, paths,  ``ProxyError``, ``parse_target``, the strict header reader and the
headers         lists of headers never forwarded.
Replies, Calls  ``limit_answer`` (``wait_phrase``) and the rate-limit headers; ``Call``,
                one request's state, from its arrival to its log line (and ``cost``).
                What a call takes (its charge, upstream connection, gate slot) is
                registered with ``Call.on_end`` and let go by ``Call.end``, once, by
                whoever finishes the call: the handler's thread, or the connection loop.
Handler         ``ProxyHandler``: HTTP/1.1 framing, then ``route`` and the
                ``answer_<name>`` methods, ``handle_metered`` (charge, forward,
                settle) and the writing of answers.

The upstream client and concurrency:
Sockets         ``TimedSocket`` and ``SocketReader``: timeouts the kernel keeps, a
                buffer in view.
Upstream        ``UpstreamRegistry`` (from BASE_API_URL and MODELS_FILE's ``upstreams``,
                ``parse_upstreams``) names a model's ``ModelRoute``: its replicas, each
                an ``Upstream`` (pool, fair gate, state), in the order to try them, and
                probes those that are down; ``FairGate`` takes turns by key and user;
                ``DisconnectWatcher`` notices callers that hang up.
Relay           ``Relay`` sends a call through a replica's gate (the next replica if
                one fails before any byte went out) and relays the answer, whole or
                event by event (``EventPump``).
Connection loop ``ConnectionLoop`` holds idle connections and relays streams without
                a thread (``RelayedStream``); ``Workers`` keeps threads for reuse.

The owner's side:
Owner's view    ``UsageBook`` (history by day and model, with cost), ``Metrics``
                (Prometheus), ``AdminView`` (the admin API, the CSV export) and the
                dashboard page.
Alerts          ``AlertWatch`` (which windows passed ALERT_THRESHOLDS) and
                ``AlertSender`` (the webhook's own thread).
Server          ``TrackedServer`` (connection caps) and ``ProxyServer``, which builds
                the rest and keeps house (keys file, state file, slow requests).
Demo model      An echo server that speaks every API, for ``--demo`` and the tests.
Keys command    ``llm_proxy.py keys ...``: edit KEYS_FILE without touching its JSON.

``docs/ARCHITECTURE.md`` says how to add an API, a unit or a model server.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import concurrent.futures
import copy
import csv
import difflib
try:
    import fcntl
except ImportError:  # Windows: keys edits are not locked there
    fcntl = None  # type: ignore[assignment]
import datetime
import errno
import fnmatch
import functools
import hashlib
import hmac
import http.client
import io
import ipaddress
import json
import logging
import math
import operator
import queue
import os
import re
try:
    import resource
except ImportError:  # Windows: no limit on descriptors to read or raise
    resource = None  # type: ignore[assignment]
import secrets
import select
import selectors
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections import Counter, OrderedDict, deque
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from logging.handlers import QueueHandler, QueueListener
from typing import BinaryIO, Callable, Iterator, Mapping, NamedTuple, Sequence, TextIO, TypeVar

__version__ = "1.0.0"

log = logging.getLogger("llm_proxy")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def describe(config: Config, server: ProxyServer) -> str:
    host, port = config.host, server.server_address[1]
    limits = (f"{config.max_tokens} tokens, +{config.refill_tokens} every "
              f"{config.refill_interval:g}s, cost mode {config.cost_mode}")
    keys = ("open (no client keys)" if server.keyring.is_open
            else f"{server.keyring.key_count} client keys")
    upstreams = server.upstreams.describe()  # (never a key)
    return (f"llm_proxy {__version__} listening on http://{host}:{port} -> "
            f"{upstreams}; default buckets: {limits}; {keys}")


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="OpenAI-compatible proxy with a refillable token bucket per API key.",
        epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true",
                        help="use a built-in echo model as the upstream (no model server needed)")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", metavar="keys ...")
    keys = commands.add_parser("keys", help="add, list, disable, enable or remove client keys in KEYS_FILE")
    keys.add_argument("--file", help="the keys file (default: KEYS_FILE)")
    actions = keys.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="create a key for NAME; prints it once, stores only its SHA-256")
    add.add_argument("name")
    add_key_options(add, "email")
    roster = actions.add_parser("import", help="a key for each name of a CSV roster, written to --out")
    roster.add_argument("roster", help="CSV with a 'name' column (and an optional 'email')")
    roster.add_argument("--out", required=True, help="new file for the name,key lines (mode 0600)")
    add_key_options(roster)
    actions.add_parser("list", help="names, limits, state and expiry (never keys)")
    change = actions.add_parser("set", help="change NAME's limits; what it spent still counts")
    change.add_argument("name")
    add_key_options(change, "email", "window")
    topup = actions.add_parser("topup", help="raise a window's limit by AMOUNT, keeping what was spent")
    topup.add_argument("name")
    topup.add_argument("amount", type=float)
    topup.add_argument("--window", help=WINDOW_OPTION[1])
    actions.add_parser("rotate", help="a new key for NAME, keeping its balance and history; "
                       "the old key stops working").add_argument("name")
    for action in ("disable", "enable", "remove"):
        actions.add_parser(action, help=f"{action} the key named NAME").add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "keys":
        return keys_command(args, dict(os.environ if environ is None else environ))
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
        server = ProxyServer(config, environ=environ)
    except ConfigError as error:
        print(f"llm_proxy: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"llm_proxy: cannot listen on {config.host}:{config.port}: {error.strerror}",
              file=sys.stderr)
        return 2
    # Before the listening line: a SIGTERM sent as soon as it appears (a service manager, a
    # test) must stop the server cleanly, its log written out, not kill it where it stands.
    signal.signal(signal.SIGTERM, _interrupt)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: server.request_reload())
    try:
        for warning in startup_warnings(config, server.keyring) + server.fit_to_descriptor_limit():
            log.warning("%s", warning)
        print(describe(config, server), flush=True)
        if args.demo:
            _print_demo_help(server)
        return_freed_memory()
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


def return_freed_memory() -> None:
    """Give the pages freed since startup back to the system (glibc only), before serving.

    Imported from source (``python -m llm_proxy`` where no cached ``.pyc`` can be written),
    the module's syntax tree is freed once compiled, but between live objects, where glibc's
    automatic trim (top of the heap only) cannot return it; malloc_trim returns every free
    page. Run as a script, CPython keeps that tree alive while the script runs, so there is
    little to return. Elsewhere (musl, macOS) there is no malloc_trim and nothing is done.
    """
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

class ConfigError(ValueError):
    """A setting is invalid; the message names the variable, for one clear line."""


MAX_WINDOW_TOKENS = 10 ** 15  # counts stay exact through the refill arithmetic's floats (2**53)
MIN_REFILL_SECONDS = 0.001     # shorter means nothing, and the tiniest overflow the count of steps
MAX_REFILL_SECONDS = 100 * 366 * 86400.0  # a century: "never refills", with the sums still finite


def _integer(name: str, text: str, minimum: int = 0, maximum: int | None = MAX_WINDOW_TOKENS) -> int:
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
    if not MIN_REFILL_SECONDS <= value <= MAX_REFILL_SECONDS:  # (NaN is neither)
        raise ConfigError(f"{name} must be a number of seconds from {MIN_REFILL_SECONDS:g} to "
                          f"{MAX_REFILL_SECONDS:.0f} (a century), got {text!r}")
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


def _flag(name: str, text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"{name} must be true or false; got {text!r}")
    return text.lower() in ("true", "1")


def _key_header(name: str, text: str) -> str:
    return key_header_style(text, name)


def _key_list(name: str, text: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in text.split(",") if key.strip())


def _webhook_url(name: str, text: str) -> str:
    """An http(s) URL; the message never repeats it, for it is a secret (a hook's token)."""
    try:
        parts = urllib.parse.urlsplit(text)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (
            parts.port is None or parts.port > 0) and text.isprintable() and " " not in text
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"{name} must be an http:// or https:// URL (its value is not shown: "
                          "a webhook's URL is a secret)")
    return text


def _percentages(name: str, text: str) -> tuple[float, ...]:
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        values = []
    if not values or not all(0 < value <= 1000 for value in values):  # (NaN is neither)
        raise ConfigError(f"{name} must be percentages above 0 separated by commas, "
                          f"e.g. 80,100; got {text!r}")
    return tuple(int(value) if value.is_integer() else value for value in values)


SETTINGS: tuple[Setting, ...] = (
    Setting(("HOST",), "host", "address to listen on"),
    Setting(("PORT",), "port", "port to listen on", _port),
    Setting(("UPSTREAM_BASE_URL", "BASE_API_URL", "base_api_url"), "upstream_url",
            "upstream base URL including /v1, e.g. http://127.0.0.1:8080/v1 (required)"),
    Setting(("UPSTREAM_API_KEY", "BASE_API_KEY", "base_api_key"), "upstream_key",
            "key sent upstream as 'Authorization: Bearer ...' (or in the header "
            "UPSTREAM_API_KEY_HEADER names); never shown to clients"),
    Setting(("UPSTREAM_API_KEY_HEADER",), "upstream_key_header",
            "how that key goes upstream: 'authorization' (Authorization: Bearer KEY), "
            "'x-api-key' (x-api-key: KEY, Anthropic's API) or 'api-key' (api-key: KEY, Azure OpenAI)",
            _key_header),
    Setting(("UPSTREAM_CA_FILE",), "upstream_ca_file",
            "PEM file of CA certificates trusted for an https upstream besides the system's "
            "(a private CA); checked at startup"),
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
    Setting(("MODELS_FILE",), "models_file",
            "JSON file of model prices (per million tokens) and output limits, for money windows, "
            "and of the model servers ('upstreams') that serve each model; re-read on change or "
            "SIGHUP (see docs/BUDGETS.md, docs/UPSTREAMS_MANY.md)"),
    Setting(("DEFAULT_MAX_OUTPUT_TOKENS",), "default_max_output",
            "output allowance written into a request that sets none, where a window caps it "
            "(unless MODELS_FILE gives the model's max_output)", _positive),
    Setting(("OVERDRAFT",), "overdraft",
            "'true': windows that do not say otherwise reserve little and may go into debt "
            "(the hard cap off: for agents on a refilling local model)", _flag),
    Setting(("MIN_OUTPUT_TOKENS",), "min_output",
            "the shortest answer worth sending when a window can pay for no more; below it, "
            "the limit reply", _positive),
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
    Setting(("PRIORITY_MAX_WAIT_SECONDS",), "priority_max_wait",
            "a queued request of a lower keys-file priority waiting this long takes turns with "
            "the highest (keep it below QUEUE_TIMEOUT_SECONDS)", _seconds),
    Setting(("STATE_FILE",), "state_file",
            "file where bucket levels survive restarts (saved every STATE_SAVE_SECONDS and at exit)"),
    Setting(("STATE_SAVE_SECONDS",), "state_save_interval", "seconds between state saves", _seconds),
    Setting(("ACCESS_LOG",), "access_log", "file that gets one JSON line per request (never prompts)"),
    Setting(("ADMIN_KEY",), "admin_key",
            "turns on /admin (dashboard), /admin/api/usage and /metrics, which need it as a Bearer key"),
    Setting(("ALERT_WEBHOOK_URL",), "alert_webhook_url",
            "URL that gets a JSON POST (Slack, Mattermost, Discord ...) when a window passes an "
            "alert threshold; a secret, never logged in full", _webhook_url),
    Setting(("ALERT_THRESHOLDS",), "alert_thresholds",
            "percentages of any window's capacity, used, that send an alert", _percentages),
    Setting(("OPEN_TIMEOUT",), "open_timeout", "seconds to connect to the upstream", _seconds),
    Setting(("READ_TIMEOUT",), "read_timeout", "seconds to wait on the upstream", _seconds),
    Setting(("MAX_BODY_BYTES",), "max_body_bytes", "largest request body accepted", _positive),
    Setting(("CLIENT_TIMEOUT",), "client_timeout", "seconds a silent client may hold a connection",
            _seconds),
    Setting(("MAX_CONNECTIONS",), "max_connections",
            "simultaneous client connections; more get a fast 503", _positive),
    Setting(("MAX_CONNECTIONS_PER_CLIENT",), "max_connections_per_client",
            "simultaneous connections from one client address; more get the same fast 503; "
            "unset = half of MAX_CONNECTIONS, 0 = no cap per address (behind a reverse proxy "
            "every caller comes from its address: raise or disable it there)", _non_negative),
)


@dataclass(frozen=True)
class Config:
    """Everything the proxy reads from its environment, validated once at startup."""

    host: str = "0.0.0.0"
    port: int = 8899
    upstream_url: str | None = None
    upstream_key: str | None = None
    upstream_key_header: str = "authorization"
    upstream_ca_file: str | None = None
    upstream_model: str | None = None
    max_tokens: int = 10
    refill_tokens: int = 2
    refill_interval: float = 300.0
    request_cost: int = 1
    cost_mode: str = "request"
    response_reserve: int = 256
    models_file: str | None = None
    default_max_output: int = 4096
    min_output: int = 16
    overdraft: bool = False
    client_keys: tuple[str, ...] = ()
    keys_file: str | None = None
    limit_response: str = "message"
    upstream_max_concurrent: int = 0
    max_concurrent_per_key: int = 0
    queue_timeout: float = 30.0
    priority_max_wait: float = 10.0
    state_file: str | None = None
    state_save_interval: float = 5.0
    access_log: str | None = None
    admin_key: str | None = None
    alert_webhook_url: str | None = None
    alert_thresholds: tuple[float, ...] = (80, 100)
    open_timeout: float = 10.0
    read_timeout: float = 120.0
    max_body_bytes: int = 10 * 1024 * 1024
    client_timeout: float = 60.0
    max_connections: int = 1024
    max_connections_per_client: int | None = None  # None: half of max_connections, as fitted
    near_misses: tuple[tuple[str, str], ...] = ()  # (variable set, setting meant): names, never values

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> Config:
        values = {setting.attribute: setting.read(environ) for setting in SETTINGS}
        return cls(**{name: value for name, value in values.items() if value is not None},
                   near_misses=near_miss_settings(environ))

    @property
    def bucket(self) -> BucketSpec:
        return BucketSpec(self.max_tokens, self.refill_tokens, self.refill_interval,
                          overdraft=self.overdraft)

    @functools.cached_property
    def mode(self) -> CostMode:
        """TOKEN_COST_MODE as objects: the one place its name is read."""
        return cost_mode(self)


SETTING_NAMES = frozenset(name for setting in SETTINGS for name in setting.names)
# Each setting's name in upper case -> that name as read (BASE_API_URL, not base_api_url)
SETTINGS_BY_UPPER = {name.upper(): name for name in sorted(SETTING_NAMES, reverse=True)}
NEAR_MISS_CUTOFF = 0.8  # difflib's ratio: MAX_TOKEN/MAX_TOKENS 0.95, ADMIN_API_KEY/ADMIN_KEY 0.82


def near_miss_settings(environ: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Variables that are set, are not settings, and look like one: (variable, setting), sorted.

    Why: a misspelt setting is silently ignored, so ``ADMIN_API_KEY=...`` leaves the
    dashboard off and ``MAX_TOKEN=20000`` leaves every bucket at 10, with nothing in the
    log to say why.  A name counts when difflib's ratio to a setting's name, compared in
    upper case (``max_tokens`` is not read either), is at least ``NEAR_MISS_CUTOFF``;
    that cutoff keeps clear of the variables a shell, systemd or Docker set (``HOME``,
    ``PATH``, ``HOSTNAME``, ``KUBERNETES_PORT`` ... all score 0.67 or less).  An empty
    value counts as unset, as it does for the settings.  Only names are kept: the value
    may be a key.
    """
    found = []
    for variable, value in environ.items():
        if variable in SETTING_NAMES or not value.strip():
            continue
        close = difflib.get_close_matches(variable.upper(), SETTINGS_BY_UPPER, n=1, cutoff=NEAR_MISS_CUTOFF)
        if close:
            found.append((variable, SETTINGS_BY_UPPER[close[0]]))
    return tuple(sorted(found))


def settings_help() -> str:
    defaults = {f.name: f.default for f in fields(Config)}
    lines = ["environment variables (an empty value counts as unset; of several names, the "
             "first one set wins):"]
    for setting in SETTINGS:
        names = " / ".join(setting.names)
        default = defaults[setting.attribute]
        shown = "unset" if default in (None, ()) else f"{default:g}" if isinstance(default, float) else (
            ",".join(map(str, default)) if isinstance(default, tuple) else default)
        lines.append(f"  {names}\n      {setting.help} (default: {shown})")
    return "\n".join(lines)


def startup_warnings(config: Config, keyring: KeyRing | None = None) -> list[str]:
    """Problems that do not stop the proxy but would surprise its owner.

    Among them, one line per variable that looks like a misspelt setting
    (``near_miss_settings``), naming it and the setting it probably means, never its value.
    MAX_TOKENS is judged only where a key pays under it (``uses_environment_limits``):
    a keys file whose every key sets its own windows makes it moot.
    """
    warnings = []
    mode = config.mode
    if mode.least > config.max_tokens and (keyring is None or keyring.uses_environment_limits()):
        warnings.append(
            f"a request without max_tokens costs at least {mode.least} tokens but MAX_TOKENS is "
            f"{config.max_tokens}: such requests can never be served; raise MAX_TOKENS "
            f"(or lower {mode.least_setting})")
    if not (config.client_keys or config.keys_file) and not _is_loopback(config.host):
        warnings.append(
            f"no PROXY_API_KEYS or KEYS_FILE and listening on {config.host}: anyone who can reach this port can "
            "use the model, and per-key or per-IP buckets are the only limit (a caller picks "
            "its own bucket by picking a key)")
    if (config.upstream_ca_file and not config.models_file  # (the file's servers may be https)
            and not (config.upstream_url or "").startswith("https:")):
        warnings.append("UPSTREAM_CA_FILE is set but the upstream is not https: it is not used")
    for variable, setting in config.near_misses:
        warnings.append(f"{variable} is set, but llm_proxy reads no such variable: "
                        f"did you mean {setting}? (see --help)")
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
    unit: str = ""                         # "requests", "tokens", "money", or "": the cost mode's own
    period: str | None = None              # "day", "week", "month": full again at each start;
                                           # "total": never refills (a budget)
    models: tuple[str, ...] | None = None  # the window counts only requests for these models
    overdraft: bool = False                # reserve little and let usage go into debt (no hard cap)
    when_limited: str | None = None        # the model that serves a call this window cannot pay

    @property
    def refills(self) -> bool:
        return self.period != TOTAL

    @property
    def counts_money(self) -> bool:
        """Its amounts are nano-units of the currency, shown in the currency (a money window).

        Asked here, of the window, so that nothing else compares unit names."""
        return self.unit == MONEY


PERIOD_DAYS = {"day": 1, "week": 7, "month": 31}  # the longest length, for headers
TOTAL = "total"  # the period of a window that never refills


def period_bounds(wall: float, period: str) -> tuple[float, float]:
    """The wall-clock start and end of the local calendar day, week (from Monday) or month."""
    day = datetime.date.fromtimestamp(wall)
    if period == "day":
        start, end = day, day + datetime.timedelta(days=1)
    elif period == "week":
        start = day - datetime.timedelta(days=day.weekday())
        end = start + datetime.timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (start + datetime.timedelta(days=32)).replace(day=1)
    return _midnight(start), _midnight(end)


def _midnight(day: datetime.date) -> float:
    """Local midnight at the start of ``day`` (TZ honoured, daylight saving included)."""
    return time.mktime((day.year, day.month, day.day, 0, 0, 0, 0, 0, -1))


class Bucket:
    """A level and the time of its last refill step (on the store's monotonic clock).

    The level may go below zero in usage mode, when a request used more than
    its reservation: that debt is repaid by refills before the next request.
    """

    __slots__ = ("tokens", "step_at", "capacity", "window")

    def __init__(self, tokens: int, step_at: float, capacity: int | None = None,
                 window: tuple | None = None) -> None:
        self.tokens = tokens
        self.step_at = step_at
        self.capacity = capacity  # the limit the level was last counted against (None: not known)
        self.window = window      # which of the policy's windows it is (window_keys; None: not known)

    def resize(self, capacity: int) -> None:
        """The window's limit changed: the level moves by as much, so what was spent stays spent.

        Raising a limit then serves a blocked caller at once (a top-up), and lowering
        it takes the difference (below zero if more was spent than the new limit).
        A level restored without its limit (an older state file) is kept as it was.
        """
        if self.capacity is not None:
            self.tokens += capacity - self.capacity
        self.capacity = capacity

    def refill(self, spec: BucketSpec, now: float, offset: float = 0.0) -> None:
        """Add one refill per whole interval elapsed; the step clock moves by whole steps only.

        A calendar window is full again from the start of each period instead;
        ``offset`` turns the store's monotonic clock into wall-clock time.
        """
        if self.capacity != spec.capacity:
            self.resize(spec.capacity)
        if spec.period == TOTAL:
            self.tokens = min(self.tokens, spec.capacity)  # (the policy may have shrunk)
            return
        if spec.period is not None:
            start = period_bounds(now + offset, spec.period)[0] - offset
            if self.step_at < start:
                self.tokens, self.step_at = spec.capacity, start
            elif self.tokens > spec.capacity:
                self.tokens = spec.capacity
            return
        steps = int((now - self.step_at) // spec.interval)
        if steps > 0:
            self.tokens = min(spec.capacity, self.tokens + steps * spec.refill_tokens)
            self.step_at += steps * spec.interval
        elif self.tokens > spec.capacity:  # the policy shrank
            self.tokens = spec.capacity

    def seconds_until(self, spec: BucketSpec, tokens: int, now: float, offset: float = 0.0) -> float:
        """Seconds until the level reaches ``tokens`` (0 if it already has; infinity: never)."""
        missing = tokens - self.tokens
        if missing <= 0:
            return 0.0
        if spec.period == TOTAL:
            return math.inf
        if spec.period is not None:
            return period_bounds(now + offset, spec.period)[1] - offset - now
        steps = math.ceil(missing / spec.refill_tokens)
        return self.step_at + steps * spec.interval - now


class Admission(NamedTuple):
    """The outcome of one charge: what the rate-limit headers and limit reply report.

    A named tuple, not a frozen dataclass: one is made per request, and a frozen
    dataclass sets each field through ``object.__setattr__``.
    """

    allowed: bool
    cost: int
    limit: int
    remaining: int
    wait_seconds: float
    refill_tokens: int
    refill_seconds: float
    window: str = ""
    costs: tuple[tuple[int, ...], ...] = ()  # what each payer's each window was charged
    allowance: int | None = None  # output tokens an answer may take, as the capping windows can pay
    waits: bool = False   # refused only for what the same caller's requests in flight hold
    unit: str = ""        # the named window's unit ("money": amounts in nano-units of the currency)

    @property
    def counts_money(self) -> bool:
        return self.unit == MONEY
    held: tuple[tuple[int, ...], ...] = ()  # of ``costs``, what may come back when they settle
    spec: BucketSpec | None = None  # the named window itself (its when_limited, its owner)


NANOS = 10 ** 9  # money is counted in nano-units of the currency: bucket levels stay whole numbers


class WindowCost(NamedTuple):
    """What one call costs one window, as a function of the output allowance it is granted.

    ``fixed`` whatever the answer (the prompt, a request); ``per_output`` for each
    output token allowed, which only a capping window counts: there the allowance
    is cut to what the window holds.  ``returns``: what is not used comes back when
    the call settles, so a request refused for it may wait for the caller's others.
    """

    fixed: int
    per_output: float = 0.0
    returns: bool = False

    def at(self, allowance: int) -> int:
        return self.fixed + math.ceil(self.per_output * allowance) if self.per_output else self.fixed

    def most(self, level: int) -> int:
        """The largest allowance whose cost ``level`` can pay (negative: not even none)."""
        if level < self.fixed:
            return -1
        allowance = int((level - self.fixed) // self.per_output)
        while allowance > 0 and self.at(allowance) > level:  # (float rounding)
            allowance -= 1
        return allowance


class Allowance(NamedTuple):
    """The output allowance a call asks for per answer, and the least worth forwarding."""

    asked: int
    least: int


NO_ALLOWANCE = Allowance(0, 0)


def _tightness(row: tuple[Bucket, BucketSpec, int, float]) -> tuple:
    """Which window a limit reply names: one too small, else the one blocking longest, else
    the one nearest empty (among those this request counts in)."""
    bucket, spec, amount, wait = row
    return (amount > spec.capacity, wait, amount > 0, -bucket.tokens)


def window_text(spec: BucketSpec) -> str:
    """A window in a few words, for ``keys list``: ``course 1 money total``, ``daily 20000 +20000/86400s``."""
    name = spec.name + " " if spec.name else ""
    size = amount_text(spec.capacity) + " money" if spec.counts_money else str(spec.capacity)
    step = amount_text(spec.refill_tokens) if spec.counts_money else spec.refill_tokens
    refill = f"+{step}/{spec.interval:g}s" if spec.refills else "total"
    return f"{name}{size} {refill}" + (" overdraft" if spec.overdraft else "")


def level_view(spec: BucketSpec, tokens: int, next_refill: float, to_full: float) -> dict:
    """One window as the quota and the admin API show it.

    A window that never refills shows null refill times, never astronomical
    numbers; a money window shows amounts in its currency, with what was spent.
    """
    money = spec.counts_money
    amount = (lambda value: value / NANOS) if money else (lambda value: value)
    view = {"name": spec.name, "capacity": amount(spec.capacity), "tokens": amount(tokens),
            "refill_tokens": amount(spec.refill_tokens),
            "refill_interval_seconds": spec.interval if spec.refills else None,
            "unit": spec.unit or None, "period": spec.period,
            "models": None if spec.models is None else list(spec.models),
            "seconds_to_next_refill": round(next_refill, 3) if spec.refills else None,
            "seconds_to_full": round(to_full, 3) if math.isfinite(to_full) else None}
    if money:
        view.update(remaining=amount(tokens), spent=amount(spec.capacity - tokens))
    if spec.overdraft:
        view["overdraft"] = True
    return view


class BucketStore:
    """All buckets, keyed by identity; one short lock makes each charge atomic.

    The lock guards arithmetic only and is never held during I/O, so a slow
    upstream or client cannot stall other callers.  A bucket that has refilled
    to full carries no information, so ``prune`` forgets it: memory follows the
    number of recently active callers, not the number ever seen.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.wall_clock = wall_clock  # calendar windows start at local midnights
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)  # a charge that held something closed
        self._buckets: dict[str, list[Bucket]] = {}
        self._held: dict[str, list[int]] = {}  # per identity and window: reserved by calls in flight

    def _current(self, identity: str, specs: Sequence[BucketSpec], now: float,
                 offset: float = 0.0) -> list[Bucket]:
        buckets = self._buckets.get(identity)
        keys = window_keys(tuple(specs))
        if buckets is None or len(buckets) != len(specs) or any(
                bucket.window != key for bucket, key in zip(buckets, keys)):
            buckets = self._buckets[identity] = _aligned(buckets or [], specs, keys, now)
        for bucket, spec in zip(buckets, specs):
            bucket.refill(spec, now, offset)
        return buckets

    def _now(self) -> tuple[float, float]:
        """The store's clock, and what turns it into wall-clock time (for calendar windows)."""
        now = self.clock()
        return now, self.wall_clock() - now

    def charge(self, identity: str, specs: Sequence[BucketSpec], cost: int) -> Admission:
        """Take ``cost`` from every bucket of ``identity``, or from none of them."""
        return self.charge_all(((identity, specs),), cost)

    def charge_all(self, payers: Sequence[tuple[str, Sequence[BucketSpec]]],
                   cost: int | Callable[[BucketSpec], int | WindowCost],
                   allowance: Allowance = NO_ALLOWANCE, patience: float = 0.0) -> Admission:
        """Take each window's cost from every window of every payer (a user and its app), or none.

        ``cost`` is one number for all windows, or each window's own (by its unit;
        0 for a window that does not count this request's model).  A capping window
        (a ``WindowCost`` with ``per_output``) pays for the whole output allowance:
        where the windows cannot, the allowance is cut to what they can pay, down to
        ``allowance.least``.  A call refused only for what the caller's calls in flight
        hold waits up to ``patience`` seconds for them to settle.
        """
        cost_of = cost if callable(cost) else None
        with self._lock:
            admission = self._charge(payers, cost_of, cost, allowance)
            deadline = time.monotonic() + patience
            while not admission.allowed and admission.waits:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._released.wait(left)
                admission = self._charge(payers, cost_of, cost, allowance)
            return admission

    def _charge(self, payers: Sequence[tuple[str, Sequence[BucketSpec]]],
                cost_of: Callable[[BucketSpec], int | WindowCost] | None, cost: object,
                allowance: Allowance) -> Admission:
        now, offset = self._now()
        rows: list[tuple[Bucket, BucketSpec, WindowCost, int]] = []
        granted, returns = allowance.asked, False
        for identity, specs in payers:
            held = self._held.get(identity) if self._held else None
            if held is not None and len(held) != len(specs):
                held = None
            for index, (bucket, spec) in enumerate(zip(self._current(identity, specs, now, offset), specs)):
                priced = cost if cost_of is None else cost_of(spec)
                if priced.__class__ is not WindowCost:
                    priced = WindowCost(priced)  # type: ignore[arg-type]
                if priced.per_output:
                    granted = min(granted, priced.most(bucket.tokens))
                returns = returns or priced.returns
                rows.append((bucket, spec, priced, held[index] if held else 0))
        if granted < allowance.least:
            granted = allowance.least
        allowed = True
        amounts: list[int] = []
        waits: list[float] = []
        for bucket, spec, priced, _ in rows:
            amount = priced.at(granted)
            wait = 0.0 if amount == 0 or bucket.tokens >= amount else (
                bucket.seconds_until(spec, amount, now, offset))
            if wait > 0 or amount > spec.capacity:
                allowed = False
            amounts.append(amount)
            waits.append(wait)
        waiting = not allowed and returns and any(row[3] for row in rows) and all(
            amount <= spec.capacity and bucket.tokens + (kept if priced.returns else 0) >= amount
            for (bucket, spec, priced, kept), amount in zip(rows, amounts))
        if len(payers) == 1:
            costs: tuple[tuple[int, ...], ...] = (tuple(amounts),)
        else:
            costs, position = (), 0
            for _, specs in payers:
                costs += (tuple(amounts[position:position + len(specs)]),)
                position += len(specs)
        held_now: tuple[tuple[int, ...], ...] = ()
        if allowed:
            for (bucket, _, _, _), amount in zip(rows, amounts):
                bucket.tokens -= amount
            if returns:
                held_now = self._hold(payers, rows, costs)
        chosen = 0 if len(rows) == 1 else max(range(len(rows)), key=lambda i: _tightness(
            (rows[i][0], rows[i][1], amounts[i], waits[i])))
        bucket, spec = rows[chosen][0], rows[chosen][1]
        capping = any(row[2].per_output for row in rows)
        return Admission(allowed, amounts[chosen], spec.capacity, max(0, bucket.tokens),
                         0.0 if allowed else waits[chosen], spec.refill_tokens, spec.interval,
                         spec.name, costs, granted if capping else None, waiting, spec.unit, held_now,
                         spec)

    def _hold(self, payers: Sequence[tuple[str, Sequence[BucketSpec]]],
              rows: list[tuple[Bucket, BucketSpec, WindowCost, int]],
              costs: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        """Note what an admitted call holds of each window that gets back what it does not use."""
        held, position = [], 0
        for (identity, specs), charged in zip(payers, costs):
            mine = tuple(amount if rows[position + index][2].returns else 0
                         for index, amount in enumerate(charged))
            position += len(specs)
            held.append(mine)
            if any(mine):
                kept = self._held.get(identity)
                if kept is None or len(kept) != len(specs):
                    kept = self._held[identity] = [0] * len(specs)
                for index, amount in enumerate(mine):
                    kept[index] += amount
        return tuple(held)

    def credit(self, identity: str, specs: Sequence[BucketSpec], amount: int | Sequence[int],
               held: Sequence[int] = ()) -> None:
        """Give back an amount (never above capacity) or, when negative, take it (debt allowed).

        ``amount`` is one number for every window, or one per window.  ``held`` is
        what the closing call held of each window: no longer in flight.
        """
        amounts = [amount] * len(specs) if isinstance(amount, int) else amount
        with self._lock:
            # By window, not by position, and without realigning: the policy may have changed
            # since this call was charged, and its old windows must not replace the new ones.
            now, offset = self._now()
            found = {bucket.window: bucket for bucket in self._buckets.get(identity, ())}
            for key, spec, change in zip(window_keys(tuple(specs)), specs, amounts):
                bucket = found.get(key)
                if bucket is None or not change:  # (a window removed meanwhile: nothing to give back)
                    continue
                bucket.refill(spec, now, offset)
                bucket.tokens = min(spec.capacity, bucket.tokens + change) if change > 0 else (
                    bucket.tokens + change)
            if any(held):
                self._unhold(identity, held)
                self._released.notify_all()

    def _unhold(self, identity: str, held: Sequence[int]) -> None:
        kept = self._held.get(identity)
        if kept is None or len(kept) != len(held):
            return
        for index, amount in enumerate(held):
            kept[index] = max(0, kept[index] - amount)
        if not any(kept):
            del self._held[identity]

    def snapshot(self, identity: str, specs: Sequence[BucketSpec]) -> list[dict]:
        """Each bucket's level and timing, for the quota endpoint; charges nothing."""
        with self._lock:
            return self._snapshot(identity, specs)

    def _snapshot(self, identity: str, specs: Sequence[BucketSpec]) -> list[dict]:
        now, offset = self._now()
        return [level_view(spec, bucket.tokens,
                           period_bounds(now + offset, spec.period)[1] - offset - now
                           if spec.period in PERIOD_DAYS else bucket.step_at + spec.interval - now,
                           bucket.seconds_until(spec, spec.capacity, now, offset))
                for bucket, spec in zip(self._current(identity, specs, now, offset), specs)]

    def peek(self, identity: str, specs: Sequence[BucketSpec]) -> list[dict]:
        """Like ``snapshot``, but a caller without buckets is shown full and nothing is stored."""
        with self._lock:
            if identity in self._buckets:
                return self._snapshot(identity, specs)
        return [level_view(spec, spec.capacity, 0.0, 0.0) for spec in specs]

    def prune(self, specs_of: Callable[[str], Sequence[BucketSpec]], batch: int = 2000) -> int:
        """Forget buckets that are full again; the lock is taken per batch, not for the sweep."""
        forgotten = 0
        identities = list(self._buckets)
        for start in range(0, len(identities), batch):
            with self._lock:
                now, offset = self._now()
                for identity in identities[start:start + batch]:
                    buckets = self._buckets.get(identity)
                    specs = specs_of(identity)
                    if buckets is None or [b.window for b in buckets] != list(window_keys(tuple(specs))):
                        continue  # (realigned, and then pruned, when next used)
                    for bucket, spec in zip(buckets, specs):
                        bucket.refill(spec, now, offset)
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
                        saved[identity] = [[b.tokens, round(b.step_at + offset, 3), b.capacity,
                                            None if b.window is None else list(b.window)]
                                           for b in buckets]
        return saved

    def load(self, saved: dict, wall_clock: Callable[[], float] = time.time) -> None:
        """Restore dumped buckets; refill steps that fell during the downtime apply on next use."""
        offset = self.clock() - wall_clock()
        now = self.clock()
        restored = {}
        for identity, buckets in saved.items():
            if not isinstance(identity, str) or not isinstance(buckets, list):
                raise ValueError("unexpected bucket entry")
            restored[identity] = [Bucket(int(tokens), min(now, float(step_at) + offset), capacity, window)
                                  for tokens, step_at, capacity, window in map(_saved_bucket, buckets)]
            if not all(math.isfinite(bucket.step_at) for bucket in restored[identity]):
                raise ValueError("a refill time is not a number")
        with self._lock:
            self._buckets.update(restored)

    def __len__(self) -> int:
        return len(self._buckets)


def _saved_bucket(saved: object) -> tuple[object, object, int | None, tuple | None]:
    """A saved level, its step time, the limit it was counted against and which window it is
    (None for either: saved by an older version); ValueError or TypeError when broken."""
    tokens, step_at, *rest = saved  # type: ignore[misc]
    if len(rest) > 2:
        raise ValueError("unexpected bucket entry")
    capacity = rest[0] if rest else None
    window = rest[1] if len(rest) > 1 else None
    if window is not None:
        name, unit, period, index = window
        window = (str(name), str(unit), None if period is None else str(period), int(index))
    return tokens, step_at, None if capacity is None else int(capacity), window


@functools.lru_cache(maxsize=4096)
def window_keys(specs: tuple[BucketSpec, ...]) -> tuple[tuple, ...]:
    """Which window each spec is, so that a level follows its window when the policy changes.

    A window is its name, unit and period, and which of the windows so alike it is:
    its limit, refill or models may change (the level stays, ``Bucket.resize``); removing
    or adding a window before it must not hand it another window's level.
    """
    seen: dict[tuple, int] = {}
    keys = []
    for spec in specs:
        alike = (spec.name, spec.unit, spec.period)
        keys.append(alike + (seen.get(alike, 0),))
        seen[alike] = seen.get(alike, 0) + 1
    return tuple(keys)


def _aligned(old: Sequence[Bucket], specs: Sequence[BucketSpec], keys: Sequence[tuple],
             now: float) -> list[Bucket]:
    """A caller's levels in the order of its policy's windows: each window its own level.

    A new window starts full.  Levels restored from an older state file do not say which
    window they are: they are taken by position, once, as before.
    """
    known = {bucket.window: bucket for bucket in old if bucket.window is not None}
    aligned = []
    for position, (spec, key) in enumerate(zip(specs, keys)):
        bucket = known.get(key)
        if bucket is None and position < len(old) and old[position].window is None:
            bucket = old[position]
        if bucket is None:
            bucket = Bucket(spec.capacity, now, spec.capacity)
        bucket.window = key
        aligned.append(bucket)
    return aligned


class Charge:
    """One admitted request's payment, a small state machine decided in one place.

    ``reserved`` when admitted; ``close`` makes it ``kept`` (served, nothing to
    settle), ``settled`` (served, replaced by what was really used: the rest
    refunded, or the extra taken as debt) or ``refunded`` (never served), once.
    Every payer (a key, or a user and the app key above it) pays the same; each
    window settles as its unit says (``mode``), from what the call was (``call``:
    its model's price, for a money window).
    """

    __slots__ = ("store", "payers", "admission", "mode", "state", "used", "call")

    def __init__(self, store: BucketStore, payers: Sequence[tuple[str, Sequence[BucketSpec]]],
                 admission: Admission, mode: CostMode, call: CallCost | None = None) -> None:
        self.store = store
        self.payers = payers
        self.admission = admission
        self.mode = mode
        self.call = call
        self.state = "reserved"
        self.used: int | None = None

    def close(self, served: bool, used: Usage | None = None) -> None:
        """Refund, keep, or settle each window to what its unit makes of ``used``."""
        if self.state != "reserved":
            return
        cost = self.admission.cost
        if not served:
            self.state = "refunded"
            self.credit(lambda spec, charged: charged)
            self.admission = self.admission._replace(remaining=min(
                self.admission.limit, self.admission.remaining + cost))
            return
        settled = {} if used is None else {
            spec: final for _, specs in self.payers for spec in specs
            if (final := self.mode.unit_of(spec).settle(used, self.call)) is not None}
        if not settled:
            self.state = "kept"
            if any(map(any, self.admission.held)):
                self.credit(lambda spec, charged: 0)  # (what it held is no longer in flight)
            return
        assert used is not None
        self.state = "settled"
        self.used = max((final for spec, final in settled.items() if self.mode.unit_of(spec).counts_tokens),
                        default=used.total)
        self.credit(lambda spec, charged: charged - settled[spec] if charged and spec in settled else 0)

    def credit(self, change: Callable[[BucketSpec, int], int]) -> None:
        held = self.admission.held or [()] * len(self.payers)
        for (identity, specs), charged, kept in zip(self.payers, self.admission.costs, held):
            self.store.credit(identity, specs, [change(spec, c) for spec, c in zip(specs, charged)], kept)

    @property
    def charged(self) -> int:
        """Tokens taken before forwarding and not given back (a request window's 1 is no token,
        nor is a money window's amount)."""
        if self.state == "refunded":
            return 0
        if (len(self.admission.costs) == 1 and len(self.admission.costs[0]) == 1
                and self.admission.unit != MONEY):
            return self.admission.cost  # one window: what it was charged, in its unit
        amounts = [amount for (_, specs), costs in zip(self.payers, self.admission.costs)
                   for spec, amount in zip(specs, costs) if self.mode.unit_of(spec).counts_tokens]
        return max(amounts, default=self.admission.cost if self.admission.unit != MONEY else 0)

    @property
    def paid(self) -> int:
        """What the request cost in the end."""
        return self.used if self.used is not None else self.charged


# --------------------------------------------------------------------------
# Units: what a window counts
# --------------------------------------------------------------------------

class Unit:
    """What a window counts, and so what a call costs it: before it is forwarded
    (``estimate``, or ``cost`` for a window that caps the answer) and once its answer
    is in (``settle``: None, what was charged stands).

    A new unit is one subclass; ``CostMode`` says which unit a window's ``unit`` names.
    """

    name = ""
    counts_tokens = True  # False: the window counts something else (requests, money)
    settles = False       # True: ``settle`` replaces the charge with what was used
    caps = False          # True: the window pays for the whole output allowance, cut to fit it

    def estimate(self, call: CallCost) -> int:
        raise NotImplementedError

    def settle(self, used: Usage, call: CallCost | None = None) -> int | None:
        return None

    def cost(self, call: CallCost, spec: BucketSpec) -> WindowCost:
        """What ``call`` costs a window of this unit: the hard cap where the unit caps.

        A capping window (not ``overdraft``) is charged the prompt and, per output
        token, the whole allowance, which the store cuts to what the window holds.
        An ``overdraft`` window keeps the softer charge (``estimate``), and its debt.
        """
        if not self.caps or spec.overdraft or call.flat:
            return WindowCost(self.estimate(call))
        return WindowCost(self.prompt_cost(call), self.output_cost(call), self.settles)

    def prompt_cost(self, call: CallCost) -> int:
        return call.prompt

    def output_cost(self, call: CallCost) -> float:
        """The cost of one token of allowance (for every answer the call asks for)."""
        return float(call.answers)


class RequestCount(Unit):
    """One request, whatever it asked for: ``"unit": "requests"``."""

    name = "requests"
    counts_tokens = False

    def estimate(self, call: CallCost) -> int:
        return 1


class FixedTokens(Unit):
    """A fixed number of tokens a call (REQUEST_TOKEN_COST): ``request`` mode's own unit."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def estimate(self, call: CallCost) -> int:
        return self.tokens


class EstimatedTokens(Unit):
    """The prompt's estimate plus the output asked for, charged before and kept."""

    name = "tokens"
    caps = True

    def estimate(self, call: CallCost) -> int:
        return call.estimate


class ReportedTokens(Unit):
    """A reservation, then the tokens the upstream reported (or the text streamed)."""

    name = "tokens"
    settles = True
    caps = True

    def estimate(self, call: CallCost) -> int:
        return call.reservation

    def settle(self, used: Usage, call: CallCost | None = None) -> int | None:
        return used.total


class MoneyUnit(Unit):
    """Money, in nano-units of the currency: the call's model priced (``MODELS_FILE``).

    Reserved: the prompt at the dearest input price (cache writes may cost more than
    input) and the whole allowance at the output price; settled, whatever the cost
    mode, to the usage reported, each part at its own price.  A model without a
    price never reaches a window of this unit (``model_not_priced``).
    """

    name = "money"
    counts_tokens = False
    settles = True
    caps = True

    def estimate(self, call: CallCost) -> int:
        """The softer charge of an overdraft window: the prompt and at most the reserve.

        A flat-rate call (an image, a transcription) costs its model's ``per_call`` price.
        """
        if call.price is None:
            return 0
        if call.flat:
            return call.price.call_nanos * call.made
        allowance = call.config.response_reserve if call.allowance is None else min(
            call.allowance, call.config.response_reserve)
        return self.prompt_cost(call) + math.ceil(self.output_cost(call) * allowance)

    def prompt_cost(self, call: CallCost) -> int:
        """The prompt at its upper bound (``CallCost.prompt_bound``): what a money window
        reserves must cover the bill however the model's tokenizer counts."""
        return 0 if call.price is None else call.price.input_nanos(call.prompt_bound)

    def output_cost(self, call: CallCost) -> float:
        return 0.0 if call.price is None else call.price.output_nanos_per_token * call.answers

    def settle(self, used: Usage, call: CallCost | None = None) -> int | None:
        price = None if call is None else call.price
        if price is None or call.flat:  # (a flat-rate call keeps its price per call)
            return None
        return price.nanos(used)


class CostMode:
    """TOKEN_COST_MODE, parsed: the unit of a window that names none, and what "tokens" means.

    ``least`` is what the cheapest request (one without an allowance) costs in the
    mode's own unit, and ``least_setting`` the variable that sets it.
    """

    def __init__(self, name: str, own: Unit, tokens: Unit, least: int, least_setting: str) -> None:
        self.name = name
        self.units = {"": own, RequestCount.name: REQUESTS, "tokens": tokens, MONEY: MONEY_UNIT}
        self.least, self.least_setting = least, least_setting

    def unit_of(self, spec: BucketSpec) -> Unit:
        return self.units[spec.unit]


REQUESTS = RequestCount()
MONEY = MoneyUnit.name
MONEY_UNIT = MoneyUnit()
WINDOW_UNITS = ("", RequestCount.name, "tokens", MONEY)  # what a window's "unit" may name ("": the mode's)


def cost_mode(config: Config) -> CostMode:
    """The cost mode a configuration names, as objects (made once per Config)."""
    reserve = config.response_reserve
    if config.cost_mode == "request":
        return CostMode("request", FixedTokens(config.request_cost), EstimatedTokens(),
                        config.request_cost, "REQUEST_TOKEN_COST")
    # the cheapest request: the least answer the hard cap cuts to, or the overdraft's reserve
    least, setting = ((reserve, "RESPONSE_TOKEN_RESERVE") if config.overdraft
                      else (config.min_output, "MIN_OUTPUT_TOKENS"))
    if config.cost_mode == "estimate":
        return CostMode("estimate", EstimatedTokens(), EstimatedTokens(), least, setting)
    return CostMode("usage", ReportedTokens(), ReportedTokens(), least, setting)


class PayerWindows(NamedTuple):
    """What a call's windows, all payers' together, say of it; worked out once a call."""

    money: bool       # some window counts money: prices are needed
    settles: bool     # some window settles to the usage reported
    token_room: int   # the smallest capacity of a window counting tokens (a reservation's room)


def payer_windows(payers: Sequence[tuple[str, Sequence[BucketSpec]]], mode: CostMode) -> PayerWindows:
    money = settles = False
    room = 1 << 62
    for _, specs in payers:
        for spec in specs:
            unit = mode.unit_of(spec)
            money = money or spec.counts_money
            settles = settles or unit.settles
            if unit.counts_tokens and spec.capacity < room:
                room = spec.capacity
    return PayerWindows(money, settles, room)


def window_costs(call: CallCost, mode: CostMode, model: str,
                 payers: Sequence[tuple[str, Sequence[BucketSpec]]]) -> Callable[[BucketSpec], WindowCost]:
    """What each window is charged before forwarding: by its unit, and nothing at all if it
    counts only other models.  Worked out here, so that the bucket lock is held for sums only."""
    costs = {spec: NO_COST if spec.models is not None and model not in spec.models
             else mode.unit_of(spec).cost(call, spec) for _, specs in payers for spec in specs}
    return costs.__getitem__


NO_COST = WindowCost(0)


# --------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------

def prompt_tokens(payload: dict, bound: bool = False) -> int:
    """Every string in the request but the model at 4 characters a token, and every whole
    number in a list as one token: a prompt may be sent as token ids.

    With ``bound``, an upper bound instead: a string's UTF-8 bytes, since a tokenizer of
    bytes (every GPT, Claude, Llama) never makes more tokens than there are bytes, where
    4 characters a token is low for Chinese, code or numbers.  Iterative, so that no
    nesting depth can exhaust the stack.
    """
    if bound:
        return _prompt_bytes(payload)
    characters = strings = token_ids = 0
    stack: list = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            characters += len(item)
            strings += 1
        elif isinstance(item, dict):  # (its numbers are settings, not token ids)
            stack.extend(v for k, v in item.items() if k != "model" and type(v) is not int)
        elif isinstance(item, list):
            stack.extend(item)
        elif type(item) is int:  # a whole number from a list (not a bool): a token id
            token_ids += 1
    return math.ceil((characters + max(0, strings - 1)) / 4) + token_ids  # strings joined by spaces


def _prompt_bytes(payload: dict) -> int:
    size = 0
    stack: list = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item.encode("utf-8", "surrogatepass")) + 1  # (and a separator)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k != "model" and type(v) is not int)
        elif isinstance(item, list):
            stack.extend(item)
        elif type(item) is int:
            size += 1
    return size


def _count(value: object) -> int | None:
    """A token count from an upstream's JSON: a non-negative integer, else nothing."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class Usage(NamedTuple):
    """Tokens an answer used, as its upstream reported them, in the parts a price tells apart.

    ``input`` includes the cached and cache-written parts, ``output`` the reasoning.
    """

    input: int
    output: int
    cached_input: int = 0
    cache_write: int = 0
    reasoning: int = 0

    @property
    def total(self) -> int:
        return self.input + self.output


NO_USAGE = Usage(0, 0)


class Meter:
    """What one answer used, as far as the proxy can tell, read on its way through.

    The dialect reads each streamed event (or the whole non-streamed answer);
    the meter keeps the usage the upstream reported (for the owner's history, and
    to settle in usage mode) and, in usage mode, the characters of text relayed,
    which are all a stream cut short leaves to settle by.  Outside usage mode it
    reads only the events that can carry usage, so a stream costs no parsing.
    """

    __slots__ = ("dialect", "prompt_estimate", "hide_usage", "counts_text", "usage_fields",
                 "characters", "final", "object_id", "_reported")

    def __init__(self, dialect: Dialect, prompt_estimate: int, hide_usage: bool = False,
                 counts_text: bool = True) -> None:
        self.dialect = dialect
        self.prompt_estimate = prompt_estimate
        self.hide_usage = hide_usage   # the proxy asked for a usage event the client did not
        self.counts_text = counts_text
        self.usage_fields: dict[str, int] = {}
        self.characters = 0
        self.final = False  # the usage seen is the answer's last word (not, say, message_start's)
        self.object_id: str | None = None  # a stored answer's id (a response, a completion)
        self._reported: Usage | None = None

    def report(self, counts: dict) -> None:
        """Record counts from the upstream; later reports of a field replace earlier ones.

        A count inside a details object is kept under both names joined by a dot
        (``prompt_tokens_details.cached_tokens``).
        """
        self._reported = None  # (read again from the fields, once, when next asked)
        for name, value in counts.items():
            count = _count(value)
            if count is not None:
                self.usage_fields[name] = count
            elif isinstance(value, dict):
                for part, inner in value.items():
                    count = _count(inner)
                    if count is not None:
                        self.usage_fields[f"{name}.{part}"] = count

    @property
    def reported(self) -> Usage | None:
        """The usage the upstream reported, in its parts (asked by the charge, the cost and
        the record: read from the fields once)."""
        if self._reported is None and self.usage_fields:
            self._reported = self.dialect.usage_of(self.usage_fields)
        return self._reported

    def used(self, finished: bool) -> Usage | None:
        """What to settle to: the reported usage, else for a cut-short answer prompt + text / 4.

        None means keep the reservation (a finished answer that reported nothing and
        whose text was not counted).  A stream that ended without its usage (a server
        that ignores ``stream_options``) settles by its text, however long it was.
        """
        usage = self.reported
        if usage is not None and self.final:
            return usage  # the answer's last word: a hang-up after it changes nothing
        if finished and usage is None and not self.characters:
            return None
        # Cut short, or ended without its final usage: what was reported so far may be
        # partial (Anthropic's message_start says output 0), so the streamed text counts too.
        streamed = math.ceil(self.characters / 4)
        if usage is None:
            return Usage(self.prompt_estimate, streamed)
        return usage._replace(output=max(usage.output, streamed))

    def filter(self, data: bytes, framing: Framing) -> bytes:
        """Observe complete frames; return those the client should see.

        Outside usage mode (``counts_text`` false) only events that contain the
        dialect's ``usage_marker`` are worth reading; the relay passes the others
        on without calling this, since it runs for every event.
        """
        kept = []
        for frame in framing.split(data):
            event = framing.json_of(frame)
            if not isinstance(event, dict) or self.dialect.observe(event, self):
                kept.append(frame)
        return b"".join(kept) if self.counts_text else data  # hides only what it asked for


# --------------------------------------------------------------------------
# Stream framings
# --------------------------------------------------------------------------

class Framing:
    """How a streamed answer is cut into events: server-sent events or JSON lines."""

    content_type = ""

    def end(self, buffer: bytes) -> int:
        """Offset just past the last complete event in ``buffer`` (0 if none)."""
        raise NotImplementedError

    def split(self, data: bytes) -> list[bytes]:
        raise NotImplementedError

    def json_of(self, frame: bytes) -> object:
        raise NotImplementedError


class ServerSentEvents(Framing):
    content_type = "text/event-stream; charset=utf-8"

    def end(self, buffer: bytes) -> int:
        if buffer.endswith(b"\n\n"):  # the usual case: whole events arrived
            return len(buffer)
        lf = buffer.rfind(b"\n\n")
        crlf = buffer.rfind(b"\r\n\r\n")
        return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)

    def split(self, data: bytes) -> list[bytes]:
        return [event + b"\n\n" for event in data.replace(b"\r\n", b"\n").split(b"\n\n") if event]

    def json_of(self, frame: bytes) -> object:
        data = b"\n".join(line[5:].strip() for line in frame.split(b"\n") if line.startswith(b"data:"))
        return _json_or_none(data)


class JsonLines(Framing):
    content_type = "application/x-ndjson"

    def end(self, buffer: bytes) -> int:
        return buffer.rfind(b"\n") + 1

    def split(self, data: bytes) -> list[bytes]:
        return [line + b"\n" for line in data.split(b"\n") if line.strip()]

    def json_of(self, frame: bytes) -> object:
        return _json_or_none(frame.strip())


# A request, an answer and each usage event are parsed on the hot path. For UTF-8 text
# starting with "{", json.loads' first two layers (guess the encoding, skip leading
# whitespace) have nothing to do, so the last public one, raw_decode, is called directly.
_JSON_DECODER = json.JSONDecoder()
_JSON_SPACE = " \t\n\r"


def parse_json(data: bytes) -> object:
    """``json.loads(data)``, the same values and errors, cheaper for UTF-8 objects."""
    if data[:1] == b"{" and data[1:2] != b"\x00":  # no BOM, not UTF-16/32-LE: plain UTF-8
        text = data.decode("utf-8", "surrogatepass")
        value, end = _JSON_DECODER.raw_decode(text)
        if end != len(text):
            rest = text[end:].lstrip(_JSON_SPACE)
            if rest:  # json.loads reports where the extra data starts, after the whitespace
                raise json.JSONDecodeError("Extra data", text, len(text) - len(rest))
        return value
    return json.loads(data)


def added_usage(answers: list[dict]) -> dict[str, int]:
    """The usage of several answers to one request (a batch), each count added up."""
    total: dict[str, int] = {}
    for answer in answers:
        usage = answer.get("usage")
        for name, value in (usage.items() if isinstance(usage, dict) else ()):
            count = _count(value)
            if count is not None:
                total[name] = total.get(name, 0) + count
    return total


def _json_or_none(data: bytes) -> object:
    if not data.startswith(b"{"):
        return None
    try:
        return parse_json(data)
    except (ValueError, RecursionError):
        return None


SSE = ServerSentEvents()
NDJSON = JsonLines()


def framing_of(content_type: str) -> Framing | None:
    """The framing of a streamed upstream answer, from its Content-Type (None: not a stream)."""
    media = content_type.partition(";")[0].strip().lower()
    if media == "text/event-stream":
        return SSE
    if media in ("application/x-ndjson", "application/jsonl", "application/json-seq"):
        return NDJSON
    return None


def sse_event(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json_bytes(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------
# Request bodies: read once, checked, and forwarded as checked
# --------------------------------------------------------------------------
# A proxy that charges by one reading of a body and forwards bytes that the model server
# reads another way can be made to charge for one request and serve another.  Parsers
# disagree exactly where JSON is loose: Go's encoding/json (Ollama) matches keys without
# regard to case ("MODEL" is "model", and so are the Kelvin sign and the long s), and of
# two equal keys every parser keeps a different one.  So a body is parsed once, strictly:
# valid UTF-8, no key twice in one object, no number JSON has no words for, and no other
# spelling of a field the proxy reads; what is forwarded is that parse, serialised again.

# Fields the proxy reads at the top of a body, and inside the objects named.
READ_FIELDS = frozenset({
    "model", "stream", "stream_options", "messages", "prompt", "input", "user", "metadata",
    "options", "max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict", "n",
    "n_cmpl", "best_of", "background", "previous_response_id", "conversation", "models", "route",
    "service_tier", "tools", "audio", "modalities"})
NESTED_READ_FIELDS = {"options": frozenset({"num_predict"}),
                      "stream_options": frozenset({"include_usage"}),
                      "metadata": frozenset({"user_id"})}


def _folded(names: frozenset) -> dict[str, str]:
    return {name.casefold(): name for name in names}


_READ_FOLDED = _folded(READ_FIELDS)
_NESTED_FOLDED = {name: _folded(inner) for name, inner in NESTED_READ_FIELDS.items()}


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """An object whose keys are all different; a key sent twice is refused, not resolved."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise ProxyError(400, f"the key '{twice[:100]}' appears twice in one object",
                         param=twice[:100], code="duplicate_key")
    return value


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProxyError(400, "a number in the request body is too large", code="invalid_json")
    return value


def _no_constant(name: str) -> object:
    raise ProxyError(400, f"'{name}' is not a JSON value", code="invalid_json")


_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_float=_finite_number,
                                parse_constant=_no_constant)


def parse_body(body: bytes) -> object:
    """A request body's JSON value, read strictly (see above); a 400 for anything else."""
    try:
        return _STRICT_JSON.decode(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProxyError(400, "request body is not valid UTF-8", code="invalid_json") from None
    except (ValueError, RecursionError):
        raise ProxyError(400, "request body is not valid JSON", code="invalid_json") from None


def check_spellings(payload: dict) -> None:
    """Refuse a key that a case-blind parser would take for a field the proxy reads."""
    _check_object(payload, READ_FIELDS, _READ_FOLDED)
    for name, folded in _NESTED_FOLDED.items():
        inner = payload.get(name)
        if isinstance(inner, dict):
            _check_object(inner, NESTED_READ_FIELDS[name], folded)


def _check_object(value: dict, names: frozenset, folded: dict[str, str]) -> None:
    for key in value.keys() - names:  # a field spelled as the proxy reads it is fine
        if key.isascii() and key.islower():  # folds to itself, and is no field
            continue
        field_name = folded.get(key.casefold())
        if field_name is not None:
            raise ProxyError(400, f"'{key[:100]}' is another spelling of '{field_name}'; send "
                             f"'{field_name}' alone", param=key[:100], code="ambiguous_field")


def request_object(body: bytes) -> dict:
    """A body that must be a JSON object, read strictly; a 400 otherwise."""
    payload = parse_body(body)
    if not isinstance(payload, dict):
        raise ProxyError(400, "request body must be a JSON object", code="invalid_json")
    check_spellings(payload)
    return payload


def body_bytes(payload: object) -> bytes:
    """The bytes forwarded for a checked body: the proxy's own parse, serialised again.

    JSON may escape half of a surrogate pair (``"\\ud800"``), which is no text and cannot
    be encoded as UTF-8; such a body is refused here, before anything is charged.
    """
    try:
        return json_bytes(payload)
    except UnicodeEncodeError:
        raise ProxyError(400, "request body contains an unpaired surrogate escape, which is not text",
                         code="invalid_json") from None


def form_fields(body: bytes, content_type: str) -> list[tuple[str, str]] | None:
    """The text fields of a form body (multipart or URL-encoded); None when it is not a form.

    Only what is certain is returned: a part whose name cannot be read one way only
    (an RFC 2231 ``name*``, odd quoting) is refused, since another parser could read it
    as the model.
    """
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    if media == "application/x-www-form-urlencoded":
        try:
            return urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True,
                                          strict_parsing=bool(body), errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise ProxyError(400, "the form body cannot be read", code="invalid_form") from None
    if media != "multipart/form-data":
        return None
    match = re.search(r'(?:^|;)\s*boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', parameters, re.IGNORECASE)
    if match is None:
        raise ProxyError(400, "a multipart body needs its boundary", code="invalid_form")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    parts = body.split(b"\r\n" + delimiter)
    if body.count(b"\n" + delimiter) != len(parts) - 1:  # a bare LF before a delimiter: Go's
        raise ProxyError(400, "a multipart body's lines must end in CRLF", code="invalid_form")  # reader takes it
    if len(parts) < 2 or not parts[0].startswith(delimiter) or not parts[-1].startswith(b"--"):
        raise ProxyError(400, "the multipart body is not complete", code="invalid_form")
    fields = []
    for index, part in enumerate(parts[:-1]):
        part = part[len(delimiter):] if index == 0 else part
        head, separator, value = part.partition(b"\r\n\r\n")
        if not head.startswith(b"\r\n") or not separator:
            raise ProxyError(400, "a part of the multipart body is malformed", code="invalid_form")
        fields.append((_part_name(head.decode("latin-1")), value.decode("utf-8", "replace")))
    return fields


_PARAMETER = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("[^"]*"|[^;\s"]*)\s*')


def _part_name(head: str) -> str:
    """The name in a form part's one Content-Disposition, which must be plain and said once."""
    dispositions = [line.partition(":")[2] for line in head.split("\r\n")
                    if line.lower().startswith("content-disposition:")]
    if len(dispositions) != 1:
        raise ProxyError(400, "a form part needs one Content-Disposition", code="invalid_form")
    kind, _, parameters = dispositions[0].strip().partition(";")
    found = _PARAMETER.findall(";" + parameters)
    names = [value for key, value in found if key.lower() == "name"]
    if (kind.strip().lower() != "form-data" or len(names) != 1 or "\\" in names[0]
            or any(key.lower() == "name*" for key, _ in found)
            or _PARAMETER.sub("", ";" + parameters).strip()):
        raise ProxyError(400, "a form part's name cannot be read one way only", code="invalid_form")
    return names[0].strip('"')


def named_model(fields: Sequence[tuple[str, object]],
                names: tuple[str, ...] = ("model",)) -> str | None:
    """The model a body's fields name (once, spelled exactly), or None if they name none.

    ``names`` are the fields a model may be named in: Ollama's older routes take ``name`` too.
    """
    named = [(key, value) for key, value in fields
             if isinstance(key, str) and key.casefold() in names]
    if not named:
        return None
    key, value = named[0]
    if len(named) > 1 or key not in names or not isinstance(value, str):
        raise ProxyError(400, "the request must name its model once, as 'model'", param="model",
                         code="ambiguous_field")
    return value


class CheckedBody(NamedTuple):
    """A request body as the proxy read it, and the bytes that go upstream in its place."""

    forwarded: bytes        # a JSON body's parse serialised again; a form or other body as sent
    payload: object = None  # the JSON value, when the body is JSON
    model: str | None = None  # the model it names, if any
    count: int = 1          # how many things it asks to be made (``n`` images), for a price per call


def made_count(fields: Sequence[tuple[str, object]]) -> int:
    """A flat-rate call's ``n`` (images made at once), priced per call: 1 when it says none.

    A form sends it as text; a value no server would read as a count is refused, so
    that what is charged is what is made.
    """
    values = [value for name, value in fields if name == "n"]
    if not values:
        return 1
    value = values[0]
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 12:
        value = int(value)
    if len(values) > 1 or type(value) is not int or not 1 <= value <= MAX_COUNT:
        raise ProxyError(400, "n must be one whole number, 1 or more", param="n", code="invalid_value")
    return value


NO_BODY = CheckedBody(b"")


def check_body(body: bytes, content_type: str, model_fields: tuple[str, ...],
               must_name_model: bool) -> CheckedBody:
    """Read a body that is not a metered API's JSON object: JSON, a form, or anything else.

    JSON is known by its first character as well as its media type: llama.cpp and
    Ollama read a body as JSON whatever its Content-Type says, so a JSON body sent as
    a form is JSON here too.  With ``must_name_model`` (a key, or a user under it,
    limited to some models) the body must name its model: one that names none is
    served the model server's default model, and one that is neither JSON nor a form
    cannot show which it asks for.
    """
    if not body:
        return NO_BODY
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json") or body.lstrip()[:1] in (b"{", b"["):
        value = parse_body(body)
        model = None
        if isinstance(value, dict):
            check_spellings(value)
            model = named_model(list(value.items()), model_fields)
        checked = CheckedBody(body_bytes(value), value, model,
                              made_count(list(value.items())) if isinstance(value, dict) else 1)
    else:
        fields = form_fields(body, content_type)
        if fields is None:
            if must_name_model:
                raise ProxyError(415, f"This key may use only some models, and a {media or 'untyped'} "
                                 "body cannot show which one it asks for.", code="unsupported_media_type")
            return CheckedBody(body)
        checked = CheckedBody(body, None, named_model(fields, model_fields), made_count(fields))
    if must_name_model and checked.model is None:
        raise ProxyError(403, "This key may use only some models: the request must name one.",
                         "permission_error", "model_not_allowed", "model")
    return checked


# --------------------------------------------------------------------------
# Dialects: one class per API the model servers speak
# --------------------------------------------------------------------------

# The largest count a request may give (a cap, a number of answers): servers keep them in
# 32 bits, where a larger one wraps around, perhaps to "no limit", while Python charges it whole.
MAX_COUNT = 2**31 - 1


class Dialect:
    """One API: its routes, what it may cost, how to read its usage and how to answer in it.

    Everything the proxy knows about an API lives in its subclass, registered
    in ``DIALECTS``; the handler, the meter and the echo model only ask.  The
    base class speaks OpenAI's error shape and validates what every API shares.
    A subclass with no ``reply`` is answered with a 429 when its caller's
    bucket is empty, since no assistant text fits its answers.
    """

    name = "openai"
    routes: tuple[str, ...] = ()
    upstream_root = False           # forwarded under the upstream's root, not its /v1 base
    stream_default = False
    # Fields that cap one answer's output in some server: llama.cpp reads n_predict, else
    # max_completion_tokens, else max_tokens on every route (Responses and Messages are turned
    # into chat with the body's other fields kept). The bounding one is obeyed by every server
    # of this API (see ``output_allowance``).
    allowance_fields: tuple[str, ...] = ("max_tokens", "max_completion_tokens", "max_output_tokens",
                                         "n_predict")
    bounding_field: str | None = None
    # Fields that ask for several answers to one request (llama.cpp's n_cmpl, OpenAI's n ...).
    answer_fields: tuple[str, ...] = ("n", "n_cmpl", "best_of")
    # A server may store this API's answers (OpenAI does) and serve them again by id (the
    # route table says where); the proxy keeps the ids, so that only their key reaches them.
    stores_answers = False
    framing: Framing = SSE
    usage_marker = b'"usage"'         # bytes every event that reports usage contains
    model_fields: tuple[str, ...] = ("model",)  # where a body names its model
    flat_rate = False               # charged REQUEST_TOKEN_COST whatever the cost mode
    usage_must_be_asked = False     # a stream reports usage only when asked to
    answers_with_text = True        # False: an empty bucket is a 429, not an assistant reply

    # -- requests ------------------------------------------------------------

    def validate(self, payload: dict) -> None:
        """Catch malformed requests here, where they cost nothing, instead of upstream."""
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise ProxyError(400, "'model' must be a string", param="model", code="invalid_type")
        if not isinstance(payload.get("stream", False), bool):
            raise ProxyError(400, "'stream' must be true or false", param="stream",
                             code="invalid_type")
        self.output_allowance(payload)  # a bad value is a 400 in every cost mode
        self.answers(payload)

    def is_stream(self, payload: dict) -> bool:
        return payload.get("stream", self.stream_default) is True

    def output_allowance(self, payload: dict) -> int | None:
        """The most output tokens one answer may take, as any model server could read the request.

        None means no bound: charged as RESPONSE_TOKEN_RESERVE.  Servers disagree on
        which field caps the output (llama.cpp's ``n_predict`` overrides ``max_tokens``;
        OpenAI and vLLM prefer ``max_completion_tokens``, which Ollama's OpenAI API does
        not know), so the largest field set counts, and without the bounding field, which
        every server obeys, the request may have no bound at all.  A negative cap is
        llama.cpp's "no limit" where it means one (``n_predict``), a 400 elsewhere: never
        a discount.
        """
        largest: int | None = None
        for name in self.allowance_fields:
            value = payload.get(name)
            if value is None:
                continue
            unbounded_below = -2 if name == "n_predict" else 0
            if (isinstance(value, bool) or not isinstance(value, int) or value < unbounded_below
                    or value > MAX_COUNT):
                raise ProxyError(400, f"'{name}' must be a non-negative integer", param=name,
                                 code="invalid_value")
            if value < 0:
                return None
            largest = value if largest is None else max(largest, value)
        return largest if self.bounding_field in payload else None

    def limit_output(self, payload: dict, tokens: int) -> bool:
        """Make the forwarded request take at most ``tokens`` output tokens an answer (the
        hard cap); True if the payload changed.

        Every allowance field it sets is cut to ``tokens`` (a negative one, llama.cpp's
        "no limit", too); a request that sets none gets the bounding field.  An API
        without output (embeddings) is left alone.
        """
        if self.bounding_field is None:
            return False
        present = [name for name in self.allowance_fields if payload.get(name) is not None]
        changed = False
        for name in present or [self.bounding_field]:
            value = payload.get(name)
            if value is None or value < 0 or value > tokens:
                payload[name] = tokens
                changed = True
        return changed

    def answers(self, payload: dict) -> int:
        """How many answers one request asks for: each may take the whole output allowance."""
        count = 1
        for name in self.answer_fields:
            value = payload.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
                raise ProxyError(400, f"'{name}' must be a positive integer", param=name,
                                 code="invalid_value")
            count = max(count, value)
        return count * self.prompts(payload)

    def prompts(self, payload: dict) -> int:
        """How many prompts the request carries (a batch answers each)."""
        return 1

    def user_of(self, payload: dict) -> object:
        """The end user a request names in its body (OpenAI's ``user`` field)."""
        return payload.get("user")

    def ask_for_usage(self, payload: dict) -> bool | None:
        """Make a streamed request report its usage; True if the client would not expect it.

        None when nothing had to change.  Only Chat and Text Completions need asking.
        """
        if not self.usage_must_be_asked:
            return None
        if self.usage_in_stream(payload):
            return False
        options = payload.get("stream_options")
        payload["stream_options"] = dict(options if isinstance(options, dict) else {},
                                         include_usage=True)
        return True

    def usage_in_stream(self, payload: dict) -> bool:
        """Whether a stream of this API shows its client usage: always, or when it asked."""
        if not self.usage_must_be_asked:
            return True
        options = payload.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    # -- answers -------------------------------------------------------------

    def usage_of(self, fields: dict[str, int]) -> Usage | None:
        """Usage from the counts a meter collected (named as in this API: OpenAI's here)."""
        total = fields.get("total_tokens")
        if total is None:
            return None
        prompt = min(fields.get("prompt_tokens", 0), total)
        output = total - prompt
        return Usage(prompt, output, min(fields.get("prompt_tokens_details.cached_tokens", 0), prompt),
                     0, min(fields.get("completion_tokens_details.reasoning_tokens", 0), output))

    def read_reply(self, reply: dict, meter: Meter) -> None:
        """Take the usage from a whole, non-streamed answer, and the id it may be stored under."""
        usage = reply.get("usage")
        if isinstance(usage, dict):
            meter.report(usage)
        if self.stores_answers and isinstance(reply.get("id"), str):
            meter.object_id = reply["id"]

    def observe(self, event: dict, meter: Meter) -> bool:
        """Read one streamed event; False hides it from the client."""
        return True

    # -- replies of the proxy's own ------------------------------------------

    def reply(self, model: str, text: str, usage: Usage = NO_USAGE) -> dict:
        """A normal, finished answer whose text is ``text``: every client just shows it."""
        raise NotImplementedError

    def reply_stream(self, model: str, pieces: Sequence[str], usage: Usage | None = NO_USAGE,
                     ) -> Iterator[bytes]:
        """The same answer as stream events, one per piece of text."""
        raise NotImplementedError

    def error_body(self, error: ProxyError) -> dict:
        return error_body(error.message, error.kind, error.code, error.param)

    def stream_error(self, error: ProxyError, framing: Framing) -> bytes:
        """The last event of a stream the upstream broke off, so the client sees it failed."""
        if framing is NDJSON:
            return json_bytes(self.error_body(error)) + b"\n"
        return sse_event(self.error_body(error), self.error_event)

    error_event: str | None = None  # the SSE event name errors go out under, where the API has one


class ChatCompletions(Dialect):
    name = "chat"
    routes = ("/v1/chat/completions",)
    bounding_field = "max_tokens"
    usage_must_be_asked = True
    stores_answers = True
    opens_with_role = True
    object_name, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def validate(self, payload: dict) -> None:
        super().validate(payload)
        if not isinstance(payload.get("messages"), list):
            raise ProxyError(400, "'messages' must be a list", param="messages", code="invalid_type")

    def observe(self, event: dict, meter: Meter) -> bool:
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            text = self.choice_text(choice, chunk=True) if isinstance(choice, dict) else None
            if isinstance(text, str):
                meter.characters += len(text)
        usage = event.get("usage")
        if not isinstance(usage, dict):
            return True
        meter.report(usage)
        meter.final = True  # sent once, after the last choice
        if self.stores_answers and isinstance(event.get("id"), str):
            meter.object_id = event["id"]
        return not (meter.hide_usage and not choices)

    @staticmethod
    def choice_text(choice: dict, chunk: bool) -> object:
        part = choice.get("delta" if chunk else "message")
        return part.get("content") if isinstance(part, dict) else None

    def choice(self, text: str | None, finish: str | None, chunk: bool, opening: bool = False) -> dict:
        if chunk:
            delta = {"role": "assistant", "content": ""} if opening else (
                {} if text is None else {"content": text})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish}

    def base(self, model: str, chunk: bool) -> dict:
        return {"id": f"{self.id_prefix}{secrets.token_hex(12)}",
                "object": self.chunk_object if chunk else self.object_name,
                "created": int(time.time()), "model": model, "system_fingerprint": None}

    def reply(self, model: str, text: str, usage: Usage = NO_USAGE) -> dict:
        return dict(self.base(model, chunk=False), choices=[self.choice(text, "stop", chunk=False)],
                    usage=openai_usage(usage))

    def reply_stream(self, model: str, pieces: Sequence[str], usage: Usage | None = NO_USAGE,
                     ) -> Iterator[bytes]:
        base = self.base(model, chunk=True)
        if self.opens_with_role:
            yield sse_event(dict(base, choices=[self.choice(None, None, True, opening=True)]))
        for piece in pieces:
            yield sse_event(dict(base, choices=[self.choice(piece, None, True)]))
        yield sse_event(dict(base, choices=[self.choice(None, "stop", True)]))
        if usage is not None:
            yield sse_event(dict(base, choices=[], usage=openai_usage(usage)))
        yield SSE_DONE


class TextCompletions(ChatCompletions):
    name = "text"
    routes = ("/v1/completions",)
    object_name = chunk_object = "text_completion"
    id_prefix = "cmpl-"
    opens_with_role = False
    stores_answers = False

    def validate(self, payload: dict) -> None:
        Dialect.validate(self, payload)

    def prompts(self, payload: dict) -> int:
        """A list of prompts is a batch, one answer each (strings, token lists, or llama.cpp's
        objects with a ``prompt_string``); a list of token ids alone is one prompt."""
        prompt = payload.get("prompt")
        if not isinstance(prompt, list):
            return 1
        return max(1, sum(1 for item in prompt if type(item) is not int))

    @staticmethod
    def choice_text(choice: dict, chunk: bool) -> object:
        return choice.get("text")

    def choice(self, text: str | None, finish: str | None, chunk: bool, opening: bool = False) -> dict:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


def openai_usage(usage: Usage) -> dict:
    return {"prompt_tokens": usage.input, "completion_tokens": usage.output,
            "total_tokens": usage.total}


class Responses(Dialect):
    """OpenAI's Responses API, which Codex CLI speaks; usage comes in ``response.completed``."""

    name = "responses"
    routes = ("/v1/responses",)
    bounding_field = "max_output_tokens"
    stores_answers = True

    def validate(self, payload: dict) -> None:
        """A background response answers "queued" and is fetched later, by a free GET, with
        its usage: nothing of it could be metered, so it is refused."""
        super().validate(payload)
        if payload.get("background") not in (None, False):
            raise ProxyError(400, "background responses are not available through this proxy; "
                             "send the request without 'background'", param="background",
                             code="unsupported_parameter")

    def usage_of(self, fields: dict[str, int]) -> Usage | None:
        if "input_tokens" not in fields and "output_tokens" not in fields:
            return None
        given, output = fields.get("input_tokens", 0), fields.get("output_tokens", 0)
        return Usage(given, output, min(fields.get("input_tokens_details.cached_tokens", 0), given),
                     0, min(fields.get("output_tokens_details.reasoning_tokens", 0), output))

    def observe(self, event: dict, meter: Meter) -> bool:
        kind = event.get("type")
        if kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
            meter.characters += len(event["delta"])
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            response = event.get("response")
            if isinstance(response, dict):
                self.read_reply(response, meter)
                meter.final = True
        return True

    def reply(self, model: str, text: str, usage: Usage = NO_USAGE) -> dict:
        return self.response(model, "completed", [self.message(text)], usage)

    def response(self, model: str, status: str, output: list, usage: Usage | None,
                 response_id: str | None = None) -> dict:
        return {"id": response_id or f"resp_{secrets.token_hex(16)}", "object": "response",
                "created_at": int(time.time()), "status": status, "error": None,
                "incomplete_details": None, "instructions": None, "max_output_tokens": None,
                "model": model, "output": output, "parallel_tool_calls": False,
                "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
                "store": False, "temperature": None, "text": {"format": {"type": "text"}},
                "tool_choice": "auto", "tools": [], "top_p": None, "truncation": "disabled",
                "usage": None if usage is None else {
                    "input_tokens": usage.input,
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens": usage.output,
                    "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": usage.total},
                "user": None, "metadata": {}}

    @staticmethod
    def message(text: str, item_id: str | None = None, status: str = "completed") -> dict:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"type": "message", "id": item_id or f"msg_{secrets.token_hex(16)}",
                "status": status, "role": "assistant", "content": content}

    def reply_stream(self, model: str, pieces: Sequence[str], usage: Usage | None = NO_USAGE,
                     ) -> Iterator[bytes]:
        response_id, item_id = f"resp_{secrets.token_hex(16)}", f"msg_{secrets.token_hex(16)}"
        text = "".join(pieces)
        part = {"type": "output_text", "text": "", "annotations": []}
        opening = self.response(model, "in_progress", [], None, response_id)
        events: list[tuple[str, dict]] = [
            ("response.created", {"response": opening}),
            ("response.in_progress", {"response": opening}),
            ("response.output_item.added", {"output_index": 0,
                                            "item": self.message("", item_id, "in_progress")}),
            ("response.content_part.added", {"item_id": item_id, "output_index": 0,
                                             "content_index": 0, "part": part}),
        ]
        yield from self.numbered(events, 0)
        sequence = len(events)
        for piece in pieces:
            yield from self.numbered([("response.output_text.delta", {
                "item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece,
                "logprobs": []})], sequence)
            sequence += 1
        closing: list[tuple[str, dict]] = [
            ("response.output_text.done", {"item_id": item_id, "output_index": 0,
                                           "content_index": 0, "text": text, "logprobs": []}),
            ("response.content_part.done", {"item_id": item_id, "output_index": 0,
                                            "content_index": 0, "part": dict(part, text=text)}),
            ("response.output_item.done", {"output_index": 0, "item": self.message(text, item_id)}),
            ("response.completed", {"response": self.response(
                model, "completed", [self.message(text, item_id)], usage or NO_USAGE, response_id)}),
        ]
        yield from self.numbered(closing, sequence)

    @staticmethod
    def numbered(events: list[tuple[str, dict]], first: int) -> Iterator[bytes]:
        for offset, (kind, fields_) in enumerate(events):
            yield sse_event(dict({"type": kind, "sequence_number": first + offset}, **fields_), kind)


class AnthropicMessages(Dialect):
    """Anthropic's Messages API, which Claude Code speaks.

    A prompt's cached part is reported apart from ``input_tokens`` (llama.cpp's
    server puts most of a prompt there), so all four counts are charged.
    """

    name = "messages"
    routes = ("/v1/messages",)
    error_event = "error"
    bounding_field = "max_tokens"
    ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                   429: "rate_limit_error", 503: "overloaded_error"}

    def validate(self, payload: dict) -> None:
        super().validate(payload)
        if not isinstance(payload.get("messages"), list):
            raise ProxyError(400, "'messages' must be a list", param="messages", code="invalid_type")

    def user_of(self, payload: dict) -> object:
        metadata = payload.get("metadata")
        return metadata.get("user_id") if isinstance(metadata, dict) else None

    def usage_of(self, fields: dict[str, int]) -> Usage | None:
        if "input_tokens" not in fields and "output_tokens" not in fields:
            return None
        cached, written = fields.get("cache_read_input_tokens", 0), fields.get("cache_creation_input_tokens", 0)
        return Usage(fields.get("input_tokens", 0) + cached + written, fields.get("output_tokens", 0),
                     cached, written)

    def observe(self, event: dict, meter: Meter) -> bool:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                for name in ("text", "partial_json", "thinking"):
                    if isinstance(delta.get(name), str):
                        meter.characters += len(delta[name])
        elif kind == "message_start" and isinstance(event.get("message"), dict):
            self.read_reply(event["message"], meter)
        elif kind == "message_delta":
            self.read_reply(event, meter)  # its counts are cumulative: they replace the earlier
            meter.final = True
        return True

    def reply(self, model: str, text: str, usage: Usage = NO_USAGE) -> dict:
        return {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant",
                "model": model, "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": usage.input, "output_tokens": usage.output}}

    def reply_stream(self, model: str, pieces: Sequence[str], usage: Usage | None = NO_USAGE,
                     ) -> Iterator[bytes]:
        usage = usage or NO_USAGE
        start = dict(self.reply(model, "", Usage(usage.input, 0)), content=[], stop_reason=None)
        yield sse_event({"type": "message_start", "message": start}, "message_start")
        yield sse_event({"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}}, "content_block_start")
        for piece in pieces:
            yield sse_event({"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": piece}}, "content_block_delta")
        yield sse_event({"type": "content_block_stop", "index": 0}, "content_block_stop")
        yield sse_event({"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                            "stop_sequence": None},
                         "usage": {"output_tokens": usage.output}}, "message_delta")
        yield sse_event({"type": "message_stop"}, "message_stop")

    def error_body(self, error: ProxyError) -> dict:
        kind = self.ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else
                                    "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": error.message}}


class OllamaChat(Dialect):
    """Ollama's native chat API: JSON lines, streamed unless ``"stream": false``."""

    name = "ollama"
    routes = ("/api/chat",)
    upstream_root = True
    stream_default = True
    framing = NDJSON
    usage_marker = b'"eval_count"'
    answer_fields = ()  # Go's decoder drops fields the API does not have
    model_fields = ("model", "name")  # Ollama's older routes name the model "name"

    def validate(self, payload: dict) -> None:
        super().validate(payload)
        if payload.get("options") is not None and not isinstance(payload.get("options"), dict):
            raise ProxyError(400, "'options' must be an object", param="options", code="invalid_type")

    def output_allowance(self, payload: dict) -> int | None:
        options = payload.get("options")
        value = options.get("num_predict") if isinstance(options, dict) else None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not -2 <= value <= MAX_COUNT:
            raise ProxyError(400, "'options.num_predict' must be an integer", param="num_predict",
                             code="invalid_value")
        return value if value > 0 else None  # -1: no limit, -2: fill the context, 0: older
                                             # runners' "no limit"

    def limit_output(self, payload: dict, tokens: int) -> bool:
        options = payload.get("options")
        value = options.get("num_predict") if isinstance(options, dict) else None
        if value is not None and 0 < value <= tokens:
            return False
        payload["options"] = dict(options or {}, num_predict=tokens)
        return True

    def usage_of(self, fields: dict[str, int]) -> Usage | None:
        if "eval_count" not in fields and "prompt_eval_count" not in fields:
            return None
        return Usage(fields.get("prompt_eval_count", 0), fields.get("eval_count", 0))

    def read_reply(self, reply: dict, meter: Meter) -> None:
        meter.report({"prompt_eval_count": reply.get("prompt_eval_count"),
                      "eval_count": reply.get("eval_count")})

    def observe(self, event: dict, meter: Meter) -> bool:
        text = self.text_of(event)
        if isinstance(text, str):
            meter.characters += len(text)
        if event.get("done") is True:
            self.read_reply(event, meter)
            meter.final = True
        return True

    @staticmethod
    def text_of(event: dict) -> object:
        message = event.get("message")
        return message.get("content") if isinstance(message, dict) else None

    def line(self, model: str, text: str, done: bool, usage: Usage = NO_USAGE) -> dict:
        line: dict = {"model": model, "created_at": _rfc3339_now(),
                      "message": {"role": "assistant", "content": text}, "done": done}
        if done:
            line.update(done_reason="stop", total_duration=0, load_duration=0,
                        prompt_eval_count=usage.input, prompt_eval_duration=0,
                        eval_count=usage.output, eval_duration=0)
        return line

    def reply(self, model: str, text: str, usage: Usage = NO_USAGE) -> dict:
        return self.line(model, text, True, usage)

    def reply_stream(self, model: str, pieces: Sequence[str], usage: Usage | None = NO_USAGE,
                     ) -> Iterator[bytes]:
        for piece in pieces:
            yield json_bytes(self.line(model, piece, False)) + b"\n"
        yield json_bytes(self.line(model, "", True, usage or NO_USAGE)) + b"\n"

    def error_body(self, error: ProxyError) -> dict:
        return {"error": error.message}


class OllamaGenerate(OllamaChat):
    routes = ("/api/generate",)

    @staticmethod
    def text_of(event: dict) -> object:
        return event.get("response")

    def line(self, model: str, text: str, done: bool, usage: Usage = NO_USAGE) -> dict:
        line = super().line(model, text, done, usage)
        del line["message"]
        line["response"] = text
        return line


class Embeddings(Dialect):
    """Input only: charged the prompt's estimate (or a request), refused with a 429 when empty."""

    name = "embeddings"
    routes = ("/v1/embeddings",)
    answers_with_text = False

    def output_allowance(self, payload: dict) -> int | None:
        return 0


class OllamaEmbed(OllamaChat):
    routes = ("/api/embed", "/api/embeddings")
    stream_default = False
    answers_with_text = False

    def output_allowance(self, payload: dict) -> int | None:
        return 0

    def limit_output(self, payload: dict, tokens: int) -> bool:
        return False


class FlatRate(Dialect):
    """Any other call under /v1 that does work (rerank, audio, images ...): one request's cost.

    Its errors are in the shape of the API it lies under (``shape``: Anthropic's for
    /v1/messages/batches), OpenAI's by default.
    """

    name = "other"
    flat_rate = True
    answers_with_text = False

    def __init__(self, shape: Dialect | None = None, name: str = "other") -> None:
        self.shape = shape
        self.name = name  # the metrics' endpoint; a price per call would be found by it

    def validate(self, payload: dict) -> None:
        pass  # not ours to judge: forwarded as sent

    def error_body(self, error: ProxyError) -> dict:
        return self.shape.error_body(error) if self.shape is not None else super().error_body(error)


def _rfc3339_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


CHAT = ChatCompletions()
OPENAI = FlatRate()
ANTHROPIC = AnthropicMessages()
OLLAMA = OllamaChat()
RESPONSES = Responses()
DIALECTS: tuple[Dialect, ...] = (CHAT, TextCompletions(), RESPONSES, ANTHROPIC, OLLAMA,
                                 OllamaGenerate(), Embeddings(), OllamaEmbed())
# Calls counted one by one, each under its own name (the route table's endpoint), so that a
# price per call can be found by that name.
PER_CALL: tuple[FlatRate, ...] = (FlatRate(name="images"), FlatRate(name="audio"))
METERED_ENDPOINTS = frozenset(dialect.name for dialect in DIALECTS + (OPENAI,) + PER_CALL)


# --------------------------------------------------------------------------
# Prices: MODELS_FILE
# --------------------------------------------------------------------------

PRICE_FIELDS = ("input", "cached_input", "cache_write", "output",  # per million tokens
                "per_call")  # per call, for what is not counted in tokens (images, audio)
MODEL_FIELDS = ("price", "max_output",
                "upstream", "upstream_model", "sticky")  # (the servers': parse_upstreams reads them)
CATALOG_FIELDS = ("currency", "models", "upstreams")
TOKENS_A_PRICE = 10 ** 6  # prices are per million tokens


class Price(NamedTuple):
    """A model's prices per million tokens, exact (decimal text as written, not binary floats).

    Reasoning tokens are output tokens; a cached input token costs ``cached_input``
    and a cache write ``cache_write``, each the input price when not given.
    """

    input: Fraction
    output: Fraction
    cached_input: Fraction
    cache_write: Fraction
    per_call: Fraction = Fraction(0)  # a flat-rate call's (an image, a transcription), not per token

    def nanos(self, used: Usage) -> int:
        """What ``used`` costs, in nano-units of the currency, rounded to the nearest."""
        uncached = max(0, used.input - used.cached_input - used.cache_write)
        total = (uncached * self.input + used.cached_input * self.cached_input
                 + used.cache_write * self.cache_write + used.output * self.output)
        return math.floor(total * NANOS / TOKENS_A_PRICE + Fraction(1, 2))

    def cost(self, used: Usage) -> float:
        """What ``used`` costs, in the currency."""
        return self.nanos(used) / NANOS

    def input_nanos(self, tokens: int) -> int:
        """An upper bound on what ``tokens`` of prompt cost: each at the dearest input price."""
        return math.ceil(tokens * max(self.input, self.cache_write) * NANOS / TOKENS_A_PRICE)

    @property
    def output_nanos_per_token(self) -> float:
        return float(self.output * NANOS / TOKENS_A_PRICE)

    @property
    def call_nanos(self) -> int:
        """What one flat-rate call costs (``per_call``), in nano-units."""
        return math.ceil(self.per_call * NANOS)


class ModelInfo(NamedTuple):
    price: Price | None
    max_output: int | None


class ModelCatalog:
    """What MODELS_FILE says: the currency and, by model name, its price and output limit.

    ``{"currency": "USD", "models": {"gpt-4.1-mini": {"price": {"input": 0.40,
    "cached_input": 0.10, "output": 1.60}, "max_output": 32768}}}``.  Read strictly:
    a field the proxy does not know is refused with the name it probably meant, so
    that a misspelt price is never silently the input price.  A new kind of entry is
    one more name in ``CATALOG_FIELDS`` and one more reader.
    """

    def __init__(self, currency: str = "USD", models: dict[str, ModelInfo] | None = None) -> None:
        self.currency = currency
        self.models = models or {}

    def price(self, model: str | None) -> Price | None:
        info = self.models.get(model or "")
        return None if info is None else info.price

    def max_output(self, model: str | None) -> int | None:
        info = self.models.get(model or "")
        return None if info is None else info.max_output

    @classmethod
    def parse(cls, text: str) -> ModelCatalog:
        """The catalog a file's text describes, or ConfigError naming what is wrong and where."""
        try:
            document = _STRICT_JSON.decode(text)
        except ProxyError as error:
            raise ConfigError(f"not valid JSON ({error.message})") from None
        except RecursionError:
            raise ConfigError("not valid JSON (nested too deeply)") from None
        except ValueError as error:
            raise ConfigError(f"not valid JSON ({error})") from None
        _known_fields(document, CATALOG_FIELDS, "the file")
        currency = document.get("currency", "USD")
        if not (isinstance(currency, str) and 0 < len(currency) <= 16 and currency.isprintable()):
            raise ConfigError("currency must be a short name, such as \"USD\"")
        models = document.get("models", {})
        if not isinstance(models, dict):
            raise ConfigError("models must be an object mapping each model name to its entry")
        return cls(currency, {name: _model_info(entry, f"model {name!r}")
                              for name, entry in models.items()})


def _known_fields(value: object, known: Sequence[str], where: str) -> dict:
    """``value`` as an object of only ``known`` fields; a misspelt one is named with its fix."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object with {', '.join(known)}")
    for name in value:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            raise ConfigError(f"{where}: unknown field {name[:100]!r}{hint}")
    return value


def _model_info(entry: object, where: str) -> ModelInfo:
    entry = _known_fields(entry, MODEL_FIELDS, where)
    max_output = entry.get("max_output")
    if max_output is not None and (isinstance(max_output, bool) or not isinstance(max_output, int)
                                   or not 1 <= max_output <= MAX_COUNT):
        raise ConfigError(f"{where}: max_output must be a whole number of tokens, at least 1")
    price = None
    if "price" in entry:
        prices = _known_fields(entry["price"], PRICE_FIELDS, f"{where} price")
        for name, value in prices.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ConfigError(f"{where} price: {name} must be a number, 0 or more "
                                  "(per million tokens)")
        for name in ("input", "output"):
            if name not in prices and "per_call" not in prices:  # (an image model has no tokens)
                raise ConfigError(f"{where} price: {name} is missing (per million tokens)")
        exact = {name: Fraction(repr(value)) for name, value in prices.items()}
        zero = Fraction(0)
        price = Price(exact.get("input", zero), exact.get("output", zero),
                      exact.get("cached_input", exact.get("input", zero)),
                      exact.get("cache_write", exact.get("input", zero)), exact.get("per_call", zero))
    return ModelInfo(price, max_output)


class WatchedFile:
    """A settings file re-read when it changes (or on SIGHUP); a broken edit keeps the last good one.

    The housekeeping thread asks each (KEYS_FILE, MODELS_FILE's prices and its servers)
    every second.  A subclass says where it is (``watched_path``), reads it (``reload``,
    which sets ``_stamp`` to what it read) and says what it holds (``setting``, ``kept``,
    ``loaded``).  A missing or broken file is reported once, not every second.
    """

    setting = ""  # the variable that names it, for the log
    kept = ""     # what stays when an edit is broken
    _stamp: tuple | None = None

    @property
    def watched_path(self) -> str | None:
        raise NotImplementedError

    def reload(self) -> None:
        raise NotImplementedError

    def loaded(self) -> str:
        raise NotImplementedError

    def read_text(self) -> str:
        """The file's text, and the stamp ``reload_if_changed`` compares: of what was read."""
        path = self.watched_path
        assert path is not None
        try:
            with open(path, encoding="utf-8") as file:
                stamp = _file_stamp(os.fstat(file.fileno()))
                text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read it ({type(error).__name__})") from None
        self._stamp = stamp
        return text

    def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read the file if it changed (or when forced, as on SIGHUP); True if reloaded."""
        path = self.watched_path
        if not path:
            return False
        try:
            stamp: tuple | None = _file_stamp(os.stat(path))
        except OSError:
            stamp = None
        if not force and stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.reload()
        except ConfigError as error:
            log.error("%s %s: %s; keeping the previous %s", self.setting, path, error, self.kept)
            return False
        log.info("%s %s: loaded, %s", self.setting, path, self.loaded())
        return True


class ModelsFile(WatchedFile):
    """MODELS_FILE's prices, re-read when it changes (or on SIGHUP)."""

    setting, kept = "MODELS_FILE", "prices"

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.catalog = ModelCatalog()
        self._stamp: tuple | None = None
        if path:
            try:
                self.reload()
            except ConfigError as error:
                raise ConfigError(f"MODELS_FILE {path}: {error}") from None

    def reload(self) -> None:
        self.catalog = ModelCatalog.parse(self.read_text())

    @property
    def watched_path(self) -> str | None:
        return self.path

    def loaded(self) -> str:
        return f"{len(self.catalog.models)} models"


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
    users: UserSpec | None = None         # an app key: each end user gets buckets of their own
    enabled: bool = True
    expires: str | None = None            # YYYY-MM-DD: the last local day the key works
    id: str | None = None                 # the entry's own name for its buckets and history
    endpoints: frozenset[str] | None = None  # the route table's groups it may call; None: the open ones
    weight: int = 1                       # turns in the fair queue for each one of a weight-1 key
    priority: int = 0                     # a higher class is served first in the fair queue
    when_limited: str | None = None       # the model that serves a call its windows cannot pay

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def opens(self, route: Route) -> bool:
        """Whether this key may call ``route``: a row of a group its ``endpoints`` lists, or,
        without a list, any row that is not opt-in.  Rows of no group (local answers, the model
        lists, the quota) are every key's: clients probe them before anything else."""
        if route.group is None:
            return True
        if self.endpoints is None:
            return not route.opt_in
        return route.group in self.endpoints

    def require_endpoint(self, route: Route) -> None:
        """A 403, free and never forwarded, for a row this key may not call."""
        if not self.opens(route):
            raise ProxyError(403, f"The '{route.group}' endpoint is not open to this key.",
                             "permission_error", "endpoint_not_allowed")

    @property
    def limits_models(self) -> bool:
        """Whether this key, or any end user under it, may use only some models."""
        users = self.users
        return self.models is not None or (users is not None and (
            users.default.models is not None
            or any(policy.models is not None for policy in users.overrides.values())))

    def require(self, model: str | None) -> None:
        """A 403, free, for a model off the key's list."""
        if not self.allows(model or ""):
            raise ProxyError(403, f"The model '{str(model)[:200]}' is not available to this key.",
                             "permission_error", "model_not_allowed", "model")

    def quota(self, levels: list[dict]) -> dict:
        """What ``GET /v1/quota`` shows a caller about itself."""
        return {"object": "quota", "name": self.name or None,
                "models": None if self.models is None else list(self.models),
                "max_concurrent": self.max_concurrent or None, "buckets": levels}


def key_digest(key: str) -> str:
    """The name under which a key's buckets are kept and saved; the key itself never is."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


POLICY_FIELDS = {"name", "max_tokens", "refill_tokens", "refill_interval_seconds", "buckets",
                 "models", "max_concurrent", "users", "enabled", "expires", "id", "email", "endpoints",
                 "weight", "priority", "when_limited"}
MAX_WEIGHT = 1000  # turns in a row for one key: more would hold everyone else up for a long round
MAX_PRIORITY = 1000
USER_SOURCES = {"jwt": "X-OpenWebUI-User-Jwt", "header": None, "user_field": None}
USERS_FIELDS = POLICY_FIELDS - {"name", "users", "enabled", "expires", "id", "email", "endpoints"} | {
    "from", "header", "secret_env", "issuer", "required", "overrides"}
MAX_USER_LENGTH = 256  # longer identities are refused, not truncated into someone else's
MIN_JWT_SECRET_BYTES = 32  # HS256 wants a key as long as its hash (RFC 7518, 3.2); shorter can be guessed
ENTRY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # safe in an identity, a state file and a log line
WINDOW_FIELDS = {"name", "max_tokens", "refill_tokens", "refill_interval_seconds", "unit", "period",
                 "models", "max_amount", "refill_amount", "overdraft", "when_limited"}
MAX_AMOUNT = MAX_WINDOW_TOKENS // NANOS  # the largest money window, in the currency


def stored_secret(key: str) -> tuple[str, bytes]:
    """A keys-file entry's lookup digest and the SHA-256 that a presented key must match.

    An entry is a plain key, or ``sha256:<hex>`` (what ``keys add`` writes), so that
    the file need not hold keys at all; both forms give the same digest, and a key
    moved from one form to the other keeps its buckets.
    """
    if key.startswith("sha256:"):
        text = key[len("sha256:"):].lower()
        if not re.fullmatch(r"[0-9a-f]{64}", text):
            raise ConfigError("a 'sha256:' entry needs the key's 64 hex digit SHA-256")
        return text[:32], bytes.fromhex(text)
    full = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return full.hex()[:32], full


def parse_keys_file(text: str, config: Config,
                    require_secrets: bool = True) -> dict[str, tuple[bytes, Policy]]:
    """Policies by key digest from a keys file: ``{"<key>": {"name": ..., overrides...}}``.

    Errors name the entry by position and name, never by its key.
    """
    entries = keys_document(text)
    if not isinstance(entries, dict):
        raise ConfigError("must be a JSON object mapping each client key to its settings")
    policies = {}
    handles: set[str] = set()  # what each entry's buckets are kept under: its id, else its digest
    for position, (key, entry) in enumerate(entries.items(), 1):
        where = f"entry {position}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: settings must be an object")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']})"
        if not key.strip():
            raise ConfigError(f"{where}: the key is empty")
        try:
            digest, secret = stored_secret(key)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        policy = _policy_from_entry(entry, config, where, require_secrets)
        if policy.id is not None and policy.id in handles:
            raise ConfigError(f"{where}: id {policy.id!r} is another entry's already")
        handles.add(policy.id or digest)
        policies[digest] = (secret, policy)
    return policies


def keys_document(text: str) -> object:
    """The JSON value of a keys file, or ConfigError: any text at all is either one or the other.

    The file is re-read by the housekeeping thread, which expects ConfigError
    alone; ``json.loads`` also raises RecursionError (deep nesting, which is no
    ValueError), and takes ``\\ud800``-style escapes of lone surrogates, text
    no UTF-8 encoder accepts when the key is hashed or the name logged.
    """
    try:
        document = json.loads(text)
        json.dumps(document, ensure_ascii=False).encode("utf-8")  # finds any lone surrogate
    except RecursionError:
        raise ConfigError("not valid JSON (nested too deeply)") from None
    except UnicodeEncodeError:  # a ValueError too: caught first
        raise ConfigError("not valid JSON (a \\u escape stands for half a character, "
                          "a lone surrogate)") from None
    except ValueError as error:
        raise ConfigError(f"not valid JSON ({error})") from None
    return document


def _policy_from_entry(entry: dict, config: Config, where: str,
                       require_secrets: bool = True) -> Policy:
    unknown = set(entry) - POLICY_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown setting {sorted(unknown)[0]!r}")
    name = entry.get("name", "")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name must be a string")
    base = {"max_tokens": config.max_tokens, "refill_tokens": config.refill_tokens,
            "refill_interval_seconds": config.refill_interval, "overdraft": config.overdraft}
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
    users = (_users_from_entry(entry["users"], config, f"{where} users", require_secrets)
             if "users" in entry else None)
    enabled, expires = entry.get("enabled", True), entry.get("expires")
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: enabled must be true or false")
    if expires is not None and not (isinstance(expires, str) and _is_date(expires)):
        raise ConfigError(f"{where}: expires must be a date, YYYY-MM-DD")
    entry_id, email = entry.get("id"), entry.get("email", "")
    if entry_id is not None and not (isinstance(entry_id, str) and ENTRY_ID.fullmatch(entry_id)):
        raise ConfigError(f"{where}: id must be 1 to 64 letters, digits, '-' or '_'")
    if not isinstance(email, str):
        raise ConfigError(f"{where}: email must be a string")
    fallback = _when_limited(entry.get("when_limited"), where)
    weight, priority = _turns_from_entry(entry, where)
    policy = Policy(name, buckets, None if models is None else tuple(models), limit, users,
                    enabled, expires, entry_id, _endpoint_names(entry.get("endpoints"), where),
                    weight, priority, fallback)
    _require_listed_fallbacks(policy, policy.models, where)
    if users is not None and policy.models is not None:  # a user's fallback is the app's call too
        for user_policy in (users.default, *users.overrides.values()):
            _require_listed_fallbacks(user_policy, policy.models, f"{where} users")
    return policy


def _when_limited(value: object, where: str) -> str | None:
    """A ``when_limited`` setting, ``{"model": NAME}``: the model that serves a call instead of
    the limit reply when the windows for the model asked are empty (None: not set)."""
    if value is None:
        return None
    if not (isinstance(value, dict) and set(value) == {"model"} and isinstance(value["model"], str)
            and value["model"].strip() and value["model"].isprintable()
            and len(value["model"]) <= MAX_USER_LENGTH):  # (it is sent in a header)
        raise ConfigError(f"{where}: when_limited must be {{\"model\": \"<model name>\"}}, the "
                          "model that serves a request when its windows are empty")
    return value["model"]


def _require_listed_fallbacks(policy: Policy, models: Sequence[str] | None, where: str) -> None:
    """A fallback model off the key's list would be a way round it: refused when the file loads."""
    if models is None:
        return
    for fallback in (policy.when_limited, *(spec.when_limited for spec in policy.buckets)):
        if fallback is not None and fallback not in models:
            raise ConfigError(f"{where}: when_limited model {fallback[:100]!r} is not on the key's "
                              f"models list ({', '.join(models)[:200]})")


def _endpoint_names(value: object, where: str) -> frozenset[str] | None:
    """A key's ``endpoints``: names of the route table's groups (``ENDPOINT_NAMES``), checked
    here so that a misspelt one stops the file from loading instead of closing an API."""
    if value is None:
        return None
    if not (isinstance(value, list) and all(isinstance(name, str) for name in value)):
        raise ConfigError(f"{where}: endpoints must be a list of endpoint names")
    for name in value:
        if name not in ENDPOINT_NAMES:
            close = difflib.get_close_matches(name, ENDPOINT_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown endpoint {name[:100]!r}{hint}; the endpoints are "
                              f"{', '.join(ENDPOINT_NAMES)}")
    return frozenset(value)


def _turns_from_entry(entry: dict, where: str) -> tuple[int, int]:
    """An entry's ``weight`` and ``priority`` in the fair queue, whole numbers in range.

    A bool is refused though Python counts it an int: ``"weight": true`` is a slip, not 1.
    """
    weight, priority = entry.get("weight", 1), entry.get("priority", 0)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise ConfigError(f"{where}: weight must be a whole number from 1 to {MAX_WEIGHT} "
                          "(turns in the queue for each one of a weight-1 key)")
    if (isinstance(priority, bool) or not isinstance(priority, int)
            or not -MAX_PRIORITY <= priority <= MAX_PRIORITY):
        raise ConfigError(f"{where}: priority must be a whole number from {-MAX_PRIORITY} to "
                          f"{MAX_PRIORITY} (higher is served first; 0 by default)")
    return weight, priority


def _is_date(text: str) -> bool:
    try:
        time.strptime(text, "%Y-%m-%d")
    except ValueError:
        return False
    return bool(re.fullmatch(r"\d{4}-\d\d-\d\d", text))


@dataclass(frozen=True)
class UserSpec:
    """How an app key (a chat app used by many people) names its end user, and their limits.

    ``jwt``: a signed HS256 token (Open WebUI's ``X-OpenWebUI-User-Jwt``), the
    user being its ``email`` claim, else ``sub``; ``header``: a plain header,
    safe only while the app key stays secret; ``user_field``: the request's
    ``user`` field (Anthropic: ``metadata.user_id``).
    """

    source: str
    header: str | None
    secret: bytes | None = field(repr=False)
    issuer: str | None
    required: bool
    default: Policy
    overrides: dict[str, Policy]  # by user digest, so that saved buckets find their policy

    def policy_for(self, digest: str) -> Policy:
        return self.overrides.get(digest, self.default)


def user_key(user: str) -> str:
    """What tells end users apart: KID@Home.LAN is kid@home.lan, as mail and people see it.

    Otherwise a user escapes their override, and gets fresh buckets, by capitalising.
    ``lower()``, as Open WebUI keeps its accounts' emails, not ``casefold()``, which
    would make boß@home.lan (another account there) the same user as boss@home.lan.
    """
    return user.strip().lower()


def user_digest(user: str) -> str:
    """The name under which a user's buckets (and override) are kept, the same for any case."""
    return hashlib.sha256(user_key(user).encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _b64url(text: str) -> bytes:
    """Strict base64url: one spelling per value, so a token has no equivalent variants."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode() != text:
        raise ValueError("not canonical base64url")
    return data


def verify_jwt(token: str, secret: bytes, now: float, issuer: str | None = None,
               leeway: float = 30.0) -> dict:
    """The claims of an HS256 JSON Web Token, or ValueError saying why it is refused.

    Only HS256 is accepted, whatever the token's header claims (``none`` above
    all), the signature is compared in constant time, and ``exp`` is required.
    """
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise ValueError("malformed token")
    try:
        header = json.loads(_b64url(parts[0]))
        signature = _b64url(parts[2])
    except (ValueError, RecursionError):
        raise ValueError("malformed token") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise ValueError("unsupported algorithm")
    expected = hmac.new(secret, f"{parts[0]}.{parts[1]}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        raise ValueError("bad signature")
    try:
        claims = json.loads(_b64url(parts[1]))
    except (ValueError, RecursionError):
        raise ValueError("malformed claims") from None
    if not isinstance(claims, dict):
        raise ValueError("malformed claims")
    expires = claims.get("exp")
    if (isinstance(expires, bool) or not isinstance(expires, (int, float))
            or not math.isfinite(expires) or now > expires + leeway):
        raise ValueError("expired token")
    not_before = claims.get("nbf")
    if isinstance(not_before, (int, float)) and (not math.isfinite(not_before)
                                                  or now + leeway < not_before):
        raise ValueError("token not yet valid")
    if issuer is not None and claims.get("iss") != issuer:
        raise ValueError("wrong issuer")
    return claims


def end_user(spec: UserSpec, headers: Headers, payload: dict | None, dialect: Dialect,
             now: float) -> str | None:
    """The end user an app key's request is for; None if it names none, ValueError if invalid."""
    if spec.source == "user_field":
        user = dialect.user_of(payload) if payload is not None else None
    else:
        value = headers.get(spec.header or "")
        if not value:
            return None
        if spec.source == "jwt":
            assert spec.secret is not None
            claims = verify_jwt(value, spec.secret, now, spec.issuer)
            user = claims.get("email") or claims.get("sub")
        else:
            user = value.strip()
    if user is None:
        return None
    if (not isinstance(user, str) or not user.strip() or len(user) > MAX_USER_LENGTH
            or not user.isprintable()):
        raise ValueError("unusable user identity")
    return user.strip()


def _users_from_entry(spec: object, config: Config, where: str,
                      require_secrets: bool = True) -> UserSpec:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be an object")
    unknown = set(spec) - USERS_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown setting {sorted(unknown)[0]!r}")
    source = spec.get("from")
    if not isinstance(source, str) or source not in USER_SOURCES:  # (a list: TypeError, unhashable)
        raise ConfigError(f"{where}: 'from' must be one of {', '.join(sorted(USER_SOURCES))}")
    header = spec.get("header", USER_SOURCES[source])
    if source != "user_field" and not (isinstance(header, str) and _TOKEN.fullmatch(header)):
        raise ConfigError(f"{where}: 'header' must name the header that carries the user")
    secret = None
    if source == "jwt":
        variable = spec.get("secret_env")
        if not isinstance(variable, str) or not variable:
            raise ConfigError(f"{where}: 'secret_env' must name the environment variable that "
                              "holds the JWT secret (never the secret itself)")
        secret = os.environ.get(variable, "").encode("utf-8", "surrogateescape")  # its bytes, as set
        if not secret and require_secrets:
            raise ConfigError(f"{where}: the environment variable {variable} is not set")
        if len(secret) < MIN_JWT_SECRET_BYTES and require_secrets:  # never the value, in any message
            raise ConfigError(f"{where}: the JWT secret in {variable} is shorter than "
                              f"{MIN_JWT_SECRET_BYTES} bytes (make one with: openssl rand -hex 32)")
    issuer = spec.get("issuer")
    required = spec.get("required", True)
    if issuer is not None and not isinstance(issuer, str) or not isinstance(required, bool):
        raise ConfigError(f"{where}: 'issuer' must be a string and 'required' true or false")
    limits = {k: v for k, v in spec.items() if k in POLICY_FIELDS}
    default = _policy_from_entry(limits, config, where)
    overrides = spec.get("overrides", {})
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ConfigError(f"{where}: 'overrides' must map each user to their settings")
    by_user: dict[str, Policy] = {}
    spelled: dict[str, str] = {}  # each user as written first, to name both of two in one message
    for user, entry in overrides.items():
        digest = user_digest(user)
        if digest in by_user:
            raise ConfigError(f"{where}: overrides {spelled[digest]!r} and {user!r} are one user "
                              "(case is ignored)")
        spelled[digest] = user
        by_user[digest] = _policy_from_entry(dict(limits, **entry), config, f"{where} {user}")
    return UserSpec(source, header if source != "user_field" else None, secret,
                    issuer, required, default, by_user)


def _window(window: object, base: dict, where: str) -> BucketSpec:
    if not isinstance(window, dict) or set(window) - WINDOW_FIELDS:
        raise ConfigError(f"{where}: must be an object with {', '.join(sorted(WINDOW_FIELDS))}")
    unit = window.get("unit", "")
    if not isinstance(unit, str) or unit not in WINDOW_UNITS:
        raise ConfigError(f"{where}: unit must be \"requests\", \"tokens\" or \"money\"")
    values = dict(base, **{k: v for k, v in window.items() if k != "name"})
    if unit == MONEY:
        values.update(_money_limits(window, where))
    elif "max_amount" in window or "refill_amount" in window:
        raise ConfigError(f"{where}: max_amount and refill_amount are for \"unit\": \"money\"")
    for field_name in ("max_tokens", "refill_tokens"):
        value = values[field_name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WINDOW_TOKENS:
            raise ConfigError(f"{where}: {field_name} must be a whole number from 1 to "
                              f"{MAX_WINDOW_TOKENS:,}")
    interval = values["refill_interval_seconds"]
    # Compared before float() sees it: an int too large for a float raises OverflowError
    # there, and infinity (1e400 in JSON) or NaN would pass a mere "> 0".
    if (isinstance(interval, bool) or not isinstance(interval, (int, float))
            or not MIN_REFILL_SECONDS <= interval <= MAX_REFILL_SECONDS):
        raise ConfigError(f"{where}: refill_interval_seconds must be a number of seconds from "
                          f"{MIN_REFILL_SECONDS:g} to {MAX_REFILL_SECONDS:.0f} (a century)")
    name = window.get("name", "")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name must be a string")
    period, models, overdraft = window.get("period"), window.get("models"), values.get("overdraft", False)
    fallback = _when_limited(window.get("when_limited"), where)
    if period is not None and (not isinstance(period, str)
                               or period not in PERIOD_DAYS and period != TOTAL):  # as above
        raise ConfigError(f"{where}: period must be \"day\", \"week\", \"month\" or \"total\"")
    if models is not None and not (isinstance(models, list) and models
                                   and all(isinstance(m, str) for m in models)):
        raise ConfigError(f"{where}: models must be a list of model names")
    if not isinstance(overdraft, bool):
        raise ConfigError(f"{where}: overdraft must be true or false")
    capacity, models = values["max_tokens"], tuple(models) if models else None
    if period == TOTAL:  # never refills: a budget
        return BucketSpec(capacity, 0, math.inf, name, unit, TOTAL, models, overdraft, fallback)
    if period is not None:  # full again at each start: one refill of everything per period
        return BucketSpec(capacity, capacity, PERIOD_DAYS[period] * 86400.0, name, unit, period,
                          models, overdraft, fallback)
    return BucketSpec(capacity, values["refill_tokens"], float(interval), name, unit, None,
                      models, overdraft, fallback)


def _money_limits(window: dict, where: str) -> dict:
    """A money window's amounts, in the currency, as the whole nano-units a bucket counts.

    Its size is ``max_amount`` (never ``max_tokens``, which would be read as tokens);
    ``refill_amount`` (default: all of it) is what each refill step adds.
    """
    if "max_tokens" in window or "refill_tokens" in window:
        raise ConfigError(f"{where}: a money window is sized by max_amount (and refill_amount), "
                          "in the currency of MODELS_FILE")
    limits = {}
    for field_name, counted in (("max_amount", "max_tokens"), ("refill_amount", "refill_tokens")):
        value = window.get(field_name, window.get("max_amount"))
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not (math.isfinite(value) and 0 < value <= MAX_AMOUNT)):
            raise ConfigError(f"{where}: {field_name} must be an amount of money above 0 "
                              f"and at most {MAX_AMOUNT:,}")
        limits[counted] = max(1, round(Fraction(repr(value)) * NANOS))
    return limits


class KeyRing(WatchedFile):
    """The accepted client keys and the policy each one pays under.

    Keys come from PROXY_API_KEYS (the default policy) and KEYS_FILE (its own
    policies).  The file is re-read when it changes; a broken file keeps the
    previous policies.  With neither, the proxy is open: any caller pays under
    the default policy, by key or by IP.
    """

    setting, kept = "KEYS_FILE", "keys"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.default = Policy("", (config.bucket,), None, config.max_concurrent_per_key)
        self._static = {digest: (secret, self.default)
                        for digest, secret in map(stored_secret, config.client_keys)}
        self._policies = dict(self._static)
        self._by_handle = {digest: policy for digest, (_, policy) in self._static.items()}
        self._stamp: tuple | None = None
        self._reading = threading.Lock()  # the admin API re-reads too: the last read is the newest
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
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        digest = presented.hex()[:32]
        entry = self._policies.get(digest)
        if entry is None or not hmac.compare_digest(entry[0], presented):
            return digest, None
        return digest, entry[1]

    def identify(self, token: str | None, address: str,
                 when: float = 0.0) -> tuple[str, str, Policy] | None:
        """Whose buckets pay, a name for the logs, and the policy; None when the key is refused.

        In open mode any key (or, without one, the caller's address) gets the
        default policy and a bucket of its own.  A disabled or expired key is a
        401 that says so.
        """
        if token is not None:
            digest, policy = self.lookup(token)
            if policy is not None and not policy.enabled:
                raise ProxyError(401, "This key is disabled.", "authentication_error", "key_disabled")
            if policy is not None and policy.expires is not None and local_day(when) > policy.expires:
                raise ProxyError(401, f"This key expired on {policy.expires}.",
                                 "authentication_error", "key_expired")
            if policy is not None or self.is_open:
                policy = policy or self.default
                handle = policy.id or digest
                return "key:" + handle, policy.name or handle[:12], policy
        elif self.is_open:
            return "ip:" + address, "ip:" + address, self.default
        return None

    @property
    def key_count(self) -> int:
        return len(self._policies)

    def entries(self) -> list[tuple[str, Policy]]:
        """Every accepted key's handle (its entry's id, else its digest: what its identity is
        made of) and policy, for the owner's view (never the key)."""
        return [(policy.id or digest, policy) for digest, (_, policy) in self._policies.items()]

    def policy_by_handle(self, handle: str) -> Policy | None:
        """The policy of the entry whose identity is ``"key:" + handle``, if it is loaded."""
        return self._by_handle.get(handle)

    def uses_environment_limits(self) -> bool:
        """Whether some caller pays under MAX_TOKENS: open mode, PROXY_API_KEYS, or a keys-file
        entry (or an end user under one) with a token window of that capacity."""
        if self.is_open or self.config.client_keys:
            return True
        mode, capacity = self.config.mode, self.config.max_tokens
        policies = [policy for _, policy in self.entries()]
        policies += [user for policy in policies if policy.users is not None
                     for user in (policy.users.default, *policy.users.overrides.values())]
        return any(spec.capacity == capacity and mode.unit_of(spec).counts_tokens
                   for policy in policies for spec in policy.buckets)

    def policy_of(self, identity: str) -> Policy:
        """The policy whose buckets ``identity`` has: a key's, or a user's under an app key."""
        key, _, user = identity.partition("/user:")
        found = self._by_handle.get(key[len("key:"):]) if key.startswith("key:") else None
        policy = found or self.default
        if user and policy.users is not None:
            return policy.users.policy_for(user)
        return policy

    def reload(self) -> None:
        """Read KEYS_FILE now; raises ConfigError (keeping the old policies) when it is broken."""
        with self._reading:
            policies = {**self._static, **parse_keys_file(self.read_text(), self.config)}
            self._policies, self._by_handle = policies, {
                policy.id or digest: policy for digest, (_, policy) in policies.items()}

    @property
    def watched_path(self) -> str | None:
        return self.config.keys_file

    def loaded(self) -> str:
        return f"{self.key_count} client keys in all"


def _file_stamp(info: os.stat_result) -> tuple:
    return (info.st_ino, info.st_size, info.st_mtime_ns)


class StoredAnswers:
    """Which key made each stored answer the proxy relayed, so that only it may read it again.

    A server that stores answers (OpenAI keeps responses by default) serves them to
    anyone with the upstream key and the id: through the proxy, that is every key.  So a
    stored answer, or a conversation continued from one (``previous_response_id``), is
    found only by the key whose request made it; an id the proxy never relayed (made
    elsewhere, or forgotten after ``limit`` newer ones) is found by nobody.  Users of one
    app key share its answers: the app, not the proxy, keeps them apart.
    """

    def __init__(self, limit: int = 20_000) -> None:
        self.limit = limit
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._servers: dict[str, str] = {}  # which model server made it, when there are several
        self._lock = threading.Lock()

    def record(self, answer_id: str, owner: str, server: str | None = None) -> None:
        with self._lock:
            self._owners[answer_id] = owner
            self._owners.move_to_end(answer_id)
            if server is not None:
                self._servers[answer_id] = server
            while len(self._owners) > self.limit:
                self._servers.pop(self._owners.popitem(last=False)[0], None)

    def owned_by(self, answer_id: str, owner: str) -> bool:
        with self._lock:
            return self._owners.get(answer_id) == owner

    def server_of(self, answer_id: str) -> str | None:
        """The model server that made the answer: only it can read, cancel or continue it."""
        with self._lock:
            return self._servers.get(answer_id)

    def dump(self) -> dict[str, object]:
        with self._lock:
            return {answer_id: [owner, self._servers[answer_id]] if answer_id in self._servers
                    else owner for answer_id, owner in self._owners.items()}

    def load(self, saved: dict) -> None:
        entries = []
        for answer_id, value in saved.items():  # an owner, or [owner, server]
            owner, server = (value, None) if isinstance(value, str) else tuple(value)
            if not (isinstance(answer_id, str) and isinstance(owner, str)
                    and (server is None or isinstance(server, str))):
                raise ValueError("unexpected stored-answer entry")
            entries.append((answer_id, owner, server))
        for answer_id, owner, server in entries:
            self.record(answer_id, owner, server)


# --------------------------------------------------------------------------
# Routes: every path the proxy knows, in one table
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """One row of the route table: the requests it takes, and what answers them.

    ``path`` (lower case) matches itself, and with ``subtree`` every path under it.
    ``methods`` are those the row takes (None: any); a request with another method
    goes on to the next row that matches, or with ``strict`` gets a 405.  ``answer``
    names the ``ProxyHandler`` method that answers (``answer_<name>``); ``dialect``
    is the API spoken (its error shape from the request line on; for a metered row,
    what is charged); ``endpoint`` names the row in the metrics.  With
    ``names_answer`` the path's next segment is a stored answer's id.  ``group`` is
    the name a key's ``endpoints`` lists to call the row (None: every key may, a local
    answer, a model list or the quota); an ``opt_in`` group is closed to a key that
    does not list it.
    """

    path: str
    answer: str
    dialect: Dialect = OPENAI
    methods: tuple[str, ...] | None = None
    subtree: bool = False
    strict: bool = False
    needs_key: bool = True
    endpoint: str = "free"
    names_answer: bool = False
    group: str | None = None
    opt_in: bool = False

    def matches(self, path: str) -> bool:
        return path == self.path or (self.subtree and path.startswith(self.path + "/"))


READING = ("GET", "HEAD")
# Account and batch APIs of paid providers: through them a key would start work that is never
# metered (a batch runs later) or see every caller's files and jobs.  Opt-in: closed to a key
# whose "endpoints" does not name them (its owner's own key may), then forwarded like any other
# call under /v1, reading free and the rest at the flat cost.
ACCOUNT_APIS = ("files", "uploads", "batches", "fine_tuning", "vector_stores", "assistants",
                "threads", "organization", "containers", "evals")
# Closed to every key: realtime hands out a credential for the upstream itself, a stored
# conversation cannot be kept to the key that made it, and the adapters are the server's owner's.
CLOSED_UNDER_V1 = ("realtime", "conversations", "load_lora_adapter", "unload_lora_adapter")
# The group of a generating API's rows, where its dialect's name says less (text: /v1/completions).
DIALECT_GROUPS = {"text": "completions"}
# Ollama's routes that change the owner's models: never, whoever asks.
OLLAMA_MANAGEMENT = ("pull", "push", "create", "copy", "delete", "blobs")

# The first row that matches a request's path and method answers it.
ROUTES: tuple[Route, ...] = (
    # Without a key: what clients probe, and the owner's pages (which check the admin key).
    Route("/", "root", needs_key=False, endpoint="local"),
    Route("/health", "health", needs_key=False, endpoint="local"),
    Route("/favicon.ico", "favicon", needs_key=False, endpoint="local"),
    Route("/admin", "admin", needs_key=False, endpoint="local"),
    Route("/admin/api/usage", "admin", needs_key=False, endpoint="local"),
    Route("/admin/api/usage.csv", "admin", needs_key=False, endpoint="local"),
    # The keys over HTTP (``AdminView.keys_request``): the list and new keys, then one key's
    # edits at /admin/api/keys/{name}[/{action}].
    Route("/admin/api/keys", "admin_keys", methods=READING + ("POST",), strict=True, needs_key=False,
          endpoint="local"),
    Route("/admin/api/keys", "admin_keys", methods=("POST", "PATCH", "DELETE"), subtree=True,
          strict=True, needs_key=False, endpoint="local"),
    Route("/metrics", "admin", needs_key=False, endpoint="local"),
    # The APIs that generate: charged before forwarding, POST only.
    *(Route(path, "metered", dialect, ("POST",), strict=True, endpoint=dialect.name,
            group=DIALECT_GROUPS.get(dialect.name, dialect.name))
      for dialect in DIALECTS for path in dialect.routes),
    # Answered here, or forwarded free.
    Route("/v1/quota", "quota", methods=READING, endpoint="quota"),
    Route("/v1/models", "models", methods=READING, endpoint="models"),
    Route("/v1/models", "model_card", methods=READING, subtree=True, endpoint="models"),
    # Deleting a fine-tuned model is the account's business (the fine-tuning API's last step).
    Route("/v1/models", "metered", subtree=True, endpoint=OPENAI.name, group="fine_tuning", opt_in=True),
    Route("/api/tags", "models", OLLAMA, READING, endpoint="models"),
    Route("/api/ps", "running_models", OLLAMA, READING, strict=True, endpoint="models"),
    Route("/api/version", "free", OLLAMA, READING, strict=True),
    Route("/api/show", "free", OLLAMA, ("POST",), strict=True, group="ollama"),
    Route("/v1/messages/count_tokens", "free", ANTHROPIC, ("POST",), group="messages"),
    # Stored answers, for the key that made them: read and deleted free; anything else
    # (cancel ...) and the Responses calls that run the model pay the flat cost.
    *(Route(path, "free", RESPONSES, ("GET", "HEAD", "DELETE"), subtree=True, group="responses")
      for path in ("/v1/responses/compact", "/v1/responses/input_tokens")),
    Route("/v1/responses/compact", "metered", subtree=True, endpoint=OPENAI.name, group="responses"),
    Route("/v1/responses/input_tokens", "metered", subtree=True, endpoint=OPENAI.name, group="responses"),
    Route("/v1/responses", "free", RESPONSES, ("GET", "HEAD", "DELETE"), subtree=True, names_answer=True,
          group="responses"),
    Route("/v1/responses", "metered", subtree=True, names_answer=True, endpoint=OPENAI.name,
          group="responses"),
    Route("/v1/chat/completions", "free", CHAT, READING, subtree=True, names_answer=True, group="chat"),
    Route("/v1/chat/completions", "metered", subtree=True, names_answer=True, endpoint=OPENAI.name,
          group="chat"),
    # Opt-in: a paid provider's account and batch APIs (Anthropic's message batches too).
    Route("/v1/messages/batches", "free", ANTHROPIC, READING, subtree=True, group="batches", opt_in=True),
    Route("/v1/messages/batches", "metered", FlatRate(ANTHROPIC), subtree=True, endpoint=OPENAI.name,
          group="batches", opt_in=True),
    *(Route("/v1/" + name, answer, methods=methods, subtree=True, endpoint=endpoint, group=name,
            opt_in=True)
      for name in ACCOUNT_APIS
      for answer, methods, endpoint in (("free", READING, "free"), ("metered", None, OPENAI.name))),
    # Counted per call, each under its own endpoint name (a price per call's hook); reading free.
    *(Route("/v1/" + dialect.name, answer, dialect, methods, subtree=True, endpoint=endpoint,
            group=dialect.name)
      for dialect in PER_CALL
      for answer, methods, endpoint in (("free", READING, "free"), ("metered", None, dialect.name))),
    # Never through this proxy.
    *(Route("/v1/" + name, "closed", subtree=True, endpoint="local") for name in CLOSED_UNDER_V1),
    *(Route("/api/" + name, "management", OLLAMA, subtree=True, endpoint="local")
      for name in OLLAMA_MANAGEMENT),
    Route("/api", "unknown", needs_key=False, endpoint="local"),  # (/api itself: no API there)
    Route("/api", "not_found", OLLAMA, subtree=True, endpoint="local"),
    # Anything else under /v1: reading is free, everything else may make the model work.
    Route("/v1/messages", "free", ANTHROPIC, READING, subtree=True, group="messages"),
    Route("/v1/messages", "metered", FlatRate(ANTHROPIC), subtree=True, endpoint=OPENAI.name,
          group="messages"),
    Route("/v1", "free", methods=READING, subtree=True, group="other"),
    Route("/v1", "metered", subtree=True, endpoint=OPENAI.name, group="other"),
)
UNKNOWN = Route("", "unknown", needs_key=False, endpoint="local")  # no row: a 404, no key asked
# What a key's "endpoints" may name, in the table's order, and those closed unless named.
ENDPOINT_NAMES = tuple(dict.fromkeys(route.group for route in ROUTES if route.group))
OPT_IN_ENDPOINTS = tuple(dict.fromkeys(route.group for route in ROUTES if route.group and route.opt_in))
ROUTE_KEY_LENGTH = max(len(route.path) for route in ROUTES) + 1


def route_for(path: str, method: str) -> Route:
    """The row that answers ``method`` on ``path`` (lower case, as ``Target`` has it).

    Only the path's first ``ROUTE_KEY_LENGTH`` characters can decide (a row matches its
    path, or that path and a slash), so only they are looked up: clients send the same
    few paths, remembered, and a client sending long unique ones fills the memory with
    nothing of them.
    """
    return _route_for(path[:ROUTE_KEY_LENGTH], method)


@functools.lru_cache(maxsize=4096)
def _route_for(path: str, method: str) -> Route:
    for route in ROUTES:
        if route.matches(path):
            if route.methods is None or method in route.methods:
                return route
            if route.strict:
                return replace(route, answer="method_not_allowed", endpoint="local")
    return UNKNOWN


def dialect_of_target(raw: str) -> Dialect:
    """The API a raw request target belongs to, whatever its method; never raises (a target
    that does not parse: OpenAI's).

    Known from the request line, so that whatever refuses the request next (its
    headers, its framing, its size) answers in the shape its client reads.
    """
    try:
        return route_for(parse_target(raw).path.lower(), "").dialect
    except ProxyError:
        return OPENAI


def estimate_tokens(payload: dict, reserve: int, dialect: Dialect = CHAT,
                    prompt: int | None = None) -> int:
    """ceil(prompt characters / 4) plus the output allowance (or the reserve) for each answer
    asked for, at least 1."""
    allowance = dialect.output_allowance(payload)
    per_answer = reserve if allowance is None else allowance
    prompt = prompt_tokens(payload) if prompt is None else prompt
    return max(1, prompt + per_answer * dialect.answers(payload))


class CallCost:
    """What one call may cost in tokens, worked out once, and only as far as a window asks.

    ``estimate``: the prompt plus each answer's allowance (or the reserve).
    ``reservation`` (usage mode, overdraft windows): the prompt plus at most
    RESPONSE_TOKEN_RESERVE an answer, never more than ``capacity`` unless the prompt
    alone is, so that agents that allow themselves 32,000 output tokens are not refused
    before they used them.  ``asked``: the allowance a capping window reserves in full,
    the request's own or, when it sets none, the model's ``max_output`` (MODELS_FILE)
    or DEFAULT_MAX_OUTPUT_TOKENS.  ``price``: the model's, for money windows.
    A flat-rate call costs REQUEST_TOKEN_COST tokens whatever it says.
    """

    __slots__ = ("dialect", "payload", "config", "capacity", "price", "max_output", "made", "_prompt",
                 "_prompt_bound", "_estimate", "_reservation", "_allowance")

    def __init__(self, dialect: Dialect, payload: dict, config: Config, capacity: int,
                 price: Price | None = None, max_output: int | None = None, made: int = 1) -> None:
        self.dialect, self.payload, self.config, self.capacity = dialect, payload, config, capacity
        self.price, self.max_output = price, max_output
        self.made = made  # a flat-rate call's things made (n images), each at the price per call
        self._prompt: int | None = None
        self._prompt_bound: int | None = None
        self._estimate: int | None = None
        self._reservation: int | None = None
        self._allowance: tuple[int | None] | None = None

    @property
    def flat(self) -> bool:
        return self.dialect.flat_rate

    @property
    def prompt(self) -> int:
        if self._prompt is None:
            self._prompt = 0 if self.flat else prompt_tokens(self.payload)
        return self._prompt

    @property
    def prompt_bound(self) -> int:
        """At least as many tokens as the prompt can be (its UTF-8 bytes): for money.  Worked
        out once: each money window of each payer asks."""
        if self._prompt_bound is None:
            self._prompt_bound = 0 if self.flat else prompt_tokens(self.payload, bound=True)
        return self._prompt_bound

    @property
    def allowance(self) -> int | None:
        """The request's own output allowance per answer (None: it sets no bound)."""
        if self._allowance is None:
            self._allowance = (None if self.flat else self.dialect.output_allowance(self.payload),)
        return self._allowance[0]

    @property
    def answers(self) -> int:
        return 1 if self.flat else self.dialect.answers(self.payload)

    @property
    def asked(self) -> Allowance:
        """The allowance a capping window pays for in full, and the least worth forwarding."""
        if self.flat:
            return NO_ALLOWANCE
        asked = self.allowance
        if asked is None:
            asked = self.max_output or self.config.default_max_output
        return Allowance(asked, min(asked, self.config.min_output))

    @property
    def estimate(self) -> int:
        if self._estimate is None:
            self._estimate = self.config.request_cost if self.flat else estimate_tokens(
                self.payload, self.config.response_reserve, self.dialect, self.prompt)
        return self._estimate

    @property
    def reservation(self) -> int:
        if self._reservation is None:
            self._reservation = self.config.request_cost if self.flat else self._reserved()
        return self._reservation

    def _reserved(self) -> int:
        allowance = self.allowance
        reserve = self.config.response_reserve
        cost = max(1, self.prompt + (reserve if allowance is None else min(allowance, reserve))
                   * self.answers)
        return cost if self.prompt > self.capacity else min(cost, self.capacity)


# --------------------------------------------------------------------------
# Errors, paths and headers
# --------------------------------------------------------------------------

class ProxyError(Exception):
    """A failure the client should see as an error, in the shape of the API it speaks."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, close: bool = False,
                 headers: Sequence[tuple[str, str]] = (), detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind        # OpenAI's error type; other dialects map the status instead
        self.code = code
        self.param = param
        self.close = close      # the connection's framing can no longer be trusted
        self.headers = headers  # e.g. the rate-limit headers of a 429
        self.detail = detail    # why, for the owner's log and admin API; never sent to the client


class ClientGone(Exception):
    """The client closed its connection; there is nobody left to answer."""


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

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

    @functools.lru_cache(maxsize=1024)  # noqa: B019 (targets are few, immutable and cached too)
    def upstream_path(self, base_path: str, from_root: bool) -> str:
        """The path upstream: a /v1/... path under BASE_API_URL's path, or (``from_root``:
        Ollama's /api/...) under its root."""
        if not from_root:
            joined = base_path + self.path[len("/v1"):]
        else:
            joined = (base_path[:-len("/v1")] if base_path.endswith("/v1") else base_path) + self.path
        quoted = urllib.parse.quote(joined, safe="/:@!$&'()*+,=-._~")
        return f"{quoted}?{self.query}" if self.query else quoted


def parse_target(raw: str) -> Target:
    """``vet_target``, remembered for the short targets clients send again and again; a long
    one is vetted each time, so that unique long targets cannot fill the memory."""
    return remembered_target(raw) if len(raw) <= 512 else vet_target(raw)


@functools.lru_cache(maxsize=1024)
def remembered_target(raw: str) -> Target:
    return vet_target(raw)


def vet_target(raw: str) -> Target:
    """Decode and vet a request target; anything ambiguous is a 400, never a guess.

    (A refusal raises, so it is never remembered; ``Target`` is immutable, so it may be.)
    """
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
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization", "cookie",
                      "x-openwebui-user-jwt")
KEY_HEADERS = CREDENTIAL_HEADERS[:3]  # those that carry an API key, in order of preference
NOT_FORWARDED_UPSTREAM = HOP_BY_HOP | frozenset(CREDENTIAL_HEADERS) | {
    "host", "content-length", "expect", "accept-encoding"}
# Open WebUI can send who its user is (X-OpenWebUI-User-Name, -Email, -Id, -Role, and the
# chat's id): the proxy may read them, the model server (perhaps a paid API) has no need to.
PERSONAL_HEADER_PREFIXES = ("x-openwebui-",)
# The upstream's Server header would tell callers what software and version the
# model server runs (nginx drops it too); the proxy names itself instead.
PROXY_RESPONSE_HEADERS = frozenset({
    "content-length", "server", "access-control-allow-origin", "access-control-expose-headers",
    "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-refill-tokens",
    "x-ratelimit-refill-seconds", "x-ratelimit-reset-seconds", "retry-after",
})
RELAYED_EXCLUDED = HOP_BY_HOP | PROXY_RESPONSE_HEADERS  # never copied from an upstream answer
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


MAX_LINE = 65536
MAX_HEADERS = 100
MAX_METHOD = 32  # longer than any method in IANA's registry: a longer one is a 501, never logged
MAX_UPSTREAM_BODY = 64 * 1024 * 1024  # a non-streamed answer is read whole, up to this
MAX_LISTING_BODY = 4 * 1024 * 1024    # a server's own list of models (or running models), likewise
MAX_EVENT_BYTES = 1024 * 1024         # a streamed event is held back whole, up to this


class Headers:
    """A message's header fields in the order sent, looked up case-insensitively.

    Built once per message and read a dozen times, so the lookups are one dict
    access each: ``_first`` holds the first value of every name (lowered), and
    only a message that repeats a name keeps the lists that ``get_all`` needs.
    """

    __slots__ = ("names", "values", "lowered", "_first", "_repeated")

    def __init__(self, names: list[str], values: list[str]) -> None:
        self.names, self.values = names, values
        # Lowered once (in C: names are tokens, never a newline); copies use it too.
        self.lowered = lowered = "\n".join(names).lower().split("\n") if names else []
        self._first = dict(zip(reversed(lowered), reversed(values)))  # the first value wins
        self._repeated: dict[str, list[str]] | None = None
        if len(self._first) != len(names):
            self._repeated = {}
            for name, value in zip(lowered, values):
                self._repeated.setdefault(name, []).append(value)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._first.get(name.lower(), default)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        if self._repeated is not None:
            return self._repeated.get(name, [])
        value = self._first.get(name)
        return [] if value is None else [value]

    def items(self) -> list[tuple[str, str]]:
        return list(zip(self.names, self.values))


NO_HEADERS = Headers([], [])  # a waiting connection's, between its requests


class HeaderError(http.client.HTTPException):
    """A header block that ``read_headers`` refuses; ``status`` is what a client is told."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# One whole header line: a token, a colon, the value without the blanks around it, and the
# line end; no control character anywhere (one match per line is the cheapest strict check).
_LINE = (r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*"
         r"((?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)[ \t]*")
_HEADER_LINE = re.compile(_LINE.encode("latin-1") + rb"\r?\n")
# A whole block at once, for the usual case: every line ended by CRLF, the block
# already buffered.  The same line grammar, so the two paths accept the same fields.
_HEADER_FIELD = re.compile(f"{_LINE}\\r\\n")


def read_headers(rfile: BinaryIO) -> Headers:
    """Read a header block strictly, for requests and upstream responses alike.

    A folded line, a line without a colon or a control character is an error,
    never reinterpreted: reinterpretation is how requests are smuggled past a
    proxy.  It also costs a fraction of the email parser that http.server and
    http.client use, which was the largest part of this proxy's work per request.

    The block nearly always arrived with the line before it, so it is looked
    for in what is buffered and checked by one match; anything else (a bare LF,
    a block split across reads, an error) takes the line-by-line path, which
    says what is wrong.  The split has no empty line to match, so the block
    ends at the first CRLF CRLF, exactly where the line-by-line path ends it.
    """
    buffered = rfile.peek()  # type: ignore[attr-defined]
    end = buffered.find(b"\r\n\r\n") + 4
    if 4 <= end <= MAX_LINE:  # (a longer block goes line by line, where MAX_LINE is checked)
        # Split by the line grammar, a block is ['', name, value, '', name, value, ..., CRLF];
        # anything between two lines that is not a line shows up as a non-empty string.
        parts = _HEADER_FIELD.split(buffered[:end].decode("latin-1"))
        if parts[-1] == "\r\n" and not any(parts[0:-1:3]) and len(parts) <= 3 * MAX_HEADERS + 1:
            rfile.read(end)
            return Headers(parts[1::3], parts[2::3])
    names: list[str] = []
    values: list[str] = []
    while True:
        line = rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise HeaderError(431, "header line too long")
        if line in (b"\r\n", b"\n"):
            return Headers(names, values)
        if not line.endswith(b"\n"):
            raise HeaderError(400, "the message ended inside its headers")
        if len(names) == MAX_HEADERS:
            raise HeaderError(431, f"more than {MAX_HEADERS} headers")
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise HeaderError(400, "malformed header line")
        names.append(match.group(1).decode("ascii"))
        values.append(match.group(2).decode("iso-8859-1"))


def content_length(lengths: list[str], limit: int) -> int:
    """The body length the headers declare; ambiguity is refused, never guessed at."""
    if len(lengths) > 1 and len(set(value.strip() for value in lengths)) > 1:
        raise ProxyError(400, "conflicting Content-Length headers", code="invalid_framing",
                         close=True)
    text = lengths[0].strip()
    if not text.isdigit() or not text.isascii():
        raise ProxyError(400, "Content-Length must be a non-negative integer",
                         code="invalid_framing", close=True)
    length = int(text)
    if length > limit:
        raise ProxyError(413, f"request body is larger than {limit} bytes",
                         code="request_too_large", close=True)
    return length


def copied_headers(headers: Headers, excluded: frozenset,
                   excluded_prefixes: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Headers passed from one side to the other, minus hop-by-hop ones and any named in Connection.

    Both sides' headers were read by ``read_headers``, so every value is already safe to write.
    """
    listed = excluded
    for value in headers.get_all("connection"):
        listed = listed | {token.strip().lower() for token in value.split(",")}
    return [(name, value) for lowered, name, value in zip(headers.lowered, headers.names, headers.values)
            if lowered not in listed and not lowered.startswith(excluded_prefixes)]


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def same_secret(presented: str, secret: str) -> bool:
    """Compare in constant time; hashing first makes the time independent of the lengths too."""
    return hmac.compare_digest(hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest(),
                               hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest())


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
# Replies
# --------------------------------------------------------------------------

# Made once, not per call.  Without the check for circular references: what is encoded is a
# parsed body or the proxy's own dicts, and neither can hold itself.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)


def json_bytes(value: object) -> bytes:
    return _COMPACT_JSON.encode(value).encode("utf-8")


def limit_message(admission: Admission, now: float | None = None, currency: str = "") -> str:
    """The limit reply's text: why, and how long to wait, as people say it."""
    limit = f"{admission.window} limit" if admission.window else "limit"
    if admission.cost > admission.limit:
        if admission.counts_money:
            return (f"request too large: it costs {amount_text(admission.cost, currency)} but the "
                    f"{limit} is {amount_text(admission.limit, currency)}; shorten the conversation")
        return (f"request too large: it costs {admission.cost} tokens but the {limit} is "
                f"{admission.limit}; shorten the conversation or lower max_tokens")
    if not math.isfinite(admission.wait_seconds):
        return f"{limit} reached: budget used up"
    return f"{limit} reached, wait {wait_phrase(admission.wait_seconds, now)}"


def wait_phrase(seconds: float, now: float | None = None) -> str:
    """A wait as people say it: ``5 min`` up to an hour, ``3 h 20 min`` within a day, and
    beyond that the moment it ends, local time (``until Monday``, ``until Tuesday 14:05``,
    ``until 3 March``); minutes are rounded up, so that waiting that long is enough."""
    minutes = max(1, math.ceil(seconds / 60))
    if minutes <= 60:
        return f"{minutes} min"
    if seconds < 86400:
        hours, rest = divmod(minutes, 60)
        return f"{hours} h {rest} min" if rest else f"{hours} h"
    now = time.time() if now is None else now
    end = time.localtime(math.ceil((now + seconds) / 60) * 60)
    day = time.strftime("%A" if seconds < 6 * 86400 else "%d %B", end).lstrip("0")
    at = "" if (end.tm_hour, end.tm_min) == (0, 0) else time.strftime(" %H:%M", end)
    return f"until {day}{at}"


def amount_text(nanos: int, currency: str = "") -> str:
    """An amount of money counted in nano-units, in the currency: ``0.02 USD``."""
    text = f"{nanos / NANOS:.9f}".rstrip("0").rstrip(".")
    return f"{text} {currency}" if currency else text


def model_list(ids: Sequence[str]) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                        "owned_by": "llm_proxy"} for model in ids]}


def ollama_tags(names: Sequence[str]) -> dict:
    """A model list in Ollama's ``/api/tags`` shape."""
    return {"models": [{"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z",
                        "size": 0, "digest": "", "details": {}} for name in names]}


def rate_limit_headers(admission: Admission) -> list[tuple[str, str]]:
    """The tightest window's state; seconds rounded up, so that waiting that long is enough.

    A money window's amounts are in its currency (decimals); a window that never
    refills sends no refill or reset time, and its limit reply no Retry-After.
    """
    shown = amount_text if admission.counts_money else str
    headers = [
        ("X-RateLimit-Limit", shown(admission.limit)),
        ("X-RateLimit-Remaining", shown(admission.remaining)),
        ("X-RateLimit-Refill-Tokens", shown(admission.refill_tokens)),
    ]
    if math.isfinite(admission.refill_seconds):
        headers.append(("X-RateLimit-Refill-Seconds", str(math.ceil(admission.refill_seconds))))
    if math.isfinite(admission.wait_seconds):
        headers.append(("X-RateLimit-Reset-Seconds", str(math.ceil(admission.wait_seconds))))
        if not admission.allowed and admission.cost <= admission.limit:
            headers.append(("Retry-After", str(math.ceil(max(1.0, admission.wait_seconds)))))
    return headers


# --------------------------------------------------------------------------
# Calls: one request's state, and where each path goes
# --------------------------------------------------------------------------

JSON_TYPE = ("Content-Type", "application/json")
MODEL_HEADER = "X-LLM-Proxy-Model"  # on an answer another model served (``when_limited``)
NO_CACHE = ("Cache-Control", "no-cache")


def _nothing() -> None:
    pass


LOGGED_LENGTH = 200  # characters of one value that a log line or record shows


def loggable(value: str, limit: int = LOGGED_LENGTH) -> str:
    """``value`` as the logs show it: escaped unless printable, and cut after ``limit`` characters.

    Methods, paths, models and names come from clients (or the keys file). Raw,
    a control character rewrites the terminal the console is read on, a line
    break forges a log line, and a 9 MiB model name is written whole into the
    record of every request that sends it. A value with anything unprintable is
    shown as ascii() shows it; past ``limit`` characters, the rest is replaced by
    a count of it. A printable value, the usual one, is shown as it is.
    """
    if len(value) <= limit and value.isprintable():
        return value  # nearly always: two calls in C
    shown = value[:limit]
    if not shown.isprintable():
        shown = ascii(shown)[1:-1]
    return shown if len(value) <= limit else f"{shown}...[{len(value) - limit} more characters]"


@dataclass(eq=False)
class Call:
    """One request through the proxy: who pays, in which API, what it cost and how it went.

    Built once per request by the handler, so that no state of one request can
    leak into the next on a keep-alive connection; the log line is written from it.
    """

    started: float                   # monotonic, for durations
    arrived: float                   # wall clock, for the access log's timeline
    dialect: Dialect = OPENAI        # the API spoken: error shapes, limit replies, usage
    label: str = "-"                 # who, for the logs: key name or fingerprint, never the key
    identity: str = ""               # whose buckets pay (a user's, under an app key)
    policy: Policy | None = None
    user: str | None = None          # the end user behind an app key
    app: tuple[str, Policy] | None = None  # the app key's identity and policy, which pay too
    model: str | None = None
    body_length: int = 0
    body_pending: bool = True        # until read: an unread body forces the connection closed
    charge: Charge | None = None
    meter: Meter | None = None
    route: ModelRoute | None = None  # the servers of the model it names (MODELS_FILE, BASE_API_URL)
    upstream: Upstream | None = None  # the one of them that answers it, once chosen
    affinity: str | None = None      # a sticky route's caller and conversation, hashed
    made_by: str | None = None       # the server that made the stored answer the call refers to
    status: int = 0
    limited: bool = False
    stream: bool = False             # the answer went out as a stream of events
    served: bool = False             # the upstream's answer (or part of it) reached the client
    finished: bool = False           # ... all of it
    upstream_reached: bool = False   # the request was sent: the upstream may be working on it
    upstream_ms: float | None = None
    upstream_error: str | None = None  # why the upstream could not be reached (failure_reason)
    first_byte: float | None = None  # monotonic, when the answer's head went out
    endpoint: str = "local"          # for the metrics: the API, "free", or a local answer
    unwatch: Callable[[], None] = _nothing  # stops the disconnect watch on this request
    gone: bool = False               # the client hung up (set by the disconnect watcher's thread)
    closers: list = field(default_factory=list)  # what ``end`` runs, registered as taken (on_end)
    # Set once by ``conclude``, for the log line, the history and the metrics alike:
    result: str = ""                 # served, limited, rejected or error
    tokens_charged: int = 0          # taken before forwarding and kept (0 if refunded)
    tokens_paid: int = 0             # what it cost in the end
    price: Price | None = None       # the model's (MODELS_FILE), when it has one
    made: int = 1                    # a flat-rate call's things made (n images), priced per call
    cost: float = 0.0                # in the currency, set when the charge closes: the usage priced
    refused: Admission | None = None  # a limited request's admission: which windows could not pay
    downgrade: tuple[str, str] | None = None  # (asked, served): another model served it (when_limited)
    seconds: float = 0.0             # from arrival to the end of the answer

    def on_end(self, action: Callable[..., None], *args: object) -> None:
        """Run ``action(*args)`` when the call ends: a step that must follow whatever was just taken.

        Each resource is registered as it is taken (the charge, the upstream
        connection, the gate slot) and let go in the reverse order, by ``end``;
        the record is written after that (``ProxyHandler.finish_call``).  So the same steps run, once, whether the handler's
        thread ends the call or the connection loop does at the end of a stream it
        relayed; nobody needs to know which.
        """
        self.closers.append((action, args))

    def end(self) -> None:
        """Let go of everything the call holds, last taken first; run once, by whoever finishes it."""
        closers, self.closers = self.closers, []
        while closers:
            action, args = closers.pop()
            try:
                action(*args)
            except Exception:  # one failing step must not keep the others from running
                log.exception("ending the call of %s", self.label)

    def close_charge(self) -> None:
        """Decide what the charge becomes; safe to call more than once (the first call decides).

        A client that hangs up after its request reached the upstream pays for
        what it asked for; one that leaves while still queued pays nothing.  A
        window whose unit settles (usage mode's tokens) settles to the reported
        usage, or for a stream cut short from either end to the prompt plus what
        was streamed.
        """
        charge = self.charge
        if charge is None or charge.state != "reserved":
            return
        served = self.served or (self.gone and self.upstream_reached)
        used = None
        if served and self.meter is not None:
            used = self.meter.used(self.finished or not self.stream)
        if self.price is not None and self.dialect.flat_rate:
            self.cost = float(self.price.per_call) * self.made if served else 0.0  # (priced per call)
        elif used is not None and self.price is not None:
            self.cost = self.price.cost(used)
        if self.cut_short_under_a_cap(charge):
            used = None  # what it used is not known: the reservation, an upper bound, is kept
        charge.close(served, used)  # (a window whose unit does not settle keeps its charge)

    def cut_short_under_a_cap(self, charge: Charge) -> bool:
        """A stream paid in money, under the hard cap, that ended before its usage was reported.

        What was relayed can be counted only in part (tool-call arguments, reasoning the
        client never sees, what a paid API wrote after the client left, and bills), so
        settling by it would let a caller who hangs up early pay a fraction of the bill;
        a capped call reserved its whole allowance, which bounds it.  Token windows still
        settle by what was streamed: a local server stops when the proxy hangs up on it.
        """
        meter = self.meter
        return (self.stream and not self.finished and charge.admission.allowance is not None
                and meter is not None and not meter.final
                and any(spec.counts_money for _, specs in charge.payers for spec in specs))

    def identify_user(self, headers: Headers, payload: dict | None, now: float,
                      required: bool) -> bool:
        """Under an app key, find the end user, who then pays alongside the app; True if found.

        Keys without ``users`` never split: the same headers or fields change nothing.
        """
        users = self.policy.users if self.policy is not None else None
        if users is None:
            return False
        try:
            user = end_user(users, headers, payload, self.dialect, now)
            reason = "none was sent"
        except ValueError as error:
            user, reason = None, str(error)
        if user is None:
            if required and users.required:
                raise ProxyError(401, f"This key needs the end user's identity: {reason}.",
                                 "authentication_error", "invalid_user")
            return False
        self.act_for_user(user)
        return True

    def quota(self, buckets: BucketStore, currency: str = "USD") -> dict:
        """What ``GET /v1/quota`` shows: the caller's windows, and an app's beside its user's
        (a money window's amounts in ``currency``, which is named)."""
        assert self.policy is not None
        quota = self.policy.quota(buckets.snapshot(self.identity, self.policy.buckets))
        specs = list(self.policy.buckets)
        if self.app is not None:
            app_identity, app = self.app
            specs.extend(app.buckets)
            quota.update(user=self.user, app={"name": app.name or None,
                                              "buckets": buckets.snapshot(app_identity, app.buckets)})
        if any(spec.counts_money for spec in specs):
            quota["currency"] = currency
        return quota

    def act_for_user(self, user: str) -> None:
        """From now on the user pays, and the app key above them pays too."""
        assert self.policy is not None and self.policy.users is not None
        digest = user_digest(user)
        self.app = (self.identity, self.policy)
        self.user = user
        self.identity = f"{self.identity}/user:{digest}"
        self.policy = self.policy.users.policy_for(digest)

    def not_forwarded(self) -> frozenset:
        """Request headers kept from the upstream; an app's signed user token is one of them."""
        users = self.app[1].users if self.app is not None else (
            self.policy.users if self.policy is not None else None)
        if users is None or users.source != "jwt" or users.header is None:
            return NOT_FORWARDED_UPSTREAM
        return NOT_FORWARDED_UPSTREAM | {users.header.lower()}

    @property
    def owner(self) -> str:
        """The key the request came with (an app's, for its users): what owns stored answers."""
        return self.app[0] if self.app is not None else self.identity

    @property
    def payers(self) -> tuple[tuple[str, Sequence[BucketSpec]], ...]:
        assert self.policy is not None
        mine = (self.identity, self.policy.buckets)
        return (mine,) if self.app is None else (mine, (self.app[0], self.app[1].buckets))

    def when_limited(self, refused: Admission) -> str | None:
        """The model that serves this call instead of the limit reply: the blocking window's
        ``when_limited``, else that of the key (or user) the window belongs to; None: none."""
        spec = refused.spec
        if spec is None:
            return None
        if spec.when_limited is not None:
            return spec.when_limited
        policies = (self.policy,) if self.app is None else (self.policy, self.app[1])
        for policy in policies:
            if policy is not None and any(own is spec for own in policy.buckets):
                return policy.when_limited
        return None

    def may_use(self, model: str) -> bool:
        """Whether the caller's list (and the app's, for its user) has ``model``."""
        return ((self.policy is None or self.policy.allows(model))
                and (self.app is None or self.app[1].allows(model)))

    @property
    def queued_as(self) -> tuple[str, ...]:
        """The identities a waiting call counts for: its own, and its app key's."""
        return (self.identity,) if self.app is None else (self.identity, self.app[0])

    def ticket(self) -> Ticket:
        """A place in the fair queue: turns by key, then by user under an app key, each by the
        weight and priority of its policy."""
        policy = self.policy
        assert policy is not None
        if self.app is None:
            return Ticket(self.identity, policy.max_concurrent, None, 0, policy.weight, policy.priority)
        app = self.app[1]
        return Ticket(self.identity, policy.max_concurrent, self.app[0], app.max_concurrent,
                      policy.weight, policy.priority, (app.weight, app.priority))

    def prepare_upstream(self, payload: dict, stream: bool, prompt: int, settles: bool) -> None:
        """Make the payload the proxy checked into the one to forward (``body_bytes``).

        The model's name on its servers (``upstream_model``, ``BASE_MODEL``) replaces
        the model; a meter is attached, and when a window settles to the usage (usage
        mode, money) a stream that reports usage only when asked is asked (the client
        not told).
        """
        assert self.route is not None
        if self.route.upstream_model:
            payload["model"] = self.route.upstream_model
        hide = self.dialect.ask_for_usage(payload) if stream and settles else None
        self.meter = Meter(self.dialect, prompt, hide_usage=bool(hide), counts_text=settles)

    def check_reply(self, data: bytes) -> bytes:
        """A successful, non-streamed answer must be a JSON object, or a list of them (llama.cpp's
        answer to a batch of prompts); else it was no answer.

        In usage mode its usage settles the charge: a list's, added up.
        """
        try:
            reply = parse_json(data.lstrip())
        except (ValueError, RecursionError):
            reply = None
        if isinstance(reply, list):
            reply = {"usage": added_usage(reply)} if reply and all(
                isinstance(answer, dict) for answer in reply) else None
        if not isinstance(reply, dict):
            raise ProxyError(502, "The model server sent an invalid response.", "upstream_error",
                             "upstream_invalid_response")
        if self.meter is not None:
            self.dialect.read_reply(reply, self.meter)
            self.meter.final = True  # a whole answer's usage is all there is
        return data

    def conclude(self) -> None:
        """Fix how the request ended, once, for everything that records it."""
        status = self.status
        if not status and self.gone:
            self.status = status = 499
        if self.limited:
            self.result = "limited"
        elif status >= 500 or status == 499 or not status:
            self.result = "error"
        else:
            self.result = "rejected" if status >= 400 else "served"
        charge = self.charge
        if charge is not None:
            self.tokens_charged = charge.charged
            self.tokens_paid = charge.paid
        self.seconds = time.monotonic() - self.started

    def log_records(self, ip: str, method: str, path: str, with_record: bool) -> tuple[str, str]:
        """The console line and (when wanted) the ACCESS_LOG record; names, never keys.

        Every value a client or the keys file chose is ``loggable``: one request, one
        line of bounded length, with no control character in either.
        """
        outcome, charged, settled = self.result, self.tokens_charged, self.tokens_paid
        elapsed = self.seconds * 1000
        stamp = console_stamp(time.time())
        label, method, path = loggable(self.label), loggable(method), loggable(path)
        user = None if self.user is None else loggable(self.user, MAX_USER_LENGTH)  # (longer: refused)
        who = label if user is None else f"{label}/{user}"
        why = "" if self.upstream_error is None else f' upstream="{loggable(self.upstream_error)}"'
        upstream = self.upstream
        server = None if upstream is None or upstream.name == "default" else loggable(upstream.name)
        if server is not None:  # one of MODELS_FILE's servers: which one answered (or failed)
            why += f" server={server}"
        downgrade = self.downgrade
        if downgrade is not None:  # which model served it, and which was asked for
            why += f" model={loggable(downgrade[1])} asked={loggable(downgrade[0])}"
        line = (f"{stamp} INFO {ip} {who} {method} {path} {self.status} {outcome} "
                f"{elapsed:.1f}ms charged={charged} settled={settled}{why}\n")
        if not with_record:
            return line, ""
        arrived = self.arrived
        model = None if self.model is None else loggable(self.model)
        record = json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(arrived))
            + f".{int(arrived % 1 * 1000):03d}Z", "key": label, "user": user,
            "ip": ip, "method": method,
            "path": path, "model": model, "status": self.status, "stream": self.stream,
            "tokens_charged": charged, "tokens_settled": settled, "duration_ms": round(elapsed, 1),
            "upstream_ms": None if self.upstream_ms is None else round(self.upstream_ms, 1),
            "outcome": outcome, **({} if self.upstream_error is None else {
                "upstream_error": loggable(self.upstream_error)}),
            **({} if server is None else {"server": server}),
            **({} if downgrade is None else {"asked_model": loggable(downgrade[0])})},
            separators=(",", ":")) + "\n"
        return line, record


HOSTED_TOOLS = frozenset({"web_search", "web_search_preview", "file_search", "code_interpreter",
                          "image_generation", "computer_use_preview", "mcp"})  # billed by the call


def _hosted_tools(tools: object) -> bool:
    return isinstance(tools, list) and any(
        isinstance(tool, dict) and str(tool.get("type", "")).partition("_2")[0] in HOSTED_TOOLS
        for tool in tools)


def _audio_out(payload: dict) -> bool:
    modalities = payload.get("modalities")
    return "audio" in payload or (isinstance(modalities, list) and "audio" in modalities)


# What a request may not ask of a key paying in money, and why: each would be billed beyond
# the tokens the proxy prices, or its prompt could not be measured before it is sent. (field,
# whether the request asks it, why.)
UNPRICED_REQUESTS: tuple[tuple[str, Callable[[dict], bool], str], ...] = (
    ("models", lambda payload: "models" in payload,
     "'models' (fallback models) would be served unchecked and priced as the first"),
    ("previous_response_id", lambda payload: payload.get("previous_response_id") is not None,
     "the stored conversation it continues is billed as prompt but cannot be measured here; "
     "send the conversation itself"),
    ("service_tier", lambda payload: payload.get("service_tier") not in (None, "auto", "default"),
     "a service tier other than the default is billed above the list price"),
    ("tools", lambda payload: _hosted_tools(payload.get("tools")),
     "hosted tools (web search, file search, code interpreter, image generation) are billed per call"),
    ("audio", _audio_out, "audio output is billed above the text price"),
)


def refuse_unpriced(payload: dict, policy: Policy | None, money: bool) -> None:
    """A 400, free, for what a key paying in ``money`` (or held to some models) may not ask.

    Only ``models`` matters to a key held to some models (OpenRouter serves the next of
    them when the first fails, unchecked); all of ``UNPRICED_REQUESTS`` matter to money.
    """
    limited = policy is not None and policy.limits_models
    if not (money or limited):
        return
    for field_name, asks, why in UNPRICED_REQUESTS:
        if (money or field_name == "models") and asks(payload):
            raise ProxyError(400, f"'{field_name}' cannot be sent with this key: {why}.",
                             param=field_name, code="not_priced_for_this_key"
                             if field_name != "models" else "fallback_models_not_allowed")


def require_price(payers: Sequence[tuple[str, Sequence[BucketSpec]]], model: str,
                  price: Price | None, flat: bool = False) -> None:
    """A 403, free, for a model without a price when a money window would count the call.

    A flat-rate call (an image, a transcription) needs a ``per_call`` price: counted
    in tokens it would cost a money window nothing.  Keys without money windows never
    ask: a missing or mistyped price changes nothing for them.
    """
    if flat and price is not None and not price.per_call:
        price = None
    if price is None and any(spec.counts_money and (spec.models is None or model in spec.models)
                             for _, specs in payers for spec in specs):
        raise ProxyError(403, f"The model '{model[:200]}' has no price, and this key's budget is "
                         "in money: ask the owner to price it in MODELS_FILE.",
                         "permission_error", "model_not_priced", "model")


def limit_answer(dialect: Dialect, admission: Admission, model: str, stream: bool,
                 as_error: bool, usage_shown: bool = True, now: float | None = None,
                 currency: str = "") -> tuple[list[tuple[str, str]], bytes]:
    """What a caller whose buckets cannot pay gets: headers and body of an assistant reply.

    A 429 (or 400 when the request can never fit) is raised instead in ``error``
    mode, and for APIs whose answers have no place for text (embeddings ...).
    """
    text = limit_message(admission, now, currency)
    headers = rate_limit_headers(admission)
    if as_error or not dialect.answers_with_text:
        too_large = admission.cost > admission.limit
        raise ProxyError(400 if too_large else 429, text,
                         "invalid_request_error" if too_large else "rate_limit_exceeded",
                         "request_too_large" if too_large else "rate_limit_exceeded",
                         headers=headers)
    if stream:  # a usage event only where the API always has one, or the client asked for it
        return (headers + [("Content-Type", dialect.framing.content_type), NO_CACHE],
                b"".join(dialect.reply_stream(model, [text], NO_USAGE if usage_shown else None)))
    return headers + [JSON_TYPE], json_bytes(dialect.reply(model, text))


BODILESS_METHODS = ("GET", "HEAD", "DELETE")  # a body sent with these is read, never forwarded


# --------------------------------------------------------------------------
# Handler
# --------------------------------------------------------------------------

CORS_HEADERS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Expose-Headers", "X-RateLimit-Limit, X-RateLimit-Remaining, "
     "X-RateLimit-Refill-Tokens, X-RateLimit-Refill-Seconds, X-RateLimit-Reset-Seconds, "
     "Retry-After, X-LLM-Proxy-Model"),
]
PREFLIGHT_HEADERS = [
    ("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "Authorization, *"),
    ("Access-Control-Max-Age", "86400"),
]
SERVER_HEADER = f"Server: llm_proxy/{__version__}"  # on every answer; the upstream's is dropped
CORS_LINES = "\r\n".join(f"{name}: {value}" for name, value in CORS_HEADERS)  # joined once
ROOT_REPLY = {"name": "llm_proxy", "version": __version__, "health": "/health"}
ADMIN_PATHS = ("/admin", "/admin/api/usage", "/metrics")
METRICS_TYPE = ("Content-Type", "text/plain; version=0.0.4; charset=utf-8")


class ProxyHandler(BaseHTTPRequestHandler):
    """One client connection: HTTP/1.1 with keep-alive, one request at a time.

    The handler speaks HTTP and dispatches; what a request is and costs lives
    in its ``Call``, what its API looks like in its ``Dialect``.
    """

    protocol_version = "HTTP/1.1"
    server_version = "llm_proxy/" + __version__
    server: ProxyServer
    call: Call
    watch: _Watch | None = None  # the disconnect watch, made at the connection's first forward
    relayed: RelayedStream | None = None  # the stream the connection loop takes over
    held: bytearray | None = None  # meanwhile, what the handler writes, for the loop to send

    def setup(self) -> None:
        """Reads through a ``SocketReader``, writes go straight to the socket (``write``).

        (The server's get_request gave the socket CLIENT_TIMEOUT already.)
        """
        self.call = Call(time.monotonic(), time.time())
        self.connection = connection = self.request
        self.rfile = SocketReader(connection)  # type: ignore[assignment]
        self.wfile = _SocketWriter(connection)

    def handle(self) -> None:
        """Requests one after another, until the connection closes or the loop takes its stream.

        (http.server's loop, with the one way out it lacks.)
        """
        self.close_connection = True
        while True:
            self.handle_one_request()
            if self.close_connection or self.relayed is not None:
                return

    def handle_one_request(self) -> None:
        """http.server's, except that CLIENT_TIMEOUT starts at the request's first byte.

        That deadline bounds the whole request, where the socket's timeout bounds one
        read: started only once the request line was in, a client sending that line a
        byte at a time held its thread and its connection slot for ever. The wait for
        the first byte is idle waiting, bounded by the socket's timeout alone.
        """
        try:
            if not self.rfile.peek():  # the client closed the connection between requests
                self.close_connection = True
                return
            self.begin_request()
            self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
            if len(self.raw_requestline) > MAX_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.parse_request():
                return  # refused, and answered
            handler = getattr(self, "do_" + self.command, None)
            if handler is None:
                self.send_error(501, f"Unsupported method ({self.command!r})")
                return
            handler()
        except socket.timeout as error:  # a read or write timed out: the connection is done
            self.log_error("Request timed out: %r", error)
            self.close_connection = True
            self.server.request_arrived(self.connection)  # no deadline outlives its connection

    def resume(self) -> None:
        """Go on with the connection after the loop relayed its stream (the next request is buffered)."""
        try:
            self.handle()
        finally:
            self.finish()

    def finish(self) -> None:
        """The connection's thread is done with it; a relayed stream's is done by the loop later."""
        if self.relayed is not None:
            return
        if self.watch is not None:
            self.server.watcher.release(self.watch)
            self.watch = None

    # Every method goes through one dispatcher; http.server answers 501 for others.
    def do_GET(self) -> None:
        self.handle_request()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    # -- request handling --------------------------------------------------

    def forget_request(self) -> None:
        """Let go of the request just ended while the connection waits for its next one.

        A waiting connection would otherwise hold its last request's headers, its Call
        (charge, meter, payload) and, through the watch's callback, the relay and the
        upstream's response, for as long as the client keeps the connection open.
        The watch itself stays, cancelled, to be armed again by the next request.
        """
        self.call = Call(time.monotonic(), 0.0)  # as setup() leaves it; begin_request makes the next
        self.headers = NO_HEADERS  # type: ignore[assignment]
        self.raw_requestline, self.requestline, self.command, self.path = b"", "", "", ""
        if self.watch is not None:
            self.watch.on_gone = _nothing

    def begin_request(self) -> None:
        """A fresh Call; the head and body must arrive within CLIENT_TIMEOUT."""
        self.call = Call(time.monotonic(), self.server.wall_clock(), policy=self.server.keyring.default)
        self.path = ""
        self.server.expect_request_by(self.connection,
                                      self.call.started + self.server.config.client_timeout)

    def handle_request(self) -> None:
        """Answer one request; the call ends here unless the connection loop relays its stream.

        Then the loop ends it, with the stream (``ConnectionLoop.stream_ended``).  A
        refusal ends the call before it is answered, so that a client reading the
        error already finds its charge refunded.
        """
        call = self.call
        try:
            self.route()
        except ProxyError as error:
            if error.close:
                self.close_connection = True
            call.end()
            self.send_json(error.status, call.dialect.error_body(error), error.headers)
        except ClientGone:
            call.gone = True
            self.close_connection = True
        except Exception:
            log.exception("internal error on %s %s", loggable(self.command),
                          loggable(self.path.partition("?")[0]))
            self.close_connection = True
            call.end()
            if not call.status:
                self.send_json(500, call.dialect.error_body(
                    ProxyError(500, "Internal proxy error.", "server_error")))
        finally:
            if self.relayed is None:
                self.finish_call()

    def finish_call(self) -> None:
        """The call is over: let go of what it holds (``Call.end``), then record it."""
        self.call.end()
        self.end_request()

    def end_request(self) -> None:
        self.server.request_arrived(self.connection)
        self.log_outcome()

    def route(self) -> None:
        """Answer by the route table's row for the path and method (see ``ROUTES``)."""
        self.check_framing()
        if self.command == "OPTIONS":  # a browser's preflight, for any path
            self.send_bytes(204, PREFLIGHT_HEADERS, b"")
            return
        target = parse_target(self.path)
        route = route_for(target.path.lower(), self.command)
        call = self.call
        call.dialect = route.dialect
        if route.needs_key:
            self.authenticate()
            call.policy.require_endpoint(route)
        if route.names_answer:
            answer_id = target.path[len(route.path) + 1:].partition("/")[0]
            if answer_id:
                self.require_own_answer(answer_id)
        call.endpoint = route.endpoint  # (a refusal before here counts as the proxy's own answer)
        getattr(self, "answer_" + route.answer)(route, target)

    # -- what answers each row ---------------------------------------------------

    def answer_root(self, route: Route, target: Target) -> None:
        self.send_json(200, ROOT_REPLY)

    def answer_health(self, route: Route, target: Target) -> None:
        """ok, or degraded while a model server is down; nothing more to a caller without a key."""
        down = any(upstream.state.up is False for upstream in self.server.upstreams)
        self.send_json(200, {"status": "degraded" if down else "ok"})

    def answer_favicon(self, route: Route, target: Target) -> None:
        self.send_bytes(204, [], b"")  # browsers ask; an empty answer keeps their consoles quiet

    def answer_admin(self, route: Route, target: Target) -> None:
        self.send_bytes(200, *self.server.admin.answer(route.path, self.command, self.headers,
                                                        target.query))

    def answer_admin_keys(self, route: Route, target: Target) -> None:
        body = self.read_body()
        status, value = self.server.admin.keys_request(
            self.command, target.path[len(route.path):], self.headers, body)
        self.send_json(status, value, [("Cache-Control", "no-store")])  # it may carry a new key

    def answer_unknown(self, route: Route, target: Target) -> None:
        raise ProxyError(404, f"Unknown path {target.path}; the API lives under /v1", code="not_found")

    def answer_not_found(self, route: Route, target: Target) -> None:
        raise ProxyError(404, f"Unknown path {target.path}", code="not_found")

    def answer_method_not_allowed(self, route: Route, target: Target) -> None:
        methods = route.methods or ("GET",)
        raise ProxyError(405, f"{target.path} takes {methods[0]}", code="method_not_allowed")

    def answer_closed(self, route: Route, target: Target) -> None:
        raise ProxyError(403, "This endpoint is not available through this proxy.",
                         "permission_error", "endpoint_not_allowed")

    def answer_management(self, route: Route, target: Target) -> None:
        raise ProxyError(403, "Managing the server's models is not allowed through this proxy.",
                         "permission_error", "model_management_forbidden")

    def answer_metered(self, route: Route, target: Target) -> None:
        self.handle_metered(route.dialect, target)

    def answer_free(self, route: Route, target: Target) -> None:
        self.forward_free(target)

    def answer_quota(self, route: Route, target: Target) -> None:
        named = urllib.parse.parse_qs(target.query).get("user")
        self.call.identify_user(self.headers, {"user": named[0]} if named else None,
                                self.server.wall_clock(), required=False)
        self.send_json(200, self.call.quota(self.server.buckets, self.server.models_file.catalog.currency))

    def answer_models(self, route: Route, target: Target) -> None:
        """The models of every server (MODELS_FILE), or BASE_MODEL, are answered here; one
        server's own list is relayed; either way cut to the key's models."""
        upstreams, ollama = self.server.upstreams, route.dialect is OLLAMA
        fixed = upstreams.listing()
        self.read_body()  # (a body on a GET is never forwarded)
        if fixed is not None:
            shown = [model for model in fixed if self.call.policy.allows(model)]
            self.send_json(200, ollama_tags(shown) if ollama else model_list(shown))
        else:
            self.forward_listing(target, ollama)

    def answer_running_models(self, route: Route, target: Target) -> None:
        """Ollama's loaded models, cut to the key's: every server's (MODELS_FILE), under the
        names callers use; one server's relayed, whatever BASE_MODEL says."""
        self.read_body()
        running = self.server.upstreams.running(target, self.call.policy.allows)
        if running is None:
            self.forward_listing(target, ollama=True)
        else:
            self.send_json(200, {"models": running})

    def forward_listing(self, target: Target, ollama: bool) -> None:
        policy = self.call.policy
        if policy.models is None:
            self.forward(target, b"")
        else:
            self.forward(target, b"", inspect=lambda data: visible_models(data, policy, ollama))

    def answer_model_card(self, route: Route, target: Target) -> None:
        """One model's card: a model off the key's list does not exist for this key."""
        model = target.path[len(route.path) + 1:]
        self.read_body()
        if not self.call.policy.allows(model):
            raise ProxyError(404, f"The model '{model[:200]}' does not exist", code="model_not_found",
                             param="model")
        call = self.call
        call.model = model  # asked of the model's server, by the name it knows the model by
        call.route = self.server.upstreams.route_for(model)
        asked = call.route.upstream_model
        if asked is None or asked == model:
            self.forward(target, b"")
            return
        renamed = replace(target, path=f"{route.path}/{asked}")
        self.forward(renamed, b"", inspect=lambda data: renamed_card(data, asked, model))

    def forward_free(self, target: Target) -> None:
        """Forward a call that makes no generation, its body checked like any other.

        A GET, HEAD or DELETE forwards no body: a model server that reads none on those
        methods would take it for the next request on the pooled connection.
        """
        self.call.endpoint = "free"
        body = self.read_body()
        checked = NO_BODY if self.command in BODILESS_METHODS else self.check_body(body, target)
        self.require_models(checked.model, target)
        self.forward(target, checked.forwarded)

    def check_body(self, body: bytes, target: Target) -> CheckedBody:
        """A body that is not a metered API's JSON object, read in whatever framing it has."""
        policy = self.call.policy
        checked = check_body(body, self.headers.get("Content-Type") or "",
                             self.call.dialect.model_fields, policy.limits_models)
        if isinstance(checked.payload, dict):
            self.check_references(checked.payload)
        self.call.model = checked.model
        return checked

    def check_references(self, payload: dict) -> None:
        """What a body refers to must be the caller's own (see ``StoredAnswers``).

        A stored conversation (``conversation``, OpenAI's Conversations API) is not
        recorded by the proxy, so no key may continue one.
        """
        if payload.get("previous_response_id") is not None:  # a conversation goes on from it
            self.require_own_answer(payload["previous_response_id"])
        if payload.get("conversation") is not None:
            raise ProxyError(400, "stored conversations are not available through this proxy; "
                             "send the request without 'conversation'", param="conversation",
                             code="unsupported_parameter")

    def require_own_answer(self, answer_id: object) -> None:
        """A stored answer exists for the key that made it alone (see ``StoredAnswers``)."""
        if not (isinstance(answer_id, str) and self.server.stored.owned_by(answer_id, self.call.owner)):
            raise ProxyError(404, f"No stored answer with the id '{str(answer_id)[:100]}' was made "
                             "with this key.", code="not_found")
        self.call.made_by = self.server.stored.server_of(answer_id)

    def require_models(self, model: str | None, target: Target) -> None:
        """Every model a request names, in its body or its query, must be on the caller's list.

        (Go's form reading, Ollama's, takes a model from the query string too.)
        """
        policy = self.call.policy
        if policy.models is None:
            return
        if model is not None:
            policy.require(model)
        if target.query:
            named = named_model(urllib.parse.parse_qsl(target.query, keep_blank_values=True),
                                self.call.dialect.model_fields)
            if named is not None:
                policy.require(named)

    def parse_request(self) -> bool:
        """Parse the request line and headers; http.server's hook, made strict and cheap.

        http.server reads headers with the lenient email parser, which accepts
        folded and colon-less lines and builds a Message for every request;
        ``read_headers`` refuses both, at a fraction of the cost.
        """
        self.command = None
        self.request_version = "HTTP/1.0"
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            return self.refuse_request(ProxyError(400, "Bad request syntax", code="invalid_request"))
        command, path, version = words
        # From here on every refusal (version, headers, framing, size) is in the path's API's shape.
        self.call.dialect = dialect_of_target(path)
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            return self.refuse_request(ProxyError(505, "Only HTTP/1.0 and HTTP/1.1 are supported",
                                                  "server_error", "http_version_not_supported"))
        # A method is a token (RFC 9110 9.1), and one longer than any implemented is a 501
        # (RFC 9112 3). Refused here, before it is ``command``, it never reaches a log.
        if len(command) > MAX_METHOD:
            return self.refuse_request(ProxyError(501, "Unsupported method", "server_error",
                                                  "method_not_implemented"))
        if not _TOKEN.fullmatch(command):
            return self.refuse_request(ProxyError(400, "the request method is not a token",
                                                  code="invalid_method"))
        self.command, self.path, self.request_version = command, path, version
        try:
            self.headers = read_headers(self.rfile)  # type: ignore[assignment]
        except HeaderError as error:
            return self.refuse_request(ProxyError(error.status, error.message, code="invalid_header"))
        except socket.timeout:
            return self.refuse_request(ProxyError(408, "timed out waiting for the request headers",
                                                  code="timeout"))
        connection = self.headers.get("connection")
        if connection is None:  # the usual case: HTTP/1.1 keeps the connection, 1.0 closes it
            self.close_connection = version == "HTTP/1.0"
        else:
            tokens = {token.strip().lower() for token in connection.split(",")}
            self.close_connection = "close" in tokens or (
                version == "HTTP/1.0" and "keep-alive" not in tokens)
        expect = self.headers.get("expect")
        if expect is not None and expect.lower() == "100-continue" and version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def refuse_request(self, error: ProxyError) -> bool:
        """Answer a request that never got as far as routing, log it, and end the connection."""
        self.close_connection = True
        with suppress(ClientGone):
            self.send_json(error.status, self.call.dialect.error_body(error))
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
        self.call.body_length = (content_length(lengths, self.server.config.max_body_bytes)
                                 if lengths else 0)

    def authenticate(self) -> None:
        """Find whose buckets pay for this request, or raise 401.

        The admin key is not a client key, not even in open mode.
        """
        token = presented_key(self.headers)
        admin_key = self.server.config.admin_key
        is_admin = bool(admin_key and token is not None and same_secret(token, admin_key))
        found = None if is_admin else self.server.keyring.identify(
            token, self.client_address[0], self.call.arrived)
        if found is None:
            raise ProxyError(401, "Missing or invalid proxy API key", "authentication_error",
                             "invalid_api_key")
        self.call.identity, self.call.label, self.call.policy = found

    def read_body(self) -> bytes:
        """Read exactly the declared body (framing was checked with the headers)."""
        call = self.call
        call.body_pending = False
        try:
            body = self.rfile.read(call.body_length)
        except socket.timeout:
            raise ProxyError(408, "timed out waiting for the request body", code="timeout",
                             close=True) from None
        except OSError:
            raise ClientGone() from None
        if len(body) < call.body_length:
            raise ProxyError(400, "request body is shorter than its Content-Length",
                             code="invalid_framing", close=True)
        self.server.request_arrived(self.connection)
        return body

    def handle_expect_100(self) -> bool:
        """Refuse a badly framed or oversized body, or an unknown key, before the body is sent."""
        try:
            self.check_framing()
            target = parse_target(self.path)
            route = route_for(target.path.lower(), self.command)
            if route.needs_key:
                self.authenticate()
                self.call.policy.require_endpoint(route)
        except ProxyError as error:
            return self.refuse_request(error)
        return super().handle_expect_100()

    # -- local answers -------------------------------------------------------

    # -- metered calls -------------------------------------------------------

    def handle_metered(self, dialect: Dialect, target: Target) -> None:
        """Charge before forwarding; a limit reply when the buckets cannot pay.

        The body is read once: what is charged, checked and forwarded is the same parse.
        """
        call, config = self.call, self.server.config
        call.dialect, call.endpoint = dialect, dialect.name
        body = self.read_body()
        if dialect.flat_rate:  # forwarded as sent (a JSON body as parsed), its model still checked
            checked = NO_BODY if self.command in BODILESS_METHODS else self.check_body(body, target)
            payload = checked.payload if isinstance(checked.payload, dict) else None
            call.route = self.server.upstreams.route_for(call.model)  # (a 404, free)
        else:
            payload = request_object(body)
            dialect.validate(payload)
            self.check_references(payload)
            call.route = self.server.upstreams.route_for(payload.get("model"))  # (a 404, free)
            call.model = call.route.fixed_model or payload.get("model") or ""
        self.require_models(call.model, target)
        if call.identify_user(self.headers, payload, self.server.wall_clock(), required=True):
            self.require_models(call.model, target)
        if call.route is not None and call.route.spec.sticky:
            call.affinity = conversation_affinity(call.identity, payload or {})
        payers, mode, catalog = call.payers, config.mode, self.server.models_file.catalog
        windows = payer_windows(payers, mode)
        if payload is not None and not dialect.flat_rate:
            refuse_unpriced(payload, call.policy, windows.money)
        call.price = catalog.price(call.model)
        if windows.money:
            require_price(payers, call.model or "", call.price, dialect.flat_rate)
        capacity = windows.token_room
        metered = payload if not dialect.flat_rate else None
        if metered is None:
            call.made = checked.count
        cost = CallCost(dialect, metered or {}, config, capacity, call.price,
                        catalog.max_output(call.model), call.made)
        stream = metered is not None and dialect.is_stream(metered)
        settles = windows.settles
        if metered is not None:
            call.prepare_upstream(metered, stream, cost.prompt if settles else 0, settles)
        forwarded = checked.forwarded if metered is None else body_bytes(metered)  # (may refuse it)
        admission = self.charge(payers, cost, call.model or "", config.queue_timeout)
        if not admission.allowed and metered is not None:  # refused: perhaps a smaller model can pay
            downgraded = self.downgrade(dialect, metered, admission, capacity)
            if downgraded is not None:
                admission, cost = downgraded
                forwarded = body_bytes(metered)
        if admission.allowed:  # from here on, whatever happens, the charge is closed (or refunded)
            call.charge = Charge(self.server.buckets, payers, admission, mode, cost)
            call.on_end(call.close_charge)
        else:
            call.limited, call.stream, call.refused = True, stream, admission
            headers, answer = limit_answer(dialect, admission, (metered or {}).get("model") or call.model
                                           or "", stream, config.limit_response == "error",
                                           dialect.usage_in_stream(metered or {}),
                                           self.server.wall_clock(), catalog.currency)
            self.send_bytes(200, headers, answer)
            return
        if (metered is not None and admission.allowance is not None
                and dialect.limit_output(metered, admission.allowance)):
            forwarded = body_bytes(metered)  # the hard cap: never more output than was paid for
        self.forward(target, forwarded, inspect=None if metered is None else call.check_reply)

    def charge(self, payers: Sequence[tuple[str, Sequence[BucketSpec]]], cost: CallCost, model: str,
               patience: float = 0.0) -> Admission:
        """Charge each window what ``cost`` is in its unit.  The output allowance is worked
        out (from the body) only where some window pays for the output (the hard cap)."""
        cost_of = window_costs(cost, self.server.config.mode, model, payers)
        capping = any(cost_of(spec).per_output for _, specs in payers for spec in specs)
        return self.server.buckets.charge_all(payers, cost_of, cost.asked if capping else NO_ALLOWANCE,
                                              patience)

    def downgrade(self, dialect: Dialect, payload: dict, refused: Admission,
                  capacity: int) -> tuple[Admission, CallCost] | None:
        """Charge the call once more, for the model ``when_limited`` names; None: the limit reply.

        Tried once: the fallback's own ``when_limited`` is never followed, so nothing
        loops, and the refused charge took nothing, so nothing is paid twice.  Only
        for APIs that answer with text (another model's embeddings would not match
        the caller's), only for a model the caller may use, and only when it has the
        price its money windows need.  When it can pay, the call is that model's:
        its upstream, its price and its windows, and the body names it.
        """
        call, config, catalog = self.call, self.server.config, self.server.models_file.catalog
        fallback = call.when_limited(refused)
        if fallback is None or not dialect.answers_with_text or not call.may_use(fallback):
            return None
        try:
            route = self.server.upstreams.route_for(fallback)
        except ProxyError:  # no server has it
            return None
        model = route.fixed_model or fallback
        if model == call.model:  # asked for it already (or BASE_MODEL serves every name)
            return None
        payers, price = call.payers, catalog.price(model)
        try:
            require_price(payers, model, price)
        except ProxyError:  # a money window could not count it
            return None
        cost = CallCost(dialect, payload, config, capacity, price, catalog.max_output(model))
        admission = self.charge(payers, cost, model)
        if not admission.allowed:
            return None
        call.downgrade = (call.model or "", fallback)
        call.model, call.route, call.price = model, route, price
        call.affinity = conversation_affinity(call.identity, payload) if route.spec.sticky else None
        payload["model"] = route.upstream_model or model
        return admission, cost

    def forward(self, target: Target, body: bytes,
                inspect: Callable[[bytes], bytes] | None = None) -> None:
        call, server = self.call, self.server
        if call.route is None and call.made_by is not None:  # a stored answer: where it was made
            call.route = server.upstreams.route_to(call.made_by)
        call.route = call.route or server.upstreams.route_for(call.model)
        Relay(self, server.watcher, server.loop, server.stored, server.upstreams).forward(
            target, body, inspect)

    # -- writing -------------------------------------------------------------

    def response_head(self, status: int, headers: Sequence[tuple[str, str]],
                      reason: str | None = None) -> list[str]:
        call = self.call
        call.status = status
        if call.first_byte is None:
            call.first_byte = time.monotonic()
        if call.body_pending and call.body_length:
            self.close_connection = True  # an unread body would be taken for the next request
        if reason is None or not _FIELD_VALUE.fullmatch(reason):  # an upstream's could carry a CR
            reason = self.responses.get(status, ("",))[0]
        lines = [f"{self.protocol_version} {status} {reason}", SERVER_HEADER]
        lines.extend([f"{name}: {value}" for name, value in headers])
        lines.append(CORS_LINES)
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")  # an HTTP/1.0 client assumes close otherwise
        return lines

    def send_bytes(self, status: int, headers: Sequence[tuple[str, str]], body: bytes,
                   reason: str | None = None) -> None:
        self.call.unwatch()  # once the client has its answer it may send the next request at once
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
        self.call.unwatch()
        if self.chunked and self.command != "HEAD":
            self.write(b"0\r\n\r\n")

    def write(self, data: bytes) -> None:
        """One ``sendall`` per write: the head and body go together, each stream event alone.

        (``wfile`` is unbuffered and would make the same call through a Python layer.)
        While the connection loop relays this connection's stream, writes are held
        for it instead (``held``): it sends them as the client can take them.
        """
        held = self.held
        if held is not None:
            held += data
            return
        try:
            self.connection.sendall(data)
        except OSError:
            raise ClientGone() from None

    # -- http.server hooks ---------------------------------------------------

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The refusals of ``handle_one_request`` (a request line over 64 KiB, an unknown method)."""
        kind = "server_error" if code >= 500 else "invalid_request_error"
        self.refuse_request(ProxyError(code, message or self.responses.get(code, ("",))[0], kind))

    def log_message(self, format: str, *args: object) -> None:
        """http.server's own notes (a timeout); they never include a key, and are ``loggable``."""
        log.info("%s %s", self.client_address[0], loggable(format % args))

    def log_request(self, code: object = "-", size: object = "-") -> None:
        pass  # one line per request is written by log_outcome instead

    def log_outcome(self) -> None:
        """One line per request on the console, and one JSON record for ACCESS_LOG; never a key."""
        access_log = self.server.access_log
        self.call.conclude()
        line, record = self.call.log_records(self.client_address[0], self.command or "-",
                                             self.path.partition("?")[0], access_log is not None)
        self.server.admin.record(self.call)
        self.server.console.write(line)
        if access_log is not None:
            access_log.write(record)


def conversation_affinity(identity: str, payload: dict) -> str:
    """The caller and the start of its conversation, hashed: what a sticky route keeps on one server.

    The start is the system prompt and the first message (or prompt), which every
    later turn of the conversation repeats, so its prompt cache is found again.
    """
    start = [payload.get("system")]
    for name in ("messages", "input", "prompt"):
        value = payload.get(name)
        if isinstance(value, list):
            start.append(value[:2])
            break
        if isinstance(value, str):
            start.append(value[:4096])
            break
    text = json.dumps(start, sort_keys=True, default=str)[:8192]
    return identity + "/" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def renamed_card(data: bytes, asked: str, shown: str) -> bytes:
    """A model card asked under the server's name for the model, shown under the caller's."""
    try:
        card = json.loads(data)
    except (ValueError, RecursionError):
        return data
    if isinstance(card, dict) and card.get("id") == asked:
        card["id"] = shown
        return json_bytes(card)
    return data


def visible_models(data: bytes, policy: Policy, ollama: bool) -> bytes:
    """The upstream's model list cut to the key's models; unreadable: show nothing, not everything."""
    try:
        listing = json.loads(data)
        if ollama:
            listing["models"] = [m for m in listing["models"] if policy.allows(m.get("name"))
                                 or policy.allows(m.get("model"))]
        else:
            listing["data"] = [m for m in listing["data"] if policy.allows(m.get("id"))]
    except (ValueError, RecursionError, TypeError, KeyError, AttributeError):
        return json_bytes(ollama_tags([]) if ollama else model_list([]))
    return json_bytes(listing)


# --------------------------------------------------------------------------
# Sockets whose timeouts the kernel keeps
# --------------------------------------------------------------------------

# SO_RCVTIMEO/SO_SNDTIMEO take a struct timeval on Linux; elsewhere Python's timeouts stay.
KERNEL_TIMEOUTS = sys.platform.startswith("linux")


class TimedSocket(socket.socket):
    """A blocking socket whose reads and writes time out in the kernel.

    Python's own socket timeout polls before every ``recv`` and ``send``: on this
    proxy four more system calls per request, each one a moment in which another
    thread takes the GIL and this one waits to get it back: with many clients at
    once, those waits cost throughput.  ``SO_RCVTIMEO`` and
    ``SO_SNDTIMEO`` bound each call instead; a call that times out fails with
    EAGAIN, which is raised here as ``socket.timeout``, what Python's timeout
    raises, so nothing above can tell the difference.  ``sendall`` keeps Python's
    meaning too: the whole write must be done within the timeout (checked
    between the kernel's partial sends), so a trickling reader cannot hold a write
    open by taking a byte at a time.
    """

    __slots__ = ("_seconds",)

    @classmethod
    def adopt(cls, sock: socket.socket, seconds: float) -> socket.socket:
        """``sock`` with ``seconds`` to every read and write: as a TimedSocket on Linux.

        (A timeval of zero would mean no timeout at all, and one beyond a year is
        nobody's intent: such values keep Python's timeout, as elsewhere.)
        """
        if (not KERNEL_TIMEOUTS or sock.family not in (socket.AF_INET, socket.AF_INET6)
                or not 0.001 <= seconds <= 366 * 86400):
            sock.settimeout(seconds)
            return sock
        timed = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        timed.setblocking(True)  # the descriptor may still be non-blocking from a Python timeout
        timed._seconds = seconds
        timed.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        timed.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))
        return timed

    # (The base methods called directly, not through super(): these run on every read.)
    def recv(self, size: int, flags: int = 0) -> bytes:
        try:
            return _recv(self, size, flags)
        except BlockingIOError:
            raise socket.timeout("timed out") from None

    def recv_into(self, buffer: object, size: int = 0, flags: int = 0) -> int:
        try:
            return _recv_into(self, buffer, size, flags)  # type: ignore[arg-type]
        except BlockingIOError:
            raise socket.timeout("timed out") from None

    def sendall(self, data: bytes, flags: int = 0) -> None:  # type: ignore[override]
        """All of ``data`` within the timeout, as Python's ``sendall`` (not the timeout per send)."""
        deadline = time.monotonic() + self._seconds
        try:
            sent = self.send(data, flags)  # a blocking send takes all of it, unless it times out
            if sent == len(data):
                return
            view = memoryview(data)[sent:]
            try:  # a reader that slow: each further send may wait only for what is left
                while view:
                    left = deadline - time.monotonic()
                    if left < 0.001:
                        raise socket.timeout("timed out")
                    self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(left))
                    view = view[self.send(view, flags):]
            finally:
                self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self._seconds))
        except BlockingIOError:
            raise socket.timeout("timed out") from None


_recv, _recv_into, _send = socket.socket.recv, socket.socket.recv_into, socket.socket.send


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))


class _SocketWriter:
    """What http.server writes its own answers with (100 Continue): straight to the socket."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> int:
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass


class NeedMore(Exception):
    """A reader that must not wait has not yet got the bytes asked for."""


class SocketReader:
    """The buffered reading http.server and the upstream client need, with its buffer in view.

    ``makefile``'s BufferedReader hides what it holds, and asking it (``peek``)
    reads the socket, waiting if nothing came.  Handing a connection to the
    connection loop needs the answer without waiting: a connection whose next
    request is already buffered has work now; one with nothing buffered can
    wait in the loop without a thread.  Nothing is allocated ahead: the buffer
    holds what arrived, so a parked reader costs nothing.

    A reader that must not wait (``nowait``: a stream the connection loop may
    relay) raises ``NeedMore`` when nothing more has arrived, having consumed
    nothing, so a parser can be called again with the same state later.
    """

    __slots__ = ("sock", "buffer", "eof", "nowait")
    chunk = 8192  # what a read asks the socket for when it only needs a little (as makefile's)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.eof = False
        self.nowait = False

    def _fill(self, size: int = 0) -> bool:
        """More bytes into the buffer; False at the end of the stream."""
        if self.eof:
            return False
        sock = self.sock
        if self.nowait:
            try:
                data = _recv(sock, max(size, self.chunk), _DONT_WAIT)
            except BlockingIOError:
                raise NeedMore() from None
        else:
            data = sock.recv(max(size, self.chunk))
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def peek(self, size: int = 0) -> bytes:
        if not self.buffer:
            self._fill()
        return self.buffer

    def readline(self, limit: int = -1) -> bytes:
        buffer, searched = self.buffer, 0
        while True:
            end = buffer.find(b"\n", searched) + 1
            if end or 0 <= limit <= len(buffer):
                if not end or 0 <= limit < end:
                    end = limit
                self.buffer = buffer[end:]
                return buffer[:end]
            searched = len(buffer)
            if not self._fill():
                self.buffer = b""
                return buffer
            buffer = self.buffer

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes, or fewer at the end of the stream."""
        buffer = self.buffer
        if len(buffer) >= size:
            self.buffer = buffer[size:]
            return buffer[:size]
        if self.nowait:  # gathered in the buffer, which NeedMore leaves intact
            while len(self.buffer) < size and self._fill(size - len(self.buffer)):
                pass
            buffer = self.buffer
            self.buffer = buffer[size:]
            return buffer[:size]
        parts, have = [buffer], len(buffer)  # a long body: gathered, not copied again per read
        self.buffer = b""
        while have < size and self._fill(size - have):
            parts.append(self.buffer)
            have += len(self.buffer)
            self.buffer = b""
        data = b"".join(parts)
        self.buffer = data[size:]
        return data[:size]

    def read1(self, size: int) -> bytes:
        """What is buffered, or one read's worth; b"" only at the end of the stream."""
        if not self.buffer and not self._fill(size):
            return b""
        buffer = self.buffer
        if len(buffer) <= size:
            self.buffer = b""
            return buffer
        self.buffer = buffer[size:]
        return buffer[:size]


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


class UpstreamResponse:
    """One upstream answer, read from its connection's buffered reader.

    http.client's response object did the same with more work per request: a new
    buffered reader for every response, header copies, and an email parser this
    proxy had already replaced by ``read_headers``.  This one reads the status
    line and headers strictly, then the body by Content-Length, chunks, or until
    the connection closes; ``read1`` hands over what has arrived, chunk framing
    removed, so streams are relayed as they come.
    """

    __slots__ = ("reader", "status", "reason", "headers", "length", "chunked", "chunk_left",
                 "will_close", "done")

    def __init__(self, reader: BinaryIO, method: str) -> None:
        self.reader = reader
        version, status, reason = self._status_line()
        while 100 <= status < 200:  # interim answers (100 Continue ...) carry no body
            read_headers(reader)
            version, status, reason = self._status_line()
        self.status, self.reason = status, reason
        self.headers = headers = read_headers(reader)
        connection = (headers.get("Connection") or "").lower()
        self.chunked = (headers.get("Transfer-Encoding") or "").lower() == "chunked"
        self.chunk_left = 0
        length = headers.get("Content-Length") or ""
        self.length = int(length) if length.isascii() and length.isdigit() and not self.chunked else None
        if status in (204, 304) or method == "HEAD":
            self.length = 0
        self.will_close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
        if not self.chunked and self.length is None:
            self.will_close = True  # the body ends when the connection does
        self.done = self.length == 0

    def _status_line(self) -> tuple[str, int, str]:
        line = self.reader.readline(MAX_LINE + 1)
        if not line:
            raise http.client.RemoteDisconnected("the upstream closed the connection")
        version, _, rest = line.decode("iso-8859-1").rstrip("\r\n").partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise http.client.BadStatusLine(ascii(line[:80]))
        return version, int(code), reason.strip()

    def getheader(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)  # type: ignore[return-value]

    def isclosed(self) -> bool:
        return self.done

    def read(self) -> bytes:
        """The rest of the body."""
        if self.length is not None and not self.done:
            data = self.reader.read(self.length)
            if len(data) < self.length:
                raise http.client.IncompleteRead(data, self.length - len(data))
            self.length, self.done = 0, True
            return data
        parts = []
        while True:
            data = self.read1(65536)
            if not data:
                return b"".join(parts)
            parts.append(data)

    def read1(self, size: int) -> bytes:
        """What has arrived of the body, up to ``size`` bytes (b"" at its end)."""
        if self.done:
            return b""
        if self.chunked:
            return self._chunk(size)
        data = self.reader.read1(size if self.length is None else min(size, self.length))
        if self.length is not None:
            if not data:
                raise http.client.IncompleteRead(b"", self.length)
            self.length -= len(data)
            self.done = self.length == 0
        elif not data:
            self.done = True  # the connection closed: that was the end
        return data

    def _chunk(self, size: int) -> bytes:
        """The chunk data buffered now, framing removed, or one read more if there is none.

        Every chunk already buffered is taken in one call (a stream's events
        usually come one chunk each, several per read when the relay is busy),
        and the state is kept between calls, so a reader fed by the connection
        loop can stop at any byte (``NeedMore``) and go on when more arrives.
        """
        reader = self.reader
        while True:
            data = self._buffered_chunks(size)
            if data or self.done:
                return data
            if not reader._fill():
                raise http.client.IncompleteRead(b"", self.chunk_left)

    def _buffered_chunks(self, size: int) -> bytes:
        reader = self.reader
        buffer, at, parts, taken = reader.buffer, 0, [], 0
        while at < len(buffer) and taken < size:
            left = self.chunk_left
            if left > 0:  # inside a chunk's data
                piece = buffer[at:at + min(left, size - taken)]
                parts.append(piece)
                at += len(piece)
                taken += len(piece)
                self.chunk_left = left - len(piece) or -1  # -1: its CRLF is next
            elif left < 0:  # the CRLF after a chunk's data
                if len(buffer) - at < 2:
                    break
                if buffer[at:at + 2] != b"\r\n":
                    raise http.client.IncompleteRead(b"".join(parts))
                at += 2
                self.chunk_left = 0
            else:  # a chunk-size line
                end = buffer.find(b"\n", at, at + MAX_LINE) + 1
                if not end:
                    if len(buffer) - at >= MAX_LINE:
                        raise http.client.IncompleteRead(b"".join(parts))
                    break
                text = buffer[at:end].split(b";", 1)[0].strip()
                if not text or text.strip(b"0123456789abcdefABCDEF"):
                    raise http.client.IncompleteRead(b"".join(parts))
                length = int(text, 16)
                if length == 0:  # the last chunk: trailers, up to the blank line that ends the body
                    rest = buffer[end:]
                    if not (rest.startswith(b"\r\n") or rest.startswith(b"\n")
                            or b"\n\r\n" in rest or b"\n\n" in rest):
                        break  # the trailers are still coming: read the size line again then
                    reader.buffer = rest
                    read_headers(reader)  # (all buffered: never reads)
                    self.done = True
                    return b"".join(parts)
                at = end
                self.chunk_left = length
        reader.buffer = buffer[at:]
        return b"".join(parts)


def upstream_tls(ca_file: str | None) -> ssl.SSLContext:
    """The trust for an https upstream: the system's CAs, and UPSTREAM_CA_FILE's if set.

    Made once, at startup, so that a file that cannot be read or holds no certificate
    stops the proxy with one line instead of failing every request.
    """
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as error:
            raise ConfigError(f"UPSTREAM_CA_FILE {ca_file}: no PEM certificate in it "
                              f"({error.reason or type(error).__name__})") from None
        except OSError as error:
            raise ConfigError(f"UPSTREAM_CA_FILE {ca_file}: cannot read it "
                              f"({error.strerror or type(error).__name__})") from None
    return context


class TlsHandshakeFailed(ConnectionError):
    """The upstream's TLS handshake failed for a reason other than its certificate."""


class UpstreamConnection:
    """A socket to the upstream and the buffered reader that outlives each response."""

    __slots__ = ("sock", "reader")

    def __init__(self, target: UpstreamTarget, open_timeout: float, read_timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((target.host, target.port), open_timeout)
        try:
            if target.scheme == "https":
                sock = self.handshake(sock, tls or ssl.create_default_context(), target.host)
                sock.settimeout(read_timeout)
            else:
                sock = TimedSocket.adopt(sock, read_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reader = SocketReader(sock)

    @staticmethod
    def handshake(sock: socket.socket, tls: ssl.SSLContext, host: str) -> ssl.SSLSocket:
        """TLS over ``sock``; a failure says whether the certificate or the handshake failed."""
        try:
            return tls.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError:
            raise
        except ssl.SSLError as error:
            raise TlsHandshakeFailed(error.reason or type(error).__name__) from None

    def close(self) -> None:
        with suppress(OSError):
            self.sock.close()


class UpstreamPool:
    """Persistent HTTP/1.1 connections to the upstream, reused across requests.

    A connection goes back to the pool only after its response was read to the
    end; anything else (errors, abandoned streams) closes it, which is also how
    a local model learns that nobody is listening any more.
    """

    def __init__(self, target: UpstreamTarget, open_timeout: float, read_timeout: float,
                 max_idle: int = 64, tls: ssl.SSLContext | None = None) -> None:
        self.target = target
        self.open_timeout = open_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.tls = tls  # https: the trust (upstream_tls); None for http
        host = f"[{target.host}]" if ":" in target.host else target.host
        default_port = 443 if target.scheme == "https" else 80
        self.host_header = host if target.port == default_port else f"{host}:{target.port}"
        self._idle: list[UpstreamConnection] = []
        self._lock = threading.Lock()
        self.closed = False  # a server a reload removed: what its calls give back is closed

    def connect(self) -> UpstreamConnection:
        return UpstreamConnection(self.target, self.open_timeout, self.read_timeout, self.tls)

    def take(self) -> tuple[UpstreamConnection, bool]:
        """An idle pooled connection (reused=True) or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self.connect(), False

    def release(self, conn: UpstreamConnection) -> None:
        """Keep a connection whose last response was read to the end."""
        with self._lock:
            if len(self._idle) < self.max_idle and not self.closed:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
        self.forget_idle()

    def forget_idle(self) -> None:
        """Close the idle connections: the server dropped a call, so they are likely dead too,
        and a request written on one would be taken for delivered."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class UpstreamExchange:
    """One request and its response on a pooled connection, abortable from another thread."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.conn: UpstreamConnection | None = None
        self.response: UpstreamResponse | None = None
        self.aborted = False
        self.sent = False       # the request reached the upstream, which may be working on it
        self.deliveries = 0     # times the whole request was written (a stale connection's too)
        self.completed = False  # the response was read to its end, so the connection is reusable
        self._lock = threading.Lock()

    def send(self, method: str, path: str, headers: list[tuple[str, str]],
             body: bytes, retry_stale: bool = True) -> UpstreamResponse:
        """Send the request (head and body in one write) and return the response head.

        A pooled connection that the upstream closed while idle fails before any
        response byte; only then is the request retried, once, on a fresh connection
        (unless ``retry_stale`` is False: the call may be written no more times).
        """
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.pool.host_header}",
                 "Accept-Encoding: identity"]  # answers are read (usage, models): never compressed
        lines.extend([f"{name}: {value}" for name, value in headers])
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        conn, reused = self.pool.take()
        try:
            return self._send_on(conn, method, request)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not reused or self.aborted or not retry_stale:
                raise
        self.sent = False  # it went out on a connection the upstream had closed: it never had it
        return self._send_on(self.pool.connect(), method, request)

    def _send_on(self, conn: UpstreamConnection, method: str, request: bytes) -> UpstreamResponse:
        with self._lock:
            self.conn = conn
            if self.aborted:
                conn.close()
                raise ConnectionAbortedError()
        self.sent = False
        try:
            conn.sock.sendall(request)
            self.sent = True
            self.deliveries += 1
            self.response = UpstreamResponse(conn.reader, method)
            return self.response
        except BaseException:
            conn.close()
            raise

    def abort(self) -> None:
        """Hang up on the upstream now, so that it stops generating an answer nobody will read."""
        with self._lock:
            self.aborted = True
            if self.conn is not None:
                with suppress(OSError):
                    self.conn.sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        """Return the connection to the pool if its response was read to the end, else close it."""
        conn = self.conn
        if conn is None:
            return
        response = self.response
        if self.completed and not self.aborted and response is not None and not response.will_close:
            self.pool.release(conn)
            return
        with suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


class Ticket:
    """One request's place at the gate: queued, then granted, or withdrawn if its client left.

    A user's request under an app key counts against the user's limit and the
    app's (``group``); the queue takes turns by key (``lane``), then by
    ``identity`` within it, each by its ``weight`` and ``priority``: for a
    plain key both are the key's, for a user the app's (``group_turns``) and
    then the user's.
    """

    __slots__ = ("identity", "key_limit", "group", "group_limit", "weight", "priority",
                 "group_turns", "since", "event", "granted", "withdrawn")

    def __init__(self, identity: str, key_limit: int, group: str | None = None,
                 group_limit: int = 0, weight: int = 1, priority: int = 0,
                 group_turns: tuple[int, int] = (1, 0)) -> None:
        self.identity = identity
        self.key_limit = key_limit
        self.group = group
        self.group_limit = group_limit
        self.weight = weight
        self.priority = priority
        self.group_turns = group_turns  # (weight, priority) of the app key, for a user's ticket
        self.since = 0.0  # on the gate's clock, when it was queued
        self.event: threading.Event | None = None  # made only for a ticket that has to wait
        self.granted = False
        self.withdrawn = False

    @property
    def lane(self) -> str:
        """The key whose turn this ticket waits for: the app's for a user, else its own."""
        return self.group or self.identity


class Lane:
    """A key's place in the gate's turns, or one identity's inside a key's.

    A key's lane holds a lane per identity queued under it (the key itself, or
    each user of an app key); an identity's lane holds its tickets, first come
    first served.  ``used`` counts the turns taken since the lane last went to
    the back of the line: it goes there after ``weight`` of them.
    """

    __slots__ = ("weight", "priority", "used", "tickets", "lanes")

    def __init__(self, weight: int, priority: int, nested: bool) -> None:
        self.weight = weight
        self.priority = priority
        self.used = 0
        self.tickets: deque[Ticket] | None = None if nested else deque()
        self.lanes: OrderedDict[str, Lane] | None = OrderedDict() if nested else None

    def __bool__(self) -> bool:
        return bool(self.tickets if self.lanes is None else self.lanes)


class FairGate:
    """Admission to the upstream: a global cap, a per-key cap, and a fair queue.

    Waiting requests take turns by key, and by user within an app key, so a key
    with twenty queued requests does not delay a key with one.  A key of
    ``weight`` 3 takes three turns in a row for one of a weight-1 key; among
    the keys that could go, only those of the highest ``priority`` take turns,
    except a request waiting ``max_wait`` seconds or longer, which takes turns
    with them (a lower class is held back, never starved).  Every slot
    ``acquire`` grants is given back by ``release``, which the relay registers
    with the call (``Call.on_end``).  With nobody waiting, ``acquire`` only counts.
    """

    def __init__(self, limit: int, timeout: float, max_wait: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit  # 0: no global limit
        self.timeout = timeout
        self.max_wait = max_wait
        self.clock = clock
        self.in_flight = 0
        self._per_key: dict[str, int] = {}
        self._lanes: OrderedDict[str, Lane] = OrderedDict()
        self._classes: Counter[int] = Counter()  # waiting lanes (keys' and users') by priority
        self._lock = threading.Lock()

    def acquire(self, ticket: Ticket) -> None:
        """Wait for a slot; ClientGone if the ticket is withdrawn, a 503 after QUEUE_TIMEOUT."""
        with self._lock:
            if ticket.withdrawn:
                raise ClientGone()
            if not self._lanes and self._has_room(ticket):
                self._grant(ticket)
                return
            ticket.event = threading.Event()
            self._enqueue(ticket)
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
                if ticket.event is not None:
                    ticket.event.set()

    def _enqueue(self, ticket: Ticket) -> None:
        """Queue at the back of the ticket's lanes, which take its key's (and user's) latest turns."""
        ticket.since = self.clock()
        turns = ticket.group_turns if ticket.group is not None else (ticket.weight, ticket.priority)
        outer = self._lane(self._lanes, ticket.lane, turns, nested=True)
        inner = self._lane(outer.lanes, ticket.identity,  # type: ignore[arg-type]
                           (ticket.weight, ticket.priority), nested=False)
        inner.tickets.append(ticket)  # type: ignore[union-attr]

    def _lane(self, lanes: OrderedDict[str, Lane], name: str, turns: tuple[int, int],
              nested: bool) -> Lane:
        """``name``'s lane in ``lanes``, opened at the back of the line if it has none, with
        ``turns`` as its weight and priority (a reloaded keys file counts at once)."""
        weight, priority = turns
        lane = lanes.get(name)
        if lane is None:
            lane = lanes[name] = Lane(weight, priority, nested)
            self._count_class(priority, +1)
        elif lane.priority != priority:
            self._count_class(lane.priority, -1)
            self._count_class(priority, +1)
        lane.weight, lane.priority = weight, priority
        return lane

    def _close(self, lanes: OrderedDict[str, Lane], name: str) -> None:
        self._count_class(lanes.pop(name).priority, -1)

    def _count_class(self, priority: int, change: int) -> None:
        count = self._classes[priority] + change
        if count:
            self._classes[priority] = count
        else:
            del self._classes[priority]

    def _dequeue(self, ticket: Ticket) -> None:
        outer = self._lanes.get(ticket.lane)
        inner = outer.lanes.get(ticket.identity) if outer is not None and outer.lanes else None
        if inner is None or inner.tickets is None or ticket not in inner.tickets:
            return
        inner.tickets.remove(ticket)
        if not inner:
            self._close(outer.lanes, ticket.identity)  # type: ignore[union-attr, arg-type]
            if not outer:
                self._close(self._lanes, ticket.lane)

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            self.in_flight -= 1
            for identity in (ticket.identity, ticket.group):
                if identity is None:
                    continue
                remaining = self._per_key[identity] - 1
                if remaining:
                    self._per_key[identity] = remaining
                else:
                    del self._per_key[identity]
            self._dispatch()

    def _queued(self) -> Iterator[Ticket]:
        for outer in self._lanes.values():
            for inner in outer.lanes.values():  # type: ignore[union-attr]
                yield from inner.tickets  # type: ignore[misc]

    @property
    def waiting(self) -> int:
        with self._lock:  # (read by other threads: the lanes must not change under the count)
            return sum(len(inner.tickets) for outer in self._lanes.values()  # type: ignore[arg-type]
                       for inner in outer.lanes.values())  # type: ignore[union-attr]

    @property
    def load(self) -> int:
        """Calls in flight and waiting (``waiting`` counts under the lock)."""
        return self.in_flight + self.waiting

    def counts(self, identity: str) -> tuple[int, int]:
        """Requests of ``identity`` in flight and waiting (a user's, or all of an app's)."""
        with self._lock:
            waiting = sum(1 for ticket in self._queued() if identity in (ticket.identity, ticket.group))
            return self._per_key.get(identity, 0), waiting

    def _has_room(self, ticket: Ticket) -> bool:
        per_key = self._per_key
        return ((not self.limit or self.in_flight < self.limit)
                and (not ticket.key_limit or per_key.get(ticket.identity, 0) < ticket.key_limit)
                and (not ticket.group_limit or per_key.get(ticket.group or "", 0) < ticket.group_limit))

    def _grant(self, ticket: Ticket) -> None:
        self.in_flight += 1
        self._per_key[ticket.identity] = self._per_key.get(ticket.identity, 0) + 1
        if ticket.group is not None:
            self._per_key[ticket.group] = self._per_key.get(ticket.group, 0) + 1
        ticket.granted = True
        if ticket.event is not None:
            ticket.event.set()

    def _dispatch(self) -> None:
        """Hand free slots, one turn at a time, while a waiting request may go."""
        if not self._lanes:
            return  # (the clock is not read when nobody waits)
        overdue = self.clock() - self.max_wait  # queued at or before this: waited long enough
        while self._lanes and (not self.limit or self.in_flight < self.limit):
            ticket = self._take_turn(self._lanes, overdue)
            if ticket is None:
                return  # everyone waiting is at their own key's limit
            self._grant(ticket)

    def _take_turn(self, lanes: OrderedDict[str, Lane], overdue: float) -> Ticket | None:
        """Take the next ticket from ``lanes``: the first lane in line that may go, of the
        highest priority among those that may (or holding a request queued by ``overdue``);
        it goes to the back once it has had ``weight`` turns in a row or has no more waiting.
        """
        if len(self._classes) > 1:
            ready = [(name, lane) for name, lane in lanes.items() if self._may_go(lane)]
            top = max((lane.priority for _, lane in ready), default=0)
            name, lane = next(((name, lane) for name, lane in ready
                               if lane.priority == top or self._may_go(lane, overdue)), ("", None))
        else:  # one class: the first that may go, whatever the clock says
            name, lane = next(((name, lane) for name, lane in lanes.items() if self._may_go(lane)),
                              ("", None))
        if lane is None:
            return None
        ticket = (lane.tickets.popleft() if lane.tickets is not None
                  else self._take_turn(lane.lanes, overdue))  # type: ignore[arg-type]
        lane.used += 1
        if not lane:
            self._close(lanes, name)
        elif lane.used >= lane.weight:
            lane.used = 0
            lanes.move_to_end(name)
        return ticket

    def _may_go(self, lane: Lane, queued_by: float = math.inf) -> bool:
        """Whether ``lane`` holds a request (queued by ``queued_by``) that may take a slot now:
        its key's and user's limits allow.  An identity's tickets wait behind its first: the
        limits that hold it hold them all.
        """
        if lane.tickets is not None:
            first = lane.tickets[0]
            return first.since <= queued_by and self._has_room(first)
        return any(self._may_go(inner, queued_by) for inner in lane.lanes.values())  # type: ignore[union-attr]


@dataclass
class UpstreamState:
    """How exchanges with one server go, for routing (``up``), the dashboard and /metrics.

    ``up`` False is "down": requests go to its other replicas first, and the
    prober asks it every few seconds until it answers again.
    """

    up: bool | None = None  # None: not tried yet
    last_error: str | None = None
    requests: int = 0       # calls it answered (or began to)
    tokens: int = 0         # prompt and completion tokens it reported for them
    awaited: int = 0        # calls waiting for it to come back (it is their model's first to try)
    _awaiting: Counter = field(default_factory=Counter, repr=False, compare=False)  # by caller
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def answered(self) -> None:
        self.up = True

    def failed(self, failure: ProxyError) -> None:
        self.up = False
        self.note(failure)

    def note(self, failure: ProxyError) -> None:
        # why, in a few words (failure_reason): never a key, a URL or an exception's own text
        self.last_error = f"{failure.status} {failure.detail or failure.message}"

    def count(self, tokens: int) -> None:
        with self._lock:
            self.requests += 1
            self.tokens += tokens

    @contextmanager
    def awaiting(self, callers: tuple[str, ...]) -> Iterator[None]:
        """A call waits for this server to answer again: it is queued here meanwhile, for the
        owner, who would otherwise see "0 queued" while its callers hang (``callers``: the
        identities it counts for, a user's and its app's, as a queue's ticket does)."""
        with self._lock:
            self.awaited += 1
            self._awaiting.update(callers)
        try:
            yield
        finally:
            with self._lock:
                self.awaited -= 1
                self._awaiting.subtract(callers)
                for caller in callers:
                    if not self._awaiting[caller]:
                        del self._awaiting[caller]

    def awaited_by(self, identity: str) -> int:
        with self._lock:
            return self._awaiting.get(identity, 0)


@dataclass(eq=False)  # one server is one object: its key is never compared, it hashes by identity
class Upstream:
    """One model server, and everything that talks to it.

    ``key`` is sent only to it, never shown.  What a model is called there is
    the route's business (``ModelRoute.upstream_model``), not the server's.
    """

    name: str
    pool: UpstreamPool
    gate: FairGate
    key: str | None = field(default=None, repr=False)
    state: UpstreamState = field(default_factory=UpstreamState)
    key_header: str = "authorization"  # a name in UPSTREAM_KEY_HEADERS

    @property
    def target(self) -> UpstreamTarget:
        return self.pool.target

    @property
    def load(self) -> int:
        """Requests given to it and not yet over: in flight and waiting for its gate."""
        return self.gate.load

    @property
    def queued(self) -> int:
        """Calls waiting for it, for the owner: at its gate, or for it to come back while down."""
        return self.gate.waiting + self.state.awaited

    def credentials(self) -> list[tuple[str, str]]:
        """The one header that authenticates the proxy to this server (none without a key),
        in the style the server reads (``UPSTREAM_KEY_HEADERS``)."""
        if not self.key:
            return []
        header, prefix = UPSTREAM_KEY_HEADERS[self.key_header]
        return [(header, prefix + self.key)]

    def ask(self, path: str, timeout: float) -> tuple[int, bytes]:
        """GET ``path`` on a connection of its own (not the pool's), for probes and listings.

        The whole exchange has ``timeout``, not each read: a server that trickles its
        answer a byte at a time is hung up on, not waited for.  And an answer larger than
        any list of models is refused, not held in memory for each caller who asks.
        """
        exchange = UpstreamExchange(UpstreamPool(self.target, timeout, timeout, max_idle=0,
                                                 tls=self.pool.tls))
        cutoff = threading.Timer(timeout, exchange.abort)
        cutoff.daemon = True
        cutoff.start()
        try:
            response = exchange.send("GET", path, self.credentials(), b"")
            body = read_whole(response, MAX_LISTING_BODY)
            exchange.completed = True
            return response.status, body
        finally:
            cutoff.cancel()
            exchange.finish()

    def answers(self, timeout: float) -> bool:
        """Whether the server answers: ``GET <base>/models`` below 500, or ``GET /health`` 200."""
        with suppress(OSError, http.client.HTTPException, ProxyError):
            if self.ask(self.target.base_path + "/models", timeout)[0] < 500:
                return True
            return self.ask("/health", timeout)[0] == 200
        return False

    def ask_json(self, path: str, timeout: float) -> object:
        """``ask``'s answer as JSON, ``{}`` for any status but 200; ``LISTING_FAILURES`` for a
        server that cannot be asked or answers nonsense."""
        status, body = self.ask(path, timeout)
        return json.loads(body) if status == 200 else {}

    def own_models(self, timeout: float) -> list[str]:
        """The model ids the server lists itself (OpenAI's shape; Ollama's /v1 answers it too)."""
        try:
            listing = self.ask_json(self.target.base_path + "/models", timeout)
            return [entry["id"] for entry in listing.get("data", [])  # type: ignore[attr-defined]
                    if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
        except LISTING_FAILURES:
            log.warning("upstream %s: its model list could not be read", self.name)
            return []

    def running_models(self, path: str, timeout: float) -> list[tuple[str, dict]]:
        """Ollama's running models (``GET /api/ps`` at ``path``), each with the name the server
        runs it by; none from a server that does not answer them (down, or not Ollama:
        llama-server has no /api/ps), which is left out rather than failing the listing."""
        try:
            listing = self.ask_json(path, timeout)
            entries = [entry for entry in listing.get("models") or []  # type: ignore[attr-defined]
                       if isinstance(entry, dict)]
            named = [(entry.get("model") or entry.get("name"), entry) for entry in entries]
            return [(name, entry) for name, entry in named if isinstance(name, str)]
        except LISTING_FAILURES:
            return []


# What asking a server for a list can raise: unreachable, a bad answer, or JSON of another shape.
LISTING_FAILURES = (OSError, http.client.HTTPException, ProxyError, ValueError, RecursionError,
                    AttributeError, TypeError)


# -- MODELS_FILE's "upstreams" and the models' "upstream" fields -------------

DEFAULT_UPSTREAM = "default"  # BASE_API_URL's server, serving every model no entry names
UPSTREAM_FIELDS = frozenset({"url", "api_key_env", "api_key_header", "max_concurrent"})
# How a server takes its key (``api_key_header``, UPSTREAM_API_KEY_HEADER): the header's name
# and what precedes the key in it.  OpenAI and the servers that copy it read a Bearer token;
# Anthropic's own API reads x-api-key, Azure OpenAI api-key.  Every one of these names is in
# CREDENTIAL_HEADERS, so a client's copy is stripped and the server gets one credential: this.
UPSTREAM_KEY_HEADERS: dict[str, tuple[str, str]] = {
    "authorization": ("Authorization", "Bearer "),
    "x-api-key": ("x-api-key", ""),
    "api-key": ("api-key", ""),
}
UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PATTERN_CHARACTERS = frozenset("*?[")


def key_header_style(value: object, where: str) -> str:
    """``value`` as a name in ``UPSTREAM_KEY_HEADERS`` (in any case, as header names are).

    Why the message never repeats the value: a key pasted into the wrong field (the
    file's, or UPSTREAM_API_KEY_HEADER) would otherwise reach the log.
    """
    text = value.strip().lower() if isinstance(value, str) else ""
    if text in UPSTREAM_KEY_HEADERS:
        return text
    close = difflib.get_close_matches(text, UPSTREAM_KEY_HEADERS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{where} must be one of {', '.join(UPSTREAM_KEY_HEADERS)}{hint}; "
                      "the value given is not shown, for it could be a key")


@dataclass(frozen=True)
class UpstreamSpec:
    """One server as MODELS_FILE (or BASE_API_URL) declares it; ``key`` is never shown."""

    name: str
    target: UpstreamTarget
    key: str | None = field(default=None, repr=False)
    max_concurrent: int = 0
    key_header: str = "authorization"  # a name in UPSTREAM_KEY_HEADERS


@dataclass(frozen=True)
class ModelSpec:
    """Where calls for a model name (or an fnmatch pattern of names) go.

    ``upstream_model`` is the name the servers are asked for; ``fixed`` (BASE_MODEL)
    makes it the only model the route serves, whatever the caller names.
    """

    pattern: str
    upstreams: tuple[str, ...]
    upstream_model: str | None = None
    sticky: bool = False
    fixed: bool = False

    @property
    def is_pattern(self) -> bool:
        return bool(PATTERN_CHARACTERS & set(self.pattern))


@dataclass(frozen=True)
class UpstreamPlan:
    """The servers and the models' routes, checked; ``models`` in the order they are tried
    (exact names, then patterns in the file's order with a bare ``*`` last, then the default)."""

    upstreams: tuple[UpstreamSpec, ...]
    models: tuple[ModelSpec, ...]


def parse_upstreams(document: dict, environ: Mapping[str, str], config: Config) -> UpstreamPlan:
    """The servers and routes of a decoded MODELS_FILE, with BASE_API_URL as the server "default".

    Reads ``upstreams`` and the ``upstream``, ``upstream_model`` and ``sticky`` fields
    of ``models`` entries, nothing else (prices are the budgets' business).  Errors
    name the entry, never a key or a URL (which could hold one).
    """
    declared = document.get("upstreams", {})
    if not isinstance(declared, dict):
        raise ConfigError("'upstreams' must be an object mapping names to servers")
    specs = [_upstream_spec(name, entry, environ, config) for name, entry in declared.items()]
    if config.upstream_url:
        if DEFAULT_UPSTREAM in declared:
            raise ConfigError(f"upstream '{DEFAULT_UPSTREAM}' is BASE_API_URL's name; "
                              "name the server in the file otherwise")
        specs.append(UpstreamSpec(DEFAULT_UPSTREAM, UpstreamTarget.parse(config.upstream_url),
                                  config.upstream_key, config.upstream_max_concurrent,
                                  config.upstream_key_header))
    if not specs:
        raise ConfigError("no model server: set BASE_API_URL or declare 'upstreams'")
    models = document.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError("'models' must be an object mapping model names to their settings")
    names = {spec.name for spec in specs}
    routes = [route for name, entry in models.items()
              if (route := _model_spec(name, entry, names)) is not None]
    exact = [route for route in routes if not route.is_pattern]
    patterns = sorted((route for route in routes if route.is_pattern),
                      key=lambda route: route.pattern == "*")  # (stable: the file's order)
    if config.upstream_url and not any(route.pattern == "*" for route in patterns):
        patterns.append(ModelSpec("*", (DEFAULT_UPSTREAM,), config.upstream_model,
                                  fixed=config.upstream_model is not None))
    return UpstreamPlan(tuple(specs), tuple(exact + patterns))


def _upstream_spec(name: object, entry: object, environ: Mapping[str, str],
                   config: Config) -> UpstreamSpec:
    if not isinstance(name, str) or not UPSTREAM_NAME.fullmatch(name):
        raise ConfigError(f"upstream {str(name)[:64]!r}: a name is letters, digits, '.', '_' "
                          "or '-', at most 64")
    where = f"upstream '{name}'"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: settings must be an object")
    unknown = set(entry) - UPSTREAM_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}; known: "
                          + ", ".join(sorted(UPSTREAM_FIELDS)))
    url = entry.get("url")
    if not isinstance(url, str):
        raise ConfigError(f"{where}: 'url' must be the server's base URL, e.g. http://10.0.0.5:8080/v1")
    try:
        target = UpstreamTarget.parse(url)
    except ConfigError:  # its message quotes the URL, which could hold a credential
        raise ConfigError(f"{where}: 'url' must be an http:// or https:// URL with a host, and "
                          "no credentials, query or fragment (a key goes in api_key_env)") from None
    key = None
    variable = entry.get("api_key_env")
    if variable is not None:
        if not isinstance(variable, str) or not variable:
            raise ConfigError(f"{where}: 'api_key_env' must name an environment variable")
        key = environ.get(variable, "").strip()
        if not key:
            raise ConfigError(f"{where}: the environment variable {variable[:64]} "
                              "(its api_key_env) is not set")
    if "api_key_header" in entry and key is None:
        raise ConfigError(f"{where}: 'api_key_header' needs 'api_key_env' (the key it sends)")
    header = key_header_style(entry.get("api_key_header", "authorization"), f"{where}: 'api_key_header'")
    limit = entry.get("max_concurrent", config.upstream_max_concurrent)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 1_000_000:
        raise ConfigError(f"{where}: 'max_concurrent' must be a whole number from 0 (no limit)")
    return UpstreamSpec(name, target, key, limit, header)


def _model_spec(name: str, entry: object, upstreams: set[str]) -> ModelSpec | None:
    """A model entry's route, or None for an entry that names no server (it routes as any name)."""
    where = f"model '{name[:200]}'"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: settings must be an object")
    named = entry.get("upstream")
    if named is None:
        if "upstream_model" in entry or "sticky" in entry:
            raise ConfigError(f"{where}: 'upstream_model' and 'sticky' need 'upstream'")
        return None
    chosen = [named] if isinstance(named, str) else named
    if (not isinstance(chosen, list) or not chosen or not all(isinstance(n, str) for n in chosen)
            or len(set(chosen)) != len(chosen)):
        raise ConfigError(f"{where}: 'upstream' must be a server's name or a list of different ones")
    missing = [n for n in chosen if n not in upstreams]
    if missing:
        raise ConfigError(f"{where}: no upstream named {missing[0][:64]!r}; declared: "
                          + ", ".join(sorted(upstreams)))
    rename = entry.get("upstream_model")
    if rename is not None and (not isinstance(rename, str) or not rename.strip()):
        raise ConfigError(f"{where}: 'upstream_model' must be the model's name on its server")
    sticky = entry.get("sticky", False)
    if not isinstance(sticky, bool):
        raise ConfigError(f"{where}: 'sticky' must be true or false")
    return ModelSpec(name, tuple(chosen), rename, sticky)


class ModelRoute:
    """A model's servers (its replicas), and whose turn it is among those equally busy."""

    def __init__(self, spec: ModelSpec, replicas: Sequence[Upstream]) -> None:
        self.spec = spec
        self.replicas = tuple(replicas)
        self.turn = 0

    @property
    def upstream_model(self) -> str | None:
        return self.spec.upstream_model

    @property
    def fixed_model(self) -> str | None:
        """BASE_MODEL: the one model this route serves, whatever the caller names."""
        return self.spec.upstream_model if self.spec.fixed else None

    def matches(self, model: str) -> bool:
        pattern = self.spec.pattern
        if pattern == "*":  # every model (BASE_API_URL's server): asked on every call
            return True
        if self.spec.is_pattern:
            return fnmatch.fnmatchcase(model, pattern)
        return model == pattern

    def in_turn(self, preferred: Upstream | None = None) -> list[Upstream]:
        """Every replica, in the order to try: those up, least busy first, ties by turn; then
        those down (never skipped: a model's only server is tried however it last went).

        ``preferred`` (a sticky conversation's server) comes first while its load is
        within one request of the least busy's.
        """
        count = len(self.replicas)
        if count == 1:  # its only server, tried however it last went: nothing to weigh
            return list(self.replicas)
        turn, self.turn = self.turn, self.turn + 1  # (a lost increment under a race costs nothing)
        rotated = [self.replicas[(turn + i) % count] for i in range(count)]
        load = {upstream: upstream.load for upstream in rotated}  # (read once: it moves meanwhile)
        up = sorted((u for u in rotated if u.state.up is not False), key=load.__getitem__)
        down = [u for u in rotated if u.state.up is False]
        if preferred in up and load[preferred] <= load[up[0]] + 1:
            up.remove(preferred)
            up.insert(0, preferred)
        return up + down


class RouteTable(NamedTuple):
    """One MODELS_FILE reading, built: replaced whole on a reload, so a call keeps the one it began with."""

    upstreams: dict[str, Upstream]
    exact: dict[str, ModelRoute]
    patterns: tuple[ModelRoute, ...]
    simple: bool  # one server for every model: its own lists are relayed as they are

    def find(self, model: str) -> ModelRoute | None:
        """``model``'s exact entry, else the first pattern it matches (a bare ``*`` last)."""
        route = self.exact.get(model)
        if route is not None:
            return route
        return next((route for route in self.patterns if route.matches(model)), None)


def routes_there(table: RouteTable, route: ModelRoute, model: str) -> bool:
    """Whether a call naming ``model`` goes by ``route`` (a pattern no earlier entry beats)."""
    return table.find(model) is route


T = TypeVar("T")


def at_once(calls: Sequence[Callable[[], T]]) -> list[T]:
    """The results of ``calls`` run side by side, in order: a listing asks every server at once,
    so that it waits as long as the slowest (``Upstream.ask`` bounds each), not the sum."""
    if len(calls) <= 1:
        return [call() for call in calls]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(calls), 16)) as pool:
        return list(pool.map(lambda call: call(), calls))


class UpstreamRegistry(WatchedFile):
    """The model servers behind the proxy, and which answer a call for a model.

    Servers and routes come from BASE_API_URL (the server "default", serving every
    model) and MODELS_FILE, which is re-read when it changes; a broken edit keeps
    the last good reading.  What forwards a call asks ``route_for`` for the model's
    route, and ``in_turn`` for its replicas in the order to try.  While a server
    is down, a prober thread asks it every PROBE_SECONDS whether it answers again.
    """

    setting, kept = "MODELS_FILE", "upstreams and models"

    PROBE_SECONDS = 5.0
    RETRY_SECONDS = 0.5   # while a model's every server is down, how often a waiting call tries again
    AFFINITY_LIMIT = 10_000  # sticky conversations remembered

    @property
    def tls(self) -> ssl.SSLContext:
        """The trust for https servers (``upstream_tls``), made once, when first needed."""
        if self._tls is None:
            self._tls = upstream_tls(None)
        return self._tls

    def __init__(self, config: Config, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.clock = config, clock
        self.environ = os.environ if environ is None else environ
        # Checked at startup even for http (a bad file is a mistake); else made for the first
        # https server, since loading the system's CAs is slow and large for a proxy that needs none.
        self._tls = upstream_tls(config.upstream_ca_file) if config.upstream_ca_file else None
        self._stamp: tuple | None = None
        self._changed = threading.Condition()
        self._affinity: OrderedDict[str, Upstream] = OrderedDict()
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None
        try:
            self.table = self.build(self.read_plan())
        except ConfigError as error:
            raise ConfigError(f"MODELS_FILE {config.models_file}: {error}"
                              if config.models_file else str(error)) from None

    # -- reading MODELS_FILE -----------------------------------------------------

    def read_plan(self) -> UpstreamPlan:
        document: object = {}
        if self.config.models_file:
            document = keys_document(self.read_text())
            if not isinstance(document, dict):
                raise ConfigError("must be a JSON object")
        return parse_upstreams(document, self.environ, self.config)  # type: ignore[arg-type]

    def build(self, plan: UpstreamPlan) -> RouteTable:
        """The table for ``plan``, keeping each server that is unchanged (its connections,
        gate and counts); a changed one is new, the old one finishing what it has."""
        config, old = self.config, getattr(self, "table", None)
        upstreams = {}
        for spec in plan.upstreams:
            kept = old.upstreams.get(spec.name) if old is not None else None
            if (kept is not None and kept.target == spec.target and kept.key == spec.key
                    and kept.key_header == spec.key_header):
                kept.gate.limit = spec.max_concurrent
                upstreams[spec.name] = kept
                continue
            pool = UpstreamPool(spec.target, config.open_timeout, config.read_timeout,
                                tls=self.tls if spec.target.scheme == "https" else None)
            gate = FairGate(spec.max_concurrent, config.queue_timeout, config.priority_max_wait, self.clock)
            upstreams[spec.name] = Upstream(spec.name, pool, gate, spec.key, key_header=spec.key_header)
        routes = [ModelRoute(model, [upstreams[name] for name in model.upstreams]) for model in plan.models]
        simple = len(upstreams) == 1 and len(routes) == 1 and routes[0].spec.pattern == "*"
        return RouteTable(upstreams, {r.spec.pattern: r for r in routes if not r.spec.is_pattern},
                          tuple(r for r in routes if r.spec.is_pattern), simple)

    def reload(self) -> None:
        """Read MODELS_FILE now; ConfigError (keeping the routes in use) when it is broken."""
        table = self.build(self.read_plan())
        old, self.table = self.table, table
        for name, upstream in old.upstreams.items():
            if table.upstreams.get(name) is not upstream:
                upstream.pool.close()  # its calls in flight finish on their own connections
        with self._changed:
            self._changed.notify_all()

    @property
    def watched_path(self) -> str | None:
        return self.config.models_file

    def loaded(self) -> str:
        return "upstreams " + ", ".join(self.table.upstreams)

    # -- routing -----------------------------------------------------------------

    def route_for(self, model: str | None) -> ModelRoute:
        """The route of ``model``: its exact entry, else the first pattern it matches (a
        bare ``*`` last); a call naming no model takes the default route.  A 404 (free) for
        a model no server has."""
        if isinstance(model, str):
            route = self.table.find(model)
            if route is not None:
                return route
            raise ProxyError(404, f"The model '{model[:200]}' does not exist", code="model_not_found",
                             param="model")
        return self.default_route

    @property
    def default_route(self) -> ModelRoute:
        """Where calls that name no model go: the ``*`` route, else the first server declared."""
        table = self.table
        for route in table.patterns:
            if route.spec.pattern == "*":
                return route
        first = next(iter(table.upstreams.values()))
        return ModelRoute(ModelSpec("*", (first.name,)), [first])

    def route_to(self, name: str) -> ModelRoute:
        """A route to the server called ``name`` alone (a stored answer's); the default route
        once that server is gone from the file."""
        upstream = self.table.upstreams.get(name)
        if upstream is None:
            return self.default_route
        return ModelRoute(ModelSpec("*", (name,)), [upstream])

    @property
    def default(self) -> Upstream:
        return self.default_route.replicas[0]

    def in_turn(self, route: ModelRoute, affinity: str | None) -> list[Upstream]:
        preferred = self._affinity.get(affinity) if affinity is not None else None
        return route.in_turn(preferred)

    def remember(self, affinity: str | None, upstream: Upstream) -> None:
        """A sticky conversation's next call prefers the server that answered this one."""
        if affinity is None:
            return
        with self._changed:
            self._affinity[affinity] = upstream
            self._affinity.move_to_end(affinity)
            while len(self._affinity) > self.AFFINITY_LIMIT:
                self._affinity.popitem(last=False)

    def listing(self) -> list[str] | None:
        """Every model a caller can name, across the servers: the file's names, and each
        server's own list for its patterns (only names that would route there); with one
        server that serves one model whatever is asked (BASE_MODEL), that model.  None: one
        server, whose own list is relayed as it is."""
        table = self.table
        if table.simple:
            fixed = self.default_route.fixed_model
            return None if fixed is None else [fixed]
        names = list(table.exact)
        asked: dict[ModelRoute, Upstream] = {}  # each pattern's first server that is not down
        for route in table.patterns:
            if route.fixed_model is not None:
                names.append(route.fixed_model)
                continue
            upstream = next((u for u in route.replicas if u.state.up is not False), None)
            if upstream is not None:
                asked[route] = upstream
        servers = list(dict.fromkeys(asked.values()))
        lists = dict(zip(servers, at_once([functools.partial(upstream.own_models, self.asking_timeout)
                                           for upstream in servers])))
        for route, upstream in asked.items():
            names.extend(model for model in lists[upstream] if routes_there(table, route, model))
        return list(dict.fromkeys(names))

    @property
    def asking_timeout(self) -> float:
        """How long a listing waits for the servers it asks, all asked at once (a slow one only
        shortens the list)."""
        return min(self.config.open_timeout, self.config.read_timeout, 5.0)

    @staticmethod
    def callers_names(table: RouteTable, upstream: Upstream, model: str) -> list[str]:
        """The names callers use for what ``upstream`` calls ``model``, as ``listing`` names
        models: each exact entry sending calls there by that name (its ``upstream_model``, else
        its own), BASE_MODEL's, and ``model`` itself where a pattern sends it there.  None
        where no call could reach that server's ``model`` (a pattern's ``upstream_model`` is
        every matching name's: no one name is the caller's)."""
        names = [name for name, route in table.exact.items()
                 if upstream in route.replicas and (route.upstream_model or name) == model]
        for route in table.patterns:
            if upstream not in route.replicas:
                continue
            if ((route.upstream_model is None and routes_there(table, route, model))
                    or route.fixed_model == model):
                names.append(model)
        return list(dict.fromkeys(names))

    def running(self, target: Target, allows: Callable[[str], bool]) -> list[dict] | None:
        """Ollama's running models (``GET /api/ps``) of every server that is not down, each
        entry under each name callers use for it (``callers_names``) that ``allows``; a server
        that fails is left out.  None: one server, whose own answer is relayed as it is."""
        table = self.table
        if table.simple:
            return None
        servers = [upstream for upstream in table.upstreams.values() if upstream.state.up is not False]
        answers = at_once([functools.partial(upstream.running_models, target.upstream_path(
            upstream.target.base_path, from_root=True), self.asking_timeout) for upstream in servers])
        running = []
        for upstream, entries in zip(servers, answers):
            for served, entry in entries:
                running.extend(dict(entry, name=name, model=name)
                               for name in self.callers_names(table, upstream, served) if allows(name))
        return running

    # -- health --------------------------------------------------------------------

    def mark_down(self, upstream: Upstream, failure: ProxyError) -> None:
        if upstream.state.up is not False:
            log.warning("upstream %s is down (%s); calls go to its model's other servers, or "
                        "wait for it where it has none", upstream.name, failure.message)
        upstream.state.failed(failure)
        upstream.pool.forget_idle()  # (kept alive to a server that is gone, they are dead too)
        self.start_probing()

    def mark_up(self, upstream: Upstream) -> None:
        was_down = upstream.state.up is False
        upstream.state.answered()
        if was_down:
            log.info("upstream %s answers again", upstream.name)
            with self._changed:
                self._changed.notify_all()

    def wait_for_change(self, deadline: float, upstream: Upstream, callers: tuple[str, ...] = ()) -> bool:
        """Wait for a server to come back (or RETRY_SECONDS); False once ``deadline`` has passed.

        Meanwhile the call is queued at ``upstream`` (its model's first server to try again),
        and holds no slot at any gate: it is counted once, and not in flight.
        """
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        with upstream.state.awaiting(callers), self._changed:
            self._changed.wait(min(left, self.RETRY_SECONDS))
        return True

    def wake(self) -> None:
        """Let calls waiting for a server look again (their client left, say)."""
        with self._changed:
            self._changed.notify_all()

    def probe_down(self) -> None:
        """Ask every server that is down whether it answers; those that do are up again."""
        timeout = min(self.config.open_timeout, 5.0)
        for upstream in list(self.table.upstreams.values()):
            if upstream.state.up is False and not self._stop.is_set() and upstream.answers(timeout):
                self.mark_up(upstream)

    def start_probing(self) -> None:
        """Start the prober unless it runs: it runs while a server is down, and only then."""
        with self._changed:
            if self._stop.is_set() or (self._prober is not None and self._prober.is_alive()):
                return
            self._prober = threading.Thread(target=self._probe_loop, name="upstream-probe", daemon=True)
            self._prober.start()

    def _probe_loop(self) -> None:
        guard = LoopGuard("upstream-probe")
        while not self._stop.wait(self.PROBE_SECONDS):
            guard.run("probing the upstreams that are down", self.probe_down)
            with self._changed:  # (a server marked down meanwhile finds this thread still running)
                if not any(upstream.state.up is False for upstream in self):
                    self._prober = None
                    return

    # -- counts ------------------------------------------------------------------

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self.table.upstreams.values())

    def describe(self) -> str:
        """The servers for the startup line: names and URLs (never a key)."""
        table = self.table
        if table.simple:
            upstream, fixed = self.default, self.default_route.fixed_model
            return upstream.target.display + (f" model {fixed}" if fixed else "")
        return ", ".join(f"{name} {upstream.target.display}" for name, upstream in table.upstreams.items())

    @property
    def in_flight(self) -> int:
        return sum(upstream.gate.in_flight for upstream in self)

    @property
    def waiting(self) -> int:
        return sum(upstream.queued for upstream in self)

    def counts(self, identity: str) -> tuple[int, int]:
        """Requests of ``identity`` in flight and waiting, at every server (for a slot, or for
        a server to come back)."""
        pairs = [upstream.gate.counts(identity) for upstream in self]
        waiting = sum(upstream.state.awaited_by(identity) for upstream in self)
        return sum(pair[0] for pair in pairs), sum(pair[1] for pair in pairs) + waiting

    @property
    def idle_connections(self) -> int:
        """The most connections the pools may keep open while idle."""
        return sum(upstream.pool.max_idle for upstream in self)

    def close(self) -> None:
        with self._changed:
            self._stop.set()
            self._changed.notify_all()
            prober = self._prober
        if prober is not None:
            prober.join()
        for upstream in self:
            upstream.pool.close()


class _Watch:
    """One client connection's watch, armed for each of its requests in turn.

    Its callback runs at most once per arming, and never after ``cancel``; made
    once per connection, not per request.
    """

    __slots__ = ("client", "fd", "on_gone", "active", "registered", "spent", "lock", "watcher")

    def __init__(self, client: socket.socket, watcher: DisconnectWatcher) -> None:
        self.client = client
        self.fd = client.fileno()
        self.on_gone: Callable[[], None] = _nothing
        self.active = False
        self.registered = False  # with epoll: once, for the connection's life
        self.spent = False       # its one shot fired and was not for a request: re-arm it
        self.lock = threading.Lock()
        self.watcher = watcher

    def cancel(self) -> None:
        with self.lock:
            if self.active:
                self.active = False
                self.watcher.disarmed(self)


def _readable_now(sock: socket.socket) -> bool:
    """Whether a read would return at once; the socket's own timeout would make recv wait."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


_EPOLL_HANG_UP = getattr(select, "EPOLLRDHUP", 0)  # Linux: the peer closed its side
_DONT_WAIT = getattr(socket, "MSG_DONTWAIT", 0)


class DisconnectWatcher:
    """One thread that notices clients hanging up while their request is upstream.

    Without it a client that gives up on a long, non-streamed answer would only
    be noticed when the answer is written, after the model finished generating
    it for nobody.  ``watch`` returns a watch whose ``cancel`` stops it; once
    ``cancel`` returns, the callback never runs.  Each watch has its own small
    lock, so handlers never queue behind one another here.

    With epoll a connection is registered once, for ``EPOLLRDHUP`` (the client
    closed its side, or reset) and one shot: arming and cancelling a request's
    watch is then a flag, no system call, and data a client sends ahead (its next
    request) wakes nobody.  Elsewhere each request registers for readability,
    through ``selectors``, and unregisters when cancelled.

    Why a thread of its own rather than the connection loop's selector: a watch
    is armed and disarmed by the request's own thread on every request, and
    here that is a flag under the watch's lock.  The loop's selector is touched
    by the loop's thread alone (others post to it and wake it), so every
    request would cost two posts and two wake-ups there.  The two wait for
    different things, too: this one for hang-ups of connections a thread is
    working on, the loop for the next request of connections no thread holds.
    """

    def __init__(self) -> None:
        # epoll directly where there is one: ``selectors`` adds a layer of Python to every
        # registration (a key object, its maps), and every request is watched.
        self._epoll = select.epoll() if hasattr(select, "epoll") and _EPOLL_HANG_UP else None
        self._selector = None if self._epoll is not None else selectors.DefaultSelector()
        self._watches: dict[int, _Watch] = {}
        self._wake_reader, self._wake_writer = socket.socketpair()
        if self._epoll is not None:
            self._epoll.register(self._wake_reader.fileno(), select.EPOLLIN)
        else:
            self._selector.register(self._wake_reader, selectors.EVENT_READ)  # type: ignore[union-attr]
        self._stopped = False
        self._guard = LoopGuard("disconnect watcher")  # used by its thread alone
        self._thread = threading.Thread(target=self._run, name="disconnect-watcher", daemon=True)
        self._thread.start()

    def watch(self, client: socket.socket, on_gone: Callable[[], None],
              watch: _Watch | None = None) -> _Watch:
        """Call ``on_gone`` if ``client`` hangs up before ``cancel``; ``watch`` is reused if given.

        A connection's requests come one at a time, so one ``_Watch`` serves them all.
        """
        if watch is None:
            watch = _Watch(client, self)
        # A reused watch was cancelled before its connection's next request; its
        # ``cancel`` stops whichever request armed it last: each request's own, since
        # a connection's requests run one after another on one thread.
        watch.on_gone = on_gone
        if self._epoll is None:  # unregistered when cancelled: no check can be running
            watch.active = True
            self._selector.register(client, selectors.EVENT_READ, watch)  # type: ignore[union-attr]
            return watch
        with watch.lock:  # against a check that is just now finding the watch disarmed
            watch.active = True
            if not watch.registered:
                watch.registered = True
                self._watches[watch.fd] = watch
                events = _EPOLL_HANG_UP | select.EPOLLONESHOT
                try:
                    self._epoll.register(watch.fd, events)
                except FileExistsError:  # a descriptor reused before its old entry went
                    self._epoll.modify(watch.fd, events)
            elif watch.spent:  # the client closed its side, or sent ahead, between requests
                watch.spent = False
                self._renew(watch)
        return watch

    def _renew(self, watch: _Watch) -> None:
        if self._epoll is not None:
            with suppress(OSError):
                self._epoll.modify(watch.fd, _EPOLL_HANG_UP | select.EPOLLONESHOT)

    def disarmed(self, watch: _Watch) -> None:
        """``watch`` was cancelled (under its lock).  With epoll its registration stays for the
        connection's next request (a cancelled watch is only a flag); elsewhere it goes."""
        if self._selector is not None:
            self._forget(watch)

    def release(self, watch: _Watch) -> None:
        """The connection is ending: its watch goes (before its descriptor can be reused)."""
        with watch.lock:
            watch.active = False
            self._forget(watch)

    def _forget(self, watch: _Watch) -> None:
        if self._epoll is not None:
            if self._watches.get(watch.fd) is watch:
                del self._watches[watch.fd]
                with suppress(OSError, ValueError):
                    self._epoll.unregister(watch.fd)
            return
        with suppress(KeyError, ValueError, OSError):
            self._selector.unregister(watch.client)  # type: ignore[union-attr]

    def _run(self) -> None:
        while not self._stopped:
            if not self._guard.run("waiting for clients to hang up", self._wait_and_check):
                time.sleep(0.5)  # a wait that fails at once must not spin

    def _wait_and_check(self) -> None:
        # epoll and kqueue see sockets registered during a wait; the timeout bounds
        # the delay on platforms whose selectors do not.
        if self._epoll is not None:
            ready = [self._watches.get(fd) for fd, _ in self._epoll.poll(0.5)]
        else:
            ready = [key.data for key, _ in self._selector.select(timeout=0.5)]  # type: ignore[union-attr]
        for watch in ready:
            if watch is not None:  # (the wake-up socket's)
                self._guard.run("checking a client that may have hung up", self._check, watch)

    def _check(self, watch: _Watch) -> None:
        # Under the watch's lock: the handler cannot cancel, read the socket or close
        # it meanwhile, so the peek cannot block and the descriptor cannot be reused.
        # With epoll the watch's one shot is used up by now: it is renewed here for a
        # request still watched, or by the next arming (renewing it while the client's
        # side stays closed would only fire again at once).
        with watch.lock:
            if not watch.active:
                watch.spent = True
                return
            if not _readable_now(watch.client):  # a stale event: the socket may be new
                self._renew(watch)
                return
            try:  # (never waits, whatever the socket's timeout)
                gone = watch.client.recv(1, socket.MSG_PEEK | _DONT_WAIT) == b""
            except (BlockingIOError, socket.timeout):
                self._renew(watch)
                return
            except OSError:
                gone = True
            watch.active = False
            watch.spent = True
            if self._selector is not None:
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
        (self._epoll or self._selector).close()  # type: ignore[union-attr]
        self._wake_reader.close()
        self._wake_writer.close()


# --------------------------------------------------------------------------
# Relay: one call's trip upstream and back
# --------------------------------------------------------------------------

class Relay:
    """Sends one call upstream through the fair gate and relays the answer as it arrives.

    The handler lends it the request and its writing methods; the relay owns
    the exchange with the upstream, the disconnect watch, and what the call
    learns on the way (served, finished, usage), so that the charge is decided
    from facts, in ``Call.close_charge``.
    """

    # How many times one call may be written to servers: once, and once more after every server
    # it reached dropped it (a restart mid-answer), so that a request that brings its server down
    # does so at most twice.
    MAX_DELIVERIES = 2

    def __init__(self, client: ProxyHandler, watcher: DisconnectWatcher, loop: ConnectionLoop,
                 stored: StoredAnswers, upstreams: UpstreamRegistry) -> None:
        self.client = client
        self.call = client.call
        self.watcher, self.loop, self.stored, self.upstreams = watcher, loop, stored, upstreams
        self.exchange: UpstreamExchange | None = None
        self.ticket: tuple[FairGate, Ticket] | None = None  # the place at a server's gate, while queued
        self.slot: tuple[FairGate, Ticket] | None = None    # ... once granted, until given back
        self.claimed = False  # the answer's id is recorded as the caller's
        self.delivered = 0  # times the request was written to a server (at most MAX_DELIVERIES)

    def claim_answer(self) -> None:
        """Record the answer's id (a stored response) as the caller's, before the caller has it.

        Recorded later, a client that asks for its answer as soon as it arrives
        (to cancel or fetch it) could be refused it as somebody else's.
        """
        meter = self.call.meter
        if not self.claimed and meter is not None and meter.object_id is not None:
            self.claimed = True
            upstream = self.call.upstream
            self.stored.record(meter.object_id, self.call.owner,
                               None if upstream is None else upstream.name)

    def forward(self, target: Target, body: bytes,
                inspect: Callable[[bytes], bytes] | None = None) -> None:
        """Relay one request to a server of its model and its answer back, through that server's gate.

        The servers are tried in turn (``UpstreamRegistry.in_turn``): one that cannot
        be reached, or drops the request or answers 502 or 503 before anything reached
        the client, is marked down and the next one tried at once; the charge stays
        the one charge.  When every server of the model is unreachable the call waits
        for one to come back, up to QUEUE_TIMEOUT_SECONDS, then gets a 503.  A call
        that every server it reached dropped (its only server restarted mid-answer,
        say) waits the same way, for QUEUE_TIMEOUT_SECONDS from the drop, and is sent
        once more: no request is written to servers more than ``MAX_DELIVERIES`` times
        (a stale pooled connection's write counts), so a request that itself brings
        the server down costs it one more restart, not a loop of them.
        ``inspect`` sees a successful, non-streamed answer before the client does.
        The client is watched from the moment it queues: one that leaves while
        waiting is taken out of the queue and its request never sent.
        """
        call, client, upstreams = self.call, self.client, self.upstreams
        route = call.route
        assert route is not None  # (the handler named it)
        headers = copied_headers(client.headers, call.not_forwarded(), PERSONAL_HEADER_PREFIXES)
        if body or client.command in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        client.watch = self.watcher.watch(client.connection, self.client_left, client.watch)
        call.unwatch = client.watch.cancel
        call.on_end(self.let_go)
        call.on_end(self.give_back)
        deadline = time.monotonic() + self.upstreams.config.queue_timeout
        dropped_before = False
        while True:
            replicas = upstreams.in_turn(route, call.affinity)
            if call.made_by is not None:  # continuing a stored answer: its server first
                replicas.sort(key=lambda upstream: upstream.name != call.made_by)
            reached = False
            for position, upstream in enumerate(replicas):
                outcome = self.attempt(upstream, target, headers, body, inspect,
                                       last=position == len(replicas) - 1)
                if outcome is None:
                    return
                reached = reached or outcome
            if call.gone:
                raise ClientGone()
            if reached:  # some server had it and dropped it: it may be written once more
                if self.delivered >= self.MAX_DELIVERIES:
                    break
                if not dropped_before:  # (a drop late in a long answer still gets its wait)
                    deadline = time.monotonic() + self.upstreams.config.queue_timeout
                    dropped_before = True
            if not upstreams.wait_for_change(deadline, replicas[0], call.queued_as):
                break
        raise ProxyError(503 if not reached else 502,
                         "No server of this model could be reached; try again shortly." if not reached
                         else "The model server could not be reached or sent an invalid response.",
                         "upstream_error", "upstream_unavailable")

    def attempt(self, upstream: Upstream, target: Target, headers: list[tuple[str, str]],
                body: bytes, inspect: Callable[[bytes], bytes] | None, last: bool) -> bool | None:
        """Send the call to ``upstream`` and relay its answer: None when it was relayed (or
        failed past the point of trying another server, raising); else whether the server
        had received the request (True) or could not be reached at all (False).
        """
        call, client = self.call, self.client
        call.upstream = upstream
        path = target.upstream_path(upstream.target.base_path, call.dialect.upstream_root)
        exchange = self.exchange = UpstreamExchange(upstream.pool)
        ticket, gate = call.ticket(), upstream.gate
        self.ticket = (gate, ticket)
        if call.gone:
            raise ClientGone()
        gate.acquire(ticket)
        self.slot = (gate, ticket)
        try:
            started = time.monotonic()
            response = exchange.send(client.command, path, headers + upstream.credentials(), body,
                                     retry_stale=self.delivered + 1 < self.MAX_DELIVERIES)
            call.upstream_ms = (time.monotonic() - started) * 1000
        except (OSError, http.client.HTTPException) as error:
            self.delivered += exchange.deliveries  # (what a server answered, even 503, is no drop)
            failure = self.failure(error)
            if not exchange.sent:  # refused, no route, timed out connecting: down until it answers
                self.upstreams.mark_down(upstream, failure)
                self.abandon(exchange)
                return False
            upstream.state.note(failure)
            if isinstance(error, socket.timeout) or self.delivered >= self.MAX_DELIVERIES:
                # It may be at work on it still (no second server gets it too), or it was
                # written as often as a call may be: this call ends here.
                raise failure from None
            upstream.pool.forget_idle()  # (its other connections likely died with it)
            self.abandon(exchange)  # received, then dropped: the next server gets it, or
            return True             # the model's servers, once one answers again
        if response.status in (502, 503) and not last or (
                response.status == 503 and upstream.name != DEFAULT_UPSTREAM):
            # Another server takes the call; or, for a server of MODELS_FILE that is the last to
            # try, a 503 (llama-server's "Loading model" while it restarts) is waited out like a
            # server not listening.  BASE_API_URL's lone server passes its 503 on, as it always
            # did: a paid API's "overloaded" is the caller's to retry.
            self.upstreams.mark_down(upstream, ProxyError(
                response.status, f"The model server answered {response.status}."))
            self.abandon(exchange)
            return response.status == 502  # (a 503: it is not at work on it, and may be waited for)
        self.upstreams.mark_up(upstream)
        # Remembered before the client has its answer and may send the conversation's next call.
        self.upstreams.remember(call.affinity, upstream)
        try:
            exchange.completed = self.relay(response, inspect)
        except (OSError, http.client.HTTPException) as error:
            raise self.failure(error) from None
        return None

    def failure(self, error: BaseException) -> ProxyError:
        """What a transport error with the server makes of the call: ClientGone if its client
        left meanwhile (the error was the hang-up), else the failure, its reason noted."""
        if self.call.gone:
            raise ClientGone() from None
        failure = upstream_failure(error)
        self.call.upstream_error = failure.detail
        return failure

    def abandon(self, exchange: UpstreamExchange) -> None:
        """Give up on a server before anything reached the client: its slot and connection go now."""
        self.give_back()
        self.exchange = None
        exchange.finish()

    def give_back(self) -> None:
        """The gate slot the call holds, if any, goes back (once)."""
        slot, self.slot = self.slot, None
        if slot is not None:
            slot[0].release(slot[1])

    def let_go(self) -> None:
        """The answer is over: stop watching the client, and pool or close the upstream connection."""
        call = self.call
        call.unwatch()
        exchange = self.exchange
        if exchange is not None:
            call.upstream_reached = exchange.sent
            exchange.finish()

    def client_left(self) -> None:
        """Called by the disconnect watcher's thread when the client hangs up mid-request."""
        self.call.gone = True
        queued, exchange = self.ticket, self.exchange
        if queued is not None:
            queued[0].withdraw(queued[1])
        if exchange is not None:
            exchange.abort()
        self.upstreams.wake()

    def relay(self, response: UpstreamResponse,
              inspect: Callable[[bytes], bytes] | None) -> bool:
        """Pass the upstream's answer on; True when it was read to its end.

        Streams, and bodies of unknown length that nothing needs to inspect,
        are relayed as they arrive; everything else is read whole first, so that
        ``inspect`` sees it however the upstream framed it.
        """
        headers = copied_headers(response.headers, RELAYED_EXCLUDED)
        framing = framing_of(response.getheader("Content-Type", ""))
        if framing is not None or (response.length is None and inspect is None
                                   and not response.isclosed()):
            return self.relay_stream(response, headers, framing)
        data = read_whole(response, MAX_UPSTREAM_BODY)
        call = self.call
        if response.status < 400 and inspect is not None:
            data = inspect(data)
            self.claim_answer()
        call.served = call.finished = response.status < 400
        call.close_charge()
        self.client.send_bytes(response.status, headers + self.meter_headers(), data,
                               reason=response.reason)
        return True

    def meter_headers(self) -> list[tuple[str, str]]:
        call = self.call
        charge, downgrade = call.charge, call.downgrade
        headers = rate_limit_headers(charge.admission) if charge is not None else []
        if downgrade is not None:  # another model served it: the caller is told which
            headers.append((MODEL_HEADER, downgrade[1]))
        return headers

    def relay_stream(self, response: UpstreamResponse, headers: list[tuple[str, str]],
                     framing: Framing | None) -> bool:
        """Pass the body on as it arrives; stream events go out whole, one write each from a thread.

        The charge is kept once anything reached the client; a stream that ends
        before its first complete event counts as never served.  Where the
        connection loop can relay it (see ``ConnectionLoop.can_relay``), this
        thread relays what has arrived and hands the stream to the loop the
        first time the upstream would make it wait (a stream that never waits
        costs nothing more), then returns; the handler, seeing ``relayed`` set,
        leaves the call to the loop.
        """
        call = self.call
        ok = response.status < 400
        call.stream = framing is not None
        if not ok:
            call.close_charge()
        client = self.client
        client.start_chunked(response.status, headers + self.meter_headers(), response.reason)
        meter = call.meter if framing is not None and ok else None
        pump = EventPump(response, framing, meter, call.dialect.usage_marker)
        loop = self.loop
        response.reader.nowait = loop.can_relay(client, self.exchange, response)  # type: ignore[arg-type]
        try:
            while True:
                try:
                    data = pump.next()
                except NeedMore:  # the upstream makes us wait: the loop waits instead of this thread
                    client.relayed = RelayedStream(loop, self, pump)
                    return False  # for now: the loop ends the stream, and the call (Call.end)
                if data is None:
                    break
                if ok:
                    self.claim_answer()
                client.write_chunk(data)
                call.served = call.served or ok
        except (OSError, http.client.HTTPException) as error:
            if call.gone:
                raise ClientGone() from None
            return self.end_stream(pump, error)
        return self.end_stream(pump, None)

    def end_stream(self, pump: EventPump, error: BaseException | None) -> bool:
        """Settle the charge and end the body; True if the whole stream was relayed.

        A stream the upstream broke off ends with an error event in the
        client's dialect, or, not being events, without the final chunk, so the
        client sees the body as cut short.
        """
        call, client, framing = self.call, self.client, pump.framing
        pump.response.reader.nowait = False  # the connection may go back to the pool
        if error is not None:
            call.upstream_error = failure_reason(error)  # (its log line says why, as a failed call's does)
            log.warning("upstream stream to %s broke off: %s", loggable(call.label), call.upstream_error)
            if framing is not None:
                client.write_chunk(call.dialect.stream_error(upstream_failure(error), framing))
            else:
                client.close_connection = True
        completed = error is None
        call.finished = completed and pump.response.status < 400
        call.close_charge()
        if completed or framing is not None:
            client.end_chunked()
        return completed


class EventPump:
    """One stream on its way: the upstream's body in, whole events (metered) out.

    Events go out whole so that a usage count is never split, and an event
    that carries only what the client did not ask for (``stream_options``
    usage) is dropped.  The same pump serves a handler's thread, whose reads
    wait, and the connection loop, whose reads raise ``NeedMore``.
    """

    __slots__ = ("response", "framing", "meter", "marker", "counts_text", "pending")

    def __init__(self, response: UpstreamResponse, framing: Framing | None,
                 meter: Meter | None, marker: bytes) -> None:
        self.response, self.framing, self.meter, self.marker = response, framing, meter, marker
        self.counts_text = meter is not None and meter.counts_text  # else only events with the
        self.pending = b""                                          # marker are read (Meter.filter)

    def next(self) -> bytes | None:
        """The next bytes for the client; None at the end of the body."""
        response, framing, meter = self.response, self.framing, self.meter
        while True:
            data = response.read1(65536)
            whole_events = framing is not None
            if not data:
                data, self.pending = self.pending, b""  # a last event without its end
                if not data:
                    return None
            elif framing is not None and len(self.pending) + len(data) <= MAX_EVENT_BYTES:
                pending = self.pending + data
                end = framing.end(pending)
                if not end:
                    self.pending = pending
                    continue
                data, self.pending = pending[:end], pending[end:]
            else:  # not events, or one too large to hold: pass on what there is
                data, self.pending, whole_events = self.pending + data, b"", False
            if meter is not None and whole_events and (self.counts_text or self.marker in data):
                data = meter.filter(data, framing)  # type: ignore[arg-type]
                if not data:
                    continue
            return data


# --------------------------------------------------------------------------
# Connection loop: connections nobody is working on, and streams being relayed
# --------------------------------------------------------------------------

class Workers:
    """Threads that outlive their connection's work, so the next connection's needs no new thread.

    Starting a thread costs more than handling a small request; with streams
    relayed by the loop, a kept-alive connection needs a thread again for each
    request after a stream.  Up to ``max_idle`` threads wait ``idle_seconds``
    for such work, then end (an idle thread still holds its stack).
    """

    def __init__(self, max_idle: int = 32, idle_seconds: float = 10.0) -> None:
        self.max_idle, self.idle_seconds = max_idle, idle_seconds
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0
        self._busy = 0  # work submitted and not yet done
        self._lock = threading.Lock()
        self._all_done = threading.Condition(self._lock)
        self._stopped = False

    def submit(self, work: Callable[..., None], *args: object) -> None:
        with self._lock:
            self._busy += 1
            if self._idle:
                self._idle -= 1  # that worker is counted out here, under the lock it checks too
                self._jobs.put((work, args))
                return
        try:
            threading.Thread(target=self._work, args=(work, args), daemon=True).start()
        except RuntimeError:  # no thread to be had (a task limit): the work was never started
            with self._lock:
                self._busy -= 1
                if not self._busy:
                    self._all_done.notify_all()
            raise

    def _work(self, work: Callable[..., None], args: tuple) -> None:
        while True:
            try:
                work(*args)
            finally:
                with self._lock:
                    self._busy -= 1
                    if not self._busy:
                        self._all_done.notify_all()
            with self._lock:
                if self._stopped or self._idle >= self.max_idle:
                    return
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._idle -= 1
                        return
                job = self._jobs.get_nowait()  # given to this worker as it timed out
            if job is None:
                return
            work, args = job

    def close(self) -> None:
        """Idle workers end now; busy ones when their work does."""
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)

    def wait(self, timeout: float) -> bool:
        """Wait until no work is left, at most ``timeout`` seconds; True if none is."""
        with self._all_done:
            return self._all_done.wait_for(lambda: not self._busy, timeout)


class ConnectionLoop:
    """One thread for every connection that only waits: idle ones, and relayed streams.

    A thread per connection is the simplest fast way to handle a request, but
    a thread that only waits still costs its stack, its frames and buffers, and
    idle keep-alive connections and streams waiting on a slow model are many
    and long.  So a connection gets a thread only while it has
    something to read: a new connection, and one whose stream ended, wait here
    until their next request arrives (or CLIENT_TIMEOUT passes); and a stream
    is relayed from here once its head went out, event by event, with the same
    ``EventPump`` a thread uses.  A thread that has just answered keeps its
    connection for the next request: handing it over after every answer would
    cost the hot path a wake-up and a new thread per request.

    Other threads hand work in through ``park`` and ``relay`` (a queue and a
    wake-up byte), so only this thread touches the selector and its maps.
    """

    HIGH_WATER = 64 * 1024  # bytes waiting for a slow client before the upstream is read no more

    def __init__(self, config: Config, serve: Callable[[socket.socket, tuple, ProxyHandler | None], None],
                 close: Callable[[socket.socket], None]) -> None:
        self.serve, self.close_connection = serve, close  # a thread for a connection; its end
        self.idle_timeout = config.client_timeout
        self.read_timeout, self.write_timeout = config.read_timeout, config.client_timeout
        # Stream deadlines are checked in a sweep, often enough for the shortest timeout.
        self.sweep_every = max(0.01, min(1.0, self.read_timeout / 4, self.write_timeout / 4))
        self.selector = selectors.DefaultSelector()
        self._inbox: deque = deque()
        self._wake_reader, self._wake_writer = socket.socketpair()
        for end in (self._wake_reader, self._wake_writer):
            end.setblocking(False)
        self.selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._parked: dict[socket.socket, tuple] = {}  # (address, handler, deadline), in deadline order
        self._watched: dict[int, int] = {}  # a stream's sockets: descriptor -> events
        self.streams: set[RelayedStream] = set()
        self._stopped = False
        self._post_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="connection-loop", daemon=True)
        self._thread.start()

    # -- from other threads ----------------------------------------------------

    def park(self, connection: socket.socket, address: tuple) -> None:
        """Keep ``connection`` without a thread until its next request arrives."""
        self._post(lambda: self._park(connection, address, None),
                   lambda: self._end(connection, None))

    def relay(self, stream: RelayedStream) -> None:
        """Relay ``stream`` from here on; its handler's thread has unwound."""
        self._post(stream.start, stream.client_gone)

    @staticmethod
    def can_relay(client: ProxyHandler, exchange: UpstreamExchange,
                  response: UpstreamResponse) -> bool:
        """Streams between sockets the loop can use without waiting: plain TCP with kernel timeouts.

        (An https upstream's reads can need writes, and a Python timeout polls
        before each call: those streams stay with their thread.)
        """
        return (not response.done and type(exchange.conn.sock) is TimedSocket  # type: ignore[union-attr]
                and type(client.connection) is TimedSocket)

    def _post(self, action: Callable[[], None], if_stopped: Callable[[], None]) -> None:
        """``action`` on the loop's thread; ``if_stopped`` here instead once the server is closing.

        The lock makes the two exclusive: what ``close`` did not find in the inbox
        is run here.
        """
        with self._post_lock:
            posted = not self._stopped
            if posted:
                self._inbox.append(action)
        if not posted:  # nothing waits any more
            if_stopped()
            return
        with suppress(OSError):  # a full wake-up pipe already wakes the loop
            self._wake_writer.send(b"\0")

    # -- the loop --------------------------------------------------------------

    def _run(self) -> None:
        next_sweep = time.monotonic() + self.sweep_every
        while not self._stopped:
            next_sweep = self._turn(next_sweep)

    def _turn(self, next_sweep: float) -> float:
        """One wait and what it found; the next sweep's time.

        A function of its own so that its locals end with it: the last event's key
        would otherwise keep its (finished) stream alive while the loop sleeps.
        """
        timeout = None  # nothing to time: sleep until something happens
        if self.streams:
            timeout = max(0.0, next_sweep - time.monotonic())
        if self._parked:
            deadline = next(iter(self._parked.values()))[2]
            timeout = max(0.0, min(deadline - time.monotonic(), timeout or math.inf))
        for key, mask in self.selector.select(timeout):
            if key.data is None:
                self._take_inbox()
            else:
                self._dispatch(key.data, mask)
        now = time.monotonic()
        self._expire_parked(now)
        if now >= next_sweep:
            for stream in list(self.streams):
                stream.check_deadlines(now)
            next_sweep = now + self.sweep_every
        return next_sweep

    def _dispatch(self, handler: Callable[[int], None], mask: int) -> None:
        try:
            handler(mask)
        except Exception:  # this thread serves every waiting connection: it must not die
            log.exception("connection loop")

    def _take_inbox(self) -> None:
        with suppress(OSError):
            while self._wake_reader.recv(4096):
                pass
        while self._inbox:
            action = self._inbox.popleft()
            self._dispatch(lambda _: action(), 0)

    def _park(self, connection: socket.socket, address: tuple,
              handler: ProxyHandler | None) -> None:
        """Wait for ``connection``'s next request; ``handler`` is its own, after a relayed stream."""
        if self._stopped:
            self._end(connection, handler)
            return
        self._parked[connection] = (address, handler, time.monotonic() + self.idle_timeout)
        self.selector.register(connection, selectors.EVENT_READ,
                               lambda mask: self._wake(connection))

    def _wake(self, connection: socket.socket) -> None:
        """The parked connection has something to read (a request, or its end): a thread takes it."""
        self.selector.unregister(connection)
        address, handler, _ = self._parked.pop(connection)
        self._next_step(connection, handler, self.serve, connection, address, handler)

    def _next_step(self, connection: socket.socket, handler: ProxyHandler | None,
                   step: Callable[..., None], *args: object) -> None:
        """Give ``connection`` its next step; if that fails, close it rather than lose it.

        (A connection neither parked, served nor closed would hold its slot, and its
        client would wait, for ever.)
        """
        try:
            step(*args)
        except Exception:
            log.exception("connection loop: closing a connection whose next step failed")
            self._end(connection, handler)

    def _end(self, connection: socket.socket, handler: ProxyHandler | None) -> None:
        if handler is not None:
            handler.finish()
        self.close_connection(connection)

    def stream_ended(self, stream: RelayedStream) -> None:
        """A relayed stream is over: its call ends, then its connection takes its next step.

        It closes, or goes back to a thread if its next request came during the
        stream, or waits here for that request (the handler waits with it: its
        watch stays registered, nothing is set up again).
        """
        if stream.closed:
            return
        stream.closed = True  # (a stream the loop never started, handed in as it closed, too)
        self.streams.discard(stream)
        for sock in (stream.upstream, stream.client):
            self.watch(sock, 0, stream.on_upstream)
        handler, connection = stream.handler, stream.client
        handler.relayed = handler.held = None  # its writes go to the socket again
        self._next_step(connection, handler, self._after_stream, connection, handler)

    def _after_stream(self, connection: socket.socket, handler: ProxyHandler) -> None:
        handler.finish_call()
        if handler.close_connection:
            self._end(connection, handler)
        elif handler.rfile.buffer:
            self.serve(connection, handler.client_address, handler)
        else:
            handler.forget_request()
            self._park(connection, handler.client_address, handler)

    def _expire_parked(self, now: float) -> None:
        while self._parked:
            connection, (address, handler, deadline) = next(iter(self._parked.items()))
            if deadline > now:
                return
            del self._parked[connection]
            self.selector.unregister(connection)
            log.info("%s idle connection closed after %g s", address[0], self.idle_timeout)
            self._end(connection, handler)

    def watch(self, sock: socket.socket, events: int, handler: Callable[[int], None]) -> None:
        """(Re)register ``sock`` for ``events``; 0 stops watching it.

        What is registered is kept here: asking the selector about a socket it
        does not have costs a KeyError whose message formats the socket.
        """
        watched, fd = self._watched, sock.fileno()
        now = watched.get(fd, 0)
        if events == now or self._stopped and self._thread is not threading.current_thread():
            return
        if not events:
            del watched[fd]
            self.selector.unregister(sock)
            return
        watched[fd] = events
        if now:
            self.selector.modify(sock, events, handler)
        else:
            self.selector.register(sock, events, handler)

    def close(self) -> None:
        """Stop; parked connections close, relayed streams end as if their clients had left."""
        with self._post_lock:
            self._stopped = True
        with suppress(OSError):
            self._wake_writer.send(b"\0")
        self._thread.join()
        self._take_inbox()  # parks and streams handed in meanwhile: closed and ended below
        for stream in list(self.streams):
            stream.client_gone()
        for connection, (_, handler, _) in list(self._parked.items()):
            self.selector.unregister(connection)
            self._end(connection, handler)
        self._parked.clear()
        self.selector.close()
        self._wake_reader.close()
        self._wake_writer.close()


class RelayedStream:
    """A stream the connection loop relays: upstream reads as they come, client writes buffered.

    Reads of the upstream stop while more than ``HIGH_WATER`` bytes wait for
    the client, which is the backpressure a thread's blocking write gave.  The
    deadlines are the thread's socket timeouts: READ_TIMEOUT since the
    upstream last sent something, CLIENT_TIMEOUT for pending bytes to drain.
    The handler's writes are held in its ``held`` buffer meanwhile, which this
    sends as the client takes it.  When the stream ends, the loop ends the call
    and decides the connection's next step (``ConnectionLoop.stream_ended``).
    """

    __slots__ = ("loop", "relay", "pump", "handler", "call", "upstream", "client", "out",
                 "ended", "closed", "held_back", "upstream_deadline", "client_deadline",
                 "__weakref__")

    def __init__(self, loop: ConnectionLoop, relay: Relay, pump: EventPump) -> None:
        self.loop, self.relay, self.pump = loop, relay, pump
        self.handler, self.call = relay.client, relay.call
        self.upstream = relay.exchange.conn.sock  # type: ignore[union-attr]
        self.client = self.handler.connection
        self.out = self.handler.held = bytearray()  # the handler's writes, sent from here
        self.ended = False   # the upstream's part is over
        self.closed = False  # ... and the call, and the connection's turn (stream_ended)
        self.held_back = False  # the pump stopped at HIGH_WATER: it may hold more without a read
        self.upstream_deadline = 0.0
        self.client_deadline: float | None = None

    def start(self) -> None:
        self.loop.streams.add(self)
        self.upstream_deadline = time.monotonic() + self.loop.read_timeout
        self.pump_events()  # what arrived since the handler's thread stopped reading

    # -- upstream --------------------------------------------------------------

    def on_upstream(self, mask: int) -> None:
        self.upstream_deadline = time.monotonic() + self.loop.read_timeout
        self.pump_events()  # (its reader does not wait: NeedMore when all that came is relayed)

    def pump_events(self) -> None:
        call, ok = self.call, self.pump.response.status < 400
        self.held_back = False
        try:
            while True:
                if len(self.out) >= self.loop.HIGH_WATER:
                    self.held_back = True
                    break
                data = self.pump.next()
                if data is None:
                    self.finish(None)
                    return
                if ok:
                    self.relay.claim_answer()
                self.handler.write_chunk(data)
                call.served = call.served or ok
        except NeedMore:
            pass
        except (OSError, http.client.HTTPException) as error:
            self.finish(error)
            return
        self.flush()

    def finish(self, error: BaseException | None) -> None:
        """The upstream's part is over: end the body (an error event if it broke off), then drain."""
        if self.ended:
            return
        self.ended = True
        self.loop.watch(self.upstream, 0, self.on_upstream)
        if error is not None and self.call.gone:
            self.client_gone()
            return
        self.relay.exchange.completed = self.relay.end_stream(self.pump, error)  # type: ignore[union-attr]
        self.flush()

    # -- client ----------------------------------------------------------------

    def on_client(self, mask: int) -> None:
        self.flush()

    def flush(self) -> None:
        out = self.out
        while out:
            try:
                sent = _send(self.client, out, _DONT_WAIT)
            except BlockingIOError:
                if self.client_deadline is None:
                    self.client_deadline = time.monotonic() + self.loop.write_timeout
                self.loop.watch(self.client, selectors.EVENT_WRITE, self.on_client)
                self.loop.watch(self.upstream, 0, self.on_upstream)  # backpressure
                return
            except OSError:
                self.client_gone()
                return
            del out[:sent]
        self.client_deadline = None
        self.loop.watch(self.client, 0, self.on_client)
        if self.ended:
            self.close()
        else:
            self.loop.watch(self.upstream, selectors.EVENT_READ, self.on_upstream)
            if self.held_back:  # what was read already (even the body's end) goes out first
                self.pump_events()

    def client_gone(self) -> None:
        """The client left or stopped reading: as a thread's failed write (``ClientGone``)."""
        self.call.gone = True
        self.handler.close_connection = True
        self.out.clear()
        self.ended = True
        self.close()

    def check_deadlines(self, now: float) -> None:
        if self.client_deadline is not None and now > self.client_deadline:
            self.client_gone()
        elif not self.ended and self.client_deadline is None and now > self.upstream_deadline:
            self.finish(socket.timeout("timed out"))

    def close(self) -> None:
        self.loop.stream_ended(self)


def read_whole(response: UpstreamResponse, limit: int) -> bytes:
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
    """Map a transport failure to 502 or 504 without revealing socket or host details;
    why (``failure_reason``) goes in its ``detail``, for the owner alone."""
    if isinstance(error, socket.timeout):
        return ProxyError(504, "The model server did not answer in time.", "upstream_error",
                          "upstream_timeout", detail=failure_reason(error))
    return ProxyError(502, "The model server could not be reached or sent an invalid response.",
                      "upstream_error", "upstream_unavailable", detail=failure_reason(error))


# Transport failures, most specific first: the owner reads these words, the caller never does.
FAILURE_REASONS: tuple[tuple[type, str], ...] = (
    (http.client.RemoteDisconnected, "closed the connection without answering"),
    (socket.timeout, "timed out"),
    (TimeoutError, "timed out"),
    (socket.gaierror, "name does not resolve"),
    (ConnectionRefusedError, "connection refused"),
    (ConnectionResetError, "connection reset"),
    (http.client.HTTPException, "invalid HTTP answer"),
)


def failure_reason(error: BaseException) -> str:
    """Why the upstream could not be reached, in a few words: from the exception's type,
    OpenSSL's verify message and reason code, or the errno's name, and never from its text,
    which may carry a host, a path or a URL."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message or error.reason}"
    if isinstance(error, TlsHandshakeFailed):
        return f"TLS handshake failed: {error.args[0]}"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or type(error).__name__}"
    for kind, reason in FAILURE_REASONS:
        if isinstance(error, kind):
            return reason
    if isinstance(error, OSError) and error.errno in errno.errorcode:
        return os.strerror(error.errno).lower()
    return type(error).__name__


# --------------------------------------------------------------------------
# The owner's view: usage history, metrics, the admin API
# --------------------------------------------------------------------------

USAGE_FIELDS = ("requests", "served", "limited", "rejected", "error", "prompt_tokens",
                "completion_tokens", "tokens_charged", "cached_tokens", "reasoning_tokens", "cost")
OUTCOME_COLUMNS = {outcome: USAGE_FIELDS.index(outcome)
                   for outcome in ("served", "limited", "rejected", "error")}
# What a request used, in this order: the amounts ``Ledger.add`` adds to their columns.
AMOUNT_FIELDS = ("prompt_tokens", "completion_tokens", "tokens_charged", "cached_tokens",
                 "reasoning_tokens", "cost")
PROMPT, COMPLETION, CHARGED, CACHED, REASONING, COST = (USAGE_FIELDS.index(name) for name in AMOUNT_FIELDS)
SERVED = USAGE_FIELDS.index("served")
NO_AMOUNTS = (0, 0, 0, 0, 0, 0.0)
OTHER = "_other"  # where identities without a name, or beyond the cap, are counted together
MAX_IDENTITIES = 2_000  # callers the usage history and /metrics each tell apart; the rest are OTHER
# Models one caller's history (and its cost in /metrics) tells apart; its others are OTHER.
# A client names its model, so without a bound one key could fill the memory with names.
MAX_MODELS_PER_CALLER = 8
COST_DECIMALS = 9  # sums of prices are floats: shown rounded, so 0.1 + 0.2 reads 0.3


def _zeros() -> list:
    return [0] * (len(USAGE_FIELDS) - 1) + [0.0]


def _added(sums: list, counts: list) -> None:
    for column, count in enumerate(counts):
        sums[column] += count


def _usage_fields(counts: list) -> dict:
    shown = dict(zip(USAGE_FIELDS, counts))
    shown["cost"] = round(shown["cost"], COST_DECIMALS)
    return shown


def _restored_counts(values: object) -> list:
    """Counts from STATE_FILE: whole numbers and a finite cost; an older file's shorter list
    is padded (its requests had no cost, cached or reasoning tokens counted)."""
    if not isinstance(values, list):
        raise TypeError("counts are not a list")
    counts = _zeros()
    for column, value in enumerate(values[:len(USAGE_FIELDS)]):
        counts[column] = float(value) if column == COST else int(value)
    if not math.isfinite(counts[COST]):
        raise ValueError("a cost is not a number")
    return counts


class Ledger:
    """One caller's history: counts per local day (the last ``keep_days``) and model, and in all.

    ``days`` maps a day to its counts by model, and ``models`` a model to its counts of
    all time (``total``: their sum). A model is named once the upstream served it to this caller or
    the caller was limited asking for it (a name that went through the key's model
    checks); refusals for names never seen count under OTHER, so that requests for
    made-up models cannot take the caller's ``MAX_MODELS_PER_CALLER`` places.
    """

    __slots__ = ("key", "user", "days", "models", "last_seen")

    def __init__(self, key: str, user: str | None) -> None:
        self.key = key
        self.user = user
        self.days: dict[str, dict[str, list]] = {}
        self.models: dict[str, list] = {}
        self.last_seen: float | None = None

    def model_label(self, model: str, names_model: bool) -> str:
        """The name ``model``'s requests are counted under in this ledger."""
        if model in self.models:
            return model
        named = len(self.models) - (OTHER in self.models)
        return model if names_model and named < MAX_MODELS_PER_CALLER else OTHER

    def add(self, day: str, model: str, outcome: int, amounts: tuple, keep_days: int) -> None:
        """Count one request: ``outcome`` is its column in USAGE_FIELDS, ``amounts`` as AMOUNT_FIELDS.

        ``model`` is already its label (``model_label``).
        """
        today = self.days.get(day)
        if today is None:
            today = self.days[day] = {}
            if len(self.days) > keep_days:  # dates sort as text: drop the oldest
                for old in sorted(self.days)[:len(self.days) - keep_days]:
                    del self.days[old]
        counts = today.get(model)
        if counts is None:
            counts = today[model] = _zeros()
        in_all = self.models.get(model)
        if in_all is None:
            in_all = self.models[model] = _zeros()
        for row in (counts, in_all):  # in place and unrolled: this runs on every request
            row[0] += 1  # requests
            row[outcome] += 1
        if amounts != NO_AMOUNTS:
            prompt, completion, charged, cached, reasoning, cost = amounts
            for row in (counts, in_all):
                row[PROMPT] += prompt
                row[COMPLETION] += completion
                row[CHARGED] += charged
                row[CACHED] += cached
                row[REASONING] += reasoning
                row[COST] += cost

    @property
    def total(self) -> list:
        """Counts of all time, over every model."""
        total = _zeros()
        for counts in list(self.models.values()):
            _added(total, counts)
        return total

    def summary(self, today: str, days: Sequence[str]) -> dict:
        """Usage today, over the last 7 and 30 days and in all, each with ``by_model``; and the
        daily series, with its cost by model."""

        def over(span: Sequence[str]) -> dict:
            by_model: dict[str, list] = {}
            for day in span:  # (list(): a request may add a model meanwhile)
                for model, counts in list(self.days.get(day, {}).items()):
                    _added(by_model.setdefault(model, _zeros()), counts)
            return _usage_of(by_model)
        usage = {"today": over([today]), "last_7_days": over(days[-7:]), "last_30_days": over(days),
                 "all_time": dict(_usage_fields(self.total), by_model={
                     model: _usage_fields(counts) for model, counts in sorted(self.models.items())})}
        return {"usage": usage, "daily": [self.daily(day) for day in days],
                "last_seen": _iso_time(self.last_seen) if self.last_seen else None}

    def daily(self, day: str) -> dict:
        by_model = {model: {"served": counts[SERVED], "tokens_charged": counts[CHARGED],
                            "cost": round(counts[COST], COST_DECIMALS)}
                    for model, counts in sorted(list(self.days.get(day, {}).items()))}
        entry = {"date": day, "served": sum(m["served"] for m in by_model.values()),
                 "tokens_charged": sum(m["tokens_charged"] for m in by_model.values()),
                 "cost": round(sum(m["cost"] for m in by_model.values()), COST_DECIMALS)}
        entry["by_model"] = by_model
        return entry

    def dump(self) -> dict:
        return {"key": self.key, "user": self.user, "days": self.days, "total": self.total,
                "models": self.models, "last_seen": self.last_seen}

    @classmethod
    def restored(cls, entry: dict) -> Ledger:
        """A ledger from STATE_FILE; one saved before models were told apart has its days'
        counts under OTHER."""
        ledger = cls(str(entry["key"]), entry.get("user"))
        for day, counts in entry["days"].items():
            by_model = counts if isinstance(counts, dict) else {OTHER: counts}
            ledger.days[str(day)] = {str(model): _restored_counts(c) for model, c in by_model.items()}
        total = _restored_counts(entry["total"])  # (the sum of ``models``, or an older file's all)
        models = entry.get("models")
        if models is None:  # an older file: all of it under OTHER
            models = {OTHER: total}
        ledger.models = {str(model): _restored_counts(c) for model, c in models.items()}
        seen = entry.get("last_seen")
        ledger.last_seen = float(seen) if seen is not None else None
        return ledger


def _usage_of(by_model: dict[str, list]) -> dict:
    """Counts by model as the report shows them: their sums, and ``by_model``."""
    sums = _zeros()
    for counts in by_model.values():
        _added(sums, counts)
    return dict(_usage_fields(sums), by_model={model: _usage_fields(counts)
                                               for model, counts in sorted(by_model.items())})


class UsageBook:
    """Who used what, per identity: kept in STATE_FILE, bounded in memory.

    Identities are the buckets' (a key's digest, or a user's under an app key);
    past ``max_identities`` new keys are counted together under ``_other``, and new
    users under an app key together under that app's ``_other`` user (so that an
    app's own calls stay its ledger's counts less its users').
    """

    def __init__(self, keep_days: int = 90, max_identities: int = MAX_IDENTITIES) -> None:
        self.keep_days = keep_days
        self.max_identities = max_identities
        self._ledgers: dict[str, Ledger] = {}
        self._lock = threading.Lock()

    def record(self, identity: str, key: str, user: str | None, day: str, now: float,
               outcome: int, amounts: tuple, model: str = "", names_model: bool = True) -> str:
        """Count one request; returns the label its model was counted under.

        An app key's users are recorded with the label the app's ledger gave (record the
        app first), so that a user's models are always among the app's.
        """
        with self._lock:
            ledger = self._ledgers.get(identity)
            if ledger is None:
                if len(self._ledgers) >= self.max_identities:
                    app, _, _ = identity.partition("/user:")
                    identity, user = (f"{app}/user:{OTHER}", OTHER) if user is not None else (OTHER, None)
                    key = key if user is not None else OTHER
                    ledger = self._ledgers.get(identity)
                if ledger is None:
                    ledger = self._ledgers[identity] = Ledger(key, user)
            ledger.key = key  # a key renamed in the file is shown renamed; a user as first sent
            label = ledger.model_label(model, names_model)
            ledger.add(day, label, outcome, amounts, self.keep_days)
            ledger.last_seen = now
            return label

    def get(self, identity: str) -> Ledger | None:
        return self._ledgers.get(identity)

    def items(self) -> list[tuple[str, Ledger]]:
        with self._lock:
            return list(self._ledgers.items())

    def dump(self) -> dict:
        with self._lock:
            return {identity: ledger.dump() for identity, ledger in self._ledgers.items()}

    def load(self, saved: dict) -> None:
        restored = {str(identity): Ledger.restored(entry) for identity, entry in saved.items()}
        with self._lock:
            self._ledgers.update(restored)

    def rows(self, first: str, last: str, names: dict[str, str]) -> list[tuple]:
        """(day, key, user or "", model, counts) for each day from ``first`` to ``last`` (YYYY-MM-DD,
        inclusive), sorted; ``names`` are the keys' names now, by identity.

        An app key's ledger counts its users' requests too: its own row keeps what is left
        when theirs are taken out (its calls made without a user), so that no request is
        in two rows.
        """
        by_caller: dict[tuple[str, str | None], dict[tuple[str, str], list]] = {}
        users: dict[str, list[Ledger]] = {}
        ledgers = self.items()
        for identity, ledger in ledgers:
            app, _, _ = identity.partition("/user:")
            if app != identity:
                users.setdefault(app, []).append(ledger)
        for identity, ledger in ledgers:
            app, _, _ = identity.partition("/user:")
            key = names.get(app) or ledger.key
            counts = by_caller.setdefault((key, ledger.user if app != identity else None), {})
            its_users = users.get(identity, ()) if app == identity else ()
            for day, by_model in list(ledger.days.items()):  # (list(): requests go on meanwhile)
                if first <= day <= last:
                    for model, row in list(by_model.items()):
                        cell = counts.get((day, model))
                        if cell is None:
                            counts[(day, model)] = cell = row[:]
                        else:  # (two keys of one name)
                            _added(cell, row)
                        for user in its_users:
                            _subtract(cell, user.days.get(day, {}).get(model))
        rows = [(day, key, user or "", model, row) for (key, user), counts in by_caller.items()
                for (day, model), row in counts.items() if row[0] > 0]
        rows.sort(key=operator.itemgetter(0, 1, 2, 3))
        return rows


def _subtract(sums: list, counts: list | None) -> None:
    if counts is not None:
        for column, count in enumerate(counts):
            sums[column] -= count


def _iso_time(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


_day_cache: tuple[float, float, str, int] = (0.0, 0.0, "", 0)


def local_day(wall: float) -> str:
    """The calendar day in the proxy's local time zone (TZ), as YYYY-MM-DD.

    Asked on every request, so the day's bounds are remembered until it ends
    (or until TZ changes).
    """
    global _day_cache
    start, end, text, zone = _day_cache
    if start <= wall < end and zone == time.timezone:
        return text
    text = time.strftime("%Y-%m-%d", time.localtime(wall))
    start, end = period_bounds(wall, "day")
    _day_cache = (start, end, text, time.timezone)
    return text


_stamp_cache: tuple[int, str] = (-1, "")


def console_stamp(wall: float) -> str:
    """``YYYY-MM-DD HH:MM:SS,mmm`` in local time, as the logging module writes it."""
    global _stamp_cache
    second, text = _stamp_cache
    if int(wall) != second:
        second, text = int(wall), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))
        _stamp_cache = (second, text)
    return "%s,%03d" % (text, wall % 1 * 1000)  # (%-formatting truncates, as int() did)


def last_days(wall: float, count: int) -> list[str]:
    """The last ``count`` local days up to today's, oldest first."""
    noon = time.mktime(time.localtime(wall)[:3] + (12, 0, 0, 0, 0, -1))
    return [local_day(noon - 86400 * back) for back in range(count - 1, -1, -1)]


class Histogram:
    """A Prometheus histogram: cumulative counts per upper bound, a sum and a count."""

    BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, value)] += 1
        self.sum += value


class Metrics:
    """Counters for Prometheus, labelled by key name (never a key), user and endpoint.

    The cap is on callers, as in the usage history, not on series: every caller
    has a few series (endpoints and outcomes), and a cap on series let one app key
    with thousands of users fill a scrape with them.  Callers past it are ``_other``.
    """

    def __init__(self, max_identities: int = MAX_IDENTITIES) -> None:
        self.max_identities = max_identities
        self._callers: dict[tuple[str, str | None], tuple[str, str | None]] = {}  # see _counted_as
        # series by key, user, endpoint, outcome and upstream (None: answered by the proxy itself)
        self.requests: dict[tuple[str, str | None, str, str, str | None], int] = {}
        self.tokens: dict[tuple[str, str | None], list[int]] = {}  # prompt, completion, charged
        self.cost: dict[str, dict[str, float]] = {}  # key -> model -> cost, in the currency
        self.duration: dict[str | None, Histogram] = {}    # by upstream, as requests are
        self.first_byte: dict[str | None, Histogram] = {}
        self._lock = threading.Lock()

    def snapshot(self) -> tuple[list, list, dict, dict]:
        """Copies for one scrape, sorted: request series, token series and the two histograms."""
        with self._lock:
            requests = sorted(self.requests.items(), key=str)
            tokens = sorted((((k, u, kind), counts[index]) for (k, u), counts in self.tokens.items()
                             for index, kind in enumerate(("prompt", "completion", "charged"))
                             if counts[index]), key=str)
            return requests, tokens, copy.deepcopy(self.duration), copy.deepcopy(self.first_byte)

    def cost_series(self) -> list[tuple[tuple[str, str], float]]:
        """((key, model), cost) for one scrape, sorted."""
        with self._lock:
            return sorted(((key, model), cost) for key, models in self.cost.items()
                          for model, cost in models.items())

    def record(self, key: str, user: str | None, endpoint: str, outcome: str, prompt: int,
               completion: int, charged: int, duration: float, first_byte: float | None,
               model: str = "", cost: float = 0.0, upstream: str | None = None) -> None:
        with self._lock:
            key, user = self._counted_as(key, user)
            if cost:  # by key, not user: an app's thousands of users are not multiplied by models
                self.add_cost(key, model, cost)
            series = (key, user, endpoint, outcome, upstream)
            self.requests[series] = self.requests.get(series, 0) + 1
            if prompt or completion or charged:
                tokens = self.tokens.get((key, user))
                if tokens is None:
                    tokens = self.tokens[(key, user)] = [0, 0, 0]
                tokens[0] += prompt
                tokens[1] += completion
                tokens[2] += charged
            self._histogram(self.duration, upstream).observe(duration)
            if first_byte is not None:
                self._histogram(self.first_byte, upstream).observe(first_byte)

    @staticmethod
    def _histogram(family: dict[str | None, Histogram], upstream: str | None) -> Histogram:
        """An upstream's histogram of ``family``, made at its first request (not one per request)."""
        histogram = family.get(upstream)
        if histogram is None:
            histogram = family[upstream] = Histogram()
        return histogram

    def add_cost(self, key: str, model: str, cost: float) -> None:
        models = self.cost.setdefault(key, {})
        if model not in models and len(models) >= MAX_MODELS_PER_CALLER:
            model = OTHER
        models[model] = models.get(model, 0.0) + cost

    def _counted_as(self, key: str, user: str | None) -> tuple[str, str | None]:
        """The labels a caller's requests are counted under: its own, or OTHER's past the cap.

        A user's are as first sent, whatever the case of later requests: one person, one series.
        """
        identity = (key, None if user is None else user_key(user))
        labels = self._callers.get(identity)
        if labels is None:
            if len(self._callers) >= self.max_identities:
                return OTHER, None
            labels = self._callers[identity] = (key, user)
        return labels


def _label_value(value: str) -> str:
    """A label value escaped as the text exposition format requires: backslash, quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Sequence[tuple[str, str | None]]) -> str:
    shown = [f'{name}="{_label_value(value)}"' for name, value in pairs if value is not None]
    return "{" + ",".join(shown) + "}" if shown else ""


def _family(name: str, kind: str, help_text: str, samples: Iterator[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)
    return lines


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _histogram(name: str, help_text: str, histograms: dict[str | None, Histogram]) -> list[str]:
    """One family, a histogram per upstream (an ``upstream`` label; none for the proxy's own answers)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for upstream in sorted(histograms, key=lambda name: name or ""):
        histogram, cumulative = histograms[upstream], 0
        label = "" if upstream is None else f'upstream="{_label_value(upstream)}",'
        for bound, count in zip(Histogram.BOUNDS + (math.inf,), histogram.counts):
            cumulative += count
            shown = "+Inf" if bound == math.inf else repr(bound)
            lines.append(f'{name}_bucket{{{label}le="{shown}"}} {cumulative}')
        labels = _labels((("upstream", upstream),))
        lines.append(f"{name}_sum{labels} {_number(histogram.sum)}")
        lines.append(f"{name}_count{labels} {cumulative}")
    return lines


# The export's columns after date, key, user and model: counts from the usage history.
CSV_COUNTS = ("requests", "served", "limited", "prompt_tokens", "cached_tokens",
              "completion_tokens", "reasoning_tokens", "cost")
CSV_HEADERS = [("Content-Type", "text/csv; charset=utf-8"),
               ("Content-Disposition", 'attachment; filename="usage.csv"'), ("Cache-Control", "no-store")]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as a formula


def spreadsheet_text(value: str) -> str:
    """A name for a CSV cell that no spreadsheet runs as a formula: a leading ' if it could be one.

    Key names come from the keys file, users and models from clients: ``=HYPERLINK(...)``
    as a user name would otherwise run when the owner opens the export.
    """
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def cost_text(cost: float) -> str:
    """A cost for the export: a plain decimal (never 1e-05), rounded as the report rounds it."""
    return f"{max(0.0, round(cost, COST_DECIMALS)):.{COST_DECIMALS}f}".rstrip("0").rstrip(".")
# What answers each edit of one key, by method and action: /admin/api/keys/{name}[/{action}].
KEY_REQUESTS = {("PATCH", ""): "change_key", ("DELETE", ""): "remove_key",
                ("POST", "disable"): "switch_key", ("POST", "enable"): "switch_key",
                ("POST", "rotate"): "rotate_key", ("POST", "topup"): "top_up_key"}
KEY_ERROR_CODES = {400: "invalid_key_settings", 404: "key_not_found", 409: "name_in_use"}


class AdminView:
    """What the owner sees: the usage report (JSON) and the metrics (Prometheus text)."""

    def __init__(self, config: Config, keyring: KeyRing, buckets: BucketStore, usage: UsageBook,
                 metrics: Metrics, upstreams: UpstreamRegistry, models_file: ModelsFile,
                 wall_clock: Callable[[], float]) -> None:
        self.config, self.keyring, self.buckets = config, keyring, buckets
        self.usage, self.metrics, self.upstreams = usage, metrics, upstreams
        self.models_file, self.wall_clock = models_file, wall_clock
        self.alerts: AlertWatch | None = None  # set by the server when ALERT_WEBHOOK_URL is (it asks
                                               # this view for the currency: made after it)

    def record(self, call: Call) -> None:
        """Count one finished request in the history and the metrics."""
        if not call.identity:  # refused before anyone was identified: nobody to count it for
            return
        usage = call.meter.reported if call.meter is not None else None
        prompt, completion = (usage.input, usage.output) if usage is not None else (0, 0)
        charged, outcome, cost = call.tokens_paid, call.result, call.cost
        amounts = NO_AMOUNTS if usage is None and not charged and not cost else (
            prompt, completion, charged, usage.cached_input if usage else 0,
            usage.reasoning if usage else 0, cost)
        now = call.arrived  # a request counts on the day it arrived
        key = call.app[1] if call.app is not None else call.policy
        named = key is not None and bool(key.name)
        model = loggable(call.model or "")
        if call.endpoint in METERED_ENDPOINTS:  # the history counts calls to the model, not quota checks
            day = local_day(now)
            column = OUTCOME_COLUMNS[outcome]
            names_model = outcome in ("served", "limited")  # a name that passed the key's checks
            if call.app is not None:  # an app key's history includes all of its users'
                model = self.usage.record(call.app[0], call.label, None, day, now, column,
                                          amounts, model, names_model)
            model = self.usage.record(call.identity, call.label, call.user, day, now, column,
                                      amounts, model, names_model or call.app is not None)
        first_byte = call.first_byte - call.started if call.first_byte is not None else None
        upstream = call.upstream
        if upstream is not None:
            upstream.state.count(prompt + completion)
        self.metrics.record(call.label if named else OTHER, call.user if named else None,
                            call.endpoint, outcome, prompt, completion, charged, call.seconds,
                            first_byte, model, cost, upstream.name if upstream is not None else None)
        if self.alerts is not None and (call.charge is not None or call.limited):  # (identified: above)
            self.alerts.check(call, self.buckets, self.config.mode)

    def answer(self, path: str, method: str, headers: Headers,
               query: str = "") -> tuple[list[tuple[str, str]], bytes]:
        """The owner's routes: they exist only with ADMIN_KEY, and no client key opens them."""
        admin_key = self.config.admin_key
        if not admin_key:
            raise ProxyError(404, f"Unknown path {path}", code="not_found")
        if method not in ("GET", "HEAD"):
            raise ProxyError(405, f"{path} takes GET", code="method_not_allowed")
        if path == "/admin":  # the page holds no data: it asks for the key, then calls the API
            return DASHBOARD_HEADERS, DASHBOARD_HTML
        self.require_admin_key(headers, admin_key)
        if path == "/metrics":
            return [METRICS_TYPE], self.metrics_text().encode("utf-8")
        if path == "/admin/api/usage.csv":
            first, last = self.date_range(query)
            return CSV_HEADERS, self.usage_csv(first, last).encode("utf-8")
        return [JSON_TYPE], json_bytes(self.usage_report())

    @staticmethod
    def require_admin_key(headers: Headers, admin_key: str) -> None:
        token = bearer_token(headers.get("Authorization"))
        if token is None or not same_secret(token, admin_key):
            raise ProxyError(401, "This needs the admin key.", "authentication_error",
                             "invalid_admin_key")

    # -- the keys, over HTTP ---------------------------------------------------

    def keys_request(self, method: str, rest: str, headers: Headers, body: bytes) -> tuple[int, object]:
        """``/admin/api/keys[/{name}[/{action}]]``: what ``keys`` does, for scripts.

        Each edit is the command's own (the same lock, the same atomic write), and the
        key ring re-reads the file at once, so a change applies before the answer.
        ``{name}`` is a key's name, else its id (for names a URL cannot carry).
        """
        config = self.config
        if not config.admin_key:
            raise ProxyError(404, f"Unknown path /admin/api/keys{rest}", code="not_found")
        self.require_admin_key(headers, config.admin_key)
        if not config.keys_file:
            raise ProxyError(404, "This proxy has no KEYS_FILE; set one to manage keys here.",
                             code="not_found")
        fields = self.request_fields(body)
        segments = rest.strip("/").split("/") if rest.strip("/") else []
        if not segments:
            if method in READING:
                return 200, {"keys": [self.key_listing(stored, entry) for stored, entry
                                      in self.keys_file().entries.items()]}
            return 201, self.edit_keys(lambda keys: self.create_key(keys, fields))
        action = KEY_REQUESTS.get((method, segments[1] if len(segments) == 2 else ""))
        if action is None or len(segments) > 2:
            raise ProxyError(404, f"Unknown path /admin/api/keys{rest}", code="not_found")
        return 200, self.edit_keys(lambda keys: getattr(self, action)(keys, segments[0], segments[-1],
                                                                         fields))

    @staticmethod
    def request_fields(body: bytes) -> dict:
        """A JSON object, or nothing (no body, for the actions that take no fields)."""
        if not body.strip():
            return {}
        fields = parse_body(body)
        if not isinstance(fields, dict):
            raise ProxyError(400, "request body must be a JSON object", code="invalid_json")
        return fields

    def edit_keys(self, edit: Callable[[KeysFile], Callable[[], dict]]) -> dict:
        """One edit of KEYS_FILE under the command's lock, then the key ring re-reads it; the
        answer is made after that, so that it shows the levels under the new limits."""
        path = self.config.keys_file
        assert path is not None
        try:
            with edit_lock(path):
                answer = edit(self.keys_file())
                self.keyring.reload_if_changed(force=True)
                return answer()
        except ConfigError as error:
            status = KEY_ERROR_STATUS.get(type(error), 400)
            raise ProxyError(status, str(error), code=KEY_ERROR_CODES[status]) from None
        except OSError as error:
            log.error("KEYS_FILE %s: cannot write it (%s)", path, error.strerror)
            raise ProxyError(500, "The keys file cannot be written; the proxy's log says why.",
                             "server_error") from None

    def keys_file(self) -> KeysFile:
        """KEYS_FILE as it is now; a file that is no JSON object is the server's fault (a 500)."""
        path = self.config.keys_file
        assert path is not None
        try:
            return KeysFile(path, self.config)
        except ConfigError as error:
            log.error("KEYS_FILE %s: %s", path, error)
            raise ProxyError(500, "The keys file is broken; the proxy's log says why.",
                             "server_error") from None

    def key_listing(self, stored: str, entry: object) -> dict:
        """One entry as ``GET /admin/api/keys`` shows it: its settings and levels, never its key
        or the key's digest."""
        entry = entry if isinstance(entry, dict) else {}
        entry_id = entry.get("id")
        handle = entry_id if isinstance(entry_id, str) else None
        if handle is None:
            with suppress(ConfigError):  # a hand edit the proxy refused: no levels to show
                handle = stored_secret(stored)[0]
        policy = self.keyring.policy_by_handle(handle) if handle else None
        windows = entry.get("buckets") or [{k: entry[k] for k in TOKEN_LIMITS if k in entry}]
        return {"name": entry.get("name"), "id": entry.get("id"), "email": entry.get("email"),
                "enabled": entry.get("enabled", True), "expires": entry.get("expires"),
                "models": entry.get("models"), "endpoints": entry.get("endpoints"),
                "max_concurrent": entry.get("max_concurrent"), "windows": windows,
                "buckets": None if policy is None else self.buckets.peek("key:" + handle,
                                                                         policy.buckets)}

    def create_key(self, keys: KeysFile, fields: dict) -> Callable[[], dict]:
        name = checked_name(fields.pop("name", None))
        options = key_options(fields, (*KEY_OPTIONS, "email"))
        entry = new_entry(name, options)
        key = keys.add(entry)
        log.info("admin API: added the key %r", name)
        return lambda: {"key": key, **self.key_listing(hashed_key(key), entry)}

    def change_key(self, keys: KeysFile, name: str, action: str, fields: dict) -> Callable[[], dict]:
        options = key_options(fields, (*KEY_OPTIONS, "email", "window"))
        if not options:
            raise ConfigError(f"say what to change: {', '.join((*KEY_OPTIONS, 'email', 'window'))}")
        stored = keys.find_one(name)[0]
        entry = keys.replace(name, lambda entry: changed_entry(entry, options))
        log.info("admin API: changed the key %r", name)
        return lambda: self.key_listing(stored, entry)

    def top_up_key(self, keys: KeysFile, name: str, action: str, fields: dict) -> Callable[[], dict]:
        options = key_options(fields, ("amount", "window"))
        if "amount" not in options:
            raise ConfigError("say how much to add: {\"amount\": ...}")
        stored = keys.find_one(name)[0]
        entry = keys.replace(name, lambda entry: raised_limit(
            entry, options["amount"], options.get("window"), self.config)[0])
        log.info("admin API: topped up the key %r", name)
        return lambda: self.key_listing(stored, entry)

    def rotate_key(self, keys: KeysFile, name: str, action: str, fields: dict) -> Callable[[], dict]:
        key_options(fields, ())
        key, entry = keys.rotate(name)
        log.info("admin API: a new key for %r", name)
        return lambda: {"key": key, **self.key_listing(hashed_key(key), entry)}

    def switch_key(self, keys: KeysFile, name: str, action: str, fields: dict) -> Callable[[], dict]:
        key_options(fields, ())
        count = keys.update(name, enabled=action == "enable")
        log.info("admin API: %sd the key %r", action, name)
        return lambda: {"name": name, "enabled": action == "enable", "count": count}

    def remove_key(self, keys: KeysFile, name: str, action: str, fields: dict) -> Callable[[], dict]:
        key_options(fields, ())
        count = keys.remove(name)
        log.info("admin API: removed the key %r", name)
        return lambda: {"name": name, "removed": count}

    def currency(self) -> str | None:
        """What costs are counted in: MODELS_FILE's currency, None while no price is known."""
        catalog = self.models_file.catalog
        return catalog.currency if catalog.models else None

    # -- the usage export ------------------------------------------------------

    def date_range(self, query: str) -> tuple[str, str]:
        """``from`` and ``to`` (YYYY-MM-DD, both optional, inclusive); anything else is a 400.

        Unset, they are the first day the history keeps and today.
        """
        try:
            pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            pairs = [("", "")]
        names = [name for name, _ in pairs]
        if any(name not in ("from", "to") for name in names) or len(set(names)) != len(names):
            raise ProxyError(400, "usage.csv takes from=YYYY-MM-DD and to=YYYY-MM-DD, once each",
                             code="invalid_query")
        chosen = dict(pairs)
        today = local_day(self.wall_clock())
        first = chosen.get("from") or last_days(self.wall_clock(), self.usage.keep_days)[0]
        last = chosen.get("to") or today
        for name, day in (("from", first), ("to", last)):
            if not _is_date(day):
                raise ProxyError(400, f"{name} must be a date, YYYY-MM-DD", code="invalid_date",
                                 param=name)
        if first > last:
            raise ProxyError(400, "from is after to", code="invalid_date", param="from")
        return first, last

    def usage_csv(self, first: str, last: str) -> str:
        """One row per day, key, user and model, from the usage history (``UsageBook.rows``)."""
        names = {"key:" + digest: policy.name or digest[:12]
                 for digest, policy in self.keyring.entries()}
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(("date", "key", "user", "model") + CSV_COUNTS)
        columns = operator.itemgetter(*(USAGE_FIELDS.index(name) for name in CSV_COUNTS[:-1]))
        writer.writerows([day, spreadsheet_text(key), spreadsheet_text(user), spreadsheet_text(model),
                          *columns(counts), cost_text(counts[COST])]
                         for day, key, user, model, counts in self.usage.rows(first, last, names))
        return out.getvalue()

    # -- the usage report ------------------------------------------------------

    def usage_report(self) -> dict:
        now = self.wall_clock()
        today, days = local_day(now), last_days(now, 30)
        keys = []
        listed = set()
        for handle, policy in self.keyring.entries():
            identity = "key:" + handle
            listed.add(identity)
            keys.append(self.caller(identity, policy.name or handle[:12], policy, today, days))
        for identity, ledger in self.usage.items():  # callers no longer (or never) in the file
            if identity not in listed and "/user:" not in identity:
                keys.append(self.caller(identity, ledger.key, self.keyring.policy_of(identity),
                                        today, days))
        upstream = self.upstreams.default
        return {"now": _iso_time(now), "currency": self.currency(),
                "upstream": {"url": upstream.target.display, "up": upstream.state.up,
                             "last_error": upstream.state.last_error},
                "upstreams": [self.upstream_entry(each) for each in self.upstreams],
                "in_flight": self.upstreams.in_flight, "queued": self.upstreams.waiting,
                "keys": keys}

    @staticmethod
    def upstream_entry(upstream: Upstream) -> dict:
        """One server for the owner: its name, URL (never a key), health, load and what it served."""
        state, gate = upstream.state, upstream.gate
        return {"name": upstream.name, "url": upstream.target.display, "up": state.up,
                "in_flight": gate.in_flight, "queued": upstream.queued,
                "max_concurrent": gate.limit or None, "last_error": state.last_error,
                "requests": state.requests, "tokens": state.tokens}

    def caller(self, identity: str, name: str, policy: Policy, today: str, days: list[str],
               with_users: bool = True) -> dict:
        in_flight, queued = self.upstreams.counts(identity)
        ledger = self.usage.get(identity) or Ledger(name, None)
        entry = {"name": name, "enabled": policy.enabled, "expires": policy.expires,
                 "models": None if policy.models is None else list(policy.models),
                 "max_concurrent": policy.max_concurrent or None, "in_flight": in_flight,
                 "queued": queued, "buckets": self.buckets.peek(identity, policy.buckets)}
        entry.update(ledger.summary(today, days))
        if with_users and policy.users is not None:
            prefix = identity + "/user:"
            entry["users"] = [
                self.caller(user_id, ledger.user or "?", policy.users.policy_for(user_id[len(prefix):]),
                            today, days, with_users=False)
                for user_id, ledger in self.usage.items() if user_id.startswith(prefix)]
        return entry

    # -- Prometheus ------------------------------------------------------------

    def metrics_text(self) -> str:
        metrics = self.metrics
        requests, tokens, duration, first_byte = metrics.snapshot()
        lines = _family("llm_proxy_requests_total", "counter",
                        "Requests by key, endpoint, outcome and the upstream that answered.",
                        ((_labels((("key", k), ("user", u), ("endpoint", e), ("outcome", o),
                                   ("upstream", up))), n)
                         for (k, u, e, o, up), n in requests))
        lines += _family("llm_proxy_tokens_total", "counter",
                         "Tokens by key: prompt and completion as the upstream reported, charged after settling.",
                         ((_labels((("key", k), ("user", u), ("type", t))), n) for (k, u, t), n in tokens))
        lines += _family("llm_proxy_cost_total", "counter",
                         "What each key's requests cost, by model, in MODELS_FILE's currency.",
                         ((_labels((("key", k), ("model", m))), round(c, COST_DECIMALS))
                          for (k, m), c in metrics.cost_series()))
        lines += _family("llm_proxy_bucket_tokens", "gauge", "Tokens left in each named key's windows.",
                         self.bucket_samples())
        upstreams = list(self.upstreams)
        lines += _family("llm_proxy_in_flight", "gauge", "Requests at each upstream now.",
                         ((_labels((("upstream", u.name),)), u.gate.in_flight) for u in upstreams))
        lines += _family("llm_proxy_queued", "gauge",
                         "Requests waiting at each upstream: for a slot, or for it to answer again.",
                         ((_labels((("upstream", u.name),)), u.queued) for u in upstreams))
        lines += _family("llm_proxy_upstream_up", "gauge",
                         "1 if the last exchange with the upstream worked (or none was tried), 0 if it failed.",
                         ((_labels((("upstream", u.name),)), 0 if u.state.up is False else 1)
                          for u in upstreams))
        lines += _histogram("llm_proxy_request_duration_seconds",
                            "From a request's arrival to its last byte sent.", duration)
        lines += _histogram("llm_proxy_time_to_first_byte_seconds",
                            "From a request's arrival to the first byte of its answer.", first_byte)
        return "\n".join(lines) + "\n"

    def bucket_samples(self) -> Iterator[tuple[str, float]]:
        for handle, policy in self.keyring.entries():
            if not policy.name:
                continue
            identity = "key:" + handle
            for index, level in enumerate(self.buckets.peek(identity, policy.buckets)):
                yield _labels((("key", policy.name), ("window", level["name"] or str(index)))), level["tokens"]
            if policy.users is None:
                continue
            prefix = identity + "/user:"
            for user_id, ledger in self.usage.items():
                if user_id.startswith(prefix):
                    specs = policy.users.policy_for(user_id[len(prefix):]).buckets
                    for index, level in enumerate(self.buckets.peek(user_id, specs)):
                        yield (_labels((("key", policy.name), ("user", ledger.user),
                                        ("window", level["name"] or str(index)))), level["tokens"])


# The dashboard: one page, inline style and script, allowed by hash in a strict
# Content-Security-Policy; it loads nothing from anywhere and draws with the DOM
# (never innerHTML), so a key or user name cannot inject markup.
DASHBOARD_STYLE = """
:root{--ink:#1d232b;--mute:#65707d;--line:#e3e7ec;--ok:#2f8f5b;--bad:#c0392b;--bar:#3a7bd5;--bg:#f6f8fa}
[hidden]{display:none!important}*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:var(--ink);background:var(--bg)}
header{padding:14px 18px;background:#fff;border-bottom:1px solid var(--line);display:flex;gap:12px;align-items:center;flex-wrap:wrap}
h1{font-size:18px;margin:0 auto 0 0}main{padding:16px;max-width:1200px;margin:auto}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px;margin-bottom:14px}
.totals{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:10px}
.total b{display:block;font-size:22px}.total span{color:var(--mute);font-size:13px}
.pill{padding:2px 8px;border-radius:10px;font-size:12px;color:#fff;background:var(--mute)}
.up{background:var(--ok)}.down{background:var(--bad)}.off{background:var(--bad)}
table{border-collapse:collapse;width:100%;min-width:760px}th,td{text-align:left;padding:7px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:var(--mute);font-weight:600}.scroll{overflow-x:auto}
tr.user td:first-child{padding-left:26px;color:var(--mute)}
.win{min-width:150px;margin-bottom:4px}.track{height:8px;background:var(--line);border-radius:4px;overflow:hidden}
.fill{height:8px;background:var(--bar)}.small{font-size:12px;color:var(--mute)}
form{display:flex;gap:8px;flex-wrap:wrap}input{font:inherit;padding:8px;border:1px solid var(--line);border-radius:6px;min-width:240px}
button{font:inherit;padding:8px 14px;border:0;border-radius:6px;background:var(--bar);color:#fff}
.error{color:var(--bad)}svg{width:100%;height:120px;display:block}.axis{display:flex;justify-content:space-between;font-size:12px;color:var(--mute)}
"""

DASHBOARD_SCRIPT = """
"use strict";
const $ = (tag, attrs, ...kids) => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k))); return e; };
const SVG = "http://www.w3.org/2000/svg";
const svg = (tag, attrs) => { const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
const fmt = n => Number(n).toLocaleString();
const plain = n => Number(n).toLocaleString(undefined, {maximumFractionDigits: 4});
let money = plain;
function moneyIn(code) {
  if (!code) return plain;
  try { const f = new Intl.NumberFormat(undefined, {style: "currency", currency: code, maximumFractionDigits: 4}); return n => f.format(n); }
  catch (error) { return n => plain(n) + " " + code; }
}
const wait = s => s <= 0 ? "full" : s < 90 ? Math.ceil(s) + " s" : s < 5400 ? Math.ceil(s / 60) + " min" : (s / 3600).toFixed(1) + " h";
const ago = t => { if (!t) return "never"; const s = (Date.now() - Date.parse(t)) / 1000;
  return s < 60 ? "just now" : s < 3600 ? Math.floor(s / 60) + " min ago" : s < 86400 ? Math.floor(s / 3600) + " h ago" : Math.floor(s / 86400) + " d ago"; };
let timer = null;

function login(event) {
  event.preventDefault();
  const key = document.getElementById("key").value.trim();
  if (!key) return;
  sessionStorage.setItem("llm_proxy_admin", key);
  document.getElementById("key").value = "";
  refresh();
}

async function refresh() {
  const key = sessionStorage.getItem("llm_proxy_admin");
  document.getElementById("login").hidden = !!key;
  document.getElementById("logout").hidden = !key;
  if (!key) return;
  try {
    const answer = await fetch("/admin/api/usage", {headers: {"Authorization": "Bearer " + key}, cache: "no-store"});
    if (answer.status === 401) { sessionStorage.removeItem("llm_proxy_admin");
      document.getElementById("login").hidden = false; document.getElementById("logout").hidden = true;
      document.getElementById("message").textContent = "That admin key was not accepted."; return; }
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    render(await answer.json());
    document.getElementById("message").textContent = "";
  } catch (error) { document.getElementById("message").textContent = "Cannot reach the proxy: " + error.message; }
  clearTimeout(timer); timer = setTimeout(refresh, 5000);
}

function windows(buckets) {
  const cell = $("td");
  for (const b of buckets) {
    const share = b.capacity ? Math.max(0, Math.min(1, b.tokens / b.capacity)) : 0;
    const fill = $("div", {class: "fill"}); fill.style.width = (share * 100).toFixed(1) + "%";
    cell.append($("div", {class: "win"}, $("div", {class: "small"}, (b.name || "window") + ": " + fmt(b.tokens) + " / " + fmt(b.capacity) + (b.seconds_to_full > 0 ? " \\u00b7 full in " + wait(b.seconds_to_full) : b.seconds_to_full === null ? " \\u00b7 never refills" : "")),
      $("div", {class: "track"}, fill)));
  }
  return cell;
}

function row(entry, isUser) {
  const u = entry.usage, status = !entry.enabled ? "disabled" : entry.expires && entry.expires < new Date().toISOString().slice(0, 10) ? "expired" : "active";
  return $("tr", {class: isUser ? "user" : "key"}, $("td", {}, entry.name), $("td", {}, $("span", {class: "pill " + (status === "active" ? "up" : "off")}, status)),
    windows(entry.buckets), $("td", {}, entry.in_flight + " / " + entry.queued),
    $("td", {}, fmt(u.today.requests) + " / " + fmt(u.last_7_days.requests) + " / " + fmt(u.last_30_days.requests)),
    $("td", {}, fmt(u.today.tokens_charged) + " / " + fmt(u.last_7_days.tokens_charged) + " / " + fmt(u.last_30_days.tokens_charged)),
    $("td", {title: Object.entries(u.last_30_days.by_model).filter(([m, c]) => c.cost).map(([m, c]) => (m || "(no model)") + ": " + money(c.cost)).join("\\n")},
      money(u.today.cost) + " / " + money(u.last_7_days.cost) + " / " + money(u.last_30_days.cost)),
    $("td", {title: entry.last_seen || ""}, ago(entry.last_seen)));
}

function chart(keys) {
  const totals = new Map();
  for (const k of keys) for (const d of k.daily) totals.set(d.date, (totals.get(d.date) || 0) + d.tokens_charged);
  const days = [...totals.keys()].sort(), peak = Math.max(0, ...totals.values());
  const box = svg("svg", {viewBox: "0 0 600 120", preserveAspectRatio: "none", role: "img", "aria-label": "tokens charged per day, last 30 days"});
  const width = 600 / Math.max(1, days.length);
  days.forEach((day, i) => { const h = peak ? 115 * totals.get(day) / peak : 0;
    const bar = svg("rect", {x: (i * width + 1).toFixed(1), y: (120 - h).toFixed(1), width: Math.max(1, width - 2).toFixed(1), height: h.toFixed(1), fill: "#3a7bd5"});
    const tip = svg("title", {}); tip.textContent = day + ": " + fmt(totals.get(day)) + " tokens"; bar.append(tip); box.append(bar); });
  const axis = $("div", {class: "axis"}, $("span", {}, days[0] || ""), $("span", {}, "peak " + fmt(peak) + " tokens/day"), $("span", {}, days[days.length - 1] || ""));
  return [box, axis];
}

function render(data) {
  const up = data.upstream.up;
  const state = document.getElementById("upstream");
  state.replaceChildren($("span", {class: "pill " + (up === false ? "down" : "up")}, up === false ? "upstream down" : up ? "upstream up" : "upstream not used yet"),
    " ", $("span", {class: "small"}, data.upstream.url + (data.upstream.last_error ? " \\u2014 " + data.upstream.last_error : "")));
  money = moneyIn(data.currency);
  let today = 0, tokens = 0, month = 0, cost = 0;
  for (const k of data.keys) { today += k.usage.today.requests; tokens += k.usage.today.tokens_charged; month += k.usage.last_30_days.tokens_charged; cost += k.usage.last_30_days.cost; }
  document.getElementById("totals").replaceChildren(...[["keys", data.keys.length], ["in flight", data.in_flight], ["queued", data.queued],
    ["requests today", today], ["tokens today", tokens], ["tokens, 30 days", month], ["cost, 30 days", money(cost)]].map(([label, value]) => $("div", {class: "total"}, $("b", {}, typeof value === "number" ? fmt(value) : value), $("span", {}, label))));
  document.getElementById("chart").replaceChildren(...chart(data.keys));
  document.getElementById("servers").replaceChildren(...(data.upstreams || []).map(u => $("tr", {},
    $("td", {}, u.name), $("td", {}, $("span", {class: "pill " + (u.up === false ? "down" : "up")}, u.up === false ? "down" : u.up ? "up" : "not used yet")),
    $("td", {class: "small"}, u.url), $("td", {}, u.in_flight + " / " + u.queued + (u.max_concurrent ? " (max " + u.max_concurrent + ")" : "")),
    $("td", {}, fmt(u.requests)), $("td", {}, fmt(u.tokens)), $("td", {class: "small"}, u.last_error || ""))));
  const body = document.getElementById("rows"); body.replaceChildren();
  for (const k of data.keys) { body.append(row(k, false)); for (const u of k.users || []) body.append(row(u, true)); }
  document.getElementById("updated").textContent = "updated " + new Date(data.now).toLocaleTimeString();
  document.getElementById("view").hidden = false;
}

document.getElementById("login").addEventListener("submit", login);
document.getElementById("logout").addEventListener("click", () => { sessionStorage.removeItem("llm_proxy_admin"); location.reload(); });
refresh();
"""

DASHBOARD_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>llm_proxy</title><style>{style}</style></head>
<body><header><h1>llm_proxy</h1><span id="upstream"></span><span id="updated" class="small"></span>
<button id="logout" type="button" hidden>Sign out</button></header>
<main><form id="login" class="card" autocomplete="off"><input id="key" type="password" placeholder="Admin key" aria-label="Admin key" autocomplete="off" autofocus>
<button type="submit">Open</button></form><p id="message" class="error" role="status"></p>
<div id="view" hidden><section class="card"><div id="totals" class="totals"></div></section>
<section class="card"><div class="small">Tokens charged per day, last 30 days</div><div id="chart"></div></section>
<section class="card scroll"><table><thead><tr><th>upstream</th><th>state</th><th>url</th><th>in flight / queued</th>
<th>requests</th><th>tokens</th><th>last error</th></tr></thead><tbody id="servers"></tbody></table></section>
<section class="card scroll"><table><thead><tr><th>key / user</th><th>status</th><th>windows</th><th>in flight / queued</th>
<th>requests today / 7 d / 30 d</th><th>tokens today / 7 d / 30 d</th><th>cost today / 7 d / 30 d</th><th>last seen</th></tr></thead><tbody id="rows"></tbody></table></section></div>
</main><script>{script}</script></body></html>
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


DASHBOARD_HTML = DASHBOARD_PAGE.format(style=DASHBOARD_STYLE, script=DASHBOARD_SCRIPT).encode("utf-8")
DASHBOARD_HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    ("Content-Security-Policy", f"default-src 'none'; script-src {_csp_hash(DASHBOARD_SCRIPT)}; "
     f"style-src {_csp_hash(DASHBOARD_STYLE)}; connect-src 'self'; img-src 'self'; base-uri 'none'; "
     "form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]


# --------------------------------------------------------------------------
# Alerts: a webhook told when a window passes a threshold
# --------------------------------------------------------------------------

MAX_ALERT_MARKS = 100_000  # crossings remembered (a few per window); past it, no new alerts
ALERT_QUEUE = 100  # alerts waiting for the webhook; past it, new ones are lost (and counted)
ALERT_BACKOFF = (1.0, 5.0, 30.0, 120.0)  # seconds before each retry of one alert


def chat_safe(name: str) -> str:
    """A client's or the owner's name as a chat message may show it: bounded, printable, and
    unable to ping a channel (``@here``, ``<!channel>``) or to make a link."""
    shown = loggable(name, 100).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return shown.replace("@", "@\u200b")


class Crossing(NamedTuple):
    """One window past one threshold, as the alert's JSON fields say it."""

    key: str
    user: str | None
    window: str
    unit: str
    used: float
    capacity: float
    percent: float
    threshold: float
    resets: str | None
    currency: str | None = None  # a money window's

    def payload(self) -> dict:
        """The JSON posted: ``text`` for Slack and Mattermost, ``content`` for Discord (whose
        ``allowed_mentions`` ping nobody), and every field for scripts. Names, never keys."""
        who = chat_safe(self.key) + ("" if self.user is None else f" / user {chat_safe(self.user)}")
        amounts = f"{_number(self.used)} of {_number(self.capacity)} {self.currency or self.unit}"
        text = (f"llm_proxy: {who}: window {chat_safe(self.window)} is {self.percent:g}% used "
                f"({amounts}), past the {self.threshold:g}% alert; "
                + (f"resets {self.resets}" if self.resets else "it never refills"))
        return dict(self._asdict(), text=text, content=text, allowed_mentions={"parse": []})


def refused_short(spec: BucketSpec, level: dict, cost: int) -> bool:
    """Whether a window refused a cost it could pay when full: its level (as shown, perhaps in
    a currency) below the cost (counted as the bucket counts)."""
    if not level["capacity"] or cost > spec.capacity:
        return False
    return level["tokens"] * (spec.capacity / level["capacity"]) < cost


class AlertWatch:
    """Which windows have passed which ALERT_THRESHOLDS: decides the alerts, sends none itself.

    Asked after each request that was charged or limited, from the levels the bucket
    store shows then (a comparison per window and threshold; the posting is the
    ``AlertSender``'s thread's).  A mark remembers each crossing so that it is told
    once: a refilling window's until a check finds it below the threshold again (after
    a request, or in housekeeping); a calendar window's for its period, whatever
    refunds do meanwhile.  A window that refuses a request it could hold when full
    counts as 100% used, since a hard cap may stop it a little short of empty.
    """

    def __init__(self, thresholds: Sequence[float], sender: AlertSender,
                 wall_clock: Callable[[], float] = time.time,
                 currency: Callable[[], str | None] = lambda: None) -> None:
        self.thresholds = tuple(thresholds)
        self.sender = sender
        self.wall_clock = wall_clock
        self.currency = currency  # what a money window's amounts are in
        self._marks: dict[tuple[str, str, float], float | bool] = {}  # True, or a period's end
        self._lock = threading.Lock()
        self._full_reported = False

    def check(self, call: Call, buckets: BucketStore, mode: CostMode) -> None:
        """Mark and queue the crossings of the windows that paid (or refused) ``call``."""
        refused = call.refused.costs if call.refused is not None else ()
        for payer, (identity, specs) in enumerate(call.payers):
            levels = buckets.peek(identity, specs)
            costs = refused[payer] if payer < len(refused) else ()
            user = call.user if payer == 0 and call.app is not None else None
            for index, (spec, level) in enumerate(zip(specs, levels)):
                blocked = index < len(costs) and refused_short(spec, level, costs[index])
                self.check_window(identity, index, spec, level, call.label, user,
                                  mode.unit_of(spec).name or "tokens", blocked)

    def check_window(self, identity: str, index: int, spec: BucketSpec, level: dict, key: str,
                     user: str | None, unit: str, blocked: bool) -> None:
        capacity = level["capacity"]
        if capacity <= 0:
            return
        used = capacity - level["tokens"]
        if isinstance(used, float):
            used = round(used, COST_DECIMALS)
        percent = round(100 * used / capacity, 1)
        reached = max(percent, 100.0) if blocked else percent
        window = spec.name or str(index)
        now = self.wall_clock()
        period_end = now + level["seconds_to_next_refill"] if spec.period in PERIOD_DAYS else None
        for threshold in self.thresholds:
            mark = (identity, window, threshold)
            if not self.crossed(mark, reached >= threshold, period_end):
                continue
            to_full = level["seconds_to_full"]
            resets = period_end if period_end is not None else (
                None if to_full is None else now + to_full)
            self.sender.send(Crossing(key, user, window, unit, used, capacity, percent, threshold,
                                      None if resets is None else _iso_time(resets),
                                      self.currency() if unit == MONEY else None).payload())

    def crossed(self, mark: tuple[str, str, float], above: bool, period_end: float | None) -> bool:
        """Whether this is a new crossing (and mark it); a refilling window below re-arms."""
        with self._lock:
            seen = self._marks.get(mark)
            if not above:
                if period_end is None and seen is not None:
                    del self._marks[mark]
                return False
            now_mark: float | bool = True if period_end is None else round(period_end)
            if seen == now_mark:
                return False
            if seen is None and len(self._marks) >= MAX_ALERT_MARKS:
                if not self._full_reported:
                    self._full_reported = True
                    log.warning("alerts: %d crossings remembered; no new ones are sent until "
                                "some windows are below their thresholds again", MAX_ALERT_MARKS)
                return False
            self._marks[mark] = now_mark
            return True

    def prune(self, buckets: BucketStore, specs_of: Callable[[str], Sequence[BucketSpec]]) -> None:
        """Forget marks no longer true: a refilling window back below its threshold (so its next
        crossing is told even if no request saw it below), a calendar period that ended."""
        now = self.wall_clock()
        with self._lock:
            marks = list(self._marks.items())
        below = []
        for (identity, window, threshold), seen in marks:
            if seen is not True:
                if seen < now:
                    below.append(((identity, window, threshold), seen))
                continue
            specs = specs_of(identity)
            for index, (spec, level) in enumerate(zip(specs, buckets.peek(identity, specs))):
                if (spec.name or str(index)) == window and level["capacity"] > 0 and (
                        100 * (level["capacity"] - level["tokens"]) / level["capacity"] < threshold):
                    below.append(((identity, window, threshold), seen))
        with self._lock:
            for mark, seen in below:
                if self._marks.get(mark) == seen:  # (a period a request marked meanwhile stays)
                    del self._marks[mark]
            if len(self._marks) < MAX_ALERT_MARKS:
                self._full_reported = False

    def dump(self) -> list:
        with self._lock:
            return [[identity, window, threshold, seen]
                    for (identity, window, threshold), seen in self._marks.items()]

    def load(self, saved: list) -> None:
        """Marks from STATE_FILE, so that a restart does not tell a crossing again."""
        restored = {}
        for identity, window, threshold, seen in saved[:MAX_ALERT_MARKS]:
            if not (isinstance(seen, bool) and seen) and not (
                    isinstance(seen, (int, float)) and math.isfinite(seen)):
                raise ValueError("unexpected alert mark")
            restored[(str(identity), str(window), float(threshold))] = seen
        with self._lock:
            self._marks.update(restored)


class AlertSender:
    """Posts alerts to ALERT_WEBHOOK_URL from a thread of its own, never from a request's.

    ``send`` only queues (at most ALERT_QUEUE; more are lost and counted).  Each alert
    is tried again after each of ``backoff``'s delays while the hook fails (a connection
    that fails, a 5xx or 429); a hook that refuses it otherwise (another 4xx) will refuse
    it again, so it is dropped.  The URL is a secret (Slack's and Discord's carry their
    token): the log shows its scheme and host only.  A failing hook is logged once when
    it starts failing and once when it works again, with the number of alerts lost.
    """

    def __init__(self, url: str, timeout: float = 10.0,
                 backoff: Sequence[float] = ALERT_BACKOFF) -> None:
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname or "", parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.shown = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "") + "/..."
        self.timeout = timeout
        self.backoff = tuple(backoff)
        self.sent = self.lost = self.pending = 0
        self.failing = False
        self._lost_in_outage = 0
        self._count_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(ALERT_QUEUE)
        self._stop = threading.Event()
        self._connection: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()

    def send(self, payload: dict) -> None:
        """Queue one alert; never waits."""
        with self._count_lock:
            self.pending += 1
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.count_lost()
            self.done()

    def _run(self) -> None:
        guard = LoopGuard("alerts")
        while not self._stop.is_set():
            payload = self._queue.get()
            if payload is None or self._stop.is_set():
                return
            guard.run("posting an alert", self.deliver, payload)
            self.done()

    def done(self) -> None:
        with self._count_lock:
            self.pending -= 1

    @property
    def drained(self) -> bool:
        """Every alert queued so far was posted, or given up."""
        return self.pending == 0

    def deliver(self, payload: dict) -> bool:
        """Post one alert, retrying after each backoff delay; True once the hook took it."""
        body = json.dumps(payload).encode("utf-8")
        for delay in (0.0,) + self.backoff:
            if self._stop.is_set() or (delay and self._stop.wait(delay)):
                return False
            try:
                status = self.post(body)
            except (OSError, http.client.HTTPException) as error:
                self.failed(failure_reason(error))
                continue
            if 200 <= status < 300:
                self.worked()
                return True
            self.failed(f"HTTP {status}")
            if status != 429 and status < 500:
                break  # refused as it is: it would be refused again
        self.count_lost()
        return False

    def count_lost(self) -> None:
        with self._count_lock:
            self.lost += 1
            self._lost_in_outage += 1

    def post(self, body: bytes) -> int:
        """One POST; the hook's status. The connection is kept where ``close`` can cut it."""
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        connection = kind(self.host, self.port, timeout=self.timeout)
        self._connection = connection
        try:
            connection.request("POST", self.path, body, {
                "Content-Type": "application/json", "User-Agent": f"llm_proxy/{__version__}"})
            response = connection.getresponse()
            response.read(65536)
            return response.status
        finally:
            self._connection = None
            connection.close()

    def failed(self, reason: str) -> None:
        if not self.failing:
            self.failing = True
            with self._count_lock:
                self._lost_in_outage = 0
            log.warning("alert webhook %s is failing (%s); alerts are retried %d times; not "
                        "logged again until it works", self.shown, reason, len(self.backoff))

    def worked(self) -> None:
        self.sent += 1
        if self.failing:
            self.failing = False
            log.info("alert webhook %s works again (%d alerts lost meanwhile)", self.shown,
                     self._lost_in_outage)

    def close(self) -> None:
        """Stop now: an alert being posted is cut off, those queued are not sent."""
        self._stop.set()
        with suppress(queue.Full):
            self._queue.put_nowait(None)
        while self._thread.is_alive():  # (a connection may open just after a look: look again)
            connection = self._connection
            if connection is not None and connection.sock is not None:
                with suppress(OSError):
                    connection.sock.shutdown(socket.SHUT_RDWR)
            self._thread.join(0.05)


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------

def client_host(client_address: tuple) -> str:
    """The address a client's connections are counted under.

    A dual-stack socket reports an IPv4 client as ``::ffff:a.b.c.d``; it is the
    same client as ``a.b.c.d`` and must share its count, or it could hold twice
    its share by connecting both ways. Anything that is no IP address is counted
    under its own text.
    """
    host = str(client_address[0]) if client_address else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(address if mapped is None else mapped)


class TrackedServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its open connections and which client holds each.

    Counting them lets a flood get a fast 503 instead of an unbounded number of
    threads, and lets ``server_close`` end keep-alive connections instead of
    leaving their threads behind. A flood that finds no file descriptor left gets
    the same 503. Counting them per client address keeps one client, which need
    not even send a request, from holding every connection and so refusing
    everyone else: past its share it gets the 503 itself.
    """

    daemon_threads = True
    request_queue_size = 1024  # a burst of connects waits in the backlog instead of being refused
    max_connections = 1024
    # None: half of max_connections; 0: no cap, as a server whose one client is this proxy needs
    # (the demo's echo model). ProxyServer takes MAX_CONNECTIONS_PER_CLIENT.
    max_connections_per_client: int | None = 0
    accept_pause = 0.02  # seconds the accept loop rests after finding no descriptor left
    out_of_descriptors_quiet = 60.0  # seconds without that which end an episode: one warning each

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        self._connections: dict[socket.socket, str] = {}  # connection -> its client_host
        self._client_connections: dict[str, int] = {}  # client_host -> its open connections, > 0
        self._clients_told: set[str] = set()  # capped clients logged since they last held none
        self._connections_lock = threading.Lock()
        self._out_of_descriptors_at = -math.inf  # when accept() last failed for want of one
        super().__init__(address, handler, bind_and_activate=False)
        # socketserver would call server_close() when binding fails (a port in use), and a
        # subclass's server_close stops what its __init__ has not started yet: only the
        # listening socket exists to be closed here.
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.socket.close()
            raise
        self._reserve = reserve_descriptor()

    def get_request(self) -> tuple[socket.socket, tuple]:
        """socketserver's accept(), which out of descriptors still answers its client a 503."""
        try:
            return self.socket.accept()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE):
                self.refuse_without_descriptors(error)
            raise  # to socketserver, a failed accept is nothing to do

    def refuse_without_descriptors(self, error: OSError) -> None:
        """Answer the connection that found no descriptor left the 503 of a full server, then rest.

        accept() that fails leaves its connection queued: the listening socket stays
        readable, socketserver's loop spins at full speed, and the client waits for an
        answer that never comes. A descriptor kept in reserve for this makes room to
        accept it, answer it as ``refuse`` does and close it; the reserve is then taken
        back, and the loop rests a moment so that it never spins. Said once an episode.
        """
        now = time.monotonic()
        if now - self._out_of_descriptors_at > self.out_of_descriptors_quiet:
            log.warning("out of file descriptors (%s): new connections get a 503 until some "
                        "close; raise the limit (ulimit -n) or lower MAX_CONNECTIONS",
                        errno.errorcode[error.errno])
        self._out_of_descriptors_at = now
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
            with suppress(OSError):  # another thread may have taken the freed descriptor first
                request, _ = self.socket.accept()
                self.refuse(request)
        self._reserve = reserve_descriptor()  # (or, if none could be had before, another try)
        time.sleep(self.accept_pause)

    @property
    def connections_per_client_cap(self) -> int:
        """Connections one client address may hold at once; 0 for no cap.

        Unset, it is half of max_connections, read when each connection comes, so it
        follows the cap ``fit_to_descriptor_limit`` may lower at startup: one client
        never holds every connection, while one that legitimately keeps a few
        (a browser, an app's pool) is far from its share.
        """
        if self.max_connections_per_client is not None:
            return self.max_connections_per_client
        return max(1, self.max_connections // 2)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        client = client_host(client_address)
        with self._connections_lock:
            held = self._client_connections.get(client, 0)
            cap = self.connections_per_client_cap
            over_its_share = cap != 0 and held >= cap
            admitted = not over_its_share and len(self._connections) < self.max_connections
            if admitted:
                self._connections[request] = client
                self._client_connections[client] = held + 1
            tell = over_its_share and client not in self._clients_told
            if tell:
                self._clients_told.add(client)
        if admitted:
            self.start_connection(request, client_address)
            return
        if tell:
            self.log_client_capped(client, held)
        self.refuse(request)

    def log_client_capped(self, client: str, held: int) -> None:
        """Say once an episode, not once a connection, that a client met its cap.

        The episode lasts until the client holds no connection again, so a client
        kept at its cap cannot fill the log; one that lets go of everything and
        fills its share anew earns a line per round, that is per cap + 1
        connections it opened.
        """
        log.warning("client %s holds %d connections, as many as MAX_CONNECTIONS_PER_CLIENT allows "
                    "one address: more from it get a 503 until some close (behind a reverse proxy "
                    "every caller has its address: raise the cap, or 0 for none)", client, held)

    def start_connection(self, request: socket.socket, client_address: tuple) -> None:
        """A thread for the new connection; the proxy's waits for its first request without one."""
        super().process_request(request, client_address)

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
            client = self._connections.pop(request, None)  # None: refused, or already ended
            if client is not None:
                self.release_client_connection(client)
        super().shutdown_request(request)

    def release_client_connection(self, client: str) -> None:
        """One connection of ``client`` fewer; a client with none left is forgotten.

        Only clients holding connections are kept, so however many addresses come and
        go, this map is never larger than the connections themselves. Call with the
        connections' lock held.
        """
        held = self._client_connections[client] - 1
        if held:
            self._client_connections[client] = held
        else:
            del self._client_connections[client]
            self._clients_told.discard(client)  # its episode is over

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def connections_by_client(self) -> dict[str, int]:
        """Open connections per client address, for those holding any (a copy)."""
        with self._connections_lock:
            return dict(self._client_connections)

    def handle_error(self, request: socket.socket, client_address: tuple) -> None:
        """A connection that broke outside a request (a reset while idle, say): one line, no trace."""
        error = sys.exc_info()[1]
        log.info("%s connection ended: %s", client_address[0], type(error).__name__)

    def server_close(self) -> None:
        """Stop listening and end every open connection, so no handler thread outlives us."""
        super().server_close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def raise_descriptor_limit(wanted: int) -> int | None:
    """How many files this process may open, after raising its soft limit as far as it may.

    The soft limit (often 1024, a default kept for programs that wait with select())
    is the process's own to raise, up to the hard limit the system's owner set; this
    proxy waits with poll, epoll or kqueue, so it takes all it may. A hard limit
    that is unlimited (macOS) is no value for the soft one: then it asks ``wanted``.
    None where there is no such limit (Windows), or no finite one.
    """
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # the soft limit stays; the connections are fitted to it
    return None if soft == resource.RLIM_INFINITY else soft


def reserve_descriptor() -> int | None:
    """A descriptor to close when none is left, so that one more can be opened (None: none left)."""
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


class LoopGuard:
    """Runs the steps of a background thread's loop so that no exception ends the thread.

    These threads work for the whole process (re-reading KEYS_FILE, saving
    STATE_FILE, noticing clients that hang up, writing the request log), and one
    that dies does so without a word: its work just stops, for good.  A failing
    step is logged with its traceback the first time it fails in a given way
    (type and place), not on every later round while it keeps failing so; once
    the step works again, a new failure is logged anew.  One guard per thread.
    """

    def __init__(self, thread: str) -> None:
        self.thread = thread
        self._reported: dict[str, set[tuple[str, str, int | None]]] = {}

    def run(self, step: str, action: Callable[..., object], *args: object) -> bool:
        """``action(*args)``; False if it raised, the failure being logged (once, as above)."""
        try:
            action(*args)
        except Exception as error:
            self._report(step, error)
            return False
        self._reported.pop(step, None)
        return True

    def _report(self, step: str, error: Exception) -> None:
        place = traceback.extract_tb(error.__traceback__)[-1]
        failure = (type(error).__name__, place.filename, place.lineno)
        reported = self._reported.setdefault(step, set())
        if failure not in reported:
            reported.add(failure)
            log.error("%s thread: %s failed; the thread goes on (this failure is not logged "
                      "again until the step has worked)", self.thread, step, exc_info=error)


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
    this way; the ``logging`` module, dearer per line (a record, a lock, a
    write), keeps the rest.
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
        guard = LoopGuard("line writer")
        while not self._stopped.wait(self._interval):
            guard.run("writing the request log", self.flush)

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


def write_atomically(path: str, data: bytes, keep_owner: bool = False) -> None:
    """Write a file so that a crash leaves either the old or the new version, never a mix.

    With ``keep_owner`` the new version keeps the old one's mode and owner (a keys
    file edited by root must stay readable by the proxy's user), and a symbolic
    link is followed rather than replaced.
    """
    if keep_owner:
        path = os.path.realpath(path)
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=".llm_proxy-", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            if keep_owner:
                _copy_owner(path, file.fileno())
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


# What a state file's content can raise, however it was damaged (a JSON value of any shape).
BROKEN_STATE = (OSError, ValueError, ArithmeticError, RecursionError, KeyError, TypeError,
                AttributeError)


class ProxyServer(TrackedServer):
    """The proxy: keys, buckets, the fair gate and the upstream pool, plus housekeeping.

    A housekeeping thread re-reads KEYS_FILE when it changes, forgets full
    buckets and saves the rest to STATE_FILE every STATE_SAVE_SECONDS.
    """

    SHUTDOWN_GRACE = 5.0  # seconds the requests running at shutdown have to end before the last save

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, console: TextIO | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        if not config.upstream_url and not config.models_file:
            raise ConfigError("BASE_API_URL is not set: point it at the model server, "
                              "e.g. http://127.0.0.1:8080/v1 (or run with --demo)")
        self.config = config
        self.max_connections = config.max_connections
        self.max_connections_per_client = config.max_connections_per_client
        self.wall_clock = wall_clock
        self.keyring = KeyRing(config)
        self.models_file = ModelsFile(config.models_file)
        self.buckets = BucketStore(clock, wall_clock)
        self.usage = UsageBook()
        self.stored = StoredAnswers()
        self.metrics = Metrics()
        self.upstreams = UpstreamRegistry(config, environ, clock)
        self.admin = AdminView(config, self.keyring, self.buckets, self.usage, self.metrics,
                               self.upstreams, self.models_file, wall_clock)
        self.alerts = AlertWatch(config.alert_thresholds, AlertSender(config.alert_webhook_url),
                                 wall_clock, self.admin.currency) if config.alert_webhook_url else None
        self.admin.alerts = self.alerts
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
        self.workers = Workers()
        self.loop = ConnectionLoop(config, self.serve_in_thread, self.shutdown_request)
        self._reading: dict[socket.socket, float] = {}  # connection -> when its request must be in
        self._wake = threading.Event()
        self._closing = False
        self._reload_requested = False
        self._housekeeper = threading.Thread(target=self._housekeeping, name="housekeeping",
                                             daemon=True)
        self._housekeeper.start()

    # -- connections -----------------------------------------------------------

    spare_descriptors = 32  # listening socket, selectors and their wake-ups, stdio, logs, state, keys

    def descriptors_needed(self, connections: int) -> int:
        """Descriptors open at most with ``connections`` clients: each may hold an upstream one too."""
        return 2 * connections + self.upstreams.idle_connections + self.spare_descriptors

    def fit_to_descriptor_limit(self) -> list[str]:
        """Raise the open-file limit, and lower max_connections to fit it; a warning if it had to.

        Past the limit, accept() fails: the client that finds it so gets a 503 all the
        same (``refuse_without_descriptors``), but a connection admitted under the cap
        may still find no descriptor for its upstream. Fitting the cap to the limit
        keeps the promise MAX_CONNECTIONS makes: every admitted client can be served.
        """
        wanted = self.max_connections
        limit = raise_descriptor_limit(self.descriptors_needed(wanted))
        if limit is None or limit >= self.descriptors_needed(wanted):
            return []
        fitting = max(1, (limit - self.descriptors_needed(0)) // 2)
        self.max_connections = fitting
        return [f"MAX_CONNECTIONS lowered from {wanted} to {fitting}: this process may open "
                f"{limit} files (RLIMIT_NOFILE), and each connection may need two (its own and "
                f"its upstream's) besides {self.descriptors_needed(0)} kept for the upstream pool "
                "and the proxy itself; raise the limit (ulimit -n, systemd's LimitNOFILE) to "
                "allow more"]

    def get_request(self) -> tuple[socket.socket, tuple]:
        """Each client connection gets CLIENT_TIMEOUT on every read and write, kept by the kernel."""
        sock, address = super().get_request()
        sock = TimedSocket.adopt(sock, self.config.client_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # once, not per handler
        return sock, address

    def start_connection(self, request: socket.socket, client_address: tuple) -> None:
        """A connection whose request is not here yet waits in the connection loop, not a thread."""
        if _readable_now(request):
            self.serve_in_thread(request, client_address)
        else:
            self.loop.park(request, client_address)

    def serve_in_thread(self, connection: socket.socket, address: tuple,
                        handler: ProxyHandler | None = None) -> None:
        """A thread for ``connection``; ``handler`` goes on with a connection whose stream ended."""
        self.workers.submit(self.process_request_thread, connection, address, handler)

    def process_request_thread(self, request: socket.socket, client_address: tuple,
                               handler: ProxyHandler | None = None) -> None:
        """socketserver's, except that the connection may live on in the loop with its stream."""
        relayed = None
        try:
            if handler is None:
                handler = self.RequestHandlerClass(request, client_address, self)
            else:
                handler.resume()
            relayed = handler.relayed
        except Exception:
            self.handle_error(request, client_address)
        finally:
            if relayed is not None:
                self.loop.relay(relayed)
            else:
                self.shutdown_request(request)

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
        """Re-read KEYS_FILE and MODELS_FILE soon (SIGHUP); safe to call from a signal handler."""
        self._reload_requested = True
        self._wake.set()

    def _housekeeping(self) -> None:
        """Each task on its own: one that fails must not stop the others, or itself next time."""
        guard = LoopGuard("housekeeping")
        next_tidy = time.monotonic() + self.config.state_save_interval
        while True:
            self._wake.wait(min(1.0, self.config.state_save_interval))
            self._wake.clear()
            if self._closing:
                return
            forced, self._reload_requested = self._reload_requested, False
            guard.run("re-reading KEYS_FILE", self.keyring.reload_if_changed, forced)
            guard.run("re-reading MODELS_FILE", self.models_file.reload_if_changed, forced)
            guard.run("re-reading MODELS_FILE", self.upstreams.reload_if_changed, forced)
            guard.run("ending requests that arrive too slowly", self.drop_slow_requests)
            if time.monotonic() >= next_tidy:
                guard.run("forgetting full buckets and saving STATE_FILE", self.tidy)
                next_tidy = time.monotonic() + self.config.state_save_interval

    def tidy(self) -> None:
        """Forget buckets that are full again, then save the others if STATE_FILE is set."""
        self.buckets.prune(lambda identity: self.keyring.policy_of(identity).buckets)
        if self.alerts is not None:
            self.alerts.prune(self.buckets, lambda identity: self.keyring.policy_of(identity).buckets)
        if self.config.state_file:
            self.save_state()

    def save_state(self) -> None:
        path = self.config.state_file
        assert path is not None
        state = {"version": 1, "saved_at": self.wall_clock(),
                 "buckets": self.buckets.dump(self.wall_clock), "usage": self.usage.dump(),
                 "stored_answers": self.stored.dump(),
                 "alerts": self.alerts.dump() if self.alerts is not None else []}
        try:
            write_atomically(path, json_bytes(state))
        except OSError as error:
            log.error("STATE_FILE %s: cannot save (%s)", path, error.strerror)

    def load_state(self) -> None:
        """Restore saved buckets and usage history; a missing or broken file means starting clean.

        The two sections are restored each on its own, and each says how it went:
        a broken history must neither cost the buckets nor be reported as if it had.
        """
        path = self.config.state_file
        try:
            with open(path, "rb") as file:
                state = json.loads(file.read())
            if state.get("version") != 1:
                raise ValueError("unknown version")
        except FileNotFoundError:
            log.info("STATE_FILE %s: not found; every bucket starts full", path)
            return
        except BROKEN_STATE as error:
            log.error("STATE_FILE %s: unreadable (%s); every bucket starts full",
                      path, type(error).__name__)
            return
        self._restore_buckets(path, state)
        self._restore_usage(path, state)
        self._restore_stored_answers(path, state)
        self._restore_alerts(path, state)

    def _restore_buckets(self, path: str, state: dict) -> None:
        try:
            self.buckets.load(state["buckets"], self.wall_clock)
        except BROKEN_STATE as error:
            log.error("STATE_FILE %s: buckets unreadable (%s); every bucket starts full",
                      path, type(error).__name__)
        else:
            log.info("STATE_FILE %s: restored %d callers' buckets", path, len(self.buckets))

    def _restore_usage(self, path: str, state: dict) -> None:
        try:
            self.usage.load(state.get("usage", {}))
        except BROKEN_STATE as error:
            log.error("STATE_FILE %s: usage history unreadable (%s); starting empty",
                      path, type(error).__name__)

    def _restore_stored_answers(self, path: str, state: dict) -> None:
        try:
            self.stored.load(state.get("stored_answers", {}))
        except BROKEN_STATE as error:
            log.error("STATE_FILE %s: stored answers' owners unreadable (%s); each key's stored "
                      "answers are found again only once it makes new ones", path, type(error).__name__)

    def _restore_alerts(self, path: str, state: dict) -> None:
        if self.alerts is None:
            return
        try:
            self.alerts.load(state.get("alerts", []))
        except BROKEN_STATE as error:
            log.error("STATE_FILE %s: alert marks unreadable (%s); a window past a threshold "
                      "may be told again", path, type(error).__name__)

    def server_close(self) -> None:
        """Stop everything, then save the buckets a last time."""
        self._closing = True
        self._wake.set()
        self._housekeeper.join()
        self.loop.close()
        super().server_close()
        self.workers.close()
        # The connections are shut: requests still running end now, settling their charges
        # and counting in the history, which the last save below must hold (the watcher,
        # still running, aborts what waits on the upstream).
        if not self.workers.wait(self.SHUTDOWN_GRACE):
            log.warning("stopping with requests still running; their settlement is not saved")
        self.watcher.close()
        self.upstreams.close()
        if self.config.state_file:
            self.tidy()
        if self.alerts is not None:
            self.alerts.sender.close()
        self.console.close()
        if self.access_log is not None:
            self.access_log.close()


# --------------------------------------------------------------------------
# Demo model
# --------------------------------------------------------------------------

class EchoModelHandler(BaseHTTPRequestHandler):
    """A tiny model server that echoes the last user message, in every dialect the proxy meters.

    It lets ``--demo`` show the whole flow without a model server (each README
    recipe works against it), and serves as a fast upstream for the benchmark.
    Its answers are built by the same ``Dialect`` classes as the limit replies.
    ``word_delay`` paces streamed words.
    """

    protocol_version = "HTTP/1.1"
    word_delay = 0.05

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        path = self.path.partition("?")[0].rstrip("/")
        if path.endswith("/models"):
            self.reply(model_list(["echo"]))
        elif path == "/api/tags":
            self.reply(ollama_tags(["echo"]))
        elif path == "/api/version":
            self.reply({"version": __version__})
        else:
            self.reply(OPENAI.error_body(ProxyError(404, "not found")), 404)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            payload = json.loads(self.rfile.read(length))
        except ValueError:
            payload = {}
        payload = payload if isinstance(payload, dict) else {}
        path = self.path.partition("?")[0].rstrip("/")
        model = payload.get("model") or "echo"
        prompt = last_user_text(payload)
        if path == "/v1/messages/count_tokens":
            self.reply({"input_tokens": math.ceil(len(prompt) / 4)})
        elif path in ECHO_EMBEDDINGS:
            self.reply(ECHO_EMBEDDINGS[path](model, math.ceil(len(prompt) / 4)))
        elif (dialect := route_for(path.lower(), "POST").dialect) in DIALECTS:  # a metered API
            self.answer(dialect, model, prompt, payload)
        else:
            self.reply(OPENAI.error_body(ProxyError(404, "not found")), 404)

    def answer(self, dialect: Dialect, model: str, prompt: str, payload: dict) -> None:
        text = "echo: " + prompt
        usage = Usage(math.ceil(len(prompt) / 4), math.ceil(len(text) / 4))
        if not dialect.is_stream(payload):
            self.reply(dialect.reply(model, text, usage))
            return
        reported = usage if dialect.usage_in_stream(payload) else None
        self.send_response(200)
        self.send_header("Content-Type", dialect.framing.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        words = text.split(" ")
        pieces = [word if index == 0 else " " + word for index, word in enumerate(words)]
        for event in dialect.reply_stream(model, pieces, reported):
            self.chunk(event)
            if self.word_delay:
                time.sleep(self.word_delay / 2)  # about two events per word
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


ECHO_EMBEDDINGS: dict[str, Callable[[str, int], dict]] = {
    "/v1/embeddings": lambda model, tokens: {
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0]}],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
    "/api/embed": lambda model, tokens: {
        "model": model, "embeddings": [[0.0, 0.5, 1.0]], "prompt_eval_count": tokens},
    "/api/embeddings": lambda model, tokens: {"embedding": [0.0, 0.5, 1.0]},
}


def last_user_text(payload: dict) -> str:
    """The text of the last user turn, in whichever shape the dialect carries it."""
    for name in ("messages", "input"):
        turns = payload.get(name)
        if isinstance(turns, str):
            return turns
        if isinstance(turns, list):
            for turn in reversed(turns):
                if isinstance(turn, dict) and turn.get("role") == "user":
                    return _plain_text(turn.get("content"))
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    text = payload.get("input")
    return text if isinstance(text, str) else ""


def _plain_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks: {"type": "text" | "input_text", "text": ...}
        return " ".join(block["text"] for block in content
                        if isinstance(block, dict) and isinstance(block.get("text"), str))
    return ""


def start_echo_model(word_delay: float = 0.05) -> TrackedServer:
    """Serve the echo model on a free loopback port, in a background thread."""
    handler = type("EchoModel", (EchoModelHandler,), {"word_delay": word_delay})
    server = TrackedServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="echo-model", daemon=True).start()
    return server


# --------------------------------------------------------------------------
# Keys without hand-editing: the `keys` command
# --------------------------------------------------------------------------

def entry_spans(text: str) -> list[tuple[str, int, int, int]]:
    """Each top-level entry of a keys file: its key, where its key starts, where its value starts and ends.

    Edits splice text at these places, so the other entries keep their formatting.
    """
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    position = whitespace.match(text, 0).end()
    if text[position:position + 1] != "{":
        raise ConfigError("must be a JSON object mapping each client key to its settings")
    position = whitespace.match(text, position + 1).end()
    spans = []
    while text[position:position + 1] != "}":
        if spans:
            if text[position:position + 1] != ",":
                raise ConfigError("not valid JSON (expected a comma between entries)")
            position = whitespace.match(text, position + 1).end()
        if text[position:position + 1] != '"':
            raise ConfigError("not valid JSON (expected a key)")
        key, after_key = decoder.raw_decode(text, position)  # a string: it starts with a quote
        colon = whitespace.match(text, after_key).end()
        if text[colon:colon + 1] != ":":
            raise ConfigError("not valid JSON (expected a colon)")
        value_start = whitespace.match(text, colon + 1).end()
        _, value_end = decoder.raw_decode(text, value_start)
        spans.append((key, position, value_start, value_end))
        position = whitespace.match(text, value_end).end()
    return spans


def _copy_owner(path: str, descriptor: int) -> None:
    try:
        old = os.stat(path)
    except FileNotFoundError:
        return
    os.fchmod(descriptor, old.st_mode & 0o7777)
    if hasattr(os, "fchown"):
        with suppress(PermissionError):  # only root may give a file away
            os.fchown(descriptor, old.st_uid, old.st_gid)


class KeyNotFound(ConfigError):
    """No entry has the name asked for (a 404 over HTTP)."""


class NameInUse(ConfigError):
    """A new entry would share its name with another, or an edit of one entry finds several
    (a 409 over HTTP)."""


KEY_ERROR_STATUS = {KeyNotFound: 404, NameInUse: 409}  # over HTTP; any other ConfigError: 400
KEY_PERIODS = ("total", "day", "week", "month")
TOKEN_LIMITS = ("max_tokens", "refill_tokens", "refill_interval_seconds")
BUDGET_WINDOW = "budget"  # the name ``--budget`` gives the money window it writes


def new_key() -> str:
    return "sk-" + secrets.token_urlsafe(24)


def hashed_key(key: str) -> str:
    """What the keys file stores for a key written by this command: never the key itself."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_entry_id() -> str:
    """An entry's id: random and no secret, and never 32 characters like a key's digest, so
    an identity made of it is never another entry's."""
    return secrets.token_hex(8)


def checked_name(name: object, where: str = "") -> str:
    """A key's name without the spaces around it (a carriage return ending a line of a roster
    saved on Windows among them); refused when empty or holding a control character."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}the name is empty")
    if not name.strip().isprintable():
        raise ConfigError(f"{where}the name {name!r} contains a control character")
    return name.strip()


def budget_window(amount: float, period: str = "total") -> dict:
    """The money window ``--budget`` writes: ``period`` "total" never refills."""
    return {"name": BUDGET_WINDOW, "unit": "money", "max_amount": amount, "period": period}


def _is_money(window: object) -> bool:
    return isinstance(window, dict) and window.get("unit") == "money"


def new_entry(name: str, options: dict) -> dict:
    """A keys-file entry for a new key: its name, id and limits (from ``keys add`` or
    ``import``, or ``POST /admin/api/keys``).

    Token limits without a budget or period stay at the entry's top level, as they
    always were; with ``budget`` the entry's windows are the budget and, if token
    limits are given too, a token window beside it.
    """
    entry: dict = {"name": name, "id": new_entry_id()}
    if options.get("email"):
        entry["email"] = options["email"]
    tokens = {field_name: options[field_name] for field_name in TOKEN_LIMITS if field_name in options}
    budget, period = options.get("budget"), options.get("period")
    if budget is None and period is None:
        entry.update(tokens)
    else:
        windows = [budget_window(budget, period or "total")] if budget is not None else []
        if tokens or budget is None:
            windows.append(dict({"name": "tokens"}, **tokens, **(
                {"period": period} if budget is None else {})))
        entry["buckets"] = windows
    return changed_entry(entry, {k: v for k, v in options.items()
                                 if k in ("models", "endpoints", "max_concurrent", "expires")})


def changed_entry(entry: dict, options: dict) -> dict:
    """``entry`` with the ``keys set`` options applied (a copy); what is not named stays.

    ``window`` names the window to change; without it ``budget`` changes the money
    window (added if the key has none) and token limits the one window that counts
    tokens (or the entry's own, without windows).  An empty ``models``, ``endpoints`` or
    ``expires`` removes the restriction (an empty ``email``, the email).
    """
    entry = copy.deepcopy(entry)
    for field_name in ("models", "endpoints", "expires", "email"):
        if field_name in options:
            if options[field_name]:
                entry[field_name] = options[field_name]
            else:
                entry.pop(field_name, None)
    if "max_concurrent" in options:
        entry["max_concurrent"] = options["max_concurrent"]
    money = {"max_amount": options["budget"]} if "budget" in options else {}
    tokens = {field_name: options[field_name] for field_name in TOKEN_LIMITS if field_name in options}
    if "period" in options:
        (money if money else tokens)["period"] = options["period"]
    if options.get("window"):
        _change_window(_named_window(entry, options["window"]), {**money, **tokens})
        return entry
    if money:
        _change_window(_money_window(entry, create=True), money)
    if tokens:
        _change_window(_token_window(entry, tokens), tokens)
    return entry


def _named_window(entry: dict, name: str) -> dict:
    windows = entry.get("buckets")
    found = [w for w in windows if isinstance(w, dict) and w.get("name") == name] if isinstance(
        windows, list) else []
    if len(found) != 1:
        raise ConfigError(f"{entry.get('name')!r} has {'no' if not found else 'several'} "
                          f"windows named {name!r}")
    return found[0]


def _money_window(entry: dict, create: bool = False) -> dict:
    """The key's one money window; with ``create``, a new budget window when it has none (the
    window it had so far, ``{}``, keeps counting beside it)."""
    windows = entry.setdefault("buckets", [{}]) if create else entry.get("buckets", [])
    money = [window for window in windows if _is_money(window)]
    if len(money) > 1:
        raise ConfigError(f"{entry.get('name')!r} has {len(money)} money windows: say which with --window")
    if money:
        return money[0]
    if not create:
        raise ConfigError(f"{entry.get('name')!r} has no money window")
    windows.append({"name": BUDGET_WINDOW, "unit": "money", "period": "total"})
    return windows[-1]


def _token_window(entry: dict, changes: dict) -> dict:
    """The window token limits change: the entry itself when it has no windows (unless a
    period is set: only a window has one), else its one window that is not money."""
    if "buckets" not in entry:
        if "period" not in changes:
            return entry
        entry["buckets"] = [{}]
    others = [window for window in entry["buckets"] if not _is_money(window)]
    if len(others) != 1:
        raise ConfigError(f"{entry.get('name')!r} has {len(others)} token windows: "
                          "say which with --window")
    return others[0]


def _change_window(window: dict, changes: dict) -> None:
    if "max_amount" in changes and not _is_money(window):
        raise ConfigError("a budget is set on a money window; this one counts tokens or requests")
    if set(changes) & set(TOKEN_LIMITS) and _is_money(window):
        raise ConfigError("token limits are set on a token window; this one counts money")
    window.update(changes)


def raised_limit(entry: dict, amount: float, window_name: str | None, config: Config) -> tuple[dict, str]:
    """``entry`` with one window's limit raised by ``amount`` (a copy), and the new limit.

    The window is ``window_name``, else the money window, else the only one.  The
    buckets keep what was spent when a limit changes, so on a ``total`` window this
    is exactly a top-up; on a refilling one it raises the limit itself.
    """
    entry = copy.deepcopy(entry)
    if window_name:
        window = _named_window(entry, window_name)
    elif any(_is_money(w) for w in entry.get("buckets", [])):
        window = _money_window(entry)
    elif len(entry.get("buckets", [{}])) == 1:
        window = entry if "buckets" not in entry else entry["buckets"][0]
    else:
        raise ConfigError(f"{entry.get('name')!r} has {len(entry['buckets'])} windows: "
                          "say which with --window")
    if _is_money(window):
        limit = window.get("max_amount", 0)
        window["max_amount"] = float(decimal_sum(limit, amount))
        return entry, f"{window['max_amount']:g}"
    if amount != int(amount):
        raise ConfigError("a token window is topped up by a whole number of tokens")
    limit = window.get("max_tokens", entry.get("max_tokens", config.max_tokens))
    window["max_tokens"] = int(limit) + int(amount)
    return entry, f"{window['max_tokens']} tokens"


def decimal_sum(first: object, second: object) -> float:
    """``first + second`` as a person adds amounts: 1.1 + 0.2 is 1.3, not 1.3000000000000003."""
    import decimal  # only the keys command adds amounts
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        raise ConfigError("the window's max_amount is not a number")
    return float(decimal.Decimal(repr(first)) + decimal.Decimal(repr(second)))


class RosterRow(NamedTuple):
    line: int
    name: str
    email: str | None


def read_roster(path: str) -> list[RosterRow]:
    """The names (and emails) of a class roster: a CSV file with a ``name`` column.

    Saved by a spreadsheet on any system: a UTF-8 byte order mark, CRLF line ends
    and spaces around values are taken away; an empty row is skipped.  An empty
    name, a control character or a name given twice is refused, naming the line.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            reader = csv.reader(file)
            rows: list[tuple[int, list[str]]] = []
            line = 1
            for row in reader:
                rows.append((line, [cell.strip() for cell in row]))
                line = reader.line_num + 1
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (save the roster as CSV UTF-8)") from None
    except csv.Error as error:
        raise ConfigError(f"{path} line {line}: {error}") from None
    rows = [(line, row) for line, row in rows if any(row)]
    if not rows:
        raise ConfigError(f"{path}: empty; it needs a header line with a 'name' column")
    columns = [cell.lower() for cell in rows[0][1]]
    if "name" not in columns:
        raise ConfigError(f"{path} line {rows[0][0]}: no 'name' column in the header")
    name_at = columns.index("name")
    email_at = columns.index("email") if "email" in columns else None
    roster: list[RosterRow] = []
    seen: dict[str, int] = {}
    for line, row in rows[1:]:
        where = f"{path} line {line}: "
        name = checked_name(row[name_at] if name_at < len(row) else "", where)
        if name in seen:
            raise NameInUse(f"{where}the name {name!r} is on line {seen[name]} already")
        seen[name] = line
        email = row[email_at] if email_at is not None and email_at < len(row) else ""
        if not email.isprintable():
            raise ConfigError(f"{where}the email {email!r} contains a control character")
        roster.append(RosterRow(line, name, email or None))
    return roster


def write_key_list(path: str, rows: Sequence[tuple[str, str]]) -> None:
    """``name,key`` lines in a new file made with mode 0600, so no other user can read it at
    any moment; a file already there is never overwritten (it may hold keys still in use)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as file:
            os.fchmod(file.fileno(), 0o600)  # whatever the umask allowed, never more
            writer = csv.writer(file, lineterminator="\n")
            writer.writerow(("name", "key"))
            writer.writerows(rows)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with suppress(OSError):
            os.unlink(path)
        raise


class KeysFile:
    """Edits KEYS_FILE in place: one entry changes, the rest stays as the owner wrote it.

    Every write is atomic (a temporary file renamed over the old one), so the
    running proxy, which re-reads the file within a second, never sees half of it.
    """

    def __init__(self, path: str, config: Config) -> None:
        self.path = path
        self.config = config
        try:
            with open(path, encoding="utf-8") as file:
                self.text = file.read()
        except FileNotFoundError:
            self.text = "{\n}\n"
        self.entries = keys_document(self.text)  # first: malformed text is a ConfigError, said plainly
        self.spans = entry_spans(self.text)  # and anything but an object is refused here

    def name_of(self, stored: str) -> str | None:
        """The name of the entry stored under ``stored``, if it has one that is a string."""
        entry = self.entries[stored]
        name = entry.get("name") if isinstance(entry, dict) else None
        return name if isinstance(name, str) else None

    def id_of(self, stored: str) -> str | None:
        entry = self.entries[stored]
        entry_id = entry.get("id") if isinstance(entry, dict) else None
        return entry_id if isinstance(entry_id, str) else None

    def find(self, name: str) -> list[tuple[str, int, int, int]]:
        """Every entry called ``name`` (else the one whose id it is), in file order: ``add``
        refuses a second name, but a hand edit may not."""
        found = [span for span in self.spans if self.name_of(span[0]) == name]
        found = found or [span for span in self.spans if self.id_of(span[0]) == name]
        if not found:
            raise KeyNotFound(f"no key named {name!r} in {self.path}")
        return found

    def find_one(self, name: str) -> tuple[str, int, int, int]:
        """The entry called ``name``, for the edits that make sense for one key only."""
        found = self.find(name)
        if len(found) > 1:
            raise NameInUse(f"{len(found)} keys are named {name!r}: use the id of one of them "
                            "(keys list shows it)")
        return found[0]

    def names(self) -> set[str | None]:
        return {self.name_of(stored) for stored in self.entries}

    def require_new_name(self, name: str, where: str = "", names: set | None = None) -> None:
        if name in (self.names() if names is None else names):
            raise NameInUse(f"{where}a key named {name!r} exists already in {self.path}")

    def add(self, entry: dict) -> str:
        """A new random key for ``entry``; only its SHA-256 is stored.  Returns the key."""
        key = self.insert([entry])[0]
        self.write()  # (``insert`` checked the file)
        return key

    def insert(self, entries: Sequence[dict]) -> list[str]:
        """New entries with new keys, at the end, checked but not yet saved; returns the keys."""
        names = self.names()
        for entry in entries:
            self.require_new_name(entry["name"], names=names)
            names.add(entry["name"])
            _policy_from_entry(entry, self.config, f"key {entry['name']}", require_secrets=False)
        keys = [new_key() for _ in entries]
        stored = [f'"{hashed_key(key)}": {json.dumps(entry)}' for key, entry in zip(keys, entries)]
        if self.spans:
            last_end = self.spans[-1][3]
            indent = self._indent()
            added = "".join(f",\n{indent}{line}" for line in stored)
            self.text = self.text[:last_end] + added + self.text[last_end:]
        else:
            close = self.text.rindex("}")
            self.text = self.text[:close].rstrip() + "\n  " + ",\n  ".join(stored) + "\n" + self.text[close:]
        self.check()
        return keys

    def update(self, name: str, **changes: object) -> int:
        """Change every entry called ``name`` (disabling one of two "bob"s would leave a bob
        working); returns how many there were."""
        found = self.find(name)
        for key, _, start, end in reversed(found):  # from the last: earlier offsets stay valid
            value = dict(self.entries[key], **changes)
            self.text = self.text[:start] + json.dumps(value) + self.text[end:]
        self.save()
        return len(found)

    def replace(self, name: str, change: Callable[[dict], dict]) -> dict:
        """Give the one entry called ``name`` the value ``change`` makes of it; returns that."""
        key, _, start, end = self.find_one(name)
        value = change(self.entries[key])
        self.text = self.text[:start] + json.dumps(value) + self.text[end:]
        self.save()
        return value

    def rotate(self, name: str) -> tuple[str, dict]:
        """A new key for the entry called ``name``; the old one stops working.

        Buckets and history are kept under the entry's id; an entry that has none (older
        than ids) gets its old key's digest as its id, which is where they were kept.
        """
        stored, key_start, value_start, value_end = self.find_one(name)
        entry = self.entries[stored]
        if not isinstance(entry, dict):
            raise ConfigError(f"the entry named {name!r} is not an object")
        if "id" not in entry:
            entry = dict(entry, id=stored_secret(stored)[0])
        key = new_key()
        self.text = (self.text[:key_start] + f'"{hashed_key(key)}": ' + json.dumps(entry)
                     + self.text[value_end:])
        self.save()
        return key, entry

    def remove(self, name: str) -> int:
        """Remove every entry called ``name``; returns how many there were."""
        count = len(self.find(name))
        for _ in range(count):
            self._cut(self.spans.index(self.find(name)[0]))
            self.spans = entry_spans(self.text)  # the cut moved every entry after it
        self.save()
        return count

    def _cut(self, index: int) -> None:
        """Take entry ``index`` out of the text, with the comma that separated it."""
        _, key_start, _, value_end = self.spans[index]
        if index > 0:  # from the end of the previous entry, taking its comma
            self.text = self.text[:self.spans[index - 1][3]] + self.text[value_end:]
        elif len(self.spans) > 1:  # the first of several: up to the next entry's key
            self.text = self.text[:key_start] + self.text[self.spans[1][1]:]
        else:
            self.text = self.text[:key_start].rstrip() + "\n" + self.text[value_end:].lstrip()

    def _indent(self) -> str:
        line_start = self.text.rfind("\n", 0, self.spans[-1][1]) + 1
        indent = self.text[line_start:self.spans[-1][1]]
        return indent if not indent.strip() else "  "

    def check(self) -> None:
        """Never write a file the proxy would refuse; the JWT secrets live in the proxy's
        environment, which need not be this shell's."""
        parse_keys_file(self.text, self.config, require_secrets=False)
        self.entries = keys_document(self.text)
        self.spans = entry_spans(self.text)

    def save(self) -> None:
        self.check()
        self.write()

    def write(self) -> None:
        write_atomically(self.path, self.text.encode("utf-8"), keep_owner=True)


def keys_command(args: argparse.Namespace, environ: dict[str, str]) -> int:
    """``keys add|import|list|set|topup|rotate|disable|enable|remove``: manage KEYS_FILE
    without editing JSON by hand."""
    try:
        config = Config.from_env(environ)
        path = args.file or config.keys_file
        if not path:
            raise ConfigError("set KEYS_FILE (or pass --file) to say which keys file to edit")
        with edit_lock(path):  # two edits at once would each write the file without the other's
            return keys_action(args, path, config)
    except BrokenPipeError:  # `keys list | head`: the reader has all it wanted
        return closed_output()
    except (ConfigError, OSError, ValueError) as error:
        print(f"llm_proxy keys: {error}", file=sys.stderr)
        return 2


def closed_output() -> int:
    """End quietly, as other commands do when whoever reads their output stops reading.

    Python would otherwise report the broken pipe once more while flushing stdout at
    exit; the status is the shell's for a command ended by SIGPIPE.
    """
    with suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 128 + getattr(signal, "SIGPIPE", 13)


@contextmanager
def edit_lock(path: str) -> Iterator[None]:
    """An exclusive lock on ``path``'s sidecar ``.lock`` file, held for one read-change-write."""
    with open(os.path.realpath(path) + ".lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


# The options that set a key's limits: the command's --dashed names, the HTTP API's fields.
KEY_OPTIONS: dict[str, tuple[Callable[[str], object], str]] = {
    "budget": (float, "money the key may spend in each period (a money window named 'budget')"),
    "period": (str, "the budget's period: total (never refills), day, week or month"),
    "max_tokens": (int, "tokens the key's window holds"),
    "refill_tokens": (int, "tokens added back at each refill"),
    "refill_interval_seconds": (float, "seconds between refills"),
    "models": (str, "comma-separated model names this key may use (set: '' for every model)"),
    "endpoints": (str, "comma-separated endpoints this key may use, as the keys file's \"endpoints\" "
                       "(set: '' for the usual ones)"),
    "max_concurrent": (int, "requests at once, 0 for no limit"),
    "expires": (str, "last day the key works, YYYY-MM-DD (set: '' for never)"),
}


WINDOW_OPTION = (str, "the window to change, by name (default: the money window, else the only one)")
EXTRA_OPTIONS = {"window": WINDOW_OPTION, "email": (str, "the key holder's email, kept in the entry")}


def add_key_options(parser: argparse.ArgumentParser, *extra: str) -> None:
    for name in (*KEY_OPTIONS, *extra):
        kind, text = KEY_OPTIONS.get(name) or EXTRA_OPTIONS[name]
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text,
                            **({"choices": KEY_PERIODS} if name == "period" else {}))


def key_options(values: dict, allowed: Sequence[str]) -> dict:
    """The key options given (from the command line, or a JSON body), checked and in the
    shape the keys file wants; ConfigError names the first that is wrong."""
    options = {}
    for name, value in values.items():
        if name not in allowed:
            raise ConfigError(f"unknown field {name!r}; known: {', '.join(allowed)}")
        if value is None and name not in ("models", "endpoints", "expires"):
            continue
        options[name] = _key_option(name, value)
    return options


def _key_option(name: str, value: object) -> object:
    if name in ("models", "endpoints"):  # "a,b" on the command line, a list in JSON
        names = value.split(",") if isinstance(value, str) else ([] if value is None else value)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{name} must be a list of {name[:-1]} names")
        names = [n.strip() for n in names if n.strip()]
        if name == "endpoints":
            if isinstance(value, list) and not names:  # (in the file, [] closes every API)
                raise ConfigError("endpoints: an empty list would close every API; send null "
                                  "(or '' on the command line) for the usual ones")
            _endpoint_names(names, "endpoints")  # a misspelt one is refused before it is written
        return names
    if name in ("expires", "email", "window", "period"):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string")
        text = (value or "").strip()
        if name == "period" and text not in KEY_PERIODS:
            raise ConfigError(f"period must be one of {', '.join(KEY_PERIODS)}")
        if not text.isprintable():
            raise ConfigError(f"the {name} contains a control character")
        return text
    whole = name in ("max_tokens", "refill_tokens", "max_concurrent")
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{name} must be a {'whole number' if whole else 'number'}")
    if name in ("budget", "amount") and value <= 0:
        raise ConfigError(f"{name} must be more than 0")
    return value


def keys_action(args: argparse.Namespace, path: str, config: Config) -> int:
    return KEY_ACTIONS[args.action](args, KeysFile(path, config), config)


def _options_of(args: argparse.Namespace, *extra: str) -> dict:
    names = (*KEY_OPTIONS, *extra)
    return key_options({name: getattr(args, name) for name in names if getattr(args, name) is not None},
                       names)


def _add_action(args: argparse.Namespace, keys: KeysFile, config: Config) -> int:
    name = checked_name(args.name)
    key = keys.add(new_entry(name, _options_of(args, "email")))
    print(f"added {name!r} to {keys.path}; the key is shown once, here (only its SHA-256 is kept):")
    print(key)
    return 0


def _import_action(args: argparse.Namespace, keys: KeysFile, config: Config) -> int:
    """Every name of a roster gets a key, in one edit: all or none (refused before anything is
    written); the keys go to ``--out`` only."""
    roster = read_roster(args.roster)
    names = keys.names()
    for row in roster:
        keys.require_new_name(row.name, f"{args.roster} line {row.line}: ", names)
    if os.path.lexists(args.out):
        raise ConfigError(f"{args.out} exists already; it may hold keys in use: choose another --out")
    options = _options_of(args)
    made = keys.insert([new_entry(row.name, dict(options, email=row.email)) for row in roster])
    write_key_list(args.out, [(row.name, key) for row, key in zip(roster, made)])
    try:
        keys.write()
    except BaseException:
        with suppress(OSError):
            os.unlink(args.out)
        raise
    print(f"imported {len(roster)} keys into {keys.path}; each key is in {args.out} "
          "(mode 0600) and nowhere else")
    return 0


def _list_action(args: argparse.Namespace, keys: KeysFile, config: Config) -> int:
    sharing = Counter(keys.name_of(stored) for stored in keys.entries)
    for stored, entry in keys.entries.items():
        line, name = describe_entry(stored, entry, config), keys.name_of(stored)
        if name and sharing[name] > 1:  # what disable, enable and remove then act on
            line += f"  one of {sharing[name]} keys named {name!r}"
        print(line)
    sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    return 0


def _switch_action(args: argparse.Namespace, keys: KeysFile, config: Config) -> int:
    count = keys.update(args.name, enabled=args.action == "enable")
    print(f"{args.name}: {args.action}d{_how_many(count)}")
    return 0


def _remove_action(args: argparse.Namespace, keys: KeysFile, config: Config) -> int:
    count = keys.remove(args.name)
    print(f"{args.name}: removed{_how_many(count)}")
    return 0


def _set_action(args: argparse.Namespace, keys: KeysFile, config: Config) -> int:
    options = _options_of(args, "email", "window")
    if not options:
        raise ConfigError("say what to change (keys set --help lists the options)")
    keys.replace(args.name, lambda entry: changed_entry(entry, options))
    print(f"{args.name}: changed; what the key spent so far still counts")
    return 0


def _topup_action(args: argparse.Namespace, keys: KeysFile, config: Config) -> int:
    amount = _key_option("amount", args.amount)
    limits: list[str] = []

    def top_up(entry: dict) -> dict:
        raised, limit = raised_limit(entry, amount, args.window, config)  # type: ignore[arg-type]
        limits.append(limit)
        return raised

    keys.replace(args.name, top_up)
    print(f"{args.name}: limit raised by {amount:g} to {limits[0]}")
    return 0


def _rotate_action(args: argparse.Namespace, keys: KeysFile, config: Config) -> int:
    key, _ = keys.rotate(args.name)
    print(f"{args.name}: new key (the old one stops working when the proxy re-reads the file); "
          "shown once, here:")
    print(key)
    return 0


KEY_ACTIONS: dict[str, Callable[[argparse.Namespace, KeysFile, Config], int]] = {
    "add": _add_action, "import": _import_action, "list": _list_action, "set": _set_action,
    "topup": _topup_action, "rotate": _rotate_action, "disable": _switch_action,
    "enable": _switch_action, "remove": _remove_action,
}


def _how_many(count: int) -> str:
    """Said after an edit of several entries with one name, so that none goes unnoticed."""
    return f" ({count} keys)" if count > 1 else ""


def describe_entry(stored: str, entry: dict, config: Config) -> str:
    """One line of ``keys list``: name and limits, never the key."""
    policy = _policy_from_entry(entry, config, "entry", require_secrets=False)
    windows = ", ".join(map(window_text, policy.buckets))
    state = "enabled" if policy.enabled else "disabled"
    parts = [policy.name or "(no name)", state, windows]
    if policy.expires:
        parts.append(f"expires {policy.expires}")
    if policy.models is not None:
        parts.append("models " + ",".join(policy.models))
    if policy.max_concurrent:
        parts.append(f"max {policy.max_concurrent} at once")
    if policy.id:
        parts.append(f"id {policy.id}")
    parts.append("stored as SHA-256" if stored.startswith("sha256:") else "stored in plain text")
    return "  ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
