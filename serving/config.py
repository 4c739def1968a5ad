"""What serving is configured with, handed in by duet/wiring.py (bound field by field from the settings, as the
trainer's configs are): serving reads no settings, environment or CLI of its own. Defaults live in the settings
alone (duet/settings.py, DUET_<FIELD>); values here are already resolved (dtype, secret, keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from feedback.canary import CanaryConfig


class EngineConfig(BaseModel):
    """How an engine is started (serving/runtime.py `vllm_engine_factory`); the canary's second engine too."""
    model_config = ConfigDict(frozen=True)

    served_model_name: str
    max_model_len: int
    dtype: str  # already chosen for this device (bf16 where it computes bf16 fast, else float32): never "auto"
    enforce_eager: bool
    seed: int
    kv_cache_gb: int
    gpu_memory_utilization: float
    cache_root: Path  # vLLM's caches
    max_lora_rank: int = 0  # > 0: runtime LoRA up to this rank (candidates as adapters); 0: none


class ChatConfig(BaseModel):
    """What a chat request may ask and when it is answered with K answers to compare (serving/chat.py)."""
    model_config = ConfigDict(frozen=True)

    served_model_name: str
    max_n: int
    max_k: int
    pair_rate: float
    pair_min_temperature: float
    default_max_tokens: int
    max_tokens_cap: int
    comparison_ttl_s: int


class ServingConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    engine: EngineConfig
    chat: ChatConfig
    # Redis and the vote path
    redis_url: str
    redis_timeout_s: float
    kafka_bootstrap: str  # "" = votes wait in the outbox (no relay, no weight announcements)
    outbox_max: int
    vote_cap_per_key: int
    vote_cap_per_user: int
    vote_max_bytes: int
    max_edit_chars: int
    max_body_bytes: int
    secret: str  # the vote-token HMAC secret, resolved (generated once and kept under the home if unset)
    # keys and limits
    admin_key: str
    dev_key: str
    auth_disabled: bool
    rate_limit_rpm: int
    # versions
    registry_root: Path
    swap_probe_timeout_s: float
    swap_logprob_tolerance: float
    replica: str  # how this replica names itself in swap status (host:port)
    canary: CanaryConfig | None  # users judge each published version (DUET_CANARY=users); None: versions go live
    canary_candidate: Literal["engine", "adapter"]  # how the candidate is served (resolved for this device)
    canary_engine_nice: int
    canary_adapter_dir: Path  # this replica's adapters built for candidates (cleared at start)
