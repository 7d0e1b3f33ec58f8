"""The lab's address plan and the actions that build it — decided purely, executed elsewhere.

`plan_lab()` takes the fleet repo's `Cluster` and `LabCluster` objects and returns a `LabPlan`:
every namespace, bridge, veth, address and route the lab needs, plus a flat list of `Action`s in
build order. No I/O happens here (unit tests check the plan); `execute()` at the bottom is the one
place that turns actions into `ip` commands.

Shape of the lab (all inside the sandbox's own network stack):

```
 sandbox root ns:  br-wan (L2 only)   br-mgmt 100.64.0.1/16 (controller, API servers)   br-<c> (L2 only)
                      │                     │ /32 legs, one route each                     │
 <c>-gw  ns:  wan 172.30.0.11/24 ─── gateway process ─── eth0 10.10.0.2/24 (cluster network)
 <c>-<node> ns: eth0 10.10.0.1x/24 on br-<c>, cbr0 10.10.k.1/24 (the node's pod bridge), mgmt0
 <c>.<ns>.<pod> ns: eth0 10.10.k.x/24 on the node's cbr0, default via 10.10.k.1
```

Address plan per cluster, from its first pod CIDR (at least a /16 is needed: one /24 per node):
the first /24 is the cluster (node) network — gateway .2, node k at .(10+k); node k's pods live in
the k-th /24 behind it (so a node going down takes its pods with it). Service cluster IPs come
from the first service CIDR (or the pod CIDR's last /24): .10 is the cluster DNS (kube-dns, as
kind numbers it), then one per global service in sorted order from .11, the same sequence in
every cluster.

Networks (the Cluster's `network`), as Istio multi-network and single-network multicluster see them:
- clusters on *different* networks may use the same pod and service CIDRs (kind gives every
  cluster 10.244.0.0/16 and 10.96.0.0/12): each network is its own bridge and namespaces, the WAN
  and the gateways never see a pod address, and the mesh keys endpoints by (network, address);
- clusters on the *same* network share one bridge (kind's docker network), need disjoint ranges,
  and get routes to each other's node networks (on-link) and pod CIDRs (via the owning node), as
  Istio's kind CI adds them between clusters of one network — and only between those.

DNS: a pod's resolv.conf (what kubelet writes for dnsPolicy ClusterFirst) names the cluster DNS
address; the node's capture rules (programmed by the node ztunnel itself, `--capture`, for its
enrolled pods: `ztunnel.proxy.capture_rules`) send its udp/tcp 53 to the node ztunnel's DNS
responder, which answers the mesh's global names and, in the lab (no kube-dns, no internet),
NXDOMAIN for the rest. No hosts files.

Isolation invariants (the lab's point, checked by the lab tests):
- the sandbox root ns never forwards (ip_forward=0) and has no address on cluster or WAN bridges;
- a node forwards only between its pods and its network; no namespace has a route to the pod CIDR
  of a cluster on another network;
- a node reaches the WAN only through its cluster's gateway namespace, which forwards nothing but
  TCP to the WAN's HBONE port (15008) from its own cluster network, masqueraded to its WAN address;
- management legs are /32 with a single host route to the controller: they carry no transit.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NewType

from gitops.model import (
    Cluster,
    DemoBehaviour,
    Gateway,
    GlobalService,
    LabCluster,
    LabModel,
    LabWorkload,
    ServiceKey,
    gateway_pod_labels,
    gateway_pod_name,
    gateway_service_account,
)
from ztunnel.api.ports import HBONE_PORT

NetnsName = NewType("NetnsName", str)

ROOT_NS = NetnsName("")  # the sandbox's own namespace (where `ip` runs without -n)
WAN_BRIDGE = "br-wan"
MGMT_BRIDGE = "br-mgmt"
DEFAULT_WAN_CIDR = "172.30.0.0/24"
MGMT_CIDR = "100.64.0.0/16"  # RFC 6598 shared space: disjoint from pod/service/WAN ranges
CONTROLLER_MGMT_ADDRESS = "100.64.0.1"
FORBIDDEN_NET = ipaddress.ip_network("10.255.0.0/16")  # reserved on the dev machines: never used
CLUSTER_DNS_OFFSET = 10   # kube-dns at .10 of the service CIDR (kind: 10.96.0.10)
FIRST_SERVICE_OFFSET = 11
CLUSTER_DOMAIN = "cluster.local"
MAX_IFNAME = 15


class PlanError(ValueError):
    """The fleet's lab description cannot be laid out; the message says what to change."""


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodPlan:
    cluster: str
    namespace: str
    name: str
    workload: str
    node: str
    netns: NetnsName
    address: str             # pod IP (no prefix)
    prefix_len: int
    gateway: str             # the node's cbr0 address
    host_ifname: str         # veth end inside the node ns, attached to cbr0
    service: str | None      # GlobalService name (same namespace) it backs
    service_account: str
    port: int
    role: str                # "server" | "client" | "waypoint" | "ingress"
    behaviour: DemoBehaviour
    labels: Mapping[str, str]
    model: LabModel | None = None   # a server in model-server mode

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.name}"

    @property
    def is_proxy(self) -> bool:
        """A waypoint's or ingress gateway's pod: it runs `python -m ztunnel`, is not captured, and
        its node's ztunnel does not speak for it."""
        return self.role in ("waypoint", "ingress")

    @property
    def proxy_id(self) -> str:
        """`waypoint/<cluster>/<ns>/<gateway>` (the workload of a proxy pod is its Gateway's name)."""
        return f"{self.role}/{self.cluster}/{self.namespace}/{self.workload}"


