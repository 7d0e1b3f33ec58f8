"""The config server: versioned, acknowledged config for every ztunnel and gateway, over gRPC.

Split decide-then-act:

- `ProxySession` (sans-IO) is one proxy's bookkeeping: the desired config (from the reconciler),
  what the proxy runs as far as we know (`acked`), the one push in flight, NACKs, and the sync
  state SYNCED / STALE / NOT SENT. `next_push()` decides what to send: nothing while a push is in
  flight or when the proxy already runs the desired content; otherwise the delta from what the
  proxy has (a full state when we do not know), stamped `(epoch, revision, version + 1)`.
  At most one push is in flight per proxy, and a new desired config replaces an unsent one:
  the per-stream queue is bounded to one element by construction (latest wins, coalescing
  bursts), and a NACKed content is not re-sent until the desired content changes.
- `ConfigDistributor` holds the sessions, the controller `epoch`, and the counters the status
  API and metrics read. `set_desired()` is O(changed proxies) and never waits on a proxy.
  `build()` encodes a push straight to wire bytes, and shares the work between proxies (see
  "Fan-out" below).
- `ConfigServer` is the gRPC adapter (grpc.aio, generic handlers, no generated stubs): one
  task pair per stream (reader: ACK/NACK; writer: pushes with a write deadline), so a slow or
  stuck proxy only ever delays itself; a proxy that does not drain its stream within
  `write_timeout_s` is disconnected and resyncs when it returns.

Identity: with TLS, a proxy's SPIFFE ID comes from its client certificate and `authorize` decides
whether that identity may act as the proxy id it names (`ProxyAuthorizer`: only the proxy's own
identity, `ztunnel.api.identity.proxy_spiffe_id`, in its cluster's trust domain). The main port requires a
client certificate (grpcio can only require one or not ask at all); the first certificate is
requested with a bootstrap token on a second, server-authenticated port that serves the same
services, where the config and health services refuse every peer for want of a certificate.
The serving certificate carries the DNS name `ztunnel.api.identity.CONTROLLER_TLS_NAME` for clients to
verify (SVIDs have no host name; see `secure_channel`).
`insecure=True` (loopback tests and benchmarks only) trusts the proxy id in the request.

Split brain: a proxy that already follows a newer epoch than ours is refused with
FAILED_PRECONDITION and the refusal is counted (`stale_epoch_refusals`).

Fan-out (measured at 1,000 proxies: diffing, `dataclasses.replace` for content comparisons and
per-proxy encoding were most of the controller's Python time per push wave). The renderer shares
resource objects between proxies (one Service view per locality), so:

- "same content" is a comparison of the configs' resource tuples (`content_of`), element by
  element, which is a pointer comparison for shared objects: no copies;
- `build()` canonicalises each resource tuple by the identities of its elements (`_Canon`), diffs
  per kind between canonical tuples, and caches the encoded bytes of each (kind, old, new) change
  (`_SegmentCache`): N proxies with the same view transition cost one diff and one encode; each
  proxy then gets its own small head (stamp, version, nonce, header) concatenated with the shared
  segments. Protobuf repeated fields may be split over concatenated fragments, so the message a
  proxy decodes is exactly what `ztunnel.api.codec.encode_delta` would have produced (a unit test
  checks it). A delta over the message budget falls back to `encode_delta`, which splits it into
  chunks or refuses it (`OversizeError`).
The caches hold the objects whose ids key them, so an id is never reused while its entry lives;
they are bounded and simply cleared when full (a miss only costs a diff).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol

from ztunnel.api.codec import (
    CHUNK_OVERHEAD_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    PROXY_ID_METADATA,
    OversizeError,
    encode_delta,
    header_to_pb,
    resource_body,
    stamp_from_pb,
    stamp_to_pb,
)
from ztunnel.api.config import RESOURCE_TYPES, ProxyConfig, Stamp, diff_configs
from ztunnel.api.identity import proxy_spiffe_id
from ztunnel.api.proto import meshfed_pb2 as pb

_KINDS = tuple(RESOURCE_TYPES)
assert _KINDS == ("workloads", "services", "authorizations", "bundles"), "content_of follows this order"


class SyncState(str, Enum):
    SYNCED = "SYNCED"
    STALE = "STALE"
    NOT_SENT = "NOT SENT"


class _Canon:
    """One canonical tuple per distinct sequence of resource objects (by identity), so that the
    per-proxy copies of a shared view become one key. Entries hold their objects: ids stay theirs."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._d: dict[tuple[int, ...], tuple[Any, ...]] = {}

    def __call__(self, items: tuple[Any, ...]) -> tuple[Any, ...]:
        if not items:
            return ()
        key = tuple(map(id, items))
        hit = self._d.get(key)
        if hit is not None:
            return hit
        if len(self._d) >= self.max_entries:
            self._d.clear()
        self._d[key] = items
        return items


