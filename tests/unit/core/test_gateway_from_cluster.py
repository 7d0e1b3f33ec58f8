"""A Cluster without eastWestGateway.address: its gateway is reached where the cluster's gateway
Service's load balancer says (discovery reads status.loadBalancer.ingress), and plan/explain say so."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from federation.core.explain import explain_service, explain_text
from federation.core.failover import build_engine
from federation.core.graph import EndpointGraph
from federation.core.offline import offline_observations
from federation.core.planning import plan_effects
from federation.core.render import Renderer
from gitops.model import ConfigSnapshot, EastWestGateway
from tests.unit.core import factory as f

CHECKOUT_HOST = "checkout.shop.svc.clusterset.local"


def west_from_cluster(snap: ConfigSnapshot, sha: str | None = None) -> ConfigSnapshot:
    clusters = dict(snap.clusters)
    clusters["west"] = replace(clusters["west"], east_west_gateway=EastWestGateway(None))
    out = replace(snap, clusters=MappingProxyType(clusters))
    return replace(out, revision=replace(out.revision, sha=sha)) if sha else out


def with_gateway(obs_list: list, cluster: str, address: str) -> list:  # type: ignore[type-arg]
    return [replace(o, gateway_address=address) if o.cluster == cluster else o for o in obs_list]


def test_the_address_comes_from_the_observation_and_moves_with_it() -> None:
    snap = west_from_cluster(f.fleet())
    graph = EndpointGraph(snap)
    obs = {o.cluster: o for o in offline_observations(snap)}
    assert graph.clusters["west"].gateway == "" and graph.clusters["west"].gateway_from_cluster
    change = graph.apply_observation(replace(obs["west"], gateway_address="172.18.255.201"))
    assert graph.clusters["west"].gateway == "172.18.255.201:15008"
    assert f.CHECKOUT in change.services and {"east", "south", "west"} <= change.node_set_changed
    graph.apply_observation(replace(obs["west"], gateway_address="172.18.255.202"))
    assert graph.clusters["west"].gateway == "172.18.255.202:15008"
    # the fleet's own address wins over what the cluster says
    assert EndpointGraph(f.fleet()).clusters["west"].gateway == "172.30.0.12:15008"


def test_until_the_cluster_reports_an_address_its_pods_are_not_routed_to() -> None:
    snap = west_from_cluster(f.fleet())
    unresolved = with_gateway(offline_observations(snap), "west", "")
    engine = build_engine(snap, unresolved)
    east_view = Renderer(engine).render_all()["ztunnel/east/node-1"]
    checkout = next(s for s in east_view.services if s.hostname == CHECKOUT_HOST)
    assert {e.cluster for e in checkout.endpoints} == {"east", "south"}
    engine = build_engine(snap, with_gateway(offline_observations(snap), "west", "172.18.255.201"))
    checkout = next(s for s in Renderer(engine).render_all()["ztunnel/east/node-1"].services
                    if s.hostname == CHECKOUT_HOST)
    [west] = [e for e in checkout.endpoints if e.cluster == "west"]
    assert west.gateway == "172.18.255.201:15008"


def test_explain_says_address_from_the_cluster() -> None:
    snap = west_from_cluster(f.fleet())
    offline = explain_text(explain_service(build_engine(snap, offline_observations(snap)), "checkout", "east"))
    assert "west [net-west us-west/us-west-2a] via east-west gateway (address from the cluster)" in offline
    assert "south [net-south us-east/us-east-1b] via east-west gateway 172.30.0.13:15008\n" in offline
    live = build_engine(snap, with_gateway(offline_observations(snap), "west", "172.18.255.201"))
    text = explain_text(explain_service(live, "checkout", "east"))
    assert "via east-west gateway 172.18.255.201:15008 (address from the cluster)" in text


def test_plan_says_address_from_the_cluster_when_the_fleet_drops_the_address() -> None:
    old = f.fleet()
    new = west_from_cluster(old, sha="d" * 40)
    effects = plan_effects(old, new, offline_observations(new))
    [gw] = [g for g in effects["clusters"]["west"]["gateways_touched"] if g["change"] == "address"]
    assert (gw["old"], gw["new"]) == ("172.30.0.12:15008", "(address from the cluster)")
