"""Weighted turns and priority classes in the fair queue (issue 21, item 5).

A key's ``"weight": 3`` gives it three turns for each one of a weight-1 key when
both have requests waiting; a higher ``"priority"`` is served first, and a lower
one that has waited PRIORITY_MAX_WAIT_SECONDS takes turns with the highest.
Under an app key the same holds for its users, inside the app's turns.

The shares are counted at the gate itself, one slot and a release order the test
controls (each release grants exactly one waiting ticket, synchronously), so the
counts are exact; the keys-file tests then check the same over real sockets.
Run by the README's command, ``python3 test_llm_proxy.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import unittest
from collections import Counter
from dataclasses import replace

import llm_proxy
from llm_proxy import ClientGone, Config, ConfigError, FairGate, ProxyServer, Ticket
from test_llm_proxy import CLIENT_KEY, OTHER_KEY, WAIT, FakeClock, ProxyTestCase

THIRD_KEY = "sk-client-carol-2222222222"
MAX_WAIT = 10.0


class Turns:
    """A one-slot gate, tickets queued in a known order, and the order they are granted in."""

    def __init__(self, test: unittest.TestCase, limit: int = 1) -> None:
        self.test = test
        self.clock = FakeClock()
        self.gate = FairGate(limit, WAIT, MAX_WAIT, self.clock)
        self.queued: list[Ticket] = []
        self.threads: list[threading.Thread] = []
        test.addCleanup(self.close)

    def take(self, ticket: Ticket) -> Ticket:
        """A ticket granted at once (the slot is free): it holds the slot until released."""
        self.gate.acquire(ticket)
        self.test.assertTrue(ticket.granted)
        return ticket

    def queue(self, ticket: Ticket) -> Ticket:
        """Queue ``ticket`` (its acquire waits in a thread); returns once it is in the queue."""
        before = self.gate.waiting
        thread = threading.Thread(target=self.wait_for_slot, args=(ticket,))
        thread.start()
        self.threads.append(thread)
        self.queued.append(ticket)
        deadline = time.monotonic() + WAIT
        while self.gate.waiting == before and not ticket.granted and time.monotonic() < deadline:
            time.sleep(0.001)
        self.test.assertEqual(self.gate.waiting, before + 1, "the ticket is queued, not granted")
        return ticket

    def wait_for_slot(self, ticket: Ticket) -> None:
        """What a request's thread does: wait at the gate (a withdrawn ticket's client has gone)."""
        with contextlib.suppress(ClientGone):
            self.gate.acquire(ticket)

    def pass_on(self, holder: Ticket) -> Ticket:
        """Release ``holder``'s slot: the one ticket it went to, which now holds it."""
        self.gate.release(holder)
        granted = [ticket for ticket in self.queued if ticket.granted]
        self.test.assertEqual(len(granted), 1, "a release grants exactly one waiting ticket")
        self.queued.remove(granted[0])
        return granted[0]

    def order(self, holder: Ticket, count: int) -> list[str]:
        """The identities of the next ``count`` tickets served, one slot passed on each time."""
        served = []
        for _ in range(count):
            holder = self.pass_on(holder)
            served.append(holder.identity)
        self.holder = holder
        return served

    def close(self) -> None:
        """Grant everything still queued (the slot passed on to the end), and join the threads."""
        holder = getattr(self, "holder", None)
        while self.queued and holder is not None:
            holder = self.pass_on(holder)
        for ticket in self.queued:
            self.gate.withdraw(ticket)
        for thread in self.threads:
            thread.join(WAIT)
            self.test.assertFalse(thread.is_alive())


def key(name: str, weight: int = 1, priority: int = 0, limit: int = 0) -> Ticket:
    return Ticket(name, limit, None, 0, weight, priority)


def user(app: str, name: str, weight: int = 1, priority: int = 0,
         app_turns: tuple[int, int] = (1, 0)) -> Ticket:
    return Ticket(f"{app}/user:{name}", 0, app, 0, weight, priority, app_turns)