class _EqualMemo:
    """`x == y` for canonical tuples, remembered per (x, y) identity pair; entries hold both."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._d: dict[tuple[int, int], tuple[Any, Any, bool]] = {}

    def __call__(self, x: tuple[Any, ...], y: tuple[Any, ...]) -> bool:
        key = (id(x), id(y))
        hit = self._d.get(key)
        if hit is not None and hit[0] is x and hit[1] is y:
            return hit[2]
        eq = x == y
        if len(self._d) >= self.max_entries:
            self._d.clear()
        self._d[key] = (x, y, eq)
        return eq


# Pure caches shared by every session (like `ztunnel.xds.client`'s body cache): canonical resource tuples
# and the equality of pairs of them.
_CANON = _Canon()
_EQUAL = _EqualMemo()

Content = tuple[Any, ...]


def content_of(cfg: ProxyConfig) -> Content:
    """Everything of a config but its stamp, as a tuple that compares element by element, with
    each resource tuple canonicalised (`_CANON`): proxies that share a view share one tuple."""
    return (_CANON(cfg.workloads), _CANON(cfg.services), _CANON(cfg.authorizations), _CANON(cfg.bundles),
            cfg.local_identities, cfg.federated_trust_domains, cfg.proxy_id, cfg.mode, cfg.cluster, cfg.network,
            cfg.trust_domain)


_RESOURCE_SLOTS = 4  # the first elements of a Content are canonical resource tuples


def _same(a: Content | None, b: Content | None) -> bool:
    """Same content? Resource tuples compare by identity, else through `_EQUAL` (one deep
    comparison per distinct pair of canonical tuples, however many proxies share the pair)."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    for i in range(_RESOURCE_SLOTS):
        x, y = a[i], b[i]
        if x is not y and not _EQUAL(x, y):
            return False
    return a[_RESOURCE_SLOTS:] == b[_RESOURCE_SLOTS:]


@dataclass
class PushRecord:
    nonce: str
    config: ProxyConfig
    sent_at_s: float
    trigger_at_s: float  # when the desired config that this push carries arrived
    content: Content = ()


