"""ztunnel.api.outlier: Envoy's consecutive-error outlier detection as a state machine."""

from __future__ import annotations

import pytest

from ztunnel.api.config import OutlierPolicy
from ztunnel.api.outlier import (
    EjectReason,
    EndpointEjected,
    EndpointUnejected,
    HostState,
    InvalidTransition,
    Outcome,
    OutlierDetector,
    Transition,
    next_state,
)

POOL = [f"ep-{i}" for i in range(10)]


def detector(**kw: object) -> OutlierDetector:
    defaults: dict[str, object] = {"consecutive_5xx_errors": 3, "consecutive_gateway_errors": None,
                                   "base_ejection_time_s": 30.0, "max_ejection_time_s": 300.0,
                                   "max_ejection_percent": 100, "interval_s": 10.0}
    defaults.update(kw)
    d = OutlierDetector(OutlierPolicy(**defaults))  # type: ignore[arg-type]
    d.set_pool(POOL)
    return d


def fail(d: OutlierDetector, key: str, n: int, now_s: float, outcome: Outcome = Outcome.HTTP_5XX) -> list[object]:
    events: list[object] = []
    for _ in range(n):
        events.extend(d.record(key, outcome, now_s))
    return events


def test_transition_table() -> None:
    assert next_state("a", HostState.HEALTHY, Transition.EJECT) is HostState.EJECTED
    assert next_state("a", HostState.EJECTED, Transition.UNEJECT) is HostState.HEALTHY
    with pytest.raises(InvalidTransition, match="cannot eject from state Ejected"):
        next_state("a", HostState.EJECTED, Transition.EJECT)
    with pytest.raises(InvalidTransition):
        next_state("a", HostState.HEALTHY, Transition.UNEJECT)


@pytest.mark.parametrize("errors, ejected", [(1, False), (2, False), (3, True), (4, True)])
def test_consecutive_5xx_ejects_inline_at_threshold(errors: int, ejected: bool) -> None:
    d = detector()
    events = fail(d, "ep-0", errors, 1.0)
    assert d.is_ejected("ep-0", 1.0) is ejected
    assert [e for e in events if isinstance(e, EndpointEjected)] == (
        [EndpointEjected("ep-0", EjectReason.CONSECUTIVE_5XX_ERRORS, 1, 31.0, True, 1.0, 1, 3)] if ejected else [])


def test_success_resets_counters() -> None:
    d = detector()
    fail(d, "ep-0", 2, 0.0)
    d.record("ep-0", Outcome.SUCCESS, 0.0)
    fail(d, "ep-0", 2, 0.0)
    assert not d.is_ejected("ep-0", 0.0)
    fail(d, "ep-0", 1, 0.0)
    assert d.is_ejected("ep-0", 0.0)


@pytest.mark.parametrize("outcome", [Outcome.CONNECT_FAILURE, Outcome.RESET_BEFORE_RESPONSE, Outcome.TIMEOUT,
                                     Outcome.LOCAL_ORIGIN_FAILURE, Outcome.HTTP_GATEWAY_ERROR])
@pytest.mark.parametrize("gw, fivexx, expect", [
    (2, 5, EjectReason.CONSECUTIVE_GATEWAY_ERRORS),
    (None, 2, EjectReason.CONSECUTIVE_5XX_ERRORS),
    (2, 2, EjectReason.CONSECUTIVE_GATEWAY_ERRORS),  # gateway detector is checked first
])
def test_gateway_errors_count_towards_both(outcome: Outcome, gw: int | None, fivexx: int, expect: EjectReason) -> None:
    d = detector(consecutive_gateway_errors=gw, consecutive_5xx_errors=fivexx)
    events = fail(d, "ep-1", 2, 5.0, outcome)
    assert [e.reason for e in events if isinstance(e, EndpointEjected)] == [expect]


def test_plain_5xx_resets_gateway_counter() -> None:
    d = detector(consecutive_gateway_errors=2, consecutive_5xx_errors=None)
    d.record("ep-1", Outcome.CONNECT_FAILURE, 0.0)
    d.record("ep-1", Outcome.HTTP_5XX, 0.0)
    d.record("ep-1", Outcome.CONNECT_FAILURE, 0.0)
    assert not d.is_ejected("ep-1", 0.0)
    d.record("ep-1", Outcome.TIMEOUT, 0.0)
    assert d.is_ejected("ep-1", 0.0)


