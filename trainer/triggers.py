"""When the trainer acts: pure functions of counts and elapsed seconds (the service passes its clock's readings),
so each rule is tested without waiting for anything."""

from __future__ import annotations


def reward_step_due(pending: int, step_groups: int, waited_s: float, max_wait_s: float, flush: bool = False) -> bool:
    """A reward-model step once `step_groups` votes are pending, or fewer once the oldest has waited `max_wait_s`
    (or on `flush`: `duet train --once` caught up with the topic)."""
    return pending > 0 and (pending >= step_groups or flush or waited_s > max_wait_s)


def round_due(trained_since_round: int, pending: int, every_votes: int, since_round_s: float, every_s: float) -> bool:
    """A policy round after `every_votes` trained votes, or `every_s` after the last round if any vote came in. If a
    slow round left a backlog of untrained votes larger than `every_votes`, the reward model catches up first —
    one step per pass, so this costs seconds — but for at most as many votes again: neither side starves."""
    if not trained_since_round:
        return False
    if trained_since_round >= every_votes and pending > every_votes and trained_since_round < 2 * every_votes:
        return False  # catching up
    return trained_since_round >= every_votes or since_round_s >= every_s


def idle_reward_step_due(pending: int, replay: int, idle_steps: int, steps_per_vote: float, trained: int) -> bool:
    """A replay-only step while nothing is pending, at most `steps_per_vote` per vote trained so far."""
    return not pending and replay > 0 and idle_steps < steps_per_vote * trained


def checkpoint_due(dirty: bool, since_checkpoint_s: float, every_s: float) -> bool:
    """Consumed-but-untrained votes are checkpointed at most every `every_s` (not after every vote)."""
    return dirty and since_checkpoint_s > every_s
