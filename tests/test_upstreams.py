"""Several model servers behind one door (issue 21): routing by model, replicas, failover, reload.

Three fake upstreams ("gpu", "gpu2", "mini") and the real proxy, over loopback sockets.  Run by
the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
import unittest
from unittest import mock

import llm_proxy
from test_llm_proxy import (ADMIN_KEY, CLIENT_KEY, WAIT, FakeUpstream, FakeUpstreamHandler,
                            ProxyTestCase, Response, parse_exposition, serve)

MINI_KEY = "sk-mini-SECRET-4242424242"
KEY_VARIABLE = "LLM_PROXY_TEST_MINI_KEY"
SHORT_WAIT = 0.3  # QUEUE_TIMEOUT_SECONDS where a test waits for it to run out


class RunningModelsHandler(FakeUpstreamHandler):
    """The fake upstream, with Ollama's ``GET /api/ps`` in Ollama's shape: the models named in
    its server's ``running`` (none by default); ``running`` None answers 404, as llama-server
    (which has no /api/ps) does."""

    def do_GET(self) -> None:
        if self.path.partition("?")[0] != "/api/ps":
            super().do_GET()
            return
        self.record(b"")
        running = getattr(self.server, "running", [])
        if running is None:
            self.reply(404, {"error": "404 page not found"})
        elif running == TRICKLE:  # a valid answer, a byte at a time, for far longer than a listing waits
            body = json.dumps({"models": [running_entry("gemma3:4b")]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
        elif running == HUGE:  # a valid answer larger than any list of models
            self.reply(200, {"models": [running_entry("gemma3:4b")], "padding": "x" * (5 << 20)})
        else:
            self.reply(200, {"models": [running_entry(name) for name in running]})


TRICKLE, HUGE = "trickle", "huge"  # what a misbehaving server's /api/ps does (its ``running``)


def running_entry(name: str) -> dict:
    """One entry of Ollama's /api/ps, as Ollama writes it."""
    return {"name": name, "model": name, "size": 6591830464,
            "digest": "a2af6cc3eb7fa8be8504abaf9b04e88f17a119ec3f04a3addf55f92841195f5a",
            "details": {"parent_model": "", "format": "gguf", "family": "gemma3",
                        "families": ["gemma3"], "parameter_size": "4.3B",
                        "quantization_level": "Q4_K_M"},
            "expires_at": "2025-10-17T16:47:07.93355-07:00", "size_vram": 5333539264,
            "context_length": 4096}


class LiveHandler(RunningModelsHandler):
    """The fake upstream's handler, its connection kept in view so that a test can cut it."""

    def setup(self) -> None:
        super().setup()
        self.server.live.add(self.connection)  # type: ignore[attr-defined]


def fake_upstream(port: int = 0) -> FakeUpstream:
    server = FakeUpstream(LiveHandler, port)
    server.live = set()  # type: ignore[attr-defined]
    serve(server)
    return server


# One row per API: its path, a body naming ``model`` and the error shape it reads.
API_ROWS = (
    ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "openai"),
    ("completions", "/v1/completions", {"prompt": "hi"}, "openai"),
    ("responses", "/v1/responses", {"input": "hi"}, "openai"),
    ("messages", "/v1/messages", {"max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]},
     "anthropic"),
    ("embeddings", "/v1/embeddings", {"input": "hi"}, "openai"),
    ("ollama chat", "/api/chat", {"stream": False, "messages": [{"role": "user", "content": "hi"}]},
     "ollama"),
    ("ollama generate", "/api/generate", {"stream": False, "prompt": "hi"}, "ollama"),
    ("ollama embed", "/api/embed", {"input": "hi"}, "ollama"),
)


