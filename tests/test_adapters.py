"""A candidate served as a runtime LoRA adapter on the incumbent's engine (serving/adapters.py,
serving/adapter_candidate.py): the adapter built from two versions turns the incumbent's merged weights into the
candidate's exactly (peft computes it); each load gets a new name and id (vllm#42125: a reloaded adapter under an
old name served the old one's cached KV); a load whose log-probs miss the trainer's probe is refused and unloaded;
the view answers to no version once the incumbent's engine holds another one. The real engine's side is
test_adapter_engine.py (slow); users judging a candidate served this way, test_canary_fast.py."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from duet.settings import Settings
from duet.two_engines import choose_canary
from duet.wiring import canary_candidate, engine_config, policy_config
from feedback.contract.comparisons import SamplingSpec
from feedback.contract.registry import ADAPTER_DIR, Registry
from serving.adapter_candidate import STALE, AdapterCandidate
from serving.adapters import AdapterUnavailable, engine_lora_rank, write_delta
from serving.swap import WeightSwapper
from tests.inprocess import FakeEngine, probe
from trainer.lora import lora_layers, merged_state_dict
from trainer.policy import PolicyTrainer

IDS = torch.tensor([[1, 42, 7, 99, 1000, 5, 300]])


def adapted(base: Path, seed: int, scale: float = 0.05, **lora) -> PolicyTrainer:
    """The base with random adapters (B is zero when fresh, which would prove nothing)."""
    pt = PolicyTrainer(policy_config(precision="fp32", **lora), str(base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(pt.model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)
    return pt


def exported(pt: PolicyTrainer, out: Path) -> Path:
    out.mkdir(parents=True)
    pt.export(out)
    return out


def logits_with(base: Path, weights: dict, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, str(adapter)).eval()(input_ids=IDS).logits


def test_the_delta_adapter_turns_the_incumbent_into_the_candidate(tiny_model, tmp_path):
    # another rank and alpha on each side: a scaling folded into the wrong side, or one side's rank read for
    # both, would not cancel
    incumbent, candidate = adapted(tiny_model, 1, lora_rank=4, lora_alpha=4.0), adapted(tiny_model, 2)
    inc_dir, cand_dir = exported(incumbent, tmp_path / "inc"), exported(candidate, tmp_path / "cand")
    with torch.no_grad():
        want = candidate.model(input_ids=IDS).logits
        was = incumbent.model(input_ids=IDS).logits
    assert (want - was).abs().max() > 1e-2  # the two versions answer differently

    rank = write_delta(cand_dir, inc_dir, tmp_path / "delta")
    assert rank == 4 + policy_config().lora_rank
    got = logits_with(tiny_model, merged_state_dict(incumbent.model, torch.float32), tmp_path / "delta")
    assert torch.allclose(got, want, atol=1e-4)

    # against base the adapter is the candidate's own, its scaling folded in
    assert write_delta(cand_dir, None, tmp_path / "own") == policy_config().lora_rank
    assert torch.allclose(logits_with(tiny_model, {}, tmp_path / "own"), want, atol=1e-4)


def test_versions_without_matching_adapters_are_refused(tiny_model, tmp_path):
    cand_dir = exported(adapted(tiny_model, 2), tmp_path / "cand")
    plain = tmp_path / "plain"  # merged weights only, no adapter/
    shutil.copytree(cand_dir, plain, ignore=shutil.ignore_patterns(ADAPTER_DIR))
    with pytest.raises(AdapterUnavailable, match="no readable adapter"):
        write_delta(plain, None, tmp_path / "x")
    with pytest.raises(AdapterUnavailable, match="no readable adapter"):
        write_delta(cand_dir, plain, tmp_path / "y")
    other = tmp_path / "other"  # an adapter on fewer layers than the candidate's
    shutil.copytree(cand_dir, other)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(other / ADAPTER_DIR / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "mlp" not in k}, str(other / ADAPTER_DIR / "adapter_model.safetensors"))
    with pytest.raises(AdapterUnavailable, match="different layers"):
        write_delta(cand_dir, other, tmp_path / "z")


def test_engine_rank_and_the_setting_per_device():
    assert [engine_lora_rank(r) for r in (4, 8, 16, 64)] == [8, 16, 32, 128]
    with pytest.raises(ValueError, match="above vLLM's largest"):
        engine_lora_rank(300)
    on_cpu = not torch.cuda.is_available()
    s = Settings(_env_file=None, canary="users")
    assert canary_candidate(s) == ("engine" if on_cpu else "adapter")
    adapter = Settings(_env_file=None, canary="users", canary_candidate="adapter", policy_lora_rank=16)
    assert engine_config(adapter).max_lora_rank == 32  # the incumbent's engine takes the candidate's delta
    assert engine_config(Settings(_env_file=None, canary="users", canary_candidate="engine")).max_lora_rank == 0
    assert engine_config(Settings(_env_file=None, canary="off", canary_candidate="adapter")).max_lora_rank == 0
    # an adapter needs no second engine: users judge even where two engines would not fit
    small = dict(on_gpu=True, weights_gb=14, kv_cache_gb=4, gpu_memory_utilization=0.9, mem_total_gb=16)
    assert choose_canary("auto", candidate="engine", **small).mode == "off"
    assert choose_canary("auto", candidate="adapter", **small).mode == "users"


def publish(registry: Path, source: Path, probe_logprobs=None) -> str:
    """`source` (with its adapter/) as the next version; its probe the FakeEngine's unless given."""
    manifest, _ = Registry(registry).publish(lambda folder: shutil.copytree(source, folder, dirs_exist_ok=True),
                                             base_model="tiny", algorithm="test", hyperparameters={},
                                             train_metrics={}, eval={}, kafka_offsets={},
                                             probe=probe_logprobs or probe())
    return manifest.name


