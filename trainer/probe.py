"""The probe log-probabilities of an exported version (feedback/contract/probes.py), computed from the exported files
themselves, loaded as serving loads them, so serving can check its engine computes the same."""

from __future__ import annotations

from pathlib import Path

import torch

from feedback.contract.comparisons import ChatMessage
from feedback.contract.probes import PROBE_CONVERSATIONS, ProbeLogprobs
from trainer.policy import PolicyTrainer, load_causal_lm


@torch.no_grad()
def probe_logprobs(pt: PolicyTrainer, folder: Path) -> ProbeLogprobs:
    samples = [pt.answer_sample([ChatMessage(role="user", content=q)], a) for q, a in PROBE_CONVERSATIONS]
    model = load_causal_lm(str(folder), pt.device, pt.bf16)
    try:
        logp, _ = pt.token_logprobs(model, samples, completions_only=False)
    finally:
        del model
    ids = [s.prompt_ids + s.completion_ids for s in samples]
    return ProbeLogprobs(token_ids=ids, logprobs=[logp[i, :len(x) - 1].tolist() for i, x in enumerate(ids)])