class ManyUpstreamsTestCase(ProxyTestCase):
    """The proxy in front of gpu and gpu2 (replicas of qwen3-coder) and mini (gemma, small*)."""

    sticky = False
    upstream_handler = RunningModelsHandler  # (gpu's: the others are LiveHandler's)

    def setUp(self) -> None:
        super().setUp()  # (self.upstream, its proxy: replaced below)
        self.background: list[threading.Thread] = []
        self.restarted: list[FakeUpstream] = []
        self.gpu = self.upstream
        self.gpu2, self.mini = fake_upstream(), fake_upstream()
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.models_path = os.path.join(directory.name, "models.json")
        patcher = mock.patch.dict(os.environ, {KEY_VARIABLE: MINI_KEY})
        patcher.start()
        self.addCleanup(patcher.stop)
        self.write_models(self.document())
        self.start_many()

    def tearDown(self) -> None:
        """Every fake server and client thread ends before the count of threads is checked."""
        for server in (self.gpu, self.gpu2, self.mini, *self.restarted):
            server.release.set()
        for thread in self.background:
            thread.join(WAIT)
        self.stop_fakes()
        super().tearDown()

    def stop_fakes(self) -> None:
        for server in (self.gpu2, self.mini, *self.restarted):
            server.release.set()
            self.stop(server)

    def document(self, **changes: object) -> dict:
        models = {"qwen3-coder": {"upstream": ["gpu", "gpu2"], "sticky": self.sticky},
                  "gemma-3-4b": {"upstream": "mini", "upstream_model": "gemma3:4b",
                                 "price": {"input": 0.1, "output": 0.2}, "max_output": 100},
                  "small*": {"upstream": "mini"},
                  "*": {"upstream": "gpu"}}
        models.update(changes)
        return {"currency": "EUR",
                "upstreams": {"gpu": {"url": self.gpu.url, "max_concurrent": 4},
                              "gpu2": {"url": self.gpu2.url, "max_concurrent": 4},
                              "mini": {"url": self.mini.url, "max_concurrent": 1,
                                       "api_key_env": KEY_VARIABLE}},
                "models": {name: entry for name, entry in models.items() if entry is not None}}

    def write_models(self, document: dict) -> None:
        with open(self.models_path, "w") as file:
            json.dump(document, file)

    def start_many(self, **overrides: object) -> llm_proxy.ProxyServer:
        settings = dict(upstream_url=None, upstream_key=None, models_file=self.models_path,
                        client_keys=(CLIENT_KEY,), admin_key=ADMIN_KEY, max_tokens=100)
        settings.update(overrides)
        return self.start_proxy(**settings)

    # -- helpers -----------------------------------------------------------------

    def ask(self, model: str, headers: dict | None = None, content: str = "hello",
            **fields: object) -> Response:
        return self.chat(content, headers=headers, model=model, **fields)

    def ask_in_background(self, model: str, headers: dict | None = None, content: str = "hello",
                          **fields: object) -> tuple[threading.Thread, list]:
        answers: list = []
        thread = threading.Thread(target=lambda: answers.append(self.ask(model, headers, content, **fields)))
        thread.start()
        self.background.append(thread)
        return thread, answers

    def count(self, server: FakeUpstream) -> int:
        return sum(1 for request in server.requests if request["method"] == "POST")

    def kill(self, server: FakeUpstream) -> None:
        """The server dies: it stops listening and every connection it has ends at once."""
        server.shutdown()
        server.socket.close()
        for connection in list(server.live):  # type: ignore[attr-defined]
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.release.set()  # (its handler threads end, their writes failing)

    def restart(self, server: FakeUpstream) -> FakeUpstream:
        """A new server on the dead one's port: the same URL answers again."""
        self.stop(server)
        again = fake_upstream(server.server_address[1])
        self.restarted.append(again)
        return again

    def server_named(self, name: str) -> llm_proxy.Upstream:
        return self.proxy.upstreams.table.upstreams[name]

    def admin(self, path: str) -> Response:
        return self.request("GET", path, key=ADMIN_KEY)


class RoutingTests(ManyUpstreamsTestCase):
    def test_every_api_goes_to_the_server_of_the_model_it_names(self) -> None:
        # model -> (server, the model name that server is asked for)
        expected = {"gemma-3-4b": ("mini", "gemma3:4b"), "small-v2": ("mini", "small-v2"),
                    "anything-else": ("gpu", "anything-else")}
        servers = {"gpu": self.gpu, "mini": self.mini}
        for name, path, body, _ in API_ROWS:
            for model, (server_name, asked) in expected.items():
                with self.subTest(name, model=model):
                    server = servers[server_name]
                    before = len(server.requests)
                    response = self.request("POST", path, dict(body, model=model))
                    self.assertEqual(response.status, 200, response.body)
                    self.assertEqual(len(server.requests), before + 1)
                    arrived = server.requests[-1]
                    self.assertEqual(json.loads(arrived["body"])["model"], asked)
                    self.assertTrue(arrived["path"].endswith(path[path.index("/", 1):]))
                    # mini's key goes to mini alone; no client key goes anywhere
                    sent_key = arrived["headers"].get("Authorization")
                    self.assertEqual(sent_key, f"Bearer {MINI_KEY}" if server_name == "mini" else None)
        self.assertEqual(self.count(self.gpu2), 0)

    def test_a_model_no_server_has_is_a_free_404_in_each_shape(self) -> None:
        self.write_models(self.document(**{"*": None}))
        self.start_many()
        for name, path, body, shape in API_ROWS:
            with self.subTest(name):
                response = self.request("POST", path, dict(body, model="no-such-model"))
                self.assertEqual(response.status, 404, response.body)
                error = response.json()
                if shape == "anthropic":
                    self.assertEqual((error["type"], error["error"]["type"]), ("error", "not_found_error"))
                elif shape == "ollama":
                    self.assertIn("no-such-model", error["error"])
                else:
                    self.assertEqual(error["error"]["code"], "model_not_found")
        self.assertEqual(self.request("GET", "/v1/quota").json()["buckets"][0]["tokens"], 100)
        self.assertEqual([self.count(s) for s in (self.gpu, self.gpu2, self.mini)], [0, 0, 0])

    def test_model_lists_merge_every_server_for_the_key(self) -> None:
        ids = [m["id"] for m in self.request("GET", "/v1/models").json()["data"]]
        # the file's names, mini's "small" (small*) and gpu's "upstream-model" (*); gpu's "small"
        # routes to mini, so it is listed once
        self.assertEqual(ids, ["qwen3-coder", "gemma-3-4b", "small", "upstream-model"])
        names = [m["name"] for m in self.request("GET", "/api/tags").json()["models"]]
        self.assertEqual(names, ids)
        self.assertNotIn(MINI_KEY.encode(), self.request("GET", "/v1/models").body)

    def test_a_key_sees_only_its_models_across_servers(self) -> None:
        directory = os.path.dirname(self.models_path)
        keys = os.path.join(directory, "keys.json")
        with open(keys, "w") as file:
            json.dump({CLIENT_KEY: {"name": "ada", "models": ["gemma-3-4b", "upstream-model"]}}, file)
        self.start_many(client_keys=(), keys_file=keys)
        ids = [m["id"] for m in self.request("GET", "/v1/models").json()["data"]]
        self.assertEqual(ids, ["gemma-3-4b", "upstream-model"])


