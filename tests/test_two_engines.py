"""DUET_CANARY=auto: users judge each new version where the canary's second engine fits (duet/two_engines.py)."""

from __future__ import annotations

import pytest

from duet.two_engines import choose_canary, weights_gb

CPU = dict(on_gpu=False, weights_gb=0.54, kv_cache_gb=1, gpu_memory_utilization=0.85)


def test_auto_turns_users_on_where_two_engines_and_the_trainer_fit_the_memory():
    assert choose_canary("auto", mem_total_gb=23.0, **CPU).mode == "users"  # this machine kind
    small = choose_canary("auto", mem_total_gb=8.0, **CPU)
    assert small.mode == "off" and "8.0 GB" in small.why  # a small laptop: the gate alone decides
    big_model = {**CPU, "weights_gb": 16.0}
    assert choose_canary("auto", mem_total_gb=23.0, **big_model).mode == "off"


@pytest.mark.parametrize("util, mode", [(0.85, "off"), (0.45, "users")])
def test_on_a_gpu_two_engines_must_share_its_memory(util, mode):
    got = choose_canary("auto", on_gpu=True, weights_gb=16.0, kv_cache_gb=1, gpu_memory_utilization=util,
                        mem_total_gb=8.0)
    assert got.mode == mode and str(util) in got.why


@pytest.mark.parametrize("asked", ["off", "users"])
def test_an_explicit_choice_is_kept(asked):
    assert choose_canary(asked, mem_total_gb=1.0, **CPU).mode == asked


def test_weights_in_float32_take_twice_a_16_bit_checkpoint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1_000_000)
    (tmp_path / "config.json").write_text("{}")
    assert weights_gb(tmp_path, "bfloat16") == pytest.approx(0.001)
    assert weights_gb(tmp_path, "float32") == pytest.approx(0.002)
