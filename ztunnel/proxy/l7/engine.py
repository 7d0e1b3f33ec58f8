"""One request's plan at a waypoint or an ingress gateway: decide, then the proxy acts. Pure.

`plan_request` takes where the request arrived (`Arrival`: a service at a waypoint, a listener at
an ingress gateway), the caller (`authz.Peer`, the verified identity of the tunnel's peer at a
waypoint), the request head and one random float, and returns either a `Refuse` (status, reason,
the deciding policy) or a `Forward`: the rule chosen, the rewritten request, the backend drawn by
weight, and the timeouts and retry policy in force. In order:

0. normalization (`normalize.normalize_request`): the method, target and host get their one normal
   form, or the request is refused (400, 501); everything below, and the upstream request line,
   sees only the normalized request, so authorization and routing cannot disagree with the backend
   about which resource is asked for;
1. authorization (`ztunnel.api.authz.evaluate_request`, the evaluator ztunnel and `meshfed plan`
   use): policies targeting the destination Service and those targeting the proxy's own Gateway;
   DENY before ALLOW; a denial is 403 with Envoy's body `RBAC: access denied` and the reason in
   the access log;
2. routing (`routing.select_rule`): at a waypoint, a service without any HTTPRoute goes to itself
   (GAMMA: no route, no change); with routes, a request no rule matches gets 404. At an ingress
   gateway, no match is 404;
3. the backend, drawn per request by weight; a rule whose weights are all 0 answers 500, a backend
   this proxy cannot resolve (not in its config) 500 with the name.

`L7Index` is the lookup tables of one applied config, rebuilt on every apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ztunnel.api import authz
from ztunnel.api.config import (
    Authorization,
    HeaderModifier,
    HttpBackend,
    HttpRoute,
    InferencePool,
    Listener,
    ProxyConfig,
    RetryPolicy,
    Service,
)
from ztunnel.api.identity import ProxyId
from ztunnel.proxy.l7.normalize import Malformed, normalize_request
from ztunnel.proxy.l7.routing import (
    RequestHead,
    RuleChoice,
    draw_backend,
    gateway_parents,
    rewrite_request,
    select_rule,
    service_parents,
    strip_port,
)

ISTIO_DEFAULT_RETRY = RetryPolicy()
RBAC_DENIED_BODY = b"RBAC: access denied"


@dataclass(slots=True)
class L7Index:
    gateway: str                                            # "<ns>/<name>" of this proxy's Gateway
    services_by_host: dict[str, Service] = field(default_factory=dict)
    services_by_vip: dict[tuple[str, int], Service] = field(default_factory=dict)
    routes: tuple[HttpRoute, ...] = ()
    routed_parents: frozenset[str] = frozenset()            # parents that have at least one route
    listeners_by_port: dict[int, Listener] = field(default_factory=dict)
    pools: dict[str, InferencePool] = field(default_factory=dict)
    authorizations: tuple[Authorization, ...] = ()
    targeted: frozenset[str] = frozenset()                  # every target some policy names
    trust_domain: str = ""                                  # this proxy's: bare `namespaces` entries name its

    @classmethod
    def build(cls, cfg: ProxyConfig) -> L7Index:
        pid = ProxyId.parse(cfg.proxy_id)
        gateway = f"{pid.namespace}/{pid.name}" if pid.namespace else ""
        ix = cls(gateway=gateway, trust_domain=cfg.trust_domain)
        for s in cfg.services:
            ix.services_by_host[s.hostname] = s
            if s.vip:
                for p in s.ports:
                    ix.services_by_vip[(s.vip, p.port)] = s
        ix.routes = tuple(sorted(cfg.http_routes, key=lambda r: r.key))
        ix.routed_parents = frozenset(p for r in cfg.http_routes for p in r.parents)
        ix.listeners_by_port = {x.port: x for x in cfg.listeners}
        ix.pools = {p.key: p for p in cfg.inference_pools}
        ix.authorizations = cfg.authorizations
        ix.targeted = frozenset(t for a in cfg.authorizations for t in a.targets)
        return ix

    def service_at(self, host: str, port: int) -> Service | None:
        """What a tunnel's authority names: a service hostname (or its VIP) and port."""
        svc = self.services_by_host.get(host) or self.services_by_vip.get((host, port))
        if svc is None or not any(p.port == port for p in svc.ports):
            return None
        return svc


