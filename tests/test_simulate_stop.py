"""`duet simulate --stop-at WIN LOW`: a second seed stops voting at the first checkpoint that meets the target."""

from __future__ import annotations

from duet.simulate import CurvePoint, _meets


def point(win_rate: float | None, ci_low: float | None) -> CurvePoint:
    return CurvePoint(votes=64, seconds=1.0, model_version="v000001", win_rate=win_rate, ci_low=ci_low,
                      ci_high=None, wins=0, ties=0, losses=0, rm_accuracy=None)


def test_stop_needs_both_the_win_rate_and_the_lower_bound():
    assert _meets(point(0.80, 0.60), 0.8, 0.6)
    assert not _meets(point(0.85, 0.59), 0.8, 0.6)  # a high estimate with a wide interval goes on
    assert not _meets(point(0.79, 0.70), 0.8, 0.6)
    assert not _meets(point(None, None), 0.8, 0.6)  # not yet measured
