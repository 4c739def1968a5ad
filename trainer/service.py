"""`duet train`: the long-running trainer. One loop of named steps, read top to bottom:

    consume votes → train the reward model (one step) → policy round, when due → checkpoint → repeat

Each pass trains at most one reward-model step, so a steady stream of votes never starves the policy
round: a round starts as soon as `policy_every_votes` votes have been trained (or `policy_every_s` passed);
and a backlog left by a slow round is trained first, for at most as many votes again, so the reward
model is never left behind for good either. With nothing else to do, the reward model takes replay-only
steps (at most `rm_idle_steps_per_vote` per vote trained): votes arrive every few seconds, a step takes
one or two, and one pass over each vote left it under-trained.

What a round learns from is drawn from every vote so far, newest first (`replay_draw`): RLOO prompts, users'
pairs (DPO), thumbs and edits (KTO, SFT). A refused round's votes are drawn again by the next one.

Exactly once: a checkpoint stores the Kafka offset of every partition, the event ids it covers, and the
votes consumed but not yet trained (`pending`), so "consumed up to the offsets" is always "trained or
pending in the checkpoint" and a checkpoint may be written at any moment. After a crash the trainer
restarts from the newest checkpoint, seeks every partition to its offset, and skips any event id it has
already seen. Offsets are committed to the consumer group only after a checkpoint, for lag monitoring.

A broker that loses its log (the embedded one keeps it in memory): after each checkpoint the trainer
confirms the event ids it covers, so the relay keeps every vote no checkpoint covers and sends those
again into the new log; the relay also bumps the log epoch, and the trainer, seeing it change, reads
the new log from offset 0 (feedback/unconfirmed.py). Its consumer holds partitions by assignment, not
group membership, so a restarted broker needs no rejoin.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from feedback import loop_status
from feedback.canary import read_canary, users_incumbent
from feedback.contract.comparisons import ChatMessage
from feedback.consumer import FeedbackConsumer, SeenIds
from feedback.contract.registry import BASE_VERSION, version_name
from feedback.contract.topics import FEEDBACK
from feedback.unconfirmed import Unconfirmed
from trainer import checkpoint, metrics
from trainer.backlog import BacklogWatcher, backlog_of
from trainer.checkpoint import Snapshot, TrainerState
from trainer.distributed import SINGLE, Lockstep, LockstepBroken, World
from trainer.examples import PromptGroup, is_held_out, prompt_key, to_prompt_group
from trainer.reward_trainer import ReplayBuffer, RewardTrainer, RewardTrainerConfig
from trainer.rounds import PolicyRounds, RoundConfig, RoundResult, reward_model_fn
from trainer.orders import RM_STEP, STATE, STOP, SYNC, TICK, TICK_S, UPDATE
from trainer import triggers
from trainer.voters import voters_of

log = logging.getLogger(__name__)


@dataclass
class ServiceConfig:
    """Bound from the settings by duet/wiring.py (`service_config`); field names are the settings' own
    (DUET_<NAME>). The fields with defaults here are not settings."""
    kafka_bootstrap: str
    checkpoint_dir: Path
    trainer_group_id: str
    rm_step_groups: int  # new prompt groups per reward-model step
    rm_max_wait_s: float  # ...or fewer, this long after the last step (or the first pending vote)
    held_out_pct: float
    keep_checkpoints: int
    # The embedded broker forgets everything when it stops: offsets stored against an earlier one
    # would skip the new broker's first votes. Weights, replay and seen ids are kept.
    trainer_fresh_broker: bool
    rounds: RoundConfig | None  # None: reward model only, no policy rounds
    policy_every_votes: int
    policy_every_s: float
    policy_prompts: int
    policy_signals: int  # thumbs, both-bad and edit votes replayed per round (KTO, SFT)
    rm_idle_steps_per_vote: float  # replay-only reward-model steps while idle, per vote trained
    redis_url: str  # where the dashboard's loop status goes (feedback/loop_status.py); "" = nowhere
    # "users": serving tests each published version against users' incumbent (feedback/canary.py). Rounds go on
    # while a test runs, continuing from the candidate under test; a round publishes (superseding that test) only
    # once the test has `canary_supersede_after` cross-version votes, else it is "held": trained, not published.
    # A rejected candidate's state is left behind: the next round continues from users' incumbent.
    canary: str
    canary_supersede_after: int
    topic: str = FEEDBACK
    eval_every: int = 10  # steps
    idle_checkpoint_s: float = 10.0  # checkpoint consumed-but-untrained votes at most this often




class TrainerService:
    def __init__(self, cfg: ServiceConfig, rm: RewardTrainerConfig, clock: Callable[[], float] = time.time,
                 world: World = SINGLE) -> None:
        self.cfg = cfg
        self.clock = clock  # wall time (unix seconds): the triggers' elapsed times; tests pass their own
        # under torchrun rank 0 runs the loop below and the others train their share of its steps (`follow_rank0`)
        self.world, self.lockstep = world, Lockstep(world)
        self.reward = RewardTrainer(rm, world=world)
        self.rounds = PolicyRounds(cfg.rounds, self.lockstep) if cfg.rounds is not None else None
        self.gate_texts = {p.strip() for p in cfg.rounds.gate_prompts} if cfg.rounds is not None else set()
        self.state = TrainerState()
        self.held_out: list[PromptGroup] = []
        self.pending: list[PromptGroup] = []
        self.stop = threading.Event()
        # a damaged newest checkpoint is moved aside and the one before it used (not a crash loop); the other
        # ranks take rank 0's state when the loop starts
        found = checkpoint.load_newest_good(cfg.checkpoint_dir, self.reward.model, self.reward.optimizer) \
            if world.main else None
        if found is not None:
            path, snap = found
            self.state, self.held_out, self.pending = snap.state, snap.held_out, snap.pending
            self.reward.replay = ReplayBuffer(rm.replay_capacity, snap.replay, seed=rm.seed)
            self.reward.steps = self.state.step
            if self.rounds is not None and snap.policy is not None:
                self.rounds.load_state_dict(snap.policy)
            log.info("resumed from %s: %d events trained, %d pending, offsets %s", path.name,
                     self.state.events_trained, len(self.pending), self.state.offsets)
        if cfg.trainer_fresh_broker:
            self.state.offsets = {}
        if not self.state.last_round_at:  # the time-based trigger counts from the first start
            self.state.last_round_at = self.clock()
        self.seen = SeenIds(ids=self.state.seen_ids)
        self.pending_since = self.clock()
        self.dirty = False  # consumed events not yet in a checkpoint
        self.last_checkpoint = self.clock()
        self.redis = _redis_client(cfg.redis_url)
        self.unconfirmed = Unconfirmed(self.redis) if self.redis is not None else None
        self.to_confirm: list[str] = []  # event ids in a checkpoint, not yet confirmed to the relay
        self.epoch_checked = 0.0
        self.last_lag: int | None = None
        self.positions: dict[int, int] | None = None  # partition → next offset to consume, as of the last look
        self.rng = random.Random(rm.seed)
        self.saved_marks: dict[str, object] = {}  # what the newest checkpoint holds (see `checkpoint`)
        self.gate_warmed = self.rounds is None  # the base model's gate answers and check values, computed once idle

    # --- the loop -----------------------------------------------------------------------------------
    def run(self, once: bool = False) -> TrainerState:
        """Train until stopped; with once=True, until caught up with the topic and nothing is pending. On a rank
        other than 0: follow rank 0's orders until it stops."""
        if not self.world.main:
            self.follow_rank0()
            return self.state
        with self.leading():
            return self._run(once)

    def _run(self, once: bool) -> TrainerState:
        consumer = FeedbackConsumer(self.cfg.kafka_bootstrap, self.cfg.trainer_group_id, topic=self.cfg.topic,
                                    start_offsets=self.state.offsets, seen=self.seen)
        bar = _progress(self.state)
        # the backlog stays current while a round or a step keeps this loop busy for minutes
        watcher = None if once else BacklogWatcher(self.cfg.kafka_bootstrap, self.cfg.topic, lambda: self.positions,
                                                   lambda: len(self.pending), self.redis).start()
        try:
            while not self.stop.is_set():
                self.follow_log(consumer)
                self.consume(consumer)
                caught_up = self._lag(consumer) == 0
                if self.reward_step_due(flush=once and caught_up):
                    self.train_reward_model()  # checkpointed within `idle_checkpoint_s`, below
                if self.round_due():
                    self.policy_round()
                    self.checkpoint(consumer)
                elif not once and caught_up and not self.gate_warmed:
                    self.warm_gate(consumer)
                elif not once and caught_up and self.idle_reward_step_due():
                    self.train_reward_model_on_replay()
                if triggers.checkpoint_due(self.dirty, self.clock() - self.last_checkpoint,
                                           self.cfg.idle_checkpoint_s):
                    self.checkpoint(consumer)
                if self.lockstep.idle_for() > TICK_S:
                    self.lockstep.send(TICK)
                _show(bar, self.state)
                if once and caught_up and not self.pending and consumer.consumer.assignment():
                    if self.dirty:
                        self.checkpoint(consumer)
                    break
        finally:
            if watcher is not None:
                watcher.stop()
            if bar is not None:
                bar.close()
            consumer.close()
        return self.state

    def one_round(self) -> RoundResult | None:
        """`duet train --round`: one policy round now (every rank takes its share; None on the others)."""
        if not self.world.main:
            self.follow_rank0()
            return None
        with self.leading():
            return self.policy_round()

    @contextmanager
    def leading(self):
        """Rank 0, around what it trains: the other ranks start from its state (what it resumed from) and take
        their share of each step until the block ends. Nothing to do for one process."""
        self.lockstep.send(SYNC, self._weights)
        yield  # an exception ends rank 0 with the others in a collective: torchrun stops them (and restarts)
        self.lockstep.send(STOP)

    # --- ranks other than 0 ---------------------------------------------------------------------------
    def follow_rank0(self) -> None:
        """Rank > 0: take rank 0's state, then train this rank's share of each of its steps until it stops."""
        handlers = {SYNC: self._load_weights, RM_STEP: lambda order: self.reward.train_on(*order),
                    TICK: lambda _: None}
        if self.rounds is not None:
            handlers[UPDATE] = lambda order: self.rounds.update_from_order(order,
                                                                           reward_model_fn(self.reward.model))
            handlers[STATE] = lambda state: self.rounds.pt.load_state_dict(state)
        self.lockstep.serve(handlers)

    def _weights(self) -> dict:
        return {"reward": self.reward.model.state_dict(), "reward_optimizer": self.reward.optimizer.state_dict(),
                "reward_steps": self.reward.steps,
                "policy": self.rounds.state_dict() if self.rounds is not None else None}

    def _load_weights(self, weights: dict) -> None:
        self.reward.model.load_state_dict(weights["reward"])
        self.reward.optimizer.load_state_dict(weights["reward_optimizer"])
        self.reward.steps = weights["reward_steps"]
        if self.rounds is not None and weights["policy"] is not None:
            self.rounds.load_state_dict(weights["policy"])

    # --- consume ------------------------------------------------------------------------------------
    def follow_log(self, consumer: FeedbackConsumer) -> None:
        """Once a second: if the relay found the broker's log lost, read the new one from the start."""
        if self.unconfirmed is None or time.monotonic() - self.epoch_checked < 1.0:
            return
        self.epoch_checked = time.monotonic()
        try:
            epoch = self.unconfirmed.epoch()
        except Exception as e:  # Redis away: the broker's own offsets still guide us
            log.warning("cannot read the feedback log epoch: %s: %s", type(e).__name__, e)
            return
        if epoch != self.state.log_epoch:
            log.warning("the feedback log was lost and begun anew (epoch %d → %d): reading it from the start",
                        self.state.log_epoch, epoch)
            consumer.read_from_start()
            self.state.log_epoch = epoch
            self.dirty = True

    def consume(self, consumer: FeedbackConsumer) -> None:
        for d in consumer.poll(timeout_ms=500):
            self.classify(d.event)
        if consumer.delivered_ids:  # duplicates too: the relay waits for a checkpoint to confirm them
            self.dirty = True

    def _gate_prompt(self, group: PromptGroup) -> bool:
        """A vote on one of the gate's prompts is held out: what the gate judges on is never trained on."""
        return any(m.role == "user" and m.content.strip() in self.gate_texts for m in group.messages)

    def classify(self, event) -> None:
        label = "edit" if event.kind == "edit" else event.choice or event.rating or "ranking"
        metrics.VOTES_BY_CHOICE.labels(choice=label).inc()
        self.state.counts[label] = self.state.counts.get(label, 0) + 1
        self.dirty = True
        group = to_prompt_group(event)
        if self.screened_out(event, group):
            return
        if is_held_out(prompt_key(group.messages), self.cfg.held_out_pct) or self._gate_prompt(group):
            self.held_out.append(group)
            self.state.events_held_out += 1
            metrics.EVENTS.labels(outcome="held_out").inc()
        else:
            if not self.pending:
                self.pending_since = self.clock()
            self.pending.append(group)
            voted = event.voted_at.timestamp()
            if self.state.oldest_unrounded_vote is None or voted < self.state.oldest_unrounded_vote:
                self.state.oldest_unrounded_vote = voted

    def screened_out(self, event, group: PromptGroup) -> bool:
        """Score the vote's agreement with the reward model (trainer/voters.py) for its key and its user; True if
        either is quarantined (then it is counted, not trained on)."""
        screen, voters = self.state.screen, voters_of(event)
        if not any(screen.is_quarantined(v) for v in voters):
            score = self.reward.agreement(group) if self.state.step > 0 else None  # an untrained model: no evidence
            for voter in voters if score is not None else []:
                if screen.record(voter, score):
                    log.warning("voter %s quarantined: agreement %.2f over %d votes, below chance with confidence",
                                voter, screen.voters[voter].agreement / screen.voters[voter].votes,
                                screen.voters[voter].votes)
                    metrics.QUARANTINED_VOTERS.inc()
            if not any(screen.is_quarantined(v) for v in voters):
                return False
        for voter in voters:
            if screen.is_quarantined(voter):
                screen.voters[voter].quarantined_votes += 1
        self.state.events_quarantined += 1
        metrics.EVENTS.labels(outcome="quarantined").inc()
        return True

    # --- the reward model ---------------------------------------------------------------------------
    def reward_step_due(self, flush: bool = False) -> bool:
        return triggers.reward_step_due(len(self.pending), self.cfg.rm_step_groups,
                                        self.clock() - self.pending_since, self.cfg.rm_max_wait_s, flush)

    def train_reward_model(self) -> None:
        """One step on the oldest `step_groups` pending votes (plus replayed ones)."""
        chunk, self.pending = self.pending[:self.cfg.rm_step_groups], self.pending[self.cfg.rm_step_groups:]
        self.pending_since = self.clock()
        t0 = time.perf_counter()
        out = self.reward_step(chunk)
        metrics.STEP_TIME.observe(time.perf_counter() - t0)
        metrics.RM_STEPS.inc()
        metrics.RM_LOSS.set(out["loss"])
        metrics.EVENTS.labels(outcome="trained").inc(len(chunk))
        self.state.events_trained += len(chunk)
        self.state.votes_since_round += len(chunk)
        self.state.last_loss = out["loss"]
        self._after_reward_step(out)

    def reward_step(self, new: list[PromptGroup], replay: int | None = None) -> dict:
        """`RewardTrainer.step`, with every rank taking its share of the batch rank 0 draws."""
        batch = self.reward.draw(new, replay)
        self.lockstep.send(RM_STEP, lambda: (batch, len(new)))
        return self.reward.train_on(batch, len(new))

    def idle_reward_step_due(self) -> bool:
        return triggers.idle_reward_step_due(len(self.pending), len(self.reward.replay.items), self.state.idle_rm_steps,
                                             self.cfg.rm_idle_steps_per_vote, self.state.events_trained)

    def train_reward_model_on_replay(self) -> None:
        """A replay-only step (the trainer is otherwise idle): as many groups as a step of new votes has in all."""
        out = self.reward_step([], replay=int(self.cfg.rm_step_groups * (1 + self.reward.cfg.replay_ratio)))
        metrics.RM_STEPS.inc()
        self.state.idle_rm_steps += 1
        self._after_reward_step(out)

    def _after_reward_step(self, out: dict) -> None:
        self.state.step = self.reward.steps
        self.dirty = True
        self._maybe_evaluate(out)
        if self.redis is not None:
            loop_status.record(self.redis, loop_status.REWARD_MODEL, loop_status.RewardModelStatus(
                step=self.state.step, votes_trained=self.state.events_trained,
                votes_held_out=self.state.events_held_out, held_out_accuracy=self.state.held_out_accuracy,
                loss=self.state.last_loss, consumer_lag=self.last_lag,
                votes_quarantined=self.state.events_quarantined,
                voters_quarantined=self.state.screen.summary()["quarantined_voters"]))

    def _maybe_evaluate(self, out: dict) -> None:
        # show an accuracy as soon as there is one (cheap while the held-out set is small)
        first = self.state.held_out_accuracy is None and len(self.held_out) <= 64
        if (first or self.state.step % self.cfg.eval_every == 0) and self.held_out:
            acc = self.reward.accuracy(self.held_out[-500:])
            if acc is not None:
                self.state.held_out_accuracy = acc
                metrics.RM_ACCURACY.set(acc)
        log.info("step %d: loss %.4f (%d new, %d replayed, %d pending), held-out accuracy %s", self.state.step,
                 out["loss"], out["new"], out["replayed"], len(self.pending), self.state.held_out_accuracy)

    # --- the policy ---------------------------------------------------------------------------------
    def round_due(self) -> bool:
        """trainer/triggers.py `round_due`, for this service's counts and clock (never without policy rounds)."""
        return self.rounds is not None and triggers.round_due(
            self.state.votes_since_round, len(self.pending), self.cfg.policy_every_votes,
            self.clock() - self.state.last_round_at, self.cfg.policy_every_s)

    def _canary(self) -> tuple[str | None, str | None]:
        """Under users' judgement: (the version this round continues from — the candidate users are judging, or
        their incumbent —, the incumbent: what the candidate is gated against; None = the base model)."""
        current, history = read_canary(self.redis)
        incumbent = users_incumbent(current, history)
        testing = current is not None and current.status in ("running", "paused")
        return (current.candidate if testing else incumbent), incumbent

    def may_publish(self) -> bool:
        """Under users' judgement a new candidate supersedes the running test: only once that test has had
        `canary_supersede_after` cross-version votes (a clear candidate is decided by then; a close one must not
        hold the loop). Read when the round's update is done, not when it starts."""
        if self.cfg.canary != "users":
            return True
        try:
            current, _ = read_canary(self.redis)
        except Exception as e:  # Redis away: cannot tell, so train now and publish later
            log.warning("cannot read the canary test: %s: %s", type(e).__name__, e)
            return False
        return (current is None or current.status not in ("running", "paused")
                or current.votes >= self.cfg.canary_supersede_after)

    def policy_round(self) -> RoundResult | None:
        """Improve the policy with the current reward model on recent user prompts; gate; publish."""
        trained = list(self.reward.replay.items)
        if not trained:
            log.info("policy round skipped: needs trained comparisons")
            return None
        fresh = self.state.votes_since_round
        prompt_groups = replay_draw(_distinct_prompts(trained), self.cfg.policy_prompts, self.rng, fresh)
        prompts = [g.messages for g in prompt_groups]
        pairs = replay_draw([g for g in trained if g.pairs], self.cfg.rounds.policy.pairs_per_round, self.rng, fresh)
        signals = replay_draw([g for g in trained if g.labelled or g.demonstrations], self.cfg.policy_signals,
                              self.rng, fresh)
        eval_prompts = self.gate_prompts()
        log.info("policy round: %d prompts, %d users' pairs, %d signals; gate on %d gate prompts", len(prompts),
                 len(pairs), len(signals), len(eval_prompts))
        t0 = time.time()
        try:
            live = "latest"
            if self.cfg.canary == "users":
                start_from, live = self._canary()
                self.rounds.follow(start_from)
            result = self.rounds.run(prompts, eval_prompts, reward_model_fn(self.reward.model),
                                     pairs=pairs, judge_votes=trained + self.held_out,
                                     kafka_offsets=self.state.offsets, oldest_vote_ts=self.state.oldest_unrounded_vote,
                                     signals=signals, live_name=live, sampling=served_sampling(prompt_groups),
                                     may_publish=self.may_publish)
        except LockstepBroken:  # the ranks are in different collectives now: torchrun restarts the group from
            metrics.POLICY_ROUNDS.labels(result="failed").inc()  # the last checkpoint; the votes are drawn again
            log.exception("policy round failed with the ranks out of step")
            raise
        except Exception:
            metrics.POLICY_ROUNDS.labels(result="failed").inc()
            log.exception("policy round failed")
            result = None
        log.info("policy round took %.0f s", time.time() - t0)
        if result is not None:  # one machine-readable line per round (bench/round_under_load.py reads them)
            log.info("round metrics: %s", json.dumps({
                "started": t0, "seconds": round(time.time() - t0, 1), "published": result.published is not None,
                "reasons": result.gate.reasons, **{k: v for k, v in result.train_metrics.items()
                                                   if isinstance(v, (int, float, str))}}))
        self.state.rounds += 1
        self.state.votes_since_round = 0
        self.state.oldest_unrounded_vote = None
        self.state.last_round_at = self.clock()
        self.dirty = True
        self._report_round(result)
        return result

    def gate_prompts(self) -> list[list[ChatMessage]]:
        return [[ChatMessage(role="user", content=p)] for p in self.cfg.rounds.gate_prompts[:self.cfg.rounds.gate.prompts]]

    def warm_gate(self, consumer: FeedbackConsumer) -> None:
        """Once, the first time the trainer is idle: the base model's side of every gate and the live version's
        answers (`PolicyRounds.warm`), so the first round — the one users wait for — does not spend its time on
        them. Votes arriving meanwhile wait in the log; a stop asked meanwhile is heeded between its parts (each
        model's answers are one piece of a minute or two)."""
        self.gate_warmed = True
        if self.dirty:  # what was consumed is safe before a minute or two of sampling
            self.checkpoint(consumer)
        t0 = time.time()
        try:
            live = self._warm_live()
            if self.rounds.warm(self.gate_prompts(), stop=self.stop.is_set, live_name=live):
                log.info("gate warmed while idle: base's and the live version's gate answers, base's release-check "
                         "values (%.0f s)", time.time() - t0)
        except Exception:  # the first round computes them itself
            log.exception("warming the gate failed")

    def _warm_live(self) -> str | None:
        """The version the next round's gate compares with, for the warm-up: users' incumbent under canary tests
        (None, base alone, if Redis cannot say), else the registry's latest."""
        if self.cfg.canary != "users":
            return "latest"
        try:
            return self._canary()[1]
        except Exception as e:
            log.warning("cannot read users' incumbent to warm its gate answers: %s: %s", type(e).__name__, e)
            return None

    def _report_round(self, result: RoundResult | None) -> None:
        if self.redis is None:
            return
        if result is None:
            loop_status.record(self.redis, loop_status.ROUNDS, loop_status.RoundStatus(result="failed"))
            return
        m, g = result.published, result.gate.metrics
        parent = (version_name(m.parent_version) if m.parent_version else BASE_VERSION) if m else None
        loop_status.record(self.redis, loop_status.ROUNDS, loop_status.RoundStatus(
            result="published" if m else "held" if result.held else "rejected", version=m.name if m else None, parent_version=parent,
            reward_mean=result.train_metrics.get("reward_mean"), kl=g.get("kl"), win_rate=g.get("win_rate"),
            reasons=result.gate.reasons))
        if m and g.get("wins") is not None:
            loop_status.record(self.redis, loop_status.BATTLES, loop_status.Battle(
                model_a=m.name, model_b=parent, wins=int(g["wins"]), ties=int(g["ties"]), losses=int(g["losses"]),
                judge="gate_judges"))

    # --- checkpoint ---------------------------------------------------------------------------------
    def checkpoint(self, consumer: FeedbackConsumer) -> None:
        covered = consumer.take_delivered()  # read before the positions: all of them are in this checkpoint
        self.state.offsets = {**self.state.offsets, **consumer.positions()}
        self.state.seen_ids = self.seen.to_list()
        snap = Snapshot(self.state, list(self.reward.replay.items), self.held_out, self.pending,
                        self.rounds.state_dict() if self.rounds is not None else None)
        # write only what changed since the newest checkpoint: the reward model after its steps, the policy after
        # a round (or a switch to users' incumbent)
        marks = {"reward_model": self.reward.steps,
                 "policy": (self.rounds.version, self.rounds.pt.updates) if self.rounds is not None else None}
        unchanged = frozenset(k for k, v in marks.items() if self.saved_marks.get(k, object()) == v)
        checkpoint.save(self.cfg.checkpoint_dir, snap, self.reward.model, self.reward.optimizer,
                        keep=self.cfg.keep_checkpoints, unchanged=unchanged)
        self.saved_marks = marks
        consumer.start_offsets = dict(self.state.offsets)
        self.confirm(covered)
        try:
            consumer.commit(self.state.offsets)
        except Exception as e:  # the checkpoint is what counts
            log.warning("offset commit failed (lag metrics only): %s: %s", type(e).__name__, e)
        self.dirty = False
        self.last_checkpoint = self.clock()
        metrics.CHECKPOINT_TIME.set(self.last_checkpoint)

    def confirm(self, covered: list[str]) -> None:
        """Tell the relay a checkpoint covers these votes: it need not keep them for a lost log any more."""
        if self.unconfirmed is None:
            return
        self.to_confirm += covered
        try:
            self.unconfirmed.confirm_trained(self.to_confirm)
            self.to_confirm = []
        except Exception as e:  # Redis away: confirm them with the next checkpoint
            log.warning("cannot confirm %d votes to the relay: %s: %s", len(self.to_confirm), type(e).__name__, e)

    def _lag(self, consumer: FeedbackConsumer) -> int | None:
        """Events not yet consumed; None until this consumer holds every partition of the topic
        (a new broker may create the topic with more partitions than the last one had)."""
        assigned = list(consumer.consumer.assignment())
        if not assigned:
            return None
        try:
            ends = consumer.consumer.end_offsets(assigned)
            positions = {tp.partition: consumer.consumer.position(tp) for tp in assigned}
            backlog = backlog_of({tp.partition: ends[tp] for tp in assigned}, positions, len(self.pending))
        except Exception as e:  # a broker restarting answers for some partitions only (kafka-python: KeyError)
            log.warning("cannot read the feedback topic's end offsets: %s: %s", type(e).__name__, e)
            return None
        self.positions = positions  # what the backlog watcher subtracts from the ends while this loop is busy
        lag = backlog.consumer_lag
        metrics.LAG.set(lag)
        metrics.UNTRAINED.set(backlog.votes_untrained)
        self.last_lag = lag
        if len(assigned) < len(consumer.consumer.partitions_for_topic(self.cfg.topic) or ()):
            return None
        return lag


