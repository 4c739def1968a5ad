"""One Duet per home, one trainer per checkpoint folder: an advisory lock (flock) held for the life of the
process. Two `duet up` on one home would share its Redis keys, registry and checkpoints, and a second trainer on
one checkpoint folder would train every vote twice; the second start is refused, naming the first. The kernel
drops the lock when its holder dies, however it dies (SIGKILL included): nothing stale to clean up by hand."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO


class AlreadyRunning(Exception):
    pass


_held: list[IO[str]] = []  # open lock files of this process (closing one would release its lock)


def hold(path: Path, what: str) -> None:
    """Take the lock at `path` for the rest of this process, recording `what` holds it; AlreadyRunning if another
    process has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise AlreadyRunning(f"{holder} holds {path.parent}") from None
    f.seek(0)
    f.truncate()
    f.write(f"{what} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    f.flush()
    _held.append(f)
