"""East-west gateway mode: terminate outer HBONE from other networks, forward the inner tunnel.

A source ztunnel in another network opens an outer HBONE tunnel (mTLS, verified: only mesh
traffic from trust domains this gateway's bundles cover) with `:authority = <service hostname>:<port>`.
The bytes of that tunnel are the *inner* mTLS connection between the source workload and the
destination node's ztunnel. The gateway picks a healthy destination node for the service (tiers,
weights, local outlier ejections, connect retry on another node within the deadline), dials the
node's HBONE port over plain TCP and relays the inner bytes untouched: it never holds the inner keys
and never sees the plaintext. Identity is therefore checked end to end, at the destination node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from ztunnel.api.config import Endpoint, ProxyMode
from ztunnel.api.lb import choose_endpoint
from ztunnel.api.outlier import Outcome
from ztunnel.proxy.admin import ConnLabels
from ztunnel.proxy.base import SELF_SATURATION_LAG_SHARE, ProxyBase, mono_s, stream_gone, with_options
from ztunnel.proxy.plan import FailedAttempt, judge_failed_attempt
from ztunnel.proxy.relay import HboneSession, HboneStream, PlainRelay, RelayStats
from ztunnel.xds.state import parse_host_port


class GatewayProxy(ProxyBase):
    mode = ProxyMode.GATEWAY

    async def start(self) -> None:
        await self.start_inbound()
        self.ready.set()

    def _local_endpoints(self, hostname: str) -> tuple[Endpoint, ...]:
        svc = self.state.indexes.services_by_host.get(hostname)
        if svc is None:
            return ()
        net = self.cfg.network
        return tuple(e for e in svc.endpoints if e.hbone_address and e.network == net)

    async def handle_inbound(self, session: HboneSession, stream: HboneStream) -> None:
        cfg = self.cfg
        log = {"direction": "gateway", "src": session.peer_identity, "authority": stream.authority}
        try:
            host, port = parse_host_port(stream.authority)
        except ValueError as e:
            stream.respond(400, f"bad :authority: {e}")
            return
        svc = self.state.indexes.services_by_host.get(host)
        if svc is None or not any(p.port == port for p in svc.ports):
            reason = f"{stream.authority} is not a service this gateway exposes"
            self.telemetry.refusal("gateway", "no_route")
            self.telemetry.log(kind="access", **log, status=404, reason=reason)
            stream.respond(404, reason)
            return
        endpoints = self._local_endpoints(host)
        timeout_s = svc.connect_timeout_s
        deadline = mono_s() + max(2 * timeout_s, timeout_s + 1.0)
        tried: set[str] = set()
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        while mono_s() < deadline:
            if stream_gone(stream):
                return  # the peer reset the tunnel (or its connection ended): dial nothing for it
            ep = choose_endpoint(endpoints, self.ejected(host), self.rand(), exclude=frozenset(tried))
            if ep is None:
                break
            tried.add(ep.workload_uid)
            labels = ConnLabels(reporter="destination", source_principal=session.peer_identity,
                                destination_service=host, destination_principal=ep.identity or "unknown",
                                destination_cluster=ep.cluster, source_cluster="unknown",
                                connection_security_policy="mutual_tls")
            started = mono_s()

            def done(stats: RelayStats, labels: ConnLabels = labels, ep: Endpoint = ep,
                     started: float = started) -> None:
                self.telemetry.conn_closed(labels, stats.bytes_to_plain, stats.bytes_from_plain)
                self.telemetry.log(kind="access", **log, endpoint=ep.workload_uid, node=ep.hbone_address,
                                   bytes_in=stats.bytes_from_plain, bytes_out=stats.bytes_to_plain,
                                   reset=stats.reset, duration_ms=round((mono_s() - started) * 1000, 3))

            relay = PlainRelay(None, done)
            node_host, node_port = parse_host_port(ep.hbone_address)
            try:
                async with asyncio.timeout(min(timeout_s, max(0.001, deadline - mono_s()))):  # no task per dial
                    await loop.create_connection(lambda relay=relay: relay, node_host, node_port)  # type: ignore[misc]
            except (OSError, TimeoutError) as e:
                errors.append(f"{ep.workload_uid}: {e!r}")
                timed_out = isinstance(e, TimeoutError)
                verdict = judge_failed_attempt(
                    FailedAttempt.TIMEOUT if timed_out else FailedAttempt.CONNECT_ERROR,
                    self_saturated=timed_out and self.lag_history.max_since(started)
                    >= SELF_SATURATION_LAG_SHARE * timeout_s)
                if verdict.outcome is not None:
                    self.record_outcome(host, ep.workload_uid, verdict.outcome)
                if not verdict.try_next:  # our own queue made it time out: shed, as overloaded
                    self.telemetry.refusal("gateway", "overloaded")
                    with contextlib.suppress(Exception):
                        stream.respond(503, f"gateway {cfg.proxy_id} is saturated: shed, try again", overloaded=True)
                    return
                continue
            if stream_gone(stream):
                if relay.transport is not None:
                    relay.transport.abort()
                return
            self.record_outcome(host, ep.workload_uid, Outcome.SUCCESS)
            self.relays.add(relay)
            relay._on_done = _chain(relay, self.relays, done)
            self.telemetry.conn_opened(labels)
            if stream.peer_spoke_first:
                # the source pipelined its inner ClientHello and waits for the node's answer: the 200
                # leaves with that answer, one message through the outer tunnel instead of two
                relay.answer_with_first_reply()
            else:
                stream.respond(200)
            relay.bind(stream)
            return
        reason = (f"no healthy node for {host} reachable from gateway {cfg.proxy_id}"
                  + (f": {'; '.join(errors[-3:])}" if errors else ""))
        self.telemetry.refusal("gateway", "upstream_connect_failed")
        self.telemetry.log(kind="access", **log, status=503, reason=reason)
        with contextlib.suppress(Exception):
            stream.respond(503, reason)


def _chain(relay: PlainRelay, relays: set[PlainRelay],
           done: Callable[[RelayStats], None]) -> Callable[[RelayStats], None]:
    def call(stats: RelayStats) -> None:
        relays.discard(relay)
        done(stats)
    return call


__all__ = ["GatewayProxy", "with_options"]
