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
