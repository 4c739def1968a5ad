"""Settings → components: the one place that binds the settings (duet/settings.py) to each component's config
and builds the app, the trainer and the relay. Used by the CLI, bench/ and tests.

Each config is bound field by field, by name, so a renamed setting or config field fails here at import or in
tests/test_wiring.py (every settings field is read by some binder or by the CLI), never silently. The configs'
own fields have no defaults where a setting exists: the default lives in Settings alone. Tests and benches that
need a config at the defaults call the binder without settings (`policy_config(k=4)`: the defaults, `k` changed).
"""

from __future__ import annotations

import dataclasses
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from duet.settings import Settings

if TYPE_CHECKING:
    from feedback.canary import CanaryConfig
    from serving.config import ChatConfig, EngineConfig, ServingConfig
    from feedback.relay import OutboxRelay
    from trainer.gate import GateConfig
    from trainer.policy import PolicyConfig
    from trainer.reward_trainer import RewardTrainerConfig
    from trainer.rounds import RoundConfig
    from trainer.service import ServiceConfig, TrainerService

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def defaults() -> Settings:
    """The settings a user gets with nothing set (no environment, no .env file)."""
    return Settings.model_construct()


def _with(cfg, override: dict[str, Any]):
    return dataclasses.replace(cfg, **override) if override else cfg


# --- the trainer ---------------------------------------------------------------------------------------------

def reward_config(s: Settings | None = None, /, *, backbone: str, **override) -> RewardTrainerConfig:
    s = s or defaults()
    from trainer.reward_trainer import RewardTrainerConfig

    return _with(RewardTrainerConfig(
        backbone=backbone, loss=s.rm_loss, lr=s.rm_lr, replay_ratio=s.rm_replay_ratio,
        replay_capacity=s.rm_replay_capacity, utility_eps=s.rm_utility_eps, max_tokens=s.rm_max_tokens,
        tie_weight=s.rm_tie_weight, precision=s.trainer_precision, seed=s.seed), override)


def policy_config(s: Settings | None = None, /, **override) -> PolicyConfig:
    s = s or defaults()
    from trainer.policy import PolicyConfig

    return _with(PolicyConfig(
        algorithm=s.policy_algorithm, beta=s.policy_beta, lr=s.policy_lr, lora_rank=s.policy_lora_rank,
        lora_alpha=s.policy_lora_alpha, k=s.policy_k, groups_per_round=s.policy_groups_per_round,
        min_spread=s.policy_min_spread, steps_per_round=s.policy_steps_per_round, clip_eps=s.policy_clip_eps,
        max_new_tokens=s.policy_max_new_tokens, max_rollout_tokens=s.policy_max_rollout_tokens,
        prompts_per_step=s.policy_prompts_per_step, pairs_per_round=s.policy_pairs_per_round,
        label_smoothing=s.policy_label_smoothing, dpo_weight=s.policy_dpo_weight, precision=s.trainer_precision,
        kto_weight=s.policy_kto_weight, sft_weight=s.policy_sft_weight, seed=s.seed), override)


def gate_config(s: Settings | None = None, /, **override) -> GateConfig:
    s = s or defaults()
    from trainer.gate import GateConfig

    return _with(GateConfig(
        min_win_rate=s.gate_min_win_rate, alpha=s.gate_alpha, prompts=s.gate_prompts,
        samples_per_prompt=s.gate_samples_per_prompt, max_kl=s.gate_max_kl,
        max_length_ratio=s.gate_max_length_ratio, seed=s.seed), override)


def release_checks(s: Settings) -> list:
    """The release checks DUET_RELEASE_CHECKS names; ReleaseChecksError (one line) for a bad file."""
    from trainer.release_checks import load_release_checks

    return load_release_checks(s.release_checks)


def gate_prompts(s: Settings) -> list[str]:
    """The gate's prompts (DUET_GATE_PROMPT_FILE, DUET_GATE_PROMPTS); GatePromptsError (one line) for a bad file."""
    from trainer.gate import load_gate_prompts

    return load_gate_prompts(s.gate_prompt_file, s.gate_prompts)


def round_config(s: Settings | None = None, /, *, base_model: str, **override) -> RoundConfig:
    s = s or defaults()
    from trainer.rounds import RoundConfig

    return _with(RoundConfig(
        base_model=base_model, registry_root=s.registry_root(), policy=policy_config(s), gate=gate_config(s),
        keep_versions=s.keep_versions, bootstrap=s.kafka_bootstrap, rollout_url=s.trainer_rollout_url,
        rollout_key=s.admin_key, release_checks=release_checks(s), gate_prompts=gate_prompts(s)), override)


