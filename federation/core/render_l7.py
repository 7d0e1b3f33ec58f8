"""What the L7 proxies get, decided once per fleet revision (and per cluster where pods matter).

A Gateway API `Gateway` in the fleet is one L7 proxy per cluster it runs in (`Gateway.runs_in`):
a waypoint (class `istio-waypoint`, proxy id `waypoint/<cluster>/<ns>/<name>`) or an ingress
gateway (any other class, `ingress/<cluster>/<ns>/<name>`). Both run the same engine
(`ztunnel.proxy.l7`); this module turns the fleet's objects into the resources that engine reads:

- `http_route_of`: an HTTPRoute or GRPCRoute as an `HttpRoute` (parents as "Service/<host>:<port>"
  or "Gateway/<ns>/<name>/<listener>", backends by hostname or pool, Istio's retry defaults
  filled in: 2 retries on connect failure, reset or 503, 25 ms base backoff);
- `listeners_of`: an ingress gateway's HTTP listeners;
- `pool_of`: an InferencePool resolved to the selected pods of one cluster (an inference pool
  is cluster-local, as in the Inference Extension: the picker reads each pod's queue);
- `waypoint_ref`: what a node proxy needs to send a service's traffic to its waypoint in its own
  cluster (ready pods' HBONE addresses), and what a destination ztunnel needs to take the caller's
  identity from a waypoint (the waypoint's identities in every cluster).

Identities: a waypoint presents `spiffe://<td>/ns/<ns>/sa/<gateway name>` (Istio's waypoint
service account is the Gateway's name), an ingress gateway `.../sa/<gateway name>-istio` (what
Istio's gateway deployment controller names it). Pure: no I/O, nothing reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from federation.core.graph import EndpointGraph, spiffe_id
from gitops.model import (
    ConfigSnapshot,
    Gateway,
    HeaderFilter,
    Route,
    RouteMatch,
    RouteRule,
    ServiceKey,
    gateway_service_account,
)
from gitops.model import InferencePool as PoolSpec
from ztunnel.api.config import (
    Endpoint,
    Header,
    HeaderModifier,
    HttpBackend,
    HttpMatch,
    HttpRoute,
    HttpRouteRule,
    InferencePool,
    Listener,
    NamedMatch,
    ProxyMode,
    RetryPolicy,
    StringMatch,
    UrlRewrite,
    WaypointRef,
)
from ztunnel.api.ports import HBONE_PORT

ISTIO_DEFAULT_RETRY = RetryPolicy()


def l7_mode(gw: Gateway) -> ProxyMode:
    return ProxyMode.WAYPOINT if gw.is_waypoint else ProxyMode.INGRESS


def l7_proxy_id(gw: Gateway, cluster: str) -> str:
    return f"{l7_mode(gw).value}/{cluster}/{gw.namespace}/{gw.name}"


def gateway_identity_of(gw: Gateway, trust_domain: str) -> str:
    return spiffe_id(trust_domain, gw.namespace, gateway_service_account(gw))


def waypoint_ref(gw: Gateway, cluster: str, graph: EndpointGraph) -> WaypointRef:
    """The waypoint as seen from `cluster`: its ready pods there, its identities everywhere."""
    td = graph.clusters[cluster].trust_domain
    pods = graph.gateway_pods(cluster, gw.namespace, gw.name) if gw.runs_in(cluster) else {}
    addresses = tuple(sorted(f"{p.address}:{HBONE_PORT}" for p in pods.values() if p.ready and p.address))
    identities = tuple(sorted({gateway_identity_of(gw, cv.trust_domain) for c, cv in graph.clusters.items()
                               if gw.runs_in(c)}))
    return WaypointRef(gw.name, gw.namespace, gateway_identity_of(gw, td), addresses, identities)


# --- routes ----------------------------------------------------------------------------------------


def _match(mt: RouteMatch) -> HttpMatch:
    return HttpMatch(
        path=StringMatch(mt.path_type, mt.path) if mt.path_type else None,
        headers=tuple(NamedMatch(n.lower(), v, t) for t, n, v in mt.headers),
        query=tuple(NamedMatch(n, v, t) for t, n, v in mt.query), method=mt.method)


def _modifier(f: HeaderFilter | None) -> HeaderModifier | None:
    if f is None:
        return None
    return HeaderModifier(tuple(Header(n.lower(), v) for n, v in f.set), tuple(Header(n.lower(), v) for n, v in f.add),
                          tuple(n.lower() for n in f.remove))


def _backends(rule: RouteRule, snap: ConfigSnapshot) -> tuple[HttpBackend, ...]:
    out: list[HttpBackend] = []
    for b in rule.backends:
        if b.kind == "InferencePool":
            pool = snap.inference_pools.get(ServiceKey(b.namespace, b.name))
            if pool is not None:
                out.append(HttpBackend("InferencePool", f"{b.namespace}/{b.name}", b.port or pool.target_ports[0],
                                       b.weight))
            continue
        svc = snap.services.get(ServiceKey(b.namespace, b.name))
        if svc is not None:
            # Gateway API requires a port on Service backends; a pasted example without one means
            # the service's (first) port, as the guide's inference route is written.
            out.append(HttpBackend("Service", svc.hostname, b.port or svc.ports[0].port, b.weight))
    return tuple(out)


def _rule(rule: RouteRule, snap: ConfigSnapshot) -> HttpRouteRule:
    retry = ISTIO_DEFAULT_RETRY
    if rule.retry is not None:
        retry = RetryPolicy(
            attempts=rule.retry.attempts if rule.retry.attempts is not None else ISTIO_DEFAULT_RETRY.attempts,
            codes=rule.retry.codes or ISTIO_DEFAULT_RETRY.codes,
            backoff_s=rule.retry.backoff_s if rule.retry.backoff_s is not None else ISTIO_DEFAULT_RETRY.backoff_s)
    rewrite = None
    if rule.rewrite_hostname or rule.rewrite_path_type:
        rewrite = UrlRewrite(rule.rewrite_hostname, rule.rewrite_path_type, rule.rewrite_path)
    return HttpRouteRule(
        name=rule.name, matches=tuple(_match(m) for m in rule.matches),
        request_headers=_modifier(rule.request_headers), response_headers=_modifier(rule.response_headers),
        rewrite=rewrite, backends=_backends(rule, snap),
        timeout_s=rule.timeout_s or None, backend_timeout_s=rule.backend_timeout_s or None, retry=retry)


def http_route_of(route: Route, snap: ConfigSnapshot) -> HttpRoute:
    parents: list[str] = []
    for p in route.parents:
        if p.kind == "Service":
            svc = snap.services.get(ServiceKey(p.namespace, p.name))
            if svc is not None:
                parents.append(f"Service/{svc.hostname}:{p.port or 0}")
        else:
            parents.append(f"Gateway/{p.namespace}/{p.name}/{p.section}")
    commit = snap.revision.sha[:12]
    return HttpRoute(namespace=route.namespace, name=route.name, kind=route.kind, parents=tuple(parents),
                     rules=tuple(_rule(r, snap) for r in route.rules), hostnames=route.hostnames,
                     source=f"{route.pos}@{commit}")


def routes_for(gw: Gateway, snap: ConfigSnapshot) -> tuple[HttpRoute, ...]:
    """The routes one L7 proxy applies: a waypoint, the HTTP/GRPC routes attached to the services
    that use it; an ingress gateway, the routes attached to it."""
    out: list[HttpRoute] = []
    for r in snap.routes:
        if r.kind == "TCPRoute":
            continue
        if gw.is_waypoint:
            mine = any(p.kind == "Service" and (w := snap.waypoint_for(ServiceKey(p.namespace, p.name))) is not None
                       and w.key == gw.key for p in r.parents)
        else:
            mine = any(p.kind == "Gateway" and p.namespace == gw.namespace and p.name == gw.name for p in r.parents)
        if mine:
            out.append(http_route_of(r, snap))
    return tuple(sorted(out, key=lambda x: x.key))


def listeners_of(gw: Gateway) -> tuple[Listener, ...]:
    if gw.is_waypoint:
        return ()
    return tuple(Listener(f"{gw.namespace}/{gw.name}", x.name, x.port, x.protocol, x.hostname) for x in gw.listeners)


# --- inference pools -------------------------------------------------------------------------------


def pools_for(routes: Iterable[HttpRoute]) -> tuple[str, ...]:
    return tuple(sorted({b.target for r in routes for rule in r.rules for b in rule.backends
                         if b.kind == "InferencePool"}))


def pool_of(spec: PoolSpec, cluster: str, graph: EndpointGraph) -> InferencePool:
    """The pool's pods in `cluster`: pods of its namespace whose labels match the selector."""
    cv = graph.clusters[cluster]
    port = spec.target_ports[0]
    endpoints = tuple(
        Endpoint(workload_uid=ep.uid, cluster=cluster, network=cv.network, address=ep.address, port=port,
                 hbone_address=ep.hbone_address, identity=ep.identity, healthy=ep.ready, region=ep.region,
                 zone=ep.zone)
        for ep in graph.endpoints_in_namespace(cluster, spec.namespace)
        if ep.hbone_address and _selects(spec.selector, ep.labels))
    return InferencePool(namespace=spec.namespace, name=spec.name, target_ports=spec.target_ports,
                         endpoints=endpoints, picker=spec.picker_name, failure_mode=spec.failure_mode)


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
