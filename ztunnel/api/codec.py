"""The config protocol's codec: a `ConfigDelta` <-> protobuf `ConfigResponse` chunks.

Shared by both ends (the controller encodes, proxies decode), so it lives in the contract. Each
resource travels as its JSON form (`ztunnel.api.config.resource_to_dict`), the same form as
standalone config files, except that a proxy which announced `ENDPOINT_TABLES` in its hello gets
the endpoints of a service (or an inference pool) as one table instead of an object each
(`resource_body(r, tables=True)`); the decoder reads both forms. A delta larger than
`max_message_bytes` is split into chunks that share one nonce; a single resource larger than the
limit is refused with `OversizeError` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ztunnel.api.config import (
    RESOURCE_TYPES,
    TABLED_TYPES,
    ConfigDelta,
    ProxyConfig,
    ProxyMode,
    Stamp,
    parse_resources,
    resource_to_dict,
)
from ztunnel.api.proto import meshfed_pb2 as pb

CONFIG_METHOD = "/meshfed.v1alpha1.ConfigDiscovery/StreamConfig"
CERT_METHOD = "/meshfed.v1alpha1.CertificateAuthority/SignCertificate"
HEALTH_METHOD = "/meshfed.v1alpha1.HealthReporting/ReportHealth"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's default receive limit
PROXY_ID_METADATA = "x-meshfed-proxy-id"      # insecure (loopback test) mode only
# Trailing metadata on a stream the controller ends on purpose, naming why: the proxy reconnects
# and logs it as routine, not as a controller lost (a rotation every certificate lifetime must not
# page anyone).
STREAM_END_METADATA = "x-meshfed-stream-end"
STREAM_END_CERTIFICATE_EXPIRED = "certificate-expired"
PLANNED_STREAM_ENDS = frozenset({STREAM_END_CERTIFICATE_EXPIRED})   # any other value: not planned
_CHUNK_OVERHEAD_BYTES = 4096                  # header, stamp, nonce, identities
CHUNK_OVERHEAD_BYTES = _CHUNK_OVERHEAD_BYTES  # what a message keeps free of resources


class OversizeError(ValueError):
    """One resource is larger than a whole message may be; splitting cannot help."""


# --- codec ------------------------------------------------------------------------------------


def stamp_to_pb(s: Stamp | None) -> Any:
    return pb.Stamp() if s is None else pb.Stamp(epoch=s.epoch, revision=s.revision, version=s.version)


def stamp_from_pb(m: Any) -> Stamp | None:
    if m is None or (m.epoch == 0 and m.version == 0 and not m.revision):
        return None
    return Stamp(int(m.epoch), str(m.revision), int(m.version))


def header_to_pb(cfg: ProxyConfig) -> Any:
    return pb.ProxyHeader(proxy_id=cfg.proxy_id, mode=cfg.mode.value, cluster=cfg.cluster,
                          network=cfg.network, trust_domain=cfg.trust_domain)


def template_from_header(h: Any) -> ProxyConfig:
    """An empty config carrying a proxy's header fields (what a full-state delta applies onto)."""
    return ProxyConfig(proxy_id=h.proxy_id, mode=ProxyMode(h.mode or "node"), cluster=h.cluster,
                       network=h.network, trust_domain=h.trust_domain, stamp=Stamp(0, "", 0))


class _BodyCache:
    """JSON bodies of resources by object identity. Renderers share resource objects between
    proxies (one Service view per locality), so a push to N proxies encodes each resource once.
    Entries hold the resource itself, so an id is never reused while its entry lives."""

    def __init__(self, max_entries: int = 200_000, tables: bool = False, max_bytes: int = 64 << 20) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.tables = tables
        self._d: dict[int, tuple[Any, bytes]] = {}
        self._bytes = 0

    def body(self, r: Any) -> bytes:
        hit = self._d.get(id(r))
        if hit is not None and hit[0] is r:
            return hit[1]
        body = json.dumps(resource_to_dict(r, self.tables), separators=(",", ":")).encode()
        # bounded by bytes too: services of 1,000s of endpoints, replaced on every commit, would
        # otherwise fill 200k entries with bodies of the revisions before
        if len(self._d) >= self.max_entries or self._bytes + len(body) > self.max_bytes:
            self._d.clear()
            self._bytes = 0
        self._d[id(r)] = (r, body)
        self._bytes += len(body)
        return body


