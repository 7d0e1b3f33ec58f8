"""Failover engine: tier assignment, health-verdict ejections -> FailedOver/FailedBack, partition
freeze/withdraw."""

from __future__ import annotations

import pytest

from clusters.kube.observation import EndpointInfo
from federation.core.events import (
    ClusterFenced,
    ClusterLeaseExpired,
    ClusterRecovered,
    EndpointEjected,
    EndpointUnejected,
    FailedBack,
    FailedOver,
)
from federation.core.failover import (
    EjectionReason,
    FailoverEngine,
    InvalidLeaseTransition,
    LeaseEvent,
    LeaseState,
    Locality,
    ServiceView,
    aggregate_uid,
    build_engine,
    next_lease_state,
)
from federation.core.offline import offline_observations
from gitops.model import PartitionMode, TrafficPolicy
from tests.unit.core import factory as f

NET = "topology.istio.io/network"
CLU = "topology.istio.io/cluster"
REG = "topology.kubernetes.io/region"
ZONE = "topology.kubernetes.io/zone"


def engine_for(policy: TrafficPolicy | None = None, **kw: object) -> FailoverEngine:
    snap = f.fleet(checkout_policy=policy, **kw)  # type: ignore[arg-type]
    return build_engine(snap, offline_observations(snap))


def src(e: FailoverEngine, cluster: str) -> Locality:
    cv = e.graph.clusters[cluster]
    return Locality(cv.network, cluster, cv.region, cv.zone)


def tiers_by_cluster(view: ServiceView) -> dict[str, int]:
    out: dict[str, int] = {}
    for ep in view.endpoints:
        out[ep.cluster] = min(out.get(ep.cluster, 99), ep.tier)
    return out


@pytest.mark.parametrize("priority, source, expected", [
    # Istio: raw priority = n - (leading labels matched); dense from 0
    ((NET, REG), "east", {"east": 0, "south": 1, "west": 1}),
    ((REG, NET), "east", {"east": 0, "south": 1, "west": 2}),
    ((REG, NET), "west", {"west": 0, "east": 1, "south": 1}),
    ((REG,), "south", {"east": 0, "south": 0, "west": 1}),
    ((CLU,), "south", {"south": 0, "east": 1, "west": 1}),
    ((REG, ZONE), "east", {"east": 0, "south": 1, "west": 2}),
    ((f"{REG}=us-west",), "east", {"west": 0, "east": 1, "south": 1}),   # label=value override
    ((NET, REG), "west", {"west": 0, "east": 1, "south": 1}),
])
def test_failover_priority_tiers(priority: tuple[str, ...], source: str, expected: dict[str, int]) -> None:
    e = engine_for(TrafficPolicy(outlier_detection=f.outlier(), locality_lb=f.locality(priority)))
    assert tiers_by_cluster(e.view(f.CHECKOUT, src(e, source))) == expected


@pytest.mark.parametrize("rules, source, expected", [
    ((), "east", {"east": 0, "south": 1, "west": 2}),                      # same zone, same region, rest
    ((("us-west", "us-east"),), "west", {"west": 0, "east": 1, "south": 1}),
    ((("us-east", "us-west"),), "east", {"east": 0, "south": 1, "west": 2}),
])
def test_locality_failover_tiers(rules: tuple[tuple[str, str], ...], source: str, expected: dict[str, int]) -> None:
    e = engine_for(TrafficPolicy(outlier_detection=f.outlier(), locality_lb=f.locality(failover=rules)))
    assert tiers_by_cluster(e.view(f.CHECKOUT, src(e, source))) == expected


@pytest.mark.parametrize("policy", [
    TrafficPolicy(outlier_detection=None, locality_lb=f.locality((NET, REG))),  # no outlier detection
    TrafficPolicy(outlier_detection=f.outlier(), locality_lb=f.locality((NET, REG), enabled=False)),
])
def test_flat_without_outlier_detection_or_disabled(policy: TrafficPolicy) -> None:
    e = engine_for(policy)
    assert set(tiers_by_cluster(e.view(f.CHECKOUT, src(e, "east"))).values()) == {0}