@dataclass(frozen=True, slots=True)
class NodePlan:
    cluster: str
    name: str
    index: int               # 1-based within the cluster
    zone: str
    region: str
    netns: NetnsName
    address: str             # InternalIP on the cluster network (where ztunnel serves HBONE)
    pod_cidr: str            # this node's /24
    pod_gateway: str         # cbr0 address
    mgmt_address: str
    uplink_root_ifname: str  # veth end on br-<c> in the root ns (fault: link down)
    mgmt_root_ifname: str


@dataclass(frozen=True, slots=True)
class GatewayPlan:
    cluster: str
    netns: NetnsName
    cluster_address: str     # leg on the cluster network
    wan_address: str         # leg on the WAN (the Cluster's eastWestGateway.address)
    wan_prefix_len: int
    port: int
    mgmt_address: str
    cluster_root_ifname: str
    wan_root_ifname: str
    mgmt_root_ifname: str
    address_from_cluster: bool = False  # the fleet left eastWestGateway.address out: the lab's "LB" gave it


@dataclass(frozen=True, slots=True)
class ServiceVip:
    namespace: str
    name: str
    hostname: str            # <name>.<ns>.svc.<clusterset domain>
    cluster_ip: str
    ports: tuple[tuple[str, int, int], ...]  # (name, port, targetPort)


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    name: str
    index: int               # 1-based, sorted by name
    network: str
    region: str
    zone: str
    trust_domain: str
    bridge: str
    pod_cidr: str
    node_cidr: str           # the cluster network (first /24 of the pod CIDR)
    service_cidr: str
    dns_address: str         # the cluster DNS Service address pods' resolv.conf names (captured)
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    gateway: GatewayPlan | None
    services: tuple[ServiceVip, ...]

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"cluster {self.name} has no node {name!r}; nodes: {[n.name for n in self.nodes]}")

    def proxy_pods(self, node: str | None = None) -> tuple[PodPlan, ...]:
        """The waypoint and ingress pods (of one node, or all)."""
        return tuple(p for p in self.pods if p.is_proxy and (node is None or p.node == node))


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddNetns:
    name: NetnsName


@dataclass(frozen=True, slots=True)
class AddBridge:
    netns: NetnsName
    name: str


@dataclass(frozen=True, slots=True)
class AddVeth:
    """A veth pair: `name` in `netns`, `peer` in `peer_netns`."""

    netns: NetnsName
    name: str
    peer_netns: NetnsName
    peer: str


@dataclass(frozen=True, slots=True)
class SetMaster:
    netns: NetnsName
    dev: str
    bridge: str


@dataclass(frozen=True, slots=True)
class AddAddress:
    netns: NetnsName
    dev: str
    cidr: str  # "10.10.0.11/24"


@dataclass(frozen=True, slots=True)
class LinkUp:
    netns: NetnsName
    dev: str


@dataclass(frozen=True, slots=True)
class AddRoute:
    netns: NetnsName
    dst: str            # "default" or a CIDR
    via: str | None = None
    dev: str | None = None


@dataclass(frozen=True, slots=True)
class Sysctl:
    netns: NetnsName
    key: str            # "net.ipv4.ip_forward"
    value: str


@dataclass(frozen=True, slots=True)
class Iptables:
    netns: NetnsName
    args: tuple[str, ...]  # after `iptables -w`


Action = AddNetns | AddBridge | AddVeth | SetMaster | AddAddress | LinkUp | AddRoute | Sysctl | Iptables


