"""On a tiny random model, a synthetic preference (answers with a marker word win) is learned."""

import random

import pytest

from trainer.examples import to_prompt_group
from trainer.reward_trainer import RewardTrainer
from trainer.synthetic import marker_event, marker_rating
from duet.wiring import reward_config


@pytest.mark.parametrize("loss", ["bradley_terry", "prompt_aware"])
def test_tiny_reward_model_learns_a_marker_word(tiny_model, loss):
    rng = random.Random(1)
    train = [to_prompt_group(marker_event(rng, k=rng.choice([2, 2, 3]))) for _ in range(320)]
    held_out = [to_prompt_group(marker_event(rng)) for _ in range(100)]
    trainer = RewardTrainer(reward_config(backbone=str(tiny_model), loss=loss, lr=1e-3, replay_ratio=0.5,
                                                max_tokens=96, seed=0))
    before = trainer.accuracy(held_out)
    for epoch in range(2):
        for i in range(0, len(train), 16):
            trainer.step(train[i:i + 16])
    after = trainer.accuracy(held_out)
    assert after >= 0.9, (before, after)
    assert trainer.steps == 40 and len(trainer.replay.items) == 640


def test_thumbs_alone_teach_the_reward_model_the_order(tiny_model):
    """No pairs at all: the pointwise term on thumbs up/down ranks held-out pairs by the same taste."""
    rng = random.Random(2)
    train = [to_prompt_group(marker_rating(rng)) for _ in range(320)]
    held_out = [to_prompt_group(marker_event(rng)) for _ in range(100)]
    assert all(not g.pairs and len(g.labelled) == 1 for g in train)
    trainer = RewardTrainer(reward_config(backbone=str(tiny_model), lr=1e-3, replay_ratio=0.5, max_tokens=96))
    for epoch in range(2):
        for i in range(0, len(train), 16):
            trainer.step(train[i:i + 16])
    assert trainer.accuracy(held_out) >= 0.9
    # and σ(r) reads as the chance of a thumbs-up: labelled held-out answers land on the right side of 0
    assert trainer.accuracy([to_prompt_group(marker_rating(rng)) for _ in range(100)]) >= 0.9
