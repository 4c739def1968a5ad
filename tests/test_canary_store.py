"""Canary tests in Redis: one decision per test whoever asks, votes only for the running test of their
candidate, a replayed announcement keeps its test, history of superseded tests; and the pure decision."""

from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis

from feedback.canary import CanaryStore, CanaryTest, decide, outcome
from tests.conftest import TEST_REDIS_DB
from duet.wiring import canary_config

REDIS_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB + 2}"  # its own database: the session server uses 13


def with_store(test) -> None:
    """Run `test(store)` on an empty database of its own, in one event loop (the client is bound to it)."""
    async def go():
        r = aioredis.from_url(REDIS_URL, decode_responses=True)
        await r.flushdb()
        try:
            await test(CanaryStore(r))
        finally:
            await r.flushdb()
            await r.aclose()
    asyncio.run(go())


def test_outcome_is_the_candidates_score():
    assert outcome("a", candidate_position=0) == 1.0 and outcome("b", candidate_position=0) == 0.0
    assert outcome("b", candidate_position=1) == 1.0 and outcome("a", candidate_position=1) == 0.0
    assert outcome("tie", 0) == outcome("both_bad", 1) == 0.5


def test_decide_promotes_rejects_and_stops_at_the_budget():
    cfg = canary_config(max_votes=500, max_hours=1)
    t = CanaryTest(candidate="v2", incumbent="v1", started_at=0.0)
    assert decide(t, cfg, now=10) is None  # no votes: undecided
    assert decide(t.model_copy(update={"wins": 150, "losses": 50}), cfg, now=10) == ("promoted", "votes")
    assert decide(t.model_copy(update={"wins": 50, "losses": 150}), cfg, now=10) == ("rejected", "votes")
    even = t.model_copy(update={"wins": 240, "ties": 19, "losses": 240})
    assert decide(even, cfg, now=10) is None
    assert decide(even.model_copy(update={"ties": 20}), cfg, now=10) == ("rejected", "budget")
    assert decide(t, cfg, now=3600) == ("rejected", "budget")
    assert decide(t.model_copy(update={"status": "paused", "wins": 200}), cfg, now=10) is None  # paused: waits
    # the length-controlled rule withholds a promotion won by length alone, and nothing else
    lc = canary_config(max_votes=500, rule="length_controlled")
    ahead = t.model_copy(update={"wins": 150, "losses": 50})
    assert decide(ahead, lc, now=10, length_controlled_win_rate=0.45) is None
    assert decide(ahead, lc, now=10, length_controlled_win_rate=0.7) == ("promoted", "votes")
    assert decide(t.model_copy(update={"wins": 50, "losses": 150}), lc, now=10, length_controlled_win_rate=0.9) == (
        "rejected", "votes")


def test_aa_candidates_are_rarely_promoted():
    """Candidate = incumbent, 200 tests of up to 500 votes looked at after every vote. With α = 0.1 the
    promotion rate is at most 5 % in theory; at that rate 200 tests show more than 20 promotions with
    probability < 0.1 % (binomial tail): the false-failure rate of this test."""
    cfg = canary_config(max_votes=500)
    rng = random.Random(3)
    promoted = 0
    for _ in range(200):
        t = CanaryTest(candidate="v2", incumbent="v1", started_at=0.0)
        while (d := decide(t, cfg, now=1.0)) is None:
            x = rng.choice((1.0, 0.5, 0.0, 1.0, 0.0))
            t = t.model_copy(update={"wins": t.wins + (x == 1.0), "ties": t.ties + (x == 0.5),
                                     "losses": t.losses + (x == 0.0)})
        promoted += d[0] == "promoted"
    assert promoted <= 20


def test_one_decision_whoever_asks():
    async def go(store):
        assert await store.start("v2", "v1")
        assert await store.tally("v2", 1.0, 40, 80) and await store.tally("v2", 0.5, 10, 10)
        assert not await store.tally("v9", 1.0, 1, 1)  # not the candidate under test
        t = await store.current()
        assert (t.candidate, t.incumbent, t.status, t.wins, t.ties, t.losses) == ("v2", "v1", "running", 1, 1, 0)
        assert await store.votes() == [(1.0, 40, 80), (0.5, 10, 10)]
        # pause: votes are not counted; resume
        assert await store.move("v2", ("running",), "paused") == "ok"
        assert not await store.tally("v2", 1.0, 1, 1)
        assert await store.move("v2", ("paused",), "running") == "ok"
        # the votes' decider and an admin race: exactly one wins
        results = await asyncio.gather(store.move("v2", ("running", "paused"), "promoted", "votes"),
                                       store.move("v2", ("running", "paused"), "rejected", "admin"))
        assert sorted(results) in (["ok", "promoted"], ["ok", "rejected"])
        assert (await store.current()).decided
        assert await store.move("v2", ("running", "paused"), "rejected", "admin") in ("promoted", "rejected")
        assert await store.move("v7", ("running",), "rejected", "admin") == "other"
        # a replayed announcement of a decided-promoted candidate does not restart it
        if (await store.current()).status == "promoted":
            assert not await store.start("v2", "v1")
        # the next candidate: the old test goes to the history
        assert await store.start("v3", "v2")
        assert [h.candidate for h in await store.history()] == ["v2"]
        assert await store.votes() == []
        # a newer candidate while v3 runs supersedes it; v3's votes stay with v3 and do not count for v4
        assert await store.tally("v3", 1.0, 5, 5) and await store.tally("v3", 1.0, 5, 5)
        assert await store.start("v4", "v2")
        v3 = (await store.history())[0]
        assert (v3.candidate, v3.status, v3.reason, v3.wins) == ("v3", "rejected", "superseded", 2)
        v4 = await store.current()
        assert (v4.candidate, v4.status, v4.votes) == ("v4", "running", 0) and await store.votes() == []
        assert not await store.tally("v3", 1.0, 5, 5)  # a late vote on a v3 pair counts for no one
        assert (await store.current()).votes == 0
        assert not await store.start("v4", "v2")  # the same announcement again
    with_store(go)


def test_no_test_at_all():
    async def go(store):
        assert await store.current() is None
        assert await store.move("v2", ("running",), "promoted", "admin") == "none"
        assert not await store.tally("v2", 1.0, 1, 1)
    with_store(go)


def test_a_new_test_is_against_users_incumbent_not_the_callers_engine():
    async def go(store):
        assert await store.start("v1", "base")  # the first test: the announcing replica's engine names it
        assert (await store.current()).incumbent == "base"
        assert await store.move("v1", ("running",), "promoted", "votes") == "ok"
        assert await store.start("v2", "base")  # announced before this replica swapped v1 in
        assert (await store.current()).incumbent == "v1"
        assert await store.move("v2", ("running",), "rejected", "votes") == "ok"
        assert await store.start("v3", "v2")  # users kept v1, whatever the caller's engine says
        assert (await store.current()).incumbent == "v1"
        assert await store.start("v4", "base")  # superseding a running test: its incumbent stands
        assert (await store.current()).incumbent == "v1"
    with_store(go)
