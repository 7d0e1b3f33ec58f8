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
import functools
import ssl
from typing import Any

from ztunnel.api import authz
from ztunnel.api.config import Endpoint, ProxyMode, Workload
from ztunnel.api.lb import choose_endpoint
from ztunnel.api.outlier import Outcome
from ztunnel.api.verify import PeerVerificationError
from ztunnel.hbone.framer import ErrorCode, HboneSettings, Role
from ztunnel.identity.tls_transport import TlsAdapter
from ztunnel.proxy import proxyproto
from ztunnel.proxy.admin import ConnLabels
from ztunnel.proxy.base import (
    SOURCE_HEADER,
    ConnectFailed,
    ProxyBase,
    mono_s,
    with_options,
)
from ztunnel.proxy.capture import CaptureProtocol
from ztunnel.proxy.plan import OutboundPlan, plan_inbound, plan_outbound, sni_for_identity
from ztunnel.proxy.relay import (
    HboneSession,
    HboneStream,
    RelayStats,
    StreamTransport,
    TunnelRefused,
    TunnelReset,
)
from ztunnel.proxy.routing import decide_route, usable_endpoints
from ztunnel.xds.state import Indexes


class NodeProxy(ProxyBase):
    mode = ProxyMode.NODE

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
        plan = plan_inbound(cfg, ix, stream.authority, session.peer_identity, self.own_addresses,
                            self.opts.root_namespace, pick=lambda xs: xs[int(self.rand() * len(xs)) % len(xs)])
        peer = authz.peer_from_identity(session.peer_identity)
        src_w = _source_workload(ix, stream.headers, session.peer_identity)
        labels = ConnLabels(
            reporter="destination",
            source_workload=src_w.name if src_w else "unknown",
            source_principal=session.peer_identity,
            destination_service=ix.service_of_local_workload.get(plan.workload.uid, "unknown")
            if plan.workload else "unknown",
            destination_principal=plan.workload.identity if plan.workload else "unknown",
            source_cluster=src_w.cluster if src_w else "unknown",
            destination_cluster=cfg.cluster)
        log = {"direction": "inbound", "src": session.peer_identity, "src_ns": peer.namespace,
               "authority": stream.authority, "policy": plan.policy}
        if plan.target is None:
            self.telemetry.refusal("destination", "denied" if plan.status == 403 else f"status_{plan.status}")
            self.telemetry.log(kind="access", **log, status=plan.status, reason=plan.reason)
            stream.respond(plan.status, plan.reason)
            return
        preamble = b""
        if plan.workload is not None and proxyproto.wants_proxy_v2(plan.workload.labels):
            src_addr = (src_w.address, 0) if src_w is not None else (getattr(session, "peer_ip", ""), 0)
            preamble = proxyproto.build_header(src_addr, plan.target, session.peer_identity)
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
        try:
            stream, ep, plan, route = await self.connect_routed(src, plan)
        except (ConnectFailed, TunnelRefused) as e:
            reason = e.reason if isinstance(e, TunnelRefused) else str(e)
            self.telemetry.log(kind="access", direction="outbound", src=src.identity, dst=plan.description,
                               status=getattr(e, "status", 503), reason=reason)
            cap.refuse(reason, 2 if isinstance(e, TunnelRefused) and e.status == 403 else 5)
            return
        svc_name = plan.service.hostname if plan.service else "unknown"  # the backend actually used
        labels = ConnLabels(reporter="source", source_workload=src.name, source_principal=src.identity,
                            destination_service=svc_name,
                            destination_principal=stream.session.peer_identity or ep.identity or "unknown",
                            source_cluster=cfg.cluster, destination_cluster=ep.cluster)
        self.telemetry.conn_opened(labels)

        def done(stats: RelayStats) -> None:
            self.relays.discard(cap.relay)
            self.telemetry.conn_closed(labels, stats.bytes_from_plain, stats.bytes_to_plain)
            if stats.reset_by_peer and stats.bytes_to_plain == 0:
                self.record_outcome(svc_name, ep.workload_uid, Outcome.RESET_BEFORE_RESPONSE)
            self.telemetry.log(kind="access", direction="outbound", src=src.identity, dst=plan.description,
                               endpoint=ep.workload_uid, via=ep.gateway or ep.hbone_address, **route,
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
            try:
                stream = await self._attempt(src, plan, ep, min(timeout_s, remaining))
            except TunnelRefused as e:
                if e.status in (403, 400, 404):
                    raise  # a decision, not a failure: do not retry elsewhere
                errors.append(f"{ep.workload_uid}: {e}")
                self.record_outcome(name, ep.workload_uid, Outcome.CONNECT_FAILURE)
                continue
            except TimeoutError:
                errors.append(f"{ep.workload_uid}: timed out after {min(timeout_s, remaining):g}s")
                self.record_outcome(name, ep.workload_uid, Outcome.TIMEOUT)
                continue
            except (OSError, TunnelReset, PeerVerificationError, ssl.SSLError, ConnectionError) as e:
                errors.append(f"{ep.workload_uid}: {e}")
                self.record_outcome(name, ep.workload_uid, Outcome.CONNECT_FAILURE)
                continue
            except Exception as e:  # a bug must cost one endpoint attempt, not hang the client
                errors.append(f"{ep.workload_uid}: internal error {e!r}")
                self.telemetry.log(kind="internal_error", endpoint=ep.workload_uid, error=repr(e))
                self.record_outcome(name, ep.workload_uid, Outcome.LOCAL_ORIGIN_FAILURE)
                continue
            self.record_outcome(name, ep.workload_uid, Outcome.SUCCESS)
            return stream, ep
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

    @staticmethod
    def _gateway_expected(ep: Endpoint) -> tuple[str, ...]:
        if not ep.gateway_identity:
            raise PeerVerificationError(
                f"endpoint {ep.workload_uid} is reached through gateway {ep.gateway}, but the config names no "
                "gateway identity to verify the outer tunnel against; refusing to dial it (a config from an "
                "older controller? it re-renders on its next push)", "no_expected_identity")
        return (ep.gateway_identity,)

    async def _attempt(self, src: Workload, plan: OutboundPlan, ep: Endpoint, timeout_s: float) -> HboneStream:
        expected = self._expected(plan, ep)
        headers = ((SOURCE_HEADER, src.uid),)
        if not ep.gateway:
            key = ("direct", ep.hbone_address, src.identity, ep.identity)
            sni = sni_for_identity(ep.identity) if ep.identity else ""
            session = await self.pool.get(key, lambda: self.dial_hbone(ep.hbone_address, src.identity, sni,
                                                                       expected, timeout_s))
            return await self.open_tunnel(session, f"{ep.address}:{ep.port}", headers, timeout_s)
        # double HBONE: outer pooled tunnel to the gateway, inner end-to-end mTLS + HBONE.
        # The inner ClientHello is sent right behind the outer CONNECT, without waiting for the
        # gateway's 200 (the gateway keeps early DATA in the stream until it has dialed the node):
        # one round trip through the gateway fewer per new connection. A refusal by the gateway
        # aborts the inner handshake and is raised as the refusal it is.
        assert plan.service is not None
        authority = f"{plan.service.hostname}:{plan.port}"
        gw_expected = self._gateway_expected(ep)
        gw_key = ("gateway", ep.gateway, src.identity, gw_expected)
        outer = await self.pool.get(gw_key, lambda: self.dial_hbone(ep.gateway, src.identity, "", gw_expected,
                                                                    timeout_s))
        started = mono_s()
        ostream = outer.open_stream(authority, headers, flush=False)  # leaves with the ClientHello
        loop = asyncio.get_running_loop()
        failure: list[PeerVerificationError] = []
        made = self._verifying(expected, failure)

        opened: list[HboneStream] = []

        def ready(session: HboneSession) -> None:
            opened.append(session.open_stream(authority, headers))

        # preface, SETTINGS and the CONNECT leave with the client's Finished, in one write
        inner = HboneSession(Role.CLIENT, loop, _replace_hbone(self.opts.hbone), on_made=made, on_ready=ready)
        inner.local_identity = src.identity
        sni = sni_for_identity(ep.identity) if ep.identity else plan.service.hostname
        adapter = TlsAdapter(loop, self.creds.client_ctx(src.identity), inner, server_side=False,
                             server_hostname=sni, handshake_timeout_s=timeout_s)
        transport = StreamTransport(ostream)
        transport.set_protocol(adapter)
        adapter.connection_made(transport)  # the ClientHello: flushes the CONNECT with it, one write
        outer.flush()
        transport.resume_reading()

        def outer_answered(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                adapter.abort()  # refused or reset by the gateway: stop the inner handshake now

        ostream.response.add_done_callback(outer_answered)

        async def handshake() -> None:
            await asyncio.shield(adapter.handshake)
            await ostream.response  # arrived before the server's first byte (same stream, in order)

        try:
            await asyncio.wait_for(handshake(), max(0.001, timeout_s - (mono_s() - started)))
        except BaseException as e:
            adapter.abort()
            resp = ostream.response
            if resp.done() and not resp.cancelled() and resp.exception() is not None and e is not resp.exception():
                raise resp.exception() from e  # type: ignore[misc]  # the gateway's refusal explains it
            if isinstance(e, TimeoutError):
                ostream.reset(ErrorCode.CANCEL)
            raise
        if failure or not opened:
            adapter.abort()
            raise failure[0] if failure else ConnectionResetError("inner HBONE session closed before its tunnel opened")
        stream = opened[0]
        try:
            await asyncio.wait_for(asyncio.shield(stream.response), max(0.001, timeout_s - (mono_s() - started)))
        except BaseException:
            adapter.abort()
            raise
        stream.inner_session = inner  # type: ignore[attr-defined]
        return stream


@functools.lru_cache(maxsize=8)
def _replace_hbone(s: HboneSettings) -> HboneSettings:
    """Inner tunnels carry one stream: no keep-alive pings (the outer session has them). Cached:
    `dataclasses.replace` was a visible per-connection cost on the double-HBONE path."""
    from dataclasses import replace
    return replace(s, ping_interval_s=None)


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


