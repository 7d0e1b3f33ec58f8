"""Render: one `ProxyConfig` per node ztunnel and per east-west gateway, and deltas between renders.

Deterministic: resources are sorted by key, service VIPs are derived from hostnames (below), and
nothing depends on dict order, time or randomness, so a render is a pure function of
(snapshot, observations, failover state, stamp) and golden files can pin it.

What each proxy gets:
- node ztunnel `ztunnel/<cluster>/<node>`: every global service (its VIP, ports, routes, outlier
  policy) with the endpoint view of the node's locality (`FailoverEngine.view`: tiers, weights,
  direct HBONE for the same network, the east-west gateway for other networks); the workloads
  scheduled on the node and their identities (`local_identities`); the authorization policies of
  the namespaces those workloads live in (selector-matched); the trust bundles of its own trust
  domain and of every domain federated with it both ways.
- east-west gateway `gateway/<cluster>`: the services exported from its cluster with that cluster's
  pods only (one tier; a gateway never fails over elsewhere), its own identity, the same bundles.

Scale: node proxies with the same locality (cluster, zone) share one view per service, so a
federation renders (localities × services) views, not (nodes × services); Endpoint tuples are
cached per endpoint group in the failover engine. `Renderer.update` re-renders only the services
the engine marked dirty and the nodes the graph reported, and builds each proxy's `ConfigDelta`
directly from the keys it changed (equal to `ztunnel.api.config.diff_configs(old, new)`, which the
tests check) instead of diffing whole configs.

Service VIPs: `allocate_vips` gives each hostname an address in 240.240.0.0/16 (reserved
class E space, never routed, so it cannot clash with a real pod or service address): offset =
first 4 bytes of SHA-256(hostname) mod 65534 + 1; on a collision the later hostname (in sorted
order) probes upwards. Stable across builds and controllers; a hostname moves only if a newly
added hostname that sorts before it collides with it (about 1 in 30,000 per pair).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from clusters.kube.observation import NodeInfo
from federation.core import render_l7
from federation.core.failover import FailoverEngine, Locality
from federation.core.graph import EndpointNode, GraphChange, gateway_identity
from gitops.model import GATEWAY_NAME_LABEL, AuthorizationPolicy, Gateway, ServiceKey
from ztunnel.api.authz import applies_to, applies_to_target
from ztunnel.api.config import (
    RESOURCE_TYPES,
    Authorization,
    AuthzCondition,
    AuthzMatch,
    ConfigDelta,
    Endpoint,
    HttpRoute,
    InferencePool,
    Listener,
    ProxyConfig,
    ProxyMode,
    Service,
    ServicePortMap,
    Stamp,
    TrustBundle,
    WaypointRef,
    WeightedBackend,
    Workload,
    diff_configs,
)
from ztunnel.api.identity import ProxyId

VIP_NETWORK = ipaddress.IPv4Network("240.240.0.0/16")


@functools.lru_cache(maxsize=1 << 16)
def _node_proxy_id(cluster: str, node: str) -> str:
    """`ProxyId.node_proxy` as a string, validated once per (cluster, node): every full render
    names every node proxy (10,000 regex validations per commit at 10,000 proxies)."""
    return str(ProxyId.node_proxy(cluster, node))
_VIP_SLOTS = VIP_NETWORK.num_addresses - 2


def allocate_vips(hostnames: Iterable[str]) -> dict[str, str]:
    base = int(VIP_NETWORK.network_address)
    taken: set[int] = set()
    out: dict[str, str] = {}
    for host in sorted(set(hostnames)):
        if len(taken) >= _VIP_SLOTS:
            raise ValueError(f"more than {_VIP_SLOTS} services: the VIP range {VIP_NETWORK} is full")
        slot = int.from_bytes(hashlib.sha256(host.encode()).digest()[:4], "big") % _VIP_SLOTS
        while slot in taken:
            slot = (slot + 1) % _VIP_SLOTS
        taken.add(slot)
        out[host] = str(ipaddress.IPv4Address(base + 1 + slot))
    return out


def authorization_of(p: AuthorizationPolicy) -> Authorization:
    """AuthorizationPolicy -> Authorization: each (rule, source) becomes one match; a rule
    without sources is one match on its operation alone (ALLOW: any match allows). `targetRefs`
    become "Service/<ns>/<name>" / "Gateway/<ns>/<name>" targets (enforced by an L7 proxy)."""
    matches: list[AuthzMatch] = []
    for rule in p.rules:
        op = {"ports": rule.ports, "not_ports": rule.not_ports, "methods": rule.methods,
              "not_methods": rule.not_methods, "paths": rule.paths, "not_paths": rule.not_paths,
              "hosts": rule.hosts, "not_hosts": rule.not_hosts,
              "when": tuple(AuthzCondition(w.key, w.values, w.not_values) for w in rule.when)}
        sources = rule.from_ or ()
        if not sources:
            matches.append(AuthzMatch(**op))  # type: ignore[arg-type]
        for s in sources:
            matches.append(AuthzMatch(s.principals, s.not_principals, s.namespaces, s.not_namespaces,
                                      **op))  # type: ignore[arg-type]
    targets = tuple(f"{t.kind}/{p.namespace}/{t.name}" for t in p.target_refs)
    return Authorization(p.name, p.namespace, p.action.value, tuple(matches), dict(p.selector), targets)


@dataclass(frozen=True, slots=True)
class ProxySpec:
    proxy_id: str
    mode: ProxyMode
    cluster: str
    node: str            # "" for a gateway
    locality: Locality
    gateway: Gateway | None = None  # waypoint / ingress: the Gateway object it serves

    @property
    def shares_views(self) -> bool:
        """Node proxies and L7 proxies get the per-locality service views (east-west gateways do not)."""
        return self.mode is not ProxyMode.GATEWAY


@dataclass(slots=True)
class _ProxyState:
    spec: ProxySpec
    version: int = 0
    resources: dict[str, dict[str, object]] = field(default_factory=dict)
    local_identities: tuple[str, ...] = ()
    config: ProxyConfig | None = None


@dataclass(frozen=True, slots=True)
class RenderUpdate:
    deltas: Mapping[str, ConfigDelta]
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


class Renderer:
    """Keeps the last rendered config of every proxy and produces versioned deltas."""

    def __init__(self, engine: FailoverEngine, epoch: int = 1,
                 bundle_roots: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self.engine = engine
        self.epoch = epoch
        self.bundle_roots = dict(bundle_roots or {})
        self._proxies: dict[str, _ProxyState] = {}
        self._class_services: dict[Locality, dict[str, Service]] = {}
        self._by_view_id: dict[tuple[int, str, WaypointRef | None], Service] = {}
        self._prepare()

    # --- static parts (per snapshot) ----------------------------------------------------------

    def _prepare(self) -> None:
        graph = self.engine.graph
        snap = self.engine.snapshot
        self.revision = snap.revision.sha
        self.hostnames = sorted(graph.hostnames)
        self.vips = allocate_vips(self.hostnames)
        self._routes: dict[ServiceKey, tuple[WeightedBackend, ...]] = {}
        for r in sorted(snap.routes, key=lambda r: (r.namespace, r.name)):
            backends = []
            for b in r.backends:
                target = snap.services.get(ServiceKey(b.namespace, b.name))
                if target is not None:
                    backends.append(WeightedBackend(target.hostname, b.weight))
            # a service behind a waypoint is split per request there, not per connection here
            parent = r.parent_service
            if backends and parent is not None and parent in snap.services and snap.waypoint_for(parent) is None:
                self._routes[parent] = tuple(backends)
        self._authz = sorted((authorization_of(p) for p in snap.authorization_policies), key=lambda a: a.key)
        self._ports = {k: tuple(ServicePortMap(p.port, p.target_port, p.app_protocol) for p in s.ports)
                       for k, s in graph.services.items()}
        # L7: which services go through which waypoint; each L7 proxy's routes (static per snapshot)
        self._waypoint_of: dict[ServiceKey, Gateway] = {}
        for k in graph.services:
            gw = snap.waypoint_for(k)
            if gw is not None:
                self._waypoint_of[k] = gw
        self._l7_routes: dict[ServiceKey, tuple[HttpRoute, ...]] = {
            gk: render_l7.routes_for(gw, snap) for gk, gw in snap.gateways.items()}

    def _node_locality(self, cluster: str, node: NodeInfo) -> Locality:
        cv = self.engine.graph.clusters[cluster]
        return Locality(cv.network, cluster, node.region or cv.region, node.zone or cv.zone,
                        tuple(sorted((k, v) for k, v in node.labels.items() if k in self.engine.relevant_labels)))

    def node_localities(self) -> set[Locality]:
        """The localities of the node proxies (what failover is evaluated for), without building
        every proxy's spec."""
        graph = self.engine.graph
        return {self._node_locality(name, node) for name in graph.clusters for node in graph.nodes_of(name).values()}

    def proxy_specs(self) -> list[ProxySpec]:
        graph = self.engine.graph
        out: list[ProxySpec] = []
        for name, cv in graph.clusters.items():
            for node_name, node in sorted(graph.nodes_of(name).items()):
                out.append(ProxySpec(_node_proxy_id(name, node_name), ProxyMode.NODE, name, node_name,
                                     self._node_locality(name, node)))
            if cv.gateway:
                out.append(ProxySpec(str(ProxyId.gateway(name)), ProxyMode.GATEWAY, name, "",
                                     Locality(cv.network, name, cv.region, cv.zone)))
            for gw in self.engine.snapshot.gateways.values():
                if gw.runs_in(name):
                    out.append(ProxySpec(render_l7.l7_proxy_id(gw, name), render_l7.l7_mode(gw), name, "",
                                         Locality(cv.network, name, cv.region, cv.zone), gw))
        return out

    # --- pieces -------------------------------------------------------------------------------

    def _vip(self, key: ServiceKey, cluster: str) -> str:
        """The viewer cluster's apps dial the Service's clusterIP there (through the DNS responder of its node proxy), so that
        is the VIP its proxies capture; the allocated VIP when the cluster has no such Service."""
        return (self.engine.graph.cluster_ips.get((cluster, key.namespace, key.name))
                or self.vips[self.engine.policies[key].hostname])

    def _waypoint(self, key: ServiceKey, cluster: str) -> WaypointRef | None:
        gw = self._waypoint_of.get(key)
        return render_l7.waypoint_ref(gw, cluster, self.engine.graph) if gw is not None else None

    def _service(self, key: ServiceKey, endpoints: tuple[Endpoint, ...], cluster: str = "",
                 vip: str | None = None, waypoint: WaypointRef | None = None) -> Service:
        policy = self.engine.policies[key]
        vip = vip if vip is not None else self._vip(key, cluster)
        return Service(
            hostname=policy.hostname, namespace=key.namespace, name=key.name, vip=vip,
            ports=self._ports[key], endpoints=endpoints,
            subject_alt_names=tuple(sorted({e.identity for e in endpoints})),
            outlier=policy.outlier, connect_timeout_s=policy.connect_timeout_s,
            routes=self._routes.get(key, ()), policy_source=policy.source_text,
            waypoint=waypoint if waypoint is not None else (self._waypoint(key, cluster) if cluster else None),
            connection_pool=policy.connection_pool,
        )

    def service_for(self, key: ServiceKey, spec: ProxySpec) -> Service | None:
        if spec.mode is ProxyMode.GATEWAY:
            if spec.cluster not in self.engine.graph.exported_from(key):
                return None
            return self._service(key, self.engine.gateway_endpoints(key, spec.cluster), spec.cluster)
        return self._service(key, self.engine.view(key, spec.locality).endpoints, spec.cluster)

    def _view_service(self, key: ServiceKey, loc: Locality) -> Service:
        """The Service resource for a node locality; localities with the same view share it."""
        view = self.engine.view(key, loc)
        vip = self._vip(key, loc.cluster)  # share across clusters unless their clusterIPs differ
        waypoint = self._waypoint(key, loc.cluster)  # each cluster has its own waypoint pods
        svc = self._by_view_id.get((view.view_id, vip, waypoint))
        if svc is None:
            svc = self._by_view_id[(view.view_id, vip, waypoint)] = self._service(key, view.endpoints, vip=vip,
                                                                                  waypoint=waypoint)
        return svc

    def _workloads(self, spec: ProxySpec) -> tuple[list[Workload], tuple[str, ...], list[Authorization]]:
        if spec.mode is ProxyMode.GATEWAY:
            td = self.engine.graph.clusters[spec.cluster].trust_domain
            return [], (gateway_identity(td),), []
        if spec.gateway is not None:  # waypoint or ingress: its own identity, the policies it enforces
            gw = spec.gateway
            td = self.engine.graph.clusters[spec.cluster].trust_domain
            targets = {f"Gateway/{gw.namespace}/{gw.name}"}
            if gw.is_waypoint:
                targets |= {f"Service/{k.namespace}/{k.name}" for k, w in self._waypoint_of.items() if w.key == gw.key}
            authz = [a for a in self._authz if any(applies_to_target(a, t) for t in targets)]
            return [], (render_l7.gateway_identity_of(gw, td),), authz
        graph = self.engine.graph
        pods: dict[str, EndpointNode] = {}
        # a pod behind several services is one workload: take its first endpoint by key, never by
        # arrival order (an incremental render and a full one must pick the same entry)
        for _key, ep in sorted(graph.workloads_on(spec.cluster, spec.node).items()):
            # waypoint and ingress pods are not captured: they are proxies, with their own identity
            if GATEWAY_NAME_LABEL not in ep.labels:
                pods.setdefault(ep.uid, ep)
        workloads = [
            Workload(uid=ep.uid, name=ep.pod, namespace=ep.namespace, cluster=ep.cluster, network=ep.network,
                     node=ep.node, address=ep.address, identity=ep.identity, service_account=ep.service_account,
                     region=ep.region, zone=ep.zone, node_address=ep.node_address, labels=ep.labels)
            for uid, ep in sorted(pods.items())
        ]
        identities = tuple(sorted({w.identity for w in workloads}))
        # who a policy applies to is the evaluator's decision (root-namespace policies are mesh-wide)
        authz = [a for a in self._authz if any(applies_to(a, w.namespace, w.labels) for w in workloads)]
        return workloads, identities, authz

    def _l7(self, spec: ProxySpec) -> tuple[tuple[HttpRoute, ...], tuple[Listener, ...], tuple[InferencePool, ...]]:
        """An L7 proxy's routes, listeners and inference pools (empty for the others)."""
        gw = spec.gateway
        if gw is None:
            return (), (), ()
        routes = self._l7_routes.get(gw.key, ())
        snap = self.engine.snapshot
        pools = tuple(render_l7.pool_of(snap.inference_pools[ServiceKey(*k.split("/", 1))], spec.cluster,
                                        self.engine.graph)
                      for k in render_l7.pools_for(routes) if ServiceKey(*k.split("/", 1)) in snap.inference_pools)
        return routes, render_l7.listeners_of(gw), pools

    def _bundles(self, cluster: str) -> list[TrustBundle]:
        # one list per cluster and snapshot (the trust graph is the snapshot's): the cluster's
        # proxies share the TrustBundle objects, which the config server then compares by identity
        cache: dict[str, list[TrustBundle]] = self.__dict__.setdefault("_bundle_cache", {})
        got = cache.get(cluster)
        if got is None:
            got = cache[cluster] = [TrustBundle(td, self.bundle_roots.get(td, ()))
                                    for td in self.engine.trust.bundle_set(cluster)]
        return got

    # --- full render --------------------------------------------------------------------------

    def render_all(self) -> dict[str, ProxyConfig]:
        """Render every proxy from scratch (first render, or after a new fleet revision). Versions
        go up by one for proxies whose content changed (or that are new)."""
        self._prepare()
        self._class_services.clear()
        self.engine.take_dirty()
        out: dict[str, ProxyConfig] = {}
        specs = self.proxy_specs()
        wanted = {s.proxy_id for s in specs}
        for pid in [p for p in self._proxies if p not in wanted]:
            del self._proxies[pid]
        self._by_view_id.clear()
        keys = [(h, self.engine.graph.hostnames[h]) for h in self.hostnames]
        for spec in specs:
            services: dict[str, object]
            if spec.shares_views:
                per_class = self._class_services.get(spec.locality.class_key)
                if per_class is None:
                    per_class = self._class_services[spec.locality.class_key] = {
                        h: self._view_service(k, spec.locality) for h, k in keys}
                services = dict(per_class)
            else:
                services = {}
                for _h, k in keys:
                    svc = self.service_for(k, spec)
                    if svc is not None:
                        services[svc.hostname] = svc
            workloads, identities, authz = self._workloads(spec)
            routes, listeners, pools = self._l7(spec)
            resources: dict[str, dict[str, object]] = {
                "workloads": {w.key: w for w in workloads},
                "services": services,
                "authorizations": {a.key: a for a in authz},
                "bundles": {b.key: b for b in self._bundles(spec.cluster)},
                "http_routes": {r.key: r for r in routes},
                "listeners": {x.key: x for x in listeners},
                "inference_pools": {p.key: p for p in pools},
            }
            state = self._proxies.get(spec.proxy_id)
            if state is None:
                state = self._proxies[spec.proxy_id] = _ProxyState(spec)
            changed = state.resources != resources or state.local_identities != identities or state.version == 0
            state.spec = spec
            if changed:
                state.version += 1
                state.resources = resources
                state.local_identities = identities
                state.config = None
            out[spec.proxy_id] = self.config(spec.proxy_id)
        return out

    def config(self, proxy_id: str) -> ProxyConfig:
        state = self._proxies[proxy_id]
        if state.config is None:
            spec = state.spec
            cv = self.engine.graph.clusters[spec.cluster]
            # (map over the sorted keys: this runs for every proxy of a full render)
            kinds = {kind: tuple(map(items.__getitem__, sorted(items)))
                     for kind in RESOURCE_TYPES for items in (state.resources[kind],)}
            state.config = ProxyConfig(
                proxy_id=spec.proxy_id, mode=spec.mode, cluster=spec.cluster, network=cv.network,
                trust_domain=cv.trust_domain, stamp=Stamp(self.epoch, self.revision, state.version),
                local_identities=state.local_identities, **kinds)  # type: ignore[arg-type]
        return state.config

    def proxy_ids(self) -> list[str]:
        return sorted(self._proxies)

    # --- incremental --------------------------------------------------------------------------

    def update(self, change: GraphChange | None = None) -> RenderUpdate:
        """Re-render what the engine marked dirty and the nodes `change` names; return one delta
        per proxy whose config changed."""
        if change is not None and change.node_set_changed:
            # A re-render of everything: new proxies get their full state, existing ones whose
            # content changed (a cluster's first nodes add its endpoints to every other cluster's
            # views) the delta from what they had.
            old = {pid: self.config(pid) for pid in self._proxies}
            self.render_all()
            before, after = set(old), set(self._proxies)
            full = {pid: self._full_delta(pid) for pid in sorted(after - before)}
            for pid in sorted(after & before):
                if self._proxies[pid].version != old[pid].stamp.version:
                    full[pid] = diff_configs(old[pid], self.config(pid))
            return RenderUpdate(full, tuple(sorted(after - before)), tuple(sorted(before - after)))
        dirty = self.engine.take_dirty()
        removals_early: dict[str, dict[str, list[str]]] = {}
        if change is not None and change.gateways:
            # a waypoint's pods came, went or changed readiness: the services that use it carry
            # its addresses in every view of that cluster
            moved = {(c, ns, name) for c, ns, name in change.gateways}
            dirty |= {k for k, gw in self._waypoint_of.items()
                      if any((c, gw.namespace, gw.name) in moved for c in self.engine.graph.clusters)}
        upserts: dict[str, dict[str, list[object]]] = {}
        ids_changed: dict[str, tuple[str, ...]] = {}
        by_class: dict[Locality, list[_ProxyState]] = {}
        for state in self._proxies.values():
            if state.spec.shares_views:
                by_class.setdefault(state.spec.locality.class_key, []).append(state)
            if state.spec.gateway is not None and change is not None:
                # inference pools follow their pods (readiness, placement): recomputed, sent if changed
                pools = {p.key: p for p in self._l7(state.spec)[2]}
                if pools != state.resources["inference_pools"]:
                    upserts.setdefault(state.spec.proxy_id, {})["inference_pools"] = [
                        p for k, p in pools.items() if state.resources["inference_pools"].get(k) != p]
                    gone_pools = [k for k in state.resources["inference_pools"] if k not in pools]
                    if gone_pools:
                        removals_early.setdefault(state.spec.proxy_id, {})["inference_pools"] = gone_pools
        for key in sorted(dirty, key=str):
            host = self.engine.policies[key].hostname
            for ck, members in by_class.items():
                per_class = self._class_services.setdefault(ck, {})
                new = self._view_service(key, members[0].spec.locality)
                if per_class.get(host) == new:
                    continue
                per_class[host] = new
                for st in members:
                    upserts.setdefault(st.spec.proxy_id, {}).setdefault("services", []).append(new)
            for cluster in sorted(self.engine.graph.exported_from(key)):
                pid = str(ProxyId.gateway(cluster))
                gw_state = self._proxies.get(pid)
                if gw_state is None:
                    continue
                svc = self.service_for(key, gw_state.spec)
                if svc is not None and gw_state.resources["services"].get(host) != svc:
                    upserts.setdefault(pid, {}).setdefault("services", []).append(svc)
        removals: dict[str, dict[str, list[str]]] = removals_early
        for cluster, node in sorted(change.nodes if change is not None else ()):
            pid = str(ProxyId.node_proxy(cluster, node))
            node_state = self._proxies.get(pid)
            if node_state is None:
                continue
            workloads, identities, authz = self._workloads(node_state.spec)
            node_resources: tuple[tuple[str, dict[str, object]], ...] = (
                ("workloads", {w.key: w for w in workloads}), ("authorizations", {a.key: a for a in authz}))
            for kind, new_items in node_resources:
                old_items = node_state.resources[kind]
                for k, r in new_items.items():
                    if old_items.get(k) != r:
                        upserts.setdefault(pid, {}).setdefault(kind, []).append(r)
                gone = [k for k in old_items if k not in new_items]
                if gone:
                    removals.setdefault(pid, {})[kind] = gone
            if identities != node_state.local_identities:
                ids_changed[pid] = identities
        deltas: dict[str, ConfigDelta] = {}
        for pid in sorted(set(upserts) | set(removals) | set(ids_changed)):
            st = self._proxies[pid]
            ups = upserts.get(pid, {})
            rems = removals.get(pid, {})
            for kind, items in ups.items():
                for r in items:
                    st.resources[kind][r.key] = r  # type: ignore[attr-defined]
            for kind, keys in rems.items():
                for k in keys:
                    del st.resources[kind][k]
            if pid in ids_changed:
                st.local_identities = ids_changed[pid]
            base = st.version
            st.version += 1
            st.config = None
            deltas[pid] = ConfigDelta(
                proxy_id=pid, stamp=Stamp(self.epoch, self.revision, st.version), base_version=base,
                upserts={kind: tuple(sorted(ups.get(kind, ()), key=lambda r: r.key))  # type: ignore[attr-defined]
                         for kind in RESOURCE_TYPES},
                removals={kind: tuple(sorted(rems.get(kind, ()))) for kind in RESOURCE_TYPES},
                local_identities=ids_changed.get(pid),
            )
        return RenderUpdate(deltas)

    def _full_delta(self, pid: str) -> ConfigDelta:
        cfg = self.config(pid)
        return ConfigDelta(pid, cfg.stamp, 0, {kind: getattr(cfg, kind) for kind in RESOURCE_TYPES},
                           {kind: () for kind in RESOURCE_TYPES}, cfg.local_identities)


def render_configs(engine: FailoverEngine, epoch: int = 1,
                   bundle_roots: Mapping[str, tuple[str, ...]] | None = None) -> dict[str, ProxyConfig]:
    """One-shot pure render (a new Renderer each time): what golden files pin."""
    return Renderer(engine, epoch, bundle_roots).render_all()