@dataclass(frozen=True, slots=True)
class Arrival:
    """Where a request came in: `service` + `port` at a waypoint, `listener` at an ingress gateway."""

    service: Service | None = None
    port: int = 0
    listener: Listener | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    status: int
    reason: str
    policy: str = ""
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Forward:
    request: RequestHead                 # after the rule's filters
    backend: HttpBackend
    service: Service | None              # Service backends
    pool: InferencePool | None           # InferencePool backends
    target_port: int                     # the pod port to dial
    service_port: int                    # the backend service's port (authority through a gateway)
    timeout_s: float | None
    backend_timeout_s: float | None
    retry: RetryPolicy
    rule: RuleChoice | None = None       # None: a service without routes, to itself
    allowed_by: str = ""

    @property
    def response_headers(self) -> HeaderModifier | None:
        return self.rule.rule.response_headers if self.rule is not None else None

    @property
    def route_name(self) -> str:
        return self.rule.name if self.rule is not None else "default"


def _targets(ix: L7Index, arrival: Arrival) -> list[str]:
    out = [f"Gateway/{ix.gateway}"] if ix.gateway else []
    if arrival.service is not None:
        out.append(f"Service/{arrival.service.namespace}/{arrival.service.name}")
    return out


def plan_request(ix: L7Index, arrival: Arrival, peer: authz.Peer, raw: RequestHead, rand: float) -> Forward | Refuse:
    req = normalize_request(raw)
    if isinstance(req, Malformed):
        return Refuse(req.status, req.reason)
    port = arrival.port or (arrival.listener.port if arrival.listener is not None else 0)
    targets = _targets(ix, arrival)
    decision = authz.Decision(True, "allowed: no policy applies")
    if ix.targeted.intersection(targets):  # (no policy for these targets: nothing to evaluate)
        headers: dict[str, str] = {}
        for k, v in req.headers:
            headers[k] = f"{headers[k]},{v}" if k in headers else v
        decision = authz.evaluate_request(ix.authorizations, peer=peer, targets=targets, port=port,
                                          request=authz.Request(req.method, req.path, req.host, headers),
                                          local_trust_domain=ix.trust_domain)
    if not decision.allowed:
        return Refuse(403, decision.reason, decision.policy, RBAC_DENIED_BODY)
    if arrival.service is not None:
        parents = service_parents(arrival.service.hostname, arrival.port)
        listener = None
        if not ix.routed_parents.intersection(parents):
            return _to_service(ix, arrival.service, arrival.port, req, None, ISTIO_DEFAULT_RETRY, None, None,
                               decision.policy)
    elif arrival.listener is not None:
        listener = arrival.listener
        parents = gateway_parents(listener)
    else:
        return Refuse(404, "request arrived neither for a service nor on a listener")
    choice = select_rule(ix.routes, parents, req, listener)
    if choice is None:
        where = (f"service {arrival.service.hostname}:{arrival.port}" if arrival.service is not None
                 else f"listener {listener.key if listener else '?'} (host {strip_port(req.host)})")
        return Refuse(404, f"no route rule matches {req.method} {req.path} for {where}")
    rule = choice.rule
    backend = draw_backend(rule.backends, rand)
    if backend is None:
        return Refuse(500, f"{choice.name} sends nothing: no backend has a positive weight")
    rewritten = rewrite_request(req, choice)
    retry = rule.retry or ISTIO_DEFAULT_RETRY
    if backend.kind == "InferencePool":
        pool = ix.pools.get(backend.target)
        if pool is None:
            return Refuse(500, f"{choice.name}: InferencePool {backend.target} is not in this proxy's config")
        return Forward(rewritten, backend, None, pool, pool.target_ports[0], backend.port, rule.timeout_s,
                       rule.backend_timeout_s, retry, choice, decision.policy)
    svc = ix.services_by_host.get(backend.target)
    if svc is None:
        return Refuse(500, f"{choice.name}: backend {backend.target} is not in this proxy's config "
                           "(rejected, or not pushed yet)")
    return _to_service(ix, svc, backend.port, rewritten, choice, retry, rule.timeout_s, rule.backend_timeout_s,
                       decision.policy, backend)


def _to_service(ix: L7Index, svc: Service, port: int, req: RequestHead, choice: RuleChoice | None,
                retry: RetryPolicy, timeout_s: float | None, backend_timeout_s: float | None, allowed_by: str,
                backend: HttpBackend | None = None) -> Forward | Refuse:
    pm = next((p for p in svc.ports if p.port == port), None)
    if pm is None and len(svc.ports) == 1:
        pm = svc.ports[0]
    if pm is None:
        return Refuse(500, f"service {svc.hostname} has no port {port}")
    b = backend or HttpBackend("Service", svc.hostname, pm.port)
    return Forward(req, b, svc, None, pm.target_port, pm.port, timeout_s, backend_timeout_s, retry, choice,
                   allowed_by)