def test_each_load_is_a_new_adapter_checked_against_the_probe(tiny_model, tmp_path):
    registry = tmp_path / "registry"
    v1 = publish(registry, exported(adapted(tiny_model, 1), tmp_path / "v1"))
    v2 = publish(registry, exported(adapted(tiny_model, 2), tmp_path / "v2"))
    host = FakeEngine()
    slot = AdapterCandidate(WeightSwapper(host, None, str(tiny_model), registry), tmp_path / "adapters")
    (tmp_path / "adapters").mkdir()

    async def go():
        first = await slot.activate(v1)
        assert first.result == "ok", first.reason
        view = slot.engine
        again = await slot.activate(v1)  # the same version loaded again: a new name and id all the same
        assert again.result == "ok"
        assert host.adapter_names == [f"{v1}-on-base-1", f"{v1}-on-base-2"]
        assert slot.engine.adapter.id != view.adapter.id
        assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == sorted(host.adapter_names)

        host.adapter_logprob = -3.0  # the engine computes other log-probs with the adapter than the trainer did
        refused = await slot.activate(v2)
        assert refused.result == "refused" and "log-probs differ" in refused.reason
        assert all(a.name.startswith(v1) for a in host.adapters.values())  # the refused one was unloaded
        assert slot.engine.model_version == v1  # the previous candidate stays

        host.adapter_logprob = -1.0
        host.model_version = v1  # the incumbent's engine took v1's merged weights (a promotion)
        assert slot.engine.model_version == STALE  # the adapter was built against base: it answers to nothing
        second = await slot.activate(v2)
        assert second.result == "ok" and host.adapter_names[-1] == f"{v2}-on-{v1}-4"
        config = json.loads((Path(slot.engine.adapter.path) / "adapter_config.json").read_text())
        assert config["r"] == 2 * policy_config().lora_rank  # built against v1: both adapters
        steps = [s async for s in slot.engine.generate([1, 2], SamplingSpec(temperature=0.0, top_p=1.0, max_tokens=8), 1, "r")]
        assert {s.model_version for s in steps} == {v2}
        assert f"from {v2}-on-{v1}-4" in "".join(d.text for s in steps for d in s.deltas)

    asyncio.run(go())


class SwappedMidCheck(FakeEngine):
    """An admin swap to `to` lands while a candidate's log-probs are checked (reload_weights drops adapters in
    vLLM; the adapter was built against the weights before it)."""
    def __init__(self, to: str) -> None:
        super().__init__()
        self.to = to

    async def prompt_logprobs(self, token_ids, request_id, adapter=None):
        self.model_version = self.to
        return await super().prompt_logprobs(token_ids, request_id, adapter)


def test_a_load_whose_check_is_interrupted_leaves_no_adapter_behind(tiny_model, tmp_path):
    registry = tmp_path / "registry"
    v1 = publish(registry, exported(adapted(tiny_model, 1), tmp_path / "v1"))
    v2 = publish(registry, exported(adapted(tiny_model, 2), tmp_path / "v2"))

    class Broken(FakeEngine):
        async def prompt_logprobs(self, token_ids, request_id, adapter=None):
            raise RuntimeError("engine dead")

    for host in (SwappedMidCheck(v1), Broken()):
        work = tmp_path / f"adapters-{type(host).__name__}"
        work.mkdir()
        slot = AdapterCandidate(WeightSwapper(host, None, str(tiny_model), registry), work)
        if isinstance(host, Broken):
            with pytest.raises(RuntimeError, match="engine dead"):
                asyncio.run(slot.activate(v2))
        else:
            rec = asyncio.run(slot.activate(v2))
            assert rec.result == "refused" and f"changed from base to {v1}" in rec.reason
        assert host.adapter_names == [f"{v2}-on-base-1"] and host.adapters == {}  # loaded, then unloaded
        assert list(work.iterdir()) == [] and slot.engine is None


def test_a_candidate_refused_by_an_admin_swap_is_tried_again_against_the_new_weights(tiny_model, tmp_path):
    from serving.canary import CanaryRunner

    registry = tmp_path / "registry"
    v1 = publish(registry, exported(adapted(tiny_model, 1), tmp_path / "v1"))
    v2 = publish(registry, exported(adapted(tiny_model, 2), tmp_path / "v2"))

    host = SwappedMidCheck(v1)  # an admin swap to v1 lands during the first check
    (tmp_path / "adapters").mkdir()
    incumbent = WeightSwapper(host, None, str(tiny_model), registry)
    slot = AdapterCandidate(incumbent, tmp_path / "adapters")
    runner = CanaryRunner(store=None, cfg=None, incumbent=incumbent, start_candidate=lambda: slot)

    asyncio.run(runner._load_candidate(v2))
    assert runner.load_error and "changed from base" in runner.load_error and runner.candidate_engine(v2) is None
    asyncio.run(runner._load_candidate(v2))  # the incumbent's weights are v1's now: built again against them
    assert runner.load_error is None and runner.candidate_engine(v2) is not None
    assert host.adapter_names == [f"{v2}-on-base-1", f"{v2}-on-{v1}-2"]
