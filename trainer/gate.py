"""The eval gate. It judges the *exported* weights (bf16, what serving will load) against the live version
on held-out prompts, and publishes only if the candidate
- has finite weights and finite log-probs, and at most `max_empty_share` of its answers are empty;
- is not judged worse than the live version: with the judges of `trainer/judge.py` (fitted on votes, never
  optimised against), the upper end of the win rate's interval (bootstrap over prompts and judges) is at
  least `min_win_rate` — or, with `require="better"`, its lower end is;
- stays within `max_kl` nats of the reference (the k3 estimate over its own samples, `PolicyTrainer.sequence_kl`);
- did not change its answers' length by more than `max_length_ratio` either way in one round (a taste
  for length must not be the only thing learned in a jump; gradual change over rounds is allowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from feedback.comparisons import ChatMessage
from trainer.judge import JudgeEnsemble, bounded_win_rate
from trainer.policy import PolicyTrainer, Rollouts, load_causal_lm


@dataclass
class GateConfig:
    min_win_rate: float = 0.5
    require: Literal["not_worse", "better"] = "not_worse"
    level: float = 0.9  # two-sided: each end is a 95 % one-sided bound
    max_kl: float = 20.0  # nats per answer
    max_length_ratio: float = 3.0
    max_empty_share: float = 0.1
    samples_per_prompt: int = 2
    # 1.0: Σ log π − log π_ref estimates KL(π‖π_ref) only over samples drawn from π itself; at 0.7 the
    # estimate went negative (−2.1 and −0.9 nats were published). It is also the API's default.
    temperature: float = 1.0


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it failed (short codes)
    metrics: dict[str, float | None] = field(default_factory=dict)


def weights_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def _model(pt: PolicyTrainer, model_or_path):
    return load_causal_lm(str(model_or_path), pt.device, pt.bf16) if isinstance(model_or_path, (str, Path)) else model_or_path


@torch.no_grad()
def evaluate(pt: PolicyTrainer, candidate, live, prompts: list[list[ChatMessage]], judges: JudgeEnsemble,
             cfg: GateConfig, live_rollouts: Rollouts | None = None) -> GateResult:
    """`candidate`: the exported weights; `live`: the model serving now (each a model, or a folder loaded only
    while it is needed, so at most one full copy sits beside the trainer's own); `pt.reference()`: the
    reference. `live_rollouts`: the live engine itself, asked first for the live version's answers."""
    n = cfg.samples_per_prompt
    ids = [pt.prompt_ids(m) for m in prompts]
    drawn = live_rollouts(ids, n) if live_rollouts is not None else None
    if drawn is not None:
        base = pt.samples_from(ids, drawn)
    else:
        live = _model(pt, live)
        base = pt.sample(live, prompts, n, cfg.temperature)
        del live
    candidate = _model(pt, candidate)
    if not weights_finite(candidate):
        return GateResult(False, ["nonfinite_weights"])
    cand = pt.sample(candidate, prompts, n, cfg.temperature)
    flat = [s for g in cand for s in g]
    kl = pt.sequence_kl(candidate, flat, estimator="k3")
    del candidate
    if not torch.isfinite(kl).all():
        return GateResult(False, ["nonfinite_logits"])
    verdicts = [judges.prefer(m, [s.text for s in c], [s.text for s in b]) for m, c, b in zip(prompts, cand, base)]
    win_rate, low, high = bounded_win_rate(verdicts, cfg.level)
    majority = torch.cat([v.mean(0) for v in verdicts])  # the judges' average verdict per answer pair
    wins, ties = int((majority > 0.5).sum()), int((majority == 0.5).sum())
    cand_len = sum(len(s.completion_ids) for s in flat) / len(flat)
    live_len = sum(len(s.completion_ids) for g in base for s in g) / max(1, len(flat))
    length_ratio = cand_len / max(live_len, 1.0)
    empty = sum(not s.text.strip() for s in flat)
    metrics = {"win_rate": win_rate, "win_rate_low": low, "win_rate_high": high, "kl": float(kl.mean()),
               "length_ratio": length_ratio, "empty_answers": empty, "samples": len(flat), "wins": wins,
               "ties": ties, "losses": len(flat) - wins - ties, "judges": judges.n_judges,
               "live_sampled_by": "serving" if drawn is not None else "trainer"}
    reasons = []
    if empty > cfg.max_empty_share * len(flat):
        reasons.append("empty_answers")
    if metrics["kl"] > cfg.max_kl:
        reasons.append("kl_too_high")
    bound = low if cfg.require == "better" else high
    if bound < cfg.min_win_rate:
        reasons.append("win_rate_too_low")
    if not 1 / cfg.max_length_ratio <= length_ratio <= cfg.max_length_ratio:
        reasons.append("length_drift")
    return GateResult(not reasons, reasons, metrics)
