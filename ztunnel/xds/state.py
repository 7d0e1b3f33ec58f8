"""The proxy's config state: validate per resource, apply, index, persist the last good config.

Decide, then act: `validate_config` is pure (a config in; the clean config and the rejected
resources out). `ProxyState.apply` keeps the last applied config and its lookup indexes, and
writes it to disk atomically (temp file + rename, 0600) so that a restart with the controller
absent serves from it (`ProxyState.load_persisted`).

Rules (ztunnel's `state.rs` updater, Flux's lastApplied vs lastAttempted):
- a bad resource rejects itself, never the batch: it is left out and reported (NACK detail);
- a config whose stamp is not newer than the applied one is refused whole (never go back);
- a config whose header is unusable (no trust domain) is refused whole and the previous one stays.
"""

from __future__ import annotations

import io
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from ztunnel.api.bundle import load_pem_certificates
from ztunnel.api.config import (
    RESOURCE_TYPES,
    Authorization,
    Endpoint,
    ProxyConfig,
    ProxyMode,
    ResourceError,
    Service,
    TrustBundle,
    Workload,
    eager_object_hook,
    proxy_config_from_dict,
    proxy_config_to_dict,
    resource_to_dict,
)
from ztunnel.api.identity import IdentityError, ProxyId, SpiffeId, check_trust_domain
from ztunnel.api.secret_files import make_private_dir, secret_writer