def service_config(s: Settings | None = None, /, *, rounds: RoundConfig | None, **override) -> ServiceConfig:
    s = s or defaults()
    from trainer.service import ServiceConfig

    return _with(ServiceConfig(
        kafka_bootstrap=s.kafka_bootstrap, checkpoint_dir=checkpoint_dir(s), trainer_group_id=s.trainer_group_id,
        rm_step_groups=s.rm_step_groups, rm_max_wait_s=s.rm_max_wait_s, held_out_pct=s.held_out_pct,
        keep_checkpoints=s.keep_checkpoints, trainer_fresh_broker=s.trainer_fresh_broker, rounds=rounds,
        policy_every_votes=s.policy_every_votes, policy_every_s=s.policy_every_s, policy_prompts=s.policy_prompts,
        policy_signals=s.policy_signals, rm_idle_steps_per_vote=s.rm_idle_steps_per_vote, redis_url=s.redis_url,
        canary=s.canary, canary_supersede_after=s.canary_supersede_after), override)


def checkpoint_dir(s: Settings) -> Path:
    return s.home / "trainer" / "checkpoints"


def rm_backbone(s: Settings, base_model: str) -> str:
    """DUET_RM_BACKBONE: "minilm" (all-MiniLM-L6-v2), "base"/"" (the served base model), or a model folder/id."""
    from duet.model_assets import resolve_model
    from trainer.reward_model import minilm_path

    if s.rm_backbone == "minilm":
        return minilm_path()
    if s.rm_backbone in ("base", ""):
        return base_model
    return resolve_model(s.rm_backbone, s.home)


def build_trainer(s: Settings) -> TrainerService:
    """`duet train`'s service: the reward model, policy rounds and the loop, as the settings say."""
    from duet.model_assets import resolve_model
    from trainer.service import TrainerService

    from trainer.distributed import init_world
    from trainer.reward_model import pick_device

    s = resolve_canary(s)  # the trainer and serving must agree on who decides
    world = init_world(pick_device())  # one process, or this rank of several under torchrun
    base = world.broadcast(resolve_model(s.model, s.home) if world.main else None)  # may convert: rank 0 alone
    return TrainerService(service_config(s, rounds=round_config(s, base_model=base)),
                          reward_config(s, backbone=rm_backbone(s, base)), world=world)


# --- users' canary tests and the relay ---------------------------------------------------------------------

def canary_config(s: Settings | None = None, /, **override) -> CanaryConfig:
    s = s or defaults()
    from feedback.canary import CanaryConfig

    cfg = CanaryConfig(
        pair_share=s.canary_pair_share, pair_share_idle=s.canary_pair_share_idle, margin=s.canary_margin,
        alpha=s.canary_alpha, max_votes=s.canary_max_votes, max_hours=s.canary_max_hours,
        tuned_for=s.canary_tuned_for, rule=s.canary_rule)
    return cfg.model_copy(update=override) if override else cfg


def build_relay(s: Settings) -> OutboxRelay:
    """The outbox relay, the same whether it runs as `duet relay`, serving's child, or a thread in serving."""
    from feedback.relay import OutboxRelay

    return OutboxRelay(s.redis_url, s.kafka_bootstrap, batch=s.relay_batch, partitions=s.kafka_partitions,
                       replication=s.kafka_replication, min_insync=s.kafka_min_insync, keep_s=s.outbox_keep_s)


def resolve_canary(s: Settings, say=None) -> Settings:
    """DUET_CANARY=auto → "users" where the canary's second engine fits beside the first, else "off"
    (duet/two_engines.py); the settings with it resolved. `say` gets the one-line reason (default: the log)."""
    if s.canary != "auto":
        return s
    import torch

    from duet.cpus import engine_dtype
    from duet.model_assets import resolve_model
    from duet.two_engines import choose_canary, mem_total_gb, weights_gb

    on_gpu = torch.cuda.is_available()
    choice = choose_canary(s.canary, on_gpu=on_gpu, candidate=canary_candidate(s), kv_cache_gb=s.kv_cache_gb,
                           weights_gb=weights_gb(resolve_model(s.model, s.home), engine_dtype(s.dtype, on_gpu)),
                           gpu_memory_utilization=s.gpu_memory_utilization, mem_total_gb=mem_total_gb())
    what = ("users judge each new version against the live one (blind pairs)" if choice.mode == "users" else
            "off: a version goes live when the trainer's gate and release checks pass it")
    (say or log.info)(f"duet: canary    {what} — {choice.why}")
    return s.model_copy(update={"canary": choice.mode})


