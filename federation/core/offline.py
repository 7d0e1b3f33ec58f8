"""Offline observations: what discovery would see in a lab cluster, built from its `LabCluster`.

`meshfed explain`, `meshfed plan` and `meshfed graph` work on a fleet repo without any running
cluster: the workloads declared in `lab/<cluster>.yaml` stand in for discovery. The result is a
complete `ClusterObservation` per cluster, deterministic (same repo -> same names and addresses):

- nodes in declared order get addresses `<pod CIDR base>.0.<i>` (i = 1, 2, …), e.g. 10.10.0.1;
- pods of a workload are `<workload>-<i>` (i from 0), placed round-robin over the workload's
  `nodes` (all nodes when empty); pods on node i get `<pod CIDR base>.<i>.<10 + n>` in placement
  order, so each node owns a /24 of the cluster's pod CIDR;
- a cluster without a pod CIDR gets one from 10.64.0.0/10 derived from its name (stable);
- a gateway whose address the fleet leaves out (it comes from the cluster) gets the placeholder
  `<cluster>.address-from-cluster.invalid`, which explain and plan show as "address from the cluster";
- pods carry the label `app: <workload>` (what AuthorizationPolicy selectors match) and the
  workload's extra `labels`, are ready, and back their workload's service; a client workload (no
  service) becomes an `EndpointInfo` with `service=""`: a workload of its node that backs nothing
  (the graph's convention);
- every Gateway (waypoint or ingress) that runs in the cluster has one ready pod on the cluster's
  first node, after the workloads' pods (`gitops.model.gateway_pod_name`), as the lab places it.
"""

from __future__ import annotations

import hashlib
import ipaddress

from clusters.kube.observation import ClusterObservation, EndpointInfo, NodeInfo, ServiceInfo, ServicePortInfo
from federation.core.graph import OFFLINE_GATEWAY_SUFFIX
from gitops.model import (
    Cluster,
    ConfigSnapshot,
    LabCluster,
    ServiceKey,
    gateway_pod_labels,
    gateway_pod_name,
    gateway_service_account,
)

FALLBACK_POD_SPACE = ipaddress.IPv4Network("10.64.0.0/10")


def _pod_base(cluster: Cluster) -> ipaddress.IPv4Network:
    for cidr in cluster.pod_cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen <= 16:
            return net
    blocks = FALLBACK_POD_SPACE.num_addresses // 65536
    idx = int.from_bytes(hashlib.sha256(cluster.name.encode()).digest()[:4], "big") % blocks
    return ipaddress.IPv4Network((int(FALLBACK_POD_SPACE.network_address) + idx * 65536, 16))


def _addr(base: ipaddress.IPv4Network, third: int, fourth: int) -> str:
    if not (0 <= third <= 255 and 1 <= fourth <= 254):
        raise ValueError(f"offline address {third}.{fourth} does not fit the pod CIDR {base}; "
                         f"use fewer nodes or replicas per node (254 max) in the LabCluster")
    return str(ipaddress.IPv4Address(int(base.network_address) + third * 256 + fourth))


def observation_from_lab(snapshot: ConfigSnapshot, lab: LabCluster, observed_at_s: float = 0.0) -> ClusterObservation:
    cluster = snapshot.clusters[lab.cluster]
    base = _pod_base(cluster)
    node_index = {n.name: i for i, n in enumerate(lab.nodes, start=1)}
    nodes = tuple(
        NodeInfo(name=n.name, address=_addr(base, 0, i), region=cluster.region, zone=n.zone or cluster.zone,
                 labels={"topology.kubernetes.io/region": cluster.region,
                         "topology.kubernetes.io/zone": n.zone or cluster.zone})
        for n, i in ((n, node_index[n.name]) for n in lab.nodes)
    )
    zone_of = {n.name: n.zone for n in nodes}
    next_host: dict[str, int] = {n.name: 10 for n in lab.nodes}
    services: list[ServiceInfo] = []
    for key, svc in sorted(snapshot.services.items(), key=lambda kv: str(kv[0])):
        if lab.cluster in svc.export_from:
            services.append(ServiceInfo(
                namespace=key.namespace, name=key.name,
                ports=tuple(ServicePortInfo(p.name, p.port, p.target_port, app_protocol=p.app_protocol)
                            for p in svc.ports)))
    endpoints: list[EndpointInfo] = []
    all_nodes = tuple(n.name for n in lab.nodes)
    for w in lab.workloads:
        placement = w.nodes or all_nodes
        backed = snapshot.services.get(ServiceKey(w.namespace, w.service)) if w.service else None
        ports = tuple(ServicePortInfo(p.name, p.port, w.port, app_protocol=p.app_protocol)
                      for p in backed.ports) if backed is not None else ()
        for i in range(w.replicas):
            node = placement[i % len(placement)]
            host = next_host[node]
            next_host[node] = host + 1
            endpoints.append(EndpointInfo(
                namespace=w.namespace, service=w.service or "", pod=f"{w.name}-{i}",
                address=_addr(base, node_index[node], host), node=node, service_account=w.service_account,
                ports=ports, zone=zone_of[node], labels={"app": w.name, **w.labels},
            ))
    first = all_nodes[0] if all_nodes else ""
    for g in snapshot.gateways.values():
        if first and g.runs_in(lab.cluster):
            host = next_host[first]
            next_host[first] = host + 1
            endpoints.append(EndpointInfo(
                namespace=g.namespace, service="", pod=gateway_pod_name(g), address=_addr(base, node_index[first], host),
                node=first, service_account=gateway_service_account(g), zone=zone_of[first],
                labels=gateway_pod_labels(g)))
    gw = cluster.east_west_gateway
    return ClusterObservation(cluster=lab.cluster, observed_at_s=observed_at_s, complete=True,
                              nodes=nodes, services=tuple(services), endpoints=tuple(endpoints),
                              resource_version="offline",
                              gateway_address=f"{lab.cluster}{OFFLINE_GATEWAY_SUFFIX}"
                              if gw is not None and gw.address is None else "")


def offline_observations(snapshot: ConfigSnapshot, observed_at_s: float = 0.0) -> list[ClusterObservation]:
    """One complete observation per LabCluster of the snapshot (sorted by cluster)."""
    return [observation_from_lab(snapshot, snapshot.lab_clusters[c], observed_at_s)
            for c in sorted(snapshot.lab_clusters)]
