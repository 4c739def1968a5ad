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


def test_no_round_while_users_judge_the_last_candidate(tiny_model, tmp_path):
    import redis

    from feedback.canary import CANARY
    from tests.conftest import TEST_REDIS_DB

    url = f"redis://127.0.0.1:6379/{TEST_REDIS_DB + 2}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    try:
        svc = TrainerService(ServiceConfig(kafka_bootstrap="unused:9092", checkpoint_dir=tmp_path / "ckpt",
                                          round=RoundConfig(base_model=str(tiny_model), registry_root=tmp_path / "reg"),
                                          policy_every_votes=64, redis_url=url, canary="users"),
                            RewardTrainerConfig(backbone=str(tiny_model)))
        svc.state.votes_since_round = 64
        assert svc.round_due()  # no test yet
        r.hset(CANARY, mapping={"candidate": "v000001", "incumbent": "base", "status": "running",
                                "started_at": time.time()})
        assert not svc.round_due()
        r.hset(CANARY, "status", "paused")
        assert not svc.round_due()
        r.hset(CANARY, mapping={"status": "rejected", "reason": "votes", "decided_at": time.time()})
        assert svc.round_due()
    finally:
        r.flushdb()
        r.close()
