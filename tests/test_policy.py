"""Policy rounds on a tiny model: RLOO shifts samples toward what the reward prefers; the gate
refuses broken candidates; the registry publishes atomically and the announcement reaches Kafka."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil

import pytest
import torch

from feedback.contract.comparisons import ChatMessage
from feedback.contract.events import WeightsAnnouncement
from feedback.contract.topics import WEIGHTS, ensure_topics
from tests.kafka_helpers import read_topic
from trainer.examples import to_prompt_group
from trainer import checkpoint
from trainer.checkpoint import Snapshot, TrainerState
from trainer.gate import evaluate
from trainer.judge import JudgeEnsemble, SentenceEncoder
from trainer.losses import dpo_loss, kl_penalized_rewards, rloo_advantages, rloo_loss
from trainer.policy import PolicyTrainer, load_causal_lm
from trainer.reward_model import minilm_path
from feedback.contract.registry import Registry, verify
from trainer.rounds import PolicyRounds
from trainer.synthetic import TOPICS, marker_event, marker_rating
from duet.wiring import gate_config, policy_config, round_config

PROMPTS = [[ChatMessage(role="user", content=f"Tell me about {t}.")] for t in TOPICS]


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_loss_by_hand():
    # β[(−1 − −2) − (−3 − −2)] = 0.5 · 2 = 1 -> −log σ(1)
    assert dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), 0.5).item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_rloo_advantages_and_loss_by_hand():
    adv = rloo_advantages(t(1.0, 2.0, 3.0, 6.0).unsqueeze(0))
    assert adv.squeeze(0).tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2])
    # r − β·kl
    assert kl_penalized_rewards(t(1.0, 2.0), t(0.5, -1.0), 0.1).tolist() == pytest.approx([0.95, 2.1])
    logp = t(-1.0, -2.0).unsqueeze(0)
    mask = t(1.0, 0.0).unsqueeze(0)  # second token is padding
    assert rloo_loss(logp, mask, t(2.0)).item() == pytest.approx(2.0)  # −A·Σ log π = −2·(−1)


def _kl_after_updates(kl_in_reward: bool, seed: int, steps: int = 300, beta: float = 1.0, k: int = 8) -> tuple[float, float]:
    """A categorical policy over 8 one-token answers (so KL(π‖π_ref) is exact), started away from the
    reference, trained by SGD with zero reward: the only force is the KL anchor."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(8, generator=g)
    theta = (ref + 2.0 * torch.randn(8, generator=g)).requires_grad_()
    opt = torch.optim.SGD([theta], lr=0.1)

    def exact_kl() -> float:
        lp, lr = torch.log_softmax(theta.detach(), -1), torch.log_softmax(ref, -1)
        return float((lp.exp() * (lp - lr)).sum())

    start = exact_kl()
    for _ in range(steps):
        y = torch.multinomial(torch.softmax(theta.detach(), -1), k, replacement=True, generator=g)
        logp = torch.log_softmax(theta, -1)[y].unsqueeze(1)
        ref_logp = torch.log_softmax(ref, -1)[y].unsqueeze(1)
        mask = torch.ones_like(logp)
        kl = ((logp - ref_logp) * mask).sum(-1)
        if kl_in_reward:  # what the trainer does
            adv = rloo_advantages(kl_penalized_rewards(torch.zeros(k), kl, beta).view(1, k)).flatten()
            loss = rloo_loss(logp, mask, adv)
        else:  # the old loss: β Σ_t (log π − log π_ref) added as a loss term (zero advantages)
            loss = (beta * kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return start, exact_kl()


@pytest.mark.parametrize("seed", range(5))
def test_the_kl_anchor_pulls_the_policy_back_to_the_reference(seed):
    start, end = _kl_after_updates(True, seed)
    assert end < 0.5 * start, (start, end)
    # the old loss term has zero expected gradient: the KL barely moves (deterministic for these seeds)
    old_start, old_end = _kl_after_updates(False, seed)
    assert old_end > 0.8 * old_start, (old_start, old_end)


def low_id_reward(tokenizer):
    """A dense synthetic preference: the share of answer tokens from the first 2,000 ids."""
    def score(messages, answers):
        out = []
        for a in answers:
            ids = tokenizer(a, add_special_tokens=False)["input_ids"] or [10**9]
            out.append(sum(i < 2000 for i in ids) / len(ids))
        return torch.tensor(out)
    return score


def mean_reward(pt, reward, n=4, reference=False):
    torch.manual_seed(123)
    prompts = PROMPTS[:10]
    if reference:
        with pt.reference():
            groups = pt.sample(pt.model, prompts, n)
    else:
        groups = pt.sample(pt.model, prompts, n)
    return sum(float(reward(p, [s.text for s in g]).mean()) for p, g in zip(prompts, groups)) / len(prompts)


def blue_reward(messages, answers):
    """How often the answer says "blue"."""
    return torch.tensor([float(a.lower().count("blue")) for a in answers])


def test_rloo_at_default_settings_shifts_the_policy_toward_the_reward(blue_model):
    """Default learning rate, β, k, rank: only the answer length is cut to keep the test short."""
    pt = PolicyTrainer(policy_config(max_new_tokens=16), str(blue_model))
    before = mean_reward(pt, blue_reward, reference=True)
    for _ in range(4):
        out = pt.rloo_round(PROMPTS[:16], blue_reward)
    after = mean_reward(pt, blue_reward)
    # it samples the full distribution, as vLLM serves it: "blue" is rare at first, then common
    assert before < 2.0 and after > before + 1.0, (before, after)
    assert out["kl"] > 0 and math.isfinite(out["reward_mean"])
    assert out["updates"] == 4 * policy_config().steps_per_round
    assert 0 < out["groups_trained"] <= policy_config().groups_per_round and 0 < out["informative_fraction"] <= 1


def _blue_groups(pt, label: str, rng: random.Random):
    """The policy's own samples as users' signals under "likes blue": thumbs (up iff it says blue), or
    edits (the answer with " blue" appended)."""
    torch.manual_seed(7)
    groups = []
    for p, samples in zip(PROMPTS[:16], pt.sample(pt.model, PROMPTS[:16], 4)):
        for s in samples:
            text = s.text or "ok"
            if label == "thumbs":
                groups.append(to_prompt_group(_rated(p, text, "blue" in text.lower(), rng)))
            else:
                groups.append(to_prompt_group(_rated(p, text, False, rng)).model_copy(update={
                    "answers": [text, text + " blue"], "pairs": [(1, 0)], "undesirable": [], "demonstrations": [1]}))
    return groups


def _rated(messages, text, up, rng):
    event = marker_rating(rng)
    cmp = event.comparison.model_copy(update={"messages": messages, "answers": [
        event.comparison.answers[0].model_copy(update={"text": text})]})
    return event.model_copy(update={"comparison": cmp, "rating": "up" if up else "down"})


@pytest.mark.parametrize("signal", ["thumbs", "edits"])
def test_thumbs_and_edits_alone_move_the_policy_at_default_settings(blue_model, signal):
    """KTO on thumbs (few ups: the weights balance them) or SFT on edits, no reward model, default lr and β:
    the policy says "blue" more often."""
    pt = PolicyTrainer(policy_config(max_new_tokens=16), str(blue_model))
    before = mean_reward(pt, blue_reward, reference=True)
    rng = random.Random(0)
    for _ in range(3):
        out = pt.signal_round(_blue_groups(pt, signal, rng), z_ref=0.0)
    after = mean_reward(pt, blue_reward)
    assert after > before + 0.5, (before, after, out)
    if signal == "thumbs":
        assert 0 < out["kto_desirable"] < out["kto_answers"] == 64 and math.isfinite(out["kto_loss"])
        assert "sft_loss" not in out
    else:
        assert out["sft_answers"] == 64 and "kto_loss" not in out
    assert pt.signal_optimizers[{"thumbs": "kto", "edits": "sft"}[signal]].state  # its own AdamW moments


def test_dpo_raises_the_margin_of_preferred_answers(tiny_model):
    rng = random.Random(0)
    groups = [to_prompt_group(marker_event(rng)) for _ in range(24)]
    pt = PolicyTrainer(policy_config(algorithm="dpo", lr=1e-3, beta=0.1), str(tiny_model))
    first = pt.pair_round(groups)
    second = pt.pair_round(groups)
    assert second["dpo_margin"] > first["dpo_margin"] and second["dpo_loss"] < first["dpo_loss"]
    assert first["dpo_pairs"] == policy_config().pairs_per_round  # capped per round


@pytest.fixture(scope="module")
def judges():
    """The gate's judges fitted on synthetic votes (the answer with "banana" wins)."""
    rng = random.Random(0)
    j = JudgeEnsemble(SentenceEncoder(minilm_path()), n_judges=4)
    assert j.fit([to_prompt_group(marker_event(rng)) for _ in range(40)]) == 40
    return j


def test_judges_learn_the_voters_taste(judges):
    messages = [ChatMessage(role="user", content="Tell me something about tea.")]
    verdict = judges.prefer(messages, ["About tea: warm banana slow calm.", "About tea: banana green soft."],
                            ["About tea: warm slow calm.", "About tea: green soft."])
    assert verdict.shape == (4, 2) and verdict.mean() > 0.9


def test_judges_learn_the_taste_from_thumbs_alone():
    rng = random.Random(1)
    j = JudgeEnsemble(SentenceEncoder(minilm_path()), n_judges=4)
    assert j.fit([to_prompt_group(marker_rating(rng)) for _ in range(60)]) == 60
    messages = [ChatMessage(role="user", content="Tell me something about tea.")]
    verdict = j.prefer(messages, ["About tea: warm banana slow calm.", "About tea: banana green soft."],
                       ["About tea: warm slow calm.", "About tea: green soft."])
    assert verdict.mean() > 0.9


def test_judges_without_ordered_votes_say_nothing():
    j = JudgeEnsemble(SentenceEncoder(minilm_path()), n_judges=3)
    tie = to_prompt_group(marker_event(random.Random(0))).model_copy(update={"pairs": [], "ties": [(0, 1)]})
    assert j.fit([tie]) == 0
    assert j.prefer(PROMPTS[0], ["a", "b"], ["c", "d"]).tolist() == [[0.5, 0.5]] * 3


def test_gate_refuses_nan_weights_and_too_much_kl(tiny_model, judges):
    pt = PolicyTrainer(policy_config(max_new_tokens=8), str(tiny_model))
    live = load_causal_lm(str(tiny_model), pt.device)
    candidate = load_causal_lm(str(tiny_model), pt.device)
    lenient = gate_config(min_win_rate=0.0, max_kl=1e9, max_length_ratio=1e9, max_empty_share=1.0)
    ok = evaluate(pt, candidate, live, PROMPTS[:3], judges, lenient)
    assert ok.passed, ok.reasons
    assert 0.0 <= ok.metrics["win_rate_low"] <= ok.metrics["win_rate"] <= ok.metrics["win_rate_high"] <= 1.0
    strict = evaluate(pt, candidate, live, PROMPTS[:3], judges, gate_config(min_win_rate=0.0, max_kl=-1.0,
                                                                            max_length_ratio=1e9, max_empty_share=1.0))
    assert not strict.passed and "kl_too_high" in strict.reasons
    with torch.no_grad():
        next(candidate.parameters()).view(-1)[0] = float("nan")
    broken = evaluate(pt, candidate, live, PROMPTS[:3], judges, lenient)
    assert not broken.passed and broken.reasons == ["nonfinite_weights"]


def _synthetic_votes(n=40):
    rng = random.Random(1)
    return [to_prompt_group(marker_event(rng)) for _ in range(n)]


def test_a_round_at_default_settings_publishes_what_was_learned(blue_model, tmp_path):
    """Every policy setting at its default (only the answers are short), the gate's too but for its win-rate bar
    (its judges are fitted on unrelated synthetic votes here): the export differs from its parent (not
    rounded away in bf16), the KL to the reference stays bounded, and the state carries into the next round."""
    rounds = PolicyRounds(round_config(base_model=str(blue_model), registry_root=tmp_path / "registry",
                                       policy=policy_config(max_new_tokens=16), gate=gate_config(min_win_rate=0.0),
                                       release_checks=[]))
    votes = _synthetic_votes()
    first = rounds.run(PROMPTS[:16], PROMPTS[16:20], blue_reward, pairs=votes, judge_votes=votes)
    assert first.published is not None, (first.gate.reasons, first.gate.metrics)
    assert first.train_metrics["changed_fraction"] > 0.5  # most weights of the adapted layers moved
    assert 0.0 < first.gate.metrics["kl"] < gate_config().max_kl
    # RLOO steps, and DPO steps on users' pairs (16 pairs, 8 a step), each loss with its own AdamW
    rloo_steps = first.train_metrics["updates"] - 2
    assert first.train_metrics["dpo_pairs"] == 16 and 1 <= rloo_steps <= policy_config().steps_per_round
    moments = rounds.pt.optimizer.state_dict()["state"]
    assert moments and all(s["step"] == rloo_steps for s in moments.values())  # AdamW kept its state
    dpo = rounds.pt.signal_optimizers["dpo"].state_dict()["state"]
    assert dpo and all(s["step"] == 2 for s in dpo.values())
    second = rounds.run(PROMPTS[:16], PROMPTS[16:20], blue_reward, pairs=votes, judge_votes=votes)
    assert second.published.version == 2 and second.published.parent_version == 1
    assert second.train_metrics["changed_fraction"] > 0.1  # relative to v1, not to base
    assert rounds.pt.updates > first.train_metrics["updates"]


def test_a_refused_candidate_leaves_the_policy_where_it_was(blue_model, tmp_path):
    rounds = PolicyRounds(round_config(base_model=str(blue_model), registry_root=tmp_path / "registry",
                                       policy=policy_config(max_new_tokens=8), gate=gate_config(max_kl=-1.0),
                                       release_checks=[]))
    before = rounds.pt.state_dict()
    votes = _synthetic_votes(10)
    result = rounds.run(PROMPTS[:4], PROMPTS[4:6], blue_reward, pairs=votes, judge_votes=votes)
    assert result.published is None and "kl_too_high" in result.gate.reasons
    after = rounds.pt.state_dict()
    assert all(torch.equal(before["adapters"][k], after["adapters"][k]) for k in before["adapters"])
    assert Registry(tmp_path / "registry").latest() is None


def test_policy_state_round_trips_through_a_checkpoint(blue_model, tmp_path):
    """fp32 adapters and AdamW moments are saved with the trainer's checkpoint and restored exactly."""
    pt = PolicyTrainer(policy_config(max_new_tokens=8), str(blue_model))
    pt.rloo_round(PROMPTS[:4], blue_reward)
    rm = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(rm.parameters())
    path = checkpoint.save(tmp_path, Snapshot(TrainerState(), policy=pt.state_dict()), rm, opt)
    fresh = PolicyTrainer(policy_config(max_new_tokens=8), str(blue_model))
    fresh.load_state_dict(checkpoint.load(path, rm, opt).policy)
    a, b = pt.state_dict(), fresh.state_dict()
    assert a["updates"] == b["updates"] > 0
    assert all(torch.equal(a["adapters"][k], b["adapters"][k]) for k in a["adapters"])
    for pid, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"])
        assert torch.equal(s["exp_avg_sq"], b["optimizer"]["state"][pid]["exp_avg_sq"])


def test_round_publishes_verifiable_versions_and_announces(tiny_model, tmp_path, broker):
    ensure_topics(broker.bootstrap)
    cfg = round_config(base_model=str(tiny_model), registry_root=tmp_path / "registry", bootstrap=broker.bootstrap,
                      policy=policy_config(lr=2e-3, max_new_tokens=8, prompts_per_step=2),
                      gate=gate_config(min_win_rate=0.0, max_kl=1e9, max_length_ratio=1e9, max_empty_share=1.0),
                      keep_versions=2, release_checks=[])
    from transformers import AutoTokenizer

    reward = low_id_reward(AutoTokenizer.from_pretrained(str(tiny_model)))
    rounds = PolicyRounds(cfg)
    votes = _synthetic_votes(10)
    results = [rounds.run(PROMPTS[:4], PROMPTS[4:6], reward, pairs=votes, judge_votes=votes, kafka_offsets={0: 5})
               for _ in range(3)]
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


def test_pruning_keeps_the_parent_however_old(tmp_path):
    """Under canary tests users may reject several candidates in a row, all trained from the same incumbent:
    the registry keeps the newest `keep` versions and that incumbent."""
    reg = Registry(tmp_path / "registry", keep=2)
    common = dict(base_model="b", algorithm="rloo", hyperparameters={}, train_metrics={}, eval={}, kafka_offsets={})
    write = lambda folder: (folder / "model.safetensors").write_bytes(b"x")  # noqa: E731
    incumbent, _ = reg.publish(write, **common)
    for _ in range(4):
        reg.publish(write, parent=incumbent, **common)
    assert [m.version for m in reg.versions()] == [1, 4, 5]
    assert all(m.parent_version == 1 for m in reg.versions()[1:])
    reg.publish(write, **common)  # parent: the latest (5)
    assert [m.version for m in reg.versions()] == [5, 6]


def test_gate_kl_estimates_the_true_kl(tiny_model, judges):
    """One-token answers make KL(π‖π_ref) exact (a sum over the vocabulary). The gate's sampled
    estimate must match it; sampling at 0.7 instead of the policy's own temperature doubled it here."""
    pt = PolicyTrainer(policy_config(max_new_tokens=1), str(tiny_model))
    candidate = load_causal_lm(str(tiny_model), pt.device)
    with torch.no_grad():
        candidate.model.norm.weight.mul_(3.0)  # a sharper candidate
    messages = PROMPTS[0]
    ids = torch.tensor([pt.prompt_ids(messages)], device=pt.device)
    with torch.no_grad(), pt.reference():
        lp = torch.log_softmax(candidate(ids).logits[0, -1].float(), -1)
        lr = torch.log_softmax(pt.model(ids).logits[0, -1].float(), -1)
    exact = (lp.exp() * (lp - lr)).sum().item()
    torch.manual_seed(0)
    gate = evaluate(pt, candidate, pt.model, [messages], judges,
                    gate_config(min_win_rate=0.0, max_kl=1e9, samples_per_prompt=400, kl_samples=400,
                                max_length_ratio=1e9, max_empty_share=1.0))
    assert exact > 0.01 and gate.metrics["kl"] == pytest.approx(exact, rel=0.3)


def test_rounds_continue_from_users_incumbent_not_a_rejected_candidate(tiny_model, tmp_path):
    """Under canary tests, users may reject the last candidate: the next round starts from the policy state
    of the version they kept (saved beside its weights), or afresh from the base model."""
    cfg = round_config(base_model=str(tiny_model), registry_root=tmp_path / "registry",
                      policy=policy_config(lr=2e-3, max_new_tokens=8, prompts_per_step=2),
                       gate=gate_config(min_win_rate=0.0, max_kl=1e9, max_length_ratio=1e9, max_empty_share=1.0),
                       release_checks=[])
    from transformers import AutoTokenizer

    reward = low_id_reward(AutoTokenizer.from_pretrained(str(tiny_model)))
    rounds = PolicyRounds(cfg)
    votes = _synthetic_votes(10)
    v1 = rounds.run(PROMPTS[:4], PROMPTS[4:6], reward, pairs=votes, judge_votes=votes).published
    at_v1 = copy.deepcopy(rounds.pt.state_dict())
    v2 = rounds.run(PROMPTS[:4], PROMPTS[4:6], reward, pairs=votes, judge_votes=votes).published
    assert rounds.version == v2.name and rounds.pt.updates > at_v1["updates"]
    rounds.follow(v1.name)  # users rejected v2 and kept v1
    assert rounds.version == v1.name and rounds.pt.updates == at_v1["updates"]
    assert all(torch.equal(at_v1["adapters"][k], rounds.pt.state_dict()["adapters"][k]) for k in at_v1["adapters"])
    v3 = rounds.run(PROMPTS[:4], PROMPTS[4:6], reward, pairs=votes, judge_votes=votes, live_name=v1.name).published
    assert v3.parent_version == v1.version  # judged against and trained from v1, not v2
    cached = dict(rounds.pt.ref_cache)
    rounds.follow(None)  # users kept the base model
    assert rounds.version == "base" and rounds.pt.updates == 0
    # the reference's log-probs do not depend on who is followed: kept (with ranks, every rank keeps its own)
    assert cached and rounds.pt.ref_cache == cached
    v4 = rounds.run(PROMPTS[:4], PROMPTS[4:6], reward, pairs=votes, judge_votes=votes, live_name=None).published
    assert v4.parent_version is None
