"""What a round learns from (issue 22): groups that carry signal, users' own pairs, every signal kept until it is
trained (a refused round's too), answers cut at max_tokens never taught to stop, and the trainer's precision
chosen from what the CPU can do."""

from __future__ import annotations

import random

import pytest
import torch

from feedback.contract.events import EditedAnswer
from trainer.examples import to_prompt_group
from trainer.gate import GateConfig
from trainer.policy import PolicyTrainer, informative_groups
from duet.cpus import engine_dtype
from trainer.precision import cpu_has_fast_bf16
from trainer.precision import use_bf16
from trainer.service import TrainerService, replay_draw, served_sampling
from trainer.synthetic import marker_event, marker_rating
from duet.wiring import gate_config, policy_config, reward_config, round_config, service_config


def test_informative_selection_keeps_a_group_with_a_hit_and_drops_a_flat_one():
    flat = torch.tensor([0.10, 0.00, 0.05, 0.02])  # reward-model noise, no answer users would prefer
    hit = torch.tensor([0.0, 0.1, 3.0, 0.0])  # one answer with the taste
    two_hits = torch.tensor([2.0, -0.5, 2.0, -0.5])
    chosen, informative = informative_groups([flat, hit, two_hits], keep=8, min_spread=0.5)
    assert sorted(chosen) == [1, 2] and informative == 2
    assert chosen == [1, 2]  # widest spread first
    only_one, informative = informative_groups([flat, hit, two_hits], keep=1, min_spread=0.5)
    assert only_one == [1] and informative == 2  # capped at `keep`, still reports what was informative
    assert informative_groups([flat, flat], keep=8, min_spread=0.5) == ([], 0)


def _cut(event, finish: list[str]):
    answers = [a.model_copy(update={"finish_reason": f}) for a, f in zip(event.comparison.answers, finish)]
    return event.model_copy(update={"comparison": event.comparison.model_copy(update={"answers": answers})})


def test_only_answers_that_stopped_end_in_end_of_sequence(tiny_model):
    pt = PolicyTrainer(policy_config(max_new_tokens=8), str(tiny_model))
    eos = pt.tokenizer.eos_token_id
    group = to_prompt_group(_cut(marker_event(random.Random(0)), ["length", "stop"]))
    assert group.stopped == [False, True]
    cut, stopped = pt.group_sample(group, 0), pt.group_sample(group, 1)
    assert cut.completion_ids[-1] != eos and eos not in cut.completion_ids
    assert stopped.completion_ids[-1] == eos
    # a user's edit is a whole answer: it ends
    edit = to_prompt_group(_cut(marker_event(random.Random(1)), ["length", "length"]).model_copy(update={
        "kind": "edit", "choice": None, "edit": EditedAnswer(index=0, text="Short and done.")}))
    assert edit.stopped == [False, False, True] and pt.group_sample(edit, 2).completion_ids[-1] == eos
    # the sampling users were served with travels with the vote
    assert (group.max_tokens, group.temperature) == (64, 0.7)
    assert served_sampling([group, edit]) == (64, 0.7)


def test_replay_draw_takes_the_newest_then_older_ones():
    items = list(range(100))
    got = replay_draw(items, 10, random.Random(0), fresh=3)
    assert got[:5] == [95, 96, 97, 98, 99]  # the newest half (more than the 3 fresh ones)
    assert len(set(got)) == 10 and all(x < 95 for x in got[5:])
    assert replay_draw(items, 10, random.Random(0), fresh=30)[:10] == list(range(90, 100))  # all fresh, capped
    few = replay_draw(items[:4], 10, random.Random(0))
    assert few == [0, 1, 2, 3]  # fewer than asked: all of them


def _service(tiny_model, tmp_path, gate: GateConfig) -> TrainerService:
    return TrainerService(
        service_config(kafka_bootstrap="unused:9092", checkpoint_dir=tmp_path / "ckpt", policy_prompts=4,
                       policy_signals=8, redis_url="", canary="off",
                       rounds=round_config(base_model=str(tiny_model), registry_root=tmp_path / "registry",
                                           policy=policy_config(max_new_tokens=8, k=4), gate=gate, release_checks=[])),
        reward_config(backbone=str(tiny_model), max_tokens=96))


