"""The eval gate. It judges the *exported* weights (bf16, what serving will load) on a fixed set of gate
prompts that are never trained on, and publishes only if the candidate
- has finite weights and finite log-probs, and at most `max_empty_share` of its answers are empty;
- is shown not worse than the live version *and* than the base model (so drift over many rounds shows):
  with the judges of `trainer/judge.py` (fitted on votes, never optimised against), the one-sided (1 − α)
  lower bound of its win rate (bootstrap over prompts and judges) must reach `min_win_rate` (0.40). A
  non-inferiority test with margin 0.10: a candidate whose true win rate is 0.40 passes at most α = 5 % of
  the time; `prompts` × `samples_per_prompt` are sized so that one at 0.55 passes ≥ 80 % of the time
  (bench/gate.py). Candidate, live and base answer the same prompts with the same seeds (paired answers:
  where the models agree they say the same thing, and the judges see only the differences);
- stays within `max_kl` nats of the reference (the k3 estimate over its own samples, `PolicyTrainer.sequence_kl`);
- did not change its answers' length by more than `max_length_ratio` either way in one round (a taste
  for length must not be the only thing learned in a jump; gradual change over rounds is allowed);
- passes every release check (`trainer/release_checks.py`: fixed checks, not fitted to votes; each failure is
  a reason `release_check:<name>`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from feedback.contract.comparisons import ChatMessage
from trainer.judge import JudgeEnsemble, bounded_win_rate
from trainer.policy import PolicyTrainer, Sample, load_causal_lm
from trainer.release_checks import CheckResult, ReleaseChecker


@dataclass
class GateConfig:
    """Bound from the settings' gate_* fields by duet/wiring.py, where their defaults live; the fields with
    defaults here are not settings."""
    min_win_rate: float  # the lower bound must reach it, against live and against base
    alpha: float  # one-sided: P(pass | true win rate = min_win_rate) ≤ α
    prompts: int  # gate prompts sampled (the first of `gate_prompts.txt` or a team's own file)
    samples_per_prompt: int
    max_kl: float  # nats per answer
    max_length_ratio: float
    seed: int  # the same for every candidate, so answers pair across versions and can be cached
    kl_samples: int = 32  # candidate answers the KL is estimated on (a forward pass of candidate and reference each)
    max_empty_share: float = 0.1
    # 1.0: Σ log π − log π_ref estimates KL(π‖π_ref) only over samples drawn from π itself; at 0.7 the
    # estimate went negative (−2.1 and −0.9 nats were published). It is also the API's default.
    temperature: float = 1.0


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it failed (short codes)
    metrics: dict[str, float | None] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)  # the release checks, passed or not
    answers: list[list[Sample]] = field(default_factory=list)  # the candidate's, to pair with the next one's


DEFAULT_GATE_PROMPTS = Path(__file__).with_name("gate_prompts.txt")


class GatePromptsError(ValueError):
    pass


def load_gate_prompts(spec: str, need: int) -> list[str]:
    """The gate's prompts, one per line: `spec` "" for Duet's generic set (trainer/gate_prompts.txt), else a team's
    own file — prompts like its users', which it keeps out of training. At least `need` distinct ones."""
    path = Path(spec) if spec else DEFAULT_GATE_PROMPTS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GatePromptsError(f"gate prompts {path}: cannot read: {e} (DUET_GATE_PROMPT_FILE)") from None
    prompts = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if len(prompts) < need:
        raise GatePromptsError(f"gate prompts {path}: {len(prompts)} distinct prompts, the gate needs {need} "
                               f"(DUET_GATE_PROMPT_FILE, DUET_GATE_PROMPTS)")
    return prompts


def gate_decision(verdicts: list[torch.Tensor], cfg: GateConfig) -> tuple[bool, float, float, float]:
    """Non-inferiority on the judges' verdicts (one [J, n] tensor per prompt): pass iff the one-sided (1 − α)
    lower bound of the win rate is at least `min_win_rate`. Returns (passed, win rate, low, high)."""
    rate, low, high = bounded_win_rate(verdicts, level=1 - 2 * cfg.alpha)
    return low >= cfg.min_win_rate, rate, low, high


def weights_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def _model(pt: PolicyTrainer, model_or_path):
    return load_causal_lm(str(model_or_path), pt.device, pt.bf16) if isinstance(model_or_path, (str, Path)) else model_or_path


