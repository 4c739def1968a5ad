"""The dashboard's JSON (GET /v1/dashboard) and the leaderboard (GET /v1/leaderboard), read from the
loop status in Redis (feedback/loop_status.py). Serving only reads here; the trainer writes."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from pydantic import BaseModel, Field

from feedback import loop_status as ls
from feedback.arena import bootstrap_win_rate, leaderboard
from feedback.canary import USERS_JUDGE, CanaryConfig, CanaryStore, trajectory, users_battle
from feedback.outbox import async_outbox_stats
from feedback.contract.registry import BASE_VERSION


class VoteBucket(BaseModel):
    t: int  # unix seconds at the start of the bucket
    counts: dict[str, int]


class VersionWinRate(BaseModel):
    model_version: str
    against: str
    judge: str
    wins: int
    ties: int
    losses: int
    win_rate: float | None
    ci_low: float | None
    ci_high: float | None


class Dashboard(BaseModel):
    generated_at: float = Field(default_factory=time.time)
    model_version: str | None
    votes_total: dict[str, int]
    votes: list[VoteBucket]
    bucket_s: int
    win_rates: list[VersionWinRate]
    reward_model: list[ls.RewardModelStatus]
    rounds: list[ls.RoundStatus]
    swaps: list[ls.SwapStatus]
    consumer_lag: int | None  # votes on Kafka the trainer has not read (current even during a round)
    votes_untrained: int | None = None  # votes it read but has not trained on yet
    outbox_depth: int
    outbox_oldest_age_s: float
    canary: CanaryPanel | None = None  # with DUET_CANARY=users


class LeaderboardEntry(BaseModel):
    judge: str  # scores are fitted per judge: users' votes are never mixed with a model's opinion
    model_version: str
    score: float
    ci_low: float
    ci_high: float
    battles: int
    length_controlled_score: float | None = None  # users only: the score at equal answer lengths


class CanaryPoint(BaseModel):
    votes: int
    win_rate: float
    lower: float
    upper: float


class CanaryPanel(BaseModel):
    test: dict | None  # CanaryTest.summary(): status, tallies, bounds, margin, budget
    trajectory: list[CanaryPoint]  # the running win rate and its confidence sequence, vote by vote
    decisions: list[dict]  # earlier tests, newest first


class Leaderboard(BaseModel):
    object: str = "leaderboard"
    judge: str | None
    anchor: str = BASE_VERSION
    data: list[LeaderboardEntry]


async def vote_buckets(redis, hours: float, bucket_s: int) -> tuple[list[VoteBucket], dict[str, int]]:
    now = time.time()
    since = now - hours * 3600
    days = range(int(since // 86400), int(now // 86400) + 1)
    hashes = await asyncio.gather(*(redis.hgetall(ls.vote_stats_day_key(d)) for d in days))
    buckets: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    totals: dict[str, int] = defaultdict(int)
    for h in hashes:
        for field, count in h.items():
            minute, _, choice = field.partition(":")
            t = int(minute) * 60
            if t < since:
                continue
            buckets[t - t % bucket_s][choice] += int(count)
            totals[choice] += int(count)
    return [VoteBucket(t=t, counts=dict(c)) for t, c in sorted(buckets.items())], dict(totals)


def win_rates(battles: list[ls.Battle]) -> list[VersionWinRate]:
    sums: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for b in battles:
        s = sums[(b.model_a, b.model_b, b.judge)]
        s[0] += b.wins
        s[1] += b.ties
        s[2] += b.losses
    out = []
    for (a, b, judge), (w, t, l) in sums.items():
        rate, lo, hi = bootstrap_win_rate(w, t, l)
        out.append(VersionWinRate(model_version=a, against=b, judge=judge, wins=w, ties=t, losses=l, win_rate=rate,
                                  ci_low=lo, ci_high=hi))
    return sorted(out, key=lambda r: (r.model_version, r.judge))


async def canary_panel(redis, cfg: CanaryConfig) -> CanaryPanel:
    store = CanaryStore(redis)
    test, history, votes = await asyncio.gather(store.current(), store.history(), store.votes())
    points = await asyncio.to_thread(trajectory, [v[0] for v in votes], cfg)
    return CanaryPanel(test=test.summary(cfg) if test else None,
                       trajectory=[CanaryPoint(votes=n, win_rate=m, lower=lo, upper=hi) for n, m, lo, hi in points],
                       decisions=[h.summary(cfg) for h in history])


async def build_dashboard(redis, model_version: str | None, hours: float = 24.0,
                          canary: CanaryConfig | None = None) -> Dashboard:
    bucket_s = 60 if hours <= 6 else 600
    (votes, totals), rm, rounds, swaps, battles, (depth, age), backlog = await asyncio.gather(
        vote_buckets(redis, hours, bucket_s), ls.aread(redis, ls.REWARD_MODEL, ls.RewardModelStatus, 500),
        ls.aread(redis, ls.ROUNDS, ls.RoundStatus, 200), ls.aread(redis, ls.SWAPS, ls.SwapStatus, 200),
        ls.aread(redis, ls.BATTLES, ls.Battle, 2000), async_outbox_stats(redis), ls.aread_backlog(redis))
    # win-rate rows are bootstrapped: keep that CPU work off the event loop
    rates = await asyncio.to_thread(win_rates, battles)
    return Dashboard(model_version=model_version, votes_total=totals, votes=votes, bucket_s=bucket_s,
                     win_rates=rates, reward_model=rm, rounds=rounds, swaps=swaps,
                     consumer_lag=backlog.consumer_lag if backlog else rm[-1].consumer_lag if rm else None,
                     votes_untrained=backlog.votes_untrained if backlog else None, outbox_depth=depth,
                     outbox_oldest_age_s=age,
                     canary=await canary_panel(redis, canary) if canary else None)


def judge_boards(battles: list[ls.Battle]) -> list[LeaderboardEntry]:
    """Bradley–Terry per judge (ties ½, 95 % bootstrap intervals, base = 1000); for users, beside it the
    score refitted on each test's length-controlled win rate (its verdicts as if the answers were equally
    long: n · p_lc wins, the rest losses)."""
    by_judge: dict[str, list[ls.Battle]] = defaultdict(list)
    for b in battles:
        by_judge[b.judge].append(b)
    out = []
    for judge, group in sorted(by_judge.items(), key=lambda kv: (kv[0] != USERS_JUDGE, kv[0])):
        lc_scores = {}
        if judge == USERS_JUDGE:
            lc = []
            for b in group:
                n = b.wins + b.ties + b.losses
                p = b.length_controlled_win_rate
                if p is not None and n:
                    wins = round(n * p)
                    lc.append(b.model_copy(update={"wins": wins, "ties": 0, "losses": n - wins}))
            lc_scores = {r.model_version: r.score for r in leaderboard(lc, BASE_VERSION)} if lc else {}
        out += [LeaderboardEntry(judge=judge, model_version=r.model_version, score=r.score, ci_low=r.ci_low,
                                 ci_high=r.ci_high, battles=r.battles,
                                 length_controlled_score=lc_scores.get(r.model_version))
                for r in leaderboard(group, BASE_VERSION)]
    return out


async def build_leaderboard(redis, judge: str | None = None, canary: CanaryConfig | None = None) -> Leaderboard:
    battles = await ls.aread(redis, ls.BATTLES, ls.Battle, 5000)
    if canary is not None:  # the running test's votes so far: users' live battle
        test = await CanaryStore(redis).current()
        if test is not None and test.status in ("running", "paused") and test.votes:
            battles.append(users_battle(test))
    if judge:
        battles = [b for b in battles if b.judge == judge]
    return Leaderboard(judge=judge, data=await asyncio.to_thread(judge_boards, battles))
