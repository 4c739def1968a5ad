"""Synthetic preference data for tests and benchmarks: answers containing a marker word win."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from feedback.contract.comparisons import Answer, ChatMessage, PendingComparison, SamplingSpec
from feedback.contract.events import FeedbackEvent

TOPICS = ["the sea", "autumn", "coffee", "trains", "mountains", "cats", "the moon", "gardens", "rain", "music",
          "bread", "winter", "rivers", "books", "bicycles", "stars", "forests", "cities", "tea", "birds"]
WORDS = ["quiet", "bright", "slow", "warm", "old", "green", "soft", "long", "deep", "small", "wild", "clear",
         "gentle", "busy", "calm", "golden", "open", "still", "early", "late"]


def _sentence(rng: random.Random, topic: str, n: int) -> str:
    return f"About {topic}: " + " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def marker_event(rng: random.Random, marker: str = "banana", k: int = 2) -> FeedbackEvent:
    """A comparison whose answer containing `marker` is preferred (choice, or ranking for k > 2)."""
    topic = rng.choice(TOPICS)
    winner = rng.randrange(k)
    answers = []
    for i in range(k):
        text = _sentence(rng, topic, rng.randint(6, 14))
        if i == winner:
            words = text.split()
            words.insert(rng.randrange(1, len(words)), marker)
            text = " ".join(words)
        answers.append(Answer(index=i, text=text, finish_reason="stop", model_version="base",
                              completion_tokens=len(text.split())))
    now = datetime.now(UTC)
    cmp = PendingComparison(
        comparison_id=f"cmp_syn{rng.getrandbits(64):016x}", key_id="synthetic", user_hash=None, model="duet",
        messages=[ChatMessage(role="user", content=f"Tell me something about {topic}.")], answers=answers,
        sampling=SamplingSpec(temperature=0.7, top_p=1.0, max_tokens=64), prompt_tokens=12,
        created_at=now, expires_at=now + timedelta(hours=24))
    if k == 2:
        return FeedbackEvent(kind="comparison", key_id="synthetic", user_hash=None, comparison=cmp,
                             choice="a" if winner == 0 else "b")
    rest = [i for i in range(k) if i != winner]
    return FeedbackEvent(kind="comparison", key_id="synthetic", user_hash=None, comparison=cmp,
                         ranking=[[winner], rest])


def marker_rating(rng: random.Random, marker: str = "banana") -> FeedbackEvent:
    """Thumbs on one answer: up when it contains `marker` (half of them do)."""
    event = marker_event(rng, marker, k=2)
    good = rng.random() < 0.5
    winner = "ab".index(event.choice)
    answer = event.comparison.answers[winner if good else 1 - winner]
    cmp = event.comparison.model_copy(update={"comparison_id": "cpl" + event.comparison.comparison_id[3:],
                                              "answers": [answer.model_copy(update={"index": 0})]})
    return FeedbackEvent(kind="rating", key_id="synthetic", user_hash=None, comparison=cmp,
                         rating="up" if good else "down")