class ReplicaTests(ManyUpstreamsTestCase):
    def test_least_busy_replica_first_then_turns(self) -> None:
        # One long call on one replica: every quick call meanwhile goes to the other (turns
        # alone would send every second one to the busy one).
        self.ask_in_background("qwen3-coder", {"X-Fake": "hold"})
        self.wait_for(lambda: self.count(self.gpu) + self.count(self.gpu2) == 1)
        busy, idle = (self.gpu, self.gpu2) if self.count(self.gpu) else (self.gpu2, self.gpu)
        for _ in range(4):
            self.assertEqual(self.ask("qwen3-coder").status, 200)
            self.wait_for(lambda: self.proxy.upstreams.in_flight == 1)  # (its slot is given back)
        self.assertEqual((self.count(busy), self.count(idle)), (1, 4))
        busy.release.set()
        self.wait_for(lambda: self.proxy.upstreams.in_flight == 0)
        busy.release.clear()
        # Four long calls, each sent once the one before reached a server: two end on each.
        for index in range(4):
            self.ask_in_background("qwen3-coder", {"X-Fake": "hold"})
            self.wait_for(lambda: self.proxy.upstreams.in_flight == index + 1
                          and self.count(self.gpu) + self.count(self.gpu2) == index + 6)
        self.assertEqual((self.count(busy), self.count(idle)), (3, 6))
        self.assertEqual((self.server_named("gpu").load, self.server_named("gpu2").load), (2, 2))
        self.gpu.release.set()
        self.gpu2.release.set()
        self.wait_for(lambda: self.proxy.upstreams.in_flight == 0)
        # Idle: turns alternate.
        before = (self.count(self.gpu), self.count(self.gpu2))
        for _ in range(4):
            self.assertEqual(self.ask("qwen3-coder").status, 200)
            self.wait_for(lambda: self.proxy.upstreams.in_flight == 0)
        self.assertEqual((self.count(self.gpu) - before[0], self.count(self.gpu2) - before[1]), (2, 2))

    def test_each_server_keeps_its_own_concurrency_and_queue(self) -> None:
        # mini takes one call at a time; the others wait for it, and gpu's callers do not.
        threads = []
        for _ in range(3):
            threads.append(self.ask_in_background("gemma-3-4b", {"X-Fake": "hold"}))
        self.wait_for(lambda: self.server_named("mini").gate.waiting == 2 and self.count(self.mini) == 1)
        started = time.monotonic()
        self.assertEqual(self.ask("anything").status, 200)  # gpu, idle, answers at once
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(self.count(self.mini), 1)
        self.mini.release.set()
        for thread, answers in threads:
            thread.join(WAIT)
            self.assertEqual(answers[0].status, 200)
        self.assertEqual(self.count(self.mini), 3)


class StickyTests(ManyUpstreamsTestCase):
    sticky = True

    def test_a_conversation_stays_on_its_server_while_that_is_not_much_busier(self) -> None:
        for _ in range(4):
            self.assertEqual(self.ask("qwen3-coder", content="the same conversation").status, 200)
        self.assertIn((self.count(self.gpu), self.count(self.gpu2)), [(4, 0), (0, 4)])
        home, other = (self.gpu, self.gpu2) if self.count(self.gpu) else (self.gpu2, self.gpu)
        # One call in flight on its server (within one of the other's none): it stays there.
        # Two in flight: the next goes to the idle server, and the conversation stays there.
        for index in range(2):
            self.ask_in_background("qwen3-coder", {"X-Fake": "hold"}, content="the same conversation")
            self.wait_for(lambda: self.count(home) == 5 + index)
        self.assertEqual(self.count(other), 0)
        self.assertEqual(self.ask("qwen3-coder", content="the same conversation").status, 200)
        self.assertEqual((self.count(home), self.count(other)), (6, 1))
        self.assertEqual(self.ask("qwen3-coder", content="a new conversation").status, 200)
        self.assertEqual(self.count(other), 2, "a new one goes to the least busy")


