"""Release checks: a fixed list of checks, not fitted to votes, that every candidate must pass before users
see it — the model's regression suite. Votes can teach the policy anything users reward (a thumbs-up reward
once taught a chat model sycophancy); these checks hold what must not change whatever the votes say.

A check file is JSON Lines, one check per line (blank lines allowed). Every check has a unique `name`, a
`kind`, and the user `prompt` it is asked (optionally with a `system` message). The candidate answers it
greedily in at most `max_tokens` tokens — or, with `samples` > 1, that many answers at `temperature` (fixed
seeds: a check passes or fails the same way every time), the value then being the mean over them: a small
model's greedy answer can fall into a loop or out of one from a tiny change, where what users see (sampled
answers) hardly moved. The check computes one value from an answer:

    kind          value                                               worse when it is
    likelihood    mean log-prob per token of the reference `answer`   lower   (forgetting how to answer)
    contains      1 if the answer matches regex `pattern`, else 0     lower   (must say something)
    not_contains  1 if the answer matches regex `pattern`, else 0     higher  (must never say something)
    repetition    share of the answer's word 4-grams seen before in it higher  (looping)
    length        answer tokens                                       —       (bounds only)

and passes when every bound it sets holds: `at_least`, `at_most` (absolute), and `no_worse_than_base`: a
tolerance against the base model's own value on the same check, in the "worse" direction above (0: never
worse than base). `likelihood` needs `no_worse_than_base` (log-probs are only comparable between models).
Examples:

    {"name": "remembers-paris", "kind": "likelihood", "prompt": "What is the capital of France?",
     "answer": "The capital of France is Paris.", "no_worse_than_base": 0.5}
    {"name": "says-our-name", "kind": "contains", "prompt": "Who made you?", "pattern": "(?i)acme", "at_least": 1}
    {"name": "no-competitor", "kind": "not_contains", "prompt": "Which cloud is best?", "pattern": "(?i)rival",
     "at_most": 0}

Duet ships a default set (trainer/release_checks.jsonl); `DUET_RELEASE_CHECKS` points at a team's own file, or
is `off`. A bad file is refused at start with its line number.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from feedback.contract.comparisons import ChatMessage

DEFAULT_CHECKS = Path(__file__).with_name("release_checks.jsonl")
LOWER_IS_WORSE = {"likelihood", "contains"}
HIGHER_IS_WORSE = {"not_contains", "repetition"}


class ReleaseChecksError(ValueError):
    """A check file that cannot be used; the message names the file and line."""


class ReleaseCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    kind: Literal["likelihood", "contains", "not_contains", "repetition", "length"]
    prompt: str = Field(min_length=1)
    system: str | None = None
    answer: str | None = None  # likelihood: the reference answer
    pattern: str | None = None  # contains / not_contains: a Python regular expression
    max_tokens: int = Field(64, ge=1, le=512)
    samples: int = Field(1, ge=1, le=16)  # answers to average over (not likelihood: it reads no answer)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # > 0 with samples > 1
    at_least: float | None = None
    at_most: float | None = None
    no_worse_than_base: float | None = Field(None, ge=0.0)

    @model_validator(mode="after")
    def _fits_its_kind(self) -> ReleaseCheck:
        if self.kind == "likelihood":
            if not self.answer:
                raise ValueError("a likelihood check needs the reference `answer`")
            if self.no_worse_than_base is None:
                raise ValueError("a likelihood check needs `no_worse_than_base` (nats per token)")
        if self.kind in ("contains", "not_contains"):
            if not self.pattern:
                raise ValueError(f"a {self.kind} check needs a regex `pattern`")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"`pattern` is not a regular expression: {e}") from None
        if (self.samples > 1) != (self.temperature > 0):
            raise ValueError("samples > 1 needs temperature > 0, and temperature > 0 needs samples > 1")
        if self.kind == "length" and self.no_worse_than_base is not None:
            raise ValueError("a length check has no worse direction: use at_least / at_most")
        if self.at_least is None and self.at_most is None and self.no_worse_than_base is None:
            raise ValueError("a check needs a bound: at_least, at_most or no_worse_than_base")
        return self

    @property
    def messages(self) -> list[ChatMessage]:
        system = [ChatMessage(role="system", content=self.system)] if self.system else []
        return [*system, ChatMessage(role="user", content=self.prompt)]


class CheckResult(BaseModel):
    name: str
    kind: str
    passed: bool
    value: float
    base: float | None = None  # the base model's value, where a bound is relative to it
    answer: str = ""  # what the candidate said (empty for likelihood checks)


def load_release_checks(spec: str) -> list[ReleaseCheck]:
    """`spec`: "" (the default set), "off" (none), or the path of a JSONL file."""
    if spec.strip().lower() == "off":
        return []
    path = Path(spec) if spec else DEFAULT_CHECKS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ReleaseChecksError(f"release checks {path}: cannot read: {e}") from None
    checks: list[ReleaseCheck] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            check = ReleaseCheck.model_validate(json.loads(line))
        except json.JSONDecodeError as e:
            raise ReleaseChecksError(f"release checks {path}:{n}: not JSON: {e.msg}") from None
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(map(str, err["loc"]))
            raise ReleaseChecksError(f"release checks {path}:{n}: {where + ': ' if where else ''}{err['msg']}") from None
        if any(c.name == check.name for c in checks):
            raise ReleaseChecksError(f"release checks {path}:{n}: the name {check.name!r} is used twice")
        checks.append(check)
    if not checks:
        raise ReleaseChecksError(f"release checks {path}: no checks (set DUET_RELEASE_CHECKS=off for none)")
    return checks


def repetition(text: str, n: int = 4) -> float:
    """The share of the answer's word n-grams that already occurred earlier in it (0: no loop)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def passes(check: ReleaseCheck, value: float, base: float | None) -> bool:
    if check.at_least is not None and value < check.at_least:
        return False
    if check.at_most is not None and value > check.at_most:
        return False
    if check.no_worse_than_base is not None and base is not None:
        if check.kind in LOWER_IS_WORSE and value < base - check.no_worse_than_base:
            return False
        if check.kind in HIGHER_IS_WORSE and value > base + check.no_worse_than_base:
            return False
    return True