class WeightedTurnsTests(unittest.TestCase):
    def test_weight_three_gets_three_turns_to_one_under_contention(self) -> None:
        turns = Turns(self)
        holder = turns.take(key("hold"))
        for _ in range(40):
            turns.queue(key("a", weight=3))
        for _ in range(40):
            turns.queue(key("b"))
        served = turns.order(holder, 40)
        self.assertEqual(Counter(served), {"a": 30, "b": 10})
        self.assertEqual(served[:8], ["a", "a", "a", "b"] * 2, "three in a row, then the other's one")
        for start in range(0, 40, 4):  # the share holds in every stretch, not only overall
            self.assertEqual(Counter(served[start:start + 4]), {"a": 3, "b": 1}, served)

    def test_three_keys_share_by_their_weights(self) -> None:
        turns = Turns(self)
        holder = turns.take(key("hold"))
        for name, weight in (("a", 3), ("b", 2), ("c", 1)):
            for _ in range(30):
                turns.queue(key(name, weight=weight))
        served = turns.order(holder, 60)
        self.assertEqual(Counter(served), {"a": 30, "b": 20, "c": 10})
        self.assertEqual(served[:6], ["a", "a", "a", "b", "b", "c"])

    def test_weight_one_is_plain_round_robin_in_order_of_arrival(self) -> None:
        turns = Turns(self)
        holder = turns.take(key("hold"))
        for name in ("a", "a", "a", "b", "c", "c"):
            turns.queue(key(name))
        self.assertEqual(turns.order(holder, 6), ["a", "b", "c", "a", "c", "a"])

    def test_a_weight_is_a_share_of_turns_not_a_claim_on_empty_ones(self) -> None:
        # b's one request is served in a's first round; a then has the slot to itself
        turns = Turns(self)
        holder = turns.take(key("hold"))
        for _ in range(4):
            turns.queue(key("a", weight=3))
        turns.queue(key("b", weight=5))
        self.assertEqual(turns.order(holder, 5), ["a", "a", "a", "b", "a"])

    def test_users_of_an_app_share_its_turns_by_their_weights(self) -> None:
        # The app and a plain key alternate (weight 1 each); inside the app's turns
        # boss (weight 3) is served three times for each of kid's.
        turns = Turns(self)
        holder = turns.take(key("hold"))
        for _ in range(12):
            turns.queue(user("app", "boss", weight=3))
        for _ in range(12):
            turns.queue(user("app", "kid"))
        for _ in range(12):
            turns.queue(key("plain"))
        served = turns.order(holder, 16)
        self.assertEqual(Counter(served), {"plain": 8, "app/user:boss": 6, "app/user:kid": 2})
        self.assertEqual([name for name in served if name != "plain"],
                         ["app/user:boss"] * 3 + ["app/user:kid"] + ["app/user:boss"] * 3
                         + ["app/user:kid"])

    def test_an_app_keys_weight_counts_against_other_keys(self) -> None:
        turns = Turns(self)
        holder = turns.take(key("hold"))
        for name in ("u1", "u2") * 10:
            turns.queue(user("app", name, app_turns=(3, 0)))
        for _ in range(10):
            turns.queue(key("plain"))
        served = turns.order(holder, 16)
        self.assertEqual(Counter("plain" if name == "plain" else "app" for name in served),
                         {"app": 12, "plain": 4})
        self.assertEqual(Counter(name for name in served if name != "plain"),
                         {"app/user:u1": 6, "app/user:u2": 6}, "users of equal weight alternate")

    def test_a_key_at_its_own_limit_lets_the_next_go_and_keeps_its_place(self) -> None:
        turns = Turns(self, limit=2)
        capped = turns.take(key("a", weight=3, limit=1))
        holder = turns.take(key("hold"))
        for _ in range(3):
            turns.queue(key("a", weight=3, limit=1))
        turns.queue(key("b"))
        turns.queue(key("b"))
        self.assertEqual(turns.pass_on(holder).identity, "b", "a is at its limit of 1")
        second = turns.pass_on(capped)  # a's slot comes back: a is first in line again
        self.assertEqual(second.identity, "a")
        turns.holder = second