class FailoverTests(ManyUpstreamsTestCase):
    def test_killing_a_replica_mid_load_loses_no_call_and_charges_each_once(self) -> None:
        calls = [self.ask_in_background("qwen3-coder", {"X-Fake": "hold"}) for _ in range(6)]
        self.wait_for(lambda: self.count(self.gpu) + self.count(self.gpu2) == 6)
        on_gpu2 = self.count(self.gpu2)
        self.assertGreater(on_gpu2, 0)
        self.kill(self.gpu2)  # its calls had reached it, and nothing had come back
        # they went on to gpu at once (beyond its four at a time, into its queue)
        self.wait_for(lambda: self.count(self.gpu) + self.server_named("gpu").gate.waiting == 6)
        self.gpu.release.set()
        for thread, answers in calls:
            thread.join(WAIT)
            self.assertEqual(answers[0].status, 200, answers[0].body)
        # After it: gpu2 refuses, is marked down, and its calls go to gpu.
        for _ in range(3):
            self.assertEqual(self.ask("qwen3-coder").status, 200)
        self.assertIs(self.server_named("gpu2").state.up, False)
        self.assertEqual(self.request("GET", "/health", key=None).json(), {"status": "degraded"})
        quota = self.request("GET", "/v1/quota").json()
        self.assertEqual(quota["buckets"][0]["tokens"], 100 - 9, "nine calls, each charged once")

    def test_a_stream_cut_after_its_first_event_is_not_sent_again(self) -> None:
        thread, answers = self.ask_in_background("small-v2", {"X-Fake": "pause-after-first"},
                                                 stream=True)
        self.wait_for(self.mini.first_event_sent.is_set)
        self.kill(self.mini)
        thread.join(WAIT)
        self.assertEqual(answers[0].status, 200)
        events = answers[0].events()
        self.assertEqual(events[0]["choices"][0]["delta"]["content"], "w0")
        self.assertEqual(events[-1]["error"]["code"], "upstream_unavailable")
        self.assertEqual(self.count(self.mini), 1)
        self.assertEqual(self.count(self.gpu) + self.count(self.gpu2), 0, "never sent twice")
        self.assertEqual(self.request("GET", "/v1/quota").json()["buckets"][0]["tokens"], 99)
        self.assertRegex(self.written(" served "), r' 200 served .* upstream="[^"]+" server=mini')

    def test_a_replica_that_comes_back_is_used_again(self) -> None:
        self.kill(self.gpu2)
        for _ in range(2):
            self.assertEqual(self.ask("qwen3-coder").status, 200)
        self.assertIs(self.server_named("gpu2").state.up, False)
        self.proxy.upstreams.probe_down()  # (what the prober thread does every few seconds)
        self.assertIs(self.server_named("gpu2").state.up, False, "still dead")
        self.gpu2 = self.restart(self.gpu2)
        self.proxy.upstreams.probe_down()
        self.assertIs(self.server_named("gpu2").state.up, True)
        self.assertEqual(self.request("GET", "/health", key=None).json(), {"status": "ok"})
        for _ in range(4):
            self.assertEqual(self.ask("qwen3-coder").status, 200)
            self.wait_for(lambda: self.proxy.upstreams.in_flight == 0)
        self.assertEqual(self.count(self.gpu2), 2)

    def test_the_prober_runs_while_a_server_is_down_and_only_then(self) -> None:
        def probers() -> int:
            return sum(1 for thread in threading.enumerate() if thread.name == "upstream-probe")

        self.proxy.upstreams.PROBE_SECONDS = 0.02  # (the owner's few seconds, made short)
        self.assertEqual(probers(), 0)
        self.kill(self.gpu2)
        for _ in range(2):
            self.assertEqual(self.ask("qwen3-coder").status, 200)
        self.assertIs(self.server_named("gpu2").state.up, False)
        self.assertEqual(probers(), 1)
        self.gpu2 = self.restart(self.gpu2)
        self.wait_for(lambda: self.server_named("gpu2").state.up is True)
        self.wait_for(lambda: probers() == 0)
        self.assertTrue(any(r["path"] == "/v1/models" for r in self.gpu2.requests), "it asked")

    def test_a_call_every_server_dropped_is_sent_once_more(self) -> None:
        """Each server it reached had it and hung up (restarted mid-answer, say): the call waits for
        its model's servers and is written once more, charged once; never a third time, even where
        a kept-alive connection would be retried (dropped again: a 502, refunded)."""
        rows = [  # (model, X-Fake, a connection kept alive first, status, writes to its servers)
            ("gemma-3-4b", "close-first", False, 200, 2),  # the only server: dropped, then answered
            ("gemma-3-4b", "close", False, 502, 2),        # dropped twice: not written a third time
            ("gemma-3-4b", "close", True, 502, 2),         # ... nor on a kept-alive connection
            ("qwen3-coder", "close", True, 502, 2),        # two replicas: each once
        ]
        for model, fake, warm, status, writes in rows:
            with self.subTest(model=model, fake=fake, warm=warm):
                self.start_many()
                self.proxy.upstreams.RETRY_SECONDS = 0.02  # (how soon it looks again)
                if warm:
                    self.assertEqual(self.ask(model).status, 200)
                before = sum(self.count(server) for server in (self.gpu, self.gpu2, self.mini))
                response = self.ask(model, {"X-Fake": fake})
                self.assertEqual(response.status, status, response.body)
                if status == 502:
                    self.assert_openai_error(response, 502, "upstream_error", "upstream_unavailable")
                self.assertEqual(sum(self.count(server) for server in (self.gpu, self.gpu2, self.mini))
                                 - before, writes)
                charged = (1 if warm else 0) + (1 if status == 200 else 0)
                self.assertEqual(self.request("GET", "/v1/quota").json()["buckets"][0]["tokens"], 100 - charged)

    def test_a_call_dropped_late_in_a_long_answer_still_waits_for_its_server(self) -> None:
        """The wait for a server to come back starts at the drop, not when the call arrived."""
        self.start_many(queue_timeout=SHORT_WAIT)
        self.proxy.upstreams.RETRY_SECONDS = 0.02
        thread, answers = self.ask_in_background("gemma-3-4b", {"X-Fake": "close-first-late"})
        thread.join(WAIT)
        self.assertEqual(answers[0].status, 200, answers[0].body)
        self.assertEqual(self.count(self.mini), 2)

    def test_a_replica_answering_503_hands_the_call_to_the_next(self) -> None:
        self.start_many(queue_timeout=SHORT_WAIT)
        for calls in (1, 2):  # whichever gets it first answers 503 (X-Fake), the other does too:
            response = self.ask("qwen3-coder", {"X-Fake": "status-503"})
            # both down then: the call waited for one to come back, up to QUEUE_TIMEOUT_SECONDS
            self.assert_openai_error(response, 503, "upstream_error", "upstream_unavailable")
            self.assertGreaterEqual(self.count(self.gpu) + self.count(self.gpu2), 2 * calls,
                                    "each call tried both")
        self.assertEqual(self.request("GET", "/v1/quota").json()["buckets"][0]["tokens"], 100)

    def test_the_only_server_down_waits_then_503_refunded(self) -> None:
        self.start_many(queue_timeout=SHORT_WAIT)
        self.kill(self.mini)
        started = time.monotonic()
        response = self.ask("gemma-3-4b")
        self.assertGreaterEqual(time.monotonic() - started, SHORT_WAIT)
        self.assert_openai_error(response, 503, "upstream_error", "upstream_unavailable")
        self.assertNotIn(str(self.mini.server_address[1]).encode(), response.body)
        self.assertEqual(self.request("GET", "/v1/quota").json()["buckets"][0]["tokens"], 100)

    def test_the_first_call_after_the_only_server_died_waits_too(self) -> None:
        """Its kept-alive connection is dead: the request written on it never reached a server,
        so the call waits like any other (it was an immediate 502 from the stale connection)."""
        self.start_many(queue_timeout=SHORT_WAIT)
        self.assertEqual(self.ask("gemma-3-4b").status, 200)  # mini's connection is pooled now
        self.kill(self.mini)
        started = time.monotonic()
        response = self.ask("gemma-3-4b")
        self.assertGreaterEqual(time.monotonic() - started, SHORT_WAIT)
        self.assert_openai_error(response, 503, "upstream_error", "upstream_unavailable")
        self.assertIs(self.server_named("mini").state.up, False)

    def test_a_file_servers_503_is_waited_out_not_relayed(self) -> None:
        """A server still loading its model answers 503: a call for a model it alone serves
        waits for it (the probe sees it answer again), and never gets the server's own 503."""
        self.start_many(queue_timeout=SHORT_WAIT)
        started = time.monotonic()
        response = self.ask("gemma-3-4b", {"X-Fake": "status-503"})
        self.assertGreaterEqual(time.monotonic() - started, SHORT_WAIT)
        error = self.assert_openai_error(response, 503, "upstream_error", "upstream_unavailable")
        self.assertNotIn("upstream says", error["message"])  # (the fake's own words)
        self.assertEqual(self.request("GET", "/v1/quota").json()["buckets"][0]["tokens"], 100)

    def test_the_only_server_is_waited_for_and_serves_when_back(self) -> None:
        self.kill(self.mini)
        thread, answers = self.ask_in_background("gemma-3-4b")
        self.wait_for(lambda: self.server_named("mini").state.up is False)
        self.mini = self.restart(self.mini)
        thread.join(WAIT)
        self.assertEqual(answers[0].status, 200, answers[0].body)
        self.assertEqual(self.count(self.mini), 1)


