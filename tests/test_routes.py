"""The route table: every path the proxy knows, and what answers it (issue 19).

One table (``llm_proxy.ROUTES``) decides, for a path and a method, whether a key is
needed, which API's shape errors take, and what answers: a metered call, a free one,
a local answer or a refusal.  These rows pin what the routing did before it was one
table; the second test sends each through a real proxy.  Then what a hostile target
(another host, ``..``, an escape) and a stored answer's sub-paths come to.
Run by ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import unittest

import llm_proxy
from test_llm_proxy import CLIENT_KEY, VALID_BODY, AdversarialTestCase, ProxyTestCase, status_of

# (method, path, answer, endpoint, shape of its errors)
ROWS = [
    ("GET", "/", "root", "local", "openai"),
    ("GET", "/health", "health", "local", "openai"),
    ("GET", "/favicon.ico", "favicon", "local", "openai"),
    ("GET", "/admin", "admin", "local", "openai"),
    ("GET", "/metrics", "admin", "local", "openai"),
    ("GET", "/admin/api/keys", "admin_keys", "local", "openai"),
    ("POST", "/admin/api/keys", "admin_keys", "local", "openai"),
    ("PATCH", "/admin/api/keys", "method_not_allowed", "local", "openai"),
    ("PATCH", "/admin/api/keys/ada", "admin_keys", "local", "openai"),
    ("POST", "/admin/api/keys/ada/rotate", "admin_keys", "local", "openai"),
    ("GET", "/admin/api/keys/ada", "method_not_allowed", "local", "openai"),
    ("POST", "/v1/chat/completions", "metered", "chat", "openai"),
    ("GET", "/v1/chat/completions", "method_not_allowed", "local", "openai"),
    ("POST", "/v1/completions", "metered", "text", "openai"),
    ("POST", "/v1/responses", "metered", "responses", "openai"),
    ("POST", "/v1/messages", "metered", "messages", "anthropic"),
    ("PUT", "/v1/messages", "method_not_allowed", "local", "anthropic"),
    ("POST", "/v1/embeddings", "metered", "embeddings", "openai"),
    ("POST", "/api/chat", "metered", "ollama", "ollama"),
    ("POST", "/api/generate", "metered", "ollama", "ollama"),
    ("POST", "/api/embed", "metered", "ollama", "ollama"),
    ("POST", "/api/embeddings", "metered", "ollama", "ollama"),
    ("GET", "/v1/quota", "quota", "quota", "openai"),
    ("POST", "/v1/quota", "metered", "other", "openai"),
    ("GET", "/v1/models", "models", "models", "openai"),
    ("GET", "/v1/models/qwen", "model_card", "models", "openai"),
    ("DELETE", "/v1/models/ft-1", "metered", "other", "openai"),
    ("GET", "/api/tags", "models", "models", "ollama"),
    ("GET", "/api/ps", "running_models", "models", "ollama"),
    ("POST", "/api/ps", "method_not_allowed", "local", "ollama"),
    ("GET", "/api/version", "free", "free", "ollama"),
    ("POST", "/api/show", "free", "free", "ollama"),
    ("GET", "/api/show", "method_not_allowed", "local", "ollama"),
    ("POST", "/api/pull", "management", "local", "ollama"),
    ("DELETE", "/api/delete", "management", "local", "ollama"),
    ("POST", "/api/blobs/sha256:00", "management", "local", "ollama"),
    ("POST", "/api/unknown", "not_found", "local", "ollama"),
    ("GET", "/api", "unknown", "local", "openai"),
    ("POST", "/v1/messages/count_tokens", "free", "free", "anthropic"),
    ("POST", "/v1/messages/batches", "metered", "other", "anthropic"),
    ("GET", "/v1/messages/batches/b1", "free", "free", "anthropic"),
    ("GET", "/v1/responses/resp_1", "free", "free", "openai"),
    ("DELETE", "/v1/responses/resp_1", "free", "free", "openai"),
    ("GET", "/v1/responses/resp_1/input_items", "free", "free", "openai"),
    ("POST", "/v1/responses/resp_1/cancel", "metered", "other", "openai"),
    ("POST", "/v1/responses/compact", "metered", "other", "openai"),
    ("GET", "/v1/responses/compact", "free", "free", "openai"),
    ("GET", "/v1/chat/completions/chatcmpl-1", "free", "free", "openai"),
    ("POST", "/v1/batches", "metered", "other", "openai"),  # (opt-in: tests/test_endpoints.py)
    ("GET", "/v1/files/file-1/content", "free", "free", "openai"),
    ("POST", "/v1/realtime/client_secrets", "closed", "local", "openai"),
    ("GET", "/v1/rerank", "free", "free", "openai"),
    ("POST", "/v1/rerank", "metered", "other", "openai"),
    ("POST", "/v1/audio/transcriptions", "metered", "audio", "openai"),
    ("GET", "/v1", "free", "free", "openai"),
    ("GET", "/elsewhere", "unknown", "local", "openai"),
    ("POST", "/v2/chat/completions", "unknown", "local", "openai"),
]


def shape(dialect: llm_proxy.Dialect) -> str:
    body = dialect.error_body(llm_proxy.ProxyError(400, "x"))
    return "anthropic" if body.get("type") == "error" else "ollama" if body == {"error": "x"} else "openai"


class RouteTableTests(unittest.TestCase):
    def test_each_path_and_method_has_its_row(self) -> None:
        for method, path, answer, endpoint, error_shape in ROWS:
            with self.subTest(method=method, path=path):
                route = llm_proxy.route_for(path, method)
                self.assertEqual((route.answer, route.endpoint, shape(route.dialect)),
                                 (answer, endpoint, error_shape))

    def test_every_answer_has_its_handler_method(self) -> None:
        answers = {route.answer for route in llm_proxy.ROUTES} | {"method_not_allowed", "unknown"}
        for answer in answers:
            self.assertTrue(callable(getattr(llm_proxy.ProxyHandler, "answer_" + answer, None)), answer)

    def test_only_local_answers_need_no_key(self) -> None:
        keyless = {route.path for route in llm_proxy.ROUTES if not route.needs_key}
        self.assertEqual(keyless, {"/", "/health", "/favicon.ico", "/admin", "/admin/api/usage",
                                   "/admin/api/usage.csv", "/admin/api/keys", "/metrics", "/api"})


    def test_a_long_path_is_looked_up_by_its_start(self) -> None:
        """Only the first ROUTE_KEY_LENGTH characters can decide, so only they are remembered:
        unique long paths sent without a key cannot fill the memory (a review's finding)."""
        for suffix in ("", "/x" * 5000):
            for path in ("/v1/chat/completions", "/v1/models/m", "/api/pull", "/v1/files"):
                with self.subTest(path=path, long=bool(suffix)):
                    self.assertEqual(llm_proxy.route_for(path + suffix, "GET").answer,
                                     llm_proxy.route_for(path + "/x", "GET").answer if suffix
                                     else llm_proxy.route_for(path, "GET").answer)
        self.assertEqual(llm_proxy.route_for("/v1/chat/completions" + "x" * 9000, "POST").answer, "metered")
        self.assertLess(llm_proxy.ROUTE_KEY_LENGTH, 64)


class RoutesOverSocketsTests(ProxyTestCase):
    """Each row answered by a real proxy: status, and whether the upstream saw the request."""

    config_overrides = {"client_keys": (CLIENT_KEY,), "max_tokens": 100}

    def test_each_row_answers_as_its_table_says(self) -> None:
        expected = {"metered": (None, True), "free": (None, True), "models": (None, True),
                    "model_card": (None, True), "running_models": (None, True), "quota": (200, False),
                    "method_not_allowed": (405, False), "management": (403, False),
                    "closed": (403, False), "not_found": (404, False), "unknown": (404, False),
                    "root": (200, False), "health": (200, False), "favicon": (204, False),
                    "admin": (404, False), "admin_keys": (404, False)}  # (no ADMIN_KEY: no owner's pages)
        for method, path, answer, _, error_shape in ROWS:
            if path.startswith(("/v1/responses/", "/v1/chat/completions/")):
                continue  # stored answers: tests/test_request_bodies.py
            with self.subTest(method=method, path=path):
                before = len(self.upstream.requests)
                body = {"model": "m", "messages": [], "prompt": "x", "input": "x", "max_tokens": 1} \
                    if method in ("POST", "PUT") else None
                response = self.request(method, path, body)
                opt_in = llm_proxy.route_for(path.lower(), method).opt_in  # closed unless a key lists it
                status, forwarded = (403, False) if opt_in else expected[answer]  # (forwarded: the fake's)
                if status is not None:
                    self.assertEqual(response.status, status, response.body[:200])
                self.assertEqual(len(self.upstream.requests) - before, int(forwarded), response.body[:200])
                if status is not None and status >= 400:
                    self.assertEqual(shape_of(response.json()), error_shape, response.body[:200])

    def test_refusals_are_no_calls_to_the_model(self) -> None:
        """A 405 or a closed endpoint counts as the proxy's own answer, not in the usage history."""
        for method, path in (("GET", "/v1/chat/completions"), ("POST", "/v1/batches"),
                             ("GET", "/api/show")):
            self.request(method, path)
        self.logged(3)
        self.assertIsNone(self.proxy.usage.get("key:" + llm_proxy.key_digest(CLIENT_KEY)))


def shape_of(body: dict) -> str:
    """Which API's error envelope an answer is."""
    if body.get("type") == "error":
        return "anthropic"
    return "ollama" if isinstance(body.get("error"), str) else "openai"


class HostileTargetTests(AdversarialTestCase):
    """A target spelt to slip past the table reaches no other host or path and skips no bucket."""

    def test_hostile_paths_reach_no_other_host_or_path_and_skip_no_bucket(self) -> None:
        targets = [b"http://evil.example/v1/chat/completions", b"//evil.example/v1/chat/completions",
                   b"/v1/../admin", b"/v1/%2e%2e/admin", b"/v1/%2E%2E%2Fadmin", b"/v1/chat%2fcompletions",
                   b"/v1/chat/completions%00", b"/v1/chat/completions/..", b"/v1/./chat/completions",
                   b"/v1\\chat\\completions", b"/v1/chat/completions;jsessionid=1", b"/v1//chat/completions",
                   b"/v1/%ZZ", b"/v1/\xc3\xa9", b"*", b"evil.example:443"]
        for target in targets:
            with self.subTest(target=target):
                answer = self.exchange(b"POST " + target + b" HTTP/1.1\r\nHost: evil.example\r\n"
                                       b"Content-Length: %d\r\n\r\n%s" % (len(VALID_BODY), VALID_BODY))
                self.assert_error_answer(answer)
                self.assertEqual(status_of(answer), 400)
        self.assert_nothing_charged_or_forwarded()
        self.assert_healthy()

    def test_every_spelling_of_a_completion_is_metered(self) -> None:
        for path in ("/v1/chat/completions/", "/v1/chat/completions//", "/v1/chat/completions?a=b",
                     "/V1/CHAT/COMPLETIONS", "/v1/%63hat/completions", "/v1/completions/"):
            with self.subTest(path=path):
                before = self.level()
                response = self.request("POST", path, {"messages": [], "prompt": "x"})
                self.assertEqual(self.level(), before - 1, path)
                self.assertEqual(response.headers["X-RateLimit-Remaining"], str(before - 1))
        self.assertTrue(all(r["path"].startswith("/v1/") for r in self.upstream.requests))

    def test_other_methods_on_a_metered_path_are_405(self) -> None:
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            with self.subTest(method=method):
                self.assert_openai_error(self.request(method, "/v1/chat/completions", VALID_BODY), 405)
        self.assert_nothing_charged_or_forwarded()


class FreeCallTests(ProxyTestCase):
    """Only reading and counting calls are free; whatever else names a stored answer pays."""

    config_overrides = {"client_keys": (CLIENT_KEY,), "max_tokens": 1, "refill_tokens": 1}

    def test_only_reading_and_counting_calls_are_free(self) -> None:
        # A stored response of this key's (the fake answers every POST with id "chatcmpl-up");
        # the bucket is empty from here on
        self.request("POST", "/v1/responses", {"model": "m", "input": "x"})
        stored = "/v1/responses/chatcmpl-up"
        charged = [("POST", "/v1/responses/compact"), ("POST", stored + "/cancel"),
                   ("PUT", stored), ("POST", "/v1/messages/count_tokens_x")]
        for method, path in charged:
            with self.subTest(path=path):
                self.assertEqual(self.request(method, path, {"model": "m"}).status, 429)
        free = [("GET", stored), ("DELETE", stored), ("GET", stored + "/input_items"),
                ("POST", "/v1/messages/count_tokens")]
        for method, path in free:
            with self.subTest(path=path):
                self.assertLess(self.request(method, path, {"model": "m"} if method == "POST" else None
                                             ).status, 429)
        self.assertEqual(len(self.upstream.requests), 1 + len(free))
