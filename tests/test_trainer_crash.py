"""Exactly once, whatever crashes: SIGKILL `duet train` at random moments while votes stream in, and
once more while it is idle, restart it each time, then check every event id was trained (or held out /
counted) exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from kafka import KafkaProducer

from duet.broker import EmbeddedBroker
from feedback.contract.topics import FEEDBACK, ensure_topics
from trainer import checkpoint
from feedback.contract.registry import Registry, verify
from tests.conftest import TEST_REDIS_DB, empty_redis
from trainer.synthetic import marker_event
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

N_EVENTS = 240
CRASH_REDIS = f"redis://127.0.0.1:6379/{TEST_REDIS_DB + 1}"


@pytest.fixture(autouse=True)
def own_redis():
    yield from empty_redis(CRASH_REDIS)


def test_sigkill_across_restarts_trains_every_event_exactly_once(tiny_model, tmp_path):
    rng = random.Random(7)
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    try:
        ensure_topics(broker.bootstrap, partitions=3)
        events = [marker_event(rng, k=rng.choice([2, 2, 3])) for _ in range(N_EVENTS - 20)]
        # some votes that carry no order: counted, never trained
        for e in rng.sample(events, 20):
            events.append(e.model_copy(update={"event_id": e.event_id[:-4] + "bbbb", "choice": "both_bad",
                                               "ranking": None}))
        rng.shuffle(events)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=True)

        def stream():  # ~8 votes/s, with one duplicate delivery in every 30 (at-least-once upstream)
            for i, e in enumerate(events):
                producer.send(FEEDBACK, key=e.comparison.comparison_id.encode(), value=e.model_dump_json().encode())
                if i % 30 == 0:
                    producer.send(FEEDBACK, key=e.comparison.comparison_id.encode(),
                                  value=e.model_dump_json().encode())
                time.sleep(1 / 8)
            producer.flush()

        feeder = threading.Thread(target=stream)
        feeder.start()
        env = {**os.environ, "DUET_KAFKA_BOOTSTRAP": broker.bootstrap, "DUET_HOME": str(tmp_path / "home"),
               "DUET_REDIS_URL": CRASH_REDIS,  # its loop status: never a user's database 0
               "DUET_RM_BACKBONE": str(tiny_model), "DUET_RM_LR": "1e-3", "DUET_RM_STEP_GROUPS": "4",
               "DUET_RM_MAX_WAIT_S": "0.5", "DUET_RM_MAX_TOKENS": "96", "DUET_TRAINER_METRICS_PORT": "0",
               "DUET_HELD_OUT_PCT": "10", "HF_HUB_OFFLINE": "1",
               # policy rounds run too (and get killed too): tiny policy, a permissive gate
               "DUET_MODEL": str(tiny_model), "DUET_POLICY_EVERY_VOTES": "60", "DUET_POLICY_MAX_NEW_TOKENS": "8",
               "DUET_POLICY_PROMPTS": "4", "DUET_GATE_PROMPTS": "2", "DUET_GATE_MIN_WIN_RATE": "0",
               "DUET_GATE_MAX_KL": "1e9", "DUET_RELEASE_CHECKS": "off"}
        cmd = [sys.executable, "-m", "duet.cli", "train"]
        kills = 0
        progress = []  # events trained per the newest checkpoint, after each kill
        ckpt_dir = tmp_path / "home" / "trainer" / "checkpoints"
        while feeder.is_alive() or kills < 3:
            before = checkpoint.latest(ckpt_dir)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # past start-up and the group join (~11 s idle, longer on a loaded machine): once this run has
            # written a checkpoint of its own, kill it at a random moment
            wait_until(lambda: checkpoint.latest(ckpt_dir) != before or proc.poll() is not None, 120,
                       "a checkpoint of this run", 0.2)
            time.sleep(rng.uniform(0, 4))
            if proc.poll() is None:
                # DUET_TRAINER_NICE (10) on top of ours: serving comes first
                assert os.getpriority(os.PRIO_PROCESS, proc.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            last = checkpoint.latest(ckpt_dir)
            progress.append(checkpoint.read_state(last).events_trained if last else 0)
        feeder.join()
        producer.close()
        # and once more while idle: caught up with the topic, nothing left to train but the idle checkpoint
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        def caught_up() -> bool:
            last = checkpoint.latest(ckpt_dir)
            return proc.poll() is not None or bool(last and len(checkpoint.read_state(last).seen_ids) == len(events))

        wait_until(caught_up, 180, "a checkpoint covering every vote", 0.5)
        time.sleep(rng.uniform(0, 12))  # around the 10 s idle checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        done = subprocess.run(cmd + ["--once"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

        # the kills landed mid-stream: each restart resumed from a checkpoint that had moved on
        assert len({p for p in progress if p > 0}) >= 2, progress
        ckpts = checkpoint.checkpoints(ckpt_dir)
        assert len(ckpts) <= 3  # old ones pruned
        state = checkpoint.read_state(ckpts[-1])
        assert sorted(state.seen_ids) == sorted(e.event_id for e in events)
        assert state.events_trained + state.events_held_out == len(events)  # both-bad votes train too
        assert state.counts["both_bad"] == 20
        assert state.events_held_out > 0 and state.step > 0
        assert sum(state.offsets.values()) == len(events) + len(range(0, len(events), 30))  # all read
        assert kills >= 4
        # whatever the kills hit, every visible version is whole and matches its manifest
        registry = Registry(tmp_path / "home" / "registry")
        assert registry.versions(), "no policy round published"
        assert all(verify(registry.path(m)) == [] for m in registry.versions())
        assert registry.latest().version == registry.versions()[-1].version
    finally:
        broker.stop()
