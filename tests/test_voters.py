"""Voter screening: a voter who votes against everyone else's taste is quarantined, with confidence; honest
voters are not; quarantined votes are counted and not trained on; it all survives a checkpoint."""

from __future__ import annotations

import random

from trainer import checkpoint
from trainer.service import TrainerService
from trainer.synthetic import marker_event
from trainer.voters import VoterScreen
from duet.wiring import reward_config, service_config


def _vote(rng: random.Random, key: str, flip: bool = False):
    ev = marker_event(rng)
    if flip:  # a saboteur picks the answer everyone else rejects
        ev = ev.model_copy(update={"choice": "b" if ev.choice == "a" else "a"})
    return ev.model_copy(update={"key_id": key})


def test_a_saboteur_is_quarantined_and_honest_voters_are_not(tiny_model, tmp_path):
    """The saboteur names a new `user` with every vote (each a fresh identity with one vote): its key, which it
    cannot choose, answers for them all."""
    svc = TrainerService(service_config(kafka_bootstrap="unused:9092", checkpoint_dir=tmp_path, held_out_pct=0.0,
                                        rounds=None, redis_url="", canary="off"),
                         reward_config(backbone=str(tiny_model), lr=1e-3, max_tokens=96))
    rng = random.Random(0)
    for _ in range(2):  # the reward model learns the honest voters' taste first
        for _ in range(160):
            svc.classify(_vote(rng, f"honest{rng.randrange(3)}"))
            if len(svc.pending) >= 16:
                svc.train_reward_model()
    for i in range(120):  # then a saboteur votes alongside them, naming a fresh end user every time
        svc.classify(_vote(rng, "saboteur", flip=True).model_copy(update={"user_hash": f"{rng.getrandbits(64):x}"}))
        svc.classify(_vote(rng, f"honest{i % 3}"))
        if len(svc.pending) >= 16:
            svc.train_reward_model()
    screen = svc.state.screen
    assert screen.is_quarantined("key:saboteur"), screen.voters["key:saboteur"]
    assert not any(screen.is_quarantined(f"key:honest{i}") for i in range(3))
    sab = screen.voters["key:saboteur"]
    assert sab.quarantined_votes > 0 and svc.state.events_quarantined == sab.quarantined_votes
    # every vote counted: scored until quarantined; the one that tipped it and all later ones not trained on
    assert sab.quarantined_votes == 120 - sab.votes + 1
    assert all(g.answers for g in svc.pending)  # pending holds only trainable votes (none of the saboteur's)

    snap = checkpoint.Snapshot(svc.state, [], [], [], None)
    checkpoint.save(tmp_path / "ck", snap, svc.reward.model, svc.reward.optimizer, keep=1)
    restored = checkpoint.read_state(checkpoint.latest(tmp_path / "ck"))
    assert restored.screen.is_quarantined("key:saboteur") and restored.events_quarantined == sab.quarantined_votes


def test_an_untrained_or_coin_flip_agreement_quarantines_no_one():
    """Agreement exactly at chance, 300 voters × 300 votes: each is quarantined with probability ≤ α/2 =
    2.5 % (conservative: measured well under 1 %); the test fails only if 30 or more are (binomial(300,
    0.025) ≥ 30 has probability < 1e-6)."""
    rng = random.Random(3)
    screen = VoterScreen()
    for v in range(300):
        for _ in range(300):
            screen.record(f"v{v}", float(rng.random() < 0.5))
    assert screen.summary()["quarantined_voters"] < 30