@dataclass
class ProxySession:
    """One proxy. Invariants: `version` only grows within an epoch; `in_flight` is at most one push;
    `acked` is what the proxy runs as far as this controller knows (None = unknown: send full state)."""

    proxy_id: str
    epoch: int
    desired: ProxyConfig | None = None
    desired_content: Content | None = None
    desired_at_s: float = 0.0
    acked: ProxyConfig | None = None
    acked_content: Content | None = None
    acked_stamp: Stamp | None = None        # may be from an earlier epoch (reported by the proxy)
    in_flight: PushRecord | None = None
    version: int = 0
    connected: bool = False
    ever_sent: bool = False
    nacked_content: Content | None = None
    last_nack: str = ""
    last_nack_stamp: Stamp | None = None
    oversize_error: str = ""
    pushes: int = 0
    acks: int = 0
    nacks: int = 0
    last_ack_latency_s: float = 0.0
    wake: asyncio.Event | None = None
    peer_identity: str = ""

    # --- decisions ---------------------------------------------------------------------------

    def set_desired(self, cfg: ProxyConfig, now_s: float) -> bool:
        """Record a new desired config; True when it differs from the previous desired content."""
        content = content_of(cfg)
        if self.desired is not None and _same(self.desired_content, content):
            if cfg.stamp.revision != self.desired.stamp.revision:
                self.desired = cfg  # same content, newer revision: nothing to push
            return False
        self.desired, self.desired_content, self.desired_at_s = cfg, content, now_s
        return True

    def attach(self, have: Stamp | None) -> None:
        """A stream (re)connected and says what it runs. Only a matching stamp lets us send deltas."""
        self.connected = True
        self.in_flight = None
        if have is not None and self.acked is not None and self.acked.stamp == have:
            return
        self.acked = self.acked_content = None  # unknown content: the next push is a full state
        self.acked_stamp = have
        if have is not None and have.epoch == self.epoch:
            self.version = max(self.version, have.version)

    def detach(self) -> None:
        self.connected = False
        self.in_flight = None

    def next_push(self, now_s: float, nonces: Iterable[int]) -> PushRecord | None:
        if not self.connected or self.in_flight is not None or self.desired is None:
            return None
        want = self.desired_content
        if self.acked is not None and _same(self.acked_content, want):
            return None
        if self.nacked_content is not None and _same(self.nacked_content, want):
            return None  # the proxy refused exactly this; wait for a change
        self.version += 1
        cfg = replace(self.desired, stamp=Stamp(self.epoch, self.desired.stamp.revision, self.version))
        self.in_flight = PushRecord(f"{self.epoch}-{next(iter(nonces))}", cfg, now_s, self.desired_at_s,
                                    want or content_of(cfg))
        self.pushes += 1
        self.ever_sent = True
        return self.in_flight

    def on_reply(self, nonce: str, nack: bool, error: str, now_s: float) -> PushRecord | None:
        """ACK/NACK of the push in flight. Returns the push it settles (None when it is not ours)."""
        push = self.in_flight
        if push is None or push.nonce != nonce:
            return None
        self.in_flight = None
        self.last_ack_latency_s = now_s - push.sent_at_s
        if nack:
            self.nacks += 1
            self.last_nack, self.last_nack_stamp = error, push.config.stamp
            if error.startswith("resync"):
                self.acked = self.acked_content = None  # our idea of its base was wrong: full state next
            else:
                self.nacked_content = push.content
        else:
            self.acks += 1
            self.acked, self.acked_content, self.acked_stamp = push.config, push.content, push.config.stamp
            self.nacked_content, self.last_nack = None, ""
        return push

    @property
    def sync(self) -> SyncState:
        if self.desired is None or (not self.ever_sent and self.acked is None):
            return SyncState.NOT_SENT
        if self.acked is not None and _same(self.acked_content, self.desired_content):
            return SyncState.SYNCED
        return SyncState.STALE

    def status(self) -> dict[str, Any]:
        st = self.acked_stamp
        return {
            "proxy": self.proxy_id,
            "sync": self.sync.value,
            "connected": self.connected,
            "desired_revision": self.desired.stamp.revision if self.desired else "",
            "acked_revision": st.revision if st else "",
            "acked_version": f"{st.epoch}.{st.version}" if st else "",
            "pushes": self.pushes, "acks": self.acks, "nacks": self.nacks,
            "last_nack": self.last_nack or self.oversize_error,
            "last_ack_latency_ms": round(self.last_ack_latency_s * 1000, 2),
            "identity": self.peer_identity,
        }


class StaleEpochError(RuntimeError):
    pass


@dataclass
class AckEvent:
    proxy_id: str
    stamp: Stamp
    nack: bool
    error: str
    latency_s: float
    trigger_to_ack_s: float


