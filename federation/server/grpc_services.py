"""The config server's gRPC adapter: versioned, acknowledged config for every ztunnel and gateway.

Policy and bookkeeping are plain classes in `federation.controller`; this module translates
between the wire and them:

- `federation.controller.distributor.ConfigDistributor` decides what each proxy gets (sessions,
  versions, ACK/NACK, sync state, shared encoding);
- `federation.controller.signing` decides who may act as which proxy (`ProxyAuthorizer`), which
  identities a CSR may name, and verifies client certificates trust-domain-bound;
- `federation.controller.config_service.ConfigService` owns both, and the store and CAs behind
  them; `config_server_for` binds a `ConfigServer` to one and `serve` starts it.

`ConfigServer` (grpc.aio, generic handlers, no generated stubs): one task pair per stream (reader:
ACK/NACK; writer: pushes with a write deadline), so a slow or stuck proxy only ever delays itself;
a proxy that does not drain its stream within `write_timeout_s` is disconnected and resyncs when
it returns.

Identity: with TLS, a proxy's SPIFFE ID comes from its client certificate and `authorize` decides
whether that identity may act as the proxy id it names (only the proxy's own identity,
`ztunnel.api.identity.proxy_spiffe_id`, in its cluster's trust domain). The main port requires a
client certificate (grpcio can only require one or not ask at all); the first certificate is
requested with a bootstrap credential (the proxy pod's ServiceAccount token, reviewed by its own
cluster, or a single-use bootstrap token; see `ConfigService.authenticate_bootstrap`) on a second,
server-authenticated port that serves the same services, where the config and health services
refuse every peer for want of a certificate.

One config stream per proxy: a proxy that reconnects with the certificate of its open stream
replaces it (the old connection is dead, or about to be); a subscriber presenting another
certificate, even one for the same identity, is refused with ALREADY_EXISTS while the stream is
open, so a second holder of that identity cannot displace the connected proxy's config stream.
The serving certificates (one per trust domain, picked by the SNI `controller_tls_name(td)`; see
`federation.controller.signing.ServingCertificates`) come from a `TlsSource` asked on every new
handshake (grpc's dynamic certificate configuration): a renewed or re-issued set is swapped in
for new connections while open streams keep the handshake they made, so a renewal drops nothing.
`insecure=True` (loopback tests and benchmarks only) trusts the proxy id in the request.

Split brain: a proxy that already follows a newer epoch than ours is refused with
FAILED_PRECONDITION (`StaleEpochError` from the distributor).

Liveness and limits (`server_options`): HTTP/2 keepalive pings every `KEEPALIVE_TIME_MS` with
`KEEPALIVE_TIMEOUT_MS` to answer, so a proxy whose link went silently dead (a middlebox that
black-holes, a frozen VM) is detached within ~20 s and shows as not connected — the proxies ping
the same way (`ztunnel.xds.client.channel_options`), and the server accepts their pings down to
every `MIN_CLIENT_PING_INTERVAL_MS`. In-flight RPCs are capped server-wide
(`max_concurrent_rpcs`: the excess gets RESOURCE_EXHAUSTED) and per connection
(`MAX_STREAMS_PER_CONNECTION`; a proxy needs three); a TLS handshake must finish within
`HANDSHAKE_TIMEOUT_MS`; a connection without any RPC for `MAX_CONNECTION_IDLE_MS` is closed
(these three per-connection limits: `ConnectionLimits`).
A health stream authenticates when it opens (the bootstrap port has no client certificate, so
its health streams are refused at once), reports for one proxy only, and at most
`MAX_HEALTH_REPORTS_PER_S` reports a second are taken (the excess is dropped and counted).

Streams live no longer than the certificate that opened them
(`federation.controller.stream_authorization`): TLS checks a client certificate only in the
handshake, so a config or health stream is bound to the not-after of the certificate that
authenticated it and ended, judged on the calendar (`clock`), when that passes; a certificate
already past its not-after cannot open one. The status of the cut is UNAVAILABLE ("reconnect"),
not UNAUTHENTICATED: the proxy's link (`ztunnel.xds.controlplane.ControllerLink`) takes
UNAUTHENTICATED to mean "your certificate is refused" and falls back to its bootstrap credential,
while a proxy cut here normally holds a certificate renewed at half-life, which its reconnect (a
new channel, a new handshake) presents. Should that one have expired too, the reconnect is refused
with UNAUTHENTICATED, and the bootstrap path follows. The reconnect costs no resync: the hello says
what the proxy runs (`have`), and a session whose ACKed stamp matches sends nothing until the next
change (`federation.controller.distributor.ProxySession.attach`). Unary certificate requests need
no binding: each call is verified on its own (`verify_peer`, on the calendar).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from federation.controller.bootstrap_gate import BootstrapAdmission
from federation.controller.distributor import ConfigDistributor, ProxyRemovedError, StaleEpochError
from federation.controller.signing import BootstrapVerdict, Requester, Signer, cluster_named_by
from federation.controller.stream_authorization import StreamExpiries, stream_expired
from ztunnel.api.clock import calendar_now
from ztunnel.api.codec import (
    PROXY_ID_METADATA,
    STREAM_END_CERTIFICATE_EXPIRED,
    STREAM_END_METADATA,
    stamp_from_pb,
)
from ztunnel.api.identity import IdentityError, ProxyId
from ztunnel.api.logsetup import printable
from ztunnel.api.proto import meshfed_pb2 as pb

if TYPE_CHECKING:
    from federation.controller.config_service import ConfigService

log = logging.getLogger(__name__)


REFUSAL_LOG_PER_S = 5.0     # refused certificate requests logged at WARNING at most this often ...
REFUSAL_LOG_BURST = 20.0    # ... after a burst of this many; the rest are counted into the next line


class _RefusalLog:
    """Refusals come from unauthenticated peers on the bootstrap port: log them, but at a bounded
    rate (a token bucket), saying how many were not logged since the last line."""

    def __init__(self, rate_per_s: float = REFUSAL_LOG_PER_S, burst: float = REFUSAL_LOG_BURST) -> None:
        self.rate_per_s, self.burst = rate_per_s, burst
        self._tokens, self._at_s = burst, time.monotonic()
        self.suppressed = 0

    def allow(self, now_s: float) -> int:
        """-1 when this refusal is not to be logged; else how many were suppressed before it."""
        self._tokens = min(self.burst, self._tokens + (now_s - self._at_s) * self.rate_per_s)
        self._at_s = now_s
        if self._tokens < 1.0:
            self.suppressed += 1
            return -1
        self._tokens -= 1.0
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


_refusals = _RefusalLog()


def _denied(proxy_id: str, why: str) -> str:
    """Log a refused certificate request (the requester learns why from the gRPC status). Both the
    proxy id and the reason (which may quote it, or an API server's error) are the peer's words:
    escaped (`printable`), so a proxy id with a newline cannot forge a log record."""
    suppressed = _refusals.allow(time.monotonic())
    if suppressed >= 0:
        more = f" ({suppressed} more refusals not logged)" if suppressed else ""
        log.warning("certificate request for proxy %s refused: %s%s", printable(proxy_id), printable(why), more,
                    extra={"fields": {"event": "CertificateRefused", "proxy": printable(proxy_id),
                                      "reason": printable(why), "suppressed": suppressed}})
    return why


def peer_address(peer: str) -> str:
    """The address of a gRPC peer string (`ipv4:10.0.0.1:5000`, `ipv6:[::1]:5000`, `unix:...`): the
    source a bootstrap rate limit is kept for (the port changes with every connection)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].partition("]")[0]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