def test_distribute_weights_and_exclusion() -> None:
    policy = TrafficPolicy(outlier_detection=f.outlier(), locality_lb=f.locality(
        distribute=[("us-east/*", {"us-east/us-east-1a": 80, "us-west/*": 20})]))
    e = engine_for(policy)
    view = e.view(f.CHECKOUT, src(e, "east"))
    weights = {ep.workload_uid: ep.weight for ep in view.endpoints}
    assert {ep.tier for ep in view.endpoints} == {0}
    # east: 2 pods share 80 % -> 400 each (scale 1000); west: one gateway aggregate gets 20 % -> 200
    assert weights == {"east/shop/checkout-0": 400, "east/shop/checkout-1": 400,
                       aggregate_uid("west", f.CHECKOUT): 200}
    assert ("south", "distribute rule leaves out us-east/us-east-1b") in view.excluded


def test_cross_network_goes_through_gateway_same_network_direct() -> None:
    e = engine_for()
    view = e.view(f.CHECKOUT, src(e, "east"))
    by_uid = {ep.workload_uid: ep for ep in view.endpoints}
    local = by_uid["east/shop/checkout-0"]
    assert local.gateway == "" and local.hbone_address == "10.10.0.1:15008" and local.address == "10.10.1.10"
    remote = by_uid[aggregate_uid("west", f.CHECKOUT)]
    assert remote.gateway == "172.30.0.12:15008" and remote.address == "" and remote.weight == 2
    assert remote.identity == "spiffe://west.mesh.local/ns/shop/sa/checkout"


def test_untrusted_cluster_is_left_out_and_reported() -> None:
    e = engine_for(federates={"east": ["south"], "south": ["east"], "west": ["east"]})
    view = e.view(f.CHECKOUT, src(e, "east"))
    assert "west" not in tiers_by_cluster(view)
    assert [c for c, _ in view.excluded] == ["west"]
    codes = {p.code for p in e.trust.federation_problems()}
    assert codes == {"MF0405"}  # west lists east, east does not list west
    assert any("cluster east" in p.message and "west" in p.message for p in e.trust.route_problems())


CHECKOUT_HOST = "checkout.shop.svc.clusterset.local"


def quorum(e: FailoverEngine, cluster: str) -> frozenset[tuple[str, str]]:
    """The health verdict that ejects every checkout pod of `cluster` (what a quorum of proxies
    reports in a crash or a silent cut)."""
    return frozenset((CHECKOUT_HOST, ep.uid) for ep in e.graph.endpoints_in(f.CHECKOUT, cluster).values())


def eject_cluster(e: FailoverEngine, cluster: str, now_s: float) -> list[object]:
    unhealthy = quorum(e, cluster)
    changed, events = e.apply_health_verdict(unhealthy, now_s, {k: f"vote on {k[1]}" for k in unhealthy})
    assert changed == ({f.CHECKOUT} if unhealthy else set())
    return list(events)