class ReloadTests(ManyUpstreamsTestCase):
    def test_a_reload_moves_new_calls_and_lets_calls_in_flight_finish(self) -> None:
        thread, answers = self.ask_in_background("gemma-3-4b", {"X-Fake": "hold"})
        self.wait_for(lambda: self.count(self.mini) == 1)
        self.write_models(self.document(**{"gemma-3-4b": {"upstream": "gpu2"}}))
        self.assertTrue(self.proxy.upstreams.reload_if_changed(force=True))
        self.assertEqual(self.ask("gemma-3-4b").status, 200)
        self.assertEqual(json.loads(self.gpu2.requests[-1]["body"])["model"], "gemma-3-4b")
        self.mini.release.set()
        thread.join(WAIT)
        self.assertEqual(answers[0].status, 200)
        self.assertEqual(self.count(self.mini), 1)

    def test_a_broken_edit_keeps_the_last_good_reading(self) -> None:
        for broken, said in ((b"{not json", "not valid JSON"),
                             (json.dumps({"upstreams": {"x": {"url": "ftp://user:pw@h/v1"}}}).encode(),
                              "upstream 'x': 'url' must be")):
            with self.subTest(said):
                with open(self.models_path, "wb") as file:
                    file.write(broken)
                self.assertFalse(self.proxy.upstreams.reload_if_changed(force=True))
                self.assertIn(said, self.written(said))
                self.assertNotIn("pw@", self.written())
                self.assertEqual(self.ask("gemma-3-4b").status, 200)


