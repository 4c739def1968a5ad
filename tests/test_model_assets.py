"""The default model converts from the shipped GGUF into a folder vLLM and transformers load."""

import json

import pytest

from duet.model_assets import resolve_model


@pytest.mark.slow
def test_default_model_converts_once(tmp_path):
    path = resolve_model("", tmp_path)
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert path == str(folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    assert (folder / "model.safetensors").stat().st_size > 200e6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                              add_generation_prompt=True, tokenize=False)
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert resolve_model("", tmp_path) == path  # cached: not converted again
    assert (folder / "model.safetensors").stat().st_mtime == mtime
    assert resolve_model("/some/other/folder", tmp_path) == "/some/other/folder"