def spiffe_id_from_pem(cert_pem: bytes) -> str:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    return uris[0] if uris else ""


def not_after_from_pem(cert_pem: bytes) -> float:
    """A certificate's not-after, in seconds since the epoch."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def no_bootstrap(_proxy_id: str, _sa_token: str, _token: str) -> BootstrapVerdict:
    return BootstrapVerdict("unauthenticated", "this controller accepts no bootstrap credentials")


BootstrapCheck = Callable[[str, str, str], BootstrapVerdict]   # (proxy id, SA token, bootstrap token); may block


KEEPALIVE_TIME_MS = 10_000             # ping a connection this often ...
KEEPALIVE_TIMEOUT_MS = 10_000          # ... and drop it when the ping is not answered in time
MIN_CLIENT_PING_INTERVAL_MS = 5_000    # proxies ping every 10 s; faster than this is abuse (GOAWAY)
HANDSHAKE_TIMEOUT_MS = 10_000
MAX_CONNECTION_IDLE_MS = 5 * 60_000    # no RPC on a connection for this long: close it
MAX_STREAMS_PER_CONNECTION = 16        # a proxy uses three (config, health, certificates)
MAX_CONCURRENT_RPCS = 10_000           # server-wide; the excess is refused with RESOURCE_EXHAUSTED
MAX_HEALTH_REPORTS_PER_S = 10.0        # a proxy reports every second (tests: every 0.2 s)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one connection may hold of the server: how long it may take to finish its TLS handshake
    (and send the HTTP/2 preface), how long it may stay open without an RPC, how many RPCs it may
    have open at once (advertised as SETTINGS_MAX_CONCURRENT_STREAMS; a client queues the excess).
    The defaults are the module's constants; tests shorten them."""

    handshake_timeout_ms: int = HANDSHAKE_TIMEOUT_MS
    max_connection_idle_ms: int = MAX_CONNECTION_IDLE_MS
    max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION


