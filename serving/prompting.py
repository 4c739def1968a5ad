"""Messages -> prompt token ids, with the model's own chat template."""

from __future__ import annotations

from feedback.contract.comparisons import ChatMessage


class PromptBuilder:
    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if not self.tokenizer.chat_template:
            raise ValueError(f"the tokenizer in {model_path} has no chat template")

    def token_ids(self, messages: list[ChatMessage]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=False
        )
        # The template already contains the special tokens it needs.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
