"""When a proxy counts as saturated (`ztunnel.proxy.overload.LagShedder`): one late sample enters
SHEDDING, a calm stretch leaves it; no flapping in between."""

from __future__ import annotations

import pytest

from ztunnel.proxy.overload import LagHistory, LagShedder, LoadState


def test_one_late_sample_sheds_and_a_calm_stretch_recovers() -> None:
    s = LagShedder(0.025, recover_below_lag_s=0.01, recover_s=0.2)
    assert s.observe(0.005, 0.0) is None and not s.shedding
    t = s.observe(0.030, 0.01)
    assert t is not None and t.state is LoadState.SHEDDING and s.shedding
    assert s.observe(0.002, 0.02) is None            # calm starts
    assert s.observe(0.015, 0.10) is None            # not calm enough: the stretch starts over
    assert s.observe(0.002, 0.11) is None
    assert s.observe(0.002, 0.30) is None and s.shedding   # 0.19 s of calm
    t = s.observe(0.002, 0.31)
    assert t is not None and t.state is LoadState.NORMAL and not s.shedding
    assert s.max_lag_s == 0.030


def test_between_the_thresholds_nothing_changes() -> None:
    s = LagShedder(0.025)                            # recovers below half of it by default
    assert [s.observe(0.02, i / 10) for i in range(5)] == [None] * 5 and not s.shedding
    s.observe(0.05, 1.0)
    assert [s.observe(0.02, 1.0 + i) for i in range(5)] == [None] * 5 and s.shedding


def test_off_is_no_shedder() -> None:
    with pytest.raises(ValueError, match="no lag-based shedding"):
        LagShedder(0.0)


def test_lag_history_answers_how_late_the_loop_ran_since_a_moment() -> None:
    h = LagHistory(keep_s=10.0, max_samples=4, floor_s=0.005)
    h.observe(0.001, 1.0)              # below the floor: not kept
    h.observe(0.300, 2.0)
    h.observe(0.020, 3.0)
    assert h.max_since(0.0) == 0.300 and h.max_since(2.5) == 0.020 and h.max_since(3.5) == 0.0
    h.observe(0.010, 13.0)             # older than keep_s: the 0.3 s sample is gone
    assert h.max_since(0.0) == 0.020
    for i in range(10):                # bounded
        h.observe(0.05, 14.0 + i)
    assert len(h._samples) == 4
