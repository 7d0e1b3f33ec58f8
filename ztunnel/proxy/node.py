"""The node proxy (ztunnel): outbound capture to HBONE, inbound HBONE to local pods.

Shared with the east-west gateway: `ztunnel.proxy.base` (listeners, sessions, outlier detection);
the pure decisions are in `ztunnel.proxy.plan`.

Outbound (an application on this node connects somewhere):
  capture (transparent REDIRECT + SO_ORIGINAL_DST, or the SOCKS5 fallback on 15080)
  → `plan_outbound` (pure: which service/workload, which identity, which endpoints)
  → a service with Gateway API route weights: `ztunnel.proxy.routing.decide_route` (pure) draws the
    backend service per connection and orders fallbacks; the rest runs on that backend's endpoints
  → `connect_with_retry`: pick an endpoint (tiers/weights, skipping ejected), open HBONE —
    direct to the destination node's :15008, or through the destination network's east-west gateway
    (outer tunnel pooled per gateway and source identity; inner mTLS tunnel end-to-end, not pooled).
    A connect failure (refused, TLS failure, timeout, the far side answering 503) is recorded with the
    outlier detector and retried on another endpoint (the next tier when the tier runs out) until the
    service's deadline, so a dead backend costs the client no failed connection.
Inbound (HBONE on :15008): mTLS handshake with SNI selecting which local identity to present,
  trust-domain-bound verification of the peer, `plan_inbound` (pure: target workload, L4 authz,
  own-port refusal) → connect to the pod → 200 (or 403/503 with a reason) → relay.

Direct node-to-node sessions are pooled per (source identity, destination node, destination
identity), as Istio's ztunnel pools them: a new connection then costs one stream, not a handshake.

TLS runs through `ztunnel.identity.tls_transport.TlsAdapter` (MemoryBIO), not asyncio's SSLProtocol (measured:
the larger Python cost on both request/response and bulk paths). A new double-HBONE connection
sends its inner ClientHello right behind the outer CONNECT, and its HBONE preface + CONNECT with
the client's Finished; verified peer certificates are remembered for a minute (`verify_peer`), so a
repeated inner handshake with the same peer skips re-parsing and re-verifying the same leaf.

Inbound to a pod labelled `networking.meshfed.dev/inbound-proxy-protocol: v2`, the first bytes the
pod reads are a PROXY v2 header carrying the verified peer identity (`ztunnel.proxy.proxyproto`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from ztunnel.api import authz
from ztunnel.api.config import Endpoint, ProxyMode, WaypointRef, Workload
from ztunnel.api.lb import choose_endpoint
from ztunnel.api.outlier import Outcome
from ztunnel.api.verify import PeerVerificationError
from ztunnel.proxy import proxyproto
from ztunnel.proxy.admin import ConnLabels
from ztunnel.proxy.base import (
    SELF_SATURATION_LAG_SHARE,
    SOURCE_HEADER,
    ConnectFailed,
    ProxyBase,
    mono_s,
    with_options,
)
from ztunnel.proxy.capture import CaptureProtocol
from ztunnel.proxy.plan import (
    FailedAttempt,
    OutboundPlan,
    judge_failed_attempt,
    plan_inbound,
    plan_outbound,
    sni_for_identity,
)
from ztunnel.proxy.relay import (
    HboneSession,
    HboneStream,
    RelayStats,
    TunnelRefused,
    TunnelReset,
)
from ztunnel.proxy.routing import decide_route, usable_endpoints
from ztunnel.xds.state import Indexes

log = logging.getLogger(__name__)


class NodeProxy(ProxyBase):
    mode = ProxyMode.NODE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.active_by_service: dict[str, int] = {}  # open outbound connections per service (connectionPool)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.start_inbound()
        if self.opts.socks_host is not None:
            srv = await loop.create_server(lambda: CaptureProtocol(self, socks=True),
                                           self.opts.socks_host, self.opts.socks_port, reuse_address=True,
                                           backlog=1024)
            self.servers.append(srv)
            addr = srv.sockets[0].getsockname()
            self.opts = with_options(self.opts, socks_port=addr[1])
            self.own_addresses.append((addr[0], addr[1]))
        if self.opts.transparent_host is not None:
            srv = await loop.create_server(lambda: CaptureProtocol(self, socks=False),
                                           self.opts.transparent_host, self.opts.transparent_port,
                                           reuse_address=True, backlog=1024)
            self.servers.append(srv)
            addr = srv.sockets[0].getsockname()
            self.opts = with_options(self.opts, transparent_port=addr[1])
            self.own_addresses.append((addr[0], addr[1]))
        self.ready.set()

    # inbound ----------------------------------------------------------------------------------

    async def handle_inbound(self, session: HboneSession, stream: HboneStream) -> None:
        cfg, ix = self.cfg, self.state.indexes
        identity, forwarded_by = caller_identity(ix, session.peer_identity, stream.headers)
        plan = plan_inbound(cfg, ix, stream.authority, identity, self.own_addresses,
                            self.opts.root_namespace, pick=lambda xs: xs[int(self.rand() * len(xs)) % len(xs)])
        peer = authz.peer_from_identity(identity)
        src_w = _source_workload(ix, stream.headers, identity)
        labels = ConnLabels(
            reporter="destination",
            source_workload=src_w.name if src_w else "unknown",
            source_principal=identity,
            destination_service=ix.service_of_local_workload.get(plan.workload.uid, "unknown")
            if plan.workload else "unknown",
            destination_principal=plan.workload.identity if plan.workload else "unknown",
            source_cluster=src_w.cluster if src_w else "unknown",
            destination_cluster=cfg.cluster)
        log = {"direction": "inbound", "src": identity, "src_ns": peer.namespace,
               "authority": stream.authority, "policy": plan.policy,
               **({"via_waypoint": forwarded_by} if forwarded_by else {})}
        if plan.target is None:
            self.telemetry.refusal("destination", "denied" if plan.status == 403 else f"status_{plan.status}")
            self.telemetry.log(kind="access", **log, status=plan.status, reason=plan.reason)
            stream.respond(plan.status, plan.reason)
            return
        preamble = b""
        if plan.workload is not None and proxyproto.wants_proxy_v2(plan.workload.labels):
            src_addr = (src_w.address, 0) if src_w is not None else (getattr(session, "peer_ip", ""), 0)
            preamble = proxyproto.build_header(src_addr, plan.target, identity)
        await self.connect_and_relay(stream, plan.target, 5.0, labels, log, preamble)

    # outbound ---------------------------------------------------------------------------------

    async def handle_outbound(self, cap: CaptureProtocol, host: str, port: int, is_hostname: bool) -> None:
        cfg, ix = self.cfg, self.state.indexes
        src_ip = cap.peer_ip
        src = ix.local_workloads_by_address.get(src_ip)
        if src is None:
            cap.refuse(f"no workload with address {src_ip} on this node; the source identity is unknown", 2)
            return
        plan = plan_outbound(cfg, ix, host, port, is_hostname)
        if plan.refused:
            self.telemetry.refusal("source", "no_route")
            self.telemetry.log(kind="access", direction="outbound", src=src.identity, dst=f"{host}:{port}",
                               status=404, reason=plan.refused)
            cap.refuse(plan.refused, 4)
            return
        started = mono_s()
        route: dict[str, str] = {}
        cap_key = self._claim_connection(plan)
        if cap_key is None:
            svc0 = plan.service
            limit = svc0.connection_pool.max_connections if svc0 and svc0.connection_pool else 0
            reason = (f"{plan.description}: connectionPool.tcp.maxConnections {limit} reached on this proxy "
                      "(DestinationRule): connection refused")
            self.telemetry.refusal("source", "connection_pool_overflow")
            self.telemetry.log(kind="access", direction="outbound", src=src.identity, dst=plan.description,
                               status=503, reason=reason)
            cap.refuse(reason, 5)
            return
        if not self.admit_setup(src_ip, "source"):
            reason = (f"{plan.description}: this node's proxy is saturated ({self.opts.max_setups_in_flight} "
                      "connection setups in flight): refused at once, try again")
            self.telemetry.log(kind="access", direction="outbound", src=src.identity, dst=plan.description,
                               status=503, reason=reason, overloaded=True)
            cap.refuse(reason, 1)
            self._release_connection(cap_key)
            return
        try:
            stream, ep, plan, route = await self.connect_routed(src, plan)
        except (ConnectFailed, TunnelRefused) as e:
            reason = e.reason if isinstance(e, TunnelRefused) else str(e)
            self.telemetry.log(kind="access", direction="outbound", src=src.identity, dst=plan.description,
                               status=getattr(e, "status", 503), reason=reason)
            cap.refuse(reason, 2 if isinstance(e, TunnelRefused) and e.status == 403 else 5)
            self._release_connection(cap_key)
            return
        finally:
            self.setups.release(src_ip)
        svc_name = plan.service.hostname if plan.service else "unknown"  # the backend actually used
        labels = ConnLabels(reporter="source", source_workload=src.name, source_principal=src.identity,
                            destination_service=svc_name,
                            destination_principal=stream.session.peer_identity or ep.identity or "unknown",
                            source_cluster=cfg.cluster, destination_cluster=ep.cluster)
        self.telemetry.conn_opened(labels)

        def done(stats: RelayStats) -> None:
            self.relays.discard(cap.relay)
            self._release_connection(cap_key)
            self.telemetry.conn_closed(labels, stats.bytes_from_plain, stats.bytes_to_plain)
            if stats.reset_by_peer and stats.bytes_to_plain == 0 and "waypoint" not in route:
                self.record_outcome(svc_name, ep.workload_uid, Outcome.RESET_BEFORE_RESPONSE)
            # `route` names the waypoint (and its address as `via`) when the service has one
            self.telemetry.log(kind="access", direction="outbound", src=src.identity, dst=plan.description,
                               endpoint=ep.workload_uid, **{"via": ep.gateway or ep.hbone_address, **route},
                               bytes_sent=stats.bytes_from_plain, bytes_received=stats.bytes_to_plain,
                               reset=stats.reset, duration_ms=round((mono_s() - started) * 1000, 3))
            inner = getattr(stream, "inner_session", None)
            if inner is not None:
                inner.drain("tunnel finished")

        cap.start_relay(stream, done)
        self.relays.add(cap.relay)

    async def connect_routed(self, src: Workload, plan: OutboundPlan
                             ) -> tuple[HboneStream, Endpoint, OutboundPlan, dict[str, str]]:
        """Connect for `plan`; when its service has route weights, to a backend service drawn by
        weight (`ztunnel.proxy.routing.decide_route`), falling back to the other backends when the drawn
        one has no usable endpoint or every connect to it failed. Returns the stream, the endpoint,
        the plan actually used (its service is the backend: metrics and outlier counters are its)
        and access-log fields naming the route, the backend and any fallback."""
        svc = plan.service
        if svc is not None and svc.waypoint is not None:
            stream, ep, route = await self.connect_waypoint(src, plan, svc.waypoint)
            return stream, ep, plan, route
        if svc is None or not svc.routes:
            stream, ep = await self.connect_with_retry(src, plan)
            return stream, ep, plan, {}
        ix = self.state.indexes
        usable = {}
        for b in svc.routes:
            backend = svc if b.hostname == svc.hostname else ix.services_by_host.get(b.hostname)
            if backend is not None:
                usable[b.hostname] = usable_endpoints(backend, self.ejected(b.hostname))
        decision = decide_route(svc, plan.port, ix.services_by_host, self.rand(), usable)
        if decision.refused:
            raise ConnectFailed(decision.refused)
        failures: list[str] = []
        for target in decision.order:
            backend = target.service
            sub = OutboundPlan(backend, backend.endpoints, target.port, target.target_port,
                               f"{backend.hostname} (route of {svc.hostname})")
            try:
                stream, ep = await self.connect_with_retry(src, sub)
            except ConnectFailed as e:
                failures.append(f"{backend.hostname}: {e}")
                continue
            route = {"route": svc.hostname, "backend": backend.hostname}
            if backend.hostname != decision.drawn:
                why = decision.why_not(decision.drawn) or "; ".join(failures) or "unusable"
                route["fallback_from"] = decision.drawn
                route["fallback_reason"] = why
            return stream, ep, sub, route
        raise ConnectFailed(f"no backend of {svc.hostname}'s route could be reached: " + " | ".join(failures))

    async def connect_waypoint(self, src: Workload, plan: OutboundPlan, wp: WaypointRef
                               ) -> tuple[HboneStream, Endpoint, dict[str, str]]:
        """Send a service's connection to its waypoint in this cluster (`istio.io/use-waypoint`):
        HBONE to a ready waypoint pod, as the source workload, expecting the waypoint's identity;
        the tunnel's authority names the service, the waypoint does the rest per request. No ready
        waypoint pod means a refusal, never a direct connection that would skip its L7 policy."""
        svc = plan.service
        assert svc is not None
        name = f"{wp.namespace}/{wp.name}"
        if not wp.addresses:
            raise ConnectFailed(f"{svc.hostname} goes through waypoint {name}, which has no ready pod in cluster "
                                f"{self.cfg.cluster} (is it running? `meshfed status` shows waypoint/"
                                f"{self.cfg.cluster}/{name}); refused rather than skipping its policy")
        timeout_s = svc.connect_timeout_s
        start = int(self.rand() * len(wp.addresses)) % len(wp.addresses)
        order = wp.addresses[start:] + wp.addresses[:start]
        errors: list[str] = []
        for addr in order:
            ep = Endpoint(workload_uid=f"waypoint:{addr}", cluster=self.cfg.cluster, network=self.cfg.network,
                          address="", port=plan.port, hbone_address=addr, identity=wp.identity)
            try:
                key = ("direct", addr, src.identity, wp.identity)
                session = await self.pool.get(key, lambda addr=addr: self.dial_hbone(  # type: ignore[misc]
                    addr, src.identity, sni_for_identity(wp.identity), (wp.identity,), timeout_s))
                stream = await self.open_tunnel(session, f"{svc.hostname}:{plan.port}",
                                                ((SOURCE_HEADER, src.uid),), timeout_s)
            except TunnelRefused:
                raise  # the waypoint decided (no such service there): do not try another
            except (OSError, TimeoutError, TunnelReset, PeerVerificationError, ssl.SSLError, ConnectionError) as e:
                errors.append(f"{addr}: {e!r}")
                continue
            return stream, ep, {"waypoint": name, "via": addr}
        raise ConnectFailed(f"could not reach waypoint {name} for {svc.hostname}: " + "; ".join(errors[-3:]))

    def _claim_connection(self, plan: OutboundPlan) -> str | None:
        """Count an outbound connection against its service's connectionPool.tcp.maxConnections
        (for services without a waypoint: a waypoint enforces the limit on its upstream side).
        Returns the key to release, "" when not limited, None when the limit is reached."""
        svc = plan.service
        if svc is None or svc.waypoint is not None or svc.connection_pool is None:
            return ""
        limit = svc.connection_pool.max_connections
        if not limit:
            return ""
        n = self.active_by_service.get(svc.hostname, 0)
        if n >= limit:
            return None
        self.active_by_service[svc.hostname] = n + 1
        return svc.hostname

    def _release_connection(self, key: str | None) -> None:
        if key:
            n = self.active_by_service.get(key, 0) - 1
            if n > 0:
                self.active_by_service[key] = n
            else:
                self.active_by_service.pop(key, None)

    async def connect_with_retry(self, src: Workload, plan: OutboundPlan) -> tuple[HboneStream, Endpoint]:
        svc = plan.service
        timeout_s = svc.connect_timeout_s if svc else 1.0
        deadline = mono_s() + max(2 * timeout_s, timeout_s + 1.0)
        name = svc.hostname if svc else "unknown"
        tried: list[str] = []
        errors: list[str] = []
        while True:
            remaining = deadline - mono_s()
            if remaining <= 0:
                break
            ep = choose_endpoint(plan.endpoints, self.ejected(name), self.rand(), exclude=frozenset(tried))
            if ep is None:
                break
            tried.append(ep.workload_uid)
            attempt_timeout_s = min(timeout_s, remaining)
            attempt_started = mono_s()
            final: Exception
            try:
                stream = await self._attempt(src, plan, ep, attempt_timeout_s)
            except TunnelRefused as e:
                verdict = judge_failed_attempt(FailedAttempt.REFUSED, e.status, e.overloaded)
                error, final = f"{ep.workload_uid}: {e}", e
            except TimeoutError as e:
                late_s = self.lag_history.max_since(attempt_started)
                verdict = judge_failed_attempt(
                    FailedAttempt.TIMEOUT, self_saturated=late_s >= SELF_SATURATION_LAG_SHARE * attempt_timeout_s)
                error, final = f"{ep.workload_uid}: timed out after {attempt_timeout_s:g}s", e
            except (OSError, TunnelReset, PeerVerificationError, ssl.SSLError, ConnectionError) as e:
                verdict = judge_failed_attempt(FailedAttempt.CONNECT_ERROR)
                error, final = f"{ep.workload_uid}: {e}", e
            except Exception as e:  # a bug must cost one endpoint attempt, not hang the client
                verdict = judge_failed_attempt(FailedAttempt.INTERNAL_ERROR)
                error, final = f"{ep.workload_uid}: internal error {e!r}", e
                log.error("internal error dialing %s (a bug; the client tries the next endpoint): %r",
                          ep.workload_uid, e, exc_info=True)
            else:
                self.record_outcome(name, ep.workload_uid, Outcome.SUCCESS)
                return stream, ep
            if verdict.outcome is not None:
                self.record_outcome(name, ep.workload_uid, verdict.outcome)
            if not verdict.try_next:
                # a decision, or a saturated proxy on the path (ours included): none is the endpoint's failure
                if verdict.why == "self_saturated":
                    self.telemetry.refusal("source", "overloaded")
                    raise ConnectFailed(f"{error}, while this proxy was saturated (its event loop ran up to "
                                        f"{late_s * 1000:.0f} ms late): not counted against the endpoint")
                if verdict.why == "overloaded":
                    self.telemetry.refusal("source", "upstream_overloaded")
                raise final
            errors.append(error)
        if not tried:
            raise ConnectFailed(f"no healthy endpoint for {plan.description} (all ejected or none configured)")
        raise ConnectFailed(f"could not reach {plan.description} after {len(tried)} endpoint(s): "
                            + "; ".join(errors[-3:]))

    def _expected(self, plan: OutboundPlan, ep: Endpoint) -> tuple[str, ...]:
        """Whom the destination must prove to be. An endpoint that names no identity (and a service
        without subjectAltNames) is refused rather than dialled: with nothing expected, any peer
        of any federated trust domain would pass the handshake as that endpoint."""
        if ep.identity:
            return (ep.identity,)
        if plan.service is not None and plan.service.subject_alt_names:
            return plan.service.subject_alt_names
        raise PeerVerificationError(
            f"endpoint {ep.workload_uid} of {plan.description} has no identity to verify (and the service no "
            "subjectAltNames); refusing to connect rather than accept any peer — check the controller's "
            "rendering of that endpoint", "no_expected_identity")

    async def _attempt(self, src: Workload, plan: OutboundPlan, ep: Endpoint, timeout_s: float) -> HboneStream:
        assert plan.service is not None or not ep.gateway
        hostname = plan.service.hostname if plan.service is not None else ""
        return await self.open_to_endpoint(src.identity, ((SOURCE_HEADER, src.uid),), hostname, plan.port, ep,
                                           self._expected(plan, ep), timeout_s)


CALLER_HEADER = "x-meshfed-caller"


def caller_identity(ix: Indexes, peer_identity: str, headers: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """(the identity to authorize and hand the pod, the waypoint that forwarded it or "").

    A waypoint forwards a caller's request as itself (its own mTLS identity) and names the caller
    in `x-meshfed-caller`: the caller's verified identity, checked by the waypoint's own mTLS with
    the caller's ztunnel. The header is believed only from a waypoint that a local workload's
    service goes through (`Indexes.trusted_waypoints`); from anyone else it is ignored."""
    if peer_identity not in ix.trusted_waypoints:
        return peer_identity, ""
    caller = next((v for k, v in headers if k == CALLER_HEADER), "")
    return (caller, peer_identity) if caller else (peer_identity, "")


def _source_workload(ix: Indexes, headers: tuple[tuple[str, str], ...], identity: str) -> Workload | None:
    """The calling workload: the one the source ztunnel names in `x-meshfed-source` if it really has
    the verified identity (a peer cannot borrow another identity's labels), else the first workload
    with that identity."""
    for k, v in headers:
        if k == SOURCE_HEADER:
            w = ix.workloads_by_uid.get(v)
            if w is not None and w.identity == identity:
                return w
            break
    return ix.workloads_by_identity.get(identity)


