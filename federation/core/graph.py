"""The global endpoint graph: clusters, networks, east-west gateways, global services and every
endpoint that backs them, built from a `ConfigSnapshot` and one `ClusterObservation` per cluster.

Pure and incremental. `apply_observation` diffs a cluster's new observation against what the
graph holds for that cluster and returns a `GraphChange` naming only the services and nodes it
touched, so the renderer rebuilds only those. A complete observation replaces the cluster's state
(anything absent is pruned); a partial one upserts what it names and removes
`removed_endpoints`.

Placement of an endpoint (what the failover engine and renderer need) is resolved here once:
network and trust domain from the cluster, region/zone from the node (falling back to the
endpoint's zone and then the cluster's locality), the node's HBONE address, and the SPIFFE identity
`spiffe://<cluster trust domain>/ns/<namespace>/sa/<service account>`.

Only endpoints of services that are `GlobalService`s exported from the endpoint's cluster (MCS
ServiceExport semantics) join a service's global endpoint set; the others are still known as
workloads of their node. An `EndpointInfo` with an empty `service` is a pod that backs no service
(a client): it is a workload of its node and nothing else (the convention used by
`federation.core.offline` and discovery for client pods).

Invariants:
- `_by_service[key][cluster]` holds exactly the endpoints of `_clusters[cluster].endpoints` whose
  service is `key` and is exported from `cluster`;
- `EndpointNode` values are immutable; a change replaces the node, so identity comparison tells
  the renderer whether anything changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from clusters.kube.observation import ClusterObservation, EndpointInfo, NodeInfo
from gitops.model import GATEWAY_NAME_LABEL, Cluster, ConfigSnapshot, GlobalService, ServiceKey
from ztunnel.api.identity import gateway_spiffe_id
from ztunnel.api.ports import HBONE_PORT

EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})

EndpointKey = tuple[str, str, str]  # (namespace, service, pod), as ClusterObservation keys them
GatewayPodsKey = tuple[str, str, str]  # (cluster, namespace, gateway name): pods of a waypoint or ingress
# What offline observations (`federation.core.offline`) report as the load-balancer address of a
# gateway whose address only the cluster knows: a reserved name (RFC 2606) that explain prints
# as "address from the cluster"; never pushed to a proxy (offline views are not).
OFFLINE_GATEWAY_SUFFIX = ".address-from-cluster.invalid"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def gateway_identity(trust_domain: str) -> str:
    """The identity an east-west gateway presents (its own service account in meshfed-system; the
    contract is `ztunnel.api.identity.gateway_spiffe_id`, which clients verify outer tunnels against)."""
    return gateway_spiffe_id(trust_domain)


@dataclass(frozen=True, slots=True)
class EndpointNode:
    """One backend of a global service (or a plain workload when `service` is empty), placed."""

    uid: str               # workload uid "<cluster>/<namespace>/<pod>"
    namespace: str
    service: str           # "" for a pod that backs no service
    pod: str
    cluster: str
    network: str
    region: str
    zone: str
    node: str
    node_address: str
    address: str
    port: int
    service_account: str
    identity: str
    ready: bool
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_LABELS)
    hbone_address: str = ""  # "<node address>:15008", "" while the node is unknown

    @property
    def service_key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.service)


@dataclass(frozen=True, slots=True)
class ClusterView:
    """A cluster as the graph sees it: fleet-repo facts plus the gateway's HBONE address."""

    name: str
    network: str
    region: str
    zone: str
    trust_domain: str
    gateway: str  # "ip:port" of its east-west gateway, "" if it has none (or none is known yet)
    spec: Cluster
    # the fleet leaves eastWestGateway.address out: `gateway` is what discovery read from the
    # gateway Service's load-balancer status ("" until the cluster reports one)
    gateway_from_cluster: bool = False


def describe_gateway(cv: ClusterView) -> str:
    """The gateway's address for people: "host:port", with "(address from the cluster)" when the
    fleet left it out, or just that phrase when no cluster told us yet (offline: plan, explain)."""
    if not cv.gateway_from_cluster:
        return cv.gateway
    if not cv.gateway or cv.gateway.rsplit(":", 1)[0].endswith(OFFLINE_GATEWAY_SUFFIX):
        return "(address from the cluster)"
    return f"{cv.gateway} (address from the cluster)"


