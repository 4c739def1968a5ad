"""The dashboard's JSON (GET /v1/dashboard) and the leaderboard (GET /v1/leaderboard), read from the
loop status in Redis (feedback/loop_status.py). Serving only reads here; the trainer writes."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from pydantic import BaseModel, Field

from feedback import loop_status as ls
from feedback.arena import bootstrap_win_rate, leaderboard
from feedback.outbox import async_outbox_stats
from feedback.registry import BASE_VERSION


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
    consumer_lag: int | None
    outbox_depth: int
    outbox_oldest_age_s: float


class LeaderboardEntry(BaseModel):
    model_version: str
    score: float
    ci_low: float
    ci_high: float
    battles: int


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


async def build_dashboard(redis, model_version: str | None, hours: float = 24.0) -> Dashboard:
    bucket_s = 60 if hours <= 6 else 600
    (votes, totals), rm, rounds, swaps, battles, (depth, age) = await asyncio.gather(
        vote_buckets(redis, hours, bucket_s), ls.aread(redis, ls.REWARD_MODEL, ls.RewardModelStatus, 500),
        ls.aread(redis, ls.ROUNDS, ls.RoundStatus, 200), ls.aread(redis, ls.SWAPS, ls.SwapStatus, 200),
        ls.aread(redis, ls.BATTLES, ls.Battle, 2000), async_outbox_stats(redis))
    # win-rate rows are bootstrapped: keep that CPU work off the event loop
    rates = await asyncio.to_thread(win_rates, battles)
    return Dashboard(model_version=model_version, votes_total=totals, votes=votes, bucket_s=bucket_s,
                     win_rates=rates, reward_model=rm, rounds=rounds, swaps=swaps,
                     consumer_lag=rm[-1].consumer_lag if rm else None, outbox_depth=depth, outbox_oldest_age_s=age)


async def build_leaderboard(redis, judge: str | None = None) -> Leaderboard:
    battles = await ls.aread(redis, ls.BATTLES, ls.Battle, 5000)
    if judge:
        battles = [b for b in battles if b.judge == judge]
    ratings = await asyncio.to_thread(leaderboard, battles, BASE_VERSION)
    return Leaderboard(judge=judge, data=[LeaderboardEntry(model_version=r.model_version, score=r.score,
                                                           ci_low=r.ci_low, ci_high=r.ci_high, battles=r.battles)
                                          for r in ratings])
