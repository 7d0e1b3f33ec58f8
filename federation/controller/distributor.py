"""The config distributor: every proxy's desired and acknowledged config, versioned, sans-IO.

Split decide-then-act (the gRPC adapter is `federation.server.grpc_services.ConfigServer`):

- `ProxySession` is one proxy's bookkeeping: the desired config (from the reconciler),
  what the proxy runs as far as we know (`acked`), the one push in flight, NACKs, and the sync
  state SYNCED / STALE / NOT SENT. `next_push()` decides what to send: nothing while a push is in
  flight or when the proxy already runs the desired content; otherwise the delta from what the
  proxy has (a full state when we do not know), stamped `(epoch, revision, version + 1)`.
  At most one push is in flight per proxy, and a new desired config replaces an unsent one:
  the per-stream queue is bounded to one element by construction (latest wins, coalescing
  bursts).
- **Retries.** A push that fails is retried, with exponential backoff per proxy (`retry_delay_s`:
  1 s doubling to 5 min, each proxy offset by a fixed fraction of its id so that a fleet that
  NACKed together does not retry together): a NACK (the proxy may have failed for a moment, e.g.
  fetching its certificates), or no reply within `ack_timeout_s` (then we no longer know what the
  proxy runs, and the retry is a full state). A new desired content resets the backoff and is
  sent at once. Only a config too large for the protocol (`OversizeError`) is not retried: it
  waits for a change. `tick(now_s)` finds the sessions due and the adapter wakes their streams.
  A "resync" NACK (the proxy cannot apply a delta to what it runs) is answered with a full state
  at once; a second one in a row waits for the backoff (a full state has no base to mismatch, so
  that proxy is broken or hostile, and must not keep the controller encoding full states).
- **Resuming.** A stream that reconnects says what the proxy runs (`have`). When that is what
  it ACKed, nothing is resent (a stream cut on purpose, e.g. because the certificate that
  opened it expired, costs no resync); when it is the push that was in flight as the stream
  ended, the hello settles that push as ACKed (`unanswered`: the proxy's `have` moves only once
  its data plane applied a config); anything else is unknown content, and a full state follows.
- **SYNCED** means the proxy ACKed the latest desired content (the same content under a newer
  revision needs no push and counts as that revision); anything else is STALE, or NOT SENT
  before anything was sent. Whether the desired config itself is the latest the reconciler
  rendered is the reconciler's to say (its undelivered configs, joined in
  `federation.controller.queries.assemble_status`).
- **Forgetting.** A proxy no longer rendered (its node or cluster left the fleet) is forgotten:
  a disconnected session is dropped, a connected one is marked removed and its stream closed;
  `forgotten` remembers why (bounded) and a forgotten proxy that reconnects gets no session
  (`ProxyRemovedError`) until it is rendered again.
- `ConfigDistributor` holds the sessions, the controller `epoch`, and the counters the status
  API and metrics read. `set_desired()` is O(changed proxies) and never waits on a proxy.
  `build()` encodes a push straight to wire bytes, and shares the work between proxies (see
  "Fan-out" below). Its only link to I/O is `ProxySession.wake`, an `asyncio.Event` the stream's
  writer waits on.

Split brain: a proxy that already follows a newer epoch than ours is refused (`StaleEpochError`,
FAILED_PRECONDITION on the wire) and the refusal is counted (`stale_epoch_refusals`).

Fan-out (measured at 1,000 proxies: diffing, `dataclasses.replace` for content comparisons and
per-proxy encoding were most of the controller's Python time per push wave). The renderer shares
resource objects between proxies (one Service view per locality), so:

- "same content" is a comparison of the configs' resource tuples (`content_of`), element by
  element, which is a pointer comparison for shared objects: no copies;
- `build()` canonicalises each resource tuple by the identities of its elements (`_Canon`), diffs
  per kind between canonical tuples, and caches the encoded bytes of each (kind, old, new) change
  (`SegmentCache`): N proxies with the same view transition cost one diff and one encode; each
  proxy then gets its own small head (stamp, version, nonce, header) concatenated with the shared
  segments. Protobuf repeated fields may be split over concatenated fragments, so the message a
  proxy decodes is exactly what `ztunnel.api.codec.encode_delta` would have produced (a unit test
  checks it). Segments are per wire form: a proxy that announced `ENDPOINT_TABLES` in its hello
  (`ProxySession.tables`) gets services' endpoints as tables, any other the object form. A delta
  over the message budget falls back to `encode_delta`, which splits it into chunks or refuses it
  (`OversizeError`).
The caches hold the objects whose ids key them, so an id is never reused while its entry lives;
they are bounded and simply cleared when full (a miss only costs a diff).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from ztunnel.api.codec import (
    CHUNK_OVERHEAD_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    OversizeError,
    encode_delta,
    header_to_pb,
    resource_body,
    stamp_to_pb,
)
from ztunnel.api.config import ENDPOINT_TABLES, RESOURCE_TYPES, TABLED_TYPES, ProxyConfig, Stamp, diff_configs
from ztunnel.api.proto import meshfed_pb2 as pb

log = logging.getLogger(__name__)

_KINDS = tuple(RESOURCE_TYPES)
_TABLED_KINDS = frozenset(k for k, cls in RESOURCE_TYPES.items() if cls in TABLED_TYPES)


ACK_TIMEOUT_S = 30.0
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 300.0
MAX_FORGOTTEN = 1000


def retry_delay_s(proxy_id: str, failures: int) -> float:
    """Backoff after `failures` consecutive failed pushes: 1 s doubling to 5 min, scaled by a
    fixed per-proxy factor in [0.5, 1) (spreads a fleet's retries without randomness)."""
    cap = min(RETRY_MAX_S, RETRY_INITIAL_S * 2.0 ** max(0, failures - 1))
    return float(cap * (0.5 + (zlib.crc32(proxy_id.encode()) % 1000) / 2000))


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
    return (*(_CANON(getattr(cfg, kind)) for kind in _KINDS),
            cfg.local_identities, cfg.federated_trust_domains, cfg.proxy_id, cfg.mode, cfg.cluster, cfg.network,
            cfg.trust_domain)


_RESOURCE_SLOTS = len(_KINDS)  # the first elements of a Content are canonical resource tuples


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
    tables: bool = False                    # the proxy reads endpoint tables (`ENDPOINT_TABLES` in its hello)
    failures: int = 0                       # consecutive failed pushes of the desired content
    retry_at_s: float = 0.0                 # when the failed content is sent again (0: not waiting)
    last_failure: str = ""
    retries: int = 0
    ack_timeouts: int = 0
    removed: bool = False                   # forgotten while connected: the stream is being closed
    resyncs_in_a_row: int = 0               # "resync" NACKs since the last ACK or other NACK
    unanswered: PushRecord | None = None    # in flight when the stream ended: the next hello may settle it

    # --- decisions ---------------------------------------------------------------------------

    def set_desired(self, cfg: ProxyConfig, now_s: float) -> bool:
        """Record a new desired config; True when it differs from the previous desired content."""
        content = content_of(cfg)
        if self.desired is not None and _same(self.desired_content, content):
            if cfg.stamp.revision != self.desired.stamp.revision:
                self.desired = cfg  # same content, newer revision: nothing to push
            return False
        self.desired, self.desired_content, self.desired_at_s = cfg, content, now_s
        self.failures, self.retry_at_s = 0, 0.0  # new content: no backoff
        return True

    def attach(self, have: Stamp | None, now_s: float = 0.0) -> PushRecord | None:
        """A stream (re)connected and says what it runs. Only a matching stamp lets us send deltas
        (a reconnect resumes: nothing is resent while the proxy runs what it ACKed). Returns the
        push in flight that the hello settles: a stream cut between the proxy applying a push and
        its ACK reaching us (a certificate-expiry cut, a dropped link) reconnects with that push's
        stamp, and since a proxy's `have` moves only once its data plane applied the config, the
        hello is its ACK; without this the proxy would get a full state it already runs."""
        self.connected = True
        push, self.in_flight, self.unanswered = self.unanswered, None, None
        if push is not None and have is not None and push.config.stamp == have:
            self.last_ack_latency_s = now_s - push.sent_at_s
            self._acked(push)
            return push
        if have is not None and self.acked is not None and self.acked.stamp == have:
            return None
        self.acked = self.acked_content = None  # unknown content: the next push is a full state
        self.acked_stamp = have
        if have is not None and have.epoch == self.epoch:
            self.version = max(self.version, have.version)
        return None

    def detach(self) -> None:
        self.connected = False
        self.in_flight, self.unanswered = None, self.in_flight

    def _failed(self, now_s: float, why: str) -> None:
        self.failures += 1
        self.last_failure = why
        self.retry_at_s = now_s + retry_delay_s(self.proxy_id, self.failures)

    def check_ack_timeout(self, now_s: float, ack_timeout_s: float = ACK_TIMEOUT_S) -> bool:
        """A push unanswered for `ack_timeout_s` failed: we no longer know what the proxy runs, so
        the retry (after the backoff) is a full state. True when it timed out now."""
        push = self.in_flight
        if push is None or now_s - push.sent_at_s < ack_timeout_s:
            return False
        self.in_flight = None
        self.acked = self.acked_content = None
        self.ack_timeouts += 1
        self._failed(now_s, f"no ACK/NACK within {ack_timeout_s:.0f} s for version {push.config.stamp.version}")
        return True

    def retry_due(self, now_s: float) -> bool:
        return self.retry_at_s > 0 and now_s >= self.retry_at_s and self.connected and self.in_flight is None

    def push_due(self, now_s: float) -> bool:
        """Whether `next_push` would send something now; no side effects. A stream's reader asks
        it after an ACK: most ACKs leave nothing to send, and waking the writer for nothing cost a
        task step per proxy per push wave."""
        if not self.connected or self.in_flight is not None or self.desired is None or self.removed:
            return False
        want = self.desired_content
        if self.acked is not None and _same(self.acked_content, want):
            return False
        # a failed push waits for its backoff (a new content resets it; an oversize one waits for ever)
        return not (self.retry_at_s and now_s < self.retry_at_s)

    def next_push(self, now_s: float, nonces: Iterable[int]) -> PushRecord | None:
        desired = self.desired
        if desired is None or not self.push_due(now_s):
            return None
        if self.retry_at_s or (self.nacked_content is not None and _same(self.nacked_content, self.desired_content)):
            self.retries += 1  # a failed push (a NACK, a timeout): try again now that the backoff passed
        self.retry_at_s = 0.0
        self.version += 1
        cfg = replace(desired, stamp=Stamp(self.epoch, desired.stamp.revision, self.version))
        self.in_flight = PushRecord(f"{self.epoch}-{next(iter(nonces))}", cfg, now_s, self.desired_at_s,
                                    self.desired_content or content_of(cfg))
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
                # our idea of its base was wrong: full state next. A full state has no base to be
                # wrong about, so a proxy that asks again is broken (or hostile): from the second
                # resync in a row, the full state waits for the backoff like any failed push
                self.acked = self.acked_content = None
                self.resyncs_in_a_row += 1
                if self.resyncs_in_a_row > 1:
                    self._failed(now_s, f"NACK: {error} ({self.resyncs_in_a_row} resyncs in a row)")
            else:
                self.resyncs_in_a_row = 0
                self.nacked_content = push.content
                self._failed(now_s, f"NACK: {error}")
        else:
            self._acked(push)
        return push

    def _acked(self, push: PushRecord) -> None:
        self.acks += 1
        self.acked, self.acked_content, self.acked_stamp = push.config, push.content, push.config.stamp
        self.nacked_content, self.last_nack, self.resyncs_in_a_row = None, "", 0
        self.failures, self.retry_at_s, self.last_failure = 0, 0.0, ""

    @property
    def sync(self) -> SyncState:
        if self.desired is None or (not self.ever_sent and self.acked is None):
            return SyncState.NOT_SENT
        if self.acked is not None and _same(self.acked_content, self.desired_content):
            return SyncState.SYNCED
        return SyncState.STALE

    def status(self, now_s: float | None = None) -> dict[str, Any]:
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
            "failures": self.failures, "retries": self.retries, "ack_timeouts": self.ack_timeouts,
            "last_failure": self.last_failure,
            "retry_in_s": (round(max(0.0, self.retry_at_s - now_s), 1)
                           if self.retry_at_s and now_s is not None and self.retry_at_s != float("inf") else None),
        }


