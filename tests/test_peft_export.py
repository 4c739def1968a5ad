"""Every exported version carries its adapters in PEFT's LoRA format (issue 26): peft itself loads them onto the
base model and computes what the trainer's policy computes, and the registry's manifest checksums them."""

from __future__ import annotations

import json

import torch

from duet.wiring import policy_config
from feedback.contract.registry import ADAPTER_DIR, Registry, verify
from trainer.lora import lora_layers
from trainer.policy import PolicyTrainer


def test_peft_loads_the_exported_adapters_and_computes_the_same(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pt = PolicyTrainer(policy_config(precision="fp32"), str(tiny_model))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B is zero when fresh, which would prove nothing
        for m in lora_layers(pt.model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    out = tmp_path / "export"
    out.mkdir()
    pt.export(out)
    config = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (pt.cfg.lora_rank, pt.cfg.lora_alpha)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out / ADAPTER_DIR)).eval()
    ids = torch.tensor([[1, 42, 7, 99, 1000, 5, 300]])
    with torch.no_grad():
        mine = pt.model(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            reference = plain(input_ids=ids).logits
    assert (mine - reference).abs().max() > 1e-3  # the adapters change the output...
    assert torch.allclose(mine, theirs, atol=1e-4)  # ...and peft applies them exactly as the trainer does


def test_the_registry_checksums_the_adapter(tiny_model, tmp_path):
    pt = PolicyTrainer(policy_config(precision="fp32"), str(tiny_model))
    export = tmp_path / "export"
    export.mkdir()
    pt.export(export)

    def write(folder):
        import shutil

        shutil.copytree(export, folder, dirs_exist_ok=True)

    manifest, folder = Registry(tmp_path / "registry").publish(
        write, base_model="tiny", algorithm="test", hyperparameters={}, train_metrics={}, eval={}, kafka_offsets={})
    assert {f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/adapter_model.safetensors"} <= set(manifest.files)
    (folder / ADAPTER_DIR / "adapter_model.safetensors").write_bytes(b"tampered")
    assert verify(folder) == [f"{ADAPTER_DIR}/adapter_model.safetensors checksum mismatch"]
