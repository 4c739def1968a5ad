"""Which pairs are cross-version while users judge a candidate (serving/canary.py `cross_pair`): all of them
while the live version's engine answers nobody else, the configured share under load."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from types import SimpleNamespace

from feedback.canary import CanaryTest
from serving.canary import CanaryRunner
from duet.wiring import canary_config


@dataclass
class QueueOnly:
    """An engine as `cross_pair` sees it: its version and how many requests it is answering."""
    model_version: str
    unfinished: int = 0

    def num_unfinished(self) -> int:
        return self.unfinished


def runner(busy: int, share: float = 0.5, idle_share: float = 1.0) -> CanaryRunner:
    r = CanaryRunner(store=None, cfg=canary_config(pair_share=share, pair_share_idle=idle_share),  # type: ignore[arg-type]
                     incumbent=SimpleNamespace(engine=QueueOnly("base", busy)),  # type: ignore[arg-type]
                     start_candidate=lambda: None, rng=random.Random(7))  # type: ignore[arg-type,return-value]
    r.candidate = SimpleNamespace(engine=QueueOnly("v000001"))  # type: ignore[assignment]
    r.test = CanaryTest(candidate="v000001", incumbent="base", started_at=time.time())
    return r


def cross_share(r: CanaryRunner, n: int = 2000) -> float:
    return sum(r.cross_pair() is not None for _ in range(n)) / n


def test_every_pair_is_cross_version_while_the_incumbent_is_otherwise_idle():
    assert cross_share(runner(busy=0)) == 1.0
    assert cross_share(runner(busy=0, idle_share=0.0)) == 0.0  # the idle share is a setting, not a constant


def test_under_load_the_configured_share_of_pairs_is_cross_version():
    # 2000 draws at p = 0.5: sd 0.011, so ±0.05 is 4.5 sd (false failure ~1e-5; the seed fixes it anyway)
    assert abs(cross_share(runner(busy=3)) - 0.5) < 0.05
    assert cross_share(runner(busy=1, share=0.0)) == 0.0


def test_no_cross_pair_without_a_running_test_of_the_loaded_candidate():
    r = runner(busy=0)
    r.test = r.test.model_copy(update={"status": "paused"})
    assert r.cross_pair() is None
    r = runner(busy=0)
    r.candidate.engine.model_version = "v000002"  # the second engine still holds another candidate
    assert r.cross_pair() is None
