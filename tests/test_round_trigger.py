"""When the trainer runs a policy round: every M trained votes, or T seconds after the last round
(counted from the first start, not from the epoch) if any vote came in."""

import random
import time

import pytest

from trainer import triggers
from trainer.service import TrainerService
from duet.wiring import gate_config, policy_config, reward_config, round_config, service_config


def test_the_triggers_as_pure_rules():
    # a round: every 64 trained votes, or 600 s after the last one if any vote came in
    assert not triggers.round_due(0, 0, 64, 10_000, 600)  # no votes: never
    assert not triggers.round_due(10, 0, 64, 5, 600)  # few votes, just after a round
    assert triggers.round_due(64, 0, 64, 5, 600)
    assert not triggers.round_due(64, 100, 64, 5, 600)  # a backlog a slow round left: the reward model first...
    assert triggers.round_due(128, 100, 64, 5, 600)  # ...for at most as many votes again
    assert triggers.round_due(10, 0, 64, 601, 600)  # time
    # a reward-model step: 8 pending, or fewer after 30 s, or on flush
    assert not triggers.reward_step_due(0, 8, 100, 30, flush=True)
    assert not triggers.reward_step_due(3, 8, 10, 30) and triggers.reward_step_due(3, 8, 31, 30)
    assert triggers.reward_step_due(8, 8, 0, 30) and triggers.reward_step_due(1, 8, 0, 30, flush=True)
    # idle replay steps: at most 0.5 per vote trained, never with votes pending
    assert triggers.idle_reward_step_due(0, 10, 4, 0.5, 10) and not triggers.idle_reward_step_due(0, 10, 5, 0.5, 10)
    assert not triggers.idle_reward_step_due(1, 10, 0, 0.5, 10) and not triggers.idle_reward_step_due(0, 0, 0, 0.5, 10)
    assert triggers.checkpoint_due(True, 11, 10) and not triggers.checkpoint_due(True, 9, 10)
    assert not triggers.checkpoint_due(False, 100, 10)


def test_the_service_reads_its_own_clock(tiny_model, tmp_path):
    now = [1_000_000.0]
    svc = TrainerService(service_config(kafka_bootstrap="unused:9092", checkpoint_dir=tmp_path / "ckpt",
                                        rounds=round_config(base_model=str(tiny_model), registry_root=tmp_path / "reg",
                                                            release_checks=[]),
                                        policy_every_votes=64, policy_every_s=600, redis_url="", canary="off"),
                         reward_config(backbone=str(tiny_model)), clock=lambda: now[0])
    svc.state.votes_since_round = 10
    assert not svc.round_due()  # few votes, and the service just started (the time trigger counts from here)
    now[0] += 601
    assert svc.round_due()
    svc.rounds = None
    assert not svc.round_due()  # reward model only


@pytest.fixture
def canary_redis():
    import redis

    from tests.conftest import TEST_REDIS_DB

    url = f"redis://127.0.0.1:6379/{TEST_REDIS_DB + 2}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    try:
        yield url, r
    finally:
        r.flushdb()
        r.close()


def _judged_service(tiny_model, tmp_path, url, **round_kw) -> TrainerService:
    return TrainerService(service_config(kafka_bootstrap="unused:9092", checkpoint_dir=tmp_path / "ckpt",
                                        rounds=round_config(base_model=str(tiny_model), registry_root=tmp_path / "reg",
                                                          **round_kw, release_checks=[]),
                                        policy_every_votes=64, redis_url=url, canary="users",
                                        canary_supersede_after=60),
                          reward_config(backbone=str(tiny_model)))


def test_rounds_go_on_while_users_judge_and_publish_once_the_test_has_its_votes(tiny_model, tmp_path, canary_redis):
    from feedback.canary import CANARY

    url, r = canary_redis
    svc = _judged_service(tiny_model, tmp_path, url)
    svc.state.votes_since_round = 64
    assert svc.round_due() and svc.may_publish()  # no test yet
    assert svc._canary() == (None, None)  # from the base model, gated against it
    r.hset(CANARY, mapping={"candidate": "v000002", "incumbent": "v000001", "status": "running",
                            "started_at": time.time(), "wins": 30, "ties": 0, "losses": 29})
    assert svc.round_due()  # the trainer does not wait for users
    assert not svc.may_publish()  # 59 cross-version votes: too few to cut the test short
    assert svc._canary() == ("v000002", None)  # goes on from the candidate; its incumbent (none promoted) gates
    r.hset(CANARY, "losses", 30)
    assert svc.may_publish()  # 60: a newer candidate may supersede it
    r.hset(CANARY, mapping={"status": "paused", "losses": 0})
    assert svc.round_due() and not svc.may_publish()
    r.hset(CANARY, mapping={"status": "rejected", "reason": "votes", "decided_at": time.time()})
    assert svc.may_publish()
    assert svc._canary() == (None, None)  # rejected: its state is left behind
    r.hset(CANARY, "status", "promoted")
    assert svc._canary() == ("v000002", "v000002")
    svc.cfg.redis_url, svc.redis = "", _unreachable_redis()
    assert not svc.may_publish()  # cannot tell: train now, publish later


def _unreachable_redis():
    import redis

    return redis.Redis(host="127.0.0.1", port=9, socket_timeout=0.5, socket_connect_timeout=0.5)


def test_a_round_during_a_young_test_trains_and_holds_its_candidate(tiny_model, tmp_path, canary_redis):
    """A round while users judge a candidate (fewer than `canary_supersede_after` votes): the policy is updated
    and kept — the next round goes on from it — but nothing is gated or published; once the test has its votes,
    the next round publishes."""
    from feedback.canary import CANARY
    from trainer.examples import to_prompt_group
    from trainer.synthetic import marker_event

    url, r = canary_redis
    svc = _judged_service(tiny_model, tmp_path, url, policy=policy_config(max_new_tokens=8),
                          gate=gate_config(min_win_rate=0.0, prompts=2))
    rng = random.Random(0)
    svc.reward.step([to_prompt_group(marker_event(rng)) for _ in range(8)])
    svc.state.votes_since_round = 64
    r.hset(CANARY, mapping={"candidate": "base", "incumbent": "base", "status": "running",
                            "started_at": time.time(), "wins": 3, "ties": 0, "losses": 2})
    updates = svc.rounds.pt.updates
    held = svc.policy_round()
    assert held is not None and held.held and held.published is None
    assert svc.rounds.pt.updates > updates and svc.state.rounds == 1  # trained, and kept
    assert svc.rounds.registry.latest() is None
    kept = svc.rounds.pt.updates
    r.hset(CANARY, "losses", 60)  # the test has its votes now
    svc.state.votes_since_round = 64
    published = svc.policy_round()
    assert published is not None and not published.held and published.published is not None
    assert svc.rounds.pt.updates > kept  # went on from the held round's update
