"""Serving samples for the trainer: POST /admin/rollouts on the real engine, and an RLOO round that takes
its samples from it."""

from __future__ import annotations

import httpx
import pytest
import torch

from feedback.contract.comparisons import ChatMessage
from tests.conftest import ADMIN_KEY
from trainer.policy import PolicyTrainer
from trainer.rollouts import ServingRollouts
from duet.wiring import gate_config, policy_config, round_config

pytestmark = pytest.mark.slow

PROMPTS = [[ChatMessage(role="user", content=f"Tell me about {t}.")] for t in ("tea", "rain", "trains", "cats")]


def live_version(url: str) -> str:
    return httpx.get(url + "/ready", timeout=10).json()["model_version"]


def test_rollouts_return_n_completions_per_prompt_from_the_live_version(duet_server, tiny_model):
    pt = PolicyTrainer(policy_config(max_new_tokens=8), str(tiny_model))
    ids = [pt.prompt_ids(m) for m in PROMPTS[:3]]
    serving = ServingRollouts(duet_server.url, ADMIN_KEY)
    out = serving.sample(ids, 2, 8, 1.0, live_version(duet_server.url))
    assert out is not None and [len(g) for g in out] == [2, 2, 2]
    assert all(1 <= len(c) <= 8 and all(0 <= t < len(pt.tokenizer) for t in c) for g in out for c in g)
    # a version that is not live: refused, and the trainer falls back to sampling itself
    assert serving.sample(ids, 2, 8, 1.0, "v999999") is None
    r = httpx.post(duet_server.url + "/admin/rollouts", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                   json={"prompts": ids, "n": 2, "max_tokens": 8, "model_version": "v999999"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_not_live"


def test_rollouts_need_the_admin_key_before_anything_else(duet_server, api_key):
    body = {"prompts": "not token ids"}
    assert httpx.post(duet_server.url + "/admin/rollouts", json=body).status_code == 401
    plain = httpx.post(duet_server.url + "/admin/rollouts", json=body, headers={"Authorization": f"Bearer {api_key}"})
    assert plain.status_code == 403
    bad = httpx.post(duet_server.url + "/admin/rollouts", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"]
    empty = httpx.post(duet_server.url + "/admin/rollouts", json={"prompts": []},
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert empty.status_code == 400


def test_an_rloo_round_takes_its_samples_from_serving(duet_server, tiny_model):
    pt = PolicyTrainer(policy_config(max_new_tokens=8, prompts_per_step=2), str(tiny_model))
    serving = ServingRollouts(duet_server.url, ADMIN_KEY)
    version = live_version(duet_server.url)
    calls = []

    def rollouts(ids, n):
        calls.append(len(ids))
        return serving.sample(ids, n, 8, 1.0, version)

    out = pt.rloo_round(PROMPTS, lambda m, texts: torch.tensor([float(len(t)) for t in texts]), rollouts)
    assert calls == [4]  # the whole round's samples at once, from the live engine
    assert out["sampled_by"] == "serving" and 1 <= out["updates"] <= policy_config().steps_per_round
    # serving unreachable: the round samples locally
    out = pt.rloo_round(PROMPTS[:2], lambda m, texts: torch.zeros(len(texts)),
                        lambda ids, n: ServingRollouts("http://127.0.0.1:9", ADMIN_KEY).sample(ids, n, 8, 1.0, version))
    assert out["sampled_by"] == "trainer"


def test_a_policy_round_samples_rloo_from_serving(duet_server, tiny_model, tmp_path):
    """With no version published by this trainer, the live engine must be serving base: then the RLOO samples
    come from it. (The gate's answers are drawn here, candidate, live and base with the same seeds.)"""
    import random

    from trainer.examples import to_prompt_group
    from trainer.rounds import PolicyRounds
    from trainer.synthetic import marker_event

    assert live_version(duet_server.url) == "base"
    rounds = PolicyRounds(round_config(base_model=str(tiny_model), registry_root=tmp_path / "registry",
                                      rollout_url=duet_server.url, rollout_key=ADMIN_KEY,
                                      policy=policy_config(max_new_tokens=8),
                                      gate=gate_config(min_win_rate=0.0, max_kl=1e9, max_length_ratio=1e9,
                                                      max_empty_share=1.0), release_checks=[]))
    rng = random.Random(0)
    votes = [to_prompt_group(marker_event(rng)) for _ in range(10)]
    result = rounds.run(PROMPTS, PROMPTS[:2], lambda m, texts: torch.tensor([float(len(t)) for t in texts]),
                        pairs=votes, judge_votes=votes)
    assert result.train_metrics["sampled_by"] == "serving"
    assert result.published is not None
