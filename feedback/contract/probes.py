"""Probe log-probabilities: after loading a version in place, serving checks that its engine computes what
the trainer exported (HTTP success alone is not a correctness oracle: a swap once kept the old tied
output layer and still answered every request).

The trainer records in the version's manifest the log-probability its exported weights give to every
token of a few fixed conversations (prompt and answer, as token ids, so nothing is re-tokenised);
serving computes the same through its engine after the load and rolls back when the mean absolute
difference per token exceeds DUET_SWAP_LOGPROB_TOLERANCE.
"""

from __future__ import annotations

from pydantic import BaseModel, model_validator

PROBE_CONVERSATIONS = [
    ("Say hello.", "Hello! How can I help you today?"),
    ("What is 2 + 2?", "2 + 2 = 4."),
    ("Name a colour.", "Blue is a colour."),
    ("Write one short sentence about the sea.", "The sea is wide and deep."),
]


class ProbeLogprobs(BaseModel):
    token_ids: list[list[int]]  # one sequence per conversation: the chat-formatted prompt, the answer, end
    logprobs: list[list[float]]  # log π(token_t | tokens_<t) for t = 1 .. len − 1, per sequence

    @model_validator(mode="after")
    def _aligned(self) -> ProbeLogprobs:
        if len(self.token_ids) != len(self.logprobs) or any(
                len(ids) != len(lp) + 1 for ids, lp in zip(self.token_ids, self.logprobs)):
            raise ValueError("one log-probability per token after the first, for every sequence")
        return self


def mean_abs_diff(expected: list[list[float]], got: list[list[float]]) -> float:
    """Mean over every token of |expected − got| (nats)."""
    pairs = [(e, g) for es, gs in zip(expected, got, strict=True) for e, g in zip(es, gs, strict=True)]
    return sum(abs(e - g) for e, g in pairs) / max(1, len(pairs))
