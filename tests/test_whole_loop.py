"""The whole loop as a person meets it: `duet up` (supervised children, embedded broker), simulated
users voting through the HTTP API by a rule, the trainer publishing, serving swapping — and the served
policy beating the base model under that rule, with the lower bootstrap bound above 50 %."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager

import httpx
import pytest
import redis

from duet.cpus import available_cpus, parse_cpus
from duet.simulate import SimulateConfig, Simulator
from duet.two_engines import mem_total_gb
from tests.conftest import free_port, make_blue_llama
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

LOOP_REDIS_DB = int(os.environ.get("DUET_TEST_LOOP_REDIS_DB", "12"))  # not the session server's database


def children(pid: int, pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def group_members(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def restarts(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    lines = [ln for ln in text.splitlines() if ln.startswith('duet_child_restarts_total{child="trainer"}')]
    return float(lines[0].split()[-1]) if lines else 0.0


@contextmanager
def duet_up(tmp_path, **settings: str):
    """`duet up` on the blue tiny model, the trainer at its defaults (but `settings`, as DUET_<NAME>, and no release
    checks: below); yields
    (process, home, url, supervisor port)."""
    model = make_blue_llama(tmp_path / "model")
    home, port, sup_port = tmp_path / "home", free_port(), free_port()
    r = redis.Redis.from_url(f"redis://127.0.0.1:6379/{LOOP_REDIS_DB}")
    r.flushdb()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "DUET_MODEL": str(model),
           "DUET_HOME": str(home), "DUET_PORT": str(port), "DUET_REDIS_URL": f"redis://127.0.0.1:6379/{LOOP_REDIS_DB}",
           "DUET_MAX_MODEL_LEN": "256", "DUET_TRAINER_METRICS_PORT": "0", "DUET_RELAY_METRICS_PORT": "0",
           "DUET_SUPERVISOR_METRICS_PORT": str(sup_port), "DUET_RATE_LIMIT_RPM": "100000",
           # the trainer at its defaults (learning rates, β, k, round size and cadence, reward model, gate);
           # only the answers are short, as the simulated users ask for 16 tokens
           "DUET_POLICY_MAX_NEW_TOKENS": "16",
           # the default release checks are SmolLM2's regression suite (capitals, refusals, no loops); a tiny random
           # model that learns to say " blue" says it again and again — a loop by their measure, by design here
           "DUET_RELEASE_CHECKS": "off", **{"DUET_" + k.upper(): v for k, v in settings.items()}}
    for k in ("DUET_KAFKA_BOOTSTRAP", "DUET_ADMIN_KEY", "DUET_DEV_KEY", "DUET_REGISTRY_DIR"):
        env.pop(k, None)
    log = open(tmp_path / "up.log", "w")
    up = subprocess.Popen([sys.executable, "-m", "duet.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: up.poll() is not None or ((home / "admin_key").exists() and (home / "dev_key").exists()),
                   120, "duet up to write its keys", 0.5)
        assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        yield up, home, f"http://127.0.0.1:{port}", sup_port
    finally:
        up.send_signal(signal.SIGTERM)  # what Ctrl-C does too
        try:
            up.wait(timeout=90)
        finally:
            if up.poll() is None:
                up.kill()
            log.close()
            r.flushdb()
            r.close()
    assert up.returncode == 0
    assert "duet: stopping" in (tmp_path / "up.log").read_text()


def simulation(home, url, tmp_path, feedback: str, settle_s: float = 240, votes: int = 300,
               stop_at: tuple[float, float] | None = None) -> SimulateConfig:
    # paced (150 s of feedback), so rounds run while users vote, as they would; after the votes, wait up to
    # `settle_s` for a version still in the making to go live
    return SimulateConfig(base_url=url, rule="tests.sim_rules:likes_blue", feedback=feedback, noise=0.1, votes=votes,
                          rate=2, concurrency=4, max_tokens=16, eval_every=40, eval_prompts=32, eval_samples=4,
                          settle_s=settle_s, stop_at=stop_at, out_dir=tmp_path / "sim", progress=False,
                          api_key=(home / "dev_key").read_text().strip(),
                          admin_key=(home / "admin_key").read_text().strip())


def test_duet_up_learns_from_simulated_users(tmp_path):
    users_judge = mem_total_gb() >= 16  # DUET_CANARY=auto: memory for two engines beside the trainer
    with duet_up(tmp_path) as (up, home, url, sup_port):
        # Where users judge, no version goes live without their votes after it is published (a round's time
        # varies with the machine), so users go on voting until one they promoted beats base (up to 600 votes)
        # rather than waiting after a fixed number.
        cfg = (simulation(home, url, tmp_path, "pairs", settle_s=0, votes=600, stop_at=(0.501, 0.501)) if users_judge
               else simulation(home, url, tmp_path, "pairs"))
        result = Simulator(cfg).run()

        final = result.final
        assert 0 < result.votes_cast <= cfg.votes and result.votes_failed == 0
        assert final.model_version != "base", f"no version went live: {(tmp_path / 'up.log').read_text()[-2000:]}"
        assert final.win_rate > 0.5 and final.ci_low > 0.5, final
        assert result.curve[0].model_version == "base" and result.first_version_at_votes is not None
        assert (tmp_path / "sim" / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((tmp_path / "sim" / "result.json").read_text())["final"]["model_version"] == final.model_version

        # What the dashboard shows is what happened.
        auth = {"Authorization": f"Bearer {cfg.api_key}"}
        dash = httpx.get(f"{cfg.base_url}/v1/dashboard", headers=auth, timeout=30).json()
        assert sum(dash["votes_total"].values()) == result.votes_cast
        assert any(x["result"] == "published" for x in dash["rounds"])
        assert any(s["result"] == "ok" and s["version"] == final.model_version for s in dash["swaps"])
        assert any(s["held_out_accuracy"] is not None for s in dash["reward_model"]), dash["reward_model"][-3:]
        judged = {(w["model_version"], w["judge"]) for w in dash["win_rates"]}
        assert (final.model_version, "simulated:tests.sim_rules:likes_blue") in judged
        board = httpx.get(f"{cfg.base_url}/v1/leaderboard", headers=auth, timeout=30).json()["data"]
        scores = {e["model_version"]: e for e in board if e["judge"] == "simulated:tests.sim_rules:likes_blue"}
        assert scores[final.model_version]["score"] > scores["base"]["score"]

        # Users judged the versions
        if users_judge:
            assert "duet: canary    users judge" in (tmp_path / "up.log").read_text()
            assert any(e["judge"] == "users" and e["model_version"] != "base" for e in board), board

        # Serving (API and engine processes) and the trainer run on the cores `duet up` gave each (duet/cpus.py)
        [line] = [ln for ln in (tmp_path / "up.log").read_text().splitlines() if ln.startswith("duet: cores")]
        serving_cpus, trainer_cpus = map(parse_cpus, re.search(r"serving ([\d,]+), trainer ([\d,]+)", line).groups())
        [serving] = children(up.pid, "duet.cli serve")
        engine_group = group_members(serving)
        assert len(engine_group) > 1 and {tuple(sorted(os.sched_getaffinity(p))) for p in engine_group} == {serving_cpus}
        [trainer] = children(up.pid, "duet.cli train")
        assert tuple(sorted(os.sched_getaffinity(trainer))) == trainer_cpus
        if len(available_cpus()) >= 2:
            assert not set(serving_cpus) & set(trainer_cpus), line

        # A crashed child is restarted, and counted.
        before = restarts(sup_port)
        os.kill(trainer, signal.SIGKILL)
        wait_until(lambda: restarts(sup_port) >= before + 1 and children(up.pid, "duet.cli train"), 30,
                   "the supervisor to restart the trainer", 0.5)
        assert children(up.pid, "duet.cli train") != [trainer]


def test_thumbs_alone_move_the_served_model_toward_the_users_taste(tmp_path):
    """No pairs at all: users rate single answers up when they say "blue" (the median base answer does not),
    with 10 % coin flips; the trainer at its defaults must publish a version that says "blue" more."""
    # thumbs alone cannot judge two versions (a canary test counts votes on cross-version pairs): a product that
    # collects only thumbs runs with the trainer's gate deciding
    with duet_up(tmp_path, canary="off") as (up, home, url, sup_port):
        # users stop rating once a live version beats base (as the pairs test's users do), else after 300
        result = Simulator(simulation(home, url, tmp_path, "thumbs", stop_at=(0.501, 0.501))).run()
        final = result.final
        assert 0 < result.votes_cast <= 300 and result.votes_failed == 0
        assert set(result.by_kind) == {"up", "down"} and result.thumbs_bar == 0.0, result.by_kind
        assert final.model_version != "base", f"no version went live: {(tmp_path / 'up.log').read_text()[-2000:]}"
        assert final.win_rate > 0.5 and final.ci_low > 0.5, final
        dash = httpx.get(f"{url}/v1/dashboard", headers={"Authorization": f"Bearer {(home / 'dev_key').read_text().strip()}"},
                         timeout=30).json()
        assert dash["votes_total"].get("up", 0) + dash["votes_total"].get("down", 0) == result.votes_cast

        # SIGKILL of the API: its engine processes die with it, and it comes back, ready, on the same port
        [serving] = children(up.pid, "duet.cli serve")
        group = group_members(serving)
        assert len(group) > 1, "the API runs its engine in processes of its own group"
        os.kill(serving, signal.SIGKILL)
        def serving_again() -> bool:
            try:
                return httpx.get(url + "/ready", timeout=5).status_code == 200 and bool(children(up.pid, "duet.cli serve"))
            except httpx.TransportError:
                return False

        wait_until(serving_again, 240, "a restarted API that is ready", 1)
        assert children(up.pid, "duet.cli serve") != [serving]
        assert group_members(serving) == [], "processes of the killed API outlived it"