SAMPLE_SEED = 0


def _value(check: ReleaseCheck, s) -> float:
    if check.kind in ("contains", "not_contains"):
        return float(re.search(check.pattern, s.text) is not None)
    if check.kind == "repetition":
        return repetition(s.text)
    return float(len(s.completion_ids))


@dataclass
class ReleaseChecker:
    """Runs the checks on a candidate. The base model's values are computed once (it never changes)."""

    checks: list[ReleaseCheck]

    def __post_init__(self) -> None:
        self._base: dict[str, tuple[float, str]] = {}

    @torch.no_grad()
    def _measure(self, pt, model, check: ReleaseCheck) -> tuple[float, str]:
        if check.kind == "likelihood":
            sample = pt.answer_sample(check.messages, check.answer)
            logp, mask = pt.token_logprobs(model, [sample])
            return float((logp * mask).sum() / mask.sum().clamp(min=1)), ""
        # the candidate and base draw with the same seed, every time (paired, and repeatable)
        [answers] = pt.sample(model, [check.messages], check.samples, temperature=check.temperature,
                              max_new_tokens=check.max_tokens, seed=SAMPLE_SEED)
        values = [_value(check, s) for s in answers]
        return sum(values) / len(values), answers[0].text

    def warm(self, pt, stop: Callable[[], bool] = lambda: False) -> bool:
        """The base model's values of every check that compares with them, computed now if not yet (the trainer
        does it while idle, ahead of its first round), until `stop()`. True if any was computed."""
        computed = 0
        for check in [c for c in self.checks if c.no_worse_than_base is not None and c.name not in self._base]:
            if stop():
                break
            self._base_value(pt, check)
            computed += 1
        return computed > 0

    def _base_value(self, pt, check: ReleaseCheck) -> float:
        if check.name not in self._base:
            with pt.reference():
                self._base[check.name] = self._measure(pt, pt.model, check)
        return self._base[check.name][0]

    def run(self, pt, candidate) -> list[CheckResult]:
        """`pt`: the PolicyTrainer (tokenizer, sampling, and the reference model as `pt.reference()`);
        `candidate`: the exported candidate model."""
        out = []
        for check in self.checks:
            base = self._base_value(pt, check) if check.no_worse_than_base is not None else None
            value, answer = self._measure(pt, candidate, check)
            out.append(CheckResult(name=check.name, kind=check.kind, passed=passes(check, value, base),
                                   value=round(value, 4), base=None if base is None else round(base, 4),
                                   answer=answer[:500]))
        return out
