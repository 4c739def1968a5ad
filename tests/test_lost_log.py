"""A broker that loses its log loses no vote: the relay keeps every vote until a trainer checkpoint
confirms it and sends the unconfirmed ones again into the new log; the trainer follows by itself and
trains each vote exactly once. Real tansu (SIGKILLed), real Redis (a database of its own), real
`duet train`."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import redis

from duet.broker import EmbeddedBroker
from feedback.outbox import OUTBOX
from feedback.relay import OutboxRelay
from feedback.contract.topics import FEEDBACK
from feedback.unconfirmed import LOG_EPOCH, UNCONFIRMED, Unconfirmed
from tests.conftest import TEST_REDIS_DB, empty_redis
from tests.kafka_helpers import read_topic
from trainer import checkpoint
from trainer.synthetic import marker_event
from tests.waiting import wait_until

REDIS_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB + 1}"  # not the session server's: its relay runs there


@pytest.fixture()
def r():
    yield from empty_redis(REDIS_URL)


def add_vote(r: redis.Redis, event_id: str, payload: str = "{}", key: str = "cmp") -> None:
    """What the vote script appends (feedback/outbox.py), without the comparison record around it."""
    r.xadd(OUTBOX, {"event_id": event_id, "key": key, "payload": payload})


def restart(broker: EmbeddedBroker) -> None:
    """SIGKILL: the in-memory log dies with it; a new, empty broker on the same port."""
    broker.proc.kill()
    broker.proc.wait()
    broker.start()


def log_ids(bootstrap: str, expect: int) -> Counter:
    records = read_topic(bootstrap, FEEDBACK, lambda recs: len(recs) >= expect, timeout_s=30)
    return Counter(dict(rec.headers)["event_id"].decode() for rec in records)


def test_unconfirmed_votes_are_sent_again_into_a_new_log(r, tmp_path):
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    relay = OutboxRelay(REDIS_URL, broker.bootstrap, log_check_s=0.3).start()
    store = Unconfirmed(r)
    try:
        ids = [f"e{i:03d}" for i in range(30)]
        for i in ids:
            add_vote(r, i)
        wait_until(lambda: r.xlen(OUTBOX) == 0 and r.hlen(UNCONFIRMED) == 30, 30, "30 votes relayed")
        assert store.confirm_trained(ids[:10]) == 10  # a trainer checkpoint covers the first ten
        assert set(r.hkeys(UNCONFIRMED)) == set(ids[10:])
        assert store.epoch() == 0

        # idle relay, broker SIGKILLed: found by the end-offset check, the 20 unconfirmed are sent again
        restart(broker)
        wait_until(lambda: store.epoch() == 1, 30, "the lost log to be noticed")
        assert log_ids(broker.bootstrap, 20) == Counter({i: 1 for i in ids[10:]})
        wait_until(lambda: r.xlen(OUTBOX) == 0, 30, "the outbox to drain")
        assert set(r.hkeys(UNCONFIRMED)) == set(ids[10:])  # still unconfirmed: kept

        # votes flowing while the broker dies: found by an ack at an offset handed out before
        flowing = [f"f{i:03d}" for i in range(60)]

        def feed():
            for i in flowing:
                add_vote(r, i)
                time.sleep(0.02)

        feeder = threading.Thread(target=feed)
        feeder.start()
        time.sleep(0.5)
        restart(broker)
        feeder.join()
        wait_until(lambda: store.epoch() >= 2 and r.xlen(OUTBOX) == 0, 30, "the second loss to be noticed")
        everything = set(ids[10:]) | set(flowing)
        got = log_ids(broker.bootstrap, len(everything))
        assert set(got) == everything  # duplicates are allowed (the trainer skips them), losses are not
        assert set(r.hkeys(UNCONFIRMED)) == everything
        assert 'duet_feedback_log_losses_total' in _relay_metrics()
    finally:
        relay.stop()
        broker.stop()


def test_a_frozen_broker_is_not_a_lost_log(r, tmp_path):
    """A broker frozen (SIGSTOP) for 14 s while votes are sent: the producer's retries reach it after it wakes,
    and one it had already written is acknowledged with offset -1. That is not a lost log: every vote is
    relayed, the log epoch stays (the trainer does not re-read the topic), nothing is sent again."""
    import signal

    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    relay = OutboxRelay(REDIS_URL, broker.bootstrap, log_check_s=0.3).start()
    store = Unconfirmed(r)
    try:
        for i in range(10):
            add_vote(r, f"a{i}")
        wait_until(lambda: r.xlen(OUTBOX) == 0 and r.hlen(UNCONFIRMED) == 10, 30, "10 votes relayed")
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(10):
                add_vote(r, f"b{i}")
            time.sleep(14)  # the fault itself: the broker stays frozen this long, as in the probe
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: r.xlen(OUTBOX) == 0 and r.hlen(UNCONFIRMED) == 20, 60, "20 votes relayed")
        assert store.epoch() == 0, "a slow acknowledgement was read as a lost log"
        assert set(log_ids(broker.bootstrap, 20)) == {f"a{i}" for i in range(10)} | {f"b{i}" for i in range(10)}
    finally:
        relay.stop()
        broker.stop()


def _relay_metrics() -> str:
    from prometheus_client import REGISTRY, generate_latest

    return generate_latest(REGISTRY).decode()


def test_a_confirmation_that_beats_the_relay_and_retention(r):
    store = Unconfirmed(r)
    add_vote(r, "early")
    add_vote(r, "late")
    [(sid_early, _), (sid_late, _)] = r.xrange(OUTBOX)
    # the trainer read "early" and checkpointed before the relay recorded Kafka's ack
    assert store.confirm_trained(["early"]) == 0
    store.record_sent([(sid_early, 0, 5, 1), (sid_late, 1, 7, int(time.time() * 1000))], keep=True)
    assert r.xlen(OUTBOX) == 0
    assert set(r.hkeys(UNCONFIRMED)) == {"late"}  # "early" is not kept: it is confirmed already
    assert store.log_end() == {0: 6, 1: 8} and store.log_floor() == {0: 5, 1: 7}
    stored = json.loads(r.hget(UNCONFIRMED, "late"))
    assert (stored["partition"], stored["offset"], stored["key"]) == (1, 7, "cmp")
    assert store.stats()[0] == 1
    # no trainer confirms for the retention period: dropped
    assert store.expire(keep_s=3600) == 0 and store.expire(keep_s=0) == 1
    assert r.hlen(UNCONFIRMED) == 0
    # keep_s=0 (a durable Kafka): acked votes leave the outbox and are not kept
    add_vote(r, "durable")
    [(sid, _)] = r.xrange(OUTBOX)
    store.record_sent([(sid, 2, 0, 1)], keep=False)
    assert r.xlen(OUTBOX) == 0 and r.hlen(UNCONFIRMED) == 0
    # requeue puts what is unconfirmed back in the outbox in acceptance order, with its time
    for i, eid in enumerate(["x", "y"]):
        add_vote(r, eid)
    sids = [sid for sid, _ in r.xrange(OUTBOX)]
    store.record_sent([(sids[0], 0, 9, 2000), (sids[1], 0, 10, 1000)], keep=True)
    assert store.requeue_all() == 2
    assert [(f["event_id"], f["accepted_ms"]) for _, f in r.xrange(OUTBOX)] == [("y", "1000"), ("x", "2000")]
    assert r.hlen(UNCONFIRMED) == 0 and store.log_end() == {} and int(r.get(LOG_EPOCH)) == 1


@pytest.mark.slow
def test_broker_sigkill_with_votes_flowing_trains_every_vote_exactly_once(r, tiny_model, tmp_path):
    rng = random.Random(11)
    events = [marker_event(rng, k=2) for _ in range(150)]
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    relay = OutboxRelay(REDIS_URL, broker.bootstrap, log_check_s=0.5).start()
    env = {**os.environ, "DUET_KAFKA_BOOTSTRAP": broker.bootstrap, "DUET_HOME": str(tmp_path / "home"),
           "DUET_REDIS_URL": REDIS_URL, "DUET_RM_BACKBONE": str(tiny_model), "DUET_RM_STEP_GROUPS": "8",
           "DUET_RM_MAX_WAIT_S": "1", "DUET_RM_MAX_TOKENS": "64", "DUET_TRAINER_METRICS_PORT": "0",
           "DUET_MODEL": str(tiny_model), "HF_HUB_OFFLINE": "1",
           "DUET_POLICY_EVERY_VOTES": "100000", "DUET_POLICY_EVERY_S": "100000",  # the reward model only
           # what is tested is recovery, not priority: at its default nice 10 the trainer got ~5 % of a core beside
           # other load (CI: no vote checkpointed 120 s after a restart; here with two busy loops: 45 s)
           "DUET_TRAINER_NICE": "0",
           # no round ever runs here: keep the trainer's warming of the gate (while idle, at start) short
           "DUET_GATE_PROMPTS": "2", "DUET_RELEASE_CHECKS": "off"}
    trainer = subprocess.Popen([sys.executable, "-m", "duet.cli", "train"], env=env,
                               stdout=subprocess.DEVNULL, stderr=open(tmp_path / "trainer.log", "wb"))
    ckpt_dir = tmp_path / "home" / "trainer" / "checkpoints"

    def trained_ids() -> set[str]:
        last = checkpoint.latest(ckpt_dir)
        return set(checkpoint.read_state(last).seen_ids) if last else set()

    added: dict[str, float] = {}
    try:
        def feed(batch):
            for e in batch:
                add_vote(r, e.event_id, e.model_dump_json(), e.comparison.comparison_id)
                added[e.event_id] = time.time()
                time.sleep(0.05)

        feed(events[:30])
        wait_until(lambda: len(trained_ids()) >= 20, 180, "the trainer to start and checkpoint")
        recovery = []
        for part in (events[30:90], events[90:]):  # two kills, each while votes flow
            feeder = threading.Thread(target=feed, args=(part,))
            feeder.start()
            time.sleep(1.0)
            restart(broker)
            t0 = time.time()
            # resumed: a vote accepted after the new broker started is in a checkpoint
            try:
                wait_until(lambda: any(added.get(i, 0) > t0 for i in trained_ids()), 120, "the trainer to resume")
            except AssertionError as e:  # what the trainer was doing, for whoever reads the failure
                raise AssertionError(f"{e}\ntrainer log:\n{_tail(tmp_path / 'trainer.log')}") from None
            recovery.append(round(time.time() - t0, 1))
            feeder.join()
        all_ids = {e.event_id for e in events}
        wait_until(lambda: trained_ids() == all_ids, 180, "every vote to be trained")
        wait_until(lambda: r.hlen(UNCONFIRMED) == 0, 30, "the trainer to confirm every vote")
        assert trainer.poll() is None, "the trainer exited"
    finally:
        relay.stop()
        trainer.terminate()
        trainer.wait(60)
        broker.stop()
    state = checkpoint.read_state(checkpoint.latest(ckpt_dir))
    assert state.events_trained + state.events_held_out + len(_pending(ckpt_dir)) == len(events)  # exactly once
    assert state.log_epoch >= 2
    print(f"a vote accepted after each broker restart was checkpointed after {recovery} s")


def _tail(path, lines: int = 40) -> str:
    keep = [ln for ln in path.read_text(errors="replace").splitlines() if "trainer.service" in ln or "Error" in ln]
    return "\n".join(keep[-lines:])


def _pending(ckpt_dir) -> list:
    path = checkpoint.latest(ckpt_dir) / "pending.jsonl"
    return path.read_text().splitlines() if path.exists() else []