@pytest.mark.parametrize("outcome, counts_local", [
    (Outcome.CONNECT_FAILURE, True), (Outcome.TIMEOUT, True), (Outcome.RESET_BEFORE_RESPONSE, True),
    (Outcome.HTTP_5XX, False), (Outcome.HTTP_GATEWAY_ERROR, False),
])
def test_split_local_origin(outcome: Outcome, counts_local: bool) -> None:
    d = detector(split_external_local_origin_errors=True, consecutive_local_origin_failures=2,
                 consecutive_5xx_errors=3, consecutive_gateway_errors=None)
    events = fail(d, "ep-2", 2, 0.0, outcome)
    ejections = [e for e in events if isinstance(e, EndpointEjected)]
    if counts_local:
        assert [e.reason for e in ejections] == [EjectReason.CONSECUTIVE_LOCAL_ORIGIN_FAILURES]
    else:
        assert ejections == []  # two externals are below the 5xx threshold of 3


def test_split_connect_success_resets_only_local() -> None:
    d = detector(split_external_local_origin_errors=True, consecutive_local_origin_failures=2,
                 consecutive_5xx_errors=2)
    d.record("ep-2", Outcome.CONNECT_FAILURE, 0.0)
    d.record("ep-2", Outcome.HTTP_5XX, 0.0)
    d.record("ep-2", Outcome.CONNECT_SUCCESS, 0.0)
    d.record("ep-2", Outcome.CONNECT_FAILURE, 0.0)
    assert not d.is_ejected("ep-2", 0.0)
    d.record("ep-2", Outcome.HTTP_5XX, 0.0)
    assert d.is_ejected("ep-2", 0.0)


def test_connect_success_is_neutral_without_split() -> None:
    d = detector()
    d.record("ep-3", Outcome.HTTP_5XX, 0.0)
    d.record("ep-3", Outcome.CONNECT_SUCCESS, 0.0)
    fail(d, "ep-3", 2, 0.0)
    assert d.is_ejected("ep-3", 0.0)


@pytest.mark.parametrize("base, cap, expected", [
    (30.0, 300.0, [30.0, 60.0, 90.0, 120.0]),
    (30.0, 70.0, [30.0, 60.0, 70.0, 70.0]),
    (30.0, 10.0, [30.0, 30.0, 30.0, 30.0]),  # cap below base: base wins (Envoy)
])
def test_ejection_time_grows_with_times_ejected(base: float, cap: float, expected: list[float]) -> None:
    d = detector(base_ejection_time_s=base, max_ejection_time_s=cap, interval_s=1000.0)
    now = 0.0
    durations = []
    for _ in expected:
        [ev] = [e for e in fail(d, "ep-4", 3, now) if isinstance(e, EndpointEjected)]
        durations.append(ev.until_s - now)
        now = ev.until_s  # fail again right at expiry: no healthy interval to decay
    assert durations == expected


def test_unejection_on_expiry_and_counts() -> None:
    d = detector()
    fail(d, "ep-5", 3, 100.0)
    assert d.ejected_keys(129.9) == {"ep-5"}
    assert d.tick(129.9) == []
    assert d.ejected_keys(130.0) == frozenset()
    assert d.tick(131.0) == [EndpointUnejected("ep-5", 131.0, 31.0, 1)]
    assert d.state_of("ep-5") is HostState.HEALTHY
    assert d.stats.unejected == 1 and d.stats.enforced_total == 1


def test_multiplier_decays_while_healthy() -> None:
    d = detector(interval_s=10.0)
    fail(d, "ep-6", 3, 0.0)            # multiplier 1, until 30
    d.tick(30.0)
    [ev] = fail(d, "ep-6", 3, 35.0)    # 5 s healthy: no decay -> multiplier 2
    assert isinstance(ev, EndpointEjected) and ev.multiplier == 2 and ev.until_s == 95.0
    d.tick(95.0)
    assert d.multiplier_of("ep-6", 114.0) == 1   # one full interval since expiry
    assert d.multiplier_of("ep-6", 200.0) == 0
    [ev] = fail(d, "ep-6", 3, 200.0)
    assert isinstance(ev, EndpointEjected) and ev.multiplier == 1 and ev.until_s == 230.0


