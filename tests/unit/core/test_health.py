"""The health vote (federation.core.health): a quorum of fresh observers ejects an endpoint for
everyone; one confused proxy cannot; only proxies whose config routes to an endpoint vote on it;
reports age out; the state stays bounded; the verdict says why in words."""

from __future__ import annotations

import pytest

from federation.core.health import (
    EndpointReport,
    HealthAggregator,
    HealthKey,
    HealthVerdict,
    l7_reach,
    observable,
)
from ztunnel.api.config import (
    Endpoint,
    HttpBackend,
    HttpRoute,
    HttpRouteRule,
    ProxyConfig,
    ProxyMode,
    Service,
    Stamp,
    WaypointRef,
)

P1: HealthKey = ("checkout", "east/p1")


def observing(agg: HealthAggregator, n: int, keys: tuple[HealthKey, ...] = (P1,)) -> HealthAggregator:
    """Proxies ztunnel/west/n0..n{n-1} route to `keys` (their rendered configs contain them)."""
    for i in range(n):
        agg.set_view(f"ztunnel/west/n{i}", keys)
    return agg


@pytest.mark.parametrize(("ejecting", "observers", "unhealthy"), [
    (0, 3, False), (1, 3, False), (2, 3, True), (3, 3, True), (1, 2, True), (1, 1, True),
])
def test_global_outlier_needs_a_quorum_of_observers(ejecting: int, observers: int, unhealthy: bool) -> None:
    agg = observing(HealthAggregator(quorum_fraction=0.5, min_observers=1, report_ttl_s=30), observers)
    for i in range(observers):
        agg.report(f"ztunnel/west/n{i}", [EndpointReport("checkout", "east/p1", "east", 0, 5, i < ejecting)], now_s=0)
    assert (("checkout", "east/p1") in agg.unhealthy(now_s=1)) is unhealthy


@pytest.mark.parametrize(("ejecting", "observers", "min_observers", "unhealthy"), [
    (1, 1, 2, False),   # the only reporter ejects, but one is not enough (five proxies route to it)
    (2, 2, 2, True),
    (2, 4, 2, True),    # 2 of 4 = the 50 % quorum, and 2 observers
    (2, 5, 2, False),   # 2 of 5 < 50 %
])
def test_min_observers(ejecting: int, observers: int, min_observers: int, unhealthy: bool) -> None:
    agg = observing(HealthAggregator(quorum_fraction=0.5, min_observers=min_observers, report_ttl_s=30), 5)
    for i in range(observers):
        agg.report(f"ztunnel/west/n{i}", [EndpointReport("checkout", "east/p1", "east", 0, 5, i < ejecting)], now_s=0)
    assert (("checkout", "east/p1") in agg.unhealthy(now_s=1)) is unhealthy


def test_reports_expire() -> None:
    agg = observing(HealthAggregator(report_ttl_s=10), 1)
    agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 0, 5, True)], now_s=0)
    assert agg.unhealthy(now_s=5) and not agg.unhealthy(now_s=11)
    assert agg.views == {}  # an endpoint nobody reported on within the TTL is forgotten


def test_only_fresh_observers_count() -> None:
    agg = observing(HealthAggregator(quorum_fraction=0.5, min_observers=1, report_ttl_s=10), 3)
    agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 0, 5, False)], now_s=0)
    agg.report("ztunnel/west/n1", [EndpointReport("checkout", "east/p1", "east", 0, 5, False)], now_s=0)
    agg.report("ztunnel/west/n2", [EndpointReport("checkout", "east/p1", "east", 0, 5, True)], now_s=8)
    assert not agg.unhealthy(now_s=9)                       # 1 of 3
    assert agg.unhealthy(now_s=11) == {("checkout", "east/p1")}  # the two healthy views aged out: 1 of 1


def test_describe_gives_the_vote() -> None:
    agg = observing(HealthAggregator(quorum_fraction=0.5, min_observers=1, report_ttl_s=30), 3)
    agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 1, 4, True)], now_s=0)
    agg.report("ztunnel/west/n1", [EndpointReport("checkout", "east/p1", "east", 2, 3, True)], now_s=0)
    agg.report("ztunnel/west/n2", [EndpointReport("checkout", "east/p1", "east", 9, 0, False)], now_s=0)
    assert agg.describe(("checkout", "east/p1"), now_s=1) == (
        "health reports: 2 of 3 proxies observing east/p1 eject it (quorum 50%, at least 1; 7 failed requests "
        "reported)")


