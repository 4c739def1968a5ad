"""Freshness benchmark (prints JSON): time from the 64th vote of a fresh stream to a published,
gated policy version, with SmolLM2-135M-Instruct as policy and reward-model backbone on this CPU.

A fresh embedded broker and trainer home; 64 synthetic votes (the answer with a marker word wins)
stream in at --rate votes/s while `duet train` consumes them (reward-model steps as they come); its
policy round triggers at the 64th trained vote (DUET_POLICY_EVERY_VOTES). The clock runs from the
last vote's acknowledgement by Kafka to the announcement on the `weights` topic. Target: <= 5 min.
The gate's win-rate bar is 0 here (DUET_GATE_MIN_WIN_RATE): after one round at the default learning
rate the candidate is nearly the base model, and a win rate over a handful of held-out prompts is a
coin flip; the KL, finiteness and non-empty checks still apply. Pass --min-win-rate to change it.
Usage: python bench/freshness.py [--rate 2] [--votes 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from tqdm import tqdm  # noqa: E402

from duet.broker import EmbeddedBroker  # noqa: E402
from feedback.contract.events import WeightsAnnouncement  # noqa: E402
from feedback.contract.topics import FEEDBACK, WEIGHTS, ensure_topics  # noqa: E402
from trainer.examples import is_held_out, prompt_key  # noqa: E402
from trainer.synthetic import marker_event  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--votes", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2.0, help="votes per second")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--min-win-rate", type=float, default=0.0)
    ap.add_argument("--out", default="bench/results/freshness.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="duet-fresh-"))
    broker = EmbeddedBroker(log_path=tmp / "tansu.log").start()
    ensure_topics(broker.bootstrap)
    rng = random.Random(0)
    # held-out votes don't count toward the round: send enough that `votes` are trained
    events = []
    while sum(not is_held_out(prompt_key(e.comparison.messages), 10.0) for e in events) < args.votes:
        events.append(marker_event(rng))
    env = {**os.environ, "DUET_KAFKA_BOOTSTRAP": broker.bootstrap, "DUET_HOME": str(tmp / "home"),
           "DUET_POLICY_EVERY_VOTES": str(args.votes), "DUET_TRAINER_METRICS_PORT": "0", "HF_HUB_OFFLINE": "1",
           "DUET_MODEL": os.environ.get("DUET_MODEL", ""), "DUET_GATE_MIN_WIN_RATE": str(args.min_win_rate)}
    if not env["DUET_MODEL"]:
        from duet.model_assets import resolve_model
        from duet.settings import Settings

        s = Settings()
        env["DUET_MODEL"] = resolve_model(s.model, s.home)
    trainer = subprocess.Popen([sys.executable, "-m", "duet.cli", "train"], env=env,
                               stdout=open(tmp / "trainer.log", "w"), stderr=subprocess.STDOUT)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=True)
    watcher = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, enable_auto_commit=False)
    watcher.assign([TopicPartition(WEIGHTS, 0)])
    try:
        time.sleep(15)  # let the trainer start and join its group
        for e in tqdm(events, desc="votes"):
            producer.send(FEEDBACK, key=e.comparison.comparison_id.encode(), value=e.model_dump_json().encode()).get(30)
            time.sleep(1 / args.rate)
        last_vote = time.time()
        announced = None
        with tqdm(desc="waiting for a published version", unit="s") as bar:
            while announced is None and time.time() - last_vote < args.timeout:
                for batch in watcher.poll(timeout_ms=1000).values():
                    announced = WeightsAnnouncement.model_validate_json(batch[0].value)
                bar.update(1)
                if trainer.poll() is not None:
                    raise RuntimeError(f"trainer exited; see {tmp / 'trainer.log'}")
        if announced is None:
            raise RuntimeError(f"no version published within {args.timeout} s; see {tmp / 'trainer.log'}")
        seconds = time.time() - last_vote
        manifest = json.loads(Path(announced.manifest_location).read_text())
        result = {"model": env["DUET_MODEL"], "votes": len(events), "rate_votes_per_s": args.rate,
                  "seconds_from_last_vote_to_publish": round(seconds, 1), "version": announced.name,
                  "train_metrics": manifest["train_metrics"], "eval": manifest["eval"], "target_s": 300}
    finally:
        trainer.terminate()
        trainer.wait(60)
        producer.close()
        watcher.close()
        broker.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
