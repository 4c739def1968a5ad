"""Canary tests: users judge a candidate version against the incumbent in blind cross-version pairs,
and an anytime-valid confidence sequence (feedback/sequential.py) decides.

One test at a time, kept in Redis so that every replica sees the same test and a decision survives a
restart of any process:

    duet:canary            HASH  the current (or last) test: CanaryTest's fields
    duet:canary:votes      LIST  "<outcome> <candidate chars> <incumbent chars>" per cross-version vote
                                 (outcome 1 win, 0.5 tie or both bad, 0 loss, for the candidate)
    duet:canary:history    LIST  earlier tests as JSON, newest first (the last 100); a test moves there
                                 when the next candidate's test begins

Every change is one Lua script that checks the test's state first (compare and set): a vote counts only
for the running test of its candidate, and a test is decided once — by the votes, its budget, or an
admin — whoever comes first; the others get "already decided".

The decision (`decide`) is a pure function of the tallies: promote once the lower bound of the win
probability (ties ½) clears the margin, reject once the upper bound falls below it, reject as
undecided when the vote or time budget is spent (the incumbent stays: the burden of proof is on the
candidate). Looking after every vote is allowed: the sequence is valid at all times at once.
"""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel

from feedback.sequential import ConfidenceSequence

from feedback.contract.redis_keys import CANARY, CANARY_HISTORY, CANARY_VOTES  # noqa: F401
HISTORY_KEEP = 100
USERS_JUDGE = "users"  # the judge name of users' cross-version votes on the leaderboard

Status = Literal["running", "paused", "promoted", "rejected"]
Reason = Literal["votes", "budget", "admin", "superseded", "load_failed"]


class CanaryConfig(BaseModel):
    """Settings' canary_* fields, unchanged (DUET_CANARY_*), bound by duet/wiring.py; defaults live there."""
    pair_share: float  # of paired answers while a test runs: one answer from each version
    # ...and while the incumbent's engine has no other request: a cross pair makes the user wait for the
    # candidate's (niced) engine after the incumbent's, which costs little when nobody else waits, and
    # a test is decided by cross-version votes alone (minutes to a decision ∝ 1/share at low traffic)
    pair_share_idle: float
    margin: float  # the candidate must beat the incumbent's win probability by this much
    alpha: float  # two-sided: a candidate equal to the incumbent is promoted ≤ α/2 of the time
    max_votes: int  # undecided after this many cross-version votes: rejected
    max_hours: float  # ...or after this long
    tuned_for: int  # votes at which the confidence sequence is tightest
    # "length_controlled": promote only if, besides the raw rule, the win rate at equal answer lengths also
    # clears the margin — a candidate that wins by writing longer is not promoted (users favour length)
    rule: Literal["raw", "length_controlled"]


