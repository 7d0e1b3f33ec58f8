"""ztunnel.api.lb: Envoy's priority load, panic, and deterministic endpoint picking."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel.api.lb import (
    TierHealth,
    choose_endpoint,
    pick_endpoint,
    priority_load,
    priority_shares,
    tier_health,
)


@dataclass(frozen=True)
class Ep:
    workload_uid: str
    tier: int
    weight: int = 1
    healthy: bool = True


def approx(xs: list[float]) -> list[object]:
    return [pytest.approx(x, abs=1e-9) for x in xs]


@pytest.mark.parametrize("tiers, expected", [
    ([(10, 10), (10, 10)], [1.0, 0.0]),
    ([(5, 10), (10, 10)], [0.7, 0.3]),             # Envoy's example: half healthy keeps 70 %
    ([(8, 10), (10, 10)], [1.0, 0.0]),             # 80 % × 1.4 = 112 -> capped at 100
    ([(0, 10), (10, 10)], [0.0, 1.0]),
    ([(5, 10), (5, 10), (10, 10)], [0.7, 0.3, 0.0]),
    ([(2, 10), (2, 10), (10, 10)], [0.28, 0.28, 0.44]),
    ([(0, 0), (10, 10)], [0.0, 1.0]),              # an empty tier passes everything on
])
def test_spill(tiers: list[tuple[int, int]], expected: list[float]) -> None:
    assert priority_shares([TierHealth(*t) for t in tiers]) == approx(expected)


@pytest.mark.parametrize("tiers, threshold, shares, panic", [
    # total health 56 < 100: normalized. tier 0 40 % healthy < 50 -> panic; tier 1 empty panics too
    # -> everything in panic: by host count.
    ([(4, 10), (0, 0)], 50, [1.0, 0.0], [True, True]),
    # 40 % healthy, threshold 30: no panic, but normalized up to 100 %
    ([(4, 10), (0, 0)], 30, [1.0, 0.0], [False, True]),
    # 2/10 + 2/10: health 28 + 28 = 56 -> 50/50; both below 50 % -> total panic by host count
    ([(2, 10), (2, 30)], 50, [0.25, 0.75], [True, True]),
    # one tier not in panic: loads by health, only tier 0 panics
    ([(1, 10), (6, 10)], 50, [14 / 98, 84 / 98], [True, False]),
    # nothing healthy, panic disabled: tier 0 gets all, nothing selectable
    ([(0, 10), (0, 10)], 0, [1.0, 0.0], [False, False]),
    # nothing healthy, panic on: by host count
    ([(0, 10), (0, 30)], 50, [0.25, 0.75], [True, True]),
])
def test_panic(tiers: list[tuple[int, int]], threshold: int, shares: list[float], panic: list[bool]) -> None:
    load = priority_load([TierHealth(*t) for t in tiers], panic_threshold_pct=threshold)
    assert list(load.shares) == approx(shares)
    assert list(load.panic) == panic


def test_tier_health_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="healthy <= total"):
        TierHealth(3, 2)


tier_st = st.tuples(st.integers(0, 20), st.integers(0, 20)).map(lambda t: TierHealth(min(t), max(t)))


@given(st.lists(tier_st, min_size=1, max_size=6), st.sampled_from([0, 30, 50, 80]))
def test_shares_sum_to_one(tiers: list[TierHealth], threshold: int) -> None:
    load = priority_load(tiers, panic_threshold_pct=threshold)
    assert math.isclose(sum(load.shares), 1.0, abs_tol=1e-9)
    assert all(s >= -1e-12 for s in load.shares)


@given(st.lists(tier_st, min_size=1, max_size=6))
def test_spill_formula(tiers: list[TierHealth]) -> None:
    """When total health reaches 100 no tier panics and each tier gets min(left, health)."""
    health = [min(100.0, 140.0 * t.healthy / t.total) if t.total else 0.0 for t in tiers]
    if sum(health) < 100:
        return
    left = 100.0
    expected = []
    for h in health:
        expected.append(min(left, h) / 100)
        left -= min(left, h)
    assert priority_shares(tiers) == approx(expected)


@given(st.lists(tier_st, min_size=1, max_size=6), st.sampled_from([0, 50]))
def test_no_share_to_an_unhealthy_tier_unless_panic(tiers: list[TierHealth], threshold: int) -> None:
    load = priority_load(tiers, panic_threshold_pct=threshold)
    for t, s, p in zip(tiers, load.shares, load.panic, strict=True):
        if t.healthy == 0 and not p and sum(x.healthy for x in tiers) > 0:
            assert s == pytest.approx(0.0, abs=1e-12)


endpoints_st = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans(), st.booleans()), min_size=1, max_size=20,
).map(lambda rows: [Ep(f"e{i}", tier, weight, healthy) for i, (tier, weight, healthy, _) in enumerate(rows)]
      ).flatmap(lambda eps: st.tuples(st.just(eps), st.sets(st.sampled_from([e.workload_uid for e in eps]))))


@settings(max_examples=200)
@given(endpoints_st, st.floats(0, 1, exclude_max=True), st.sampled_from([0, 50]))
def test_never_picks_ejected_unless_panic(case: tuple[list[Ep], set[str]], rand: float, threshold: int) -> None:
    eps, ejected = case
    load = priority_load(tier_health(eps, ejected), panic_threshold_pct=threshold)
    picked = pick_endpoint(eps, load.shares, ejected, rand, load.panic)
    if picked is None:
        assert not any(e.healthy and e.workload_uid not in ejected for e in eps) or threshold == 0
        return
    if not load.panic[picked.tier]:
        assert picked.healthy and picked.workload_uid not in ejected
    assert pick_endpoint(eps, load.shares, ejected, rand, load.panic) is picked  # deterministic


def test_pick_follows_shares_and_weights() -> None:
    eps = [Ep("a", 0, 1), Ep("b", 0, 3, healthy=False), Ep("c", 1, 1), Ep("d", 1, 3)]
    shares = priority_shares(tier_health(eps))  # tier 0: 1/2 healthy -> 70 %
    assert shares == approx([0.7, 0.3])
    picks = [pick_endpoint(eps, shares, set(), (i + 0.5) / 100) for i in range(100)]
    counts = {k: sum(1 for p in picks if p is not None and p.workload_uid == k) for k in "abcd"}
    assert counts["a"] == 70 and counts["b"] == 0 and counts["c"] + counts["d"] == 30
    assert abs(counts["c"] - 7.5) <= 0.5  # weights 1:3 within tier 1


def test_retry_with_exclusions_moves_to_another_endpoint_then_tier() -> None:
    eps = [Ep("a", 0), Ep("b", 0), Ep("c", 1)]
    first = choose_endpoint(eps, set(), 0.1)
    assert first is not None and first.workload_uid == "a"
    second = choose_endpoint(eps, set(), 0.1, exclude={"a"})
    assert second is not None and second.workload_uid == "b"
    third = choose_endpoint(eps, set(), 0.1, exclude={"a", "b"})
    assert third is not None and third.workload_uid == "c"
    assert choose_endpoint(eps, set(), 0.1, exclude={"a", "b", "c"}) is None


def test_ejected_local_endpoint_spills_to_next_tier() -> None:
    eps = [Ep("a", 0), Ep("b", 1)]
    picked = choose_endpoint(eps, {"a"}, 0.0)
    assert picked is not None and picked.workload_uid == "b"