class StaleEpochError(RuntimeError):
    pass


class ProxyRemovedError(RuntimeError):
    """The proxy was forgotten (it is no longer rendered); the message says why."""


@dataclass
class AckEvent:
    proxy_id: str
    stamp: Stamp
    nack: bool
    error: str
    latency_s: float
    trigger_to_ack_s: float


class SegmentCache:
    """Encoded changes of one resource kind between two canonical tuples: the `upserts` and
    `removals` fields of a ConfigResponse, as bytes to concatenate. Bounded by entries and bytes."""

    def __init__(self, max_entries: int = 4096, max_bytes: int = 64 << 20) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._d: dict[tuple[str, int, int, bool], tuple[tuple[Any, ...], tuple[Any, ...], bytes]] = {}
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, kind: str, old: tuple[Any, ...], new: tuple[Any, ...], tables: bool = False) -> bytes:
        key = (kind, id(old), id(new), tables)
        hit = self._d.get(key)
        if hit is not None and hit[0] is old and hit[1] is new:
            self.hits += 1
            return hit[2]
        self.misses += 1
        seg = _encode_kind_change(kind, old, new, tables)
        if len(self._d) >= self.max_entries or self._bytes + len(seg) > self.max_bytes:
            self._d.clear()
            self._bytes = 0
        self._d[key] = (old, new, seg)
        self._bytes += len(seg)
        return seg


