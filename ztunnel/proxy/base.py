"""What the node proxy and the east-west gateway share: options, credentials, the HBONE listener,
pooled outbound sessions, outlier detection and health reporting, drain.

`ProxyBase` owns the lifetime of one proxy process's listeners and sessions: `start()` binds and
sets the ready signal, `drain()` stops accepting and waits (bounded) for open tunnels, then
closes. Subclasses decide what an inbound tunnel is for (`NodeProxy`: a local pod;
`GatewayProxy`: another HBONE hop).

What one peer can make a proxy hold is bounded (`ProxyOptions`), so memory does not grow with
what peers send or how many sockets they open:
- TLS handshakes in flight: `max_handshakes_per_peer` per peer IP and `max_handshakes_total`;
  a connection over either cap is dropped before any TLS work, and a handshake that does not
  finish within `handshake_timeout_s` is aborted (`HandshakeGate`, `TlsAdapter(admit=...)`);
- established inbound connections: `max_conns_per_peer` per peer IP, `max_inbound_conns` in total;
  one that opens no tunnel within `first_stream_timeout_s` is closed;
- per connection: the receive windows (`hbone.connection_window_bytes`: what a peer may send
  before we read it), at most `max_unsent_bytes` of ciphertext it does not read (with
  back-pressure to the relays before that), one frame of partial input. Worst case per inbound
  connection, with the defaults, for a peer that sends all it may and reads nothing:
    its data not yet taken by backends  16 MiB    `hbone.connection_window_bytes`, the window we
                                                  advertise: DATA past it is a connection error
                                                  (FLOW_CONTROL_ERROR), and a relay returns window
                                                  only while its backend socket is below its
                                                  high-water mark (asyncio's 64 KiB)
    + per tunnel, taken, not yet sent   ~80 KiB   that backend socket: its mark + one DATA frame
    + per tunnel, for the peer          ~1.25 MiB `relay.HIGH_WATER_BYTES` + one read: the relay
                                                  stops reading its backend above the mark, and
                                                  the peer's window decides when it drains
    + ciphertext the peer leaves unread  8 MiB    `max_unsent_bytes`, then the connection is cut
    + before/while handshaking          ~80 KiB   `MAX_HANDSHAKE_BYTES` + one partial frame
  = about 24 MiB + 1.3 MiB per open tunnel: about 155 MiB at `hbone.max_concurrent_streams` (100).
  Per peer IP that is multiplied by `max_conns_per_peer` and in total by `max_inbound_conns`: the
  caps bound the number of connections, not a memory budget, so the product is a bound, not a
  small one (most of it is what a legitimate bulk transfer is allowed to use);
- per outbound capture: `ztunnel.proxy.capture` (SOCKS5 handshake timeout, bounded early bytes);
- metric label sets and outlier state per endpoint live as long as the endpoint is in the config
  (`on_config_applied` removes them with the endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509

from ztunnel.api import authz
from ztunnel.api.clock import calendar_now
from ztunnel.api.config import Endpoint, ProxyConfig, ProxyMode
from ztunnel.api.identity import SpiffeId
from ztunnel.api.outlier import EndpointEjected, EndpointUnejected, Outcome, OutlierDetector
from ztunnel.api.ports import HBONE_PORT, OUTBOUND_CAPTURE_PORT, SOCKS5_PORT
from ztunnel.api.verify import PeerVerificationError, TrustStore
from ztunnel.hbone.framer import ErrorCode, HboneSettings, Role, StreamState
from ztunnel.identity.resumption import RESUMPTION_MAX_AGE_S, SessionTickets
from ztunnel.identity.tls import client_context, server_context, verify_connection
from ztunnel.identity.tls_transport import MAX_UNSENT_BYTES, TlsAdapter
from ztunnel.proxy.admin import ConnLabels, Telemetry
from ztunnel.proxy.overload import LagHistory, LagShedder, LoadState
from ztunnel.proxy.plan import sni_for_identity
from ztunnel.proxy.relay import (
    HboneSession,
    HboneStream,
    PlainRelay,
    RelayStats,
    StreamTransport,
    abort_with_reset,
)
from ztunnel.xds.state import ProxyState, parse_host_port

log = logging.getLogger(__name__)

REASON_HEADER = "x-meshfed-reason"
VERIFY_CACHE_S = 60.0        # how long a verified peer certificate is taken as verified
VERIFY_CACHE_ENTRIES = 4096
SOURCE_HEADER = "x-meshfed-source"


def wall_s() -> float:
    """The calendar (`ztunnel.api.clock`): peer certificates are judged valid on it."""
    return calendar_now()


def mono_s() -> float:
    return time.monotonic()


MAX_SETUPS_IN_FLIGHT = 64
# How often the loop's lag is sampled: 50 Hz while connections are being set up (their failed
# attempts are judged by it, `LagHistory`) and always on a proxy that sheds by lag (a stall between
# two idle samples would go unseen, or be measured short by up to the idle interval); 4 Hz on an
# idle proxy that does not shed by lag, where nothing reads the lag until a setup comes (and the
# first one admitted brings the probe back to 50 Hz). Measured on this project's 2-core VM, an
# idle proxy probing at 50 Hz spent ~7 ms of CPU per second on the wakeups; at 4 Hz, under 1.
LAG_PROBE_INTERVAL_S = 0.02
LAG_PROBE_IDLE_INTERVAL_S = 0.25
# A connect attempt that times out while our loop ran at least this share of its timeout late
# timed out in our own queue, not at the endpoint (`judge_failed_attempt(self_saturated=...)`)
SELF_SATURATION_LAG_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    hbone_host: str = "0.0.0.0"
    hbone_port: int = HBONE_PORT
    socks_host: str | None = "127.0.0.1"
    socks_port: int = SOCKS5_PORT
    transparent_host: str | None = None      # outbound capture listener (iptables REDIRECT target)
    transparent_port: int = OUTBOUND_CAPTURE_PORT
    handshake_timeout_s: float = 5.0         # TLS, and SOCKS5 greeting + request
    first_stream_timeout_s: float = 10.0     # an inbound connection must open a tunnel by then
    max_conns_per_peer: int = 256            # established inbound connections per peer IP
    max_inbound_conns: int = 4096            # established inbound connections in total
    # inbound TLS (and SOCKS5) handshakes in flight per peer IP, and in total. Not lower than the
    # per-peer connection cap: a node sees every cross-network client's inner handshake come from
    # its cluster's east-west gateway, one address (measured in the lab: 32 refused a busy gateway)
    max_handshakes_per_peer: int = 256
    max_handshakes_total: int = 1024
    max_unsent_bytes: int = MAX_UNSENT_BYTES  # ciphertext a peer leaves unread before we cut it off
    # connection setups in flight (outbound: capture → tunnel established; inbound: CONNECT →
    # answered), per peer IP and in total: past it the proxy is saturated and sheds new ones at once
    # with an explicit refusal (a 503 marked overloaded, a SOCKS failure) rather than queueing them
    # into timeouts; see `ztunnel.proxy.plan.judge_failed_attempt` for why that is not an endpoint failure
    max_setups_in_flight: int = MAX_SETUPS_IN_FLIGHT
    # shed new connection setups while the event loop runs this late (ms; 0: off): saturation itself,
    # measured (`ztunnel.proxy.overload`)
    shed_at_loop_lag_ms: float = 0.0
    # resume the inner end-to-end mTLS of double HBONE with TLS 1.3 tickets (and issue tickets as a
    # server); the peer's identity is checked on resumed sessions as on full ones
    tls_resumption: bool = True
    drain_timeout_s: float = 10.0
    hbone: HboneSettings = field(default_factory=HboneSettings)
    root_namespace: str = authz.ROOT_NAMESPACE


class Credentials:
    """Certificates this proxy may present, per identity, and TLS contexts built from them."""

    def __init__(self, svids: dict[str, tuple[bytes, bytes]]) -> None:
        self._svids = dict(svids)  # identity -> (chain pem, key pem)
        self._client: dict[str, ssl.SSLContext] = {}
        self._server: dict[str, ssl.SSLContext] = {}
        self._store: TrustStore | None = None

    @property
    def identities(self) -> tuple[str, ...]:
        return tuple(sorted(self._svids))

    def set_store(self, store: TrustStore) -> None:
        self._store = store
        self._client.clear()
        self._server.clear()

    @property
    def store(self) -> TrustStore:
        if self._store is None:
            raise PeerVerificationError("no trust bundles configured yet; the proxy cannot verify any peer",
                                        "no_bundles")
        return self._store

    def has(self, identity: str) -> bool:
        return identity in self._svids

    def put(self, identity: str, chain_pem: bytes, key_pem: bytes) -> None:
        """Add or replace one SVID (controller mode: issued or rotated); new handshakes use it."""
        if self._svids.get(identity) == (chain_pem, key_pem):
            return
        self._svids[identity] = (chain_pem, key_pem)
        self._client.pop(identity, None)
        self._server.pop(identity, None)

    def client_ctx(self, identity: str) -> ssl.SSLContext:
        ctx = self._client.get(identity)
        if ctx is None:
            if identity not in self._svids:
                raise PeerVerificationError(f"no certificate for {identity} on this proxy (is the workload "
                                            "scheduled here and its certificate issued?)", "no_certificate")
            chain, key = self._svids[identity]
            ctx = self._client[identity] = client_context(chain, key, self.store)
        return ctx

    def server_ctx(self, identity: str) -> ssl.SSLContext:
        ctx = self._server.get(identity)
        if ctx is None:
            chain, key = self._svids[identity]
            ctx = self._server[identity] = server_context(chain, key, self.store)
        return ctx


class HealthSink(Protocol):
    """Where outcome counters and ejections go upward (the controller client implements it)."""

    def report(self, proxy_id: str, event: EndpointEjected | EndpointUnejected | dict[str, Any]) -> None: ...

    def retain_endpoints(self, live: set[tuple[str, str]]) -> None:
        """Forget what is kept per endpoint for (service, endpoint) pairs not in `live` (the config)."""


class LogHealthSink:
    """Standalone proxies' sink: the log (ejections themselves are logged where they happen,
    `ProxyBase._outlier_event`; this adds the periodic outcome counters at DEBUG)."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._t = telemetry

    def report(self, proxy_id: str, event: EndpointEjected | EndpointUnejected | dict[str, Any]) -> None:
        if isinstance(event, dict) and log.isEnabledFor(logging.DEBUG):
            log.debug("health report of %s: %s", proxy_id, event, extra={"fields": {"kind": "health", **event}})

    def retain_endpoints(self, live: set[tuple[str, str]]) -> None:
        pass  # keeps nothing per endpoint