class CanaryTest(BaseModel):
    candidate: str
    incumbent: str
    status: Status = "running"
    reason: Reason | None = None
    started_at: float
    decided_at: float | None = None
    wins: int = 0
    ties: int = 0  # ties and both-bad
    losses: int = 0

    @property
    def votes(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def decided(self) -> bool:
        return self.status in ("promoted", "rejected")

    def sequence(self, cfg: CanaryConfig) -> ConfidenceSequence:
        cs = ConfidenceSequence(alpha=cfg.alpha, tuned_for=cfg.tuned_for)
        cs.n, cs.total = self.votes, self.wins + self.ties / 2
        return cs

    def summary(self, cfg: CanaryConfig) -> dict:
        cs = self.sequence(cfg)
        low, high = cs.interval()
        return {**self.model_dump(), "votes": self.votes, "win_rate": cs.mean, "lower": low, "upper": high,
                "margin": cfg.margin, "max_votes": cfg.max_votes, "max_hours": cfg.max_hours}


def outcome(choice: str, candidate_position: int) -> float:
    """The candidate's score in one cross-version vote: 1 if its answer was chosen, ½ for a tie or both
    bad, 0 if the incumbent's was."""
    if choice in ("tie", "both_bad"):
        return 0.5
    return 1.0 if "ab".index(choice) == candidate_position else 0.0


def decide(test: CanaryTest, cfg: CanaryConfig, now: float,
           length_controlled_win_rate: float | None = None) -> tuple[Status, Reason] | None:
    """What the tallies say now: (status, reason) to move to, or None to keep going. Under the
    length-controlled rule a promotion also needs `length_controlled_win_rate` above the margin; this
    only ever withholds promotions, so the raw rule's A/A guarantee still holds."""
    if test.status != "running":
        return None
    verdict = test.sequence(cfg).decide(cfg.margin)
    if verdict == "above" and (cfg.rule == "raw" or (length_controlled_win_rate or 0.0) > cfg.margin):
        return "promoted", "votes"
    if verdict == "below":
        return "rejected", "votes"
    if test.votes >= cfg.max_votes or now - test.started_at >= cfg.max_hours * 3600:
        return "rejected", "budget"
    return None


def trajectory(scores: list[float], cfg: CanaryConfig, points: int = 200) -> list[tuple[int, float, float, float]]:
    """(votes, win rate, lower, upper) after each vote — at most `points` of them, evenly spaced, the last
    always — for the dashboard's chart of the confidence sequence closing in."""
    cs = ConfidenceSequence(alpha=cfg.alpha, tuned_for=cfg.tuned_for)
    step = max(1, len(scores) // points)
    out = []
    for i, x in enumerate(scores, 1):
        cs.update(x)
        if i % step == 0 or i == len(scores):
            low, high = cs.interval()
            out.append((i, cs.mean, low, high))
    return out


def users_battle(test: CanaryTest, length_controlled_win_rate: float | None = None):
    """The test as a battle on the leaderboard, judged by users (feedback/loop_status.py)."""
    from feedback.loop_status import Battle

    return Battle(model_a=test.candidate, model_b=test.incumbent, wins=test.wins, ties=test.ties, losses=test.losses,
                  judge=USERS_JUDGE, length_controlled_win_rate=length_controlled_win_rate)


# --- Redis ------------------------------------------------------------------------------------------
_START = """
-- a new candidate: the running test (if any) is superseded and archived; a new one begins, against users'
-- incumbent as the last test left it (its candidate if promoted, else its incumbent) — not the caller's engine,
-- which may not have swapped a promotion in yet; ARGV[2] only when there was no test
local cur = redis.call('HGETALL', KEYS[1])
local incumbent = ARGV[2]
if #cur > 0 then
  local t = {}
  for i = 1, #cur, 2 do t[cur[i]] = cur[i+1] end
  if t['candidate'] == ARGV[1] then
    return 0  -- the same candidate again (a replayed announcement): its test stands, decided or not
  end
  if t['status'] == 'promoted' then incumbent = t['candidate'] else incumbent = t['incumbent'] end
  if t['status'] == 'running' or t['status'] == 'paused' then
    t['status'] = 'rejected'; t['reason'] = 'superseded'; t['decided_at'] = ARGV[3]
  end
  redis.call('LPUSH', KEYS[3], cjson.encode(t))
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'candidate', ARGV[1], 'incumbent', incumbent, 'status', 'running',
           'started_at', ARGV[3], 'wins', 0, 'ties', 0, 'losses', 0)
return 1
"""

_TALLY = """
-- ARGV: candidate, field (wins/ties/losses), vote line
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'candidate') ~= ARGV[1] then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('RPUSH', KEYS[2], ARGV[3])
return 1
"""

_MOVE = """
-- ARGV: candidate, allowed current statuses (comma separated), new status, reason, now
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'none' end
if redis.call('HGET', KEYS[1], 'candidate') ~= ARGV[1] then return 'other' end
if not string.find(',' .. ARGV[2] .. ',', ',' .. status .. ',', 1, true) then return status end
redis.call('HSET', KEYS[1], 'status', ARGV[3])
if ARGV[3] == 'promoted' or ARGV[3] == 'rejected' then
  redis.call('HSET', KEYS[1], 'reason', ARGV[4], 'decided_at', ARGV[5])
end
return 'ok'
"""


def _test_from(raw: dict) -> CanaryTest | None:
    """The CANARY hash as read (str or bytes, as the client decodes) → the test, if any."""
    raw = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
           for k, v in raw.items()}
    return CanaryTest.model_validate(raw) if raw else None


def _history_from(lines: list) -> list[CanaryTest]:
    return [CanaryTest.model_validate(json.loads(x)) for x in lines]


def read_canary(r) -> tuple[CanaryTest | None, list[CanaryTest]]:
    """The current test and the history, with a sync client (the trainer)."""
    return _test_from(r.hgetall(CANARY)), _history_from(r.lrange(CANARY_HISTORY, 0, -1))


def users_incumbent(current: CanaryTest | None, history: list[CanaryTest]) -> str | None:
    """The version users last promoted (None: none yet, the base model serves)."""
    for t in ([current] if current else []) + history:
        if t.status == "promoted":
            return t.candidate
    return None


class CanaryStore:
    """The test in Redis; async client with decode_responses (serving)."""

    def __init__(self, redis_client) -> None:
        self.redis = redis_client
        self._start = redis_client.register_script(_START)
        self._tally = redis_client.register_script(_TALLY)
        self._move = redis_client.register_script(_MOVE)

    async def current(self) -> CanaryTest | None:
        return _test_from(await self.redis.hgetall(CANARY))

    async def start(self, candidate: str, incumbent: str) -> bool:
        """Begin testing `candidate` (superseding a test still running) against users' incumbent as the store
        knows it; `incumbent` (the caller's engine) only for the first test. False if it is already tested."""
        return bool(await self._start(keys=[CANARY, CANARY_VOTES, CANARY_HISTORY],
                                      args=[candidate, incumbent, time.time(), HISTORY_KEEP]))

    async def tally(self, candidate: str, score: float, candidate_chars: int, incumbent_chars: int) -> bool:
        """Count one cross-version vote for the running test of `candidate`; False if none runs."""
        field = "wins" if score == 1.0 else "losses" if score == 0.0 else "ties"
        return bool(await self._tally(keys=[CANARY, CANARY_VOTES],
                                      args=[candidate, field, f"{score} {candidate_chars} {incumbent_chars}"]))

    async def move(self, candidate: str, allowed: tuple[Status, ...], to: Status, reason: Reason | None = None) -> str:
        """Compare and set: 'ok', or why not ('none', 'other' candidate, or the test's current status)."""
        return await self._move(keys=[CANARY], args=[candidate, ",".join(allowed), to, reason or "", time.time()])

    async def last_promoted(self) -> str | None:
        """The newest candidate users promoted: what a restarted replica serves."""
        return users_incumbent(await self.current(), await self.history())

    async def history(self) -> list[CanaryTest]:
        return _history_from(await self.redis.lrange(CANARY_HISTORY, 0, -1))

    async def votes(self) -> list[tuple[float, int, int]]:
        """(outcome, candidate chars, incumbent chars) per counted vote, for the length-controlled rate."""
        out = []
        for line in await self.redis.lrange(CANARY_VOTES, 0, -1):
            s, a, b = line.split()
            out.append((float(s), int(a), int(b)))
        return out
