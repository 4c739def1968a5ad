"""On a tiny random model, a synthetic preference (answers with a marker word win) is learned."""

import random

import pytest

from trainer.examples import to_prompt_group
from trainer.reward_trainer import RewardTrainer, RewardTrainerConfig
from trainer.synthetic import marker_event


@pytest.mark.parametrize("loss", ["bradley_terry", "prompt_aware"])
def test_tiny_reward_model_learns_a_marker_word(tiny_model, loss):
    rng = random.Random(1)
    train = [to_prompt_group(marker_event(rng, k=rng.choice([2, 2, 3]))) for _ in range(320)]
    held_out = [to_prompt_group(marker_event(rng)) for _ in range(100)]
    trainer = RewardTrainer(RewardTrainerConfig(backbone=str(tiny_model), loss=loss, lr=1e-3, replay_ratio=0.5,
                                                max_tokens=96, seed=0))
    before = trainer.accuracy(held_out)
    for epoch in range(2):
        for i in range(0, len(train), 16):
            trainer.step(train[i:i + 16])
    after = trainer.accuracy(held_out)
    assert after >= 0.9, (before, after)
    assert trainer.steps == 40 and len(trainer.replay.items) == 640
