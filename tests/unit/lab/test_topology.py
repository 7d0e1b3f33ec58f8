"""The lab's address plan and build actions are pure: these tests check the layout the lab relies on."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusters.lab.faults import FaultError, FaultRequest, Rule, Signal, plan_fault
from clusters.lab.topology import (
    FORBIDDEN_NET,
    MAX_IFNAME,
    AddAddress,
    AddBridge,
    AddRoute,
    AddVeth,
    Iptables,
    PlanError,
    plan_lab,
)
from gitops.model import EastWestGateway
from tests.unit.lab.fleet_fixture import cluster, fleet


@pytest.fixture(scope="module")
def plan():  # type: ignore[no-untyped-def]
    c, lab, svcs = fleet()
    return plan_lab(c, lab, svcs)


def test_every_cluster_gets_nodes_pods_and_gateway_from_its_own_ranges(plan) -> None:  # type: ignore[no-untyped-def]
    for c in plan.clusters:
        pod_net = ipaddress.ip_network(c.pod_cidr)
        assert c.gateway is not None
        assert ipaddress.ip_address(c.gateway.cluster_address) in ipaddress.ip_network(c.node_cidr)
        for n in c.nodes:
            assert ipaddress.ip_address(n.address) in ipaddress.ip_network(c.node_cidr)
            assert ipaddress.ip_network(n.pod_cidr).subnet_of(pod_net)  # type: ignore[arg-type]
        for p in c.pods:
            node = c.node(p.node)
            assert ipaddress.ip_address(p.address) in ipaddress.ip_network(node.pod_cidr)
            assert p.gateway == node.pod_gateway


def test_addresses_are_unique_and_never_in_the_reserved_range(plan) -> None:  # type: ignore[no-untyped-def]
    addrs = [a.cidr.split("/")[0] for a in plan.actions if isinstance(a, AddAddress)]
    mgmt = [a for a in addrs if a.startswith("100.64.")]
    assert len(set(addrs)) == len(addrs), "an address is assigned twice"
    assert len(mgmt) == len(set(mgmt))
    assert not any(ipaddress.ip_address(a) in FORBIDDEN_NET for a in addrs)


def test_no_namespace_routes_to_another_clusters_pods(plan) -> None:  # type: ignore[no-untyped-def]
    owner = {ns: c for c in plan.clusters for ns in
             [n.netns for n in c.nodes] + [p.netns for p in c.pods] + ([c.gateway.netns] if c.gateway else [])}
    for a in plan.actions:
        if isinstance(a, AddRoute) and a.netns and a.dst != "default":
            dst = ipaddress.ip_network(a.dst)
            for other in plan.clusters:
                if other is not owner[a.netns]:
                    assert not dst.overlaps(ipaddress.ip_network(other.pod_cidr)), (a, other.name)


def test_the_gateway_forwards_only_hbone_from_its_cluster_network(plan) -> None:  # type: ignore[no-untyped-def]
    for c in plan.clusters:
        assert c.gateway is not None
        rules = [a.args for a in plan.actions if isinstance(a, Iptables) and a.netns == c.gateway.netns]
        assert ("-P", "FORWARD", "DROP") in rules
        accepts = [r for r in rules if r[:2] == ("-A", "FORWARD") and r[-1] == "ACCEPT" and "--ctstate" not in r]
        assert accepts == [("-A", "FORWARD", "-i", "eth0", "-o", "wan0", "-s", c.node_cidr, "-d", plan.wan_cidr,
                            "-p", "tcp", "--dport", "15008", "-j", "ACCEPT")]


def test_interface_names_fit_the_kernel_limit(plan) -> None:  # type: ignore[no-untyped-def]
    for a in plan.actions:
        if isinstance(a, AddVeth):
            assert len(a.name) <= MAX_IFNAME and len(a.peer) <= MAX_IFNAME
        if isinstance(a, AddBridge):
            assert len(a.name) <= MAX_IFNAME


def test_pods_resolve_through_the_cluster_dns_address_not_a_hosts_file(plan) -> None:  # type: ignore[no-untyped-def]
    """Kubelet's resolv.conf (dnsPolicy ClusterFirst) per pod namespace: the cluster DNS at .10 of
    the service range (kind's 10.96.0.10), the namespace's search list, ndots:5. The VIPs the
    Service objects carry start at .11, in the same order in every cluster."""
    assert not hasattr(plan, "hosts")
    east = plan.cluster("east")
    text = plan.resolv_confs[("east", "shop")]
    svc_net = ipaddress.ip_network(east.service_cidr)
    assert east.dns_address == str(svc_net.network_address + 10)
    assert text.splitlines() == ["search shop.svc.cluster.local svc.cluster.local cluster.local",
                                 f"nameserver {east.dns_address}", "options ndots:5"]
    vip = next(v for v in east.services if v.name == "checkout")
    assert ipaddress.ip_address(vip.cluster_ip) in svc_net and vip.cluster_ip != east.dns_address
    assert east.services[0].cluster_ip == str(svc_net.network_address + 11)
    for c in plan.clusters:
        assert [v.name for v in c.services] == [v.name for v in east.services]


def test_plan_is_deterministic() -> None:
    a, b = (plan_lab(*fleet()) for _ in range(2))
    assert a.actions == b.actions


@pytest.mark.parametrize("mutation, message", [
    (lambda c: replace(c, pod_cidrs=("10.255.0.0/16",)), "10.255.0.0/16"),
    # west's range on west's network: one network needs distinct ranges
    (lambda c: replace(c, pod_cidrs=("10.20.0.0/16",), network="net-west"), "on one network need distinct"),
    (lambda c: replace(c, service_cidrs=("10.20.0.0/16",), network="net-west"), "on one network need distinct"),
    (lambda c: replace(c, pod_cidrs=("172.30.0.0/16",)), "overlaps WAN"),
    (lambda c: replace(c, pod_cidrs=("100.64.0.0/16",)), "overlaps management"),
    (lambda c: replace(c, east_west_gateway=EastWestGateway("192.168.1.1")), "not on the lab WAN"),
    (lambda c: replace(c, east_west_gateway=EastWestGateway("172.30.0.12")), "both use gateway"),
    (lambda c: replace(c, pod_cidrs=("10.10.0.0/24",)), "too small"),
])
def test_bad_layouts_are_refused_with_the_fix(mutation, message) -> None:  # type: ignore[no-untyped-def]
    clusters, labs, svcs = fleet()
    clusters = dict(clusters)
    clusters["east"] = mutation(clusters["east"])
    with pytest.raises(PlanError, match=message):
        plan_lab(clusters, labs, svcs)


def _kind_defaults(shared: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any], dict[Any, Any]]:
    """The fixture fleet with kind's default ranges in every cluster (each on its own network), plus
    a fourth cluster `fra` on east's network with its own ranges when `shared` names it."""
    clusters, labs, svcs = fleet()
    out = {n: replace(c, pod_cidrs=("10.244.0.0/16",), service_cidrs=("10.96.0.0/12",)) for n, c in clusters.items()}
    labs = dict(labs)
    if "fra" in shared:
        c, lab = cluster("fra", 40, 14, "eu-central")
        out["fra"], labs["fra"] = replace(c, network=out["east"].network), lab
    return out, labs, dict(svcs)


def test_identical_ranges_on_different_networks_are_laid_out_apart() -> None:
    plan = plan_lab(*_kind_defaults())
    assert {c.pod_cidr for c in plan.clusters} == {"10.244.0.0/16"}
    assert {c.dns_address for c in plan.clusters} == {"10.96.0.10"}
    assert len({c.bridge for c in plan.clusters}) == 3, "each network its own L2 segment"
    # the same node and pod addresses in every cluster, in namespaces of their own
    assert len({n.address for c in plan.clusters for n in c.nodes}) == 2
    assert len(set(plan.netns_names)) == len(plan.netns_names)
    # what is shared stays unique: management legs and gateways' WAN addresses
    mgmt = [a.cidr for a in plan.actions if isinstance(a, AddAddress) and a.cidr.startswith("100.64.")]
    assert len(mgmt) == len(set(mgmt))
    assert len({c.gateway.wan_address for c in plan.clusters if c.gateway}) == 3
    # and no namespace routes anywhere but its own cluster (there is nothing else to reach)
    owner = {ns: c for c in plan.clusters for ns in [n.netns for n in c.nodes] + [p.netns for p in c.pods]}
    for a in plan.actions:
        if isinstance(a, AddRoute) and a.netns in owner and a.dst not in ("default", plan.wan_cidr):
            assert a.dst.startswith(("10.244.", "100.64.0.1/")), a


def test_clusters_on_one_network_share_a_bridge_and_route_to_each_others_pods_only() -> None:
    plan = plan_lab(*_kind_defaults(shared=("fra",)))
    east, fra, west = plan.cluster("east"), plan.cluster("fra"), plan.cluster("west")
    assert east.network == fra.network and east.bridge == fra.bridge != west.bridge
    bridges = [a.name for a in plan.actions if isinstance(a, AddBridge) and not a.netns]
    assert bridges.count(east.bridge) == 1

    def routes(ns: str) -> dict[str, AddRoute]:
        return {a.dst: a for a in plan.actions if isinstance(a, AddRoute) and a.netns == ns}

    for me, peer in ((east, fra), (fra, east)):
        for node in me.nodes:
            r = routes(node.netns)
            assert r[peer.node_cidr] == AddRoute(node.netns, peer.node_cidr, dev="eth0")  # on the shared bridge
            for pn in peer.nodes:
                assert r[pn.pod_cidr].via == pn.address
    for node in west.nodes:  # another network: nothing of east or fra
        assert not ({east.node_cidr, fra.node_cidr, fra.pod_cidr} & set(routes(node.netns)))
    for c in (east, fra):  # nothing of west's (identical) ranges is routed off the node network either
        for node in c.nodes:
            assert all(ipaddress.ip_network(d).subnet_of(ipaddress.ip_network(c.pod_cidr))  # type: ignore[arg-type]
                       or ipaddress.ip_network(d).subnet_of(ipaddress.ip_network(plan.cluster("fra" if c is east
                                                                                            else "east").pod_cidr))
                       for d in routes(node.netns) if d not in ("default", plan.wan_cidr, "100.64.0.1/32"))


def test_unknown_node_placement_is_refused() -> None:
    clusters, labs, svcs = fleet()
    labs = dict(labs)
    wl = replace(labs["east"].workloads[0], nodes=("node-9",))
    labs["east"] = replace(labs["east"], workloads=(wl,))
    with pytest.raises(PlanError, match="unknown node 'node-9'"):
        plan_lab(clusters, labs, svcs)


@settings(max_examples=25, deadline=None)
@given(n_clusters=st.integers(1, 6), nodes=st.integers(1, 4))
def test_any_size_lays_out_without_collisions(n_clusters: int, nodes: int) -> None:
    plan = plan_lab(*fleet(n_clusters, nodes))
    assert len(plan.clusters) == n_clusters
    assert len(set(plan.netns_names)) == len(plan.netns_names)
    pods = [p.address for c in plan.clusters for p in c.pods]
    assert len(set(pods)) == len(pods)


# --- faults (pure planning) --------------------------------------------------------------------


def test_killing_a_node_takes_its_pods_with_it(plan) -> None:  # type: ignore[no-untyped-def]
    steps = plan_fault(plan, FaultRequest("kill", "node", ("east/node-1",)))
    keys = {s.process for s in steps if isinstance(s, Signal)}
    on_node = {f"pod:{p.key}" for p in plan.cluster("east").pods if p.node == "node-1"}
    assert keys == {"ztunnel:east/node-1"} | on_node


@pytest.mark.parametrize("mode, verdict", [("drop", "DROP"), ("reject", "REJECT")])
def test_partitioning_pods_by_glob_cuts_both_directions(plan, mode, verdict) -> None:  # type: ignore[no-untyped-def]
    steps = plan_fault(plan, FaultRequest("partition", "pod", ("east/shop/checkout-*",), mode))
    pods = [p for p in plan.cluster("east").pods if p.name.startswith("checkout-") and "v2" not in p.name]
    for p in pods:
        node_ns = plan.cluster("east").node(p.node).netns
        mine = [s for s in steps if isinstance(s, Rule) and s.netns == node_ns and p.address in s.args]
        assert any("-d" in s.args and verdict in s.args for s in mine)
        assert any("-s" in s.args and verdict in s.args for s in mine)


def test_wan_partition_is_symmetric(plan) -> None:  # type: ignore[no-untyped-def]
    steps = plan_fault(plan, FaultRequest("partition", "wan", ("east", "west")))
    east, west = plan.cluster("east").gateway, plan.cluster("west").gateway
    assert east is not None and west is not None
    assert {s.netns for s in steps if isinstance(s, Rule)} == {east.netns, west.netns}


@pytest.mark.parametrize("req, message", [
    (FaultRequest("kill", "pod", ("nowhere/x",)), "no pod matches"),
    (FaultRequest("kill", "wan", ("east", "west")), "apply to processes"),
    (FaultRequest("explode", "pod", ("east/x",)), "unknown fault"),
    (FaultRequest("partition", "pod", ("east/shop/checkout-0",), mode="maybe"), "drop .* or reject"),
])
def test_impossible_faults_say_why(plan, req, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FaultError, match=message):
        plan_fault(plan, req)


def test_a_gateway_without_address_gets_one_from_the_lab_s_load_balancer() -> None:
    """The lab plays the cloud LB for clusters whose fleet leaves eastWestGateway.address out: an
    address from the top of the WAN, never one the fleet names, the same on every run; the kubelet
    publishes it in the gateway Service's status, where discovery reads it."""
    from clusters.lab.kubelet import desired_objects

    c, lab, svcs = fleet()
    c = {**c, "west": replace(c["west"], east_west_gateway=EastWestGateway(None))}
    p = plan_lab(c, lab, svcs)
    west = p.cluster("west")
    assert west.gateway is not None and west.gateway.address_from_cluster
    assert west.gateway.wan_address == "172.30.0.252"  # west sorts 3rd: the 3rd host address from the top (.254 down)
    assert not p.cluster("east").gateway.address_from_cluster  # type: ignore[union-attr]
    assert plan_lab(c, lab, svcs).cluster("west").gateway == west.gateway
    objs = desired_objects(west, {}, {})
    svc = objs["Service/meshfed-system/eastwest-gateway"]
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["status"]["loadBalancer"]["ingress"] == [{"ip": "172.30.0.252", "ipMode": "VIP"}]
    assert objs["Namespace//shop"]["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    assert "labels" not in objs["Namespace//meshfed-system"]["metadata"]  # meshfed's own: never enrolled
