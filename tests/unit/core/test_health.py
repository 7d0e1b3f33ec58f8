"""The health vote (federation.core.health): a quorum of fresh observers ejects an endpoint for
everyone; one confused proxy cannot; reports age out; the verdict says why in words."""

from __future__ import annotations

import pytest

from federation.core.health import EndpointReport, HealthAggregator, HealthVerdict


@pytest.mark.parametrize(("ejecting", "observers", "unhealthy"), [
    (0, 3, False), (1, 3, False), (2, 3, True), (3, 3, True), (1, 2, True), (1, 1, True),
])
def test_global_outlier_needs_a_quorum_of_observers(ejecting: int, observers: int, unhealthy: bool) -> None:
    agg = HealthAggregator(quorum_fraction=0.5, min_observers=1, report_ttl_s=30)
    for i in range(observers):
        agg.report(f"ztunnel/west/n{i}", [EndpointReport("checkout", "east/p1", "east", 0, 5, i < ejecting)], now_s=0)
    assert (("checkout", "east/p1") in agg.unhealthy(now_s=1)) is unhealthy


@pytest.mark.parametrize(("ejecting", "observers", "min_observers", "unhealthy"), [
    (1, 1, 2, False),   # the only observer ejects, but one is not enough
    (2, 2, 2, True),
    (2, 4, 2, True),    # 2 of 4 = the 50 % quorum, and 2 observers
    (2, 5, 2, False),   # 2 of 5 < 50 %
])
def test_min_observers(ejecting: int, observers: int, min_observers: int, unhealthy: bool) -> None:
    agg = HealthAggregator(quorum_fraction=0.5, min_observers=min_observers, report_ttl_s=30)
    for i in range(observers):
        agg.report(f"ztunnel/west/n{i}", [EndpointReport("checkout", "east/p1", "east", 0, 5, i < ejecting)], now_s=0)
    assert (("checkout", "east/p1") in agg.unhealthy(now_s=1)) is unhealthy


def test_reports_expire() -> None:
    agg = HealthAggregator(report_ttl_s=10)
    agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 0, 5, True)], now_s=0)
    assert agg.unhealthy(now_s=5) and not agg.unhealthy(now_s=11)
    assert agg.views == {}  # an endpoint nobody reported on within the TTL is forgotten


def test_only_fresh_observers_count() -> None:
    agg = HealthAggregator(quorum_fraction=0.5, report_ttl_s=10)
    agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 0, 5, False)], now_s=0)
    agg.report("ztunnel/west/n1", [EndpointReport("checkout", "east/p1", "east", 0, 5, False)], now_s=0)
    agg.report("ztunnel/west/n2", [EndpointReport("checkout", "east/p1", "east", 0, 5, True)], now_s=8)
    assert not agg.unhealthy(now_s=9)                       # 1 of 3
    assert agg.unhealthy(now_s=11) == {("checkout", "east/p1")}  # the two healthy views aged out: 1 of 1


def test_describe_gives_the_vote() -> None:
    agg = HealthAggregator(quorum_fraction=0.5, min_observers=1, report_ttl_s=30)
    agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 1, 4, True)], now_s=0)
    agg.report("ztunnel/west/n1", [EndpointReport("checkout", "east/p1", "east", 2, 3, True)], now_s=0)
    agg.report("ztunnel/west/n2", [EndpointReport("checkout", "east/p1", "east", 9, 0, False)], now_s=0)
    assert agg.describe(("checkout", "east/p1"), now_s=1) == (
        "health reports: 2 of 3 proxies observing east/p1 eject it (quorum 50%, at least 1; 7 failed requests "
        "reported)")


def test_verdict_describes_what_it_ejects_and_what_it_was_asked_about() -> None:
    agg = HealthAggregator(report_ttl_s=30)
    agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 0, 5, True),
                                   EndpointReport("checkout", "east/p2", "east", 5, 0, False)], now_s=0)
    v = agg.verdict(now_s=1, also=[("checkout", "east/p2")])
    assert isinstance(v, HealthVerdict)
    assert v.unhealthy == {("checkout", "east/p1")}
    assert set(v.triggers) == {("checkout", "east/p1"), ("checkout", "east/p2")}
    assert v.triggers[("checkout", "east/p1")].startswith("health reports: 1 of 1 proxies observing east/p1")
    assert v.triggers[("checkout", "east/p2")].startswith("health reports: 0 of 1 proxies observing east/p2")