def gate_answers(pt: PolicyTrainer, model, prompts: list[list[ChatMessage]], cfg: GateConfig) -> list[list[Sample]]:
    """A model's answers to the gate prompts, at the gate's seed: the same for every model, so they pair."""
    return pt.sample(model, prompts, cfg.samples_per_prompt, cfg.temperature, seed=cfg.seed)


def _judged(judges: JudgeEnsemble, prompts, cand, other) -> list[torch.Tensor]:
    return [judges.prefer(m, [s.text for s in c], [s.text for s in o]) for m, c, o in zip(prompts, cand, other)]


@torch.no_grad()
def evaluate(pt: PolicyTrainer, candidate, live, prompts: list[list[ChatMessage]], judges: JudgeEnsemble,
             cfg: GateConfig, live_answers: list[list[Sample]] | None = None,
             base_answers: list[list[Sample]] | None = None, checker: ReleaseChecker | None = None) -> GateResult:
    """`candidate`: the exported weights; `live`: the model serving now (each a model, or a folder loaded only
    while it is needed, so at most one full copy sits beside the trainer's own); `pt.reference()`: the
    reference (base). `live_answers` / `base_answers`: their `gate_answers` on these prompts if known (cached
    by the caller), else sampled here. `checker`: the release checks the candidate must pass."""
    if judges.weights is None:  # no ordered vote or label to fit on: every verdict would be a tie, so don't sample
        return GateResult(False, ["judges_untrained"])
    if live_answers is None:
        live = _model(pt, live)
        live_answers = gate_answers(pt, live, prompts, cfg)
        del live
    if base_answers is None:
        with pt.reference():
            base_answers = gate_answers(pt, pt.model, prompts, cfg)
    candidate = _model(pt, candidate)
    if not weights_finite(candidate):
        return GateResult(False, ["nonfinite_weights"])
    cand = gate_answers(pt, candidate, prompts, cfg)
    flat = [s for g in cand for s in g]
    kl = pt.sequence_kl(candidate, flat[:cfg.kl_samples], estimator="k3")
    checks = checker.run(pt, candidate) if checker is not None else []
    del candidate
    if not torch.isfinite(kl).all():
        return GateResult(False, ["nonfinite_logits"])
    verdicts = _judged(judges, prompts, cand, live_answers)
    passed_live, win_rate, low, high = gate_decision(verdicts, cfg)
    passed_base, base_rate, base_low, _ = gate_decision(_judged(judges, prompts, cand, base_answers), cfg)
    majority = torch.cat([v.mean(0) for v in verdicts])  # the judges' average verdict per answer pair
    wins, ties = int((majority > 0.5).sum()), int((majority == 0.5).sum())
    cand_len = sum(len(s.completion_ids) for s in flat) / len(flat)
    live_len = sum(len(s.completion_ids) for g in live_answers for s in g) / max(1, len(flat))
    length_ratio = cand_len / max(live_len, 1.0)
    empty = sum(not s.text.strip() for s in flat)
    identical = sum(c.text == o.text for g, h in zip(cand, live_answers) for c, o in zip(g, h))
    metrics = {"win_rate": win_rate, "win_rate_low": low, "win_rate_high": high,
               "win_rate_vs_base": base_rate, "win_rate_vs_base_low": base_low, "kl": float(kl.mean()),
               "length_ratio": length_ratio, "empty_answers": empty, "samples": len(flat), "wins": wins,
               "ties": ties, "losses": len(flat) - wins - ties, "identical_to_live": identical,
               "prompts": len(prompts), "judges": judges.n_judges}
    reasons = []
    if empty > cfg.max_empty_share * len(flat):
        reasons.append("empty_answers")
    if metrics["kl"] > cfg.max_kl:
        reasons.append("kl_too_high")
    if not passed_live:
        reasons.append("win_rate_too_low")
    if not passed_base:
        reasons.append("worse_than_base")
    if not 1 / cfg.max_length_ratio <= length_ratio <= cfg.max_length_ratio:
        reasons.append("length_drift")
    reasons += [f"release_check:{c.name}" for c in checks if not c.passed]
    metrics["release_checks_failed"] = sum(not c.passed for c in checks)
    return GateResult(not reasons, reasons, metrics, checks, cand)