def parse_host_port(text: str) -> tuple[str, int]:
    """"ip:port", "[v6]:port" or "hostname:port" → (host, port); ValueError with the fix otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port (e.g. '10.0.0.5:15008')")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port {port} is outside 1..65535")
    return host, port


def _check_ip(text: str, what: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IP address") from None


def _check_workload(w: Workload) -> None:
    _check_ip(w.address, "address")
    SpiffeId.parse(w.identity)
    if w.node_address:
        _check_ip(w.node_address, "node_address")


def _check_endpoint(e: Endpoint) -> None:
    if not 0 < e.port < 65536:
        raise ValueError(f"endpoint {e.workload_uid}: port {e.port} is outside 1..65535")
    if not e.hbone_address and not e.gateway:
        raise ValueError(f"endpoint {e.workload_uid}: needs hbone_address (same network) or gateway (remote)")
    if e.hbone_address:
        _check_ip(parse_host_port(e.hbone_address)[0], f"endpoint {e.workload_uid} hbone_address")
        _check_ip(e.address, f"endpoint {e.workload_uid} address")
    if e.gateway:
        parse_host_port(e.gateway)
    if e.identity:
        SpiffeId.parse(e.identity)
    if e.tier < 0 or e.weight < 0:
        raise ValueError(f"endpoint {e.workload_uid}: tier and weight must be >= 0")


def _check_service(s: Service) -> None:
    if s.vip:
        _check_ip(s.vip, "vip")
    if not s.ports:
        raise ValueError("service has no ports")
    for p in s.ports:
        if not (0 < p.port < 65536 and 0 < p.target_port < 65536):
            raise ValueError(f"port mapping {p.port}->{p.target_port} is outside 1..65535")
    for e in s.endpoints:
        _check_endpoint(e)
    for san in s.subject_alt_names:
        SpiffeId.parse(san)
    if s.connect_timeout_s <= 0:
        raise ValueError(f"connect_timeout_s {s.connect_timeout_s} must be > 0")


def _check_authorization(a: Authorization) -> None:
    if a.action not in ("ALLOW", "DENY"):
        raise ValueError(f"action {a.action!r} is not ALLOW or DENY (AUDIT/CUSTOM are not supported at L4)")
    for r in a.rules:
        for port in (*r.ports, *r.not_ports):
            if not 0 < port < 65536:
                raise ValueError(f"rule port {port} is outside 1..65535")


def _check_bundle(b: TrustBundle) -> None:
    check_trust_domain(b.trust_domain)
    if not b.roots_pem:
        raise ValueError("bundle has no roots; an empty bundle would reject every peer of this trust domain")
    for pem in b.roots_pem:
        if not load_pem_certificates(pem):
            raise ValueError("roots_pem holds no PEM certificate")


_CHECKS: dict[str, Any] = {
    "workloads": _check_workload,
    "services": _check_service,
    "authorizations": _check_authorization,
    "bundles": _check_bundle,
}


def validate_config(cfg: ProxyConfig) -> tuple[ProxyConfig, list[ResourceError]]:
    """Semantic per-resource validation: returns the config without the bad resources, and them."""
    errors: list[ResourceError] = []
    kept: dict[str, tuple[Any, ...]] = {}
    for kind, check in _CHECKS.items():
        good = []
        for r in getattr(cfg, kind):
            try:
                check(r)
            except (ValueError, TypeError, IdentityError) as e:   # TypeError: a null where a number belongs
                errors.append(ResourceError(kind, r.key, str(e)))
            else:
                good.append(r)
        kept[kind] = tuple(good)
    return replace(cfg, **kept), errors  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: bool
    reason: str
    rejected: tuple[ResourceError, ...] = ()


@dataclass(slots=True)
class Indexes:
    """Lookups the proxies do per connection, rebuilt on every apply.

    An IP address names a workload only within a network: clusters on different networks may use
    the same pod CIDRs (kind gives every cluster 10.244.0.0/16), as in Istio multi-network. So the
    address-keyed tables hold only what this proxy can reach by address — the workloads and
    endpoints of its own network (and its own node's pods) — and an endpoint is matched to a local
    workload by its uid, never by its address."""

    network: str = ""
    services_by_vip: dict[tuple[str, int], Service] = field(default_factory=dict)
    services_by_host: dict[str, Service] = field(default_factory=dict)
    workloads_by_address: dict[str, Workload] = field(default_factory=dict)   # this network's
    local_workloads_by_address: dict[str, Workload] = field(default_factory=dict)
    local_workloads_by_uid: dict[str, Workload] = field(default_factory=dict)
    workloads_by_uid: dict[str, Workload] = field(default_factory=dict)
    # first workload presenting an identity (source labels of inbound connections)
    workloads_by_identity: dict[str, Workload] = field(default_factory=dict)
    # hostname of the first service a *local* workload is an endpoint of (destination_service label)
    service_of_local_workload: dict[str, str] = field(default_factory=dict)
    services: tuple[Service, ...] = ()
    # identities of the waypoints that local workloads' services go through: the peers whose
    # `x-meshfed-caller` a destination ztunnel believes (ztunnel.proxy.node.caller_identity)
    trusted_waypoints: frozenset[str] = frozenset()
    # pod IP -> an endpoint of this network with an HBONE address (dialing a pod IP directly); built
    # on first use, so a node that never dials pod IPs pays no memory per remote endpoint for it
    _endpoints_by_address: dict[str, Endpoint] | None = None

    def find_endpoint_by_address(self, address: str) -> Endpoint | None:
        table = self._endpoints_by_address
        if table is None:
            table = self._endpoints_by_address = {}
            for s in self.services:
                for e in s.endpoints:
                    if e.address and e.hbone_address and e.network == self.network:
                        table.setdefault(e.address, e)
        return table.get(address)

    def local_endpoints(self, svc: Service) -> list[tuple[Workload, Endpoint]]:
        """The endpoints of `svc` that are pods on this node (by workload uid)."""
        local = self.local_workloads_by_uid
        return [(local[e.workload_uid], e) for e in svc.endpoints if e.workload_uid in local]


def node_name(cfg: ProxyConfig) -> str:
    """`ztunnel/<cluster>/<node>` → `<node>`; "" for a gateway (it runs on no node of ours).
    IdentityError for a malformed id (`ProxyId.parse`, the one reader of proxy ids)."""
    return ProxyId.parse(cfg.proxy_id).node


def build_indexes(cfg: ProxyConfig) -> Indexes:
    ix = Indexes(network=cfg.network)
    waypoints: set[str] = set()
    node = node_name(cfg)
    for w in cfg.workloads:
        local = cfg.mode is ProxyMode.NODE and w.cluster == cfg.cluster and w.node == node
        if local or w.network == cfg.network:
            ix.workloads_by_address[w.address] = w
        ix.workloads_by_uid[w.uid] = w
        ix.workloads_by_identity.setdefault(w.identity, w)
        if local:
            ix.local_workloads_by_address[w.address] = w
            ix.local_workloads_by_uid[w.uid] = w
    for s in cfg.services:
        ix.services_by_host[s.hostname] = s
        if s.vip:
            for p in s.ports:
                ix.services_by_vip[(s.vip, p.port)] = s
        if ix.local_workloads_by_uid:
            for _, e in ix.local_endpoints(s):
                ix.service_of_local_workload.setdefault(e.workload_uid, s.hostname)
                if s.waypoint is not None:
                    waypoints.update(s.waypoint.identities)
    ix.services = cfg.services
    ix.trusted_waypoints = frozenset(waypoints)
    return ix


class ProxyState:
    """The applied config, its indexes, and where it is persisted (None: not persisted)."""

    def __init__(self, persist_path: Path | None = None) -> None:
        self.persist_path = persist_path
        self.config: ProxyConfig | None = None
        self.indexes = Indexes()
        self.last_rejected: tuple[ResourceError, ...] = ()
        self.last_attempted_version: int | None = None

    def apply(self, cfg: ProxyConfig, parse_errors: tuple[ResourceError, ...] = ()) -> ApplyResult:
        self.last_attempted_version = cfg.stamp.version
        if self.config is not None and not cfg.stamp.newer_than(self.config.stamp):
            return ApplyResult(False, f"stamp {cfg.stamp} is not newer than applied {self.config.stamp}; ignored")
        try:
            check_trust_domain(cfg.trust_domain)
            for td in cfg.federated_trust_domains:
                check_trust_domain(td)
        except IdentityError as e:
            return ApplyResult(False, f"config header unusable, kept the previous config: {e}")
        clean, errors = validate_config(cfg)
        rejected = (*parse_errors, *errors)
        self.config = clean
        self.indexes = build_indexes(clean)
        self.last_rejected = rejected
        self._persist(clean)
        return ApplyResult(True, f"applied version {cfg.stamp.version}", rejected)

    def apply_dict(self, data: Mapping[str, Any]) -> ApplyResult:
        try:
            cfg, errors = proxy_config_from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            return ApplyResult(False, f"config header unusable, kept the previous config: {e!r}")
        return self.apply(cfg, tuple(errors))

    def load_persisted(self) -> ApplyResult | None:
        """At restart: apply the last good config from disk (None when there is none)."""
        if self.persist_path is None or not self.persist_path.exists():
            return None
        try:
            data = json.loads(self.persist_path.read_text(), object_hook=eager_object_hook)
        except (OSError, ValueError) as e:
            return ApplyResult(False, f"persisted config {self.persist_path} unreadable ({e}); waiting for the controller")
        return self.apply_dict(data)

    def _persist(self, cfg: ProxyConfig) -> None:
        if self.persist_path is None:
            return
        make_private_dir(self.persist_path.parent)
        with secret_writer(self.persist_path) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8")
            write_config_json(cfg, text)
            text.flush()
            text.detach()  # the writer owns `raw`: it fsyncs and renames it into place


def write_config_json(cfg: ProxyConfig, f: TextIO) -> None:
    """`proxy_config_to_dict(cfg)` as JSON, written one resource at a time: a config with tens of
    thousands of endpoints never exists twice in memory as dicts (transient peaks fragment the heap,
    and a proxy's RSS stays at its peak)."""
    empty: dict[str, Any] = {kind: () for kind in RESOURCE_TYPES}
    header = proxy_config_to_dict(replace(cfg, **empty))
    f.write(json.dumps({k: v for k, v in header.items() if k not in RESOURCE_TYPES})[:-1])
    for kind in RESOURCE_TYPES:
        f.write(f', "{kind}": [')
        for i, r in enumerate(getattr(cfg, kind)):
            if i:
                f.write(", ")
            f.write(json.dumps(resource_to_dict(r)))
        f.write("]")
    f.write("}")


def load_config_file(path: Path) -> dict[str, Any]:
    """A ProxyConfig file: JSON, or YAML (by suffix)."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        from ruamel.yaml import YAML

        data = YAML(typ="safe").load(text)
    else:
        data = json.loads(text, object_hook=eager_object_hook)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a ProxyConfig file holds one object")
    return data
