"""The L7 proxy: a waypoint (HBONE in from node ztunnels) or an ingress gateway (plain HTTP in on
a Gateway's listeners), both serving requests with the same engine (`ztunnel.proxy.l7`).

In (waypoint): a node ztunnel opens an HBONE tunnel as the calling workload (mTLS: the caller's
verified identity is the tunnel's peer) with `:authority = <service hostname>:<port>`; the
waypoint answers 200 and reads HTTP/1.1 or h2c (prior knowledge) from the tunnel.
In (ingress): a TCP connection on a listener port; the caller has no mesh identity.

Per request (`handle_request`): the plan (`l7.engine.plan_request`: authorization, route rule,
backend by weight) → an endpoint (the service's tiers and weights with this proxy's outlier
ejections, `ztunnel.api.lb`, skipping hosts already tried; or the inference picker for an
InferencePool) → an upstream HTTP/1.1 connection: a tunnel to the endpoint's node (direct, or
double HBONE through the destination network's east-west gateway) opened as the waypoint's own
identity, naming the caller in `x-meshfed-caller` (the destination ztunnel believes it from a
waypoint only: the pod sees the caller's identity, as without a waypoint). Every attempt's outcome
feeds the same outlier detectors and health reports as L4 (`ProxyBase.record_outcome`: Envoy's
5xx and gateway-error definitions, `l7.retry.outlier_outcome`), so a backend answering 503 is
ejected here and, by the controller's vote, for the whole mesh. Retries and timeouts follow
`l7.retry`.

Upstream connections are pooled per (endpoint, caller, port) — a connection carries one caller's
identity — and limited per service by the DestinationRule's connectionPool (`l7.pool`): at most
`maxConnections` open, `http1MaxPendingRequests` waiting, `maxRequestsPerConnection` each.

The inference picker reads each pool pod's `/metrics` every `SCRAPE_INTERVAL_S` over the same
tunnels (as the proxy itself, no caller), and counts its own in-flight requests per pod.

Access log: one JSON line per request (`kind: "request"`) with the route rule, backend, endpoint,
attempts, status, the deciding authorization policy and reason, and the duration. Metrics:
`istio_requests_total` (reporter waypoint|gateway) next to the connection metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ztunnel.api import authz
from ztunnel.api.config import Endpoint, InferencePool, Listener, ProxyMode
from ztunnel.api.lb import choose_endpoint, pick_endpoint, priority_load, tier_health
from ztunnel.api.verify import PeerVerificationError
from ztunnel.proxy.base import SOURCE_HEADER, ProxyBase, mono_s
from ztunnel.proxy.l7 import picker, retry
from ztunnel.proxy.l7.engine import Arrival, Forward, L7Index, Refuse, plan_request
from ztunnel.proxy.l7.h2c import PREFACE, ConnectionEnded, H2Server, StreamRequest
from ztunnel.proxy.l7.http1 import (
    IDLE_TIMEOUT_S,
    Http1Client,
    Http1Server,
    IdleTimeout,
    PeerClosed,
    ProtocolFailure,
    RequestReady,
    ResponseReady,
    UnsafeRequestLine,
)
from ztunnel.proxy.l7.pool import Admission, UpstreamBudget
from ztunnel.proxy.l7.routing import Headers, RequestHead, modify_headers
from ztunnel.proxy.node import CALLER_HEADER
from ztunnel.proxy.relay import HIGH_WATER_BYTES, HboneSession, HboneStream, TunnelRefused, TunnelReset
from ztunnel.xds.state import parse_host_port

SCRAPE_INTERVAL_S = 0.25
SCRAPE_TIMEOUT_S = 1.0
DEFAULT_CONNECT_TIMEOUT_S = 1.0
MAX_IDLE_PER_KEY = 16
MAX_DOWNSTREAM_CONNECTIONS = 4096  # open connections on an ingress gateway's listeners, all together
SCRAPER = "~metrics-scraper"  # the caller of the picker's metrics requests (no caller header is sent)


@dataclass(frozen=True, slots=True)
class Context:
    """Who sent the requests of one downstream connection, and where they arrived."""

    arrival: Arrival
    caller: str          # verified SPIFFE id of the caller ("" at an ingress gateway)
    source_uid: str = ""  # the calling workload, as its ztunnel named it
    peer: authz.Peer = authz.Peer("", "")

    @classmethod
    def of(cls, arrival: Arrival, caller: str, source_uid: str = "") -> Context:
        """The authorization peer is computed once per connection, not per request."""
        return cls(arrival, caller, source_uid, authz.peer_from_identity(caller))


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Headers
    body: bytes


# --- downstream ----------------------------------------------------------------------------------


class Sink:
    """Where a downstream connection's bytes go, and its flow control: an HBONE tunnel or a TCP
    transport. `write_blocked()`: the peer is not reading what we wrote (stop producing answers);
    `pause_reading`/`resume_reading`: stop taking its bytes (TCP: the socket; HBONE: the window)."""

    def __init__(self, write: Callable[[bytes], object], close: Callable[[], None], abort: Callable[[], None],
                 write_blocked: Callable[[], bool] = lambda: False, pause_reading: Callable[[], None] = lambda: None,
                 resume_reading: Callable[[], None] = lambda: None) -> None:
        self.write, self.close, self.abort = write, close, abort
        self.write_blocked, self.pause_reading, self.resume_reading = write_blocked, pause_reading, resume_reading


class Downstream:
    """One downstream connection: HTTP/1.1 or h2c, requests handed to the proxy, answers written.

    Invariants: HTTP/1.1 requests are answered in order, one at a time (the codec hands out the next only then,
    and only while the peer reads its answers: `Sink.write_blocked`); h2c streams are served concurrently; the
    codec's deadline (head, request, idle timeouts) is always armed; once closed nothing more is written.
    The codecs bound what the peer can make us hold (`ztunnel.proxy.l7.http1`, `.h2c`); this adapter applies
    their back-pressure (`wants_data`) and their timers, and logs every limit hit."""

    def __init__(self, proxy: L7Proxy, sink: Sink, ctx: Context) -> None:
        self.proxy, self.sink, self.ctx = proxy, sink, ctx
        self.h1: Http1Server | None = None
        self.h2: H2Server | None = None
        self._first = b""
        self.closed = False
        self.busy = 0
        self._eof = False
        self.reading_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._arm(mono_s() + IDLE_TIMEOUT_S)  # the first request must begin in time too

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        now = mono_s()
        if self.h1 is None and self.h2 is None:
            self._first += data
            if len(self._first) < len(PREFACE) and PREFACE.startswith(self._first) and data:
                return  # could still be the h2c preface
            data, self._first = self._first, b""
            if data.startswith(PREFACE):
                self.h2 = H2Server(now=now)
            else:
                self.h1 = Http1Server(now=now)
        if self.h2 is not None:
            self._h2_events(self.h2.receive(data, now))
        elif self.h1 is not None:
            self._h1_events(self.h1.receive(data, now))
            self._read_flow()
        self._rearm()

    def eof(self) -> None:
        self._eof = True
        if self.h1 is not None:  # closes once the requests sent before the EOF are answered (`PeerClosed`)
            self._h1_events(self.h1.receive(b"", mono_s()))
        elif self.busy == 0:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
            with contextlib.suppress(Exception):
                self.sink.close()

    # timers and flow control
    def _arm(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None and not self.closed:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, deadline - mono_s()), self._on_timer)

    def _rearm(self) -> None:
        codec = self.h1 or self.h2
        if codec is not None:
            self._arm(codec.deadline())

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = mono_s()
        codec = self.h1 or self.h2
        if codec is None:
            self._limit("idle_timeout", f"no request for {IDLE_TIMEOUT_S:g} s")
            self.close()
            return
        if self.h1 is not None:
            self._h1_events(self.h1.on_timer(now))
        elif self.h2 is not None:
            self._h2_events(self.h2.on_timer(now))
        self._rearm()

    def _read_flow(self) -> None:
        """HTTP/1.1 back-pressure: stop reading while the codec's pipelining backlog is full."""
        if self.h1 is None or self.closed:
            return
        if not self.h1.wants_data and not self.reading_paused:
            self.reading_paused = True
            self.sink.pause_reading()
        elif self.h1.wants_data and self.reading_paused:
            self.reading_paused = False
            self.sink.resume_reading()

    def writable(self) -> None:
        """The peer read what we wrote: hand out the next pipelined request, send waiting h2 data."""
        if self.closed:
            return
        if self.h1 is not None and self.busy == 0 and not self.h1.awaiting_response:
            self._h1_events(self.h1.pending(mono_s()))
            self._read_flow()
            self._rearm()
        elif self.h2 is not None:
            self.h2.resume_writing()
            self._flush_h2()

    def _limit(self, code: str, reason: str) -> None:
        """A bound was hit: counted, and one log line naming it (`kind: "downstream_limit"`)."""
        reporter = "waypoint" if self.ctx.arrival.service is not None else "gateway"
        self.proxy.telemetry.refusal(reporter, code)
        self.proxy.telemetry.log(kind="downstream_limit", src=self.ctx.caller or "unauthenticated", limit=code,
                                 reason=reason)

    # HTTP/1.1
    def _h1_events(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, RequestReady):
                self.busy += 1
                self.proxy.spawn(self._serve_h1(ev))
            elif isinstance(ev, ProtocolFailure):
                if ev.status in LIMIT_STATUSES:
                    self._limit(LIMIT_STATUSES[ev.status], ev.reason)
                self._write_h1(Reply(ev.status, (), ev.reason.encode()), close=True)
            elif isinstance(ev, IdleTimeout):
                self._limit("idle_timeout", ev.reason)
                self.close()
            elif isinstance(ev, PeerClosed) and self.busy == 0:
                self.close()

    async def _serve_h1(self, ev: RequestReady) -> None:
        try:
            reply = await self.proxy.handle_request(self.ctx, ev.head, ev.body)
        except Exception as e:  # a bug costs this request, not the connection's other users
            self.proxy.telemetry.log(kind="internal_error", error=repr(e))
            reply = Reply(500, (), b"internal error in the L7 proxy")
        self.busy -= 1
        self._write_h1(reply, close=not ev.keep_alive or self.proxy.draining)
        if self.h1 is not None and not self.closed:
            if self.h1.must_close:
                self.close()
            elif not self.sink.write_blocked():  # else `writable` continues once the peer reads
                self._h1_events(self.h1.pending(mono_s()))
                self._read_flow()
            self._rearm()

    def _write_h1(self, reply: Reply, close: bool) -> None:
        if self.closed or self.h1 is None:
            return
        data = self.h1.respond(reply.status, reply.headers, reply.body, mono_s(), close=close)
        if data:
            self.sink.write(data)
        if close or self.h1.must_close:
            self.close()

    # h2c
    def _h2_events(self, events: list[Any]) -> None:
        assert self.h2 is not None
        for ev in events:
            if isinstance(ev, StreamRequest):
                self.busy += 1
                self.proxy.spawn(self._serve_h2(ev))
            elif isinstance(ev, ConnectionEnded):
                if ev.reason.startswith("idle"):
                    self._limit("idle_timeout", ev.reason)
                self._flush_h2()
                self.close()
                return
        self._flush_h2()

    async def _serve_h2(self, ev: StreamRequest) -> None:
        try:
            reply = await self.proxy.handle_request(self.ctx, ev.head, ev.body)
        except Exception as e:
            self.proxy.telemetry.log(kind="internal_error", error=repr(e))
            reply = Reply(500, (), b"internal error in the L7 proxy")
        self.busy -= 1
        if self.h2 is not None and not self.closed:
            self.h2.respond(ev.stream_id, reply.status, reply.headers, reply.body)
            self._flush_h2()
            if self._eof and self.busy == 0:
                self.close()
            self._rearm()

    def _flush_h2(self) -> None:
        if self.h2 is not None and not self.closed:
            for why in self.h2.refusals:
                self._limit("h2_stream_refused", why)
            self.h2.refusals.clear()
            data = self.h2.data_to_send()
            if data:
                self.sink.write(data)
            self.h2.write_blocked = self.sink.write_blocked()


