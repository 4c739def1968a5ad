"""The orders rank 0 gives the other ranks of a distributed trainer (trainer/distributed.py `Lockstep`), all in one
place: each kind, what its payload is, and who sends and handles it. Ranks other than 0 run `Lockstep.serve` with
a handler per kind (trainer/service.py `_follow`) until STOP."""

from __future__ import annotations

from trainer.distributed import Lockstep

SYNC = "sync"  # service, after a (re)start: the reward model's and policy's weights every rank starts from
RM_STEP = "rm_step"  # service: (batch, new votes) — one reward-model step, sharded
UPDATE = "policy_update"  # rounds: a PolicyUpdate (state, rng, prompts, samples...) — a policy round's update, sharded
STATE = "policy_state"  # rounds: the policy state the round left, sent before anything is published
TICK = "tick"  # service, when idle for TICK_S: nothing — the others' collective would time out otherwise
STOP = Lockstep.STOP  # service, on a normal exit only: the others return

TICK_S = 600.0  # an order at least this often