def test_errors_while_ejected_are_ignored() -> None:
    d = detector()
    fail(d, "ep-7", 3, 0.0)
    assert fail(d, "ep-7", 10, 1.0) == []
    assert d.stats.detected_total == 1


@pytest.mark.parametrize("pool, pct, enforced", [
    (9, 10, 0),     # the trap: 1/9 = 11 % > 10 %: never ejects
    (10, 10, 1),
    (20, 10, 2),
    (3, 34, 1),
    (3, 100, 3),
    (4, 50, 2),
    (1, 100, 1),
])
def test_max_ejection_percent(pool: int, pct: int, enforced: int) -> None:
    d = OutlierDetector(OutlierPolicy(consecutive_5xx_errors=1, max_ejection_percent=pct))
    keys = [f"h{i}" for i in range(pool)]
    d.set_pool(keys)
    events = [e for k in keys for e in d.record(k, Outcome.HTTP_5XX, 0.0)]
    assert sum(1 for e in events if isinstance(e, EndpointEjected) and e.enforced) == enforced
    assert d.stats.overflow == pool - enforced
    assert d.stats.detected_total == pool
    assert len(d.ejected_keys(0.0)) == enforced
    assert all(not e.enforced for e in events if isinstance(e, EndpointEjected) and e.key not in d.ejected_keys(0.0))


@pytest.mark.parametrize("pool, failing, pct, enforced", [
    # a service's pool as a client sees it: its pods in 3 clusters + 3 gateway aggregates, 9 with
    # 2 replicas, 18 with 5; one cluster's pods fail
    (9, 2, 100, 2),
    (9, 2, 50, 2),
    (9, 2, 20, 1),     # 1/9 = 11 % ok, 2/9 = 22 % > 20 %
    (9, 2, 10, 0),     # the trap: 1/9 > 10 %, nothing is ever ejected
    (18, 5, 10, 1),    # 1/18 ok, 2/18 > 10 %
])
def test_max_ejection_percent_when_part_of_the_pool_fails(pool: int, failing: int, pct: int, enforced: int) -> None:
    d = OutlierDetector(OutlierPolicy(consecutive_gateway_errors=3, max_ejection_percent=pct))
    keys = [f"h{i}" for i in range(pool)]
    d.set_pool(keys)
    events = [e for k in keys[:failing] for _ in range(3) for e in d.record(k, Outcome.CONNECT_FAILURE, 1.0)]
    got = [e for e in events if isinstance(e, EndpointEjected)]
    assert sum(e.enforced for e in got) == enforced
    assert len(got) == failing  # every one was detected
    assert d.stats.overflow == failing - enforced


def test_expired_ejection_frees_budget_for_the_next() -> None:
    d = OutlierDetector(OutlierPolicy(consecutive_5xx_errors=1, max_ejection_percent=50))
    d.set_pool(["a", "b"])
    d.record("a", Outcome.HTTP_5XX, 0.0)
    [ev] = d.record("b", Outcome.HTTP_5XX, 1.0)
    assert isinstance(ev, EndpointEjected) and not ev.enforced
    events = d.record("b", Outcome.HTTP_5XX, 31.0)
    assert [type(e) for e in events] == [EndpointUnejected, EndpointEjected]
    assert d.ejected_keys(31.0) == {"b"}


def test_disabled_detectors() -> None:
    d = detector(consecutive_5xx_errors=0, consecutive_gateway_errors=None)
    assert fail(d, "ep-8", 50, 0.0, Outcome.CONNECT_FAILURE) == []


def test_set_pool_forgets_removed_hosts() -> None:
    d = detector()
    fail(d, "ep-9", 3, 0.0)
    d.set_pool(["ep-0"])
    assert d.pool_size == 1 and not d.is_ejected("ep-9", 0.0)
