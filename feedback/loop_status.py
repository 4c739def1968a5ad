"""What the dashboard shows about the loop, written where both sides can reach it: Redis streams.

The trainer writes reward-model evaluations, policy rounds and version-vs-parent battles; serving
writes its swaps and counts votes per minute (inside the vote script, see feedback/outbox.py). The
dashboard (serving) only reads. Streams are capped, so they are a recent history, not an archive:
the registry manifests and the metrics are the durable record.

Redis layout:
    duet:loop:reward_model   STREAM  field `json`: RewardModelStatus
    duet:loop:rounds         STREAM  field `json`: RoundStatus
    duet:loop:swaps          STREAM  field `json`: SwapStatus
    duet:loop:battles        STREAM  field `json`: Battle
    duet:loop:backlog        STRING  TrainerBacklog JSON, refreshed every few seconds by the trainer (even
                                     through a policy round); expires when the trainer stops refreshing it
    duet:stats:votes:{day}   HASH    field "{unix minute}:{choice}" -> count; expires after 30 days
"""

from __future__ import annotations

import logging
import time
from typing import Literal, TypeVar

from pydantic import BaseModel, Field

from feedback.contract.redis_keys import BACKLOG, BATTLES, REWARD_MODEL, ROUNDS, SWAPS, vote_stats_day_key  # noqa: F401

log = logging.getLogger(__name__)

BACKLOG_TTL_S = 60
MAXLEN = 10_000
VOTE_STATS_TTL_S = 30 * 86400


def vote_stats_key(ts: float) -> str:
    return vote_stats_day_key(int(ts // 86400))




def vote_stats_field(ts: float, choice: str) -> str:
    return f"{int(ts // 60)}:{choice}"


class RewardModelStatus(BaseModel):
    ts: float = Field(default_factory=time.time)
    step: int
    votes_trained: int
    votes_held_out: int
    held_out_accuracy: float | None
    loss: float | None
    consumer_lag: int | None = None
    votes_quarantined: int = 0  # from voters whose agreement is below chance with confidence (not trained)
    voters_quarantined: int = 0


class TrainerBacklog(BaseModel):
    """What waits for the trainer now: votes on Kafka it has not read, and votes it read but not yet trained."""
    ts: float = Field(default_factory=time.time)
    consumer_lag: int
    votes_untrained: int


class RoundStatus(BaseModel):
    ts: float = Field(default_factory=time.time)
    result: Literal["published", "rejected", "held", "failed"]  # held: trained, published later (canary test)
    version: str | None = None  # set when published
    parent_version: str | None = None
    reward_mean: float | None = None
    kl: float | None = None
    win_rate: float | None = None
    reasons: list[str] = []


class SwapStatus(BaseModel):
    ts: float = Field(default_factory=time.time)
    version: str
    previous: str
    result: str  # ok | refused | rolled_back
    reason: str = ""
    seconds: float
    pause_s: float
    replica: str


MAX_VERDICTS = 100_000  # per outcome in one Battle
NAME = r"^[A-Za-z0-9][A-Za-z0-9._:+/@-]*$"


class Battle(BaseModel):
    """Verdicts between two model versions, from model_a's side: how often a's answer won, tied, lost."""

    ts: float = Field(default_factory=time.time)
    # names as versions and judges are written ("v000003", "base", "simulated:shorter"), no spaces or controls
    model_a: str = Field(min_length=1, max_length=64, pattern=NAME)
    model_b: str = Field(min_length=1, max_length=64, pattern=NAME)
    # bounded: one report is one evaluation's verdicts, not a way to outvote everyone else
    wins: int = Field(ge=0, le=MAX_VERDICTS)
    ties: int = Field(ge=0, le=MAX_VERDICTS)
    losses: int = Field(ge=0, le=MAX_VERDICTS)
    judge: str = Field(min_length=1, max_length=64, pattern=NAME)  # "gate_judges" (the gate), "simulated:<rule>", "human", ...
    # users' canary tests: a's win rate at equal answer lengths (feedback/arena.py length_controlled)
    length_controlled_win_rate: float | None = Field(None, ge=0.0, le=1.0)


M = TypeVar("M", bound=BaseModel)


def record(r, stream: str, item: BaseModel) -> None:
    """Append with a sync client; the loop runs on without its status (a warning) if Redis is away."""
    try:
        r.xadd(stream, {"json": item.model_dump_json()}, maxlen=MAXLEN, approximate=True)
    except Exception as e:
        log.warning("loop status not written to %s: %s", stream, e)


async def arecord(r, stream: str, item: BaseModel) -> None:
    try:
        await r.xadd(stream, {"json": item.model_dump_json()}, maxlen=MAXLEN, approximate=True)
    except Exception as e:
        log.warning("loop status not written to %s: %s", stream, e)


async def aread(r, stream: str, cls: type[M], count: int = 1000) -> list[M]:
    """The newest `count` entries, oldest first."""
    entries = await r.xrevrange(stream, count=count)
    out = []
    for _, fields in reversed(entries):
        raw = fields.get("json") or fields.get(b"json")
        try:
            out.append(cls.model_validate_json(raw))
        except Exception:  # a newer writer's shape: skip, don't break the dashboard
            continue
    return out


def write_backlog(r, backlog: TrainerBacklog) -> None:
    try:
        r.set(BACKLOG, backlog.model_dump_json(), ex=BACKLOG_TTL_S)
    except Exception as e:
        log.warning("trainer backlog not written: %s", e)


async def aread_backlog(r) -> TrainerBacklog | None:
    raw = await r.get(BACKLOG)
    return TrainerBacklog.model_validate_json(raw) if raw else None