def test_verdict_describes_what_it_ejects_and_what_it_was_asked_about() -> None:
    agg = observing(HealthAggregator(report_ttl_s=30), 1, (P1, ("checkout", "east/p2")))
    agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 0, 5, True),
                                   EndpointReport("checkout", "east/p2", "east", 5, 0, False)], now_s=0)
    v = agg.verdict(now_s=1, also=[("checkout", "east/p2")])
    assert isinstance(v, HealthVerdict)
    assert v.unhealthy == {("checkout", "east/p1")}
    assert set(v.triggers) == {("checkout", "east/p1"), ("checkout", "east/p2")}
    assert v.triggers[("checkout", "east/p1")].startswith("health reports: 1 of 1 proxies observing east/p1")
    assert v.triggers[("checkout", "east/p2")].startswith("health reports: 0 of 1 proxies observing east/p2")


# --- poisoning: who may vote, how many must agree, bounded state ---------------------------------


def test_a_single_confused_proxy_cannot_eject_for_the_whole_mesh() -> None:
    """The default vote: three proxies route to east/p1; one of them (confused, or whoever holds
    its credentials) says it ejects it and nobody else reports. Not enough: it takes two."""
    agg = observing(HealthAggregator(), 3)
    agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 0, 50, True)], now_s=0)
    assert agg.unhealthy(now_s=1) == frozenset()
    assert agg.describe(P1, now_s=1).startswith("health reports: 1 of 1 proxies observing east/p1 eject it "
                                                "(quorum 50%, at least 2;")
    # a second observer agrees: a real quorum
    agg.report("ztunnel/west/n1", [EndpointReport("checkout", "east/p1", "east", 0, 9, True)], now_s=2)
    assert agg.unhealthy(now_s=3) == {P1}


def test_the_only_proxy_that_routes_to_an_endpoint_decides_alone() -> None:
    """No second opinion exists: one observer's ejection is the whole vote (it hurts nobody else)."""
    agg = observing(HealthAggregator(), 1)
    agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 0, 5, True)], now_s=0)
    assert agg.unhealthy(now_s=1) == {P1}


def test_reports_on_endpoints_outside_the_reporters_config_do_not_count() -> None:
    agg = observing(HealthAggregator(), 3)
    agg.set_view("ztunnel/south/n0", [("checkout", "south/p9")])
    for pid in ("ztunnel/south/n0", "gateway/evil", "ztunnel/east/nobody"):  # none routes to east/p1
        touched = agg.report(pid, [EndpointReport("checkout", "east/p1", "east", 0, 99, True)], now_s=0)
        assert touched == set()
    assert agg.unhealthy(now_s=1) == frozenset() and agg.views == {}
    assert agg.ignored_reports == 3


def test_state_is_bounded_by_the_rendered_views() -> None:
    """A reporter flooding reports on endpoints it invents leaves nothing behind; a view that
    shrinks, or a proxy that leaves the render, takes its votes with it."""
    agg = observing(HealthAggregator(), 2, (P1, ("checkout", "east/p2")))
    flood = [EndpointReport("checkout", f"east/x{i}", "east", 0, 1, True) for i in range(10_000)]
    agg.report("ztunnel/west/n0", flood, now_s=0)
    assert agg.views == {} and agg.ignored_reports == 10_000
    for pid in ("ztunnel/west/n0", "ztunnel/west/n1"):
        agg.report(pid, [EndpointReport("checkout", "east/p1", "east", 0, 5, True),
                         EndpointReport("checkout", "east/p2", "east", 0, 5, True)], now_s=1)
    assert agg.unhealthy(now_s=2) == {P1, ("checkout", "east/p2")}
    assert agg.counters()["health_votes"] == 4
    agg.set_view("ztunnel/west/n1", [P1])             # its config no longer routes to east/p2
    assert set(agg.views[("checkout", "east/p2")]) == {"ztunnel/west/n0"}
    assert agg.unhealthy(now_s=2) == {P1, ("checkout", "east/p2")}   # n0 is now its only observer
    agg.forget_proxy("ztunnel/west/n0")
    assert agg.unhealthy(now_s=2) == {P1}                           # n1 alone routes to p1 now
    assert set(agg.proxy_views) == {"ztunnel/west/n1"} and set(agg.observers) == {P1}
    agg.forget_proxy("ztunnel/west/n1")
    assert agg.views == {} and agg.observers == {} and agg.proxy_views == {}


