"""Bytes at the actor boundary: every encoding the controller's parts use to talk to each other.

Between Ray actors a pickled object graph costs far more per hop than the same data as one bytes
object (measured: a 10 MB dict ≈ 130 ms per hop, bytes ≈ 3.5 ms), and bytes make the hop explicit.
So each producer encodes once, here, and each consumer decodes, here:

- fleet snapshots and cluster observations: pickle, only between our own processes (same code,
  same trust), never for input from a network peer. Snapshots hold read-only maps
  (MappingProxyType), which plain pickle refuses: they travel as their dict and come back
  read-only;
- configs, reconciler -> config service (or its shards, `federation.controller.shard`): per-proxy
  deltas in the protocol's own protobuf encoding, framed by `pack`/`unpack` (a 4-byte big-endian
  length before each), encoded the way the distributor encodes a push (`distributor.encode_change`:
  one diff and one encode per distinct view transition, shared by the proxies that make it). The renderer shares resource objects between proxies
  with the same view, and the distributor's fan-out (one diff and one encode per distinct view
  transition) depends on that sharing; decoding each proxy's copy on its own would give every
  proxy its own objects and turn the fan-out back into one encode per proxy. So the decoder
  interns resources by (kind, body bytes) (`_ResourceIntern`): equal bodies become one object,
  within a blob and across blobs while the entry lives;
- configs, reconciler -> config shards: full configs with shared objects written once
  (`encode_shard_configs`, pickle);
- health reports, config service -> reconciler: the proxy's `HealthReport` protobuf as received;
- status documents: JSON.
"""

from __future__ import annotations

import copyreg
import json
import pickle
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from clusters.kube.observation import ClusterObservation
from federation.controller.distributor import SegmentCache, content_of, encode_change, kind_segments
from federation.controller.reconciler import EndpointReport
from gitops.model import ConfigSnapshot
from ztunnel.api.codec import decode_delta, header_to_pb, template_from_header
from ztunnel.api.config import RESOURCE_TYPES, ConfigDelta, ProxyConfig, parse_resources
from ztunnel.api.proto import meshfed_pb2 as pb

REMOVE_NONCE = "remove"       # an empty full-state delta with this nonce: forget the proxy


# --- framing -------------------------------------------------------------------------------------


def pack(messages: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(m)) + m for m in messages)


def unpack(blob: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(blob):
        if i + 4 > len(blob):
            raise ValueError(f"truncated frame header at byte {i} of {len(blob)}")
        (n,) = struct.unpack_from(">I", blob, i)
        if i + 4 + n > len(blob):
            raise ValueError(f"frame at byte {i} claims {n} bytes, only {len(blob) - i - 4} follow")
        out.append(blob[i + 4:i + 4 + n])
        i += 4 + n
    return out


# --- snapshots and observations --------------------------------------------------------------------


def readonly_map(d: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(d)


copyreg.pickle(MappingProxyType, lambda m: (readonly_map, (dict(m),)))


def encode_snapshot(s: ConfigSnapshot) -> bytes:
    return pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)


def decode_snapshot(b: bytes) -> ConfigSnapshot:
    s = pickle.loads(b)
    assert isinstance(s, ConfigSnapshot)
    return s


def encode_observation(o: ClusterObservation) -> bytes:
    return pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)


def decode_observation(b: bytes) -> ClusterObservation:
    o = pickle.loads(b)
    assert isinstance(o, ClusterObservation)
    return o


# --- configs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyDelta:
    """One proxy's change as the config service receives it."""

    proxy_id: str
    delta: ConfigDelta
    template: ProxyConfig      # the proxy's header fields (for a full state)
    remove: bool = False       # the proxy is no longer rendered: forget it


# the reconciler's own cache of encoded changes (the config service's distributor has its own)
_SEGMENTS = SegmentCache()


def encode_config_deltas(changes: Iterable[tuple[ProxyConfig | None, ProxyConfig]]) -> bytes:
    """(what the receiver has, what it should have) per proxy -> one blob of deltas. Encoded like
    a push (`distributor.encode_change`): proxies with the same view transition share one diff
    and one encode of it (after a commit every Service is a new object, and a diff per proxy
    compared every one of them by value). Endpoints travel as tables (`ENDPOINT_TABLES`): both
    ends are this code."""
    msgs: list[bytes] = []
    for old, new in changes:
        old_c = content_of(old) if old is not None else None
        msgs.append(encode_change(old, new, "", kind_segments(_SEGMENTS, old_c, content_of(new), tables=True)))
    return pack(msgs)