class ConnectFailed(Exception):
    """No endpoint could be reached before the deadline; the message lists what was tried."""


class HandshakeGate:
    """Handshakes (or, named `setups`, connection setups) in flight, per peer IP and in total.
    `admit` before any work on a new connection (False: drop it), `release` exactly once per
    admitted connection when its handshake is over. Invariant: `per_peer` holds only peers with
    at least one handshake in flight; `total` is the sum of its values."""

    def __init__(self, per_peer_max: int, total_max: int, name: str = "handshakes") -> None:
        self.per_peer_max, self.total_max, self.name = per_peer_max, total_max, name
        self.per_peer: dict[str, int] = {}
        self.total = 0

    def admit(self, peer: str) -> str:
        """"" when admitted, else why not (a refusal reason code)."""
        if self.total >= self.total_max:
            return f"{self.name}_total_cap"
        n = self.per_peer.get(peer, 0)
        if n >= self.per_peer_max:
            return f"{self.name}_per_peer_cap"
        self.per_peer[peer] = n + 1
        self.total += 1
        return ""

    def release(self, peer: str) -> None:
        n = self.per_peer.get(peer, 0)
        if n <= 0:
            return
        self.total -= 1
        if n == 1:
            del self.per_peer[peer]
        else:
            self.per_peer[peer] = n - 1


