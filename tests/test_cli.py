"""The CLI answers bad input with one line, never a traceback."""

import os
import subprocess
import sys


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "duet.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_bad_setting_is_one_line():
    r = run_cli("keys", "create", DUET_PAIR_RATE="2")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "DUET_PAIR_RATE" in r.stderr and "Traceback" not in r.stderr


def test_unreachable_redis_is_one_line():
    r = run_cli("keys", "create", DUET_REDIS_URL="redis://127.0.0.1:1/0")
    assert r.returncode == 2 and "does not answer" in r.stderr and "Traceback" not in r.stderr


def test_bad_flag_value_is_one_line():
    r = run_cli("keys", "create", "--pair-rate", "7", DUET_REDIS_URL="redis://127.0.0.1:6379/13")
    assert r.returncode == 2 and "--pair-rate" in r.stderr and "Traceback" not in r.stderr


def test_models_list_and_show(tmp_path):
    from feedback.contract.registry import Registry

    reg = Registry(tmp_path / "registry")
    reg.publish(lambda d: (d / "model.safetensors").write_bytes(b"w"), base_model="base", algorithm="dpo",
                hyperparameters={"beta": 0.1}, train_metrics={}, eval={"win_rate": 0.6, "kl": 1.5}, kafka_offsets={})
    listed = run_cli("models", "list", DUET_HOME=str(tmp_path))
    assert listed.returncode == 0 and "* v000001" in listed.stdout and "win_rate=0.6" in listed.stdout
    shown = run_cli("models", "show", "1", DUET_HOME=str(tmp_path))
    assert shown.returncode == 0 and '"algorithm": "dpo"' in shown.stdout
    missing = run_cli("models", "show", "9", DUET_HOME=str(tmp_path))
    assert missing.returncode == 2 and "no version" in missing.stderr and "Traceback" not in missing.stderr


def test_simulate_edits_need_an_editor_for_the_rule():
    r = run_cli("simulate", "--feedback", "edits", "--rule", "tests.sim_rules:likes_blue")
    assert r.returncode == 2 and "likes_blue_edit" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("simulate", "--feedback", "opinions")
    assert r.returncode == 2 and "--feedback" in r.stderr and "Traceback" not in r.stderr