@dataclass(frozen=True, slots=True)
class LabPlan:
    clusters: tuple[ClusterPlan, ...]
    wan_cidr: str
    mgmt_cidr: str
    controller_address: str
    actions: tuple[Action, ...] = field(repr=False)
    # (cluster, namespace) -> the resolv.conf of pods there (written as the pods' /etc/resolv.conf)
    resolv_confs: Mapping[tuple[str, str], str] = field(repr=False, default_factory=dict)

    def cluster(self, name: str) -> ClusterPlan:
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(f"no lab cluster {name!r}; lab clusters: {[c.name for c in self.clusters]}")

    @property
    def netns_names(self) -> tuple[NetnsName, ...]:
        return tuple(a.name for a in self.actions if isinstance(a, AddNetns))

    def pod(self, cluster: str, name: str, namespace: str | None = None) -> PodPlan:
        for p in self.cluster(cluster).pods:
            if p.name == name and (namespace is None or p.namespace == namespace):
                return p
        raise KeyError(f"no pod {name!r} in lab cluster {cluster}")


# --- planning -----------------------------------------------------------------------------------


def _net(cidr: str, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        raise PlanError(f"{what}: {cidr!r} is not a network address ({e})") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise PlanError(f"{what}: {cidr} is IPv6; the lab lays out IPv4 only")
    if net.overlaps(FORBIDDEN_NET):
        raise PlanError(f"{what}: {cidr} overlaps 10.255.0.0/16, which the lab never uses; pick another range")
    return net


def _check_ifname(name: str) -> str:
    if len(name) > MAX_IFNAME:
        raise PlanError(f"interface name {name!r} is longer than {MAX_IFNAME} characters")
    return name


def service_vips(services: Iterable[GlobalService], service_net: ipaddress.IPv4Network) -> tuple[ServiceVip, ...]:
    """One cluster IP per global service, in sorted (namespace, name) order from .11 of the range
    (.10 is the cluster DNS). Every cluster gets the same sequence from its own service CIDR."""
    ordered = sorted(services, key=lambda s: (s.namespace, s.name))
    if len(ordered) + FIRST_SERVICE_OFFSET >= service_net.num_addresses:
        raise PlanError(f"service CIDR {service_net} is too small for {len(ordered)} services")
    return tuple(
        ServiceVip(
            namespace=s.namespace, name=s.name, hostname=s.hostname,
            cluster_ip=str(service_net.network_address + FIRST_SERVICE_OFFSET + i),
            ports=tuple((p.name, p.port, p.target_port) for p in s.ports),
        )
        for i, s in enumerate(ordered)
    )


def lb_address(wan: ipaddress.IPv4Network, cluster_index: int, explicit: set[str]) -> ipaddress.IPv4Address:
    """The WAN address the lab's load balancer gives cluster `cluster_index`'s gateway Service when
    the fleet leaves eastWestGateway.address out: counted down from the top of the WAN, skipping
    addresses the fleet names explicitly (deterministic: the same fleet, the same address)."""
    candidates = [a for a in reversed(list(wan.hosts())) if str(a) not in explicit]
    if cluster_index > len(candidates) or cluster_index > wan.num_addresses // 2:
        raise PlanError(f"the lab WAN {wan} has no free address left for another gateway; use a larger WAN")
    return candidates[cluster_index - 1]


def resolv_conf_text(cluster: ClusterPlan, namespace: str) -> str:
    """/etc/resolv.conf of a pod in `namespace`, as kubelet writes it for dnsPolicy ClusterFirst:
    the cluster DNS Service, the namespace's search list and ndots:5. Global names
    (`<svc>.<ns>.svc.clusterset.local`) resolve through the node's DNS capture, not through a file."""
    search = f"{namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
    return f"search {search}\nnameserver {cluster.dns_address}\noptions ndots:5\n"


def plan_lab(
    clusters: Mapping[str, Cluster],
    lab_clusters: Mapping[str, LabCluster],
    services: Mapping[ServiceKey, GlobalService] | None = None,
    wan_cidr: str = DEFAULT_WAN_CIDR,
    gateways: Mapping[ServiceKey, Gateway] | None = None,
) -> LabPlan:
    """Lay out every lab cluster (the ones with a `LabCluster`); pure and deterministic.

    Each Gateway of the fleet (a waypoint, an ingress gateway) that runs in a lab cluster gets one
    pod there, on the cluster's first node, after the workloads' pods (`gitops.model.gateway_pod_name`,
    its service account and labels, as `federation.core.offline` models it). Such a pod runs a
    proxy: its node does not capture its traffic, and its cluster's east-west gateway lets it reach
    the WAN's HBONE port, as a node may (a waypoint reaches remote endpoints through the remote
    gateways itself)."""
    if not lab_clusters:
        raise PlanError("the fleet has no LabCluster objects: add lab/<cluster>.yaml to describe the lab")
    wan = _net(wan_cidr, "WAN")
    mgmt = _net(MGMT_CIDR, "management network")
    svcs = list((services or {}).values())
    names = sorted(lab_clusters)
    for n in names:
        if n not in clusters:
            raise PlanError(f"LabCluster {n} has no matching Cluster; add clusters/{n}.yaml")
    # Ranges every network sees (WAN, management) vs ranges only one network sees (its clusters'
    # pods and services): clusters on different networks may share ranges, as kind's defaults do.
    shared: list[tuple[ipaddress.IPv4Network, str]] = [(wan, "WAN"), (mgmt, "management")]
    per_network: dict[str, list[tuple[ipaddress.IPv4Network, str]]] = {}

    def claim(net: ipaddress.IPv4Network, what: str, network: str) -> None:
        mine = per_network.setdefault(network, [])
        for other, owner in shared + mine:
            if net.overlaps(other):
                fix = ("clusters on one network need distinct ranges (or put them on different networks)"
                       if other not in (wan, mgmt) else "pick a range outside it")
                raise PlanError(f"{what} {net} overlaps {owner} {other}; {fix}")
        mine.append((net, what))

    # Clusters of one network share the bridge of the first of them (sorted by name): one L2
    # segment, like kind's docker network.
    network_bridge: dict[str, str] = {}

    plans: list[ClusterPlan] = []
    actions: list[Action] = [
        AddBridge(ROOT_NS, WAN_BRIDGE), LinkUp(ROOT_NS, WAN_BRIDGE),
        AddBridge(ROOT_NS, MGMT_BRIDGE), LinkUp(ROOT_NS, MGMT_BRIDGE),
        AddAddress(ROOT_NS, MGMT_BRIDGE, f"{CONTROLLER_MGMT_ADDRESS}/{mgmt.prefixlen}"),
        Sysctl(ROOT_NS, "net.ipv4.ip_forward", "0"),
        LinkUp(ROOT_NS, "lo"),
    ]
    wan_taken: dict[str, str] = {}
    explicit_wan = {str(c.east_west_gateway.address) for c in clusters.values()
                    if c.east_west_gateway is not None and c.east_west_gateway.address is not None}
    for ci, name in enumerate(names, start=1):
        cl, lab = clusters[name], lab_clusters[name]
        if not lab.nodes:
            raise PlanError(f"LabCluster {name} has no nodes; list at least one under spec.nodes")
        pod_net = _net(cl.pod_cidrs[0] if cl.pod_cidrs else f"10.{10 * ci % 250}.0.0/16", f"cluster {name} pod CIDR")
        if pod_net.prefixlen > 23 or len(lab.nodes) + 1 > 2 ** (24 - pod_net.prefixlen):
            raise PlanError(f"cluster {name}: pod CIDR {pod_net} is too small for {len(lab.nodes)} nodes "
                            f"(one /24 for the cluster network plus one /24 per node)")
        claim(pod_net, f"cluster {name} pod CIDR", cl.network)
        subnets = pod_net.subnets(new_prefix=24)
        node_net = next(subnets)
        if cl.service_cidrs:
            svc_net = _net(cl.service_cidrs[0], f"cluster {name} service CIDR")
            claim(svc_net, f"cluster {name} service CIDR", cl.network)
        else:
            svc_net = list(pod_net.subnets(new_prefix=24))[-1]
        bridge = network_bridge.get(cl.network, "")
        if not bridge:
            bridge = _check_ifname(f"br-{name}" if len(f"br-{name}") <= MAX_IFNAME else f"br-c{ci}")
            network_bridge[cl.network] = bridge
            actions += [AddBridge(ROOT_NS, bridge), LinkUp(ROOT_NS, bridge)]

        nodes: list[NodePlan] = []
        for ni, ln in enumerate(lab.nodes, start=1):
            ns = NetnsName(f"{name}-{ln.name}")
            pod_cidr = next(subnets)
            up, mg = _check_ifname(f"c{ci}n{ni}"), _check_ifname(f"c{ci}n{ni}m")
            node = NodePlan(
                cluster=name, name=ln.name, index=ni, zone=ln.zone or cl.zone, region=cl.region, netns=ns,
                address=str(node_net.network_address + 10 + ni), pod_cidr=str(pod_cidr),
                pod_gateway=str(pod_cidr.network_address + 1),
                mgmt_address=str(mgmt.network_address + (ci << 8) + 10 + ni),
                uplink_root_ifname=up, mgmt_root_ifname=mg,
            )
            nodes.append(node)
            actions += [
                AddNetns(ns), LinkUp(ns, "lo"),
                AddVeth(ROOT_NS, up, ns, "eth0"), SetMaster(ROOT_NS, up, bridge), LinkUp(ROOT_NS, up),
                AddAddress(ns, "eth0", f"{node.address}/{node_net.prefixlen}"), LinkUp(ns, "eth0"),
                AddBridge(ns, "cbr0"), AddAddress(ns, "cbr0", f"{node.pod_gateway}/{pod_cidr.prefixlen}"),
                LinkUp(ns, "cbr0"),
                AddVeth(ROOT_NS, mg, ns, "mgmt0"), SetMaster(ROOT_NS, mg, MGMT_BRIDGE), LinkUp(ROOT_NS, mg),
                AddAddress(ns, "mgmt0", f"{node.mgmt_address}/32"), LinkUp(ns, "mgmt0"),
                AddRoute(ns, f"{CONTROLLER_MGMT_ADDRESS}/32", dev="mgmt0"),
                Sysctl(ns, "net.ipv4.ip_forward", "1"),
            ]

        gw: GatewayPlan | None = None
        if cl.east_west_gateway is not None:
            from_cluster = cl.east_west_gateway.address is None
            # No address in the fleet: the lab plays the cluster's load balancer and hands one out
            # (published in the gateway Service's status, where discovery reads it, as on kind).
            wan_addr = (lb_address(wan, ci, explicit_wan) if cl.east_west_gateway.address is None
                        else ipaddress.ip_address(cl.east_west_gateway.address))
            if wan_addr not in wan:
                raise PlanError(f"cluster {name}: eastWestGateway.address {wan_addr} is not on the lab WAN {wan}; "
                                f"use an address in {wan}")
            if str(wan_addr) in wan_taken:
                raise PlanError(f"clusters {wan_taken[str(wan_addr)]} and {name} both use gateway address {wan_addr}")
            wan_taken[str(wan_addr)] = name
            gns = NetnsName(f"{name}-gw")
            gw = GatewayPlan(
                cluster=name, netns=gns, cluster_address=str(node_net.network_address + 2),
                wan_address=str(wan_addr), wan_prefix_len=wan.prefixlen, port=cl.east_west_gateway.port,
                address_from_cluster=from_cluster,
                mgmt_address=str(mgmt.network_address + (ci << 8) + 2),
                cluster_root_ifname=_check_ifname(f"c{ci}g"), wan_root_ifname=_check_ifname(f"c{ci}w"),
                mgmt_root_ifname=_check_ifname(f"c{ci}gm"),
            )
            actions += [
                AddNetns(gns), LinkUp(gns, "lo"),
                AddVeth(ROOT_NS, gw.cluster_root_ifname, gns, "eth0"),
                SetMaster(ROOT_NS, gw.cluster_root_ifname, bridge), LinkUp(ROOT_NS, gw.cluster_root_ifname),
                AddAddress(gns, "eth0", f"{gw.cluster_address}/{node_net.prefixlen}"), LinkUp(gns, "eth0"),
                AddVeth(ROOT_NS, gw.wan_root_ifname, gns, "wan0"),
                SetMaster(ROOT_NS, gw.wan_root_ifname, WAN_BRIDGE), LinkUp(ROOT_NS, gw.wan_root_ifname),
                AddAddress(gns, "wan0", f"{gw.wan_address}/{wan.prefixlen}"), LinkUp(gns, "wan0"),
                AddVeth(ROOT_NS, gw.mgmt_root_ifname, gns, "mgmt0"),
                SetMaster(ROOT_NS, gw.mgmt_root_ifname, MGMT_BRIDGE), LinkUp(ROOT_NS, gw.mgmt_root_ifname),
                AddAddress(gns, "mgmt0", f"{gw.mgmt_address}/32"), LinkUp(gns, "mgmt0"),
                AddRoute(gns, f"{CONTROLLER_MGMT_ADDRESS}/32", dev="mgmt0"),
                # The gateway's own routes to its cluster's pods (it dials pods for inner tunnels).
                *(AddRoute(gns, n.pod_cidr, via=n.address) for n in nodes),
                # The cluster's edge: forward only HBONE from this cluster network to the WAN.
                Sysctl(gns, "net.ipv4.ip_forward", "1"),
                Iptables(gns, ("-P", "FORWARD", "DROP")),
                Iptables(gns, ("-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")),
                Iptables(gns, ("-A", "FORWARD", "-i", "eth0", "-o", "wan0", "-s", str(node_net), "-d", str(wan),
                               "-p", "tcp", "--dport", str(HBONE_PORT), "-j", "ACCEPT")),
                Iptables(gns, ("-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-s", str(node_net),
                               "-j", "SNAT", "--to-source", gw.wan_address)),
            ]

        # Routes of the nodes: to the other nodes' pods, and to the WAN via the gateway.
        for me in nodes:
            for other in nodes:
                if other is not me:
                    actions.append(AddRoute(me.netns, other.pod_cidr, via=other.address))
            if gw is not None:
                actions.append(AddRoute(me.netns, str(wan), via=gw.cluster_address))

        # Pods, round-robin over their workload's nodes; then the Gateways' pods on the first node.
        pods: list[PodPlan] = []
        per_node: dict[str, int] = {n.name: 0 for n in nodes}
        seen: set[tuple[str, str]] = set()
        workloads: list[LabWorkload | _GatewayWorkload] = [*lab.workloads,
                                                           *_gateway_workloads(gateways or {}, name, nodes[0].name)]
        for wl in workloads:
            placement = list(wl.nodes) or [n.name for n in nodes]
            for nn in placement:
                if nn not in per_node:
                    raise PlanError(f"LabCluster {name}: workload {wl.namespace}/{wl.name} is placed on unknown "
                                    f"node {nn!r}; nodes: {sorted(per_node)}")
            for r in range(wl.replicas):
                node = next(n for n in nodes if n.name == placement[r % len(placement)])
                per_node[node.name] += 1
                slot = per_node[node.name]
                pod_net24 = ipaddress.ip_network(node.pod_cidr)
                if slot + 10 >= pod_net24.num_addresses - 1:
                    raise PlanError(f"node {name}/{node.name} has more pods than its /24 holds")
                proxy = wl.role in ("waypoint", "ingress")
                pod_name = f"{wl.service_account if proxy else wl.name}-{r}"
                if (wl.namespace, pod_name) in seen:
                    raise PlanError(f"LabCluster {name}: two pods named {wl.namespace}/{pod_name}")
                seen.add((wl.namespace, pod_name))
                host_if = _check_ifname(f"p{slot}")
                labels: dict[str, str] = (dict(wl.labels) if proxy else
                                          {"app": wl.name, **({"service": wl.service} if wl.service else {}),
                                           **wl.labels})
                pod = PodPlan(
                    cluster=name, namespace=wl.namespace, name=pod_name, workload=wl.name, node=node.name,
                    netns=NetnsName(f"{name}.{wl.namespace}.{pod_name}"),
                    address=str(pod_net24.network_address + 10 + slot), prefix_len=pod_net24.prefixlen,
                    gateway=node.pod_gateway, host_ifname=host_if, service=wl.service,
                    service_account=wl.service_account, port=wl.port, role=wl.role, behaviour=wl.behaviour,
                    labels=labels, model=wl.model,
                )
                pods.append(pod)
                actions += [
                    AddNetns(pod.netns), LinkUp(pod.netns, "lo"),
                    AddVeth(node.netns, host_if, pod.netns, "eth0"),
                    SetMaster(node.netns, host_if, "cbr0"), LinkUp(node.netns, host_if),
                    AddAddress(pod.netns, "eth0", f"{pod.address}/{pod.prefix_len}"), LinkUp(pod.netns, "eth0"),
                    AddRoute(pod.netns, "default", via=pod.gateway),
                ]
        # Proxy pods (waypoints, ingress gateways) join the controller like node ztunnels do: a /32
        # management leg with one host route to it (no transit), besides their pod network.
        for k, pod in enumerate((p for p in pods if p.is_proxy), start=1):
            if 100 + k > 250:
                raise PlanError(f"cluster {name}: more than 150 waypoint/ingress pods")
            mg = _check_ifname(f"c{ci}x{k}m")
            mgmt_address = str(mgmt.network_address + (ci << 8) + 100 + k)
            actions += [
                AddVeth(ROOT_NS, mg, pod.netns, "mgmt0"), SetMaster(ROOT_NS, mg, MGMT_BRIDGE), LinkUp(ROOT_NS, mg),
                AddAddress(pod.netns, "mgmt0", f"{mgmt_address}/32"), LinkUp(pod.netns, "mgmt0"),
                AddRoute(pod.netns, f"{CONTROLLER_MGMT_ADDRESS}/32", dev="mgmt0"),
            ]
        if gw is not None:
            for pod in (p for p in pods if p.is_proxy):
                # a waypoint reaches remote endpoints through their gateways itself, like a node
                actions += [
                    Iptables(gw.netns, ("-A", "FORWARD", "-i", "eth0", "-o", "wan0", "-s", f"{pod.address}/32",
                                        "-d", str(wan), "-p", "tcp", "--dport", str(HBONE_PORT), "-j", "ACCEPT")),
                    Iptables(gw.netns, ("-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-s", f"{pod.address}/32",
                                        "-j", "SNAT", "--to-source", gw.wan_address)),
                ]
        plans.append(ClusterPlan(
            name=name, index=ci, network=cl.network, region=cl.region, zone=cl.zone,
            trust_domain=cl.trust_domain, bridge=bridge, pod_cidr=str(pod_net), node_cidr=str(node_net),
            service_cidr=str(svc_net), dns_address=str(svc_net.network_address + CLUSTER_DNS_OFFSET),
            nodes=tuple(nodes), pods=tuple(pods), gateway=gw, services=service_vips(svcs, svc_net),
        ))
    actions += same_network_routes(plans)
    resolv = {
        (c.name, ns): resolv_conf_text(c, ns)
        for c in plans
        for ns in sorted({p.namespace for p in c.pods} | {v.namespace for v in c.services})
    }
    return LabPlan(clusters=tuple(plans), wan_cidr=str(wan), mgmt_cidr=str(mgmt),
                   controller_address=CONTROLLER_MGMT_ADDRESS, actions=tuple(actions), resolv_confs=resolv)


def same_network_routes(clusters: Sequence[ClusterPlan]) -> list[Action]:
    """Single-network multicluster: every node reaches the nodes of the other clusters on its
    network (their node network is on the shared bridge: an on-link route) and their pods (via the
    node that owns them) — what Istio's kind CI adds with `ip route add <podCIDR> via <node IP>`
    between clusters of one network, and only between those. Clusters on other networks get no
    route at all: only their gateways are reachable, over the WAN."""
    out: list[Action] = []
    for me in clusters:
        peers = [c for c in clusters if c.network == me.network and c.name != me.name]
        for node in me.nodes:
            for peer in peers:
                out.append(AddRoute(node.netns, peer.node_cidr, dev="eth0"))
                out += [AddRoute(node.netns, n.pod_cidr, via=n.address) for n in peer.nodes]
    return out


@dataclass(frozen=True, slots=True)
class _GatewayWorkload:
    """A Gateway's pod, in the shape of a LabWorkload for the placement loop."""

    namespace: str
    name: str
    service: str | None
    replicas: int
    nodes: tuple[str, ...]
    service_account: str
    port: int
    behaviour: DemoBehaviour
    role: str
    labels: Mapping[str, str]
    model: LabModel | None = None


def _gateway_workloads(gateways: Mapping[ServiceKey, Gateway], cluster: str, first_node: str) -> list[_GatewayWorkload]:
    out = []
    for gw in sorted(gateways.values(), key=lambda g: (g.namespace, g.name)):
        if not gw.runs_in(cluster):
            continue
        port = gw.listeners[0].port if gw.listeners else HBONE_PORT
        assert gateway_pod_name(gw) == f"{gateway_service_account(gw)}-0"
        out.append(_GatewayWorkload(gw.namespace, gw.name, None, 1, (first_node,), gateway_service_account(gw), port,
                                    DemoBehaviour.HEALTHY, "waypoint" if gw.is_waypoint else "ingress",
                                    gateway_pod_labels(gw)))
    return out


# --- execution (the one place that runs `ip`) ---------------------------------------------------


class ExecError(RuntimeError):
    """A network command failed; the message carries the command and its stderr."""


# `ip -batch` reads one command per line and splits it into words at blanks, honouring quotes,
# backslashes and `#` comments. A name holding a newline would end our command and start one of
# its own (`netns add x\nnetns del victim`); a blank, a quote or a `#` would change the arguments.
# Every word of a batch line is therefore one of these characters, or the action is refused before
# any `ip` runs (fleet validation refuses such names earlier; this holds whatever built the plan).
_BATCH_WORD = re.compile(r"[A-Za-z0-9._:/@%+=,-]+")


def _batch_word(word: str, a: Action) -> str:
    if not _BATCH_WORD.fullmatch(word):
        raise PlanError(f"{type(a).__name__}: {word!r} cannot be written to `ip -batch` (one command per line, "
                        "words split at blanks): names and addresses may use letters, digits and . _ : / @ % + = , - "
                        f"only; fix the name in the fleet's lab description ({a!r})")
    return word


def _ip_words(a: Action) -> tuple[NetnsName, list[str]] | None:
    """The words of the `ip -batch` command for an action, and the namespace whose batch runs it."""
    if isinstance(a, AddNetns):
        return ROOT_NS, ["netns", "add", a.name]
    if isinstance(a, AddBridge):
        return a.netns, ["link", "add", a.name, "type", "bridge"]
    if isinstance(a, AddVeth):
        here = ["netns", a.netns] if a.netns else []
        there = ["netns", a.peer_netns] if a.peer_netns else []
        # Created from the root ns and placed at once: both names may exist elsewhere already.
        return ROOT_NS, ["link", "add", a.name, *here, "type", "veth", "peer", "name", a.peer, *there]
    if isinstance(a, SetMaster):
        return a.netns, ["link", "set", a.dev, "master", a.bridge]
    if isinstance(a, AddAddress):
        return a.netns, ["addr", "add", a.cidr, "dev", a.dev]
    if isinstance(a, LinkUp):
        return a.netns, ["link", "set", a.dev, "up"]
    if isinstance(a, AddRoute):
        return a.netns, ["route", "add", a.dst, *(["via", a.via] if a.via else []), *(["dev", a.dev] if a.dev else [])]
    return None


def ip_batch_line(a: Action) -> tuple[NetnsName, str] | None:
    """The `ip -batch` line for an action and the namespace whose batch it belongs to (None: the
    action is not an `ip` command). PlanError when a word would not stay one word on one line."""
    words = _ip_words(a)
    if words is None:
        return None
    netns, args = words
    if netns:
        _batch_word(netns, a)   # `ip -n <netns>`: argv, but the same name is a batch word elsewhere
    return netns, " ".join(_batch_word(w, a) for w in args)


def _stages(actions: Sequence[Action]) -> list[list[Action]]:
    """Split actions into stages that may each be batched: creation must precede configuration.

    Stage 0: namespaces; 1: bridges and veths (root batch creates & places them);
    2: masters/addresses/links/routes per namespace; 3: sysctls and iptables.
    """
    stages: list[list[Action]] = [[], [], [], []]
    for a in actions:
        if isinstance(a, AddNetns):
            stages[0].append(a)
        elif isinstance(a, AddBridge | AddVeth):
            stages[1].append(a)
        elif isinstance(a, SetMaster | AddAddress | LinkUp | AddRoute):
            stages[2].append(a)
        else:
            stages[3].append(a)
    return stages


def _run(cmd: Sequence[str], stdin: str | None = None, what: str = "") -> None:
    r = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise ExecError(f"{what or ' '.join(cmd)} failed (exit {r.returncode}): {r.stderr.strip()[:800]}")


def _batch(netns: NetnsName, lines: list[str]) -> None:
    if not lines:
        return
    cmd = ["ip", "-n", netns, "-batch", "-"] if netns else ["ip", "-batch", "-"]
    _run(cmd, "\n".join(lines) + "\n", what=f"ip -batch in {netns or 'the sandbox root namespace'}")


def run_iptables(netns: NetnsName, args: Sequence[str]) -> None:
    base = ["ip", "netns", "exec", netns] if netns else []
    _run([*base, "iptables", "-w", *args])


def run_tc(netns: NetnsName, args: Sequence[str]) -> None:
    base = ["ip", "netns", "exec", netns] if netns else []
    _run([*base, "tc", *args])


def run_ip(netns: NetnsName, *args: str) -> None:
    _run(["ip", *(["-n", netns] if netns else []), *args])


def set_sysctl(netns: NetnsName, key: str, value: str) -> None:
    from clusters.lab.netns import in_netns

    path = "/proc/sys/" + key.replace(".", "/")
    with in_netns(netns), open(path, "w") as f:
        f.write(value)


def execute(actions: Sequence[Action]) -> float:
    """Apply `actions` with as few `ip` processes as possible; returns the seconds it took. Every
    `ip -batch` line is built (and checked, `ip_batch_line`) before the first command runs, so a
    plan with one unusable name changes nothing."""
    t0 = time.monotonic()
    stages = [[(a, ip_batch_line(a)) for a in stage] for stage in _stages(actions)]
    for stage in stages:
        by_ns: dict[NetnsName, list[str]] = {}
        for a, line in stage:
            if isinstance(a, Sysctl):
                set_sysctl(a.netns, a.key, a.value)
            elif isinstance(a, Iptables):
                run_iptables(a.netns, a.args)
            else:
                assert line is not None
                by_ns.setdefault(line[0], []).append(line[1])
        # The root batch first: it creates the links the per-namespace batches configure.
        _batch(ROOT_NS, by_ns.pop(ROOT_NS, []))
        for ns, lines in by_ns.items():
            _batch(ns, lines)
    return time.monotonic() - t0