def replay_draw(items: list[PromptGroup], n: int, rng: random.Random, fresh: int = 0) -> list[PromptGroup]:
    """n of `items` (oldest first), biased to recent ones: the newest max(fresh, n/2) — `fresh`: the votes since
    the last round, each drawn at least once while they fit in n — then the rest uniformly from the older ones, so
    older votes keep being replayed. When more than n came in since the last round the draw is the newest n."""
    newest = min(n, max(fresh, n // 2), len(items))
    older = items[:len(items) - newest]
    return items[len(items) - newest:] + rng.sample(older, min(n - newest, len(older)))


def _distinct_prompts(groups: list[PromptGroup]) -> list[PromptGroup]:
    """One group per distinct conversation, its newest, in the order of their newest vote."""
    last: dict[str, PromptGroup] = {}
    for g in groups:
        key = prompt_key(g.messages)
        last.pop(key, None)
        last[key] = g
    return list(last.values())


def served_sampling(groups: list[PromptGroup]) -> tuple[int, float] | None:
    """(max_tokens, temperature) users were served these prompts' answers with — the most common of each; RLOO
    samples the same way, so the policy is trained on the answers users see. None when no group says."""
    tokens = [g.max_tokens for g in groups if g.max_tokens]
    temps = [g.temperature for g in groups if g.temperature]
    if not tokens or not temps:
        return None
    return Counter(tokens).most_common(1)[0][0], statistics.median_low(temps)


def _redis_client(url: str):
    if not url:
        return None
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def _progress(state: TrainerState):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(desc="votes consumed", unit="vote", initial=state.events_trained + state.events_held_out)


def _show(bar, state: TrainerState) -> None:
    if bar is None:
        return
    bar.n = state.events_trained + state.events_held_out
    bar.set_postfix(loss=state.last_loss, acc=state.held_out_accuracy, rounds=state.rounds, refresh=False)
    bar.refresh()