class _SegmentCache:
    """Encoded changes of one resource kind between two canonical tuples: the `upserts` and
    `removals` fields of a ConfigResponse, as bytes to concatenate. Bounded by entries and bytes."""

    def __init__(self, max_entries: int = 4096, max_bytes: int = 64 << 20) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._d: dict[tuple[str, int, int], tuple[tuple[Any, ...], tuple[Any, ...], bytes]] = {}
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, kind: str, old: tuple[Any, ...], new: tuple[Any, ...]) -> bytes:
        key = (kind, id(old), id(new))
        hit = self._d.get(key)
        if hit is not None and hit[0] is old and hit[1] is new:
            self.hits += 1
            return hit[2]
        self.misses += 1
        seg = _encode_kind_change(kind, old, new)
        if len(self._d) >= self.max_entries or self._bytes + len(seg) > self.max_bytes:
            self._d.clear()
            self._bytes = 0
        self._d[key] = (old, new, seg)
        self._bytes += len(seg)
        return seg


def _encode_kind_change(kind: str, old: tuple[Any, ...], new: tuple[Any, ...]) -> bytes:
    """`diff_configs` for one kind, encoded as `encode_delta` encodes it (upserts sorted by key)."""
    new_items = {r.key: r for r in new}
    old_items = {r.key: r for r in old}
    msg = pb.ConfigResponse()
    for k in sorted(new_items):
        r, o = new_items[k], old_items.get(k)
        if o is not r and o != r:
            msg.upserts.append(pb.Resource(type=kind, key=k, body=resource_body(r)))
    msg.removals.extend(pb.RemovedResource(type=kind, key=k) for k in sorted(old_items) if k not in new_items)
    return bytes(msg.SerializeToString())


class ConfigDistributor:
    """All proxies' sessions for one controller epoch; pure bookkeeping plus wake-ups."""

    def __init__(self, epoch: int, clock: Callable[[], float] = time.monotonic,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.epoch = epoch
        self.clock = clock
        self.max_message_bytes = max_message_bytes
        self.sessions: dict[str, ProxySession] = {}
        self._nonces = itertools.count(1)
        self.stale_epoch_refusals = 0
        self.listeners: list[Callable[[AckEvent], None]] = []
        self.segments = _SegmentCache()

    def session(self, proxy_id: str) -> ProxySession:
        s = self.sessions.get(proxy_id)
        if s is None:
            s = self.sessions[proxy_id] = ProxySession(proxy_id, self.epoch)
        return s

    def set_desired(self, configs: Mapping[str, ProxyConfig]) -> int:
        """Update desired configs; wake the streams whose content changed. Returns how many."""
        now, changed = self.clock(), 0
        for pid, cfg in configs.items():
            s = self.session(pid)
            if s.set_desired(cfg, now):
                changed += 1
                if s.wake is not None:
                    s.wake.set()
        return changed

    def forget(self, proxy_ids: Iterable[str]) -> None:
        for pid in proxy_ids:
            s = self.sessions.get(pid)
            if s is not None and not s.connected:
                del self.sessions[pid]

    def attach(self, proxy_id: str, have: Stamp | None) -> ProxySession:
        if have is not None and have.epoch > self.epoch:
            self.stale_epoch_refusals += 1
            raise StaleEpochError(
                f"this controller's epoch {self.epoch} is older than epoch {have.epoch} that proxy {proxy_id} "
                f"already follows: another controller is newer (split brain); stop this one or remove its state")
        s = self.session(proxy_id)
        s.attach(have)
        return s

    def build(self, s: ProxySession) -> list[bytes]:
        """Decide the next push of a session and encode it: serialized `ConfigResponse`s, one per
        chunk (empty list: nothing to send). See "Fan-out" in the module docstring."""
        push = s.next_push(self.clock(), self._nonces)
        if push is None:
            return []
        old, new = s.acked, push.config
        segments: list[bytes] = []
        size = 0
        new_c = push.content
        old_c = s.acked_content if old is not None else None
        for i, kind in enumerate(_KINDS):
            new_t = new_c[i]
            old_t = old_c[i] if old_c is not None else ()
            if new_t is not old_t and not (old_t and _EQUAL(old_t, new_t)):
                seg = self.segments.get(kind, old_t, new_t)
                segments.append(seg)
                size += len(seg)
        if size <= self.max_message_bytes - CHUNK_OVERHEAD_BYTES:
            ids = None if old is not None and old.local_identities == new.local_identities else new.local_identities
            head = pb.ConfigResponse(stamp=stamp_to_pb(new.stamp), base_version=old.stamp.version if old else 0,
                                     nonce=push.nonce, chunk=0, chunks=1, proxy=header_to_pb(new))
            if ids is not None:
                head.identities_set = True
                head.local_identities.extend(ids)
            s.oversize_error = ""
            return [head.SerializeToString() + b"".join(segments)]
        try:  # over one message: let the codec split it (or refuse a resource that cannot fit)
            msgs = encode_delta(diff_configs(old, new), new, push.nonce, self.max_message_bytes)
        except OversizeError as e:
            s.in_flight, s.oversize_error = None, str(e)
            s.nacked_content = push.content  # do not retry the same content
            return []
        s.oversize_error = ""
        return [m.SerializeToString() for m in msgs]

    def on_reply(self, s: ProxySession, req: Any) -> None:
        push = s.on_reply(req.response_nonce, req.nack, req.error_detail, self.clock())
        if push is None:
            return
        ev = AckEvent(s.proxy_id, push.config.stamp, bool(req.nack), str(req.error_detail),
                      s.last_ack_latency_s, self.clock() - push.trigger_at_s)
        for listener in self.listeners:
            listener(ev)

    def status(self) -> list[dict[str, Any]]:
        return [self.sessions[p].status() for p in sorted(self.sessions)]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in SyncState}
        for sess in self.sessions.values():
            out[sess.sync.value] += 1
        return out