def _encode_kind_change(kind: str, old: tuple[Any, ...], new: tuple[Any, ...], tables: bool) -> bytes:
    """`diff_configs` for one kind, encoded as `encode_delta` encodes it (upserts sorted by key)."""
    new_items = {r.key: r for r in new}
    old_items = {r.key: r for r in old}
    msg = pb.ConfigResponse()
    for k in sorted(new_items):
        r, o = new_items[k], old_items.get(k)
        if o is not r and o != r:
            msg.upserts.append(pb.Resource(type=kind, key=k, body=resource_body(r, tables)))
    msg.removals.extend(pb.RemovedResource(type=kind, key=k) for k in sorted(old_items) if k not in new_items)
    return bytes(msg.SerializeToString())


def kind_segments(segments: SegmentCache, old_c: Content | None, new_c: Content, tables: bool = False) -> list[bytes]:
    """The encoded changes, kind by kind, from content `old_c` (None: nothing) to `new_c`: shared
    between every pair of contents with the same canonical tuples (see "Fan-out"); `tables`: the
    wire form for a reader of `ENDPOINT_TABLES`."""
    out: list[bytes] = []
    for i, kind in enumerate(_KINDS):
        new_t = new_c[i]
        old_t = old_c[i] if old_c is not None else ()
        if new_t is not old_t and not (old_t and _EQUAL(old_t, new_t)):
            # only kinds with endpoints differ between the forms: the others are encoded once for both
            out.append(segments.get(kind, old_t, new_t, tables and kind in _TABLED_KINDS))
    return out


