"""Pure decisions of a node proxy: what a connection is for, before any socket is touched.

`plan_outbound` resolves what an application dialed (a service VIP, a global hostname, a workload
address) to the service and endpoints to try; `plan_inbound` decides, for a tunnel a peer opened,
which local workload it targets and whether L4 authorization (`ztunnel.api.authz`, the evaluator
`meshfed plan` also uses) allows it. The proxies (`node`, `gateway`) act on the plans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ztunnel.api import authz
from ztunnel.api.config import Endpoint, ProxyConfig, Service, Workload
from ztunnel.api.identity import SpiffeId
from ztunnel.api.outlier import Outcome
from ztunnel.api.ports import ADMIN_PORT, HBONE_PORT, OUTBOUND_CAPTURE_PORT, SOCKS5_PORT
from ztunnel.xds.state import parse_host_port


class FailedAttempt(Enum):
    """How one attempt to open a tunnel to an endpoint failed (the adapter's exception, classified)."""

    REFUSED = "refused"              # a proxy on the path answered the CONNECT with a non-2xx status
    TIMEOUT = "timeout"              # no tunnel within the connect timeout
    CONNECT_ERROR = "connect_error"  # refused/reset socket, TLS failure, identity check failed
    INTERNAL_ERROR = "internal"      # a bug on our side


@dataclass(frozen=True, slots=True)
class AttemptVerdict:
    outcome: Outcome | None   # what the endpoint's outlier detector is told; None: nothing
    try_next: bool            # try another endpoint (possibly in the next tier: a failover)
    why: str


def judge_failed_attempt(kind: FailedAttempt, status: int = 0, overloaded: bool = False,
                         self_saturated: bool = False) -> AttemptVerdict:
    """The one decision of what a failed connect attempt says about its endpoint.

    A refusal a proxy makes because it is *saturated* (it sheds load: too many connection setups in
    flight, `x-meshfed-overloaded` on its 503) says nothing about the endpoint's health: it feeds no
    outlier detector — no ejection — and is not retried on another endpoint or tier — no failover,
    which would move load to a cluster whose endpoints did not fail and, behind the same gateway,
    meet the same saturation. The client sees the refusal at once. Likewise a timeout while *this*
    proxy was saturated (`self_saturated`: its own event loop ran late during the attempt, see
    `ztunnel.proxy.overload.LagHistory`): the time went to our own queue. A refusal that is a decision
    (400 bad request, 403 denied, 404 no route) is final as well. Everything else is the endpoint's
    failure: counted, and the next endpoint is tried."""
    if kind is FailedAttempt.REFUSED:
        if overloaded:
            return AttemptVerdict(None, False, "overloaded")
        if status in (400, 403, 404):
            return AttemptVerdict(None, False, "decision")
        return AttemptVerdict(Outcome.CONNECT_FAILURE, True, "endpoint_failure")
    if kind is FailedAttempt.TIMEOUT:
        if self_saturated:
            return AttemptVerdict(None, False, "self_saturated")
        return AttemptVerdict(Outcome.TIMEOUT, True, "endpoint_failure")
    if kind is FailedAttempt.CONNECT_ERROR:
        return AttemptVerdict(Outcome.CONNECT_FAILURE, True, "endpoint_failure")
    return AttemptVerdict(Outcome.LOCAL_ORIGIN_FAILURE, True, "internal_error")


def sni_for_identity(identity: str) -> str:
    """A TLS server name that names a workload identity: `<sa>.<ns>.sa.<trust domain>`."""
    sid = SpiffeId.parse(identity)
    return f"{sid.service_account}.{sid.namespace}.sa.{sid.trust_domain}"


@dataclass(frozen=True, slots=True)
class OutboundPlan:
    service: Service | None
    endpoints: tuple[Endpoint, ...]
    port: int                   # the port the application dialed (service port)
    target_port: int            # the pod port
    description: str
    refused: str = ""           # non-empty: refuse with this reason


def plan_outbound(cfg: ProxyConfig, ix: Any, host: str, port: int, is_hostname: bool) -> OutboundPlan:
    """Resolve what the application dialed to a service (VIP or hostname) or a workload IP."""
    svc: Service | None = ix.services_by_host.get(host) if is_hostname else ix.services_by_vip.get((host, port))
    if svc is not None:
        pm = next((p for p in svc.ports if p.port == port), None)
        if pm is None:
            return OutboundPlan(svc, (), port, port, svc.hostname,
                                refused=f"service {svc.hostname} has no port {port} (ports: "
                                        f"{', '.join(str(p.port) for p in svc.ports)})")
        return OutboundPlan(svc, svc.endpoints, port, pm.target_port, svc.hostname)
    if not is_hostname:
        e = ix.find_endpoint_by_address(host)  # a pod IP that is an endpoint of a service
        if e is not None:
            ep = Endpoint(workload_uid=e.workload_uid, cluster=e.cluster, network=e.network,
                          address=host, port=port, hbone_address=e.hbone_address, identity=e.identity)
            return OutboundPlan(None, (ep,), port, port, f"{host}:{port}")
        w: Workload | None = ix.workloads_by_address.get(host)
        if w is not None and w.node_address:
            ep = Endpoint(workload_uid=w.uid, cluster=w.cluster, network=w.network, address=w.address,
                          port=port, hbone_address=f"{w.node_address}:{HBONE_PORT}", identity=w.identity)
            return OutboundPlan(None, (ep,), port, port, f"{w.namespace}/{w.name}")
    return OutboundPlan(None, (), port, port, f"{host}:{port}",
                        refused=f"{host}:{port} is not a known service or workload of the mesh "
                                "(check the service's VIP/hostname and that the controller pushed it)")


@dataclass(frozen=True, slots=True)
class InboundPlan:
    target: tuple[str, int] | None
    workload: Workload | None
    status: int
    reason: str
    policy: str = ""


def plan_inbound(cfg: ProxyConfig, ix: Any, authority: str, peer_identity: str,
                 own_addresses: Iterable[tuple[str, int]], root_namespace: str = authz.ROOT_NAMESPACE,
                 pick: Callable[[list[tuple[Workload, int]]], tuple[Workload, int]] | None = None) -> InboundPlan:
    """Decide what an inbound CONNECT may reach: a local pod and port, or a refusal with reason."""
    try:
        host, port = parse_host_port(authority)
    except ValueError as e:
        return InboundPlan(None, None, 400, f"bad :authority: {e}")
    if (host, port) in set(own_addresses) or (port in (HBONE_PORT, SOCKS5_PORT, OUTBOUND_CAPTURE_PORT, ADMIN_PORT)
                                              and host in {h for h, _ in own_addresses}):
        return InboundPlan(None, None, 403, f"CONNECT to the proxy's own port {host}:{port} refused (loop)")
    w: Workload | None
    target_port = port
    if host in ix.workloads_by_address:
        w = ix.local_workloads_by_address.get(host)
        if w is None:
            return InboundPlan(None, None, 404, f"{host} is not a workload on this node")
    else:
        svc = ix.services_by_host.get(host)
        if svc is None:
            return InboundPlan(None, None, 404, f"{host} is neither a local workload address nor a known service")
        pm = next((p for p in svc.ports if p.port == port), None)
        if pm is None:
            return InboundPlan(None, None, 404, f"service {host} has no port {port}")
        local = [(w, e.port) for w, e in ix.local_endpoints(svc)]
        if not local:
            return InboundPlan(None, None, 503, f"no endpoint of {host} on this node")
        w, target_port = (pick or (lambda xs: xs[0]))(local)
    peer = authz.peer_from_identity(peer_identity)
    d = authz.evaluate(cfg.authorizations, peer=peer, dest_namespace=w.namespace, dest_labels=w.labels,
                       port=target_port, local_trust_domain=cfg.trust_domain, root_namespace=root_namespace)
    if not d.allowed:
        return InboundPlan(None, w, 403, d.reason, d.policy)
    return InboundPlan((w.address, target_port), w, 200, d.reason, d.policy)