def encode_removals(proxy_ids: Iterable[str], known: Mapping[str, ProxyConfig]) -> bytes:
    """One removal per proxy (an empty full state with nonce `REMOVE_NONCE`): the service forgets it."""
    msgs = []
    for pid in proxy_ids:
        cfg = known.get(pid)
        header = header_to_pb(cfg) if cfg is not None else pb.ProxyHeader(proxy_id=pid)
        msgs.append(pb.ConfigResponse(nonce=REMOVE_NONCE, base_version=0, proxy=header).SerializeToString())
    return pack(msgs)


class _ResourceIntern:
    """Decoded resources by (kind, body): one object per distinct body, so that the proxies sharing
    a view share its objects on the receiving side too. Bounded: cleared when full (a miss only
    costs a parse). Only our own reconciler's bodies come here, never a proxy's."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._d: dict[tuple[str, bytes], Any] = {}
        self.hits = self.misses = 0

    def get(self, kind: str, key: str, body: bytes) -> Any:
        hit = self._d.get((kind, body))
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        if kind not in RESOURCE_TYPES:
            raise ValueError(f"config delta for an unknown resource type {kind!r} ({key}): reconciler and config "
                             "service run different versions")
        good, bad = parse_resources(kind, [json.loads(body)])
        if bad:
            raise ValueError(f"config delta with a resource that does not parse: {bad[0]}")
        if len(self._d) >= self.max_entries:
            self._d.clear()
        self._d[(kind, body)] = good[0]
        return good[0]


_INTERN = _ResourceIntern()


@dataclass(frozen=True, slots=True)
class ShardConfigs:
    """What a config shard receives: proxies' configs in full, and proxies to forget."""

    configs: Mapping[str, ProxyConfig]
    removed: tuple[str, ...] = ()
    full: bool = False         # `configs` are all the shard's proxies (any other one is forgotten)


def encode_shard_configs(configs: Mapping[str, ProxyConfig], removed: Iterable[str] = (), full: bool = False) -> bytes:
    """Configs for a config shard, in full, as one pickle: pickle's memo writes every object once
    however many configs share it, so N proxies with the same view cost one copy of the view plus
    N small tuples of references. Per-proxy protobuf deltas copy every body into every proxy's
    message: a full state to 10,000 proxies with 220 services each was ~10 GB of blob. Between our
    own processes only (same code, same trust), never for input from a network peer. `full`: the
    complete set of the shard's proxies (after a restart a shard takes nothing else)."""
    return pickle.dumps(ShardConfigs(dict(configs), tuple(removed), full), protocol=pickle.HIGHEST_PROTOCOL)


def decode_shard_configs(blob: bytes) -> ShardConfigs:
    got = pickle.loads(blob)
    if not isinstance(got, ShardConfigs) or not all(isinstance(c, ProxyConfig) for c in got.configs.values()):
        raise ValueError(f"not a config shard message ({type(got).__name__}): reconciler and shard run "
                         "different versions")
    return got


def decode_config_deltas(blob: bytes) -> list[ProxyDelta]:
    out = []
    for raw in unpack(blob):
        msg = pb.ConfigResponse.FromString(raw)
        bodies = [(r.type, r.key, r.body) for r in msg.upserts]
        msg.ClearField("upserts")   # the codec decodes the rest (stamp, base, removals, identities, header)
        dec = decode_delta([msg])
        upserts: dict[str, list[Any]] = {kind: [] for kind in RESOURCE_TYPES}
        for kind, key, body in bodies:
            upserts.setdefault(kind, []).append(_INTERN.get(kind, key, body))
        delta = replace(dec.delta, upserts={kind: tuple(items) for kind, items in upserts.items()})
        remove = delta.base_version == 0 and not bodies and msg.nonce == REMOVE_NONCE
        out.append(ProxyDelta(delta.proxy_id, delta, template_from_header(dec.header), remove))
    return out


# --- health reports ---------------------------------------------------------------------------------


def decode_health_report(blob: bytes) -> list[EndpointReport]:
    report = pb.HealthReport.FromString(blob)
    return [EndpointReport(o.service, o.workload_uid, o.cluster, int(o.ok), int(o.failed), bool(o.ejected))
            for o in report.outcomes]


# --- documents ------------------------------------------------------------------------------------


def encode_json(doc: Any) -> bytes:
    return json.dumps(doc, default=str).encode()


def decode_json(b: bytes) -> Any:
    return json.loads(b)