def test_failed_counts_are_those_of_fresh_votes_only() -> None:
    agg = observing(HealthAggregator(report_ttl_s=10), 1)
    for t in (0, 1, 2):
        agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 0, 4, True)], now_s=t)
    assert agg.describe(P1, now_s=3).endswith("12 failed requests reported)")
    agg.report("ztunnel/west/n0", [EndpointReport("checkout", "east/p1", "east", 0, 1, True)], now_s=30)
    assert agg.describe(P1, now_s=30).endswith("1 failed requests reported)")   # the stale total is gone


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_observers"):
        HealthAggregator(min_observers=0)
    with pytest.raises(ValueError, match="quorum_fraction"):
        HealthAggregator(quorum_fraction=0.0)


def test_the_only_waypoint_decides_an_l7_failure_that_node_proxies_cannot_see() -> None:
    """A waypoint sees 503s; the node proxies and the gateway that also route to east/p1 see healthy
    connections. They must not outvote it nor be needed to confirm it: each layer votes among itself.
    Two waypoints: it takes both, as it takes two node proxies for an L4 failure."""
    agg = HealthAggregator()
    observers = ["ztunnel/east/node-1", "ztunnel/east/node-2", "gateway/east", "waypoint/east/shop/waypoint"]
    for p in observers:
        agg.set_view(p, [P1])
    for p in observers[:3]:
        agg.report(p, [EndpointReport("checkout", "east/p1", "east", 9, 0, False)], now_s=0)
    agg.report("waypoint/east/shop/waypoint", [EndpointReport("checkout", "east/p1", "east", 0, 9, True)], now_s=0)
    assert agg.unhealthy(now_s=1) == {P1}
    agg.set_view("waypoint/west/shop/waypoint", [P1])   # a second L7 observer: now it takes two
    assert agg.unhealthy_among([P1], now_s=1) == frozenset()
    agg.report("waypoint/west/shop/waypoint", [EndpointReport("checkout", "east/p1", "east", 0, 3, True)], now_s=1)
    assert agg.unhealthy(now_s=2) == {P1}
    # and one L4 proxy alone still cannot eject for the mesh
    l4 = HealthAggregator()
    for p in observers[:3]:
        l4.set_view(p, [P1])
    l4.report("ztunnel/east/node-1", [EndpointReport("checkout", "east/p1", "east", 0, 9, True)], now_s=0)
    assert l4.unhealthy(now_s=1) == frozenset()


# --- what an L7 proxy observes: what it sends requests to, not its whole config ------------------


def _svc(name: str, ns: str, waypoint: str | None, pods: tuple[str, ...]) -> Service:
    ref = WaypointRef(waypoint, ns, f"spiffe://east.mesh.local/ns/{ns}/sa/{waypoint}") if waypoint else None
    return Service(f"{name}.{ns}.svc.clusterset.local", ns, name, "", (),
                   tuple(Endpoint(f"east/{ns}/{p}", "east", "net", "10.0.0.1", 8080, "10.0.0.9:15008") for p in pods),
                   waypoint=ref)


# east's service table, as every proxy of east gets it: checkout behind shop's waypoint, my-service
# behind my-app's, llm without a waypoint
TABLE = (_svc("checkout", "shop", "waypoint", ("checkout-0",)), _svc("my-service", "my-app", "waypoint", ("ms-0",)),
         _svc("llm", "ai", None, ("llm-0",)))
CO: HealthKey = ("checkout.shop.svc.clusterset.local", "east/shop/checkout-0")


