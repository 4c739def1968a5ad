"""The eval gate's decision (a non-inferiority test with stated error rates), its paired answers, and its prompts
held out of training by text."""

from __future__ import annotations

import random

import pytest
import torch

from feedback.contract.comparisons import ChatMessage
from trainer.gate import GatePromptsError, evaluate, gate_answers, gate_decision, load_gate_prompts
from trainer.policy import PolicyTrainer
from trainer.service import TrainerService
from trainer.synthetic import marker_event
from duet.wiring import gate_config, policy_config, reward_config, round_config, service_config


def verdicts(per_prompt: list[list[float]], judges: int = 4) -> list[torch.Tensor]:
    """Every judge agreeing: one [J, n] tensor per prompt."""
    return [torch.tensor(v).expand(judges, len(v)).clone() for v in per_prompt]


def test_the_decision_on_fixed_verdicts():
    cfg = gate_config()
    assert gate_decision(verdicts([[1.0, 1.0]] * 48), cfg)[0]  # wins everywhere
    assert not gate_decision(verdicts([[0.0, 0.0]] * 48), cfg)[0]  # losses everywhere
    passed, rate, low, high = gate_decision(verdicts([[0.5, 0.5]] * 48), cfg)
    assert passed and rate == low == high == 0.5  # the same answers everywhere: not worse, with certainty
    # a true-looking 0.40 (40 % wins, 60 % losses, spread over prompts): its lower bound is well under 0.40
    forty = verdicts([[1.0, 1.0]] * 19 + [[0.0, 0.0]] * 29)
    passed, rate, low, _ = gate_decision(forty, cfg)
    assert not passed and rate == pytest.approx(19 / 48) and low < 0.40
    # 60 % wins on 48 prompts: passes; 67 % on 3 prompts: the interval is too wide to say
    assert gate_decision(verdicts([[1.0, 1.0]] * 29 + [[0.0, 0.0]] * 19), cfg)[0]
    assert not gate_decision(verdicts([[1.0, 1.0]] * 2 + [[0.0, 0.0]] * 1), cfg)[0]
    # judges who disagree widen it: half the judges say win, half loss, on every prompt
    split = [torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])] * 48
    assert gate_decision(split, gate_config(min_win_rate=0.45))[2] < 0.45


class TextJudges:
    """A judge that prefers answers by a fixed rule on their text (the gate's logic, apart from fitted judges)."""
    n_judges = 2
    weights = torch.ones(2, 1)  # fitted (a gate refuses on judges with nothing to fit on)

    def __init__(self, better: str) -> None:
        self.better = better

    def prefer(self, messages, first: list[str], second: list[str]) -> torch.Tensor:
        v = [0.5 if a == b else 1.0 if self.better in a else 0.0 if self.better in b else 0.5
             for a, b in zip(first, second)]
        return torch.tensor(v).expand(self.n_judges, len(v))


def test_answers_pair_by_seed_and_a_candidate_worse_than_base_is_refused(tiny_model):
    pt = PolicyTrainer(policy_config(max_new_tokens=6), str(tiny_model))
    prompts = [[ChatMessage(role="user", content=f"Say something about {t}.")] for t in ("tea", "rain", "maps")]
    cfg = gate_config(min_win_rate=0.4, max_kl=1e9, max_length_ratio=1e9, max_empty_share=1.0, prompts=3)
    first, again = gate_answers(pt, pt.model, prompts, cfg), gate_answers(pt, pt.model, prompts, cfg)
    assert [[s.completion_ids for s in g] for g in first] == [[s.completion_ids for s in g] for g in again]
    other = gate_answers(pt, pt.model, prompts, gate_config(seed=1))
    assert [[s.completion_ids for s in g] for g in first] != [[s.completion_ids for s in g] for g in other]

    # candidate = live = base model: every answer identical, every verdict a tie: passes
    same = evaluate(pt, pt.model, pt.model, prompts, TextJudges("zebra"), cfg, live_answers=first,
                    base_answers=first)
    assert same.passed and same.metrics["identical_to_live"] == same.metrics["samples"] == 6
    # base's answers were better (by the judges): not worse than live, but worse than base — refused
    better_base = [[type(s)(s.prompt_ids, s.completion_ids, s.text + " zebra") for s in g] for g in first]
    drift = evaluate(pt, pt.model, pt.model, prompts, TextJudges("zebra"), cfg, live_answers=first,
                     base_answers=better_base)
    assert not drift.passed and drift.reasons == ["worse_than_base"]
    assert drift.metrics["win_rate"] == 0.5 and drift.metrics["win_rate_vs_base"] == 0.0
    # judges with no ordered vote or label to fit on would call every pair a tie: refused, whatever the answers
    untrained = TextJudges("zebra")
    untrained.weights = None
    blind = evaluate(pt, pt.model, pt.model, prompts, untrained, cfg, live_answers=first, base_answers=first)
    assert not blind.passed and blind.reasons == ["judges_untrained"]


def test_gate_prompts_load_and_a_short_file_is_refused(tmp_path):
    assert len(load_gate_prompts("", gate_config().prompts)) >= gate_config().prompts
    short = tmp_path / "prompts.txt"
    short.write_text("Hello?\nHello?\n\nHow are you?\n")
    assert load_gate_prompts(str(short), 2) == ["Hello?", "How are you?"]  # distinct, blank lines skipped
    with pytest.raises(GatePromptsError, match="2 distinct prompts, the gate needs 48"):
        load_gate_prompts(str(short), 48)


def test_votes_on_gate_prompts_and_repeated_prompts_are_held_out_by_text(tiny_model, tmp_path):
    """A vote whose prompt is one of the gate's is never trained on; two votes on the same conversation land on
    the same side of the held-out split, whatever their comparison ids."""
    gate_prompt = "Why is the sky blue?"
    svc = TrainerService(
        service_config(kafka_bootstrap="unused:9092", checkpoint_dir=tmp_path, held_out_pct=10.0,
                      rounds=round_config(base_model=str(tiny_model), registry_root=tmp_path / "registry",
                                        gate_prompts=[gate_prompt], release_checks=[]), redis_url="", canary="off"),
        reward_config(backbone=str(tiny_model), max_tokens=96))
    rng = random.Random(0)

    def vote(text: str):
        ev = marker_event(rng)
        cmp = ev.comparison.model_copy(update={"messages": [ChatMessage(role="user", content=text)]})
        return ev.model_copy(update={"comparison": cmp})

    svc.classify(vote(gate_prompt))
    assert [g.messages[-1].content for g in svc.held_out] == [gate_prompt] and not svc.pending
    for i in range(40):  # each prompt twice, with new comparison ids
        for _ in range(2):
            svc.classify(vote(f"Tell me about place number {i}."))
    held = [g.messages[-1].content for g in svc.held_out[1:]]
    trained = [g.messages[-1].content for g in svc.pending]
    assert held and not set(held) & set(trained)
    assert all(held.count(t) == 2 for t in held) and all(trained.count(t) == 2 for t in trained)
