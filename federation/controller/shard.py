"""Config shards: the push half of the config service, partitioned by proxy over worker processes.

At 10,000 proxies the controller's cost is per proxy: a delta applied, a push encoded and written,
an ACK read and settled, on one event loop. Rendering is not (node proxies of one locality share
their views, `federation.core.render`). So the work is split where it is per proxy and nowhere
else: the reconciler still renders every proxy in one place (the core's pure function), and each
shard serves a fixed part of the proxies — their sessions, deltas, encoding and streams.

- **The partition** (`shard_of`) is the one decision of which shard serves a proxy: pure, the same
  in every process, and stable (rendezvous hashing: a proxy's shard depends only on its id and the
  number of shards, and going from n to n + 1 shards moves only the proxies the new shard wins,
  about 1/(n + 1) of them). Proxies of one locality land on several shards; each shard then
  encodes a shared view once for its own proxies (a few encodes per view instead of one, against
  per-proxy work that no longer queues behind one loop).
- **Delivery** to the shards is the reconciler's `reconcile_service.ShardedOutbox`: per-shard
  records of what each took, a failed shard retried on its own (a push is never lost, and the
  distributor's per-proxy retry/backoff still decides SYNCED within a shard).
- `ConfigShard` is one shard as a plain class: a `ConfigDistributor` (the controller's epoch,
  handed over by the state owner), `apply` (configs in full, shared objects written once:
  `wire.encode_shard_configs`; per-proxy protobuf deltas copied every body into every proxy's
  message, ~10 GB for a full state to 10,000 proxies), the rollout facts of its proxies (`rollout_facts`, the same as the state
  owner's), and the proxies it is still waiting on since the last delivery (`waiting`), which a
  host can wait for (`settled`). CA keys, the store and the bootstrap credentials stay with the
  state owner, pinned to its node (`federation.ray.placement`).
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from federation.controller.distributor import AckEvent, ConfigDistributor, SyncState
from federation.controller.wire import decode_config_deltas, decode_shard_configs
from ztunnel.api.config import ProxyConfig, apply_delta

log = logging.getLogger(__name__)

MAX_SHARDS = 256


_MASK64 = (1 << 64) - 1


def _weight(h: int, k: int) -> int:
    """splitmix64's finalizer over (proxy hash, shard): crc32 alone is linear, and weights derived
    from crc32("<shard>/<id>") gave one shard of three 448 of 1,010 proxies."""
    z = (h + (k + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=1 << 16)
def shard_of(proxy_id: str, shards: int) -> int:
    """The shard (0 .. shards-1) that serves `proxy_id`: the one with the highest weight
    `_weight(crc32(id), shard)` (rendezvous hashing; crc32 is the same in every process).
    Cached: every push asks it for every changed proxy."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be 1..{MAX_SHARDS}, not {shards}")
    if shards == 1:
        return 0
    h = zlib.crc32(proxy_id.encode())
    return max(range(shards), key=lambda k: (_weight(h, k), k))


def partition(proxy_ids: Iterable[str], shards: int) -> list[list[str]]:
    """`proxy_ids` split by `shard_of`, in their order within each shard."""
    out: list[list[str]] = [[] for _ in range(shards)]
    for pid in proxy_ids:
        out[shard_of(pid, shards)].append(pid)
    return out


def apply_config_deltas(dist: ConfigDistributor, blob: bytes) -> tuple[str, dict[str, ProxyConfig]]:
    """Per-proxy deltas from the reconciler (`wire.encode_config_deltas`) into `dist`: ("resync",
    {}) when one does not apply to what `dist` holds (then nothing of the blob but removals took
    effect, and the reconciler sends everything in full), else ("ok", the configs set)."""
    changed: dict[str, ProxyConfig] = {}
    for d in decode_config_deltas(blob):
        if d.remove:
            dist.forget([d.proxy_id])
            continue
        sess = dist.sessions.get(d.proxy_id)
        base = sess.desired if sess is not None else None
        try:
            changed[d.proxy_id] = apply_delta(base, d.delta, d.template)
        except ValueError:
            log.info("a config delta does not apply to what this service holds (restarted?): asking the "
                     "reconciler for every config in full")
            return "resync", {}
    return "ok", changed


