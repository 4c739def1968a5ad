"""Settings reach every component unchanged: each config is bound field by field (duet/wiring.py), its defaults
live in Settings alone, and a child process reads exactly its parent's settings."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from duet import wiring
from duet.settings import Settings
from feedback.canary import CanaryConfig
from trainer.gate import GateConfig
from trainer.policy import PolicyConfig
from trainer.reward_trainer import RewardTrainerConfig
from trainer.rounds import RoundConfig
from trainer.service import ServiceConfig

# Settings fields no binder reads: the CLI's own (where to listen, what to start, cores, niceness, ports of the
# processes it starts) and serving's, which still reads Settings itself (issue 25 part 1: a ServingConfig)
NOT_BOUND = {
    # the CLI / `duet up`
    "host", "port", "cpu_split", "serving_cpus", "trainer_cpus", "trainer_nice", "relay", "relay_metrics_port",
    "supervisor_metrics_port", "trainer_metrics_port", "dev_key", "rm_backbone", "model", "home", "registry_dir",
    "release_checks", "gate_prompt_file", "trainer_ranks", "trainer_max_restarts",
    # serving
    "served_model_name", "max_model_len", "dtype", "kv_cache_gb", "gpu_memory_utilization", "enforce_eager",
    "max_tokens_cap", "default_max_tokens", "max_n", "max_body_bytes", "rate_limit_rpm", "pair_rate", "max_k",
    "pair_min_temperature", "comparison_ttl_s", "max_edit_chars", "vote_cap_per_key", "vote_cap_per_user",
    "auth_disabled", "secret", "redis_timeout_s", "outbox_max", "vote_max_bytes", "swap_probe_timeout_s",
    "swap_logprob_tolerance", "canary_engine_nice", "canary_candidate",
}


class Recorder:
    """Settings that remember which fields were read."""

    def __init__(self, s: Settings) -> None:
        self._s, self.read = s, set()

    def __getattr__(self, name):
        if name in Settings.model_fields:
            self.read.add(name)
        return getattr(self._s, name)

    def registry_root(self) -> Path:
        self.read.update({"registry_dir", "home"})
        return self._s.registry_root()


def test_every_setting_is_bound_to_a_component_or_used_by_the_cli():
    s = Recorder(Settings.model_construct())
    rounds = wiring.round_config(s, base_model="base")  # type: ignore[arg-type]
    wiring.service_config(s, rounds=rounds)  # type: ignore[arg-type]
    wiring.reward_config(s, backbone="backbone")  # type: ignore[arg-type]
    wiring.canary_config(s)  # type: ignore[arg-type]
    wiring.build_relay(s)  # type: ignore[arg-type]
    unbound = set(Settings.model_fields) - s.read - NOT_BOUND
    assert not unbound, f"settings no component receives: {sorted(unbound)}"
    stale = NOT_BOUND - set(Settings.model_fields)
    assert not stale, f"NOT_BOUND names fields Settings no longer has: {sorted(stale)}"


def test_a_config_has_no_default_of_its_own_for_a_setting():
    """A default written both in Settings and in a config drifts (RewardTrainerConfig.lr was 1e-5 while users got
    rm_lr 5e-5): a config field that is a setting has no default."""
    prefixes = {PolicyConfig: "policy_", RewardTrainerConfig: "rm_", GateConfig: "gate_", ServiceConfig: "",
                RoundConfig: "", CanaryConfig: "canary_"}
    twice = []
    for cls, prefix in prefixes.items():
        if cls is CanaryConfig:
            fields = {n: f.is_required() for n, f in CanaryConfig.model_fields.items()}
        else:
            fields = {f.name: f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                      for f in dataclasses.fields(cls)}
        twice += [f"{cls.__name__}.{n}" for n, required in fields.items()
                  if not required and (prefix + n in Settings.model_fields or n in Settings.model_fields)]
    assert not twice


def test_binders_pass_each_setting_unchanged():
    s = Settings.model_construct(rm_lr=3e-3, policy_k=5, policy_lr=7e-4, gate_prompts=7, seed=11,
                                 trainer_precision="fp32", canary_margin=0.6, policy_every_votes=9,
                                 kafka_bootstrap="broker:1", keep_versions=2, rm_tie_weight=0.5)
    rm, policy, gate = wiring.reward_config(s, backbone="b"), wiring.policy_config(s), wiring.gate_config(s)
    assert (rm.lr, rm.seed, rm.precision, rm.tie_weight) == (3e-3, 11, "fp32", 0.5)
    assert (policy.k, policy.lr, policy.seed, policy.precision) == (5, 7e-4, 11, "fp32")
    assert gate.prompts == 7 and wiring.canary_config(s).margin == 0.6
    rounds = wiring.round_config(s, base_model="base")
    assert (rounds.keep_versions, rounds.bootstrap, rounds.gate, rounds.policy) == (2, "broker:1", gate, policy)
    service = wiring.service_config(s, rounds=rounds)
    assert (service.policy_every_votes, service.kafka_bootstrap, service.rounds) == (9, "broker:1", rounds)
    # overrides change only what they name
    assert wiring.policy_config(s, k=2) == dataclasses.replace(policy, k=2)


def test_a_child_process_reads_its_parents_settings(tmp_path):
    """Settings.to_env is how every child gets its settings (`duet up`'s serving and trainer, serving's relay):
    the child's Settings equal the parent's — overrides, None values and paths included — even where the
    child's working directory has a .env file saying otherwise."""
    parent = Settings(port=8123, kafka_min_insync=None, registry_dir=tmp_path / "reg", policy_lr=1e-3,
                      auth_disabled=True, canary="users", relay_batch=7, kafka_bootstrap="b:9092",
                      trainer_rollout_url="http://x:1", home=tmp_path / "home")
    (tmp_path / ".env").write_text("DUET_PORT=1\nDUET_RELAY_BATCH=1\n")
    out = subprocess.run([sys.executable, "-c", "from duet.settings import Settings; "
                          "print(Settings().model_dump_json())"], env=parent.to_env(), cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == json.loads(parent.model_dump_json())