class PriorityTests(unittest.TestCase):
    def test_a_higher_priority_is_served_first_whatever_the_order_of_arrival(self) -> None:
        turns = Turns(self)
        holder = turns.take(key("hold"))
        for name, priority in (("low", 0), ("low", 0), ("mid", 5), ("high", 9), ("mid", 5), ("high", 9)):
            turns.queue(key(name, priority=priority))
        self.assertEqual(turns.order(holder, 6), ["high", "high", "mid", "mid", "low", "low"])

    def test_a_negative_priority_waits_for_the_default_class(self) -> None:
        turns = Turns(self)
        holder = turns.take(key("hold"))
        turns.queue(key("batch", priority=-1))
        turns.queue(key("chat"))
        self.assertEqual(turns.order(holder, 2), ["chat", "batch"])

    def test_a_lower_class_waits_no_longer_than_the_setting_then_takes_turns_with_the_top(self) -> None:
        turns = Turns(self)
        holder = turns.take(key("hold"))
        turns.queue(key("low"))
        for _ in range(20):
            turns.queue(key("high", priority=1))
        turns.clock.advance(MAX_WAIT - 0.5)
        served = turns.order(holder, 4)
        self.assertEqual(served, ["high"] * 4, "not yet: held back while the top class waits")
        turns.clock.advance(0.5)  # low has now waited PRIORITY_MAX_WAIT_SECONDS
        self.assertEqual(turns.order(turns.holder, 1), ["low"], "first in line of the top class now")

    def test_late_requests_take_turns_with_the_top_class_not_over_it(self) -> None:
        # Every low request is overdue, yet high still gets its turns: a flood of old
        # low-priority requests cannot starve the higher class in its turn.
        turns = Turns(self)
        holder = turns.take(key("hold"))
        for _ in range(10):
            turns.queue(key("low"))
        turns.clock.advance(MAX_WAIT)
        for _ in range(20):
            turns.queue(key("high", priority=1, weight=2))  # fresh: not late themselves
        served = turns.order(holder, 12)
        self.assertEqual(Counter(served), {"high": 8, "low": 4})
        self.assertEqual(served[:6], ["low", "high", "high", "low", "high", "high"])

    def test_users_priority_ranks_them_within_their_app(self) -> None:
        turns = Turns(self)
        holder = turns.take(key("hold"))
        turns.queue(user("app", "kid"))
        turns.queue(user("app", "parent", priority=1))
        turns.queue(key("plain"))
        turns.queue(user("app", "kid"))
        # the app's turn goes to its parent first; the app and plain still alternate
        self.assertEqual(turns.order(holder, 4),
                         ["app/user:parent", "plain", "app/user:kid", "app/user:kid"])

    def test_a_reloaded_priority_moves_the_keys_waiting_requests_with_its_next_one(self) -> None:
        turns = Turns(self)
        holder = turns.take(key("hold"))
        turns.queue(key("b"))
        turns.queue(key("a"))
        turns.queue(key("b"))
        turns.queue(key("a", priority=5))  # queued after the keys file gave a priority 5
        self.assertEqual(turns.order(holder, 4), ["a", "a", "b", "b"])

    def test_a_withdrawn_request_leaves_no_lane_behind(self) -> None:
        turns = Turns(self)
        holder = turns.take(key("hold"))
        gone = turns.queue(key("gone", priority=5))
        turns.queue(key("stays"))
        turns.gate.withdraw(gone)
        turns.queued.remove(gone)
        self.assertEqual(turns.gate.counts("gone"), (0, 0))
        self.assertEqual(turns.order(holder, 1), ["stays"])
        self.assertEqual((turns.gate.waiting, turns.gate.in_flight), (0, 1))


class PolicyFieldTests(unittest.TestCase):
    def test_the_setting_and_the_fields_parse(self) -> None:
        self.assertEqual(Config().priority_max_wait, 10.0)
        self.assertEqual(Config.from_env({"PRIORITY_MAX_WAIT_SECONDS": "2.5"}).priority_max_wait, 2.5)
        with self.assertRaises(ConfigError):
            Config.from_env({"PRIORITY_MAX_WAIT_SECONDS": "soon"})
        policies = llm_proxy.parse_keys_file(json.dumps({
            "k1": {"weight": 3, "priority": -2},
            "k2": {"users": {"from": "header", "header": "X-User", "weight": 2,
                             "overrides": {"ann": {"priority": 4}}}}}), Config())
        (_, first), (_, second) = policies.values()
        self.assertEqual((first.weight, first.priority), (3, -2))
        self.assertEqual((second.weight, second.priority), (1, 0))
        users = second.users
        assert users is not None
        self.assertEqual((users.default.weight, users.default.priority), (2, 0))
        ann = users.policy_for(llm_proxy.user_digest("ann"))
        self.assertEqual((ann.weight, ann.priority), (2, 4), "an override takes the users' default")



