"""Failover engine: tier assignment, ejections -> FailedOver/FailedBack, partition freeze/withdraw."""

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
from ztunnel.api.outlier import Outcome

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


def eject_cluster(e: FailoverEngine, cluster: str, now_s: float) -> list[object]:
    events: list[object] = []
    for uid in sorted(ep.uid for ep in e.graph.endpoints_in(f.CHECKOUT, cluster).values()):
        for _ in range(3):  # consecutiveGatewayErrors 3
            events.extend(e.record_outcome("checkout.shop.svc.clusterset.local", uid, Outcome.CONNECT_FAILURE, now_s))
    return events


def test_ejections_fail_over_and_back_with_provenance() -> None:
    e = engine_for()
    east = src(e, "east")
    assert e.evaluate(f.CHECKOUT, [e.view(f.CHECKOUT, east)], 0.0, "baseline") == []
    events = eject_cluster(e, "east", 1.0)
    ejected = [ev for ev in events if isinstance(ev, EndpointEjected)]
    assert [ev.endpoint for ev in ejected] == ["east/shop/checkout-0", "east/shop/checkout-1"]
    assert all(ev.enforced and ev.until_s == 16.0 for ev in ejected)
    prov = ejected[0].provenance
    assert (prov.policy, prov.file, prov.commit) == ("DestinationRule shop/checkout",
                                                      "policies/shop/checkout.yaml:3:1", f.SHA)
    assert "ConsecutiveGatewayErrors" in prov.trigger
    view = e.view(f.CHECKOUT, east)
    assert [ep.healthy for ep in view.endpoints if ep.cluster == "east"] == [False, False]
    assert view.load(e.policies[f.CHECKOUT].panic_threshold_pct).shares == pytest.approx((0.0, 1.0))
    [over] = e.evaluate(f.CHECKOUT, [view], 1.0, "EndpointEjected east/shop/checkout-1")
    assert isinstance(over, FailedOver)
    assert over.to_clusters == ("south", "west") and over.provenance.commit == f.SHA
    un = e.tick(16.0)
    assert [type(ev) for ev in un] == [EndpointUnejected, EndpointUnejected]
    [back] = e.evaluate(f.CHECKOUT, [e.view(f.CHECKOUT, east)], 16.0, "ejection expired")
    assert isinstance(back, FailedBack) and back.shares == (1.0, 0.0)


@pytest.mark.parametrize("replicas, max_pct, enforced", [
    # pool = checkout pods in 3 clusters + 3 gateway aggregates: 9 with 2 replicas, 18 with 5
    (2, 100, 2),
    (2, 50, 2),
    (2, 20, 1),     # 1/9 = 11 % ok, 2/9 = 22 % > 20 %
    (2, 10, 0),     # the trap: 1/9 > 10 %, nothing is ever ejected
    (5, 10, 1),     # 1/18 ok, 2/18 > 10 %
])
def test_max_ejection_percent_on_the_service_pool(replicas: int, max_pct: int, enforced: int) -> None:
    e = engine_for(TrafficPolicy(outlier_detection=f.outlier(max_ejection_percent=max_pct),
                                 locality_lb=f.locality((NET, REG))), replicas={"checkout": replicas})
    events = eject_cluster(e, "east", 1.0)
    got = [ev for ev in events if isinstance(ev, EndpointEjected)]
    assert sum(ev.enforced for ev in got) == enforced
    assert len(got) == replicas  # every one was detected
    det = e.detector(f.CHECKOUT)
    assert det is not None and det.stats.overflow == replicas - enforced


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