# --- identity -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Requester:
    proxy_id: str
    identity: str        # SPIFFE ID from the client certificate ("" without one)
    bootstrap: bool      # authenticated by a bootstrap token instead of a certificate
    cluster: str = ""    # the cluster the bootstrap token belongs to


class Signer(Protocol):
    def sign(self, who: Requester, csr_pem: bytes, ttl_s: float) -> tuple[list[bytes], list[bytes], float]:
        """(chain leaf-first, roots, expires_at_s); raises PermissionError with the reason."""
        ...


def spiffe_id_from_pem(cert_pem: bytes) -> str:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    return uris[0] if uris else ""


def proxy_cluster(proxy_id: str) -> str:
    parts = proxy_id.split("/")
    return parts[1] if len(parts) >= 2 else ""


def no_bootstrap(_token: str) -> str | None:
    return None


@dataclass
class ProxyAuthorizer:
    """May identity X act as proxy P? Only when X is P's own identity in the trust domain of P's
    cluster (`ztunnel.api.identity.proxy_spiffe_id`): another proxy's certificate, a workload's, or one of
    another trust domain cannot subscribe as P."""

    cluster_trust_domains: dict[str, str] = field(default_factory=dict)
    proxy_namespace: str = "meshfed-system"

    def __call__(self, proxy_id: str, identity: str) -> str:
        """"" when allowed, else the reason."""
        cluster = proxy_cluster(proxy_id)
        td = self.cluster_trust_domains.get(cluster)
        if td is None:
            return f"proxy {proxy_id} names cluster {cluster!r}, which is not in the fleet repo"
        try:
            want = proxy_spiffe_id(td, proxy_id)
        except ValueError as e:
            return str(e)
        if identity != want:
            return (f"identity {identity or '<none>'} may not act as proxy {proxy_id}: only {want} may "
                    f"(the proxy's own identity in {td}, the trust domain of cluster {cluster})")
        return ""


