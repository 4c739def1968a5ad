"""`duet train`: the long-running reward-model service.

Loop: poll vote events -> classify (train / hold out / count only) -> when enough new prompt groups
have gathered (or they have waited long enough) take one step -> checkpoint -> commit offsets.

Exactly once: a checkpoint stores the Kafka offset of every partition and the event ids it covers,
and is written only when nothing consumed is left untrained, so "consumed up to the offsets" and
"trained" are the same set. After a crash the trainer restarts from the newest checkpoint, seeks
every partition to its offset, and skips any event id it has already seen. Offsets are committed to
the consumer group only after a checkpoint, for lag monitoring.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from feedback import loop_status
from feedback.registry import BASE_VERSION, version_name
from feedback.consumer import FeedbackConsumer, SeenIds
from feedback.topics import FEEDBACK
from trainer import checkpoint, metrics
from trainer.checkpoint import TrainerState
from trainer.examples import PromptGroup, is_held_out, to_prompt_group
from trainer.reward_trainer import ReplayBuffer, RewardTrainer, RewardTrainerConfig
from trainer.rounds import RoundConfig, RoundResult, reward_model_fn, run_round

log = logging.getLogger(__name__)


@dataclass
class ServiceConfig:
    bootstrap: str
    checkpoint_dir: Path
    group_id: str = "duet-trainer"
    topic: str = FEEDBACK
    step_groups: int = 8  # new prompt groups per step
    max_wait_s: float = 30.0  # ...or fewer, once the oldest has waited this long
    held_out_pct: float = 10.0
    eval_every: int = 10  # steps
    keep_checkpoints: int = 3
    idle_checkpoint_s: float = 10.0  # advance offsets past count-only events at most this often
    # The embedded broker forgets everything when it stops: offsets stored against an earlier one
    # would skip the new broker's first votes. Weights, replay and seen ids are kept.
    fresh_broker: bool = False
    round: RoundConfig | None = None  # None: reward model only, no policy rounds
    round_every_votes: int = 64
    round_every_s: float = 1800.0
    round_prompts: int = 8
    gate_prompts: int = 8
    redis_url: str = ""  # where the dashboard's loop status goes (feedback/loop_status.py); "" = nowhere


class RewardService:
    def __init__(self, cfg: ServiceConfig, rm: RewardTrainerConfig) -> None:
        self.cfg = cfg
        self.trainer = RewardTrainer(rm)
        self.state = TrainerState()
        self.held_out: list[PromptGroup] = []
        self.stop = threading.Event()
        path = checkpoint.latest(cfg.checkpoint_dir)
        if path is not None:
            self.state, replay, self.held_out = checkpoint.load(path, self.trainer.model, self.trainer.optimizer)
            self.trainer.replay = ReplayBuffer(rm.replay_capacity, replay, seed=rm.seed)
            self.trainer.steps = self.state.step
            log.info("resumed from %s: %d events trained, offsets %s", path.name, self.state.events_trained,
                     self.state.offsets)
        if cfg.fresh_broker:
            self.state.offsets = {}
        if not self.state.last_round_at:  # the time-based trigger counts from the first start
            self.state.last_round_at = time.time()
        self.seen = SeenIds(ids=self.state.seen_ids)
        self.pending: list[PromptGroup] = []
        self.pending_since = 0.0
        self.dirty = False  # consumed count-only/held-out events not yet in a checkpoint
        self.last_checkpoint = time.time()
        self.status = _status_client(cfg.redis_url)
        self.last_lag: int | None = None

    def run(self, once: bool = False) -> TrainerState:
        """Train until stopped; with once=True, until caught up with the topic, then return."""
        consumer = FeedbackConsumer(self.cfg.bootstrap, self.cfg.group_id, topic=self.cfg.topic,
                                    start_offsets=self.state.offsets, seen=self.seen)
        bar = _progress(self.state)
        try:
            while not self.stop.is_set():
                for d in consumer.poll(timeout_ms=500):
                    self._classify(d.event)
                caught_up = self._lag(consumer) == 0
                due = self.pending and (len(self.pending) >= self.cfg.step_groups or caught_up and once
                                        or time.time() - self.pending_since > self.cfg.max_wait_s)
                if due:
                    self._step()
                    if self.pending:  # stopped mid-backlog: no checkpoint may cover untrained events
                        break
                if (due or self.dirty and (once and caught_up or
                                           time.time() - self.last_checkpoint > self.cfg.idle_checkpoint_s)):
                    self._checkpoint(consumer)
                if not self.pending and self._round_due():
                    self.policy_round()
                    self._checkpoint(consumer)
                if bar is not None:
                    bar.n = self.state.events_trained + self.state.events_held_out + self.state.events_untrainable
                    bar.set_postfix(loss=self.state.last_loss, acc=self.state.held_out_accuracy, refresh=False)
                    bar.refresh()
                if once and caught_up and not self.pending and not self.dirty and consumer.consumer.assignment():
                    break
        finally:
            if bar is not None:
                bar.close()
            consumer.close()
        return self.state

    def _classify(self, event) -> None:
        label = event.choice or event.rating or "ranking"
        metrics.VOTES_BY_CHOICE.labels(choice=label).inc()
        self.state.counts[label] = self.state.counts.get(label, 0) + 1
        group = to_prompt_group(event)
        if group is None:
            self.state.events_untrainable += 1
            metrics.EVENTS.labels(outcome="untrainable").inc()
            self.dirty = True
        elif is_held_out(group.comparison_id, self.cfg.held_out_pct):
            self.held_out.append(group)
            self.state.events_held_out += 1
            metrics.EVENTS.labels(outcome="held_out").inc()
            self.dirty = True
        else:
            if not self.pending:
                self.pending_since = time.time()
            self.pending.append(group)
            voted = event.voted_at.timestamp()
            if self.state.oldest_unrounded_vote is None or voted < self.state.oldest_unrounded_vote:
                self.state.oldest_unrounded_vote = voted

    def _step(self) -> None:
        """Train on everything pending, `step_groups` at a time (a checkpoint must not leave any behind)."""
        while self.pending:
            if self.stop.is_set():  # stopping mid-backlog: the last checkpoint stays the truth
                return
            chunk, self.pending = self.pending[:self.cfg.step_groups], self.pending[self.cfg.step_groups:]
            t0 = time.perf_counter()
            out = self.trainer.step(chunk)
            metrics.STEP_TIME.observe(time.perf_counter() - t0)
            metrics.RM_STEPS.inc()
            metrics.RM_LOSS.set(out["loss"])
            metrics.EVENTS.labels(outcome="trained").inc(len(chunk))
            self.state.events_trained += len(chunk)
            self.state.votes_since_round += len(chunk)
            self.state.step = self.trainer.steps
            self.state.last_loss = out["loss"]
            self._maybe_evaluate(out)
        if self.status is not None:
            loop_status.record(self.status, loop_status.REWARD_MODEL, loop_status.RewardModelStatus(
                step=self.state.step, votes_trained=self.state.events_trained,
                votes_held_out=self.state.events_held_out, held_out_accuracy=self.state.held_out_accuracy,
                loss=self.state.last_loss, consumer_lag=self.last_lag))

    def _maybe_evaluate(self, out: dict) -> None:
        # show an accuracy as soon as there is one (cheap while the held-out set is small)
        first = self.state.held_out_accuracy is None and len(self.held_out) <= 64
        if (first or self.state.step % self.cfg.eval_every == 0) and self.held_out:
            acc = self.trainer.accuracy(self.held_out[-500:])
            if acc is not None:
                self.state.held_out_accuracy = acc
                metrics.RM_ACCURACY.set(acc)
        log.info("step %d: loss %.4f (%d new, %d replayed), held-out accuracy %s", self.state.step, out["loss"],
                 out["new"], out["replayed"], self.state.held_out_accuracy)

    # --- policy rounds ------------------------------------------------------------------------
    def _round_due(self) -> bool:
        if self.cfg.round is None or not self.state.votes_since_round:
            return False
        return (self.state.votes_since_round >= self.cfg.round_every_votes
                or time.time() - self.state.last_round_at >= self.cfg.round_every_s)

    def policy_round(self) -> RoundResult | None:
        """Improve the policy with the current reward model on recent user prompts; gate; publish."""
        recent = list(self.trainer.replay.items)[-max(self.cfg.round_prompts, 1) * 4:]
        if not recent or not self.held_out:
            log.info("policy round skipped: needs trained and held-out comparisons")
            return None
        prompts = [g.messages for g in recent[-self.cfg.round_prompts:]]
        eval_prompts = [g.messages for g in self.held_out[-self.cfg.gate_prompts:]]
        try:
            result = run_round(self.cfg.round, prompts, eval_prompts, reward_model_fn(self.trainer.model),
                               pairs=recent, kafka_offsets=self.state.offsets,
                               oldest_vote_ts=self.state.oldest_unrounded_vote)
        except Exception:
            metrics.POLICY_ROUNDS.labels(result="failed").inc()
            log.exception("policy round failed")
            result = None
        self.state.votes_since_round = 0
        self.state.oldest_unrounded_vote = None
        self.state.last_round_at = time.time()
        self._report_round(result)
        return result

    def _report_round(self, result: RoundResult | None) -> None:
        if self.status is None:
            return
        if result is None:
            loop_status.record(self.status, loop_status.ROUNDS, loop_status.RoundStatus(result="failed"))
            return
        m, g = result.published, result.gate.metrics
        parent = (version_name(m.parent_version) if m.parent_version else BASE_VERSION) if m else None
        loop_status.record(self.status, loop_status.ROUNDS, loop_status.RoundStatus(
            result="published" if m else "rejected", version=m.name if m else None, parent_version=parent,
            reward_mean=result.train_metrics.get("reward_mean"), kl=g.get("kl"), win_rate=g.get("win_rate"),
            reasons=result.gate.reasons))
        if m and g.get("wins") is not None:
            loop_status.record(self.status, loop_status.BATTLES, loop_status.Battle(
                model_a=m.name, model_b=parent, wins=int(g["wins"]), ties=int(g["ties"]), losses=int(g["losses"]),
                judge="reward_model"))

    def _checkpoint(self, consumer: FeedbackConsumer) -> None:
        self.state.offsets = {**self.state.offsets, **consumer.positions()}
        self.state.seen_ids = self.seen.to_list()
        checkpoint.save(self.cfg.checkpoint_dir, self.state, self.trainer.model, self.trainer.optimizer,
                        list(self.trainer.replay.items), self.held_out, keep=self.cfg.keep_checkpoints)
        # After a rebalance, resume from this checkpoint, not from where this process started.
        consumer.start_offsets = dict(self.state.offsets)
        try:
            consumer.commit(self.state.offsets)
        except Exception as e:  # e.g. a rebalance in progress: the checkpoint is what counts
            log.warning("offset commit failed (lag metrics only): %s: %s", type(e).__name__, e)
        self.dirty = False
        self.last_checkpoint = time.time()
        metrics.CHECKPOINT_TIME.set(self.last_checkpoint)

    def _lag(self, consumer: FeedbackConsumer) -> int | None:
        """Events not yet consumed; None until this consumer holds every partition of the topic
        (after a crash, the dead member keeps some until its session times out: not caught up)."""
        assigned = list(consumer.consumer.assignment())
        if not assigned:
            return None
        ends = consumer.consumer.end_offsets(assigned)
        lag = sum(max(0, ends[tp] - consumer.consumer.position(tp)) for tp in assigned)
        metrics.LAG.set(lag)
        self.last_lag = lag
        if len(assigned) < len(consumer.consumer.partitions_for_topic(self.cfg.topic) or ()):
            return None
        return lag


def _status_client(url: str):
    if not url:
        return None
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def _progress(state: TrainerState):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(desc="votes consumed", unit="vote", initial=state.events_trained + state.events_held_out
                + state.events_untrainable)
