"""Rollouts: serving samples for the trainer. The live engine *is* the policy at the start of a round
(the trainer's state is what it last published), and vLLM samples far faster than HF `generate`, so the
trainer asks serving for its RLOO samples (`POST /admin/rollouts`, admin key) and computes log-probs
itself. Token ids go both ways, so no text is re-tokenised and the samples are exactly what was drawn.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, ValidationInfo, field_validator

MAX_ROLLOUT_PROMPTS = 256
MAX_ROLLOUT_N = 16
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class RolloutRequest(BaseModel):
    prompts: list[TokenIds] = Field(min_length=1, max_length=MAX_ROLLOUT_PROMPTS)  # chat-formatted prompt token ids
    n: int = Field(4, ge=1, le=MAX_ROLLOUT_N)
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    model_version: str | None = None  # refuse (409) unless this version is live

    @field_validator("temperature")
    @classmethod
    def _sampled_if_several(cls, v: float, info: ValidationInfo) -> float:
        if v == 0 and info.data.get("n", 1) > 1:
            raise ValueError("n > 1 needs temperature > 0: greedy samples would all be the same")
        return v

class RolloutSample(BaseModel):
    token_ids: list[int]  # the completion, ending with the end-of-sequence token when it stopped
    finish_reason: str | None


class RolloutResponse(BaseModel):
    model_version: str  # every sample came from this version (a swap mid-way answers 409 instead)
    samples: list[list[RolloutSample]]  # [prompt][n]