class KeysFileTurnsTests(ProxyTestCase):
    """Weights and priorities from the keys file, over real sockets, one upstream slot."""

    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.keys_path = os.path.join(directory.name, "keys.json")
        self.write_keys({CLIENT_KEY: {"name": "heavy", "weight": 3, "max_tokens": 100},
                         OTHER_KEY: {"name": "light", "max_tokens": 100},
                         THIRD_KEY: {"name": "urgent", "priority": 1, "max_tokens": 100}})
        self.config_overrides = {"keys_file": self.keys_path, "upstream_max_concurrent": 1,
                                 "priority_max_wait": MAX_WAIT}
        self.jobs: list[tuple[threading.Thread, list]] = []
        super().setUp()

    def write_keys(self, keys: object) -> None:
        with open(self.keys_path + ".tmp", "w") as file:
            file.write(keys if isinstance(keys, str) else json.dumps(keys))
        os.replace(self.keys_path + ".tmp", self.keys_path)

    def background(self, key: str, tag: str, headers: dict | None = None) -> None:
        """Send a chat tagged ``tag`` from a thread; returns once it holds the slot or waits."""
        gate = self.proxy.upstreams.default.gate
        before = gate.waiting + len(self.upstream.requests)
        outcome: list = []

        def send() -> None:
            try:
                outcome.append(self.chat(tag, key=key, headers=headers).status)
            except Exception as error:  # recorded for finish() to report
                outcome.append(error)

        thread = threading.Thread(target=send)
        thread.start()
        self.addCleanup(thread.join, WAIT)
        self.jobs.append((thread, outcome))
        self.wait_for(lambda: gate.waiting + len(self.upstream.requests) > before)

    def served_order(self) -> list[str]:
        """Let the held request go; every request answers 200; the order they reached the upstream."""
        self.upstream.release.set()
        for thread, outcome in self.jobs:
            thread.join(WAIT)
            self.assertEqual(outcome, [200])
        return [json.loads(r["body"])["messages"][0]["content"] for r in self.upstream.requests]

    def hold(self) -> None:
        self.background(OTHER_KEY, "hold", {"X-Fake": "hold"})
        self.wait_for(lambda: len(self.upstream.requests) == 1)

    def test_a_keys_weight_gives_it_three_turns_to_one(self) -> None:
        self.hold()
        for index in range(6):
            self.background(CLIENT_KEY, f"heavy{index}")
        for index in range(2):
            self.background(OTHER_KEY, f"light{index}")
        self.assertEqual(self.served_order(), ["hold", "heavy0", "heavy1", "heavy2", "light0",
                                               "heavy3", "heavy4", "heavy5", "light1"])

    def test_a_keys_priority_is_served_first_and_a_late_one_joins_it(self) -> None:
        self.hold()
        self.background(CLIENT_KEY, "early")
        self.clock.advance(MAX_WAIT)  # early has waited PRIORITY_MAX_WAIT_SECONDS
        self.background(OTHER_KEY, "light")
        self.background(THIRD_KEY, "urgent0")
        self.background(THIRD_KEY, "urgent1")
        # early, late, is first in line of the top class; light waits for urgent
        self.assertEqual(self.served_order(), ["hold", "early", "urgent0", "urgent1", "light"])

    def test_an_app_users_weight_from_the_overrides(self) -> None:
        self.write_keys({CLIENT_KEY: {"name": "webui", "max_tokens": 100, "users": {
            "from": "header", "header": "X-User", "max_tokens": 100,
            "overrides": {"Boss@Home": {"weight": 3}}}},
            OTHER_KEY: {"name": "light", "max_tokens": 100}})
        self.assertTrue(self.proxy.keyring.reload_if_changed())
        self.hold()
        for index in range(4):
            self.background(CLIENT_KEY, f"boss{index}", {"X-User": "boss@home"})
        for index in range(2):
            self.background(CLIENT_KEY, f"kid{index}", {"X-User": "kid@home"})
        self.assertEqual(self.served_order(), ["hold", "boss0", "boss1", "boss2", "kid0", "boss3",
                                               "kid1"])

    def test_bad_weights_and_priorities_are_refused_with_a_clear_message(self) -> None:
        bad = [({"weight": 0}, "weight must be a whole number from 1 to 1000"),
               ({"weight": -2}, "weight must be"), ({"weight": 1.5}, "weight must be"),
               ({"weight": "3"}, "weight must be"), ({"weight": True}, "weight must be"),
               ({"weight": 1001}, "weight must be"), ({"weight": None}, "weight must be"),
               ({"priority": "high"}, "priority must be a whole number from -1000 to 1000"),
               ({"priority": 2.0}, "priority must be"), ({"priority": False}, "priority must be"),
               ({"priority": 10 ** 6}, "priority must be"),
               ({"users": {"from": "header", "header": "X-User", "weight": 0}},
                "entry 1 (k) users: weight must be"),
               ({"users": {"from": "header", "header": "X-User",
                           "overrides": {"ann": {"priority": "first"}}}},
                "entry 1 (k) users ann: priority must be")]
        for fields, message in bad:
            with self.subTest(fields=fields):
                self.write_keys({"sk-secret-1": dict({"name": "k"}, **fields)})
                with self.assertRaises(ConfigError) as raised:
                    ProxyServer(replace(self.config, keys_file=self.keys_path))
                self.assertIn(message, str(raised.exception))
                self.assertIn("KEYS_FILE", str(raised.exception))
                self.assertNotIn("sk-secret-1", str(raised.exception))

    def test_a_broken_edit_keeps_the_last_good_weights(self) -> None:
        self.write_keys({CLIENT_KEY: {"name": "heavy", "weight": 0}})
        self.assertFalse(self.proxy.keyring.reload_if_changed())
        errors = [line for line in self.log.lines if "KEYS_FILE" in line and "keeping" in line]
        self.assertEqual(len(errors), 1, self.log.lines)
        self.assertIn("weight must be a whole number", errors[0])
        self.assertNotIn(CLIENT_KEY, errors[0])
        self.test_a_keys_weight_gives_it_three_turns_to_one()  # the old file still rules


if __name__ == "__main__":
    unittest.main()
