"""Endpoints a key may call (issue 20, item 5): the route table's groups, listed per key.

A key's ``"endpoints"`` names groups of the route table (``llm_proxy.ENDPOINT_NAMES``);
a request to a group it does not list is a 403 ``endpoint_not_allowed`` in its API's
shape, free and never forwarded.  The account and batch APIs of paid providers are
opt-in: closed to a key that does not list them, whatever else it may call.  Run by
``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import unittest

import llm_proxy
from llm_proxy import Config, ConfigError
from test_llm_proxy import ADMIN_KEY, HERE, WAIT, ProxyTestCase, parse_exposition

MESSAGES = [{"role": "user", "content": "hi"}]
# One request per group of the route table: (method, path, body).  A group added to the table
# needs its row here (test_every_group_has_a_request).
REQUESTS = {
    "chat": ("POST", "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "max_tokens": 1}),
    "completions": ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 1}),
    "responses": ("POST", "/v1/responses", {"model": "m", "input": "hi", "max_output_tokens": 1}),
    "messages": ("POST", "/v1/messages", {"model": "m", "messages": MESSAGES, "max_tokens": 1}),
    "ollama": ("POST", "/api/chat", {"model": "m", "messages": MESSAGES, "stream": False}),
    "embeddings": ("POST", "/v1/embeddings", {"model": "m", "input": "hi"}),
    "batches": ("POST", "/v1/batches", {"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
                                        "completion_window": "24h"}),
    "files": ("GET", "/v1/files", None),
    "uploads": ("POST", "/v1/uploads", {"purpose": "batch", "filename": "a.jsonl", "bytes": 1,
                                        "mime_type": "text/jsonl"}),
    "fine_tuning": ("POST", "/v1/fine_tuning/jobs", {"model": "m", "training_file": "file-1"}),
    "vector_stores": ("GET", "/v1/vector_stores", None),
    "assistants": ("POST", "/v1/assistants", {"model": "m"}),
    "threads": ("POST", "/v1/threads/runs", {"assistant_id": "asst_1"}),
    "organization": ("GET", "/v1/organization/usage/completions", None),
    "containers": ("GET", "/v1/containers", None),
    "evals": ("POST", "/v1/evals", {"name": "e"}),
    "images": ("POST", "/v1/images/generations", {"model": "m", "prompt": "a cat"}),
    "audio": ("POST", "/v1/audio/speech", {"model": "m", "input": "hi", "voice": "alloy"}),
    "other": ("POST", "/v1/rerank", {"model": "m", "query": "q", "documents": ["a"]}),
}
# The account and batch APIs the issue names, as a student's script would call them.
ACCOUNT_CALLS = [("POST", "/v1/files"), ("GET", "/v1/files/file-1/content"), ("POST", "/v1/uploads"),
                 ("POST", "/v1/batches"), ("GET", "/v1/batches/batch_1"),
                 ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/vector_stores"),
                 ("POST", "/v1/Assistants"), ("POST", "/v1/threads/runs"),
                 ("GET", "/v1/organization/usage/completions"), ("POST", "/v1/messages/batches"),
                 ("DELETE", "/v1/models/ft:gpt-4.1-mini:acme::abc")]  # a fine-tuned model
OPT_IN = {"batches", "files", "uploads", "fine_tuning", "vector_stores", "assistants", "threads",
          "organization", "containers", "evals"}


def only(group: str) -> str:
    return f"sk-only-{group}"


DEFAULT_KEY, NOTHING_KEY, OWNER_KEY, APP_KEY = "sk-no-list", "sk-empty-list", "sk-owner", "sk-app"


def is_endpoint_refusal(body: dict) -> bool:
    """The refusal in any API's shape: OpenAI's carries its code, Anthropic's and Ollama's the
    message alone."""
    error = body.get("error")
    if isinstance(error, dict) and "code" in error:
        return error["code"] == "endpoint_not_allowed"
    message = error.get("message") if isinstance(error, dict) else error
    return isinstance(message, str) and "endpoint is not open to this key" in message


class EndpointTestCase(ProxyTestCase):
    """A keys file with a key per group, a key without a list, one with an empty list and an owner's."""

    def setUp(self) -> None:
        super().setUp()
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.keys_path = os.path.join(directory.name, "keys.json")
        keys = {only(group): {"name": group, "endpoints": [group]}
                for group in llm_proxy.ENDPOINT_NAMES}
        keys[DEFAULT_KEY] = {"name": "default"}
        keys[NOTHING_KEY] = {"name": "nothing", "endpoints": []}
        keys[OWNER_KEY] = {"name": "owner", "endpoints": list(llm_proxy.ENDPOINT_NAMES)}
        keys[APP_KEY] = {"name": "app", "endpoints": ["chat"], "users": {"from": "header", "header": "X-User"}}
        with open(self.keys_path, "w") as file:
            json.dump(keys, file)
        self.start_proxy(keys_file=self.keys_path, admin_key=ADMIN_KEY, max_tokens=1000)

    def call(self, group: str, key: str):
        method, path, body = REQUESTS[group]
        before = len(self.upstream.requests)
        response = self.request(method, path, body, key=key)
        return response, len(self.upstream.requests) - before

    def assert_refused(self, group: str, key: str) -> None:
        level = self.level(key)
        response, forwarded = self.call(group, key)
        self.assertEqual(response.status, 403, response.body[:300])
        self.assertTrue(is_endpoint_refusal(response.json()), response.body[:300])
        self.assertEqual(forwarded, 0)
        self.assertEqual(self.level(key), level)  # free

    def assert_forwarded(self, group: str, key: str) -> None:
        response, forwarded = self.call(group, key)
        self.assertNotEqual(response.status, 403, response.body[:300])
        self.assertEqual(forwarded, 1, response.body[:300])