def test_ejections_fail_over_and_back_with_provenance() -> None:
    e = engine_for()
    east = src(e, "east")
    assert e.evaluate(f.CHECKOUT, [e.view(f.CHECKOUT, east)], 0.0, "baseline") == []
    events = eject_cluster(e, "east", 1.0)
    ejected = [ev for ev in events if isinstance(ev, EndpointEjected)]
    assert [ev.endpoint for ev in ejected] == ["east/shop/checkout-0", "east/shop/checkout-1"]
    # a quorum ejection has no fixed end (the vote lifts it); routing obeys it
    assert all(ev.enforced and ev.until_s == 0.0 and ev.ejection_count == 1 for ev in ejected)
    assert {ev.reason for ev in ejected} == {"HealthReportQuorum"}
    prov = ejected[0].provenance
    assert (prov.policy, prov.file, prov.commit) == ("DestinationRule shop/checkout",
                                                      "policies/shop/checkout.yaml:3:1", f.SHA)
    assert prov.trigger == "vote on east/shop/checkout-0"
    view = e.view(f.CHECKOUT, east)
    assert [ep.healthy for ep in view.endpoints if ep.cluster == "east"] == [False, False]
    assert view.load(e.policies[f.CHECKOUT].panic_threshold_pct).shares == pytest.approx((0.0, 1.0))
    [over] = e.evaluate(f.CHECKOUT, [view], 1.0, "EndpointEjected east/shop/checkout-1")
    assert isinstance(over, FailedOver)
    assert over.to_clusters == ("south", "west") and over.provenance.commit == f.SHA
    assert e.tick(16.0) == []                      # no timer: ejections last until the vote lifts them
    changed, un = e.apply_health_verdict(frozenset(), 16.0)
    assert changed == {f.CHECKOUT}
    assert [type(ev) for ev in un] == [EndpointUnejected, EndpointUnejected]
    assert all(isinstance(ev, EndpointUnejected) and ev.ejected_for_s == 15.0 for ev in un)
    assert un[0].provenance.trigger == "health reports: the quorum no longer ejects east/shop/checkout-0"
    [back] = e.evaluate(f.CHECKOUT, [e.view(f.CHECKOUT, east)], 16.0, "ejection expired")
    assert isinstance(back, FailedBack) and back.shares == (1.0, 0.0)


def test_one_ejected_pod_spills_by_priority_load() -> None:
    e = engine_for()
    east = src(e, "east")
    e.evaluate(f.CHECKOUT, [e.view(f.CHECKOUT, east)], 0.0, "baseline")
    e.apply_health_verdict({(CHECKOUT_HOST, "east/shop/checkout-0")}, 1.0)
    view = e.view(f.CHECKOUT, east)
    # Envoy: tier 0 health = 1.4 × 1/2 = 70 %, the rest spills to tier 1 — as a not-ready pod would
    assert view.load(e.policies[f.CHECKOUT].panic_threshold_pct).shares == pytest.approx((0.7, 0.3))
    [over] = e.evaluate(f.CHECKOUT, [view], 1.0, "EndpointEjected east/shop/checkout-0")
    assert isinstance(over, FailedOver) and over.shares == pytest.approx((0.7, 0.3))


def test_an_ejection_counts_like_not_ready() -> None:
    """The same view, whether east's pods are ejected by the vote or not ready in the API."""
    ejected = engine_for()
    eject_cluster(ejected, "east", 1.0)
    snap = f.fleet()
    obs = [o if o.cluster != "east" else
           o.__class__(**{**{s: getattr(o, s) for s in o.__slots__},
                          "endpoints": tuple(flip(i, i.service != "checkout") for i in o.endpoints)})
           for o in offline_observations(snap)]
    not_ready = build_engine(snap, obs)
    for source in ("east", "south", "west"):
        a = ejected.view(f.CHECKOUT, src(ejected, source))
        b = not_ready.view(f.CHECKOUT, src(not_ready, source))
        assert [(x.workload_uid, x.tier, x.weight, x.healthy) for x in a.endpoints] == \
               [(x.workload_uid, x.tier, x.weight, x.healthy) for x in b.endpoints], source


def test_the_verdict_is_applied_idempotently_and_counts_repeat_ejections() -> None:
    e = engine_for()
    key = (CHECKOUT_HOST, "east/shop/checkout-0")
    _, first = e.apply_health_verdict({key}, 1.0)
    assert [type(ev) for ev in first] == [EndpointEjected]
    assert e.apply_health_verdict({key}, 2.0) == (set(), [])      # same verdict: nothing new
    assert e.ejections(f.CHECKOUT)["east/shop/checkout-0"].since_s == 1.0
    e.apply_health_verdict(frozenset(), 3.0)
    _, again = e.apply_health_verdict({key}, 4.0)
    assert isinstance(again[0], EndpointEjected) and again[0].ejection_count == 2
    ej = e.ejections(f.CHECKOUT)["east/shop/checkout-0"]
    assert ej.reason is EjectionReason.HEALTH_REPORT_QUORUM and ej.count == 2 and ej.since_s == 4.0