def gateway_view(c: Cluster, observed_address: str) -> tuple[str, bool]:
    """(the gateway's "host:port" or "", whether its address comes from the cluster)."""
    gw = c.east_west_gateway
    if gw is None:
        return "", False
    if gw.address is not None:
        return f"{gw.address}:{gw.port}", False
    host = f"[{observed_address}]" if ":" in observed_address else observed_address
    return (f"{host}:{gw.port}" if observed_address else ""), True


@dataclass(slots=True)
class ClusterState:
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    endpoints: dict[EndpointKey, EndpointNode] = field(default_factory=dict)
    observed_at_s: float | None = None
    observations: int = 0


@dataclass(frozen=True, slots=True)
class GraphChange:
    """What one update touched: services whose endpoint set changed, nodes whose workloads changed."""

    services: frozenset[ServiceKey] = frozenset()
    nodes: frozenset[tuple[str, str]] = frozenset()      # (cluster, node)
    node_set_changed: frozenset[str] = frozenset()        # clusters whose list of nodes changed
    gateways: frozenset[GatewayPodsKey] = frozenset()     # waypoints/ingress gateways whose pods changed

    def __bool__(self) -> bool:
        return bool(self.services or self.nodes or self.node_set_changed or self.gateways)

    def merge(self, other: GraphChange) -> GraphChange:
        return GraphChange(self.services | other.services, self.nodes | other.nodes,
                           self.node_set_changed | other.node_set_changed, self.gateways | other.gateways)


def same_workload(a: EndpointNode, b: EndpointNode) -> bool:
    """Equal as a Workload resource (what a node proxy's `workloads` holds): readiness, port and
    the service it backs do not matter there."""
    return (a.uid == b.uid and a.address == b.address and a.node == b.node and a.identity == b.identity
            and a.region == b.region and a.zone == b.zone and a.node_address == b.node_address
            and a.network == b.network and a.labels == b.labels)


class UnknownCluster(KeyError):
    def __init__(self, cluster: str, known: Iterable[str]) -> None:
        super().__init__(f"observation for cluster {cluster!r}, which the fleet repo does not declare "
                         f"(known: {', '.join(sorted(known)) or 'none'}); add clusters/{cluster}.yaml "
                         f"or stop the agent that reports it")
        self.cluster = cluster