def server_options(max_message_bytes: int, limits: ConnectionLimits = ConnectionLimits()) -> list[tuple[str, Any]]:
    """grpc.aio server options: message sizes, keepalive, handshake and idle limits (module doc).
    A keepalive ping's ack deadline is `grpc.http2.ping_timeout_ms` in grpcio 1.85 (with
    `keepalive_timeout_ms` alone a frozen link was not noticed within a minute)."""
    return [("grpc.max_send_message_length", max_message_bytes + 65536),
            ("grpc.max_receive_message_length", max_message_bytes + 65536),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.server_handshake_timeout_ms", limits.handshake_timeout_ms),
            ("grpc.max_connection_idle_ms", limits.max_connection_idle_ms),
            # No `grpc.max_connection_age_ms`: a fixed age is not the credential's life. Short enough
            # to matter (below the workload TTL) it would recycle every proxy's connection on a timer
            # whether or not its certificate changed, and still leave a stream authorised up to an
            # age (plus `max_connection_age_grace_ms`) past its certificate's expiry; it also runs on
            # the real clock, not the calendar. Each stream is instead ended exactly when its own
            # certificate expires (`StreamLease`), about once per half-TTL per proxy, and that
            # reconnect resumes from the proxy's ACKed version: no full-state resync (README's
            # figures: a full resync of 100k endpoints costs one proxy 2.4 s, 0.72 s of it encoding
            # on the controller; per proxy per hour, for a fleet, it would be a standing load).
            ("grpc.max_concurrent_streams", limits.max_streams_per_connection)]


HealthCallback = Callable[[str, Any], None]  # (authenticated proxy id, pb.HealthReport)


class ServingTls(Protocol):
    """What the server presents (`federation.controller.signing.ServingCertificates`)."""

    @property
    def generation(self) -> int: ...

    @property
    def pairs(self) -> tuple[tuple[bytes, bytes], ...]: ...    # (key PEM, chain PEM); first = default

    @property
    def client_roots_pem(self) -> bytes: ...


TlsSource = Callable[[], ServingTls]


def _dynamic_credentials(source: TlsSource, require_client_auth: bool) -> Any:
    """Server credentials that ask `source` on every new connection and swap the certificate set
    when its generation moved (grpc keeps the old one when the fetcher returns None). The fetcher
    runs on a grpc thread: it only reads an immutable object and never raises."""
    import grpc

    def config(tls: ServingTls) -> Any:
        return grpc.ssl_server_certificate_configuration(
            list(tls.pairs), root_certificates=tls.client_roots_pem if require_client_auth else None)

    first = source()
    seen = [first.generation]

    def fetch() -> Any:
        try:
            tls = source()
            if tls.generation == seen[0]:
                return None
            seen[0] = tls.generation
            return config(tls)
        except Exception:  # keep serving the certificates we have; status shows the renewal error
            return None

    return grpc.dynamic_ssl_server_credentials(config(first), fetch, require_client_authentication=require_client_auth)