class OwnerViewTests(ManyUpstreamsTestCase):
    def test_each_server_in_the_usage_report_metrics_and_startup_line(self) -> None:
        self.ask("gemma-3-4b")
        self.ask("anything")
        self.kill(self.gpu2)
        for _ in range(2):
            self.ask("qwen3-coder")
        self.logged(4)
        report = {u["name"]: u for u in self.admin("/admin/api/usage").json()["upstreams"]}
        self.assertEqual(set(report), {"gpu", "gpu2", "mini"})
        self.assertEqual(report["mini"], {"name": "mini", "url": self.mini.url, "up": True,
                                          "in_flight": 0, "queued": 0, "max_concurrent": 1,
                                          "last_error": None, "requests": 1, "tokens": 7})
        self.assertIs(report["gpu2"]["up"], False)
        self.assertTrue(report["gpu2"]["last_error"].startswith("502"))
        self.assertEqual(report["gpu"]["requests"], 3)
        families = parse_exposition(self.admin("/metrics").body.decode())
        up = {s[1]["upstream"]: s[2] for s in families["llm_proxy_upstream_up"]["samples"]}
        self.assertEqual(up, {"gpu": 1, "gpu2": 0, "mini": 1})
        served = {s[1].get("upstream"): s[2] for s in families["llm_proxy_requests_total"]["samples"]}
        self.assertEqual(served, {"gpu": 3, "mini": 1})
        queued = {s[1]["upstream"] for s in families["llm_proxy_queued"]["samples"]}
        self.assertEqual(queued, {"gpu", "gpu2", "mini"})
        line = llm_proxy.describe(self.config, self.proxy)
        for name, server in (("gpu", self.gpu), ("gpu2", self.gpu2), ("mini", self.mini)):
            self.assertIn(f"{name} {server.url}", line)
        self.assertNotIn(MINI_KEY, line + json.dumps(report) + self.written())
        page = self.request("GET", "/admin", key=None).body.decode()
        self.assertIn('<tbody id="servers">', page)  # the dashboard's rows, one per server
        self.assertIn("data.upstreams", page)


class OneServerTests(ProxyTestCase):
    def test_a_file_of_prices_alone_keeps_base_api_urls_one_server(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "models.json")
        with open(path, "w") as file:
            json.dump({"currency": "EUR", "models": {"m": {"price": {"input": 1, "output": 2}}}}, file)
        self.start_proxy(models_file=path)
        listing = self.request("GET", "/v1/models").json()
        self.assertEqual([m["id"] for m in listing["data"]], ["upstream-model", "small"])  # relayed
        for model in ("m", "anything"):
            self.assertEqual(self.chat(model=model).status, 200)
            self.assertEqual(json.loads(self.upstream.requests[-1]["body"])["model"], model)
        line = llm_proxy.describe(self.config, self.proxy)
        self.assertIn(f"-> {self.upstream.url}; ", line)


class ParseTests(unittest.TestCase):
    """``parse_upstreams``: strict, and its errors name the entry, never a key or a URL."""

    CONFIG = llm_proxy.Config()
    GOOD = {"url": "http://10.0.0.5:8080/v1"}

    def parse(self, document: dict, environ: dict | None = None,
              config: llm_proxy.Config | None = None) -> llm_proxy.UpstreamPlan:
        return llm_proxy.parse_upstreams(document, environ or {}, config or self.CONFIG)

    def test_refusals(self) -> None:
        rows = {
            "no server": ({}, "no model server"),
            "upstreams not an object": ({"upstreams": []}, "'upstreams' must be an object"),
            "a bad name": ({"upstreams": {"a b": self.GOOD}}, "upstream 'a b': a name is"),
            "an unknown field": ({"upstreams": {"a": dict(self.GOOD, weight=2)}}, "unknown field 'weight'"),
            "no url": ({"upstreams": {"a": {}}}, "upstream 'a': 'url' must be"),
            "credentials in the url": ({"upstreams": {"a": {"url": "http://u:secret@h/v1"}}},
                                       "upstream 'a': 'url' must be"),
            "key variable unset": ({"upstreams": {"a": dict(self.GOOD, api_key_env="NOPE")}},
                                   "environment variable NOPE (its api_key_env) is not set"),
            "bad max_concurrent": ({"upstreams": {"a": dict(self.GOOD, max_concurrent=-1)}},
                                   "'max_concurrent' must be"),
            "unknown upstream": ({"upstreams": {"a": self.GOOD}, "models": {"m": {"upstream": "b"}}},
                                 "model 'm': no upstream named 'b'"),
            "empty list": ({"upstreams": {"a": self.GOOD}, "models": {"m": {"upstream": []}}},
                           "model 'm': 'upstream' must be"),
            "twice the same": ({"upstreams": {"a": self.GOOD}, "models": {"m": {"upstream": ["a", "a"]}}},
                               "model 'm': 'upstream' must be"),
            "rename alone": ({"upstreams": {"a": self.GOOD}, "models": {"m": {"upstream_model": "x"}}},
                             "need 'upstream'"),
        }
        for name, (document, said) in rows.items():
            with self.subTest(name):
                with self.assertRaises(llm_proxy.ConfigError) as raised:
                    self.parse(document)
                self.assertIn(said, str(raised.exception))
                self.assertNotIn("secret", str(raised.exception))

    def test_order_and_the_base_api_url_shorthand(self) -> None:
        config = llm_proxy.Config(upstream_url="http://127.0.0.1:8080/v1", upstream_model="base")
        plan = self.parse({"upstreams": {"a": dict(self.GOOD, api_key_env="K")},
                           "models": {"x*": {"upstream": "a"}, "m": {"upstream": ["a", "default"]},
                                      "priced": {"price": {"input": 1}}}},
                          {"K": "sk-a"}, config)
        self.assertEqual([(s.name, s.key) for s in plan.upstreams], [("a", "sk-a"), ("default", None)])
        self.assertEqual([m.pattern for m in plan.models], ["m", "x*", "*"])
        self.assertEqual(plan.models[-1], llm_proxy.ModelSpec("*", ("default",), "base", fixed=True))
        with self.assertRaises(llm_proxy.ConfigError):
            self.parse({"upstreams": {"default": self.GOOD}}, config=config)


