"""Policy rounds on a tiny model: RLOO shifts samples toward what the reward prefers; the gate
refuses broken candidates; the registry publishes atomically and the announcement reaches Kafka."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from feedback.comparisons import ChatMessage
from feedback.events import WeightsAnnouncement
from feedback.topics import WEIGHTS, ensure_topics
from tests.kafka_helpers import read_topic
from trainer.examples import to_prompt_group
from trainer.gate import GateConfig, evaluate
from trainer.losses import dpo_loss, rloo_advantages, rloo_loss
from trainer.policy import PolicyConfig, PolicyTrainer, load_causal_lm
from feedback.registry import Registry, verify
from trainer.rounds import RoundConfig, run_round
from trainer.synthetic import TOPICS, marker_event

PROMPTS = [[ChatMessage(role="user", content=f"Tell me about {t}.")] for t in TOPICS]


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_loss_by_hand():
    # β[(−1 − −2) − (−3 − −2)] = 0.5 · 2 = 1 -> −log σ(1)
    assert dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), 0.5).item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_rloo_advantages_and_loss_by_hand():
    adv = rloo_advantages(t(1.0, 2.0, 3.0, 6.0).unsqueeze(0))
    assert adv.squeeze(0).tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2])
    logp, ref = t(-1.0, -2.0).unsqueeze(0), t(-1.5, -2.5).unsqueeze(0)
    mask = t(1.0, 0.0).unsqueeze(0)  # second token is padding
    # −A·(−1) + β·(−1 − −1.5)
    assert rloo_loss(logp, ref, mask, t(2.0), 0.1).item() == pytest.approx(2.0 + 0.05)


def low_id_reward(tokenizer):
    """A dense synthetic preference: the share of answer tokens from the first 2,000 ids."""
    def score(messages, answers):
        out = []
        for a in answers:
            ids = tokenizer(a, add_special_tokens=False)["input_ids"] or [10**9]
            out.append(sum(i < 2000 for i in ids) / len(ids))
        return torch.tensor(out)
    return score


def mean_reward(pt, model, reward, n=4):
    torch.manual_seed(123)
    return sum(float(reward(p, [s.text for s in pt.sample(model, p, n)]).mean()) for p in PROMPTS[:10]) / 10


def blue_reward(messages, answers):
    """How often the answer says "blue"."""
    return torch.tensor([float(a.lower().count("blue")) for a in answers])


def test_rloo_shifts_the_policy_toward_the_reward(blue_model):
    cfg = PolicyConfig(algorithm="rloo", lr=3e-4, beta=0.01, k=8, max_new_tokens=16, grad_accum=4, seed=0)
    pt = PolicyTrainer(cfg, str(blue_model), str(blue_model))
    before = mean_reward(pt, pt.ref, blue_reward)
    for _ in range(2):
        out = pt.rloo_round(PROMPTS[:8], blue_reward)
    after = mean_reward(pt, pt.policy, blue_reward)
    # it samples the full distribution, as vLLM serves it: "blue" is rare at first, then common
    assert before < 2.0 and after > before + 2.0, (before, after)
    assert out["kl"] > 0 and math.isfinite(out["reward_mean"])


def test_dpo_raises_the_margin_of_preferred_answers(tiny_model):
    rng = random.Random(0)
    groups = [to_prompt_group(marker_event(rng)) for _ in range(24)]
    pt = PolicyTrainer(PolicyConfig(algorithm="dpo", lr=1e-3, beta=0.1, grad_accum=4), str(tiny_model),
                       str(tiny_model))
    first = pt.dpo_round(groups)
    second = pt.dpo_round(groups)
    assert second["margin"] > first["margin"] and second["loss"] < first["loss"]


def test_gate_refuses_nan_weights_and_too_much_kl(tiny_model):
    pt = PolicyTrainer(PolicyConfig(max_new_tokens=8), str(tiny_model), str(tiny_model))
    reward = low_id_reward(pt.tokenizer)
    live = load_causal_lm(str(tiny_model), pt.device, trainable=False)
    ok = evaluate(pt, live, PROMPTS[:3], reward, GateConfig(min_win_rate=0.0, max_kl=1e9))
    assert ok.passed, ok.reasons
    strict = evaluate(pt, live, PROMPTS[:3], reward, GateConfig(min_win_rate=0.0, max_kl=-1.0))
    assert not strict.passed and "kl_too_high" in strict.reasons
    with torch.no_grad():
        next(pt.policy.parameters()).view(-1)[0] = float("nan")
    broken = evaluate(pt, live, PROMPTS[:3], reward, GateConfig(min_win_rate=0.0, max_kl=1e9))
    assert not broken.passed and broken.reasons == ["nonfinite_weights"]


def test_round_publishes_verifiable_versions_and_announces(tiny_model, tmp_path, broker):
    ensure_topics(broker.bootstrap)
    cfg = RoundConfig(base_model=str(tiny_model), registry_root=tmp_path / "registry", bootstrap=broker.bootstrap,
                      policy=PolicyConfig(lr=2e-3, beta=0.01, max_new_tokens=8, grad_accum=2),
                      gate=GateConfig(min_win_rate=0.0, max_kl=1e9), keep_versions=2)
    from transformers import AutoTokenizer

    reward = low_id_reward(AutoTokenizer.from_pretrained(str(tiny_model)))
    results = [run_round(cfg, PROMPTS[:4], PROMPTS[4:6], reward, kafka_offsets={0: 5}) for _ in range(3)]
    versions = [r.published.version for r in results]
    assert versions == [1, 2, 3]
    reg = Registry(tmp_path / "registry")
    assert [m.version for m in reg.versions()] == [2, 3]  # keep_versions=2
    latest = reg.latest()
    assert latest.version == 3 and latest.parent_version == 2 and latest.kafka_offsets == {0: 5}
    folder = reg.path(latest)
    assert verify(folder) == [] and "model.safetensors" in latest.files and "config.json" in latest.files
    assert latest.eval["passed"] is True and latest.algorithm == "rloo"
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert verify(folder) == ["config.json checksum mismatch"]
    records = read_topic(broker.bootstrap, WEIGHTS, lambda recs: len(recs) >= 3)
    announced = [WeightsAnnouncement.model_validate_json(r.value) for r in records]
    assert [a.version for a in announced][-3:] == [1, 2, 3]
    assert announced[-1].manifest_location.endswith("v000003/manifest.json")


def test_crash_mid_publish_leaves_nothing_visible(tmp_path):
    reg = Registry(tmp_path / "registry")

    def good(folder):
        (folder / "model.safetensors").write_bytes(b"x" * 10)

    def crash(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    common = dict(base_model="b", algorithm="rloo", hyperparameters={}, train_metrics={}, eval={}, kafka_offsets={})
    first, _ = reg.publish(good, **common)
    with pytest.raises(RuntimeError):
        reg.publish(crash, **common)
    assert [m.version for m in reg.versions()] == [1] and reg.latest().version == 1
    second, _ = reg.publish(good, **common)
    assert second.version == 2 and second.parent_version == 1
    assert not [p for p in (tmp_path / "registry").iterdir() if p.name.startswith(".tmp-")]
    assert json.loads((tmp_path / "registry" / "v000002" / "manifest.json").read_text())["version"] == 2


def test_version_numbers_are_never_reused(tmp_path):
    """Deleting the newest version by hand must not hand its name to different weights."""
    reg = Registry(tmp_path / "registry")
    common = dict(base_model="b", algorithm="rloo", hyperparameters={}, train_metrics={}, eval={}, kafka_offsets={})
    for _ in range(2):
        reg.publish(lambda folder: (folder / "model.safetensors").write_bytes(b"x"), **common)
    shutil.rmtree(tmp_path / "registry" / "v000002")
    third, _ = reg.publish(lambda folder: (folder / "model.safetensors").write_bytes(b"y"), **common)
    assert third.name == "v000003" and [m.version for m in reg.versions()] == [1, 3]


def test_gate_kl_estimates_the_true_kl(tiny_model):
    """One-token answers make KL(π‖π_ref) exact (a sum over the vocabulary). The gate's sampled
    estimate must match it; sampling at 0.7 instead of the policy's own temperature doubled it here."""
    pt = PolicyTrainer(PolicyConfig(max_new_tokens=1), str(tiny_model), str(tiny_model))
    with torch.no_grad():
        pt.policy.model.norm.weight.mul_(3.0)  # a sharper candidate
    messages = PROMPTS[0]
    ids = torch.tensor([pt.prompt_ids(messages)])
    with torch.no_grad():
        lp = torch.log_softmax(pt.policy(ids).logits[0, -1].float(), -1)
        lr = torch.log_softmax(pt.ref(ids).logits[0, -1].float(), -1)
    exact = (lp.exp() * (lp - lr)).sum().item()
    torch.manual_seed(0)
    gate = evaluate(pt, pt.ref, [messages], lambda m, texts: torch.zeros(len(texts)),
                    GateConfig(min_win_rate=0.0, max_kl=1e9, samples_per_prompt=400))
    assert exact > 0.01 and gate.metrics["kl"] == pytest.approx(exact, rel=0.3)