# HTTP statuses a codec answers when a bound is hit, and the refusal code they are counted under
LIMIT_STATUSES = {408: "request_timeout", 413: "request_body_too_large", 429: "pipelining_limit",
                  431: "request_head_too_large"}


class TunnelDownstream:
    """A downstream connection carried by an HBONE tunnel (waypoint). Received data is acknowledged
    (HBONE window credit) only while the codec wants more: a pipelining caller is held back by flow
    control, at most one stream window ahead."""

    def __init__(self, proxy: L7Proxy, stream: HboneStream, ctx: Context) -> None:
        self.stream = stream
        self._unacked = 0
        self.conn = Downstream(proxy, Sink(stream.write, stream.write_eof, lambda: stream.reset(),
                                           write_blocked=self._write_blocked, resume_reading=self._resume), ctx)

    def _write_blocked(self) -> bool:
        return self.stream.buffered_bytes > HIGH_WATER_BYTES or self.stream.session.write_paused

    def _resume(self) -> None:
        n, self._unacked = self._unacked, 0
        if n:
            self.stream.ack(n)

    def on_data(self, data: bytes, flow_bytes: int) -> None:
        self.conn.feed(data)
        if self.conn.reading_paused:
            self._unacked += flow_bytes   # credited back by `_resume`
        else:
            self.stream.ack(flow_bytes)

    def on_end(self) -> None:
        self.conn.eof()

    def on_reset(self, error_code: int) -> None:
        self.conn.close()

    def on_writable(self) -> None:
        if not self._write_blocked():
            self.conn.writable()