@dataclass(eq=False)   # a key by identity: one per open stream
class StreamLease:
    """An authenticated stream's authorisation: until `not_after_s`, the not-after of the client
    certificate that opened it; `ended` is set when the calendar passes it."""

    not_after_s: float
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class ConfigServer:
    """gRPC adapter around a ConfigDistributor, a Signer and a health callback."""

    def __init__(self, distributor: ConfigDistributor, *, signer: Signer | None = None,
                 on_health: HealthCallback | None = None,
                 authorize: Callable[[str, str], str] | None = None,
                 authenticate_bootstrap: BootstrapCheck = no_bootstrap,
                 consume_bootstrap: Callable[[str, str], bool] = lambda _p, _t: True,
                 verify_peer: Callable[[bytes], str] | None = None,
                 insecure: bool = False, write_timeout_s: float = 5.0,
                 limits: ConnectionLimits = ConnectionLimits(),
                 max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
                 max_health_reports_per_s: float = MAX_HEALTH_REPORTS_PER_S,
                 bootstrap_admission: BootstrapAdmission | None = None,
                 clock: Callable[[], float] = calendar_now) -> None:
        # `verify_peer(client leaf PEM) -> SPIFFE ID` must bind the leaf's issuer to the trust
        # domain its SAN names (ztunnel.api.verify.TrustStore): gRPC only checks the chain against the
        # pooled roots of every CA, and with a pool trust domain A's CA could mint B's identities.
        self.verify_peer = verify_peer
        self.dist = distributor
        self.signer = signer
        self.on_health = on_health
        self.authorize = authorize or (lambda _p, _i: "")
        self.authenticate_bootstrap = authenticate_bootstrap  # blocks (a TokenReview is a request): on _bootstrap_pool
        # who may have a bootstrap credential checked now (per source, and in flight: the pool's size)
        self.bootstrap_admission = bootstrap_admission or BootstrapAdmission()
        self._bootstrap_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.consume_bootstrap = consume_bootstrap
        self.insecure = insecure
        self.write_timeout_s = write_timeout_s
        self.limits = limits
        self._server: Any = None
        self.port = 0
        self.bootstrap_port = 0
        self.health_reports = 0
        self.health_reports_dropped = 0   # over the per-stream rate
        self.slow_disconnects = 0
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.max_health_reports_per_s = max_health_reports_per_s
        self._streams: dict[str, asyncio.Task[Any]] = {}
        self._stream_certs: dict[str, str] = {}   # proxy -> SHA-256 of the client certificate of its stream
        self.displacements_refused = 0
        self.clock = clock   # the calendar: when a stream's certificate expires
        # open authenticated streams -> the not-after of their certificate; the Event ends the stream
        self._expiries: StreamExpiries[StreamLease] = StreamExpiries()
        self.streams_expired = 0
        self._writes: dict[asyncio.Future[Any], tuple[float, str]] = {}  # writer -> (write started, proxy)
        self._watchdog: asyncio.Task[None] | None = None
        self.starting = asyncio.Lock()   # `serve` is idempotent under concurrent calls

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, listen: str = "127.0.0.1:0", tls: TlsSource | None = None,
                    bootstrap_listen: str | None = None) -> int:
        """Listen on `listen` ("host:port"); `tls` gives the current serving certificates (asked on
        every handshake, see `_dynamic_credentials`). With TLS, `bootstrap_listen` adds the port
        without client authentication where proxies get their first certificate with a bootstrap
        credential (`bootstrap_port`)."""
        import grpc

        if tls is None and not self.insecure:
            raise ValueError("a config server without TLS must be started with insecure=True (loopback tests only)")
        if tls is not None and self.verify_peer is None:
            raise ValueError("a TLS config server needs verify_peer: a trust-domain-bound check of client "
                             "certificates (pooled roots alone let one trust domain's CA mint another's identities)")
        self._server = grpc.aio.server(options=server_options(self.dist.max_message_bytes, self.limits),
                                       maximum_concurrent_rpcs=self.max_concurrent_rpcs)
        handlers = {
            "StreamConfig": grpc.stream_stream_rpc_method_handler(
                self._stream_config, request_deserializer=pb.ConfigRequest.FromString,
                response_serializer=None),  # `ConfigDistributor.build` serializes (and shares bytes)
        }
        self._server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("meshfed.v1alpha1.ConfigDiscovery", handlers),
            grpc.method_handlers_generic_handler("meshfed.v1alpha1.CertificateAuthority", {
                "SignCertificate": grpc.unary_unary_rpc_method_handler(
                    self._sign, request_deserializer=pb.CertificateRequest.FromString,
                    response_serializer=pb.CertificateResponse.SerializeToString)}),
            grpc.method_handlers_generic_handler("meshfed.v1alpha1.HealthReporting", {
                "ReportHealth": grpc.stream_unary_rpc_method_handler(
                    self._health, request_deserializer=pb.HealthReport.FromString,
                    response_serializer=pb.HealthSummary.SerializeToString)}),
        ))
        # `port` and `bootstrap_port` are published (they are what status, the driver and `serve`'s
        # idempotence read as "listening") only once every listener bound and the server started:
        # a failed bootstrap bind must not leave a port that looks served
        bootstrap_port = 0
        if tls is None:
            port = self._server.add_insecure_port(listen)
        else:
            port = self._server.add_secure_port(listen, _dynamic_credentials(tls, require_client_auth=True))
            if bootstrap_listen is not None:
                bootstrap_port = self._server.add_secure_port(
                    bootstrap_listen, _dynamic_credentials(tls, require_client_auth=False))
                if bootstrap_port == 0:
                    await self._abandon()
                    raise OSError(f"cannot listen on {bootstrap_listen} (bootstrap): address in use or not local")
        if port == 0:
            await self._abandon()
            raise OSError(f"cannot listen on {listen}: address in use or not local")
        await self._server.start()
        self.port, self.bootstrap_port = int(port), int(bootstrap_port)
        self._watchdog = asyncio.ensure_future(self._write_watchdog())
        return self.port

    async def _abandon(self) -> None:
        """A start that failed: let go of the listeners already bound."""
        server, self._server = self._server, None
        await server.stop(0)

    def counters(self) -> dict[str, int]:
        """What the transport knows, for the config service's status."""
        return {"port": self.port, "bootstrap_port": self.bootstrap_port, "health_reports": self.health_reports,
                "health_reports_dropped": self.health_reports_dropped, "slow_disconnects": self.slow_disconnects,
                "displacements_refused": self.displacements_refused, "streams_expired": self.streams_expired}

    async def _write_watchdog(self) -> None:
        """Disconnect proxies that do not drain their stream: a write pending for longer than
        `write_timeout_s` cancels that stream's writer, which ends the stream (the proxy resyncs
        when it returns). One periodic sweep instead of a timer per write (measured: the per-write
        `asyncio.timeout` was the largest Python cost of a push after encoding was shared). The
        same sweep ticks the distributor: pushes unanswered too long fail, and the streams of
        failed pushes whose backoff is over are woken to retry; and it ends the streams whose
        certificate expired (within a sweep, at most a second, of the calendar passing it)."""
        while True:
            await asyncio.sleep(min(self.write_timeout_s / 4, 1.0))
            now = time.monotonic()
            for task, (started_s, _proxy_id) in list(self._writes.items()):
                if now - started_s > self.write_timeout_s:
                    del self._writes[task]
                    self.slow_disconnects += 1
                    task.cancel()
            for session in self.dist.tick():
                if session.wake is not None:
                    session.wake.set()
            for lease in self._expiries.due(self.clock()):
                lease.ended.set()

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._bootstrap_pool is not None:
            self._bootstrap_pool.shutdown(wait=False, cancel_futures=True)
            self._bootstrap_pool = None

    # --- identity ----------------------------------------------------------------------------

    def _peer_identity(self, context: Any) -> str:
        """The client's verified SPIFFE ID, "" without a certificate; PermissionError if it fails
        the trust-domain-bound check."""
        auth = context.auth_context() or {}
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            return ""
        if self.verify_peer is None:  # only reachable in insecure (loopback test) mode
            return spiffe_id_from_pem(pems[0])
        return self.verify_peer(pems[0])

    async def _verified_peer_or_abort(self, context: Any) -> str:
        import grpc

        try:
            return self._peer_identity(context)
        except PermissionError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"client certificate rejected: {e}")
            raise

    @staticmethod
    def _peer_certificate_digest(context: Any) -> str:
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        return hashlib.sha256(pems[0]).hexdigest() if pems else ""

    def _claimed_id(self, context: Any) -> str:
        for k, v in context.invocation_metadata() or ():
            if k == PROXY_ID_METADATA:
                return str(v)
        return ""

    async def _authenticate(self, context: Any, proxy_id: str) -> str:
        import grpc

        if self.insecure:
            return ""
        identity = await self._verified_peer_or_abort(context)
        if not identity:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "no client certificate: request one from the certificate service with a "
                                "bootstrap credential first")
        reason = self.authorize(proxy_id, identity)
        if reason:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        return identity

    async def _bind_to_certificate(self, context: Any, what: str) -> StreamLease | None:
        """Bind an authenticated stream to its client certificate's not-after: the lease's `ended`
        is set (by `_write_watchdog`) when the calendar passes it, and the stream must then end
        with `_end_expired`. A certificate already past it is refused (UNAUTHENTICATED: the proxy
        renews). None without TLS (insecure mode: nothing to expire). The caller releases the
        lease (`_expiries.release`) when the stream ends."""
        import grpc

        pems = [] if self.insecure else (context.auth_context() or {}).get("x509_pem_cert") or []
        if not pems:
            return None
        not_after_s = not_after_from_pem(pems[0])
        if stream_expired(not_after_s, self.clock()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"client certificate expired at {_utc(not_after_s)} (controller calendar): "
                                f"a {what} stream needs a valid one; renew it with the bootstrap credential")
        lease = StreamLease(not_after_s)
        self._expiries.bind(lease, not_after_s)
        return lease

    async def _end_expired(self, context: Any, who: str, what: str, lease: StreamLease) -> None:
        """End the `what` stream of `who` (proxy id or identity) whose certificate expired, with the
        status the proxy retries at once."""
        import grpc

        self.streams_expired += 1
        log.info("%s stream of %s ended: the client certificate that opened it expired", what, who,
                 extra={"fields": {"event": "StreamCertificateExpired", "peer": who, "stream": what}})
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"the client certificate that authenticated this {what} stream expired at {_utc(lease.not_after_s)} "
                            "(controller calendar): reconnect with your current (renewed) certificate",
                            trailing_metadata=((STREAM_END_METADATA, STREAM_END_CERTIFICATE_EXPIRED),))

    # --- config stream -----------------------------------------------------------------------

    async def _stream_config(self, request_iterator: Any, context: Any) -> None:
        import grpc

        it = request_iterator.__aiter__()
        try:
            hello = await asyncio.wait_for(it.__anext__(), self.write_timeout_s)
        except (TimeoutError, StopAsyncIteration):
            return
        proxy_id = hello.proxy.proxy_id
        if not proxy_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must name the proxy (proxy.proxy_id)")
        identity = await self._authenticate(context, proxy_id)
        lease = await self._bind_to_certificate(context, "config")
        try:
            await self._follow(it, hello, context, identity, lease)
        finally:
            if lease is not None:
                self._expiries.release(lease)

    async def _follow(self, it: Any, hello: Any, context: Any, identity: str, lease: StreamLease | None) -> None:
        """One authenticated config stream until it ends: pushes out, ACK/NACK in; cut when the
        certificate that authenticated it expires (`lease.ended`)."""
        import grpc

        proxy_id = hello.proxy.proxy_id
        me = asyncio.current_task()
        assert me is not None
        cert = "" if self.insecure else self._peer_certificate_digest(context)
        old = self._streams.get(proxy_id)
        # decided before the session is touched: a refused subscriber must change nothing of it
        if old is not None and old is not me and not old.done() and cert != self._stream_certs.get(proxy_id, cert):
            self.displacements_refused += 1
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"proxy {proxy_id} already has a config stream from another certificate; a second "
                                "subscriber cannot take it over. If that proxy restarted with a new key, its old "
                                "stream ends when its connection is found dead: retry")
        try:
            session = self.dist.attach(proxy_id, stamp_from_pb(hello.have) if hello.HasField("have") else None,
                                       hello.features)
        except StaleEpochError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            raise  # unreachable: abort raises
        except ProxyRemovedError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise
        if old is not None and old is not me:
            old.cancel()  # the same certificate reconnecting: its previous connection is dead
        self._streams[proxy_id] = me
        self._stream_certs[proxy_id] = cert
        session.peer_identity = identity
        session.wake = asyncio.Event()
        session.wake.set()

        async def reader() -> None:
            async for req in it:
                if self.dist.on_reply(session, req):
                    assert session.wake is not None
                    session.wake.set()

        async def writer() -> None:
            assert session.wake is not None
            while True:
                await session.wake.wait()
                session.wake.clear()
                if session.removed:
                    return  # forgotten (no longer rendered): end the stream
                for msg in self.dist.build(session):
                    # the write deadline is enforced by `_write_watchdog` (one timer for all streams)
                    self._writes[me_w] = (time.monotonic(), proxy_id)
                    await context.write(msg)
                    del self._writes[me_w]

        expiry = asyncio.ensure_future(lease.ended.wait()) if lease is not None else None
        rd = asyncio.ensure_future(reader())
        wr = me_w = asyncio.ensure_future(writer())
        try:
            done, pending = await asyncio.wait({rd, wr} | ({expiry} if expiry is not None else set()),
                                               return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            if lease is not None and expiry in done:
                await self._end_expired(context, proxy_id, "config", lease)
        finally:
            # this stream cancelled (the same proxy reconnected, the server stops): its reader and
            # writer go with it, else the writer would wait for ever on a wake-up no one sets, or
            # take the new stream's push and write it to this dead one
            for t in (rd, wr, *((expiry,) if expiry is not None else ())):
                if not t.done():
                    t.cancel()
            self._writes.pop(wr, None)
            if self._streams.get(proxy_id) is me:
                del self._streams[proxy_id]
                self._stream_certs.pop(proxy_id, None)
                self.dist.detach(session)

    # --- certificates --------------------------------------------------------------------------

    async def _sign(self, req: Any, context: Any) -> Any:
        import grpc

        signer = self.signer
        if signer is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this controller runs no CA")
            raise AssertionError("unreachable")
        try:   # before anything is logged or reviewed: a proxy id has a known shape
            ProxyId.parse(req.proxy_id)
        except IdentityError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _denied(
                req.proxy_id, "not a proxy id: use ztunnel/<cluster>/<node>, gateway/<cluster>, "
                "waypoint/<cluster>/<ns>/<name> or ingress/<cluster>/<ns>/<name>"))
        identity = "" if self.insecure else await self._verified_peer_or_abort(context)
        token = ""  # a single-use bootstrap token to use up once the certificate is issued
        if not identity:
            if not self.insecure:
                verdict = await self._check_bootstrap(req, context)
                if not verdict.ok:
                    code = {"unavailable": grpc.StatusCode.UNAVAILABLE,
                            "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
                            "permission_denied": grpc.StatusCode.PERMISSION_DENIED}.get(
                                verdict.code, grpc.StatusCode.UNAUTHENTICATED)
                    await context.abort(code, _denied(req.proxy_id, f"{verdict.credential or 'bootstrap'}: {verdict.reason}"))
                token = "" if req.service_account_token else req.bootstrap_token
        else:
            reason = self.authorize(req.proxy_id, identity)
            if reason:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, _denied(req.proxy_id, reason))
        who = Requester(req.proxy_id, identity, not identity, cluster_named_by(req.proxy_id))
        try:
            chain, roots, expires = signer.sign(who, bytes(req.csr_pem), float(req.ttl_s or 0))
        except PermissionError as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, _denied(req.proxy_id, str(e)))
            raise
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _denied(req.proxy_id, str(e)))
            raise
        # the tokens file is locked and rewritten: off the event loop, like the state owner's other disk work
        if token and not await asyncio.to_thread(self.consume_bootstrap, req.proxy_id, token):
            # another request used the token between our check and now: it buys one certificate
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"the bootstrap token of {req.proxy_id} was used already (tokens are single-use)")
        resp = pb.CertificateResponse(expires_at_s=expires)
        resp.cert_chain_pem.extend(chain)
        resp.roots_pem.extend(roots)
        return resp

    async def _check_bootstrap(self, req: Any, context: Any) -> BootstrapVerdict:
        """The bootstrap credential's verdict, if this source may have one checked now
        (`bootstrap_gate.BootstrapAdmission`); the check runs on a pool of `max_in_flight` threads of
        its own, so slow TokenReviews never hold the event loop's default executor (the state
        owner's disk work, `consume_bootstrap`) and never queue up behind each other."""
        gate = self.bootstrap_admission
        why = gate.admit(peer_address(str(context.peer() or "")), time.monotonic())
        if why:
            return BootstrapVerdict("resource_exhausted", why)
        if self._bootstrap_pool is None:
            self._bootstrap_pool = concurrent.futures.ThreadPoolExecutor(gate.max_in_flight,
                                                                         thread_name_prefix="bootstrap-check")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._bootstrap_pool, self.authenticate_bootstrap, req.proxy_id, req.service_account_token,
                req.bootstrap_token)
        finally:
            gate.release()

    # --- health ----------------------------------------------------------------------------

    async def _health(self, request_iterator: Any, context: Any) -> Any:
        """One proxy's health reports. The peer is authenticated before anything is read (no client
        certificate: refused at once, as on the bootstrap port), every report must name the same
        proxy, which the certificate may act as; reports beyond `max_health_reports_per_s` are
        dropped (a token bucket per stream), so a flood costs the reconciler nothing. The stream
        ends when the certificate that opened it expires (module docstring)."""
        import grpc

        identity = ""
        if not self.insecure:
            identity = await self._verified_peer_or_abort(context)
            if not identity:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "health reports need the proxy's client certificate: report on the config "
                                    "port (the bootstrap port serves first certificates only)")
        lease = await self._bind_to_certificate(context, "health")
        consume = asyncio.ensure_future(self._take_reports(request_iterator, context))
        if lease is None:
            return await consume
        expiry = asyncio.ensure_future(lease.ended.wait())
        try:
            await asyncio.wait({consume, expiry}, return_when=asyncio.FIRST_COMPLETED)
            if consume.done():
                return consume.result()
            consume.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await consume
            await self._end_expired(context, identity, "health", lease)
            raise AssertionError("unreachable: abort raises")
        finally:
            expiry.cancel()
            consume.cancel()
            self._expiries.release(lease)

    async def _take_reports(self, request_iterator: Any, context: Any) -> Any:
        """The reports of one authenticated health stream (see `_health`)."""
        import grpc

        n = 0
        proxy_id = ""
        rate = self.max_health_reports_per_s
        tokens, last_s = max(1.0, rate), time.monotonic()
        async for report in request_iterator:
            if not report.proxy_id:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a health report must name its proxy (proxy_id)")
            if report.proxy_id != proxy_id:
                if proxy_id:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"this health stream reports for {proxy_id}; open another for "
                                        f"{report.proxy_id}")
                await self._authenticate(context, report.proxy_id)
                proxy_id = report.proxy_id
            now = time.monotonic()
            tokens = min(max(1.0, rate), tokens + (now - last_s) * rate)
            last_s = now
            if tokens < 1.0:
                self.health_reports_dropped += 1
                continue
            tokens -= 1.0
            n += 1
            self.health_reports += 1
            if self.on_health is not None:
                self.on_health(report.proxy_id, report)
        return pb.HealthSummary(reports=n)