# --- serving ---------------------------------------------------------------------------------------------------

def canary_candidate(s: Settings) -> str:
    """DUET_CANARY_CANDIDATE resolved for this device: "adapter" on a GPU, "engine" on a CPU (settings.py says why)."""
    if s.canary_candidate != "auto":
        return s.canary_candidate
    import torch

    return "adapter" if torch.cuda.is_available() else "engine"


def engine_config(s: Settings | None = None, /, **override) -> EngineConfig:
    """How serving starts an engine; DUET_DTYPE=auto resolved for this device here (duet/cpus.py)."""
    import torch

    from duet.cpus import engine_dtype
    from serving.adapters import engine_lora_rank
    from serving.config import EngineConfig

    s = s or defaults()
    dtype = engine_dtype(s.dtype, on_gpu=torch.cuda.is_available())
    if dtype != s.dtype:
        log.info("serving in %s: this CPU has no bf16 instructions (DUET_DTYPE=auto)", dtype)
    cfg = EngineConfig(
        served_model_name=s.served_model_name, max_model_len=s.max_model_len, dtype=dtype,
        enforce_eager=s.enforce_eager, seed=s.seed, kv_cache_gb=s.kv_cache_gb,
        gpu_memory_utilization=s.gpu_memory_utilization, cache_root=s.home / "vllm-cache",
        max_lora_rank=engine_lora_rank(s.policy_lora_rank) if candidates_as_adapters(s) else 0)
    return cfg.model_copy(update=override) if override else cfg


def candidates_as_adapters(s: Settings) -> bool:
    return s.canary == "users" and canary_candidate(s) == "adapter"


def chat_config(s: Settings | None = None, /, **override) -> ChatConfig:
    from serving.config import ChatConfig

    s = s or defaults()
    cfg = ChatConfig(
        served_model_name=s.served_model_name, max_n=s.max_n, max_k=s.max_k, pair_rate=s.pair_rate,
        pair_min_temperature=s.pair_min_temperature, default_max_tokens=s.default_max_tokens,
        max_tokens_cap=s.max_tokens_cap, comparison_ttl_s=s.comparison_ttl_s)
    return cfg.model_copy(update=override) if override else cfg


def serving_config(s: Settings) -> ServingConfig:
    import socket

    from serving.config import ServingConfig

    return ServingConfig(
        engine=engine_config(s), chat=chat_config(s), redis_url=s.redis_url, redis_timeout_s=s.redis_timeout_s,
        kafka_bootstrap=s.kafka_bootstrap, outbox_max=s.outbox_max, vote_cap_per_key=s.vote_cap_per_key,
        vote_cap_per_user=s.vote_cap_per_user, vote_max_bytes=s.vote_max_bytes, max_edit_chars=s.max_edit_chars,
        max_body_bytes=s.max_body_bytes, secret=s.resolved_secret(), admin_key=s.admin_key, dev_key=s.dev_key,
        auth_disabled=s.auth_disabled, rate_limit_rpm=s.rate_limit_rpm, registry_root=s.registry_root(),
        swap_probe_timeout_s=s.swap_probe_timeout_s, swap_logprob_tolerance=s.swap_logprob_tolerance,
        replica=f"{socket.gethostname()}:{s.port}", canary=canary_config(s) if s.canary == "users" else None,
        canary_candidate=canary_candidate(s), canary_engine_nice=s.canary_engine_nice,
        canary_adapter_dir=s.home / "canary-adapters" / str(s.port))


def build_app(s: Settings):
    """The serving app (FastAPI), with its relay as DUET_RELAY says: a child process running `duet relay` with
    these very settings (Settings.to_env), a thread, or none (`off`: run `duet relay` yourself)."""
    import sys

    from duet.model_assets import resolve_model
    from duet.relay_child import RelayChild
    from serving.app import create_app

    start_relay = None
    if s.kafka_bootstrap and s.relay == "process":
        # --with-parent: even a SIGKILLed serving process takes its relay (and its metrics port) with it
        cmd = [sys.executable, "-m", "duet.cli", "relay", "--with-parent"]
        start_relay = lambda: RelayChild(cmd, s.to_env()).start()  # noqa: E731
    elif s.kafka_bootstrap and s.relay == "thread":
        start_relay = lambda: build_relay(s).start()  # noqa: E731
    return create_app(serving_config(s), model=lambda: resolve_model(s.model, s.home), start_relay=start_relay)
