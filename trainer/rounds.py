"""Policy rounds: the trainer's policy (kept across rounds) is updated with the reward model (RLOO) and on users'
own vote pairs (DPO), then on users' direct signals (KTO on thumbs and both-bad, SFT on edits), exported as bf16 full weights, gated on that export, published to the registry and announced
on the `weights` topic. A refused candidate is dropped and the policy continues from the live state.

    update → export → gate (exported weights vs live, judged by models it never trained against) →
    publish → announce
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from feedback.contract.comparisons import ChatMessage
from feedback.contract.events import WeightsAnnouncement
from feedback.contract.registry import BASE_VERSION, Manifest, Registry, manifest_checksum
from feedback.contract.topics import WEIGHTS
from trainer import metrics
from trainer.distributed import SINGLE, Lockstep, LockstepBroken
from trainer.examples import PromptGroup, prompt_key
from trainer.orders import STATE, UPDATE
from trainer.gate import GateConfig, GateResult, evaluate, gate_answers
from trainer.judge import JudgeEnsemble, SentenceEncoder
from trainer.probe import probe_logprobs
from trainer.release_checks import ReleaseCheck, ReleaseChecker
from trainer.policy import PolicyConfig, PolicyTrainer, RewardFn, Rollouts, changed_fraction, load_causal_lm
from trainer.rollouts import ServingRollouts

log = logging.getLogger(__name__)

POLICY_STATE = "policy_state.pt"  # in each published version's folder: adapters + optimizer it was exported from


@dataclass
class RoundConfig:
    """Bound from the settings by duet/wiring.py (`round_config`)."""
    base_model: str  # the reference policy (HF folder)
    registry_root: Path
    policy: PolicyConfig
    gate: GateConfig
    keep_versions: int
    bootstrap: str  # Kafka, for the announcement ("" = don't announce)
    rollout_url: str  # serving's base URL: its live engine samples for RLOO ("" = HF generate here)
    rollout_key: str  # the admin key it takes
    release_checks: list[ReleaseCheck]  # every candidate must pass them all
    # the gate's prompts, never trained on (the service holds votes on them out)
    gate_prompts: list[str]
    judge_encoder: str = ""  # HF folder of the gate judges' frozen encoder; "" = all-MiniLM-L6-v2 (not a setting)


@dataclass
class RoundResult:
    published: Manifest | None
    gate: GateResult
    train_metrics: dict
    trained_events: list[str] = field(default_factory=list)  # votes whose pairs, labels or edits it trained on
    held: bool = False  # trained but neither gated nor published: users are still judging the last candidate


def reward_model_fn(rm) -> RewardFn:
    def score(messages: list[ChatMessage], answers: list[str]) -> torch.Tensor:
        rm.eval()
        with torch.no_grad():
            return rm.score(messages, answers).float().cpu()
    return score


class _StateShare:
    """Sends the policy state a round leaves to the other ranks (once); a failure to send is LockstepBroken."""

    def __init__(self, lockstep: Lockstep, pt: PolicyTrainer) -> None:
        self.lockstep, self.pt, self.sent = lockstep, pt, False

    def __call__(self, state: dict | None = None) -> None:
        """`state`: the policy state already built (on publish), else built here when there are ranks to tell."""
        self.sent = True
        try:
            self.lockstep.send(STATE, (lambda: state) if state is not None else self.pt.state_dict)
        except Exception as e:
            raise LockstepBroken("could not send the round's policy state to the other ranks") from e


@dataclass
class PolicyUpdate:
    """What the other ranks need to take their share of a round's update: the state it starts from (rank 0 may
    have moved to users' incumbent), the sampling rng's state, and what the update trains on."""
    state: dict
    rng: tuple
    prompts: list[list[ChatMessage]]
    pairs: list[PromptGroup]
    signals: list[PromptGroup]
    temperature: float
    max_tokens: int


def announce(bootstrap: str, manifest: Manifest, folder: Path) -> WeightsAnnouncement:
    from kafka import KafkaProducer

    event = WeightsAnnouncement(version=manifest.version, name=manifest.name,
                                manifest_location=str((folder / "manifest.json").resolve()),
                                manifest_sha256=manifest_checksum(folder), parent_version=manifest.parent_version)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, retries=10)
    try:
        producer.send(WEIGHTS, key=manifest.name.encode(), value=event.model_dump_json().encode()).get(timeout=30)
    finally:
        producer.close()
    return event


class PolicyRounds:
    """Owns the policy state (fp32 adapters + optimizer) and the gate's judges."""

    def __init__(self, cfg: RoundConfig, lockstep: Lockstep | None = None) -> None:
        from trainer.reward_model import minilm_path

        self.cfg = cfg
        # under torchrun: rank 0 runs rounds, the others take their share (`update_from_order`); the lockstep is the
        # trainer's own, so its orders and the round's share one sequence
        self.lockstep = lockstep or Lockstep(SINGLE)
        self.world = self.lockstep.world
        self.registry = Registry(cfg.registry_root, keep=cfg.keep_versions)
        self.pt = PolicyTrainer(cfg.policy, cfg.base_model, self.world)
        self.version = BASE_VERSION  # the version this policy state was published as (or the base model)
        self.judges = JudgeEnsemble(SentenceEncoder(cfg.judge_encoder or minilm_path()), seed=cfg.policy.seed)
        self.serving = ServingRollouts(cfg.rollout_url, cfg.rollout_key) if cfg.rollout_url else None
        self.checker = ReleaseChecker(cfg.release_checks) if cfg.release_checks else None
        # gate answers by version ("base" too), on the prompts they were drawn for: a version answers the gate
        # prompts once, as a candidate, and its answers are reused while it is live (paired by the gate's seed)
        self.gate_cache: dict[str, tuple[tuple, list]] = {}  # name -> (`_prompts_key`, answers)

    def state_dict(self) -> dict:
        return {**self.pt.state_dict(), "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.pt.load_state_dict(state)
        self.version = state.get("version", BASE_VERSION)

    def follow(self, live: str | None) -> None:
        """Continue from `live` (users' incumbent; None: the base model) if this state is another version's
        — a candidate users rejected: its policy state (kept beside its weights) is left behind."""
        target = live or BASE_VERSION
        if target == self.version:
            return
        if target == BASE_VERSION:
            cache = self.pt.ref_cache  # the reference (base) model's log-probs: the same whoever is followed
            self.pt = PolicyTrainer(self.cfg.policy, self.cfg.base_model, self.world)
            self.pt.ref_cache = cache
        else:
            m = self.registry.show(target)
            path = self.registry.path(m) / POLICY_STATE if m else None
            if path is None or not path.exists():
                log.warning("no policy state for %s: continuing from %s's", target, self.version)
                return
            self.pt.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        log.info("policy: continuing from %s (users' incumbent), leaving %s", target, self.version)
        self.version = target

    def run(self, prompts: list[list[ChatMessage]], eval_prompts: list[list[ChatMessage]], reward_fn: RewardFn,
            pairs: list[PromptGroup], judge_votes: list[PromptGroup], kafka_offsets: dict[int, int] | None = None,
            oldest_vote_ts: float | None = None, signals: list[PromptGroup] = (),
            live_name: str | None = "latest", sampling: tuple[int, float] | None = None,
            may_publish: Callable[[], bool] | None = None) -> RoundResult:
        """`pairs`: users' votes whose ordered pairs the policy learns from directly (DPO); `signals`: thumbs,
        both-bad and edits (KTO, SFT). `live_name`: the version serving answers with, which the candidate is
        judged against and trained from — the registry's latest by default; users' incumbent under canary tests
        (None: the base). `sampling`: (max_tokens, temperature) users are served with; RLOO samples the same.
        `may_publish`, asked once the update is done: if False the round is held — its update is kept (the next
        round goes on from it), nothing is gated or published."""
        cfg = self.cfg
        before = copy.deepcopy(self.pt.state_dict())
        live = self._live(live_name)
        live_path = self.registry.path(live) if live else Path(cfg.base_model)
        max_tokens, temperature = sampling or (cfg.policy.max_new_tokens, cfg.policy.temperature)
        max_tokens = min(max_tokens, cfg.policy.max_rollout_tokens)
        trained_events = [g.event_id for g in [*pairs, *signals]]
        # Several ranks: they all take part in the update (its collectives in the same order on every rank); then
        # rank 0 alone gates, and sends the state the round leaves before anything leaves this process. A failure
        # inside the update leaves the ranks in different collectives: LockstepBroken, torchrun restarts the group.
        self.lockstep.send(UPDATE, lambda: PolicyUpdate(self.pt.state_dict(), self.pt.rng.getstate(), prompts,
                                                        list(pairs), list(signals), temperature, max_tokens))
        try:
            train_metrics = self.update(prompts, reward_fn, pairs, self._rollouts(temperature, max_tokens),
                                        list(signals), temperature, max_tokens)
        except Exception as e:
            if self.world.size > 1:
                raise LockstepBroken("the round's update failed on rank 0") from e
            raise
        share = _StateShare(self.lockstep, self.pt)
        try:
            if may_publish is not None and not may_publish():
                share()
                metrics.POLICY_ROUNDS.labels(result="held").inc()
                log.info("round held: users are still judging the last candidate; its update is kept for the next "
                         "round")
                return RoundResult(None, GateResult(passed=False, reasons=["held"]), train_metrics, trained_events,
                                   held=True)
            with tempfile.TemporaryDirectory(prefix="duet-candidate-") as tmp:
                t = time.perf_counter()
                exported = self.pt.export(Path(tmp))
                train_metrics["export_s"] = round(time.perf_counter() - t, 2)
                parent = load_file(str(live_path / "model.safetensors"))
                train_metrics["changed_fraction"] = changed_fraction(exported, parent, self.pt.trained_weights())
                del exported, parent
                t = time.perf_counter()
                self.judges.fit(judge_votes)
                live_key = live.name if live else BASE_VERSION
                result = evaluate(self.pt, Path(tmp), live_path, eval_prompts, self.judges, cfg.gate,
                                  live_answers=self._gate_answers(live_key, live_path, eval_prompts),
                                  base_answers=self._gate_answers(BASE_VERSION, None, eval_prompts),
                                  checker=self.checker)
                train_metrics["gate_s"] = round(time.perf_counter() - t, 2)
                if train_metrics["changed_fraction"] == 0.0:  # every update rounded away in bf16
                    result.passed, result.reasons = False, result.reasons + ["unchanged"]
                self._record_gate(result)
                if not result.passed:
                    self.pt.load_state_dict(before)  # continue from the live version's state
                    share()
                    log.warning("gate refused the candidate: %s %s", result.reasons, result.metrics)
                    return RoundResult(None, result, train_metrics, trained_events)
                state = self.pt.state_dict()
                share(state)

                def write(dst: Path) -> None:
                    _copy_files(Path(tmp), dst)
                    # to continue from this version if it becomes the incumbent
                    torch.save(state, dst / POLICY_STATE)

                manifest, folder = self.registry.publish(
                    write, base_model=cfg.base_model, parent=live,
                    algorithm=cfg.policy.algorithm, hyperparameters=asdict(cfg.policy), train_metrics=train_metrics,
                    eval={**result.metrics, "passed": True}, kafka_offsets=kafka_offsets or {},
                    release_checks=[c.model_dump() for c in result.checks],
                    probe=probe_logprobs(self.pt, Path(tmp)))
            self.version = manifest.name
            key = _prompts_key(eval_prompts, cfg.gate, cfg.policy.max_new_tokens)
            self.gate_cache = {k: v for k, v in self.gate_cache.items() if k in (BASE_VERSION, live_key)}
            self.gate_cache[manifest.name] = (key, result.answers)
            metrics.PUBLISHED_VERSION.set(manifest.version)
            if oldest_vote_ts:
                metrics.VOTE_TO_PUBLISH.observe(time.time() - oldest_vote_ts)
            if cfg.bootstrap:
                announce(cfg.bootstrap, manifest, folder)
            log.info("published %s (judged win rate %.2f [%.2f, %.2f], KL %.2f, %.1f %% of weights changed)",
                     manifest.name, result.metrics["win_rate"], result.metrics["win_rate_low"],
                     result.metrics["win_rate_high"], result.metrics["kl"], 100 * train_metrics["changed_fraction"])
            return RoundResult(manifest, result, train_metrics, trained_events)
        finally:  # a failure in the gate (rank 0's alone): the others still wait for the state to go on from
            if not share.sent:
                share()

    def update_from_order(self, order: PolicyUpdate, reward_fn: RewardFn) -> None:
        """A rank other than 0: its share of rank 0's update (the same state, prompts, pairs and signals)."""
        self.pt.load_state_dict(order.state)
        self.pt.rng.setstate(order.rng)
        self.update(order.prompts, reward_fn, order.pairs, None, order.signals, order.temperature, order.max_tokens)

    def warm(self, eval_prompts: list[list[ChatMessage]], stop: Callable[[], bool] = lambda: False,
             live_name: str | None = "latest") -> bool:
        """What the next gate needs of the models it compares against, computed ahead: the trainer calls this while
        idle before its first round (whose gate spent ~110 of its 207 s on them under `duet up`). The base model's
        answers to the gate prompts and its release-check values (they never change), then the live version's
        answers (`live_name` as in `run`: after a restart with a version live, the first round would sample them).
        True if anything was computed; `stop()` is asked between the parts (what is left is computed by the round)."""
        computed = not self._gate_cached(BASE_VERSION, eval_prompts)
        if computed:
            self._gate_answers(BASE_VERSION, None, eval_prompts)
        if self.checker is not None and not stop():
            computed = self.checker.warm(self.pt, stop) or computed
        live = self._live(live_name)
        if live is not None and not stop() and not self._gate_cached(live.name, eval_prompts):
            self._gate_answers(live.name, self.registry.path(live), eval_prompts)
            computed = True
        return computed

    def _live(self, live_name: str | None) -> Manifest | None:
        """The version `live_name` names: "latest" = the registry's newest, None = the base model."""
        return self.registry.latest() if live_name == "latest" else (
            self.registry.show(live_name) if live_name else None)

    def _gate_cached(self, name: str, prompts: list[list[ChatMessage]]) -> bool:
        key = _prompts_key(prompts, self.cfg.gate, self.cfg.policy.max_new_tokens)
        return self.gate_cache.get(name, (None,))[0] == key

    def _gate_answers(self, name: str, path: Path | None, prompts: list[list[ChatMessage]]) -> list:
        """`name`'s answers to the gate prompts at the gate's seed: cached, else drawn here (base: the reference;
        a version: loaded from `path` for as long as it takes)."""
        if self._gate_cached(name, prompts):
            return self.gate_cache[name][1]
        key = _prompts_key(prompts, self.cfg.gate, self.cfg.policy.max_new_tokens)
        if name == BASE_VERSION:
            with self.pt.reference():
                answers = gate_answers(self.pt, self.pt.model, prompts, self.cfg.gate)
        else:
            model = load_causal_lm(str(path), self.pt.device, self.pt.bf16)
            answers = gate_answers(self.pt, model, prompts, self.cfg.gate)
            del model
        self.gate_cache[name] = (key, answers)
        return answers

    def _rollouts(self, temperature: float, max_tokens: int) -> Rollouts | None:
        """Samples from serving's engine for the version this state was exported as (the live one, or under a
        canary test the candidate's engine), provided serving has it; else HF generate here."""
        if self.serving is None:
            return None
        return lambda ids, n: self.serving.sample(ids, n, max_tokens, temperature, self.version)

    def update(self, prompts: list[list[ChatMessage]], reward_fn: RewardFn, pairs: list[PromptGroup],
               rollouts: Rollouts | None, signals: list[PromptGroup] = (), temperature: float = 1.0,
               max_tokens: int | None = None) -> dict:
        """RLOO on `prompts` with the reward model (unless the algorithm is "dpo"), DPO on users' `pairs`, then KTO
        and SFT on the labelled answers and edits in `signals`."""
        out: dict = {}
        if self.cfg.policy.algorithm != "dpo":
            out = self.pt.rloo_round(prompts, reward_fn, rollouts, temperature, max_tokens)
            metrics.POLICY_REWARD_MEAN.set(out["reward_mean"])
            metrics.POLICY_REWARD_STD.set(out["reward_std"])
            metrics.POLICY_INFORMATIVE.set(out["informative_fraction"])
        if pairs:
            t = time.perf_counter()
            out.update(self.pt.pair_round(list(pairs)), dpo_s=round(time.perf_counter() - t, 2))

        if signals:
            t = time.perf_counter()
            got = self.pt.signal_round(list(signals), z_ref=max(0.0, out.get("kl", 0.0)))
            out.update(got, signal_s=round(time.perf_counter() - t, 2))
            for loss in ("kto", "sft"):
                if f"{loss}_loss" in got:
                    metrics.POLICY_SIGNAL_LOSS.labels(loss=loss).set(got[f"{loss}_loss"])
            metrics.POLICY_SIGNAL_ANSWERS.labels(kind="desirable").inc(got.get("kto_desirable", 0))
            metrics.POLICY_SIGNAL_ANSWERS.labels(kind="undesirable").inc(
                got.get("kto_answers", 0) - got.get("kto_desirable", 0))
            metrics.POLICY_SIGNAL_ANSWERS.labels(kind="edit").inc(got.get("sft_answers", 0))
        return out

    @staticmethod
    def _record_gate(result: GateResult) -> None:
        metrics.POLICY_KL.set(result.metrics.get("kl") or 0.0)
        if result.metrics.get("win_rate") is not None:
            metrics.GATE_WIN_RATE.set(result.metrics["win_rate"])
        if result.passed:
            metrics.POLICY_ROUNDS.labels(result="published").inc()
            metrics.GATE_REJECTED_IN_A_ROW.set(0)
            return
        for check in result.checks:
            if not check.passed:
                metrics.RELEASE_CHECK_FAILURES.labels(check=check.name).inc()
        for reason in result.reasons:
            if not reason.startswith("release_check:"):  # one series per check name would not be bounded
                metrics.GATE_REJECTIONS.labels(reason=reason).inc()
        if any(not c.passed for c in result.checks):
            metrics.GATE_REJECTIONS.labels(reason="release_check").inc()
        metrics.POLICY_ROUNDS.labels(result="rejected").inc()
        metrics.GATE_REJECTED_IN_A_ROW.inc()


def _prompts_key(prompts: list[list[ChatMessage]], gate: GateConfig, max_new_tokens: int) -> tuple:
    """What a version's gate answers depend on besides its weights: they pair only if all of it is equal."""
    return (tuple(map(prompt_key, prompts)), gate.seed, gate.samples_per_prompt, gate.temperature, max_new_tokens)


def _copy_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_dir():
            shutil.copytree(f, dst / f.name)
        else:
            shutil.copy2(f, dst / f.name)
