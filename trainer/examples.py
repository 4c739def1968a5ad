"""Vote events -> training examples: one `PromptGroup` per event (a batch element per prompt).

- choice a / b: one ordered pair; tie: tie pairs (says the answers are equal, nothing about quality);
  a ranking of K (up to 9): every pair of answers in different groups, best first, and a tie pair for
  answers in the same group — all C(K,2) pairs stay one group.
- both_bad: both answers undesirable (not a tie); thumbs up / down: the one answer desirable /
  undesirable. Labels train the reward model pointwise and the policy with KTO.
- an edit: the edited answer is appended as a demonstration (SFT) and preferred to the answer it
  replaced (an ordered pair).
- A fixed share of events, chosen by a hash of the comparison id, is held out for evaluation.
"""

from __future__ import annotations

import hashlib
import re
from itertools import combinations

from pydantic import BaseModel

from feedback.contract.comparisons import ChatMessage
from feedback.contract.events import FeedbackEvent


class PromptGroup(BaseModel):
    comparison_id: str
    event_id: str
    messages: list[ChatMessage]
    answers: list[str]
    pairs: list[tuple[int, int]]  # (preferred, other)
    ties: list[tuple[int, int]]
    open_ended: bool
    desirable: list[int] = []  # answers labelled good (thumbs up)
    undesirable: list[int] = []  # answers labelled bad (thumbs down, both bad)
    demonstrations: list[int] = []  # answers a user wrote (edits)
    # per answer: did it end by itself (finish_reason "stop"), or was it cut at max_tokens? Only an answer
    # that stopped is trained with an end-of-sequence token. Empty (older checkpoints): all stopped.
    stopped: list[bool] = []
    # how serving sampled the answers: a round's rollouts sample the same way (what users see)
    max_tokens: int | None = None
    temperature: float | None = None

    def ended(self, i: int) -> bool:
        """Did answer `i` stop by itself (a user's edit always does)?"""
        return self.stopped[i] if i < len(self.stopped) else True

    @property
    def labelled(self) -> list[tuple[int, bool]]:
        """(answer index, desirable?) for every labelled answer."""
        return [(i, True) for i in self.desirable] + [(i, False) for i in self.undesirable]


def prompt_key(messages: list[ChatMessage]) -> str:
    """One conversation's identity: every message, role and text."""
    return "\x1e".join(f"{m.role}:{m.content}" for m in messages)


def is_held_out(key: str, percent: float) -> bool:
    """Stable across restarts and machines: the same key (a conversation's `prompt_key`: a repeated prompt
    must not be on both sides) is always on the same side."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return (h % 10_000) < percent * 100


_OPEN = re.compile(r"\b(write|story|poem|haiku|imagine|ideas?|suggest|brainstorm|opinion|describe|creative|"
                   r"essay|tips|advice|recommend|what do you think|how would you|why)\b", re.I)
_CLOSED = re.compile(r"(\d\s*[-+*/^=]\s*\d)|\b(how many|how much|what is|what's|when did|when was|who is|who was|"
                     r"which|capital of|true or false|yes or no|translate|convert|calculate|solve|spell)\b", re.I)


def open_ended_heuristic(prompt: str) -> bool:
    """Is the prompt open-ended (many good answers) rather than closed (one right answer)?
    Documented heuristic: creative/advice/opinion cues ("write", "story", "ideas", "why", ...) mean
    open-ended; factual or arithmetic cues ("what is", "how many", "2+2", "translate", ...) mean
    closed; with neither, a prompt longer than 12 words counts as open-ended."""
    if _OPEN.search(prompt):
        return True
    if _CLOSED.search(prompt):
        return False
    return len(prompt.split()) > 12


def to_prompt_group(event: FeedbackEvent) -> PromptGroup:
    k = len(event.comparison.answers)
    answers = [a.text for a in event.comparison.answers]
    pairs: list[tuple[int, int]] = []
    ties: list[tuple[int, int]] = []
    desirable: list[int] = []
    undesirable: list[int] = []
    demonstrations: list[int] = []
    stopped = [a.finish_reason == "stop" for a in event.comparison.answers]
    if event.kind == "edit":
        answers.append(event.edit.text)
        stopped.append(True)
        pairs, demonstrations = [(k, event.edit.index)], [k]
    elif event.kind == "rating":
        (desirable if event.rating == "up" else undesirable).append(0)
    elif event.choice == "both_bad":
        undesirable = list(range(k))
    elif event.choice == "a":
        pairs = [(0, 1)]
    elif event.choice == "b":
        pairs = [(1, 0)]
    elif event.choice == "tie":
        ties = list(combinations(range(k), 2))
    else:
        groups = event.ranking or []
        for gi, gj in combinations(range(len(groups)), 2):
            pairs += [(w, l) for w in groups[gi] for l in groups[gj]]
        for g in groups:
            ties += list(combinations(g, 2))
    last_user = next((m.content for m in reversed(event.comparison.messages) if m.role == "user"), "")
    open_ended = event.open_ended if event.open_ended is not None else open_ended_heuristic(last_user)
    return PromptGroup(comparison_id=event.comparison.comparison_id, event_id=event.event_id,
                       messages=event.comparison.messages, answers=answers, pairs=pairs, ties=ties,
                       open_ended=open_ended, desirable=desirable, undesirable=undesirable,
                       demonstrations=demonstrations, stopped=stopped,
                       max_tokens=event.comparison.sampling.max_tokens,
                       temperature=event.comparison.sampling.temperature)
