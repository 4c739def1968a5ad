"""Shared by the benchmark scripts: start a server process and wait until it is ready."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx


def start_server(cmd: list[str], env: dict, url: str, log: Path, ready_path: str = "/ready",
                 timeout_s: float = 300) -> subprocess.Popen:
    """Start `cmd` and return once GET url+ready_path answers 200 (for Duet: the engine has loaded,
    so its start-up no longer competes for the CPU)."""
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd[:4])} exited; see {log}")
        try:
            if httpx.get(url + ready_path, timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout_s:.0f} s; see {log}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_home(prefix: str) -> Path:
    """A fresh DUET_HOME that shares the already converted default model (not converted again)."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    models = Path.home() / ".cache" / "duet" / "models"
    if models.exists():
        (home / "models").symlink_to(models)
    return home


def up_at_defaults(prefix: str, redis_db: int, **extra: str) -> tuple[Path, str, str, dict]:
    """What `duet up` needs to run at its defaults beside anything else on this machine: a fresh home,
    a free port, an emptied Redis database, the environment without any DUET_* setting, and `extra`
    settings on top. Returns (home, url, redis_url, env)."""
    import os

    import redis

    home, port = scratch_home(prefix), free_port()
    url, redis_url = f"http://127.0.0.1:{port}", f"redis://127.0.0.1:6379/{redis_db}"
    redis.Redis.from_url(redis_url).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUET_")}  # defaults, nothing tuned
    env.update({"DUET_HOME": str(home), "DUET_PORT": str(port), "DUET_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1",
                "DUET_TRAINER_METRICS_PORT": "0", "DUET_RELAY_METRICS_PORT": "0", "DUET_SUPERVISOR_METRICS_PORT": "0",
                **extra})
    return home, url, redis_url, env


def ensure_installed(*requirements: str) -> None:
    """pip-install bench-only packages (e.g. "trl==1.16.0") into this environment, every installed package held
    at its version (so no dependency can swap torch for a CUDA build); a no-op when they import already."""
    import importlib.util
    import subprocess
    import sys

    missing = [r for r in requirements if importlib.util.find_spec(r.split("==")[0].replace("-", "_")) is None]
    if not missing:
        return
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                            text=True, check=True).stdout
    cons = Path("bench/results/constraints.txt")
    cons.parent.mkdir(parents=True, exist_ok=True)
    cons.write_text(frozen)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(cons), *missing], check=True)


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls of `fn`, after one warm-up call."""
    import statistics

    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return round(statistics.median(out), 3)


def on_trainer_cores():
    """Pin this process to the cores `duet up` gives the trainer (duet/cpus.py) and resolve the default model:
    (the settings, those cores, the model's folder) — for benches of the trainer's own compute."""
    from duet.cpus import available_cpus, pin_trainer, plan_split
    from duet.model_assets import resolve_model
    from duet.settings import Settings

    s = Settings()
    cores = plan_split(available_cpus(), s.serving_cpus, s.trainer_cpus).trainer
    pin_trainer(cores)
    return s, cores, resolve_model(s.model, s.home)

