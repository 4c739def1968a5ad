"""When the trainer runs a policy round: every M trained votes, or T seconds after the last round
(counted from the first start, not from the epoch) if any vote came in."""

import time

from trainer.reward_trainer import RewardTrainerConfig
from trainer.rounds import RoundConfig
from trainer.service import ServiceConfig, TrainerService


def test_round_trigger(tiny_model, tmp_path):
    svc = TrainerService(ServiceConfig(kafka_bootstrap="unused:9092", checkpoint_dir=tmp_path / "ckpt",
                                      round=RoundConfig(base_model=str(tiny_model), registry_root=tmp_path / "reg"),
                                      policy_every_votes=64, policy_every_s=600),
                        RewardTrainerConfig(backbone=str(tiny_model)))
    assert not svc.round_due()  # no votes
    svc.state.votes_since_round = 10
    assert not svc.round_due()  # few votes, and the service just started
    svc.state.votes_since_round = 64
    assert svc.round_due()
    svc.pending = [None] * 100  # a backlog a slow round left behind: the reward model catches up first...
    assert not svc.round_due()
    svc.state.votes_since_round = 128  # ...for at most as many votes again
    assert svc.round_due()
    svc.pending = []
    svc.state.votes_since_round = 10
    svc.state.last_round_at = time.time() - 601
    assert svc.round_due()
    svc.rounds = None
    assert not svc.round_due()  # reward model only