class TcpDownstream(asyncio.Protocol):
    """A downstream connection on an ingress listener."""

    def __init__(self, proxy: L7Proxy, listener: Listener) -> None:
        self.proxy, self.listener = proxy, listener
        self.conn: Downstream | None = None
        self.counted = False
        self._write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)   # uvloop's transports are not asyncio's classes
        t = transport
        if self.proxy.downstream_connections >= MAX_DOWNSTREAM_CONNECTIONS:
            self.proxy.telemetry.refusal("gateway", "too_many_connections")
            t.abort()  # bounded: an ingress listener faces clients outside the mesh
            return
        self.proxy.downstream_connections += 1
        self.counted = True
        self.conn = Downstream(self.proxy, Sink(t.write, t.close, t.abort, write_blocked=lambda: self._write_paused,
                                                pause_reading=t.pause_reading, resume_reading=t.resume_reading),
                               Context.of(Arrival(listener=self.listener), ""))

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.feed(data)

    def eof_received(self) -> bool:
        if self.conn is not None:
            self.conn.eof()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.conn is not None:
            self.conn.writable()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.counted:
            self.counted = False
            self.proxy.downstream_connections -= 1


# --- upstream ------------------------------------------------------------------------------------


class UpstreamConn:
    """One upstream HTTP/1.1 connection over a tunnel to an endpoint; one exchange at a time."""

    def __init__(self, stream: HboneStream, key: tuple[str, str, int], service: str) -> None:
        self.stream, self.key, self.service = stream, key, service
        self.h1 = Http1Client()
        self.future: asyncio.Future[ResponseReady | retry.Failure] | None = None
        self.closed = False
        stream.attach(self)

    async def exchange(self, head: RequestHead, body: bytes, timeout_s: float | None) -> ResponseReady | retry.Failure:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ResponseReady | retry.Failure] = loop.create_future()
        self.future = fut
        self.stream.write(self.h1.request(head, body))
        # a timer that settles the future, not asyncio.wait_for (a task and a shield per request)
        timer = loop.call_later(timeout_s, self._timed_out) if timeout_s is not None else None
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()

    def _timed_out(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(retry.Failure.TIMEOUT)
            self.abort()

    def _settle(self, value: ResponseReady | retry.Failure) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(value)

    def on_data(self, data: bytes, flow_bytes: int) -> None:
        self.stream.ack(flow_bytes)
        for ev in self.h1.receive(data):
            if isinstance(ev, ResponseReady):
                self._settle(ev)
            elif isinstance(ev, ProtocolFailure):
                self._settle(ResponseReady(502, (), ev.reason.encode()))
                self.closed = True
            elif isinstance(ev, PeerClosed):
                self.closed = True
                self._settle(retry.Failure.RESET)

    def on_end(self) -> None:
        self.closed = True
        for ev in self.h1.receive(b""):  # a response delimited by the end of the connection completes here
            if isinstance(ev, ResponseReady):
                self._settle(ev)
        self._settle(retry.Failure.RESET)

    def on_reset(self, error_code: int) -> None:
        self.closed = True
        self._settle(retry.Failure.RESET)

    def on_writable(self) -> None:
        pass

    @property
    def reusable(self) -> bool:
        return not self.closed and self.h1.reusable

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stream.write_eof()
        self._drain_inner()

    def abort(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.stream.reset()
        self._drain_inner()

    def _drain_inner(self) -> None:
        inner = getattr(self.stream, "inner_session", None)
        if inner is not None:
            inner.drain("upstream connection done")


class L7Proxy(ProxyBase):
    """Waypoint or ingress gateway: the mode comes from the config."""

    mode = ProxyMode.WAYPOINT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.l7 = L7Index(gateway="")
        self.budgets: dict[str, UpstreamBudget] = {}
        self.waiters: dict[str, deque[asyncio.Future[UpstreamConn | None]]] = {}
        self.idle: dict[tuple[str, str, int], list[UpstreamConn]] = {}
        self.metrics: dict[str, picker.PodMetrics] = {}
        self.in_flight: dict[str, int] = {}
        self.listener_servers: dict[int, asyncio.Server] = {}
        self.downstream_connections = 0
        self.requests_served = 0
        # (endpoints tuple id, ejected set) -> (the tuple, tier shares, panic): `ztunnel.api.lb`'s loads
        self._loads: dict[tuple[int, frozenset[str]], tuple[Any, tuple[float, ...], tuple[bool, ...]]] = {}
        super().__init__(*args, **kwargs)
        self.mode = self.cfg.mode if self.state.config is not None else ProxyMode.WAYPOINT

    # --- config --------------------------------------------------------------------------------

    def on_config_applied(self) -> None:
        super().on_config_applied()
        cfg = self.state.config
        if cfg is None:
            return
        self.l7 = L7Index.build(cfg)
        for svc in cfg.services:
            policy = svc.connection_pool
            b = self.budgets.get(svc.hostname)
            if b is None:
                self.budgets[svc.hostname] = UpstreamBudget(policy) if policy is not None else UpstreamBudget()
            elif policy is not None and b.policy != policy:
                b.policy = policy
        if self.listener_servers or self.ready.is_set():
            self.spawn(self._sync_listeners())
        # idle upstream connections to endpoints the config no longer has: closed, not kept forever
        live = {e.workload_uid for s in cfg.services for e in s.endpoints}
        live |= {e.workload_uid for p in cfg.inference_pools for e in p.endpoints}
        for key in [k for k in self.idle if k[0] not in live]:
            for conn in self.idle.pop(key):
                if key[1] == SCRAPER:
                    conn.close()  # the scraper's connections hold no budget slot
                else:
                    self._closed(conn, conn.service)

    @property
    def own_identity(self) -> str:
        ids = self.cfg.local_identities or self.creds.identities
        return ids[0]

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.cfg.mode is ProxyMode.WAYPOINT:
            await self.start_inbound()
        else:
            await self._sync_listeners()
        self.spawn(self._scrape_loop())
        self.ready.set()

    async def _sync_listeners(self) -> None:
        """Ingress: one TCP listener per Gateway listener port (opened as config brings them)."""
        if self.cfg.mode is not ProxyMode.INGRESS or self.draining:
            return
        loop = asyncio.get_running_loop()
        for port, listener in self.l7.listeners_by_port.items():
            if port in self.listener_servers:
                continue
            srv = await loop.create_server(lambda listener=listener: TcpDownstream(self, listener),  # type: ignore[misc]
                                           self.opts.hbone_host, port, reuse_address=True, backlog=1024)
            self.listener_servers[port] = srv
            self.servers.append(srv)
            self.own_addresses.append((self.opts.hbone_host, port))
            self.telemetry.log(kind="listening", listener=listener.key, port=port)

    # --- waypoint inbound ----------------------------------------------------------------------

    async def handle_inbound(self, session: HboneSession, stream: HboneStream) -> None:
        try:
            host, port = parse_host_port(stream.authority)
        except ValueError as e:
            stream.respond(400, f"bad :authority: {e}")
            return
        svc = self.l7.service_at(host, port)
        if svc is None:
            reason = f"{stream.authority} is not a service this waypoint serves"
            self.telemetry.refusal("waypoint", "no_route")
            self.telemetry.log(kind="access", direction="waypoint", src=session.peer_identity, status=404,
                               reason=reason)
            stream.respond(404, reason)
            return
        source = next((v for k, v in stream.headers if k == SOURCE_HEADER), "")
        ctx = Context.of(Arrival(svc, port), session.peer_identity, source)
        stream.respond(200)
        stream.attach(TunnelDownstream(self, stream, ctx))

    # --- one request ---------------------------------------------------------------------------

    async def handle_request(self, ctx: Context, head: RequestHead, body: bytes) -> Reply:
        started = mono_s()
        plan = plan_request(self.l7, ctx.arrival, ctx.peer, head, self.rand())
        where = (ctx.arrival.service.hostname if ctx.arrival.service is not None
                 else ctx.arrival.listener.key if ctx.arrival.listener is not None else "")
        logging = self.telemetry.access_log is not None
        log: dict[str, Any] = {}
        if logging:
            log = {"kind": "request", "src": ctx.caller or "unauthenticated", "method": head.method,
                   "path": head.path, "host": head.host, "to": where}
        if isinstance(plan, Refuse):
            self._count(ctx, where, plan.status)
            if logging:
                self.telemetry.log(**log, status=plan.status, reason=plan.reason, policy=plan.policy,
                                   duration_ms=round((mono_s() - started) * 1000, 3))
            return Reply(plan.status, (("content-type", "text/plain"),), plan.body or plan.reason.encode())
        if logging:
            log.update(route=plan.route_name, backend=plan.backend.target)
            if plan.request.target != head.target:  # normalized and/or rewritten: what the backend sees
                log["upstream_target"] = plan.request.target
            if plan.allowed_by:
                log["policy"] = plan.allowed_by
        reply, attempts = await self._forward(ctx, plan, body, log)
        if plan.response_headers is not None:
            reply = Reply(reply.status, modify_headers(reply.headers, plan.response_headers), reply.body)
        self._count(ctx, plan.backend.target, reply.status)
        self.requests_served += 1
        if logging:
            self.telemetry.log(**log, status=reply.status, attempts=attempts,
                               duration_ms=round((mono_s() - started) * 1000, 3))
        return reply

    def _count(self, ctx: Context, dest: str, status: int) -> None:
        reporter = "waypoint" if self.cfg.mode is ProxyMode.WAYPOINT else "gateway"
        self.telemetry.request_done(reporter, ctx.caller or "unknown", dest, status)

    async def _forward(self, ctx: Context, plan: Forward, body: bytes, log: dict[str, Any]) -> tuple[Reply, int]:
        deadline = mono_s() + plan.timeout_s if plan.timeout_s else None
        model = picker.model_of(body) if plan.pool is not None else ""
        tried: list[str] = []
        attempt = 0
        while True:
            attempt += 1
            left = None if deadline is None else deadline - mono_s()
            if left is not None and left <= 0:
                log["reason"] = "upstream request timeout (timeouts.request)"
                return Reply(504, (), b"upstream request timeout"), attempt - 1
            ep, why = self._choose(plan, tried, model)
            if ep is None:
                log["reason"] = why
                code = 404 if why.startswith("model ") else 503
                return Reply(code, (("content-type", "text/plain"),),
                             (why if code == 404 else f"no healthy upstream: {why}").encode()), attempt - 1
            log["endpoint"] = ep.workload_uid
            per_try = plan.backend_timeout_s
            if left is not None:
                per_try = left if per_try is None else min(per_try, left)
            result = await self._attempt(ctx, plan, ep, body, per_try)
            status = result.status if isinstance(result, ResponseReady) else None
            failure = result if isinstance(result, retry.Failure) else None
            outcome = retry.outlier_outcome(status, failure)
            if outcome is not None and plan.service is not None:
                self.record_outcome(plan.service.hostname, ep.workload_uid, outcome)
            if retry.retriable(plan.retry, attempt - 1, status, failure) and (
                    deadline is None or mono_s() < deadline):
                tried.append(ep.workload_uid)
                log.setdefault("retried", []).append(f"{ep.workload_uid}: {status or failure.value}")  # type: ignore[union-attr]
                await asyncio.sleep(retry.backoff_s(plan.retry, attempt, self.rand()))
                continue
            if isinstance(result, ResponseReady):
                return Reply(result.status, result.headers, result.body), attempt
            log["reason"] = f"upstream {failure.value if failure else 'failure'} ({ep.workload_uid})"
            if failure is retry.Failure.OVERFLOW:
                return Reply(503, (("x-envoy-overloaded", "true"),),
                             b"upstream connect error: connectionPool overflow"), attempt
            if failure is retry.Failure.TIMEOUT:
                return Reply(504, (), b"upstream request timeout"), attempt
            if failure is retry.Failure.DENIED:
                return Reply(403, (), b"refused by the destination's authorization policy"), attempt
            return Reply(503, (), b"upstream connect error or disconnect/reset before headers. reset reason: "
                         + (b"connection failure" if failure is retry.Failure.CONNECT else b"connection termination")), attempt

    def _choose(self, plan: Forward, tried: list[str], model: str) -> tuple[Endpoint | None, str]:
        if plan.pool is not None:
            pick = picker.pick_endpoint(plan.pool, self.metrics, self.in_flight, model, mono_s(), self.rand(),
                                        exclude=frozenset(tried))
            if pick.endpoint is None and tried:
                pick = picker.pick_endpoint(plan.pool, self.metrics, self.in_flight, model, mono_s(), self.rand())
            return pick.endpoint, pick.reason
        svc = plan.service
        assert svc is not None
        ejected = self.ejected(svc.hostname)
        if not tried:  # the first try: the tier loads of this view and ejection set, computed once
            key = (id(svc.endpoints), ejected)
            load = self._loads.get(key)
            if load is None or load[0] is not svc.endpoints:
                if len(self._loads) > 1024:
                    self._loads.clear()
                lp = priority_load(tier_health(svc.endpoints, ejected))
                load = self._loads[key] = (svc.endpoints, lp.shares, lp.panic)
            return (pick_endpoint(svc.endpoints, load[1], ejected, self.rand(), load[2]),
                    f"no endpoint of {svc.hostname} is healthy and not ejected")
        ep = choose_endpoint(svc.endpoints, ejected, self.rand(), exclude=frozenset(tried))
        if ep is None and tried:  # every host tried once: Envoy's previous_hosts gives up the exclusion
            ep = choose_endpoint(svc.endpoints, ejected, self.rand())
        return ep, f"no endpoint of {svc.hostname} is healthy and not ejected"

    async def _attempt(self, ctx: Context, plan: Forward, ep: Endpoint, body: bytes,
                       timeout_s: float | None) -> ResponseReady | retry.Failure:
        svc_host = plan.service.hostname if plan.service is not None else plan.backend.target
        port = ep.port if plan.pool is None else plan.target_port
        key = (ep.workload_uid, ctx.caller, port)
        conn = await self._connection(ctx, plan, ep, key, svc_host, timeout_s)
        if isinstance(conn, retry.Failure):
            return conn
        uid = ep.workload_uid
        self.in_flight[uid] = self.in_flight.get(uid, 0) + 1
        try:
            result = await conn.exchange(plan.request, body, timeout_s)
        except UnsafeRequestLine:
            self._release(conn, svc_host)  # nothing was written: the connection and its slot stay good
            raise
        finally:
            n = self.in_flight.get(uid, 1) - 1
            if n > 0:
                self.in_flight[uid] = n
            else:
                self.in_flight.pop(uid, None)
        self._release(conn, svc_host)
        return result

    async def _connection(self, ctx: Context, plan: Forward, ep: Endpoint, key: tuple[str, str, int], svc_host: str,
                          timeout_s: float | None) -> UpstreamConn | retry.Failure:
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.reusable:
                return conn
            self._closed(conn, svc_host)
        budget = self.budgets.setdefault(svc_host, UpstreamBudget())
        admission = budget.admit()
        if admission is Admission.OVERFLOW:
            self.telemetry.refusal("waypoint", "connection_pool_overflow")
            return retry.Failure.OVERFLOW
        if admission is Admission.WAIT:
            fut: asyncio.Future[UpstreamConn | None] = asyncio.get_running_loop().create_future()
            q = self.waiters.setdefault(svc_host, deque())
            q.append(fut)
            try:
                handed = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ValueError):
                    q.remove(fut)
                if fut.done() and not fut.cancelled():
                    got = fut.result()
                    if got is not None:
                        self._release(got, svc_host)
                    else:
                        budget.released()
                else:
                    budget.gave_up()
                return retry.Failure.TIMEOUT
            if handed is not None:
                if handed.key == key and handed.reusable:
                    return handed
                # a connection to another endpoint was handed over: close it, keep its slot
                handed.close()
        timeout = timeout_s if timeout_s is not None else DEFAULT_CONNECT_TIMEOUT_S
        timeout = min(timeout, plan.service.connect_timeout_s if plan.service is not None else timeout)
        headers: tuple[tuple[str, str], ...] = ((SOURCE_HEADER, ctx.source_uid),) if ctx.source_uid else ()
        if ctx.caller:
            headers += ((CALLER_HEADER, ctx.caller),)
        target = ep if ep.gateway or ep.port == key[2] else _with_port(ep, key[2])
        try:
            stream = await self.open_to_endpoint(self.own_identity, headers, svc_host, plan.service_port, target,
                                                 (ep.identity,) if ep.identity else None, max(0.001, timeout))
        except TunnelRefused as e:
            self._slot_freed(svc_host)
            # 403: the destination's ztunnel refused by L4 policy; a decision, not a host failure
            return retry.Failure.DENIED if e.status == 403 else retry.Failure.CONNECT
        except (OSError, TimeoutError, TunnelReset, PeerVerificationError, ssl.SSLError, ConnectionError):
            self._slot_freed(svc_host)
            return retry.Failure.CONNECT
        return UpstreamConn(stream, key, svc_host)

    def _release(self, conn: UpstreamConn, svc_host: str) -> None:
        """After an exchange: keep the connection for the next request (a waiter first), or close it."""
        budget = self.budgets.setdefault(svc_host, UpstreamBudget())
        if conn.reusable and budget.reusable(conn.h1.requests) and not self.draining:
            q = self.waiters.get(svc_host)
            while q:
                fut = q.popleft()
                if not fut.done():
                    budget.handed_idle()
                    fut.set_result(conn)
                    return
            lst = self.idle.setdefault(conn.key, [])
            if len(lst) < MAX_IDLE_PER_KEY:
                lst.append(conn)
                return
        conn.close()
        self._closed(conn, svc_host)

    def _closed(self, conn: UpstreamConn, svc_host: str) -> None:
        conn.close()
        self._slot_freed(svc_host)

    def _slot_freed(self, svc_host: str) -> None:
        budget = self.budgets.setdefault(svc_host, UpstreamBudget())
        budget.released()
        q = self.waiters.get(svc_host)
        while q:
            fut = q.popleft()
            if not fut.done():
                budget.granted()
                fut.set_result(None)  # the waiter opens its own connection in the freed slot
                return

    # --- inference picker: metrics ---------------------------------------------------------------

    async def _scrape_loop(self) -> None:
        while not self.draining:
            pools = list(self.l7.pools.values())
            if pools:
                await asyncio.gather(*(self._scrape(p, ep) for p in pools for ep in p.endpoints if ep.healthy),
                                     return_exceptions=True)
                live = {ep.workload_uid for p in pools for ep in p.endpoints}
                for uid in [u for u in self.metrics if u not in live]:
                    del self.metrics[uid]
            await asyncio.sleep(SCRAPE_INTERVAL_S)

    async def _scrape(self, pool: InferencePool, ep: Endpoint) -> None:
        key = (ep.workload_uid, SCRAPER, pool.target_ports[0])  # its own idle list: not counted in budgets
        conns = self.idle.get(key)
        conn = conns.pop() if conns else None
        if conn is None or not conn.reusable:
            try:
                stream = await self.open_to_endpoint(self.own_identity, (), "", pool.target_ports[0],
                                                     _with_port(ep, pool.target_ports[0]),
                                                     (ep.identity,) if ep.identity else None, SCRAPE_TIMEOUT_S)
            except (OSError, TimeoutError, TunnelRefused, TunnelReset, PeerVerificationError, ssl.SSLError,
                    ConnectionError):
                return
            conn = UpstreamConn(stream, key, f"pool:{pool.key}")
        result = await conn.exchange(RequestHead("GET", pool.metrics_path, ep.address or "metrics"), b"",
                                     SCRAPE_TIMEOUT_S)
        if isinstance(result, ResponseReady) and result.status == 200:
            self.metrics[ep.workload_uid] = picker.parse_metrics(result.body.decode("utf-8", "replace"), mono_s())
        if conn.reusable:
            self.idle.setdefault(key, []).append(conn)
        else:
            conn.close()

    # --- admin ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "requests_served": self.requests_served,
            "budgets": {k: {"active": b.active, "pending": b.pending, "overflows": b.overflows}
                        for k, b in self.budgets.items() if b.active or b.pending or b.overflows},
            "picker": {uid: {"waiting": m.waiting, "running": m.running, "models": sorted(m.models)}
                       for uid, m in self.metrics.items()},
        }

    async def drain(self, timeout_s: float | None = None) -> None:
        for lst in self.idle.values():
            for c in lst:
                c.close()
        self.idle.clear()
        await super().drain(timeout_s)


def _with_port(ep: Endpoint, port: int) -> Endpoint:
    from dataclasses import replace
    return replace(ep, port=port)