_BODIES = _BodyCache()
_TABLE_BODIES = _BodyCache(tables=True)


def resource_body(r: Any, tables: bool = False) -> bytes:
    """The JSON body of a resource on the wire (cached by object identity, see `_BodyCache`);
    `tables`: for a reader that announced `ENDPOINT_TABLES` (only resources with endpoints differ)."""
    return (_TABLE_BODIES if tables and type(r) in TABLED_TYPES else _BODIES).body(r)


def encode_delta(delta: ConfigDelta, header: ProxyConfig, nonce: str,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tables: bool = False) -> list[Any]:
    """Split a delta into as few `ConfigResponse` messages as fit `max_message_bytes` each
    (`tables`: see `resource_body`)."""
    budget = max_message_bytes - _CHUNK_OVERHEAD_BYTES
    items: list[tuple[int, Any, bool]] = []  # (size, message, is_upsert)
    for kind in RESOURCE_TYPES:
        for r in delta.upserts.get(kind, ()):
            body = resource_body(r, tables)
            msg = pb.Resource(type=kind, key=r.key, body=body)
            size = len(body) + len(r.key) + 16
            if size > budget:
                raise OversizeError(
                    f"{kind} {r.key} of proxy {delta.proxy_id} is {size / 1048576:.1f} MiB, over the "
                    f"{max_message_bytes / 1048576:.1f} MiB message limit; raise the controller's "
                    f"--max-message-bytes (and the proxy's) or split the service")
            items.append((size, msg, True))
        for key in delta.removals.get(kind, ()):
            items.append((len(key) + 16, pb.RemovedResource(type=kind, key=key), False))
    chunks: list[list[tuple[int, Any, bool]]] = [[]]
    used = 0
    for item in items:
        if chunks[-1] and used + item[0] > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(item)
        used += item[0]
    out = []
    for i, chunk in enumerate(chunks):
        m = pb.ConfigResponse(stamp=stamp_to_pb(delta.stamp), base_version=delta.base_version, nonce=nonce,
                              chunk=i, chunks=len(chunks), proxy=header_to_pb(header))
        m.upserts.extend(x[1] for x in chunk if x[2])
        m.removals.extend(x[1] for x in chunk if not x[2])
        if i == 0 and delta.local_identities is not None:
            m.identities_set = True
            m.local_identities.extend(delta.local_identities)
        out.append(m)
    return out


@dataclass
class DecodedDelta:
    delta: ConfigDelta
    header: Any
    rejected: list[str] = field(default_factory=list)  # "<type>/<key>: reason"


def decode_delta(chunks: Sequence[Any]) -> DecodedDelta:
    """Join the chunks of one nonce into a ConfigDelta; resources that do not parse are listed."""
    first = chunks[0]
    stamp = stamp_from_pb(first.stamp) or Stamp(0, "", 0)
    raw: dict[str, list[Any]] = {k: [] for k in RESOURCE_TYPES}
    removals: dict[str, list[str]] = {k: [] for k in RESOURCE_TYPES}
    rejected: list[str] = []
    identities: tuple[str, ...] | None = None
    for c in chunks:
        if c.identities_set:
            identities = tuple(c.local_identities)
        for r in c.upserts:
            if r.type not in RESOURCE_TYPES:
                rejected.append(f"{r.type}/{r.key}: unknown resource type")
                continue
            try:
                raw[r.type].append(json.loads(r.body))
            except (ValueError, RecursionError) as e:   # RecursionError: nested deeper than the parser goes
                rejected.append(f"{r.type}/{r.key}: body is not JSON ({e})")
        for rm in c.removals:
            if rm.type in removals:
                removals[rm.type].append(rm.key)
    upserts: dict[str, tuple[Any, ...]] = {}
    for kind, items in raw.items():
        good, bad = parse_resources(kind, items)
        upserts[kind] = tuple(good)
        rejected.extend(f"{kind}/{e.key}: {e.reason}" for e in bad)
    delta = ConfigDelta(proxy_id=first.proxy.proxy_id, stamp=stamp, base_version=int(first.base_version),
                        upserts=upserts, removals={k: tuple(v) for k, v in removals.items()},
                        local_identities=identities)
    return DecodedDelta(delta, first.proxy, rejected)