class EndpointGraph:
    """Global services and their endpoints across clusters; updated one observation at a time."""

    def __init__(self, snapshot: ConfigSnapshot) -> None:
        self.snapshot = snapshot
        self.clusters: dict[str, ClusterView] = {}
        self.services: dict[ServiceKey, GlobalService] = {}
        self.hostnames: dict[str, ServiceKey] = {}
        self._exported: dict[ServiceKey, frozenset[str]] = {}
        # Hot paths key services by the (namespace, name) tuple: tuples hash in C, ServiceKey in Python.
        self._skeys: dict[tuple[str, str], ServiceKey] = {}
        self._exported_t: dict[tuple[str, str], frozenset[str]] = {}
        self._identities: dict[tuple[str, str, str], str] = {}
        self._state: dict[str, ClusterState] = {}
        self._by_service: dict[tuple[str, str], dict[str, dict[EndpointKey, EndpointNode]]] = {}
        self._by_node: dict[tuple[str, str], dict[EndpointKey, EndpointNode]] = {}
        # pods labelled gateway.networking.k8s.io/gateway-name (waypoints, ingress gateways)
        self._gateway_pods: dict[GatewayPodsKey, dict[EndpointKey, EndpointNode]] = {}
        # (cluster, namespace, name) -> the Service's clusterIP in that cluster: what its apps dial
        # (the node proxies' DNS answers with it), so the proxies of that cluster render it as the service's VIP.
        self.cluster_ips: dict[tuple[str, str, str], str] = {}
        # cluster -> the load-balancer address its last observation reported for its gateway Service
        self.observed_gateways: dict[str, str] = {}
        self._load_snapshot(snapshot)

    # --- snapshot ---------------------------------------------------------------------------

    def _load_snapshot(self, snapshot: ConfigSnapshot) -> None:
        self.snapshot = snapshot
        self.clusters = {name: self._view(name, c) for name, c in sorted(snapshot.clusters.items())}
        self.services = dict(sorted(snapshot.services.items(), key=lambda kv: (kv[0].namespace, kv[0].name)))
        self.hostnames = {s.hostname: k for k, s in self.services.items()}
        self._exported = {k: frozenset(s.export_from) for k, s in self.services.items()}
        self._skeys = {(k.namespace, k.name): k for k in self.services}
        self._exported_t = {(k.namespace, k.name): e for k, e in self._exported.items()}
        self._identities = {}
        for name in self.clusters:
            self._state.setdefault(name, ClusterState())

    def _view(self, name: str, c: Cluster) -> ClusterView:
        gateway, from_cluster = gateway_view(c, self.observed_gateways.get(name, ""))
        return ClusterView(name=name, network=c.network, region=c.region, zone=c.zone, trust_domain=c.trust_domain,
                           gateway=gateway, spec=c, gateway_from_cluster=from_cluster)

    def set_snapshot(self, snapshot: ConfigSnapshot) -> GraphChange:
        """Adopt a new fleet revision: re-place every endpoint (trust domains, networks, exports may
        have moved). Returns everything as touched; callers diff rendered configs for the delta."""
        self._load_snapshot(snapshot)
        for name in [c for c in self._state if c not in self.clusters]:
            del self._state[name]
        self._by_service = {}
        self._by_node = {}
        self._gateway_pods = {}
        for cluster, state in self._state.items():
            old = state.endpoints
            state.endpoints = {}
            for key, ep in old.items():
                node = state.nodes.get(ep.node)
                self._add(cluster, key, self._place_fields(cluster, ep, node))
        return GraphChange(frozenset(self.services), frozenset(self._by_node), frozenset(self.clusters))

    # --- queries ----------------------------------------------------------------------------

    def network_of(self, cluster: str) -> str:
        return self.clusters[cluster].network

    def networks(self) -> dict[str, list[str]]:
        """network -> clusters on it (sorted)."""
        out: dict[str, list[str]] = {}
        for c in self.clusters.values():
            out.setdefault(c.network, []).append(c.name)
        return out

    def gateways(self) -> dict[str, list[tuple[str, str]]]:
        """network -> [(cluster, "ip:port")] of its east-west gateways."""
        out: dict[str, list[tuple[str, str]]] = {}
        for c in self.clusters.values():
            if c.gateway:
                out.setdefault(c.network, []).append((c.name, c.gateway))
        return out

    def nodes_of(self, cluster: str) -> dict[str, NodeInfo]:
        return self._state[cluster].nodes

    def cluster_state(self, cluster: str) -> ClusterState:
        return self._state[cluster]

    def exported_from(self, key: ServiceKey) -> frozenset[str]:
        return self._exported.get(key, frozenset())

    def endpoints_of(self, key: ServiceKey) -> Mapping[str, Mapping[EndpointKey, EndpointNode]]:
        """cluster -> endpoints of the service there (exporting clusters only)."""
        return self._by_service.get((key.namespace, key.name), {})

    def endpoints_in(self, key: ServiceKey, cluster: str) -> Mapping[EndpointKey, EndpointNode]:
        return self._by_service.get((key.namespace, key.name), {}).get(cluster, {})

    def workloads_on(self, cluster: str, node: str) -> Mapping[EndpointKey, EndpointNode]:
        return self._by_node.get((cluster, node), {})

    def gateway_pods(self, cluster: str, namespace: str, name: str) -> Mapping[EndpointKey, EndpointNode]:
        """The pods of waypoint or ingress gateway `namespace/name` in `cluster` (Istio labels them
        `gateway.networking.k8s.io/gateway-name`), ready or not."""
        return self._gateway_pods.get((cluster, namespace, name), {})

    def endpoints_in_namespace(self, cluster: str, namespace: str) -> list[EndpointNode]:
        """Every pod of `namespace` in `cluster` (service endpoints and plain workloads), one entry
        per pod (a pod behind several services is listed once), by uid."""
        seen: dict[str, EndpointNode] = {}
        for ep in self._state[cluster].endpoints.values() if cluster in self._state else ():
            if ep.namespace == namespace:
                seen.setdefault(ep.uid, ep)
        return [seen[u] for u in sorted(seen)]

    def endpoint_count(self) -> int:
        return sum(len(s.endpoints) for s in self._state.values())

    # --- observations -----------------------------------------------------------------------

    def apply_observation(self, obs: ClusterObservation) -> GraphChange:
        if obs.cluster not in self.clusters:
            raise UnknownCluster(obs.cluster, self.clusters)
        state = self._state[obs.cluster]
        state.observed_at_s = obs.observed_at_s
        state.observations += 1
        touched_services: set[tuple[str, str]] = set()
        touched_nodes: set[tuple[str, str]] = set()
        node_set_changed: set[str] = set()
        gw_before = self._gateway_snapshot(obs.cluster)

        if (obs.complete or obs.gateway_address) and self.observed_gateways.get(obs.cluster, "") != obs.gateway_address:
            # A gateway address from the cluster appeared or moved: every remote view of every
            # service goes through it, so everything is touched (rare: an LB address is sticky).
            self.observed_gateways[obs.cluster] = obs.gateway_address
            view = self._view(obs.cluster, self.clusters[obs.cluster].spec)
            if view != self.clusters[obs.cluster]:
                self.clusters[obs.cluster] = view
                touched_services.update(self._skeys)
                node_set_changed.update(self.clusters)

        new_nodes = {n.name: n for n in obs.nodes}
        if obs.complete:
            if new_nodes.keys() != state.nodes.keys():
                node_set_changed.add(obs.cluster)
            changed_nodes = {n for n in new_nodes.keys() | state.nodes.keys()
                             if new_nodes.get(n) != state.nodes.get(n)}
            state.nodes = new_nodes
        else:
            changed_nodes = {n for n, info in new_nodes.items() if state.nodes.get(n) != info}
            if any(n not in state.nodes for n in new_nodes):
                node_set_changed.add(obs.cluster)
            state.nodes.update(new_nodes)
        for svc_info in obs.services:
            ip_key = (obs.cluster, svc_info.namespace, svc_info.name)
            if self.cluster_ips.get(ip_key, "") != svc_info.cluster_ip:
                self.cluster_ips[ip_key] = svc_info.cluster_ip
                if (svc_info.namespace, svc_info.name) in self._skeys:
                    touched_services.add((svc_info.namespace, svc_info.name))
        # A node's address or locality moved: re-place its endpoints.
        if changed_nodes:
            for key, ep in list(state.endpoints.items()):
                if ep.node in changed_nodes:
                    self._remove(obs.cluster, key, touched_services, touched_nodes)
                    self._add(obs.cluster, key, self._place_fields(obs.cluster, ep, state.nodes.get(ep.node)),
                              touched_services, touched_nodes)
            touched_nodes.update((obs.cluster, n) for n in changed_nodes)
            node_set_changed.add(obs.cluster)  # proxies' localities may have moved: re-render the cluster

        seen: set[EndpointKey] = set()
        for info in obs.endpoints:
            key = info.key
            seen.add(key)
            placed = self._place(obs.cluster, info, state.nodes.get(info.node))
            old = state.endpoints.get(key)
            if old == placed:
                continue
            # Readiness or port changes touch the service's views, not the node's workload list.
            nodes_sink = touched_nodes if old is None or not same_workload(old, placed) else set()
            if old is not None:
                self._remove(obs.cluster, key, touched_services, nodes_sink)
            self._add(obs.cluster, key, placed, touched_services, nodes_sink)
        gone: Iterable[EndpointKey]
        if obs.complete:
            gone = [k for k in state.endpoints if k not in seen]
        else:
            gone = [k for k in obs.removed_endpoints if k in state.endpoints]
        for key in gone:
            self._remove(obs.cluster, key, touched_services, touched_nodes)
        gw_after = self._gateway_snapshot(obs.cluster)
        gateways = frozenset(k for k in gw_before.keys() | gw_after.keys() if gw_before.get(k) != gw_after.get(k))
        return GraphChange(frozenset(self._skeys[t] for t in touched_services), frozenset(touched_nodes),
                           frozenset(node_set_changed), gateways)

    def _gateway_snapshot(self, cluster: str) -> dict[GatewayPodsKey, tuple[tuple[str, str, bool], ...]]:
        """What the renderer reads of a cluster's gateway pods (uid, HBONE address, readiness)."""
        return {k: tuple(sorted((e.uid, e.address, e.ready) for e in v.values()))
                for k, v in self._gateway_pods.items() if k[0] == cluster}

    # --- internals --------------------------------------------------------------------------

    def _place(self, cluster: str, info: EndpointInfo, node: NodeInfo | None) -> EndpointNode:
        cv = self.clusters[cluster]
        if info.ports:
            port = info.ports[0].target_port
        else:
            skey = self._skeys.get((info.namespace, info.service)) if info.service else None
            svc = self.services[skey] if skey is not None else None
            port = svc.ports[0].target_port if svc is not None and svc.ports else 0
        ik = (cv.trust_domain, info.namespace, info.service_account)
        identity = self._identities.get(ik)
        if identity is None:
            identity = self._identities[ik] = spiffe_id(*ik)
        return EndpointNode(
            uid=f"{cluster}/{info.namespace}/{info.pod}",
            namespace=info.namespace,
            service=info.service,
            pod=info.pod,
            cluster=cluster,
            network=cv.network,
            region=(node.region if node is not None and node.region else cv.region),
            zone=(node.zone if node is not None and node.zone else info.zone or cv.zone),
            node=info.node,
            node_address=node.address if node is not None else "",
            address=info.address,
            port=port,
            service_account=info.service_account,
            identity=identity,
            ready=info.ready and info.serving and not info.terminating,
            labels=info.labels if info.labels else EMPTY_LABELS,
            hbone_address=f"{node.address}:{HBONE_PORT}" if node is not None and node.address else "",
        )

    def _place_fields(self, cluster: str, ep: EndpointNode, node: NodeInfo | None) -> EndpointNode:
        cv = self.clusters[cluster]
        return EndpointNode(
            uid=ep.uid, namespace=ep.namespace, service=ep.service, pod=ep.pod, cluster=cluster,
            network=cv.network,
            region=(node.region if node is not None and node.region else cv.region),
            zone=(node.zone if node is not None and node.zone else cv.zone),
            node=ep.node, node_address=node.address if node is not None else "",
            address=ep.address, port=ep.port, service_account=ep.service_account,
            identity=spiffe_id(cv.trust_domain, ep.namespace, ep.service_account),
            ready=ep.ready, labels=ep.labels,
            hbone_address=f"{node.address}:{HBONE_PORT}" if node is not None and node.address else "",
        )

    def _add(self, cluster: str, key: EndpointKey, ep: EndpointNode,
             services: set[tuple[str, str]] | None = None, nodes: set[tuple[str, str]] | None = None) -> None:
        self._state[cluster].endpoints[key] = ep
        self._by_node.setdefault((cluster, ep.node), {})[key] = ep
        gw_name = ep.labels.get(GATEWAY_NAME_LABEL)
        if gw_name:
            self._gateway_pods.setdefault((cluster, ep.namespace, gw_name), {})[key] = ep
        if nodes is not None:
            nodes.add((cluster, ep.node))
        if ep.service:
            skey = (ep.namespace, ep.service)
            if cluster in self._exported_t.get(skey, ()):
                self._by_service.setdefault(skey, {}).setdefault(cluster, {})[key] = ep
                if services is not None:
                    services.add(skey)

    def _remove(self, cluster: str, key: EndpointKey, services: set[tuple[str, str]],
                nodes: set[tuple[str, str]]) -> None:
        ep = self._state[cluster].endpoints.pop(key)
        gw_name = ep.labels.get(GATEWAY_NAME_LABEL)
        if gw_name:
            gk = (cluster, ep.namespace, gw_name)
            pods = self._gateway_pods.get(gk)
            if pods is not None:
                pods.pop(key, None)
                if not pods:
                    del self._gateway_pods[gk]
        on_node = self._by_node.get((cluster, ep.node))
        if on_node is not None:
            on_node.pop(key, None)
            if not on_node:
                del self._by_node[(cluster, ep.node)]
        nodes.add((cluster, ep.node))
        if ep.service:
            skey = (ep.namespace, ep.service)
            per_cluster = self._by_service.get(skey, {}).get(cluster)
            if per_cluster is not None and key in per_cluster:
                del per_cluster[key]
                if not per_cluster:
                    del self._by_service[skey][cluster]
                services.add(skey)