@pytest.mark.parametrize("key", [
    ("nosuch.shop.svc.clusterset.local", "east/shop/checkout-0"),   # a service the fleet does not define
    (CHECKOUT_HOST, "east/shop/checkout-9"),                        # a pod the graph does not know
    (CHECKOUT_HOST, "east/shop/cart-0"),                            # a pod of another service
    (CHECKOUT_HOST, "north/shop/checkout@gateway"),                 # no such cluster
])
def test_what_the_engine_cannot_route_is_left_out(key: tuple[str, str]) -> None:
    e = engine_for()
    assert e.apply_health_verdict({key}, 1.0) == (set(), [])
    assert e.ejected_endpoints() == frozenset()


def test_a_remote_clusters_gateway_aggregate_can_be_ejected() -> None:
    """Clients in other networks report against `<cluster>/<ns>/<svc>@gateway`."""
    e = engine_for()
    west_agg = aggregate_uid("west", f.CHECKOUT)
    _, [ev] = e.apply_health_verdict({(CHECKOUT_HOST, west_agg)}, 1.0)
    assert isinstance(ev, EndpointEjected) and ev.endpoint == west_agg
    remote = next(x for x in e.view(f.CHECKOUT, src(e, "east")).endpoints if x.workload_uid == west_agg)
    assert not remote.healthy
    # the pods behind it are not ejected: west's own gateway still routes to them
    assert all(x.healthy for x in e.gateway_endpoints(f.CHECKOUT, "west"))


def test_ejections_survive_a_rebuild_without_events_and_die_with_their_service() -> None:
    e = engine_for()
    eject_cluster(e, "east", 1.0)
    snap = f.fleet(sha="b" * 40)
    fresh = build_engine(snap, offline_observations(snap))
    fresh.restore_ejections(e)
    assert fresh.ejected(f.CHECKOUT) == {"east/shop/checkout-0", "east/shop/checkout-1"}
    assert fresh.apply_health_verdict(quorum(fresh, "east"), 2.0) == (set(), [])
    gone = build_engine(f.fleet(clusters=f.CLUSTERS[1:]), offline_observations(f.fleet(clusters=f.CLUSTERS[1:])))
    gone.restore_ejections(e)
    assert gone.ejected_endpoints() == frozenset()   # east left the fleet: nothing to eject


def test_panic_routes_to_all_hosts_of_a_tier() -> None:
    e = engine_for(TrafficPolicy(outlier_detection=f.outlier(min_health_percent=50),
                                 locality_lb=f.locality((NET, REG))), clusters=f.CLUSTERS[:1])
    eject_cluster(e, "east", 0.0)
    view = e.view(f.CHECKOUT, src(e, "east"))
    load = view.load(e.policies[f.CHECKOUT].panic_threshold_pct)
    assert load.panic == (True,) and load.shares == (1.0,)


def test_lease_transition_table() -> None:
    assert next_lease_state("a", LeaseState.LIVE, LeaseEvent.EXPIRE) is LeaseState.EXPIRED
    assert next_lease_state("a", LeaseState.EXPIRED, LeaseEvent.PARTIAL) is LeaseState.FENCED
    assert next_lease_state("a", LeaseState.FENCED, LeaseEvent.COMPLETE) is LeaseState.LIVE
    with pytest.raises(InvalidLeaseTransition):
        next_lease_state("a", LeaseState.EXPIRED, LeaseEvent.EXPIRE)


