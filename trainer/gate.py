"""The eval gate: a candidate policy is published only if, on held-out prompts, it
- has finite weights and finite logits,
- gives non-empty answers,
- wins against the live version under the reward model at least `min_win_rate` of the time (ties ½),
- stays within `max_kl` of the reference (mean Σ_t log π − log π_ref over its own samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from feedback.comparisons import ChatMessage
from trainer.policy import PolicyTrainer, RewardFn


@dataclass
class GateConfig:
    min_win_rate: float = 0.5
    max_kl: float = 20.0  # nats per answer
    samples_per_prompt: int = 1
    # 1.0: Σ log π − log π_ref estimates KL(π‖π_ref) only over samples drawn from π itself; at 0.7 the
    # estimate went negative (−2.1 and −0.9 nats were published). It is also the API's default.
    temperature: float = 1.0


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it failed (short codes first)
    metrics: dict[str, float | None] = field(default_factory=dict)


def weights_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


@torch.no_grad()
def evaluate(pt: PolicyTrainer, live, prompts: list[list[ChatMessage]], reward_fn: RewardFn,
             cfg: GateConfig) -> GateResult:
    """`pt.policy` is the candidate, `live` the model serving now, `pt.ref` the reference."""
    if not weights_finite(pt.policy):
        return GateResult(False, ["nonfinite_weights"])
    pt.policy.eval()
    wins = ties = 0
    kls, empty, total = [], 0, 0
    for messages in prompts:
        cand = pt.sample(pt.policy, messages, cfg.samples_per_prompt, cfg.temperature)
        base = pt.sample(live, messages, cfg.samples_per_prompt, cfg.temperature)
        logp, mask = pt.token_logprobs(pt.policy, cand)
        if not torch.isfinite(logp).all():
            return GateResult(False, ["nonfinite_logits"])
        ref_logp, _ = pt.token_logprobs(pt.ref, cand)
        kls += ((logp - ref_logp) * mask).sum(-1).tolist()
        empty += sum(not s.text.strip() for s in cand)
        total += len(cand)
        r = reward_fn(messages, [s.text for s in cand] + [s.text for s in base]).float()
        rc, rb = r[:len(cand)], r[len(cand):]
        wins += int((rc > rb).sum())
        ties += int((rc == rb).sum())
    win_rate = (wins + 0.5 * ties) / total if total else 0.0
    kl = sum(kls) / len(kls) if kls else 0.0
    # wins/ties/losses: the verdicts themselves, so the dashboard can put a confidence interval on the rate
    metrics = {"win_rate": win_rate, "kl": kl, "empty_answers": empty, "samples": total, "wins": wins,
               "ties": ties, "losses": total - wins - ties}
    reasons = []
    if empty:
        reasons.append("empty_answers")
    if kl > cfg.max_kl:
        reasons.append("kl_too_high")
    if win_rate < cfg.min_win_rate:
        reasons.append("win_rate_too_low")
    return GateResult(not reasons, reasons, metrics)
