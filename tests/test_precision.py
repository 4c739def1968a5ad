"""The trainer's precision helpers: the output head fed a contiguous input computes the same logits, keeps the
weight (tied to the embedding) and its name, and does not materialise the weight per batch row — what torch's CPU
bf16 matmul does with the sliced hidden states `logits_to_keep` hands it (1.7 GB for 32 rows of SmolLM2's head)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.policy import load_causal_lm
from trainer.precision import ContiguousHead, contiguous_head


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_the_head_computes_the_same_logits_on_a_sliced_input():
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    x = torch.randn(3, 7, 16, dtype=torch.bfloat16)[:, -2:, :]  # what logits_to_keep=2 passes: not contiguous
    assert not x.is_contiguous()
    assert torch.equal(ContiguousHead(head)(x), head(x.contiguous()))


def test_loaded_models_keep_their_tied_head_and_its_name(tiny_model):
    model = load_causal_lm(str(tiny_model), torch.device("cpu"), bf16=True)
    assert isinstance(model.lm_head, ContiguousHead)
    assert "lm_head.weight" in model.state_dict()
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    first = model.lm_head
    contiguous_head(model)  # idempotent: not wrapped twice
    assert model.lm_head is first


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's per-process peak RSS reset")
def test_a_sliced_bf16_batch_through_a_wide_head_stays_small():
    """32 rows through a frozen 49,152 × 576 bf16 head (SmolLM2's, as the trainer holds it): the weight is 54 MB;
    materialised per row, as a plain `nn.Linear` does here, 1.7 GB (measured; a trainable weight takes another
    path). Bound: 300 MB above what was held before."""
    weight = torch.nn.Linear(576, 49152, bias=False).to(torch.bfloat16).requires_grad_(False)
    head = ContiguousHead(weight)
    hidden = torch.randn(32, 47, 576, dtype=torch.bfloat16)
    Path("/proc/self/clear_refs").write_text("5")
    before = _peak_mb()
    with torch.no_grad():
        logits = head(hidden[:, -1:, :])
    assert logits.shape == (32, 1, 49152)
    assert _peak_mb() - before < 300
