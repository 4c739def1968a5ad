"""The one way tests wait for something that happens in another process or thread: poll a condition until it
holds. The timeout is a liveness bound (the test fails instead of hanging), never a claim about speed; nothing
is proved by waiting for something *not* to happen — tests assert a positive signal instead."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll `cond` every `interval_s` until it returns something truthy, and return that. AssertionError naming
    `what` (and the last value seen) if it has not after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {value!r})")
        time.sleep(interval_s)