def rollout_facts(dist: ConfigDistributor, revision: str, proxy_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Per rendered proxy: its cluster, whether it is connected, and whether it runs `revision`
    ("acked"), refused it ("nacked"), has it on the way ("pending") or has another revision
    as desired ("other"): the facts of `federation.core.rollout.decide_rollout`."""
    out = []
    for pid in proxy_ids:
        s = dist.sessions.get(pid)
        cluster = pid.split("/")[1] if pid.count("/") >= 1 else ""
        if s is None or s.desired is None:
            out.append({"proxy": pid, "cluster": cluster, "connected": bool(s and s.connected), "state": "other"})
            continue
        if s.desired.stamp.revision != revision:
            state = "other"
        elif s.sync is SyncState.SYNCED:
            state = "acked"
        elif s.in_flight is None and s.nacked_content is not None and s.nacked_content is s.desired_content:
            state = "nacked"
        else:
            state = "pending"
        out.append({"proxy": pid, "cluster": cluster, "connected": s.connected, "state": state})
    return out


class ConfigShard:
    """One shard. Invariants: `dist` holds only proxies with `shard_of(p, shards) == index` (a
    config for another one is refused: the reconciler and this shard disagree on the partition);
    `waiting` holds the proxies whose desired content changed and that have not ACKed it since;
    `last_settled_at_s` is when the last of them did (the clock's time)."""

    def __init__(self, index: int, shards: int, epoch: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= index < shards:
            raise ValueError(f"shard index {index} is not in 0..{shards - 1}")
        self.index, self.shards = index, shards
        self.clock = clock
        self.dist = ConfigDistributor(epoch, clock=clock)
        self.dist.listeners.append(self._on_reply)
        self.waiting: set[str] = set()
        self.complete = False      # took a complete set of its proxies' configs since it started
        self.last_settled_at_s = 0.0
        self.moved_since_taken = 0
        self.nacks = 0

    def apply(self, blob: bytes) -> str:
        """Configs and removals from the reconciler (`wire.encode_shard_configs`): "ok", or "resync"
        (nothing taken) when this shard holds no complete set yet (it started or restarted since)
        and the message is not one: the reconciler then sends all of its proxies."""
        msg = decode_shard_configs(blob)
        if not msg.full and not self.complete:
            return "resync"
        strangers = [pid for pid in (*msg.configs, *msg.removed) if shard_of(pid, self.shards) != self.index]
        if strangers:
            raise ValueError(f"shard {self.index} of {self.shards} got configs of proxies it does not serve "
                             f"({', '.join(sorted(strangers)[:3])}): the reconciler partitions for another "
                             f"number of shards; restart the controller with one --workers value")
        gone = [*msg.removed, *(p for p in self.dist.sessions if msg.full and p not in msg.configs)]
        if gone:
            self.dist.forget(gone)
            self.waiting.difference_update(gone)
        self.complete = self.complete or msg.full
        changed = msg.configs
        before = {pid: s.desired_content if (s := self.dist.sessions.get(pid)) else None for pid in changed}
        self.dist.set_desired(changed)
        moved = {pid for pid in changed if self.dist.sessions[pid].desired_content is not before[pid]}
        self.waiting |= {pid for pid in moved if self.dist.sessions[pid].sync is not SyncState.SYNCED}
        self.moved_since_taken += len(moved)
        if moved and not self.waiting:
            self.last_settled_at_s = self.clock()
        return "ok"

    def _on_reply(self, ev: AckEvent) -> None:
        if ev.nack:
            self.nacks += 1
            return
        if ev.proxy_id in self.waiting and self.dist.sessions[ev.proxy_id].sync is SyncState.SYNCED:
            self.waiting.discard(ev.proxy_id)
            if not self.waiting:
                self.last_settled_at_s = self.clock()

    def settled(self) -> bool:
        return not self.waiting

    def take_settled(self) -> tuple[float, int]:
        """(when the last waited-on proxy ACKed, proxies whose content moved since the last take)."""
        moved, self.moved_since_taken = self.moved_since_taken, 0
        return self.last_settled_at_s, moved

    def rollout(self, revision: str, proxy_ids: Iterable[str]) -> list[dict[str, Any]]:
        return rollout_facts(self.dist, revision, proxy_ids)

    def counts(self) -> dict[str, int]:
        return {**self.dist.counts(), "waiting": len(self.waiting), "nacks": self.nacks}