def encode_change(old: ProxyConfig | None, new: ProxyConfig, nonce: str, segments: list[bytes]) -> bytes:
    """One serialized `ConfigResponse` from `old` to `new`: its own head (stamp, base version,
    nonce, header, identities when they changed) and the shared `kind_segments`. Equal to what
    `ztunnel.api.codec.encode_delta(diff_configs(old, new), new, nonce, tables=...)` gives in one
    chunk, `tables` as the segments were made."""
    ids = None if old is not None and old.local_identities == new.local_identities else new.local_identities
    head = pb.ConfigResponse(stamp=stamp_to_pb(new.stamp), base_version=old.stamp.version if old else 0,
                             nonce=nonce, chunk=0, chunks=1, proxy=header_to_pb(new))
    if ids is not None:
        head.identities_set = True
        head.local_identities.extend(ids)
    return bytes(head.SerializeToString()) + b"".join(segments)


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
        self.segments = SegmentCache()
        self.ack_timeout_s = ACK_TIMEOUT_S
        self.forgotten: OrderedDict[str, tuple[str, float]] = OrderedDict()   # proxy -> (why, when), bounded
        self.first_epoch = epoch          # the first epoch of this state: older hellos followed another controller
        self.foreign_hellos: OrderedDict[str, int] = OrderedDict()           # proxy -> the older epoch it ran

    def session(self, proxy_id: str) -> ProxySession:
        s = self.sessions.get(proxy_id)
        if s is None:
            s = self.sessions[proxy_id] = ProxySession(proxy_id, self.epoch)
        return s

    def set_desired(self, configs: Mapping[str, ProxyConfig]) -> int:
        """Update desired configs; wake the streams whose content changed. Returns how many."""
        now, changed = self.clock(), 0
        for pid, cfg in configs.items():
            self.forgotten.pop(pid, None)  # rendered again
            s = self.session(pid)
            s.removed = False
            if s.set_desired(cfg, now):
                changed += 1
                if s.wake is not None:
                    s.wake.set()
        return changed

    def forget(self, proxy_ids: Iterable[str], why: str = "no longer rendered") -> list[str]:
        """Forget proxies that are no longer rendered: a disconnected session goes now, a connected
        one is marked removed and its stream woken to close. Returns the ids forgotten."""
        out = []
        now = self.clock()
        for pid in proxy_ids:
            s = self.sessions.get(pid)
            if s is None:
                continue
            out.append(pid)
            self.forgotten[pid] = (why, now)
            self.forgotten.move_to_end(pid)
            while len(self.forgotten) > MAX_FORGOTTEN:
                self.forgotten.popitem(last=False)
            if s.connected:
                s.removed, s.desired, s.desired_content = True, None, None
                if s.wake is not None:
                    s.wake.set()
            else:
                del self.sessions[pid]
        return out

    def forget_cluster(self, cluster: str, why: str) -> list[str]:
        """Forget every proxy of `cluster` (`ztunnel/<cluster>/...`, `gateway/<cluster>`)."""
        return self.forget([p for p in self.sessions if p.split("/")[1:2] == [cluster]], why)

    def attach(self, proxy_id: str, have: Stamp | None, features: Iterable[str] = ()) -> ProxySession:
        if have is not None and have.epoch > self.epoch:
            self.stale_epoch_refusals += 1
            err = StaleEpochError(
                f"this controller's epoch {self.epoch} is older than epoch {have.epoch} that proxy {proxy_id} "
                f"already follows: another controller is newer (split brain); stop this one or remove its state")
            log.error("%s", err, extra={"fields": {"event": "StaleEpochRefused", "proxy": proxy_id}})
            raise err
        gone = self.forgotten.get(proxy_id)
        s0 = self.sessions.get(proxy_id)
        if gone is not None and (s0 is None or s0.desired is None):
            raise ProxyRemovedError(f"proxy {proxy_id} was removed from the mesh ({gone[0]}); this controller has "
                                    f"no config for it: stop it, or add its node/cluster back to the fleet repo")
        if have is not None and 0 < have.epoch < self.first_epoch:
            self.foreign_hellos[proxy_id] = have.epoch
            self.foreign_hellos.move_to_end(proxy_id)
            while len(self.foreign_hellos) > MAX_FORGOTTEN:
                self.foreign_hellos.popitem(last=False)
        s = self.session(proxy_id)
        tables = ENDPOINT_TABLES in features
        if tables != s.tables and s.oversize_error:
            # "does not fit" was said of the other wire form (tables are ~2.6x denser): try again
            s.oversize_error, s.nacked_content, s.retry_at_s, s.last_failure = "", None, 0.0, ""
        s.tables = tables
        settled = s.attach(have, self.clock())
        if settled is not None:
            self._announce(s, settled, nack=False, error="")
        runs = f"runs {have.epoch}.{have.version} of revision {have.revision[:8]}" if have is not None else "runs nothing yet"
        log.info("proxy %s connected (%s)", proxy_id, runs,
                 extra={"fields": {"event": "ProxyConnected", "proxy": proxy_id,
                                   "revision": have.revision if have is not None else ""}})
        return s

    def detach(self, s: ProxySession) -> None:
        """The stream ended. A session with nothing to remember (removed, or never given a config)
        goes away with it."""
        if s.connected:
            log.info("proxy %s disconnected (%s)", s.proxy_id, s.sync.value,
                     extra={"fields": {"event": "ProxyDisconnected", "proxy": s.proxy_id, "sync": s.sync.value}})
        s.detach()
        if (s.removed or s.desired is None) and self.sessions.get(s.proxy_id) is s:
            del self.sessions[s.proxy_id]

    def tick(self, now_s: float | None = None) -> list[ProxySession]:
        """Time passes: pushes unanswered for `ack_timeout_s` fail; sessions whose retry is due are
        returned (the adapter wakes their streams)."""
        now = self.clock() if now_s is None else now_s
        due = []
        for s in self.sessions.values():
            if s.in_flight is not None:
                s.check_ack_timeout(now, self.ack_timeout_s)
            if s.retry_due(now):
                due.append(s)
        return due

    def build(self, s: ProxySession) -> list[bytes]:
        """Decide the next push of a session and encode it: serialized `ConfigResponse`s, one per
        chunk (empty list: nothing to send). See "Fan-out" in the module docstring."""
        push = s.next_push(self.clock(), self._nonces)
        if push is None:
            return []
        old, new = s.acked, push.config
        old_c = s.acked_content if old is not None else None
        segments = kind_segments(self.segments, old_c, push.content, s.tables)
        if sum(map(len, segments)) <= self.max_message_bytes - CHUNK_OVERHEAD_BYTES:
            s.oversize_error = ""
            return [encode_change(old, new, push.nonce, segments)]
        try:  # over one message: let the codec split it (or refuse a resource that cannot fit)
            msgs = encode_delta(diff_configs(old, new), new, push.nonce, self.max_message_bytes, s.tables)
        except OversizeError as e:
            log.warning("config for %s not sent: %s", s.proxy_id, e,
                        extra={"fields": {"event": "ConfigOversize", "proxy": s.proxy_id}})
            s.in_flight, s.oversize_error = None, str(e)
            s.nacked_content = push.content  # do not retry the same content: it cannot fit
            s.retry_at_s, s.last_failure = float("inf"), f"oversize: {e}"
            return []
        s.oversize_error = ""
        return [m.SerializeToString() for m in msgs]

    def on_reply(self, s: ProxySession, req: Any) -> bool:
        """An ACK or NACK from `s`'s stream. True when the session has a push to make now (the
        stream's writer needs waking: a resync NACK, or a desired content that moved while the
        push was in flight)."""
        now = self.clock()
        push = s.on_reply(req.response_nonce, req.nack, req.error_detail, now)
        if push is not None:
            self._announce(s, push, bool(req.nack), str(req.error_detail))
        return s.push_due(now)

    def _announce(self, s: ProxySession, push: PushRecord, nack: bool, error: str) -> None:
        ev = AckEvent(s.proxy_id, push.config.stamp, nack, error, s.last_ack_latency_s,
                      self.clock() - push.trigger_at_s)
        for listener in self.listeners:
            listener(ev)

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [self.sessions[p].status(now) for p in sorted(self.sessions)]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in SyncState}
        for sess in self.sessions.values():
            out[sess.sync.value] += 1
        return out
