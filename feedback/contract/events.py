"""Vote events: the self-contained records serving puts on Kafka and the trainer consumes.

An event carries everything the trainer needs (the messages, every answer, the model version of each,
the sampling parameters), so the trainer learns from the log alone (it touches Redis only for the dashboard's
loop status and users' canary tests). Versioning: `schema_version` is
"MAJOR.MINOR"; consumers accept any minor of the major they know and ignore unknown fields, and send
an unknown major to the dead-letter topic.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from feedback.contract.comparisons import PendingComparison
from feedback.contract.registry import version_name, version_number

SCHEMA_VERSION = "1.1"  # 1.1: edits (kind "edit", `edit`)
SCHEMA_MAJOR = 1

Choice = Literal["a", "b", "tie", "both_bad"]
Rating = Literal["up", "down"]


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7): 48-bit unix ms, then random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def normalize_ranking(ranking: list[int | list[int]], k: int) -> list[list[int]]:
    """Best-first ranking of K answers, ties as groups: [0, [1, 2]] -> [[0], [1, 2]].

    Every index 0..K-1 must appear exactly once.
    """
    groups = [[g] if isinstance(g, int) else list(g) for g in ranking]
    flat = [i for g in groups for i in g]
    if any(not g for g in groups):
        raise ValueError("a ranking group is empty")
    if sorted(flat) != list(range(k)):
        raise ValueError(f"a ranking must list every answer index 0..{k - 1} exactly once")
    return groups


class EditedAnswer(BaseModel):
    """A user's rewrite of one answer they were shown: a demonstration, and preferred to the original."""

    index: int = Field(ge=0)  # which answer of `comparison.answers` it replaces
    text: str = Field(min_length=1)


class FeedbackEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: str = SCHEMA_VERSION
    event_id: str = Field(default_factory=uuid7)
    kind: Literal["comparison", "rating", "edit"]
    voted_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    key_id: str
    user_hash: str | None
    # What was shown: K >= 2 answers for a comparison, one answer for a rating; either for an edit.
    comparison: PendingComparison
    choice: Choice | None = None
    ranking: list[list[int]] | None = None  # best first, ties grouped
    rating: Rating | None = None
    edit: EditedAnswer | None = None
    reason: str | None = Field(None, max_length=2000)
    open_ended: bool | None = None  # the client's word on whether the prompt is open-ended

    @model_validator(mode="after")
    def _one_verdict(self) -> FeedbackEvent:
        if self.kind == "edit":
            if self.edit is None or self.edit.index >= len(self.comparison.answers):
                raise ValueError("an edit event needs `edit` with the index of an answer it was shown")
        elif self.kind == "rating":
            if self.rating is None or len(self.comparison.answers) != 1:
                raise ValueError("a rating event needs `rating` and exactly one answer")
        elif (self.choice is None) == (self.ranking is None):
            raise ValueError("a comparison event needs exactly one of `choice` or `ranking`")
        return self

    @property
    def major(self) -> int:
        return int(self.schema_version.split(".", 1)[0])


def schema_major(raw: dict) -> int:
    """The major version of a decoded event dict; raises ValueError if it has none that parses."""
    return int(str(raw.get("schema_version", "")).split(".", 1)[0])


class WeightsAnnouncement(BaseModel):
    """On the `weights` topic: a new policy version is in the registry and passed the gate."""

    model_config = ConfigDict(extra="ignore")

    schema_version: str = SCHEMA_VERSION
    event_id: str = Field(default_factory=uuid7)
    version: int
    name: str  # the registry folder name; what serving reports as model_version
    manifest_location: str  # path or URI of manifest.json
    manifest_sha256: str
    parent_version: int | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @model_validator(mode="after")
    def _a_registry_name(self) -> WeightsAnnouncement:
        # Anyone who can write to the topic could otherwise name a folder outside the registry
        # ("/abs/v000777", "../../evil/v000777") and have every replica load and serve it.
        if version_number(self.name) is None or version_name(self.version) != self.name:
            raise ValueError(f"name {self.name[:80]!r} is not the registry name of version {self.version} "
                             f"({version_name(max(0, self.version))})")
        return self