class EndpointListTests(EndpointTestCase):
    def test_every_group_has_a_request(self) -> None:
        self.assertEqual(set(REQUESTS), set(llm_proxy.ENDPOINT_NAMES))
        self.assertEqual(set(llm_proxy.OPT_IN_ENDPOINTS), OPT_IN)
        for group, (method, path, _) in REQUESTS.items():
            self.assertEqual(llm_proxy.route_for(path.lower(), method).group, group, path)

    def test_a_key_calls_the_groups_it_lists_and_no_other(self) -> None:
        names = llm_proxy.ENDPOINT_NAMES
        for position, group in enumerate(names):
            neighbour = names[position - 1]  # a key listing another group only
            with self.subTest(group=group):
                self.assert_forwarded(group, only(group))
                self.assert_refused(group, only(neighbour))
                self.assert_refused(group, NOTHING_KEY)
                self.assert_forwarded(group, OWNER_KEY)

    def test_without_a_list_every_group_but_the_opt_in_ones(self) -> None:
        for group in llm_proxy.ENDPOINT_NAMES:
            with self.subTest(group=group):
                if group in OPT_IN:
                    self.assert_refused(group, DEFAULT_KEY)
                else:
                    self.assert_forwarded(group, DEFAULT_KEY)

    def test_the_account_apis_of_paid_providers_are_closed_unless_listed(self) -> None:
        for method, path in ACCOUNT_CALLS:
            group = llm_proxy.route_for(path.lower(), method).group
            body = {"model": "m"} if method == "POST" else None
            for key, status in ((DEFAULT_KEY, 403), (only("chat"), 403), (only(group), None)):
                with self.subTest(path=path, key=key):
                    before = len(self.upstream.requests)
                    response = self.request(method, path, body, key=key)
                    if status is None:
                        self.assertNotEqual(response.status, 403, response.body[:300])
                        self.assertEqual(len(self.upstream.requests) - before, 1)
                    else:
                        self.assertEqual(response.status, status, response.body[:300])
                        self.assertEqual(len(self.upstream.requests), before)

    def test_the_refusal_is_in_the_shape_of_the_api_asked(self) -> None:
        chat = self.request("POST", "/v1/chat/completions", REQUESTS["chat"][2], key=only("other"))
        self.assert_openai_error(chat, 403, "permission_error", "endpoint_not_allowed")
        self.assertIn("'chat'", chat.json()["error"]["message"])
        messages = self.request("POST", "/v1/messages", REQUESTS["messages"][2], key=only("chat"))
        self.assertEqual(messages.json()["type"], "error")
        self.assertEqual(messages.json()["error"]["type"], "permission_error")
        ollama = self.request("POST", "/api/chat", REQUESTS["ollama"][2], key=only("chat"))
        self.assertEqual(set(ollama.json()), {"error"})
        self.assertIsInstance(ollama.json()["error"], str)

    def test_an_app_keys_list_holds_for_everyone_behind_it(self) -> None:
        for group, allowed in (("chat", True), ("embeddings", False), ("files", False)):
            method, path, body = REQUESTS[group]
            with self.subTest(group=group):
                before = len(self.upstream.requests)
                response = self.request(method, path, body, key=APP_KEY, headers={"X-User": "kim"})
                self.assertEqual(response.status == 403, not allowed, response.body[:300])
                self.assertEqual(len(self.upstream.requests) - before, int(allowed))

    def test_listings_and_the_quota_stay_open_to_every_key(self) -> None:
        """Clients ask for the model list before anything else: a key listing no group still gets it."""
        for path in ("/v1/models", "/v1/quota", "/api/tags"):  # (the fake has no /api/tags: its 404)
            with self.subTest(path=path):
                response = self.request("GET", path, key=NOTHING_KEY)
                self.assertIn(response.status, (200, 404), response.body[:300])
                self.assertNotIn(b"endpoint_not_allowed", response.body)

    def test_a_refused_body_is_never_sent(self) -> None:
        """With Expect: 100-continue the refusal comes before the body (nothing to read, nothing forwarded)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + DEFAULT_KEY.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            head = sock.recv(65536)
        self.assertTrue(head.startswith(b"HTTP/1.1 403"), head[:200])
        self.assertIn(b"endpoint_not_allowed", head)
        self.assertEqual(self.upstream.requests, [])

    def test_images_and_audio_are_counted_per_call_under_their_own_names(self) -> None:
        """The route table's endpoint name is where a price per call is found; the metrics show it."""
        for group in ("images", "audio"):
            self.assert_forwarded(group, DEFAULT_KEY)
        self.assertEqual(self.level(DEFAULT_KEY), 1000 - 2)  # REQUEST_TOKEN_COST each
        self.logged(2)
        families = parse_exposition(self.request("GET", "/metrics", key=ADMIN_KEY).body.decode())
        endpoints = {labels.get("endpoint") for _, labels, _ in families["llm_proxy_requests_total"]["samples"]}
        self.assertLessEqual({"images", "audio"}, endpoints)