def flip(info: EndpointInfo, ready: bool) -> EndpointInfo:
    return EndpointInfo(info.namespace, info.service, info.pod, info.address, info.node, info.service_account,
                        info.ports, ready=ready, zone=info.zone, labels=info.labels)


@pytest.mark.parametrize("mode, visible_while_partitioned", [
    (PartitionMode.FREEZE, True),
    (PartitionMode.WITHDRAW, False),
])
def test_partition_freeze_withdraw_and_fencing(mode: PartitionMode, visible_while_partitioned: bool) -> None:
    snap = f.fleet(partition=mode, lease_ttl_s=30.0)
    obs = offline_observations(snap)
    e = build_engine(snap, obs)
    east = src(e, "east")
    assert e.tick(29.0) == []
    events = e.tick(30.0)
    assert [type(ev) for ev in events] == [ClusterLeaseExpired] * 3
    assert {ev.mode for ev in events if isinstance(ev, ClusterLeaseExpired)} == {mode.value}
    assert ("west" in tiers_by_cluster(e.view(f.CHECKOUT, east))) is visible_while_partitioned
    # west speaks again, partially: fenced, the partial update is NOT applied
    west_obs = next(o for o in obs if o.cluster == "west")
    checkout0 = next(i for i in west_obs.endpoints if i.pod == "checkout-0")
    change, ev = e.observe(f.observation("west", [flip(checkout0, False)], complete=False, at_s=31.0))
    assert [type(x) for x in ev] == [ClusterFenced] and not change
    assert e.lease_state("west") is LeaseState.FENCED
    assert all(ep.ready for ep in e.graph.endpoints_in(f.CHECKOUT, "west").values())
    assert ("west" in tiers_by_cluster(e.view(f.CHECKOUT, east))) is visible_while_partitioned
    # a fresh complete observation lifts the fence
    change, ev = e.observe(west_obs.__class__(**{**{s: getattr(west_obs, s) for s in west_obs.__slots__},
                                                  "observed_at_s": 32.0}))
    assert [type(x) for x in ev] == [ClusterRecovered]
    assert e.lease_state("west") is LeaseState.LIVE and f.CHECKOUT in change.services
    assert "west" in tiers_by_cluster(e.view(f.CHECKOUT, east))


def test_a_view_is_built_once_until_what_it_depends_on_changes() -> None:
    """A commit's failover evaluation and its render ask for the same views: the engine answers
    the second time from its last view of that source, until the service's endpoints or ejections,
    or the source's routability (leases), change."""
    e = build_engine(snap := f.fleet(partition=PartitionMode.WITHDRAW, lease_ttl_s=30.0), offline_observations(snap))
    east = src(e, "east")
    first = e.view(f.CHECKOUT, east)
    assert e.view(f.CHECKOUT, src(e, "east")) is first           # an equal source: the same view
    eject_cluster(e, "east", 1.0)                                 # ejections
    ejected = e.view(f.CHECKOUT, east)
    assert ejected is not first and not any(ep.healthy for ep in ejected.endpoints if ep.cluster == "east")
    for cluster in ("east", "south"):
        e.renew_lease(cluster, 29.0)
    e.tick(30.0)                                                  # west's lease expires: withdrawn
    withdrawn = e.view(f.CHECKOUT, east)
    assert "west" in tiers_by_cluster(ejected) and "west" not in tiers_by_cluster(withdrawn)
    south_obs = next(o for o in offline_observations(snap) if o.cluster == "south")
    checkout0 = next(i for i in south_obs.endpoints if i.pod == "checkout-0")
    e.observe(f.observation("south", [flip(checkout0, False)], complete=False, at_s=31.0))   # endpoints

    def south(v: ServiceView) -> list[int]:   # behind south's gateway: the aggregate weighs its ready pods
        return [ep.weight for ep in v.endpoints if ep.cluster == "south"]
    assert south(e.view(f.CHECKOUT, east)) == [south(withdrawn)[0] - 1]
