"""The fast alternative backbone (all-MiniLM-L6-v2 from its wheel) loads offline and scores."""

import pytest
import torch

from feedback.contract.comparisons import ChatMessage
from trainer.reward_model import RewardModel, minilm_path


@pytest.mark.slow
def test_minilm_reward_model_scores_and_backpropagates():
    rm = RewardModel.from_backbone(minilm_path(), max_tokens=64)
    assert not rm.is_decoder  # encoders mean-pool
    r = rm.score([ChatMessage(role="user", content="hi")], ["hello there", "go away"])
    assert r.shape == (2,) and torch.isfinite(r).all()
    (r[0] - r[1]).backward()
    assert rm.head.weight.grad is not None
