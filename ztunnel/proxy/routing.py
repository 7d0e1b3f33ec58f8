"""Gateway API route weights in the node ztunnel: which backend *service* a connection goes to.

A Service with `routes` (an HTTPRoute/TCPRoute attached to it, GAMMA style: `checkout` split 90/10
between `checkout` and `checkout-v2`) is a virtual front: the application dials the parent's VIP or
hostname, and each new connection is sent to one backend service drawn by weight. The endpoint
inside that backend is then picked exactly as for an unrouted service (tiers, weights, outlier
ejection, connect retry: `ztunnel.api.lb`), and the connection is that backend's in metrics, access
logs and outlier counters (`destination_service` names the backend actually used).

Decide, then act: `decide_route` is pure. Randomness comes in as one float in [0, 1) (the proxy's
injected random source), and the endpoints' usability as a mapping the proxy computes from its
outlier detectors, so a seeded test can check the split over many draws.

Rules (Gateway API backendRef semantics, at L4 and per connection):
- a backend is drawn with probability weight / sum of positive weights; weight 0 takes no traffic,
  not even as a fallback (that is how an operator drains a canary);
- a backend with the same hostname as the parent means the parent's own endpoints (`checkout`
  90 → checkout's pods); routes are not followed again from a backend (one level, no loops);
- a drawn backend this proxy cannot use (not in its config, no matching port, or no endpoint that
  is healthy and not ejected) is skipped, and the connection falls back to the other positive-weight
  backends with usable endpoints, largest weight first (ties by hostname), so a dead canary costs
  the client no failed connection. When no backend has a usable endpoint the drawn one is still
  tried first, then the others (the endpoint picker's panic mode may still reach a host, and the
  proxy's view of health can be stale), so the decision never refuses what might work;
- all weights 0 (or no backend resolvable): the route sends nothing, and the connection is refused
  with that reason (validation flags MF0507 for the first case).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from ztunnel.api.config import Service, WeightedBackend


@dataclass(frozen=True, slots=True)
class BackendTarget:
    """One backend service a routed connection may go to, with the port to dial on it."""

    service: Service
    port: int            # the backend service's port (same number as the parent's port dialed)
    target_port: int     # the pod port behind it
    weight: int


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a connection to a routed service goes, in the order to try."""

    parent: str                               # hostname the application dialed
    drawn: str                                # backend hostname drawn by weight ("" if none)
    order: tuple[BackendTarget, ...]          # try these in order; empty: refuse (`refused`)
    skipped: tuple[tuple[str, str], ...] = ()  # (backend hostname, why it was not tried first)
    refused: str = ""

    @property
    def fallback(self) -> bool:
        """The first backend to try is not the drawn one (it had no usable endpoint)."""
        return bool(self.order) and self.order[0].service.hostname != self.drawn

    def why_not(self, hostname: str) -> str:
        return next((why for h, why in self.skipped if h == hostname), "")


def draw_backend(routes: Sequence[WeightedBackend], rand: float) -> WeightedBackend | None:
    """The backend for `rand` in [0, 1): cumulative over positive weights in route order. None
    when no backend has a positive weight."""
    total = sum(b.weight for b in routes if b.weight > 0)
    if total <= 0:
        return None
    target = min(max(rand, 0.0), 1.0 - 1e-12) * total
    acc = 0
    last: WeightedBackend | None = None
    for b in routes:
        if b.weight <= 0:
            continue
        acc += b.weight
        last = b
        if target < acc:
            return b
    return last


def usable_endpoints(service: Service, ejected_keys: Collection[str]) -> int:
    """How many endpoints of `service` are healthy (controller's view) and not ejected locally."""
    return sum(1 for e in service.endpoints if e.healthy and e.workload_uid not in ejected_keys)


def _target(parent: Service, backend: WeightedBackend, port: int,
            services_by_host: Mapping[str, Service]) -> BackendTarget | str:
    """The backend resolved on this proxy, or why it cannot be used."""
    svc = parent if backend.hostname == parent.hostname else services_by_host.get(backend.hostname)
    if svc is None:
        return "not in this proxy's config (rejected, or not pushed yet)"
    pm = next((p for p in svc.ports if p.port == port), None)
    if pm is None and len(svc.ports) == 1:
        pm = svc.ports[0]  # a single-port backend: the backendRef's port is that one
    if pm is None:
        return f"has no port {port} (ports: {', '.join(str(p.port) for p in svc.ports)})"
    return BackendTarget(svc, pm.port, pm.target_port, backend.weight)


def decide_route(parent: Service, port: int, services_by_host: Mapping[str, Service], rand: float,
                 usable: Mapping[str, int]) -> RouteDecision:
    """Decide which backend services a connection to `parent:port` tries, in order (see the module
    docstring). `usable`: backend hostname → number of usable endpoints (missing = 0)."""
    drawn = draw_backend(parent.routes, rand)
    if drawn is None:
        return RouteDecision(parent.hostname, "", (), refused=f"route of {parent.hostname} sends no traffic: every "
                             "backend weight is 0 (give a backendRef a positive weight)")
    skipped: list[tuple[str, str]] = []
    targets: dict[str, BackendTarget] = {}
    for b in parent.routes:
        if b.weight <= 0 or b.hostname in targets:
            continue
        t = _target(parent, b, port, services_by_host)
        if isinstance(t, str):
            skipped.append((b.hostname, t))
        else:
            targets[b.hostname] = t
    if not targets:
        why = "; ".join(f"{h} {reason}" for h, reason in skipped)
        return RouteDecision(parent.hostname, drawn.hostname, (), tuple(skipped),
                             refused=f"no backend of {parent.hostname}'s route can be used here: {why}")
    # the others: those with usable endpoints first, then by weight (largest first), then name
    rest = sorted((t for h, t in targets.items() if h != drawn.hostname),
                  key=lambda t: (usable.get(t.service.hostname, 0) <= 0, -t.weight, t.service.hostname))
    first = targets.get(drawn.hostname)
    if first is not None and usable.get(drawn.hostname, 0) > 0:
        order = [first, *rest]
    else:
        if first is not None:
            skipped.append((drawn.hostname, "has no usable endpoint (none healthy and not ejected)"))
        live = [t for t in rest if usable.get(t.service.hostname, 0) > 0]
        dead = [t for t in rest if usable.get(t.service.hostname, 0) <= 0]
        order = [*live, *([first] if first is not None else []), *dead]
    return RouteDecision(parent.hostname, drawn.hostname, tuple(order), tuple(skipped))