if __name__ == "__main__":
    unittest.main()


class StoredAnswerRoutingTests(ManyUpstreamsTestCase):
    """A stored answer lives on the server that made it: reading, deleting or continuing it
    goes there, not to the default server or another replica."""

    def test_a_stored_answer_is_asked_of_the_server_that_made_it(self) -> None:
        held = self.ask_in_background("qwen3-coder", {"X-Fake": "hold"})  # gpu is busier now
        self.wait_for(lambda: self.count(self.gpu) + self.count(self.gpu2) == 1)
        busy, idle = (self.gpu, self.gpu2) if self.count(self.gpu) else (self.gpu2, self.gpu)
        made = self.request("POST", "/v1/responses", {"model": "qwen3-coder", "input": "keep this"})
        self.assertEqual(made.status, 200, made.body)
        self.assertEqual(self.count(idle), 1)
        answer_id = made.json()["id"]  # (the held call is let go at the end: the fakes answer
        self.addCleanup(lambda: (busy.release.set(), held[0].join(WAIT)))  # with one id)
        for method in ("GET", "DELETE"):
            with self.subTest(method=method):
                before = len(idle.requests)
                self.request(method, f"/v1/responses/{answer_id}")
                self.assertEqual(len(idle.requests), before + 1, "asked of the server that made it")
                self.assertTrue(idle.requests[-1]["path"].endswith(f"/responses/{answer_id}"))
        for _ in range(2):  # a continuation goes there too
            self.assertEqual(self.request("POST", "/v1/responses", {
                "model": "qwen3-coder", "input": "go on", "previous_response_id": answer_id}).status, 200)
        self.assertEqual(self.count(idle), 3)


class ModelCardTests(ManyUpstreamsTestCase):
    def test_a_models_card_is_asked_of_its_server_by_the_name_that_server_knows(self) -> None:
        card = self.request("GET", "/v1/models/gemma-3-4b")
        self.assertEqual(card.status, 200, card.body)
        self.assertEqual(card.json()["id"], "gemma-3-4b")  # shown under the caller's name
        self.assertEqual(self.mini.requests[-1]["path"], "/v1/models/gemma3:4b")  # asked by mini's
        self.assertEqual(self.request("GET", "/v1/models/other").status, 200)  # '*': gpu's, as named
        self.assertEqual(self.gpu.requests[-1]["path"], "/v1/models/other")


class LogLineTests(ManyUpstreamsTestCase):
    def test_the_log_line_names_the_server_that_answered(self) -> None:
        self.assertEqual(self.ask("gemma-3-4b").status, 200)
        self.logged(1)
        self.assertIn(" server=mini", self.console.getvalue())


