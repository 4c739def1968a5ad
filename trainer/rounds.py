"""One policy round: update the live policy (RLOO with the reward model, or DPO on vote pairs),
gate the candidate, publish it to the registry and announce it on the `weights` topic."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from feedback.comparisons import ChatMessage
from feedback.events import WeightsAnnouncement
from feedback.topics import WEIGHTS
from trainer import metrics
from trainer.examples import PromptGroup
from trainer.gate import GateConfig, GateResult, evaluate
from trainer.policy import PolicyConfig, PolicyTrainer, RewardFn, load_causal_lm
from feedback.registry import Manifest, Registry, manifest_checksum

log = logging.getLogger(__name__)


@dataclass
class RoundConfig:
    base_model: str  # the reference policy (HF folder)
    registry_root: Path
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    keep_versions: int = 5
    bootstrap: str = ""  # Kafka, for the announcement ("" = don't announce)


@dataclass
class RoundResult:
    published: Manifest | None
    gate: GateResult
    train_metrics: dict


def reward_model_fn(rm) -> RewardFn:
    def score(messages: list[ChatMessage], answers: list[str]) -> torch.Tensor:
        rm.eval()
        with torch.no_grad():
            return rm.score(messages, answers).float().cpu()
    return score


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


def run_round(cfg: RoundConfig, prompts: list[list[ChatMessage]], eval_prompts: list[list[ChatMessage]],
              reward_fn: RewardFn, pairs: list[PromptGroup] = (), kafka_offsets: dict[int, int] | None = None,
              oldest_vote_ts: float | None = None) -> RoundResult:
    registry = Registry(cfg.registry_root, keep=cfg.keep_versions)
    live = registry.latest()
    live_path = str(registry.path(live)) if live else cfg.base_model
    pt = PolicyTrainer(cfg.policy, live_path, cfg.base_model)
    if cfg.policy.algorithm == "dpo":
        train_metrics = pt.dpo_round(list(pairs))
    else:
        train_metrics = pt.rloo_round(prompts, reward_fn)
        metrics.POLICY_REWARD_MEAN.set(train_metrics["reward_mean"])
        metrics.POLICY_REWARD_STD.set(train_metrics["reward_std"])
    # before the first publication the live model is the reference itself: don't load it twice
    live_model = pt.ref if live is None else load_causal_lm(live_path, pt.device, trainable=False)
    result = evaluate(pt, live_model, eval_prompts, reward_fn, cfg.gate)
    metrics.POLICY_KL.set(result.metrics.get("kl") or 0.0)
    if result.metrics.get("win_rate") is not None:
        metrics.GATE_WIN_RATE.set(result.metrics["win_rate"])
    if not result.passed:
        for reason in result.reasons:
            metrics.GATE_REJECTIONS.labels(reason=reason).inc()
        metrics.POLICY_ROUNDS.labels(result="rejected").inc()
        metrics.GATE_REJECTED_IN_A_ROW.inc()
        log.warning("gate refused the candidate: %s %s", result.reasons, result.metrics)
        return RoundResult(None, result, train_metrics)
    manifest, folder = registry.publish(
        pt.save, base_model=cfg.base_model, algorithm=cfg.policy.algorithm,
        hyperparameters={k: v for k, v in asdict(cfg.policy).items()},
        train_metrics=train_metrics, eval={**result.metrics, "passed": True}, kafka_offsets=kafka_offsets or {})
    metrics.POLICY_ROUNDS.labels(result="published").inc()
    metrics.GATE_REJECTED_IN_A_ROW.set(0)
    metrics.PUBLISHED_VERSION.set(manifest.version)
    if oldest_vote_ts:
        metrics.VOTE_TO_PUBLISH.observe(time.time() - oldest_vote_ts)
    if cfg.bootstrap:
        announce(cfg.bootstrap, manifest, folder)
    log.info("published %s (win rate %.2f, KL %.2f)", manifest.name, result.metrics["win_rate"], result.metrics["kl"])
    return RoundResult(manifest, result, train_metrics)