def test_a_refused_rounds_signals_are_trained_again_and_rounds_train_on_users_pairs(tiny_model, tmp_path):
    svc = _service(tiny_model, tmp_path, gate_config(max_kl=-1.0, prompts=2))  # refuses every candidate
    rng = random.Random(0)
    pairs = [to_prompt_group(marker_event(rng)) for _ in range(10)]
    thumbs = [to_prompt_group(marker_rating(rng)) for _ in range(4)]
    svc.reward.replay.add(pairs + thumbs)
    svc.held_out = [to_prompt_group(marker_event(rng)) for _ in range(2)]
    svc.state.votes_since_round = 14
    first = svc.policy_round()
    assert first.published is None and "kl_too_high" in first.gate.reasons
    assert {g.event_id for g in thumbs} <= set(first.trained_events)
    assert first.train_metrics["dpo_pairs"] > 0 and first.train_metrics["kto_answers"] == 4
    assert {g.event_id for g in pairs} & set(first.trained_events)  # users' own pairs, directly

    # many new pair votes arrive after the refusal: the refused round's thumbs are still drawn
    newer = [to_prompt_group(marker_event(rng)) for _ in range(20)]
    svc.reward.replay.add(newer)
    svc.state.votes_since_round = 20
    second = svc.policy_round()
    assert {g.event_id for g in thumbs} <= set(second.trained_events)
    assert second.train_metrics["kto_answers"] == 4


def test_precision_follows_the_cpu_flags():
    assert cpu_has_fast_bf16(frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert cpu_has_fast_bf16(frozenset({"amx_bf16", "amx_tile"}))
    assert not cpu_has_fast_bf16(frozenset({"avx2", "avx512f", "fma"}))
    cpu = torch.device("cpu")
    assert use_bf16(cpu, "fp32") is False and use_bf16(cpu, "bf16") is True
    assert use_bf16(cpu, "auto") is cpu_has_fast_bf16()


def test_serving_dtype_follows_the_cpu_flags():
    """vLLM serves the model's own bf16 where bf16 is native (or on a GPU), float32 on a CPU that would emulate
    it; an explicit DUET_DTYPE is kept."""
    avx2, amx = frozenset({"avx2", "fma"}), frozenset({"avx512f", "amx_bf16"})
    assert engine_dtype("auto", on_gpu=False, flags=avx2) == "float32"
    assert engine_dtype("auto", on_gpu=False, flags=amx) == "auto"
    assert engine_dtype("auto", on_gpu=True, flags=avx2) == "auto"
    assert engine_dtype("bfloat16", on_gpu=False, flags=avx2) == "bfloat16"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_policy_trains_in_either_precision_with_fp32_adapters(tiny_model, precision):
    pt = PolicyTrainer(policy_config(max_new_tokens=8, k=4, precision=precision), str(tiny_model))
    base_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert pt.model.model.embed_tokens.weight.dtype == base_dtype
    before = {k: v.clone() for k, v in pt.state_dict()["adapters"].items()}
    out = pt.rloo_round([m for m in _prompts(4)], lambda m, texts: torch.tensor([float(len(t)) for t in texts]))
    assert out["groups_trained"] > 0 and out["updates"] == min(pt.cfg.steps_per_round, out["groups_trained"])
    after = pt.state_dict()["adapters"]
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _prompts(n):
    from feedback.contract.comparisons import ChatMessage

    return [[ChatMessage(role="user", content=f"Tell me about thing {i}.")] for i in range(n)]


def test_the_clipped_loss_is_rloo_on_policy_and_stops_pushing_past_the_clip():
    from trainer.losses import rloo_clipped_loss, rloo_loss

    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.5, -1.5])
    (g_rloo,) = torch.autograd.grad(rloo_loss(logp, mask, adv), logp)
    (g_clip,) = torch.autograd.grad(rloo_clipped_loss(logp, logp.detach(), mask, adv), logp)
    assert torch.allclose(g_rloo, g_clip)  # π = π_old: the same gradient
    # a token already 50 % more likely than when sampled, with a positive advantage: no further push
    old = logp.detach() - torch.log(torch.tensor(1.5))
    (g,) = torch.autograd.grad(rloo_clipped_loss(logp, old, mask, adv, eps=0.2), logp)
    assert torch.all(g[0] == 0) and torch.any(g[1] != 0)  # the negative-advantage sample still moves


def test_completion_log_probs_equal_those_of_the_whole_sequence(tiny_model):
    """The vocabulary projection only over the completions gives the same per-token log-probs."""
    pt = PolicyTrainer(policy_config(max_new_tokens=8, precision="fp32"), str(tiny_model))
    samples = [pt.answer_sample(m, a) for m, a in zip(_prompts(3), ["Yes.", "A longer answer here.", "No"])]
    samples[1] = samples[1].__class__(samples[1].prompt_ids + [5, 6, 7], samples[1].completion_ids, "")  # longer prompt
    with torch.no_grad():
        part, pmask = pt.token_logprobs(pt.model, samples)
        full, fmask = pt.token_logprobs(pt.model, samples, completions_only=False)
    assert part.shape[1] < full.shape[1]
    assert torch.allclose((part * pmask).sum(-1), (full * fmask).sum(-1), atol=1e-5)
    assert pmask.sum() == fmask.sum() == sum(len(s.completion_ids) for s in samples)