def config_server_for(service: ConfigService, on_health: HealthCallback | None = None,
                      write_timeout_s: float = 5.0, limits: ConnectionLimits = ConnectionLimits()) -> ConfigServer:
    """The gRPC adapter bound to a config service: its distributor, signing policy and bootstrap
    tokens (`on_health` receives the authenticated proxy id and the `pb.HealthReport`)."""
    policy = service.signing
    return ConfigServer(service.dist, signer=policy, on_health=on_health, insecure=service.insecure,
                        authenticate_bootstrap=service.authenticate_bootstrap,
                        consume_bootstrap=service.consume_bootstrap, authorize=policy.authorize,
                        verify_peer=policy.verify_client, write_timeout_s=write_timeout_s, limits=limits,
                        clock=service.clock)


async def serve(service: ConfigService, server: ConfigServer, listen: str,
                bootstrap_listen: str | None = None) -> tuple[int, int]:
    """Start `server` for `service`: TLS with the controller's certificates unless insecure (and
    their renewal), the bootstrap port on the listen host (any port) unless given, and the
    service's ACK flusher.
    (config port, bootstrap port); the bootstrap port is 0 without TLS. Idempotent: a second
    call (two supervisors racing after a restart) returns the ports of the running server."""
    async with server.starting:   # a racing second call waits for the first, then sees its ports
        if server.port:
            return server.port, server.bootstrap_port
        tls: TlsSource | None = None if service.insecure else service.signing.serving
        if tls is not None and bootstrap_listen is None:
            bootstrap_listen = listen.rsplit(":", 1)[0] + ":0"
        await server.start(listen, tls, bootstrap_listen if tls is not None else None)
        service.start_flushing()
        if tls is not None:
            service.start_renewing()
        return server.port, server.bootstrap_port


async def wait_until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.005) -> bool:
    """Poll `pred` on the event loop until true or `timeout_s` (tests and benchmarks)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(interval_s)
    return pred()


AsyncFn = Callable[[], Awaitable[None]]