def _l7(pid: str, routes_to: tuple[str, ...] = ()) -> ProxyConfig:
    route = HttpRoute("ns", "r", "HTTPRoute", ("Service/x:80",),
                      (HttpRouteRule(backends=tuple(HttpBackend("Service", h, 80) for h in routes_to)),))
    mode = ProxyMode.WAYPOINT if pid.startswith("waypoint/") else ProxyMode.INGRESS
    return ProxyConfig(pid, mode, "east", "net", "east.mesh.local", Stamp(1, "a" * 40, 0), services=TABLE,
                       http_routes=(route,) if routes_to else ())


def test_an_l7_proxy_observes_what_it_fronts_and_its_routes_backends_only() -> None:
    shop = _l7("waypoint/east/shop/waypoint")
    my_app = _l7("waypoint/east/my-app/waypoint", routes_to=("llm.ai.svc.clusterset.local",))
    ingress = _l7("ingress/east/ai/gw", routes_to=("llm.ai.svc.clusterset.local",))
    assert l7_reach(shop) == {"checkout.shop.svc.clusterset.local"}
    assert l7_reach(my_app) == {"my-service.my-app.svc.clusterset.local", "llm.ai.svc.clusterset.local"}
    assert l7_reach(ingress) == {"llm.ai.svc.clusterset.local"}
    assert observable(shop) == {CO}
    # a node proxy with the same table observes all of it (it dials any endpoint it routes to)
    node = ProxyConfig("ztunnel/east/n1", ProxyMode.NODE, "east", "net", "east.mesh.local", Stamp(1, "a" * 40, 0),
                       services=TABLE)
    assert len(observable(node)) == 3


def test_the_waypoint_in_the_path_ejects_although_every_l7_proxy_of_its_cluster_carries_the_service() -> None:
    """Issue 14's regression, at the core: east's shop waypoint sees checkout-0 answer 503 and
    ejects it; the my-app waypoint and the ingress carry checkout too but never send to it. Counted
    as observers they made two L7 votes necessary where one proxy could see: no ejection, ever."""
    configs = [_l7("waypoint/east/shop/waypoint"), _l7("waypoint/east/my-app/waypoint"), _l7("ingress/east/ai/gw")]
    agg = HealthAggregator()
    for cfg in configs:
        agg.set_view(cfg.proxy_id, observable(cfg))
    agg.report("waypoint/east/shop/waypoint", [EndpointReport(CO[0], CO[1], "east", 0, 3, True)], now_s=0)
    assert agg.unhealthy(now_s=1) == {CO}
    # and the others' reports on it are not votes
    for cfg in configs[1:]:
        assert agg.report(cfg.proxy_id, [EndpointReport(CO[0], CO[1], "east", 0, 3, True)], now_s=1) == set()


def test_two_l7_proxies_that_send_to_an_endpoint_need_both_one_confused_cannot_eject() -> None:
    """The ingress routes to llm, and so does my-app's waypoint: two L7 observers of llm-0. One of
    them ejecting it is not a quorum; both are."""
    agg = HealthAggregator()
    for cfg in (_l7("waypoint/east/my-app/waypoint", routes_to=("llm.ai.svc.clusterset.local",)),
                _l7("ingress/east/ai/gw", routes_to=("llm.ai.svc.clusterset.local",))):
        agg.set_view(cfg.proxy_id, observable(cfg))
    llm: HealthKey = ("llm.ai.svc.clusterset.local", "east/ai/llm-0")
    agg.report("ingress/east/ai/gw", [EndpointReport(llm[0], llm[1], "east", 0, 30, True)], now_s=0)
    assert agg.unhealthy(now_s=1) == frozenset()
    assert agg.describe(llm, now_s=1).startswith(
        "health reports: 0 of 0 L4 proxies and 1 of 1 L7 proxies (waypoints, ingresses) observing east/ai/llm-0 "
        "eject it (each layer by itself: quorum 50%, at least 1 and 2;")
    agg.report("waypoint/east/my-app/waypoint", [EndpointReport(llm[0], llm[1], "east", 0, 3, True)], now_s=1)
    assert agg.unhealthy(now_s=2) == {llm}