HealthCallback = Callable[[str, Any], None]  # (authenticated proxy id, pb.HealthReport)


class ConfigServer:
    """gRPC adapter around a ConfigDistributor, a Signer and a health callback."""

    def __init__(self, distributor: ConfigDistributor, *, signer: Signer | None = None,
                 on_health: HealthCallback | None = None,
                 authorize: Callable[[str, str], str] | None = None,
                 bootstrap_cluster: Callable[[str], str | None] = no_bootstrap,  # token -> cluster
                 verify_peer: Callable[[bytes], str] | None = None,
                 insecure: bool = False, write_timeout_s: float = 5.0) -> None:
        # `verify_peer(client leaf PEM) -> SPIFFE ID` must bind the leaf's issuer to the trust
        # domain its SAN names (ztunnel.api.verify.TrustStore): gRPC only checks the chain against the
        # pooled roots of every CA, and with a pool trust domain A's CA could mint B's identities.
        self.verify_peer = verify_peer
        self.dist = distributor
        self.signer = signer
        self.on_health = on_health
        self.authorize = authorize or (lambda _p, _i: "")
        self.bootstrap_cluster = bootstrap_cluster  # constant-time check (federation.controller.bootstrap)
        self.insecure = insecure
        self.write_timeout_s = write_timeout_s
        self._server: Any = None
        self.port = 0
        self.bootstrap_port = 0
        self.health_reports = 0
        self.slow_disconnects = 0
        self._streams: dict[str, asyncio.Task[Any]] = {}
        self._writes: dict[asyncio.Future[Any], tuple[float, str]] = {}  # writer -> (write started, proxy)
        self._watchdog: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, listen: str = "127.0.0.1:0", tls: tuple[bytes, bytes, bytes] | None = None,
                    bootstrap_listen: str | None = None) -> int:
        """Listen on `listen` ("host:port"); `tls` = (server key PEM, server chain PEM, client roots PEM).
        With TLS, `bootstrap_listen` adds the port without client authentication where proxies
        get their first certificate with a bootstrap token (`bootstrap_port`)."""
        import grpc

        if tls is None and not self.insecure:
            raise ValueError("a config server without TLS must be started with insecure=True (loopback tests only)")
        if tls is not None and self.verify_peer is None:
            raise ValueError("a TLS config server needs verify_peer: a trust-domain-bound check of client "
                             "certificates (pooled roots alone let one trust domain's CA mint another's identities)")
        opts = [("grpc.max_send_message_length", self.dist.max_message_bytes + 65536),
                ("grpc.max_receive_message_length", self.dist.max_message_bytes + 65536),
                ("grpc.so_reuseport", 0)]
        self._server = grpc.aio.server(options=opts)
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
        if tls is None:
            self.port = self._server.add_insecure_port(listen)
        else:
            key, chain, roots = tls
            creds = grpc.ssl_server_credentials([(key, chain)], root_certificates=roots, require_client_auth=True)
            self.port = self._server.add_secure_port(listen, creds)
            if bootstrap_listen is not None:
                self.bootstrap_port = self._server.add_secure_port(
                    bootstrap_listen, grpc.ssl_server_credentials([(key, chain)]))
                if self.bootstrap_port == 0:
                    raise OSError(f"cannot listen on {bootstrap_listen} (bootstrap): address in use or not local")
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}: address in use or not local")
        await self._server.start()
        self._watchdog = asyncio.ensure_future(self._write_watchdog())
        return int(self.port)

    async def _write_watchdog(self) -> None:
        """Disconnect proxies that do not drain their stream: a write pending for longer than
        `write_timeout_s` cancels that stream's writer, which ends the stream (the proxy resyncs
        when it returns). One periodic sweep instead of a timer per write (measured: the per-write
        `asyncio.timeout` was the largest Python cost of a push after encoding was shared)."""
        while True:
            await asyncio.sleep(self.write_timeout_s / 4)
            now = time.monotonic()
            for task, (started_s, _proxy_id) in list(self._writes.items()):
                if now - started_s > self.write_timeout_s:
                    del self._writes[task]
                    self.slow_disconnects += 1
                    task.cancel()

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

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
                                "no client certificate: request one from the certificate service with the "
                                "cluster's bootstrap token first")
        reason = self.authorize(proxy_id, identity)
        if reason:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        return identity

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
        try:
            session = self.dist.attach(proxy_id, stamp_from_pb(hello.have) if hello.HasField("have") else None)
        except StaleEpochError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            raise  # unreachable: abort raises
        old = self._streams.get(proxy_id)
        if old is not None and old is not asyncio.current_task():
            old.cancel()  # a proxy has one stream; the newest wins
        me = asyncio.current_task()
        assert me is not None
        self._streams[proxy_id] = me
        session.peer_identity = identity
        session.wake = asyncio.Event()
        session.wake.set()

        async def reader() -> None:
            async for req in it:
                self.dist.on_reply(session, req)
                assert session.wake is not None
                session.wake.set()

        async def writer() -> None:
            assert session.wake is not None
            while True:
                await session.wake.wait()
                session.wake.clear()
                for msg in self.dist.build(session):
                    # the write deadline is enforced by `_write_watchdog` (one timer for all streams)
                    self._writes[me_w] = (time.monotonic(), proxy_id)
                    await context.write(msg)
                    del self._writes[me_w]

        try:
            rd = asyncio.ensure_future(reader())
            wr = me_w = asyncio.ensure_future(writer())
            _done, pending = await asyncio.wait({rd, wr}, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        finally:
            self._writes.pop(wr, None)
            if self._streams.get(proxy_id) is me:
                del self._streams[proxy_id]
                session.detach()

    # --- certificates --------------------------------------------------------------------------

    async def _sign(self, req: Any, context: Any) -> Any:
        import grpc

        signer = self.signer
        if signer is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this controller runs no CA")
            raise AssertionError("unreachable")
        identity = "" if self.insecure else await self._verified_peer_or_abort(context)
        cluster = ""
        bootstrap = False
        if not identity:
            cluster = self.bootstrap_cluster(req.bootstrap_token) or ""
            if not cluster and not self.insecure:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "neither a client certificate nor a valid bootstrap token; use the token "
                                    "from the controller's state directory (bootstrap-tokens.json)")
            bootstrap = True
            if cluster and proxy_cluster(req.proxy_id) != cluster:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"the bootstrap token of cluster {cluster} cannot request certificates "
                                    f"for proxy {req.proxy_id}")
        else:
            reason = self.authorize(req.proxy_id, identity)
            if reason:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        who = Requester(req.proxy_id, identity, bootstrap, cluster or proxy_cluster(req.proxy_id))
        try:
            chain, roots, expires = signer.sign(who, bytes(req.csr_pem), float(req.ttl_s or 0))
        except PermissionError as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
            raise
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
        resp = pb.CertificateResponse(expires_at_s=expires)
        resp.cert_chain_pem.extend(chain)
        resp.roots_pem.extend(roots)
        return resp

    # --- health ----------------------------------------------------------------------------

    async def _health(self, request_iterator: Any, context: Any) -> Any:
        n = 0
        async for report in request_iterator:
            if not report.proxy_id:
                continue
            await self._authenticate(context, report.proxy_id)
            n += 1
            self.health_reports += 1
            if self.on_health is not None:
                self.on_health(report.proxy_id, report)
        return pb.HealthSummary(reports=n)


async def wait_until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.005) -> bool:
    """Poll `pred` on the event loop until true or `timeout_s` (tests and benchmarks)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(interval_s)
    return pred()


AsyncFn = Callable[[], Awaitable[None]]