class RunningModelsTests(ManyUpstreamsTestCase):
    """Ollama's ``GET /api/ps`` across the servers, under the names callers use."""

    def running(self, key: str = CLIENT_KEY) -> list[tuple[str, str]]:
        response = self.request("GET", "/api/ps", key=key)
        self.assertEqual(response.status, 200, response.body)
        return [(entry["name"], entry["model"]) for entry in response.json()["models"]]

    def test_every_servers_running_models_under_the_names_callers_use(self) -> None:
        self.gpu.running = ["qwen3-coder", "upstream-model", "small-x"]  # small-x: mini's (small*)
        self.gpu2.running = ["qwen3-coder"]
        self.mini.running = ["gemma3:4b", "small-v2", "orphan"]  # orphan: gpu's ('*'), not mini's
        response = self.request("GET", "/api/ps")
        self.assertEqual(response.status, 200, response.body)
        models = response.json()["models"]
        self.assertEqual([(entry["name"], entry["model"]) for entry in models],
                         [(name, name) for name in ("qwen3-coder", "upstream-model", "qwen3-coder",
                                                    "gemma-3-4b", "small-v2")])
        details = {field: value for field, value in running_entry("x").items()
                   if field not in ("name", "model")}
        for entry in models:  # everything else as the server said it
            self.assertEqual({f: v for f, v in entry.items() if f not in ("name", "model")}, details)
        asked = self.mini.requests[-1]
        self.assertEqual((asked["path"], asked["headers"].get("Authorization")),
                         ("/api/ps", f"Bearer {MINI_KEY}"))  # mini's key to mini alone
        self.assertIsNone(self.gpu.requests[-1]["headers"].get("Authorization"))
        for secret in (MINI_KEY, CLIENT_KEY, "127.0.0.1", str(self.mini.server_address[1])):
            self.assertNotIn(secret.encode(), response.body)

    def test_a_key_sees_only_its_models_running(self) -> None:
        self.gpu.running = ["qwen3-coder", "upstream-model"]
        self.mini.running = ["gemma3:4b", "small-v2"]
        keys = os.path.join(os.path.dirname(self.models_path), "keys.json")
        with open(keys, "w") as file:
            json.dump({CLIENT_KEY: {"name": "ada", "models": ["gemma-3-4b", "upstream-model"]}}, file)
        self.start_many(client_keys=(), keys_file=keys)
        self.assertEqual(self.running(), [("upstream-model", "upstream-model"),
                                          ("gemma-3-4b", "gemma-3-4b")])

    def test_a_server_that_is_down_or_fails_is_left_out(self) -> None:
        self.gpu.running = ["qwen3-coder"]
        self.gpu2.running = ["qwen3-coder"]
        self.mini.running = None  # a server without /api/ps (llama-server): its 404
        self.kill(self.gpu2)
        self.assertEqual(self.running(), [("qwen3-coder", "qwen3-coder")])
        before = len(self.mini.requests)
        self.assertEqual(self.running(), [("qwen3-coder", "qwen3-coder")])
        self.assertEqual(len(self.mini.requests), before + 1)

    def test_a_server_marked_down_is_not_asked(self) -> None:
        self.gpu.running = self.gpu2.running = ["qwen3-coder"]
        upstreams = self.proxy.upstreams
        upstreams.mark_down(next(u for u in upstreams if u.name == "gpu2"),
                            llm_proxy.ProxyError(502, "refused"))  # (as a failed call marks it)
        before = len(self.gpu2.requests)
        self.assertEqual(self.running(), [("qwen3-coder", "qwen3-coder")])  # gpu's alone
        self.assertEqual(len(self.gpu2.requests), before)

    def test_a_trickling_or_huge_answer_is_left_out_in_bounded_time(self) -> None:
        for misbehaving in (TRICKLE, HUGE):
            with self.subTest(misbehaving):
                self.start_many(read_timeout=0.5)  # (a listing then waits 0.5 s in all)
                self.gpu.running, self.mini.running = ["qwen3-coder"], misbehaving
                started = time.monotonic()
                self.assertEqual(self.running(), [("qwen3-coder", "qwen3-coder")])
                self.assertLess(time.monotonic() - started, 3.0)  # (a trickle: about 20 s)


# The owner's view of mini while a call waits: (in flight, queued) in each of its three places.
WAITING = {"report": (0, 1), "totals": (0, 1), "metrics": (0, 1), "key": (0, 1)}
IDLE = {"report": (0, 0), "totals": (0, 0), "metrics": (0, 0), "key": (0, 0)}


class WaitingForAServerTests(ManyUpstreamsTestCase):
    """A call waiting for its model's only server to come back is queued there for the owner."""

    def owner_counts(self) -> dict:
        """mini's (in flight, queued) in /admin/api/usage and /metrics, the report's totals, and
        the calling key's own."""
        report = self.admin("/admin/api/usage").json()
        mini = next(entry for entry in report["upstreams"] if entry["name"] == "mini")
        families = parse_exposition(self.admin("/metrics").body.decode())

        def gauge(name: str) -> float:
            return {s[1]["upstream"]: s[2] for s in families[name]["samples"]}["mini"]

        key = report["keys"][0]
        return {"report": (mini["in_flight"], mini["queued"]),
                "totals": (report["in_flight"], report["queued"]),
                "key": (key["in_flight"], key["queued"]),
                "metrics": (gauge("llm_proxy_in_flight"), gauge("llm_proxy_queued"))}

    def test_it_is_queued_until_the_server_is_back_and_serves_it(self) -> None:
        self.proxy.upstreams.RETRY_SECONDS = WAIT  # (it looks again only when the server is back)
        self.kill(self.mini)
        thread, answers = self.ask_in_background("gemma-3-4b")
        self.wait_for(lambda: self.owner_counts()["report"] == (0, 1))
        self.assertEqual(self.owner_counts(), WAITING)
        self.mini = self.restart(self.mini)
        self.proxy.upstreams.probe_down()  # (what the prober does every few seconds)
        thread.join(WAIT)
        self.assertEqual(answers[0].status, 200, answers[0].body)
        self.wait_for(lambda: self.proxy.upstreams.in_flight == 0)
        self.assertEqual(self.owner_counts(), IDLE)

    def test_it_is_queued_until_its_wait_runs_out(self) -> None:
        self.start_many(queue_timeout=1.0)  # (long enough to see it queued on a busy machine)
        self.kill(self.mini)
        thread, answers = self.ask_in_background("gemma-3-4b")
        self.wait_for(lambda: self.owner_counts() == WAITING)
        thread.join(WAIT)
        self.assert_openai_error(answers[0], 503, "upstream_error", "upstream_unavailable")
        self.assertEqual(self.request("GET", "/v1/quota").json()["buckets"][0]["tokens"], 100)
        self.assertEqual(self.owner_counts(), IDLE)