class SessionPool:
    """Client HBONE sessions by key; a new one is dialed when none is usable. Concurrent callers
    for the same key share one dial."""

    def __init__(self) -> None:
        self._sessions: dict[Any, list[HboneSession]] = {}
        self._dialing: dict[Any, asyncio.Future[HboneSession]] = {}

    async def get(self, key: Any, dial: Callable[[], Awaitable[HboneSession]]) -> HboneSession:
        for s in self._sessions.get(key, ()):
            if s.usable:
                return s
        pending = self._dialing.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[HboneSession] = asyncio.get_running_loop().create_future()
        self._dialing[key] = fut
        try:
            s = await dial()
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._dialing.pop(key, None)
        fut.set_result(s)
        self._sessions.setdefault(key, []).append(s)
        s.closed.add_done_callback(lambda _f: self._discard(key, s))
        return s

    def _discard(self, key: Any, s: HboneSession) -> None:
        lst = self._sessions.get(key)
        if lst and s in lst:
            lst.remove(s)
            if not lst:
                del self._sessions[key]

    def all(self) -> list[HboneSession]:
        return [s for lst in self._sessions.values() for s in lst]

    def count(self) -> int:
        return sum(len(v) for v in self._sessions.values())


class ProxyBase:
    """State, credentials, inbound HBONE server, client pool, outlier detectors, drain."""

    mode: ProxyMode = ProxyMode.NODE

    def __init__(self, state: ProxyState, creds: Credentials, options: ProxyOptions | None = None,
                 telemetry: Telemetry | None = None, health: HealthSink | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.state = state
        self.creds = creds
        self.opts = options or ProxyOptions()
        cfg = state.config
        self.telemetry = telemetry or Telemetry(cfg.proxy_id if cfg else "proxy")
        self.health: HealthSink = health or LogHealthSink(self.telemetry)
        self.rand = rand
        self.pool = SessionPool()
        self.detectors: dict[str, OutlierDetector] = {}
        self.servers: list[asyncio.Server] = []
        self.inbound_sessions: set[HboneSession] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.relays: set[PlainRelay] = set()
        self._per_peer: dict[str, int] = {}
        self.handshakes = HandshakeGate(self.opts.max_handshakes_per_peer, self.opts.max_handshakes_total)
        self.setups = HandshakeGate(self.opts.max_setups_in_flight, self.opts.max_setups_in_flight, "setups")
        self.shedder = LagShedder(self.opts.shed_at_loop_lag_ms / 1000) if self.opts.shed_at_loop_lag_ms > 0 else None
        self._lag_probe: asyncio.TimerHandle | None = None
        self.lag_history = LagHistory()
        self.own_addresses: list[tuple[str, int]] = []
        self.ready = asyncio.Event()
        self.draining = False
        self._bundles_seen: tuple[Any, ...] | None = None
        self._verified: dict[bytes, tuple[TrustStore, SpiffeId, float]] = {}
        self.tickets = SessionTickets()
        self._inbound_ctx: tuple[ssl.SSLContext, TrustStore, float] | None = None
        # called with each applied config (e.g. the capture rules follow the node's workloads)
        self.config_listeners: list[Callable[[ProxyConfig], None]] = []
        self.on_config_applied()

    def add_config_listener(self, listener: Callable[[ProxyConfig], None]) -> None:
        """Call `listener(config)` now (if there is a config) and after every applied config."""
        self.config_listeners.append(listener)
        if self.state.config is not None:
            listener(self.state.config)

    # --- config ----------------------------------------------------------------------------------

    @property
    def cfg(self) -> ProxyConfig:
        if self.state.config is None:
            raise RuntimeError("no config applied yet")
        return self.state.config

    def on_config_applied(self) -> None:
        cfg = self.state.config
        if cfg is None:
            return
        trust_key = (cfg.bundles, cfg.trust_domain, cfg.federated_trust_domains)
        if trust_key != self._bundles_seen:
            self._bundles_seen = trust_key
            federated = {cfg.trust_domain: cfg.federated_trust_domains} if cfg.federated_trust_domains else None
            self.creds.set_store(TrustStore.from_bundles(cfg.bundles, federated=federated))
        for svc in cfg.services:
            keys = [e.workload_uid for e in svc.endpoints]
            if svc.outlier is not None:
                det = self.detectors.get(svc.hostname)
                if det is None or det.policy != svc.outlier:
                    det = self.detectors[svc.hostname] = OutlierDetector(svc.outlier)
                det.set_pool(keys)
            else:
                self.detectors.pop(svc.hostname, None)
        # what belongs to services and endpoints that left the config goes with them
        live = {(svc.hostname, e.workload_uid) for svc in cfg.services for e in svc.endpoints}
        for host in set(self.detectors) - {svc.hostname for svc in cfg.services}:
            del self.detectors[host]
        self.telemetry.retain_endpoints(live)
        self.health.retain_endpoints(live)
        for listener in self.config_listeners:
            listener(cfg)

    # --- peer verification ------------------------------------------------------------------------

    def verify_peer(self, ssl_obj: Any, expected: tuple[str, ...] | None) -> SpiffeId:
        """`verify_connection` with a small cache of positive results, keyed by the peer's DER bytes
        and the trust store (a new config builds a new store, which empties the cache in effect).

        Every new inner tunnel of a double-HBONE connection is a full handshake with the same peer
        certificate; re-parsing and re-verifying its signature cost ~0.3-0.6 ms per side here. A hit
        is honoured for at most `VERIFY_CACHE_S` and never past the leaf's notAfter; the expected
        identity is checked on every call (a miss there goes through the full check, which raises
        the proper `wrong_identity`)."""
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        store = self.creds.store
        now = wall_s()
        if der:
            hit = self._verified.get(der)
            if hit is not None and hit[0] is store and now < hit[2] and (expected is None or str(hit[1]) in expected):
                return hit[1]
        sid = verify_connection(ssl_obj, store, now, expected=expected, local_trust_domain=self.cfg.trust_domain)
        if der:
            if len(self._verified) >= VERIFY_CACHE_ENTRIES:
                self._verified.clear()
            not_after = x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
            self._verified[der] = (store, sid, min(now + VERIFY_CACHE_S, not_after))
        return sid

    # --- task ownership --------------------------------------------------------------------------

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a proxy task failed: %r", task.exception(),
                        extra={"fields": {"kind": "task_error", "error": repr(task.exception())}})

    # --- inbound HBONE server ----------------------------------------------------------------------

    def _sni_callback(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        identity = self.identity_for_sni(server_name)
        if identity is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        try:
            sslobj.context = self.creds.server_ctx(identity)
        except (PeerVerificationError, ValueError, ssl.SSLError):
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None

    def identity_for_sni(self, server_name: str | None) -> str | None:
        ids = self.creds.identities
        if not ids:
            return None
        if server_name:
            for i in ids:
                if sni_for_identity(i) == server_name:
                    return i
            svc = self.state.indexes.services_by_host.get(server_name)
            if svc is not None:
                for w, _ in self.state.indexes.local_endpoints(svc):
                    if self.creds.has(w.identity):
                        return w.identity
        return ids[0]

    def _server_context(self) -> ssl.SSLContext:
        ids = self.creds.identities
        if not ids:
            raise RuntimeError("no local identity has a certificate; pass --cert-dir with the proxy's SVIDs")
        base = server_context(*self.creds._svids[ids[0]], self.creds.store, tickets=self.opts.tls_resumption)
        base.sni_callback = self._sni_callback
        return base

    def _inbound_context(self) -> ssl.SSLContext:
        """The context a new inbound connection starts with (the SNI callback then switches to the
        identity's own). Rebuilt when the trust store changed and at least every
        `RESUMPTION_MAX_AGE_S`: its ticket keys are the ones resumption tickets are sealed with, so
        no ticket of ours — nor a chain of resumptions from it — outlives that age."""
        now, store = mono_s(), self.creds.store
        cur = self._inbound_ctx
        if cur is None or cur[1] is not store or now - cur[2] >= RESUMPTION_MAX_AGE_S:
            cur = self._inbound_ctx = (self._server_context(), store, now)
        return cur[0]

    async def start_inbound(self) -> None:
        loop = asyncio.get_running_loop()
        self._inbound_context()  # fail at start, not at the first connection, when there is no SVID
        if self._lag_probe is None:
            self._schedule_lag_probe(loop, loop.time(), LAG_PROBE_INTERVAL_S)

        def accepted() -> TlsAdapter:
            session = HboneSession(Role.SERVER, loop, self.opts.hbone, on_connect=self._on_connect,
                                   on_made=self._inbound_made, on_closed=self._inbound_closed)
            peer: list[str] = []

            def admit(transport: asyncio.BaseTransport) -> bool:
                peer.append((transport.get_extra_info("peername") or ("?", 0))[0])
                return self.admit_handshake(peer[0], "destination")

            return TlsAdapter(loop, self._inbound_context(), session, server_side=True,
                              handshake_timeout_s=self.opts.handshake_timeout_s,
                              admit=admit, on_handshake_over=lambda: self.handshakes.release(peer[0]),
                              max_unsent_bytes=self.opts.max_unsent_bytes)

        srv = await loop.create_server(accepted, self.opts.hbone_host, self.opts.hbone_port, reuse_address=True,
                                       backlog=1024)
        self.servers.append(srv)
        addr = srv.sockets[0].getsockname()
        self.opts = with_options(self.opts, hbone_port=addr[1])
        self.own_addresses.append((addr[0], addr[1]))

    def admit_handshake(self, peer_ip: str, reporter: str) -> bool:
        """A new connection from `peer_ip` may start its handshake (TLS, SOCKS5) unless too many
        are in flight from it or in total; the caller releases `self.handshakes` when it is over."""
        if self.draining:
            return False
        why = self.handshakes.admit(peer_ip)
        if why:
            self.telemetry.refusal(reporter, why)
            self.telemetry.log(kind="refused", peer=peer_ip, reason=(
                f"over {self.opts.max_handshakes_per_peer} handshakes in flight from this peer"
                if why == "handshakes_per_peer_cap" else
                f"over {self.opts.max_handshakes_total} handshakes in flight in total"))
            return False
        if self.handshakes.total == 1:   # the first in flight: the probe may be at its idle rate
            self._quicken_lag_probe()
        return True

    def _inbound_made(self, session: HboneSession) -> bool:
        assert session.transport is not None
        peer_ip = (session.transport.get_extra_info("peername") or ("?", 0))[0]
        if self.draining:
            return False
        n = self._per_peer.get(peer_ip, 0)
        if n >= self.opts.max_conns_per_peer:
            self.telemetry.refusal("destination", "per_peer_cap")
            self.telemetry.log(kind="refused", peer=peer_ip, reason=f"over {self.opts.max_conns_per_peer} "
                               "connections from this peer")
            return False
        if len(self.inbound_sessions) >= self.opts.max_inbound_conns:
            self.telemetry.refusal("destination", "total_cap")
            self.telemetry.log(kind="refused", peer=peer_ip, reason=f"over {self.opts.max_inbound_conns} "
                               "inbound connections in total")
            return False
        ssl_obj = session.transport.get_extra_info("ssl_object")
        try:
            sid = self.verify_peer(ssl_obj, None)
        except PeerVerificationError as e:
            self.telemetry.refusal("destination", f"peer_{e.code}")
            self.telemetry.log(kind="refused", peer=peer_ip, reason=str(e), code=e.code)
            return False
        session.peer_identity = str(sid)
        session.peer_ip = peer_ip  # type: ignore[attr-defined]
        self._per_peer[peer_ip] = n + 1
        self.inbound_sessions.add(session)
        loop = session.loop
        loop.call_later(self.opts.first_stream_timeout_s, self._idle_check, session)
        return True

    def _idle_check(self, session: HboneSession) -> None:
        if not session.conn._highest_peer_stream and session.transport is not None:
            self.telemetry.log(kind="refused", peer=getattr(session, "peer_ip", "?"),
                               reason=f"no tunnel opened within {self.opts.first_stream_timeout_s:g}s")
            session.abort()

    def _inbound_closed(self, session: HboneSession) -> None:
        if session in self.inbound_sessions:
            self.inbound_sessions.discard(session)
            ip = getattr(session, "peer_ip", "")
            n = self._per_peer.get(ip, 0) - 1
            if n <= 0:
                self._per_peer.pop(ip, None)
            else:
                self._per_peer[ip] = n

    def _on_connect(self, session: HboneSession, stream: HboneStream) -> None:
        if self.draining:
            stream.respond(503, "proxy is draining")
            return
        peer_ip = getattr(session, "peer_ip", "?")
        if not self.admit_setup(peer_ip, "destination"):
            stream.respond(503, f"{self.cfg.proxy_id} is saturated ({self.opts.max_setups_in_flight} connection "
                                "setups in flight): shed, try again", overloaded=True)
            return
        task = self.spawn(self.handle_inbound(session, stream))
        task.add_done_callback(lambda _t: self.setups.release(peer_ip))

    def _schedule_lag_probe(self, loop: asyncio.AbstractEventLoop, now: float, interval_s: float) -> None:
        due = now + interval_s
        self._lag_probe = loop.call_at(due, self._probe_lag, due)

    def _lag_probe_busy(self) -> bool:
        return bool(self.shedder is not None or self.setups.total or self.handshakes.total)

    def _quicken_lag_probe(self) -> None:
        """A setup or handshake was admitted: sample at the busy rate from now on. A probe already
        due within the busy interval (or overdue: the loop runs late) is left to run, not replaced,
        so that its late sample is not lost."""
        probe = self._lag_probe
        if probe is None or self.draining:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if probe.when() - now > LAG_PROBE_INTERVAL_S:
            probe.cancel()
            self._schedule_lag_probe(loop, now, LAG_PROBE_INTERVAL_S)

    def _probe_lag(self, due: float) -> None:
        """How late this timer ran is how late everything on the loop runs (`LagHistory`, `LagShedder`)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        lag_s, at_s = max(0.0, now - due), mono_s()
        self.lag_history.observe(lag_s, at_s)
        t = self.shedder.observe(lag_s, at_s) if self.shedder is not None else None
        if t is not None:
            log.warning("%s: event loop %.0f ms late; %s", self.cfg.proxy_id if self.state.config else "proxy",
                        t.lag_s * 1000, "saturated, shedding new connection setups" if t.state is LoadState.SHEDDING
                        else "recovered, admitting new connection setups",
                        extra={"fields": {"kind": "load", "state": t.state.value, "lag_ms": round(t.lag_s * 1000, 1)}})
        busy = self._lag_probe_busy()
        if busy or not self.draining:   # draining: setups admitted before still get their samples
            self._schedule_lag_probe(loop, now, LAG_PROBE_INTERVAL_S if busy else LAG_PROBE_IDLE_INTERVAL_S)
        else:
            self._lag_probe = None

    def admit_setup(self, peer_ip: str, reporter: str) -> bool:
        """A new connection may be set up (dial, handshakes, answer) unless `max_setups_in_flight`
        are already in flight from `peer_ip` or in total: past that the proxy is saturated, and a
        setup it admitted would only queue behind the others into a timeout. The caller refuses
        at once, marked as overload, and releases `self.setups` when an admitted setup is over."""
        if self.shedder is not None and self.shedder.shedding:
            self.telemetry.refusal(reporter, "overloaded")
            self.telemetry.log(kind="refused", peer=peer_ip, reason=(
                f"event loop over {self.opts.shed_at_loop_lag_ms:g} ms late: saturated; shed"))
            return False
        why = self.setups.admit(peer_ip)
        if why:
            self.telemetry.refusal(reporter, "overloaded")
            self.telemetry.log(kind="refused", peer=peer_ip, reason=f"{why}: over {self.opts.max_setups_in_flight} "
                               "connection setups in flight; shed")
            return False
        if self.setups.total == 1:       # the first in flight: the probe may be at its idle rate
            self._quicken_lag_probe()
        return True

    async def handle_inbound(self, session: HboneSession, stream: HboneStream) -> None:
        raise NotImplementedError

    async def connect_and_relay(self, stream: HboneStream, target: tuple[str, int], timeout_s: float,
                                labels: ConnLabels, log: dict[str, Any], preamble: bytes = b"") -> bool:
        """Dial `target`, answer the CONNECT (200 or 503 with the reason) and relay. True on success.
        `preamble` (a PROXY v2 header) is written to the target before any tunnel byte."""
        loop = asyncio.get_running_loop()
        started = mono_s()

        def done(stats: RelayStats) -> None:
            self.relays.discard(relay)
            self.telemetry.conn_closed(labels, stats.bytes_to_plain, stats.bytes_from_plain)
            self.telemetry.log(kind="access", **log, bytes_sent=stats.bytes_to_plain,
                               bytes_received=stats.bytes_from_plain, reset=stats.reset,
                               duration_ms=round((mono_s() - started) * 1000, 3), error=stats.error)

        relay = PlainRelay(None, done)
        if stream_gone(stream):
            return False  # reset (or its connection ended) before we got to it: nothing to dial for
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: no task (and loop turn) per connection
                await loop.create_connection(lambda: relay, *target)
        except (OSError, TimeoutError) as e:
            reason = (f"connect to {target[0]}:{target[1]} failed: "
                      f"{'timed out' if isinstance(e, TimeoutError) else e.strerror or e!r}")
            self.telemetry.refusal(labels.reporter, "upstream_connect_failed")
            self.telemetry.log(kind="access", **log, status=503, reason=reason)
            with contextlib.suppress(Exception):
                stream.respond(503, reason)
            return False
        if stream_gone(stream):
            abort_with_reset(relay.transport)  # type: ignore[arg-type]
            return False
        self.relays.add(relay)
        self.telemetry.conn_opened(labels)
        if preamble and relay.transport is not None and not relay.transport.is_closing():
            relay.transport.write(preamble)   # closing: its relay finishes the stream (uvloop raises on a write)
        stream.respond(200)
        relay.bind(stream)
        return True

    # --- outbound HBONE client -----------------------------------------------------------------

    def _verifying(self, expected: tuple[str, ...] | None,
                   failure: list[PeerVerificationError]) -> Callable[[HboneSession], bool]:
        """The `on_made` check of a client HBONE session: verify the peer (trust-domain-bound, against
        the expected identities) once TLS is up; a refusal is kept in `failure` for the caller."""
        def made(session: HboneSession) -> bool:
            assert session.transport is not None
            try:
                sid = self.verify_peer(session.transport.get_extra_info("ssl_object"), expected)
            except PeerVerificationError as e:
                failure.append(e)
                return False
            session.peer_identity = str(sid)
            return True
        return made

    async def dial_hbone(self, address: str, src_identity: str, sni: str, expected: tuple[str, ...],
                         timeout_s: float) -> HboneSession:
        """An HBONE session to `address` as `src_identity`, verified against `expected`: an outbound
        dial always knows whom it wants (no expected identity would accept any federated peer)."""
        if not expected:
            raise PeerVerificationError(f"refusing to dial {address} without an expected peer identity",
                                        "no_expected_identity")
        loop = asyncio.get_running_loop()
        host, port = parse_host_port(address)
        ctx = self.creds.client_ctx(src_identity)
        failure: list[PeerVerificationError] = []
        made = self._verifying(expected, failure)

        session = HboneSession(Role.CLIENT, loop, self.opts.hbone, on_made=made)
        session.local_identity = src_identity
        adapter = TlsAdapter(loop, ctx, session, server_side=False, server_hostname=sni, handshake_timeout_s=timeout_s,
                             max_unsent_bytes=self.opts.max_unsent_bytes)
        started = mono_s()
        await asyncio.wait_for(loop.create_connection(lambda: adapter, host, port), timeout_s)
        try:
            await asyncio.wait_for(asyncio.shield(adapter.handshake), max(0.001, timeout_s - (mono_s() - started)))
        except BaseException:
            adapter.abort()
            raise
        if failure:
            raise failure[0]
        return session

    @staticmethod
    def _gateway_expected(ep: Endpoint) -> tuple[str, ...]:
        if not ep.gateway_identity:
            raise PeerVerificationError(
                f"endpoint {ep.workload_uid} is reached through gateway {ep.gateway}, but the config names no "
                "gateway identity to verify the outer tunnel against; refusing to dial it (a config from an "
                "older controller? it re-renders on its next push)", "no_expected_identity")
        return (ep.gateway_identity,)

    async def open_to_endpoint(self, src_identity: str, headers: tuple[tuple[str, str], ...], hostname: str,
                               port: int, ep: Endpoint, expected: tuple[str, ...] | None,
                               timeout_s: float) -> HboneStream:
        """A tunnel to `ep` as `src_identity`: direct HBONE to the destination node (sessions pooled
        per source identity, node and destination identity, as ztunnel pools them), or double HBONE
        through the destination network's east-west gateway (the outer tunnel's authority is
        `hostname:port`, the service the gateway routes; the inner mTLS is end to end). `headers`
        travel on the CONNECT (the source workload; at a waypoint, also the caller's identity).
        `expected`: whom the destination must prove to be; without it the endpoint is refused, not
        dialled (any federated peer would pass as it)."""
        if not expected:
            raise PeerVerificationError(f"endpoint {ep.workload_uid} has no identity to verify; refusing to connect "
                                        "rather than accept any peer", "no_expected_identity")
        if not ep.gateway:
            key = ("direct", ep.hbone_address, src_identity, ep.identity)
            sni = sni_for_identity(ep.identity) if ep.identity else ""
            session = await self.pool.get(key, lambda: self.dial_hbone(ep.hbone_address, src_identity, sni,
                                                                       expected, timeout_s))
            return await self.open_tunnel(session, f"{ep.address}:{ep.port}", headers, timeout_s)
        # double HBONE: outer pooled tunnel to the gateway, inner end-to-end mTLS + HBONE.
        # The inner ClientHello is sent right behind the outer CONNECT, without waiting for the
        # gateway's 200 (the gateway keeps early DATA in the stream until it has dialed the node):
        # one round trip through the gateway fewer per new connection. A refusal by the gateway
        # aborts the inner handshake and is raised as the refusal it is.
        authority = f"{hostname}:{port}"
        # the outer tunnel is verified against the gateway's own identity (rendered per endpoint):
        # dialled with nothing expected, anyone at the gateway's address would carry our traffic
        gw_expected = self._gateway_expected(ep)
        gw_key = ("gateway", ep.gateway, src_identity, gw_expected)
        outer = await self.pool.get(gw_key, lambda: self.dial_hbone(ep.gateway, src_identity, "", gw_expected,
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
        inner.local_identity = src_identity
        sni = sni_for_identity(ep.identity) if ep.identity else hostname
        ctx, store = self.creds.client_ctx(src_identity), self.creds.store
        # a ticket is offered only to the dial that earned it (`ztunnel.identity.resumption`)
        ticket_key = (src_identity, ep.hbone_address, ep.gateway, expected, sni)
        ticket = self.tickets.find(ticket_key, ctx, store, mono_s()) if self.opts.tls_resumption else None
        adapter = TlsAdapter(loop, ctx, inner, server_side=False, server_hostname=sni, handshake_timeout_s=timeout_s,
                             session=ticket)
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
            async with asyncio.timeout(max(0.001, timeout_s - (mono_s() - started))):
                await handshake()
        except BaseException as e:
            adapter.abort()
            resp = ostream.response
            if resp.done() and not resp.cancelled() and resp.exception() is not None and e is not resp.exception():
                raise resp.exception() from e  # type: ignore[misc]  # the gateway's refusal explains it
            if isinstance(e, TimeoutError):
                ostream.reset(ErrorCode.CANCEL)
            raise
        resumed = adapter.sslobj.session_reused
        if failure or not opened:
            adapter.abort()
            if failure and ticket is not None:
                self.tickets.forget(ticket_key, refused_after_resume=resumed)
            raise failure[0] if failure else ConnectionResetError("inner HBONE session closed before its tunnel opened")
        stream = opened[0]
        try:
            await asyncio.wait_for(asyncio.shield(stream.response), max(0.001, timeout_s - (mono_s() - started)))
        except BaseException:
            adapter.abort()
            raise
        if resumed:
            self.tickets.note_resumed()
        elif self.opts.tls_resumption:
            # the destination's ticket came with its first flight after the handshake, before this
            # answer; the peer passed the identity check above
            self.tickets.remember(ticket_key, adapter.sslobj.session, ctx, store, mono_s())
        stream.inner_session = inner  # type: ignore[attr-defined]
        return stream


    async def open_tunnel(self, session: HboneSession, authority: str, headers: tuple[tuple[str, str], ...],
                          timeout_s: float) -> HboneStream:
        stream = session.open_stream(authority, headers)
        try:
            await asyncio.wait_for(asyncio.shield(stream.response), timeout_s)
        except TimeoutError:
            stream.reset(ErrorCode.CANCEL)
            raise
        return stream

    # --- drain -----------------------------------------------------------------------------------

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop accepting, GOAWAY every session, let connections finish until the deadline, then close."""
        self.draining = True
        self.ready.clear()
        for srv in self.servers:
            srv.close()
        for s in list(self.inbound_sessions) + self.pool.all():
            s.drain("proxy is draining")
        deadline = mono_s() + (self.opts.drain_timeout_s if timeout_s is None else timeout_s)
        while (self.relays or self.inbound_sessions) and mono_s() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # polling a few sets at 50 Hz during drain only
        for r in list(self.relays):
            if r.transport is not None:
                abort_with_reset(r.transport)
        for s in list(self.inbound_sessions) + self.pool.all():
            s.abort()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._lag_probe is not None:   # kept until now: a setup that times out while draining
            self._lag_probe.cancel()      # is judged on the lag too
            self._lag_probe = None

    # --- outlier reporting -----------------------------------------------------------------------

    def record_outcome(self, service: str, endpoint: str, outcome: Outcome) -> None:
        self.telemetry.endpoint_outcome(service, endpoint, outcome.value)
        det = self.detectors.get(service)
        if det is None:
            return
        for ev in det.record(endpoint, outcome, mono_s()):
            self._outlier_event(service, ev)

    def _outlier_event(self, service: str, ev: EndpointEjected | EndpointUnejected) -> None:
        if isinstance(ev, EndpointEjected):
            if ev.enforced:
                self.telemetry.endpoint_ejected(service, ev.key, ev.reason.value)
            log.info("ejected %s from %s: %s after %d consecutive failures, for %.1f s (ejection #%d)%s", ev.key,
                     service, ev.reason.value, ev.consecutive, ev.until_s - ev.at_s, ev.ejection_count,
                     "" if ev.enforced else "; not enforced: maxEjectionPercent keeps it in rotation",
                     extra={"fields": {"event": "EndpointEjected", "service": service, "endpoint": ev.key,
                                       "reason": ev.reason.value, "enforced": ev.enforced,
                                       "ejection_count": ev.ejection_count}})
        else:
            self.telemetry.endpoint_unejected(service, ev.key)
        # in the access log whatever the health sink (the controller's reporter logs nothing)
        self.telemetry.log(kind=type(ev).__name__, service=service, **{k: getattr(ev, k) for k in ev.__slots__})
        self.health.report(self.cfg.proxy_id, ev)

    def ejected(self, service: str) -> frozenset[str]:
        det = self.detectors.get(service)
        if det is None:
            return frozenset()
        for ev in det.tick(mono_s()):
            self._outlier_event(service, ev)
        return det.ejected_keys(mono_s())


def stream_gone(stream: HboneStream) -> bool:
    """The peer reset the tunnel (or its connection ended) while we were deciding or dialing."""
    return stream.session.conn.stream_state(stream.stream_id) is StreamState.CLOSED


@functools.lru_cache(maxsize=8)
def _replace_hbone(s: HboneSettings) -> HboneSettings:
    """Inner tunnels carry one stream: no keep-alive pings (the outer session has them). Cached:
    `dataclasses.replace` was a visible per-connection cost on the double-HBONE path."""
    from dataclasses import replace
    return replace(s, ping_interval_s=None)


def with_options(opts: ProxyOptions, **kw: Any) -> ProxyOptions:
    from dataclasses import replace
    return replace(opts, **kw)
