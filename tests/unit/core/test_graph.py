"""Endpoint graph (incremental observations), trust graph, offline observations."""

from __future__ import annotations

import pytest

from clusters.kube.observation import NodeInfo
from federation.core.graph import EndpointGraph, UnknownCluster, spiffe_id
from federation.core.offline import observation_from_lab, offline_observations
from federation.core.trust_graph import TrustGraph, identity_trust_domain
from tests.unit.core import factory as f

NODES = (NodeInfo("node-1", "10.10.0.1", zone="us-east-1a"), NodeInfo("node-2", "10.10.0.2", zone="us-east-1c"))


def graph_with_east() -> EndpointGraph:
    g = EndpointGraph(f.fleet())
    g.apply_observation(f.observation("east", [
        f.endpoint("shop", "checkout", "checkout-0", "10.10.1.10", "node-1"),
        f.endpoint("shop", "checkout", "checkout-1", "10.10.2.10", "node-2"),
        f.endpoint("shop", "cart", "cart-0", "10.10.1.11", "node-1"),
    ], NODES))
    return g


def test_placement_identity_and_locality() -> None:
    g = graph_with_east()
    ep = g.endpoints_in(f.CHECKOUT, "east")[("shop", "checkout", "checkout-1")]
    assert ep.uid == "east/shop/checkout-1"
    assert ep.identity == "spiffe://east.mesh.local/ns/shop/sa/checkout"
    assert (ep.network, ep.region, ep.zone, ep.node_address) == ("net-east", "us-east", "us-east-1c", "10.10.0.2")
    assert ep.hbone_address == "10.10.0.2:15008"
    assert g.gateways() == {"net-east": [("east", "172.30.0.11:15008")], "net-south": [("south", "172.30.0.13:15008")],
                            "net-west": [("west", "172.30.0.12:15008")]}


@pytest.mark.parametrize("complete, expect_pods", [
    (True, ["checkout-0"]),                   # complete: what is absent is pruned
    (False, ["checkout-0", "checkout-1"]),    # partial: only upserts
])
def test_complete_vs_partial(complete: bool, expect_pods: list[str]) -> None:
    g = graph_with_east()
    change = g.apply_observation(f.observation("east", [
        f.endpoint("shop", "checkout", "checkout-0", "10.10.1.10", "node-1", ready=False),
        f.endpoint("shop", "cart", "cart-0", "10.10.1.11", "node-1"),
    ], NODES, complete=complete))
    assert sorted(k[2] for k in g.endpoints_in(f.CHECKOUT, "east")) == expect_pods
    assert change.services == {f.CHECKOUT}          # cart unchanged: not touched
    assert not g.endpoints_in(f.CHECKOUT, "east")[("shop", "checkout", "checkout-0")].ready


def test_readiness_change_touches_service_not_node() -> None:
    g = graph_with_east()
    change = g.apply_observation(f.observation("east", [
        f.endpoint("shop", "cart", "cart-0", "10.10.1.11", "node-1", ready=False)], complete=False))
    assert change.services == {f.CART} and change.nodes == frozenset()


def test_removed_endpoints_and_node_moves() -> None:
    g = graph_with_east()
    change = g.apply_observation(f.observation("east", [], complete=False, removed=[("shop", "cart", "cart-0")]))
    assert change.services == {f.CART} and change.nodes == {("east", "node-1")}
    assert g.endpoints_in(f.CART, "east") == {}
    change = g.apply_observation(f.observation("east", [
        f.endpoint("shop", "checkout", "checkout-0", "10.10.1.10", "node-2")], complete=False))
    assert change.nodes == {("east", "node-1"), ("east", "node-2")}
    assert list(g.workloads_on("east", "node-2")) == [("shop", "checkout", "checkout-1"), ("shop", "checkout", "checkout-0")]


def test_not_exported_endpoints_are_workloads_only() -> None:
    g = EndpointGraph(f.fleet())
    g.apply_observation(f.observation("south", [f.endpoint("shop", "cart", "cart-0", "10.30.1.10", "node-1")],
                                      (NodeInfo("node-1", "10.30.0.1"),)))
    assert g.endpoints_in(f.CART, "south") == {}      # cart is not exported from south
    assert list(g.workloads_on("south", "node-1")) == [("shop", "cart", "cart-0")]


def test_unknown_cluster_says_what_to_do() -> None:
    with pytest.raises(UnknownCluster, match=r"add clusters/north\.yaml"):
        EndpointGraph(f.fleet()).apply_observation(f.observation("north", []))


def test_offline_observations_are_deterministic() -> None:
    snap = f.fleet()
    a, b = offline_observations(snap), offline_observations(snap)
    assert a == b
    east = observation_from_lab(snap, snap.lab_clusters["east"])
    assert [(n.name, n.address) for n in east.nodes] == [("node-1", "10.10.0.1"), ("node-2", "10.10.0.2")]
    pods = {e.pod: (e.address, e.node, e.service) for e in east.endpoints}
    assert pods["checkout-0"] == ("10.10.1.10", "node-1", "checkout")
    assert pods["checkout-1"] == ("10.10.2.10", "node-2", "checkout")
    assert pods["frontend-0"][2] == ""           # a client: backs no service
    assert east.complete and {e.labels["app"] for e in east.endpoints} >= {"checkout", "frontend"}


@pytest.mark.parametrize("federates, a, b, trusted", [
    ({"east": ["west"], "west": ["east"]}, "east", "west", True),
    ({"east": ["west"], "west": []}, "east", "west", False),   # one-sided: nothing crosses
    ({"east": [], "west": ["east"]}, "west", "east", False),
    ({}, "east", "east", True),                                  # own trust domain
])
def test_trust_is_mutual(federates: dict[str, list[str]], a: str, b: str, trusted: bool) -> None:
    t = TrustGraph(f.fleet(federates=federates))
    assert t.clusters_trust(a, b) is trusted
    assert t.accepts_identity(a, spiffe_id(f"{b}.mesh.local", "shop", "x")) is trusted
    assert (f"{b}.mesh.local" in t.bundle_set(a)) is trusted


def test_trust_problems_name_the_fix() -> None:
    t = TrustGraph(f.fleet(federates={"east": ["west", "south"], "west": ["east"], "south": []}))
    [one_sided] = t.federation_problems()
    assert one_sided.code == "MF0405" and "south.mesh.local" in one_sided.message
    assert "trust/south.mesh.local.yaml" in one_sided.hint
    routes = t.route_problems()
    assert {p.code for p in routes} == {"MF0406"}
    assert any("clients in cluster south" in p.message for p in routes)
    assert t.accepted_from("east", "west", ["spiffe://west.mesh.local/ns/a/sa/b", "spiffe://x/ns/a/sa/b"]) == (
        "spiffe://west.mesh.local/ns/a/sa/b",)


def test_identity_trust_domain() -> None:
    assert identity_trust_domain("spiffe://east.mesh.local/ns/a/sa/b") == "east.mesh.local"
    assert identity_trust_domain("east.mesh.local/ns/a/sa/b") == "east.mesh.local"
    assert identity_trust_domain("nonsense") is None
