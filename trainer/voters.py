"""Screening voters: quarantine one whose votes disagree with what everyone else taught the reward model,
with confidence, so noise or sabotage from a few keys cannot steer the policy.

Each vote is scored, before it is trained on, by the reward model as the other votes shaped it: a pick
agrees when the model ranks the chosen answer higher, a thumbs label when σ(r) is on the same side of ½
(a vote's share of agreeing pairs and labels is its score x ∈ [0, 1]). Per voter (the API key, and apart from
it each hashed OpenAI `user` within that key: a vote counts for both, `voters_of`), an anytime-valid confidence sequence (feedback/sequential.py) follows the mean
score; once its upper end is below ½ — agreement below chance, with confidence, however often it was
looked at — the voter is quarantined: their later votes are counted and kept on Kafka but not trained
on. An honest voter whose agreement is at least ½ at every vote is quarantined with probability ≤ α/2;
an untrained reward model agrees with everyone about half the time, so it quarantines no one.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from feedback.contract.events import FeedbackEvent
from feedback.sequential import ConfidenceSequence


def voters_of(event: FeedbackEvent) -> list[str]:
    """Who answers for a vote: its API key always, and the end user within that key where the client names
    one. The `user` field is the client's to choose, so a fresh string would be a fresh identity; the key is
    not, so a client whose votes as a whole disagree is quarantined however it names its users."""
    key = f"key:{event.key_id}"
    return [key, f"user:{event.key_id}:{event.user_hash}"] if event.user_hash else [key]


class VoterRecord(BaseModel):
    votes: int = 0  # scored votes
    agreement: float = 0.0  # sum of scores
    quarantined: bool = False
    quarantined_votes: int = 0  # votes not trained on since


class VoterScreen(BaseModel):
    alpha: float = 0.05
    voters: dict[str, VoterRecord] = Field(default_factory=dict)

    def is_quarantined(self, voter: str) -> bool:
        rec = self.voters.get(voter)
        return rec is not None and rec.quarantined

    def record(self, voter: str, score: float) -> bool:
        """Add one vote's agreement score; returns True if this vote quarantined the voter."""
        rec = self.voters.setdefault(voter, VoterRecord())
        rec.votes += 1
        rec.agreement += score
        if rec.quarantined:
            return False
        cs = ConfidenceSequence(alpha=self.alpha, n=rec.votes, total=rec.agreement)
        rec.quarantined = cs.decide(0.5) == "below"
        return rec.quarantined

    def summary(self) -> dict[str, int]:
        q = [r for r in self.voters.values() if r.quarantined]
        return {"voters": len(self.voters), "quarantined_voters": len(q),
                "quarantined_votes": sum(r.quarantined_votes for r in q)}