class EndpointDocsTests(unittest.TestCase):
    def test_docs_name_every_endpoint_and_whether_it_is_opt_in(self) -> None:
        with open(os.path.join(HERE, "docs", "UPSTREAMS.md"), encoding="utf-8") as file:
            rows = [line for line in file.read().splitlines() if line.startswith("| `")]
        documented = {name: row.rstrip(" |").endswith("opt-in") for row in rows
                      for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
        self.assertEqual(documented, {name: name in llm_proxy.OPT_IN_ENDPOINTS
                                      for name in llm_proxy.ENDPOINT_NAMES})


class EndpointFileTests(unittest.TestCase):
    """A keys file naming an endpoint that does not exist does not load: the error says which."""

    def parse(self, entry: dict) -> dict:
        return llm_proxy.parse_keys_file(json.dumps({"sk-a": dict(entry, name="ada")}), Config())

    def test_a_misspelt_name_is_refused_with_the_names_there_are(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.parse({"endpoints": ["chat", "embedings"]})
        message = str(caught.exception)
        self.assertIn("entry 1 (ada)", message)
        self.assertIn("unknown endpoint 'embedings'", message)
        self.assertIn("did you mean 'embeddings'?", message)
        for name in llm_proxy.ENDPOINT_NAMES:
            self.assertIn(name, message)
        self.assertNotIn("sk-a", message)

    def test_endpoints_must_be_a_list_of_names(self) -> None:
        for value in ("chat", [1], {"chat": True}, [["chat"]]):
            with self.subTest(value=value), self.assertRaises(ConfigError) as caught:
                self.parse({"endpoints": value})
            self.assertIn("endpoints must be a list of endpoint names", str(caught.exception))

    def test_every_name_loads(self) -> None:
        ((_, policy),) = self.parse({"endpoints": list(llm_proxy.ENDPOINT_NAMES)}).values()
        self.assertEqual(policy.endpoints, frozenset(llm_proxy.ENDPOINT_NAMES))
        ((_, policy),) = self.parse({}).values()
        self.assertIsNone(policy.endpoints)

    def test_an_end_user_has_no_list_of_its_own(self) -> None:
        """The key's list holds for everyone behind it; a per-user list would be checked too late."""
        with self.assertRaises(ConfigError) as caught:
            self.parse({"users": {"from": "header", "header": "X-User", "endpoints": ["chat"]}})
        self.assertIn("endpoints", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
