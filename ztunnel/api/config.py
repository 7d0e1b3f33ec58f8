"""ProxyConfig: everything one ztunnel (node mode) or east-west gateway needs. The contract between
the federation controller (which renders it) and the data plane (which applies it).

Modelled on Istio's workload API (istio.workload.Workload / Service / Authorization): resources
are addressed by a stable key, so a config can travel whole (standalone file, full resync) or as
a delta (`ConfigDelta`: upserts and removals by key) stamped `(epoch, revision, version)`.

Pure data, no I/O: `to_dict`/`from_dict` give the JSON form used in files and on the wire.
`from_dict` validates each resource on its own so that a bad resource rejects itself and the rest
applies (ztunnel's per-resource rejection): see `parse_resources`.

Invariants:
- `version` increases by one for every config a controller epoch sends to a proxy;
- a proxy applies `(epoch, version)` only if it is greater than what it has (lexicographic);
- endpoint `tier` 0 is the most preferred; tiers are dense from 0 within a service view.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any


class ProxyMode(str, Enum):
    NODE = "node"          # per-node ztunnel: L4, HBONE
    GATEWAY = "gateway"    # east-west gateway: double HBONE, never sees plaintext
    WAYPOINT = "waypoint"  # per-namespace (or per-service) L7 proxy: HBONE in, HTTP routing, HBONE out
    INGRESS = "ingress"    # a Gateway API Gateway's HTTP listeners: plain HTTP in, the same L7 engine


@dataclass(frozen=True, slots=True)
class Stamp:
    """Which controller epoch, which Git revision and which per-proxy version produced a config."""

    epoch: int
    revision: str
    version: int

    def newer_than(self, other: Stamp | None) -> bool:
        return other is None or (self.epoch, self.version) > (other.epoch, other.version)


@dataclass(frozen=True, slots=True)
class Workload:
    """A pod (or the gateway itself). `uid` = "<cluster>/<namespace>/<pod name>"."""

    uid: str
    name: str
    namespace: str
    cluster: str
    network: str
    node: str
    address: str            # pod IP
    identity: str           # spiffe://<td>/ns/<ns>/sa/<sa>
    service_account: str
    region: str = ""
    zone: str = ""
    node_address: str = ""  # the node ztunnel's HBONE address (same network); "" if remote
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.uid


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """The data plane's copy of a DestinationRule's outlierDetection (see gitops.model)."""

    consecutive_5xx_errors: int | None = 5
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool = False
    interval_s: float = 10.0
    base_ejection_time_s: float = 30.0
    max_ejection_time_s: float = 300.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend of a service as seen from this proxy.

    Same network: dial `address:port` through HBONE to the node at `hbone_address`.
    Other network: `gateway` is the east-west gateway "ip:15008"; the inner tunnel's authority is
    `<service hostname>:<port>` and the gateway picks the pod (double HBONE). The outer tunnel is
    verified against `gateway_identity` (the gateway's SPIFFE ID in its cluster's trust domain),
    the inner one against `identity`: a proxy refuses an endpoint that names neither it needs.
    """

    workload_uid: str
    cluster: str
    network: str
    address: str         # pod IP ("" when only reachable through a gateway by hostname)
    port: int            # target port on the pod
    hbone_address: str   # "ip:15008" of the destination node ztunnel ("" when via gateway)
    gateway: str = ""    # "ip:15008" of the destination network's east-west gateway
    identity: str = ""
    tier: int = 0
    weight: int = 1
    healthy: bool = True  # the controller's global view (aggregated ejections, partitions)
    region: str = ""
    zone: str = ""
    gateway_identity: str = ""  # who must answer at `gateway` (spiffe://<td>/ns/meshfed-system/sa/eastwest-gateway)


@dataclass(frozen=True, slots=True)
class ServicePortMap:
    port: int
    target_port: int
    app_protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class WeightedBackend:
    """Gateway API backendRef weights: a fraction of the service's traffic goes to `hostname`."""

    hostname: str
    weight: int


@dataclass(frozen=True, slots=True)
class ConnectionPoolPolicy:
    """DestinationRule trafficPolicy.connectionPool (Istio names; None = Istio's default, unlimited).

    `max_connections` caps the connections one proxy holds to the service's backends at once (a
    node ztunnel: its open outbound connections to the service; a waypoint or ingress: its upstream
    HTTP/1.1 connections); `http1_max_pending_requests` caps the requests an L7 proxy queues waiting
    for one of them; `max_requests_per_connection` closes an upstream connection after that many
    requests (0 or None: no limit)."""

    max_connections: int | None = None
    http1_max_pending_requests: int | None = None
    max_requests_per_connection: int | None = None


@dataclass(frozen=True, slots=True)
class WaypointRef:
    """The waypoint a service's traffic must go through (`istio.io/use-waypoint`).

    `addresses` are the HBONE addresses ("ip:15008") of the waypoint's ready pods in the viewing
    proxy's own cluster (empty: none is ready there, and the node proxy refuses rather than skip the
    L7 policy); `identity` is what they present there. `identities` lists the waypoint's identities
    in every cluster: a destination ztunnel takes the caller identity a waypoint forwards
    (`x-meshfed-caller`) only from one of these."""

    name: str
    namespace: str
    identity: str
    addresses: tuple[str, ...] = ()
    identities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Service:
    hostname: str                     # <name>.<ns>.svc.clusterset.local
    namespace: str
    name: str
    vip: str                          # virtual IP the app dials; "" when only reachable by name
    ports: tuple[ServicePortMap, ...]
    endpoints: tuple[Endpoint, ...]
    subject_alt_names: tuple[str, ...] = ()  # identities a backend may present
    outlier: OutlierPolicy | None = None
    connect_timeout_s: float = 1.0
    routes: tuple[WeightedBackend, ...] = ()  # non-empty: split to these services by weight
    policy_source: str = ""           # "policies/shop/checkout.yaml@<sha>" for explainability
    waypoint: WaypointRef | None = None         # L7: node proxies send this service's traffic there
    connection_pool: ConnectionPoolPolicy | None = None

    @property
    def key(self) -> str:
        return self.hostname


@dataclass(frozen=True, slots=True)
class AuthzCondition:
    """`when: [{key: request.headers[x-user], values: [...], notValues: [...]}]` (Istio)."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzMatch:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    # request-level (L7) fields: only a waypoint or an ingress gateway sees them (ztunnel.api.authz)
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    when: tuple[AuthzCondition, ...] = ()

    @property
    def request_level(self) -> bool:
        return bool(self.methods or self.not_methods or self.paths or self.not_paths or self.hosts
                    or self.not_hosts or self.when)


@dataclass(frozen=True, slots=True)
class Authorization:
    """An AuthorizationPolicy scoped to a namespace: by workload labels (`selector`, enforced by the
    destination's ztunnel) or by `targets` ("Service/<ns>/<name>" or "Gateway/<ns>/<name>",
    Istio ambient's targetRefs: enforced by the waypoint or ingress gateway that serves them)."""

    name: str
    namespace: str
    action: str  # "ALLOW" | "DENY"
    rules: tuple[AuthzMatch, ...]
    selector: Mapping[str, str] = field(default_factory=dict)
    targets: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- L7: routes, listeners, inference pools (waypoint and ingress proxies only) -------------------


@dataclass(frozen=True, slots=True)
class StringMatch:
    """A Gateway API match value: `Exact`, `PathPrefix` (paths), `RegularExpression` (full match)."""

    kind: str
    value: str


@dataclass(frozen=True, slots=True)
class NamedMatch:
    """A header or query-parameter match (`name` is lower-cased for headers)."""

    name: str
    value: str
    kind: str = "Exact"


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """One `matches[]` entry: every field it sets must match (empty = any)."""

    path: StringMatch | None = None
    headers: tuple[NamedMatch, ...] = ()
    query: tuple[NamedMatch, ...] = ()
    method: str = ""


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    """RequestHeaderModifier / ResponseHeaderModifier: set (replace), add (append), remove."""

    set: tuple[Header, ...] = ()
    add: tuple[Header, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UrlRewrite:
    """URLRewrite: `hostname` replaces Host; `path_kind` ReplaceFullPath | ReplacePrefixMatch."""

    hostname: str = ""
    path_kind: str = ""
    path: str = ""


@dataclass(frozen=True, slots=True)
class HttpBackend:
    """A backendRef: `kind` Service (`target` = its hostname) or InferencePool (`target` = ns/name)."""

    kind: str
    target: str
    port: int
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Istio's retry semantics for a route rule (see ztunnel.proxy.l7.retry): up to `attempts`
    retries on connect failure, reset before the response, or a status in `codes`, each on another
    host when there is one, after an exponential backoff from `backoff_s` (jittered)."""

    attempts: int = 2
    codes: tuple[int, ...] = (503,)
    backoff_s: float = 0.025


@dataclass(frozen=True, slots=True)
class HttpRouteRule:
    name: str = ""
    matches: tuple[HttpMatch, ...] = ()
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    rewrite: UrlRewrite | None = None
    backends: tuple[HttpBackend, ...] = ()
    timeout_s: float | None = None          # timeouts.request: the whole request, retries included
    backend_timeout_s: float | None = None  # timeouts.backendRequest: one try
    retry: RetryPolicy | None = None        # None: Istio's default (RetryPolicy())


@dataclass(frozen=True, slots=True)
class HttpRoute:
    """An HTTPRoute (or GRPCRoute, as HTTP matches on POST /<service>/<method>) as an L7 proxy
    applies it. `parents`: "Service/<hostname>:<port>" (GAMMA; port 0 = every port) or
    "Gateway/<ns>/<name>/<listener>" (listener "" = every listener). `hostnames` apply to Gateway
    parents (empty: any host)."""

    namespace: str
    name: str
    kind: str
    parents: tuple[str, ...]
    rules: tuple[HttpRouteRule, ...]
    hostnames: tuple[str, ...] = ()
    source: str = ""          # "policies/shop/route.yaml@<sha>"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Listener:
    """One HTTP listener of an ingress Gateway."""

    gateway: str      # <ns>/<name>
    name: str
    port: int
    protocol: str = "HTTP"
    hostname: str = ""

    @property
    def key(self) -> str:
        return f"{self.gateway}/{self.name}"


@dataclass(frozen=True, slots=True)
class InferencePool:
    """Gateway API Inference Extension v1 InferencePool, resolved for one L7 proxy: the selected
    pods of its own cluster (`endpoints`, port = the first target port), and how the endpoint
    picker behaves when it cannot decide (`failure_mode`: FailOpen picks any ready pod, FailClose
    answers 503)."""

    namespace: str
    name: str
    target_ports: tuple[int, ...]
    endpoints: tuple[Endpoint, ...] = ()
    picker: str = ""            # endpointPickerRef.name (meshfed serves it with its built-in picker)
    failure_mode: str = "FailClose"
    metrics_path: str = "/metrics"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """PEM roots of one trust domain, as published in its SPIFFE bundle."""

    trust_domain: str
    roots_pem: tuple[str, ...]
    sequence: int = 0

    @property
    def key(self) -> str:
        return self.trust_domain


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    proxy_id: str               # "ztunnel/<cluster>/<node>", "gateway/<cluster>", "waypoint|ingress/<cluster>/<ns>/<name>"
    mode: ProxyMode
    cluster: str
    network: str
    trust_domain: str
    stamp: Stamp
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    authorizations: tuple[Authorization, ...] = ()
    bundles: tuple[TrustBundle, ...] = ()
    # identities this proxy may present (node: workloads scheduled on it; gateway: its own)
    local_identities: tuple[str, ...] = ()
    # the other trust domains `trust_domain` federates with (its federatesWith). Empty: every trust
    # domain whose bundle is in `bundles` is accepted (the controller sends only trusted bundles);
    # non-empty: a peer of a trust domain outside it (and not the local one) is refused even when its
    # bundle is present (`not_federated`).
    federated_trust_domains: tuple[str, ...] = ()
    # L7 proxies only (waypoint, ingress)
    http_routes: tuple[HttpRoute, ...] = ()
    listeners: tuple[Listener, ...] = ()
    inference_pools: tuple[InferencePool, ...] = ()


# --- JSON form ---------------------------------------------------------------------------------

RESOURCE_TYPES: dict[str, type[Any]] = {
    "workloads": Workload,
    "services": Service,
    "authorizations": Authorization,
    "bundles": TrustBundle,
    "http_routes": HttpRoute,
    "listeners": Listener,
    "inference_pools": InferencePool,
}
# Kinds only L7 proxies carry: left out of a config's JSON form while empty, so a node proxy's or a
# gateway's config (and the golden files that pin them) reads as before L7 existed.
L7_RESOURCE_TYPES = ("http_routes", "listeners", "inference_pools")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {}


def _field_names(cls: type[Any]) -> tuple[str, ...] | None:
    """A dataclass's field names in declaration order (None: not a dataclass), computed once."""
    names = _FIELD_NAMES.get(cls)
    if names is None and hasattr(cls, "__dataclass_fields__"):
        from dataclasses import fields

        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _plain(value: Any, tables: bool = False) -> Any:
    """`_jsonable(asdict(value))` without asdict's deep copies (and mapping proxies, which asdict
    cannot copy, become plain dicts): the JSON form of a resource, 5-10x faster. `tables`: the
    fields of `_TABLED` take their table form (see `ENDPOINT_TABLES`)."""
    names = _field_names(type(value))
    if names is not None:
        if type(value) in _FLAT:  # scalar fields only: no recursion (100k endpoints in a full state)
            return {n: getattr(value, n) for n in names}
        tabled = _TABLED.get(type(value), ()) if tables else ()
        return {n: _table(getattr(value, n)) if n in tabled else _plain(getattr(value, n), tables) for n in names}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value.value if isinstance(value, Enum) else value
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, tables) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, tables) for v in value]
    return value


def resource_to_dict(resource: Any, tables: bool = False) -> dict[str, Any]:
    """The JSON form of a resource. `tables=True` gives the wire form for a reader that announced
    `ENDPOINT_TABLES`; files, and readers that did not announce it, get one object per endpoint."""
    return _plain(resource, tables)  # type: ignore[no-any-return]


# The table form of a tuple of endpoints, a feature a proxy announces in its hello (`features` of
# ConfigRequest): {"columns": [field names], "rows": [[values], ...]}. A full state brings 100k
# endpoints; as objects, every endpoint repeats its 14 field names and each one is built from a
# dict of them: as rows the body is half the bytes and it encodes ~3x and decodes ~4x faster.
# Self-describing (the columns are named), so a reader builds rows of a writer with fewer fields;
# a column it does not know rejects the resource, as an unknown field of an object does.
ENDPOINT_TABLES = "endpoint-tables"
_TABLE_KEYS = frozenset({"columns", "rows"})


def _table(items: tuple[Any, ...]) -> dict[str, Any]:
    if not items:
        return {"columns": [], "rows": []}
    cls = type(items[0])
    names = _field_names(cls)
    if names is None or cls not in _FLAT or not all(type(x) is cls for x in items):
        raise TypeError(f"a table holds resources of one flat class, got {sorted({type(x).__name__ for x in items})}")
    row = _ROW_GETTERS.get(cls)
    if row is None:
        import operator

        row = _ROW_GETTERS[cls] = operator.attrgetter(*names)
    return {"columns": list(names), "rows": [row(x) for x in items]}


_ROW_GETTERS: dict[type[Any], Any] = {}


def _from_table(cls: type[Any], name: str, table: Mapping[str, Any]) -> tuple[Any, ...]:
    """The resources of a table (`ENDPOINT_TABLES`), checked as `_build` checks an object (known
    columns, and every required one when there are rows) and more strictly: every value a scalar
    (the object form turns a list or an object in a scalar field into a tuple or a dict, and
    validation refuses it later); repeated strings interned."""
    if table.keys() != _TABLE_KEYS:
        raise TypeError(f"{name}: expected a list or a table of exactly 'columns' and 'rows', got keys {sorted(table)}")
    columns, rows = table["columns"], table["rows"]
    if type(columns) is not list or not all(type(c) is str for c in columns) or len(set(columns)) != len(columns):
        raise TypeError(f"{name}: a table's columns are distinct field names")
    if type(rows) is not list:
        raise TypeError(f"{name}: a table's rows are a list, got {type(rows).__name__}")
    required, known = _field_sets(cls)
    if not known.issuperset(columns):
        raise TypeError(f"{name}: unknown field(s) {sorted(set(columns) - known)}; known: {sorted(known)}")
    if not rows:
        return ()
    if not required.issubset(columns):
        raise TypeError(f"{name}: missing field(s) {sorted(required - set(columns))}")
    width = len(columns)
    positional = tuple(columns) == _field_names(cls)   # this version's order: cls(*row)
    repeated = _REPEATED_FIELDS.get(cls, frozenset())
    intern_at = [i for i, c in enumerate(columns) if c in repeated]
    intern = sys.intern
    out = []
    for i, row in enumerate(rows):
        if type(row) is not list or len(row) != width:
            raise TypeError(f"{name}: row {i} is not a list of {width} values")
        if not _all_scalars(row):
            raise TypeError(f"{name}: row {i} holds a list or an object; every value is a scalar")
        for j in intern_at:
            v = row[j]
            if type(v) is str:
                row[j] = intern(v)
        out.append(cls(*row) if positional else cls(**dict(zip(columns, row, strict=True))))
    return tuple(out)


class ResourceError(ValueError):
    """One resource failed to parse; carries its key (if known) so the proxy can report a NACK detail."""

    def __init__(self, kind: str, key: str, reason: str) -> None:
        super().__init__(f"{kind} {key or '<no key>'}: {reason}")
        self.kind, self.key, self.reason = kind, key, reason


def _build(cls: type[Any], data: Mapping[str, Any]) -> Any:
    """Build a frozen dataclass from its dict form, converting nested tuples of dataclasses.

    A flat class (`_FLAT`: scalar fields only) whose values are all scalars skips the per-field
    conversion: a full state brings 100k Endpoints, and the conversion was two thirds of the
    proxy's cost per endpoint (10 -> 5.9 µs). A list or an object in one of its fields takes the
    general path, which turns it into what it always did."""
    if not isinstance(data, Mapping):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    known = _field_sets(cls)[1]
    if not data.keys() <= known:
        raise TypeError(f"unknown field(s) {sorted(set(data) - known)}; known: {sorted(known)}")
    repeated = _REPEATED_FIELDS.get(cls, ())
    if cls in _FLAT and _all_scalars(data.values()):
        kwargs = dict(data)
        for name in repeated:
            value = kwargs.get(name)
            if type(value) is str:
                kwargs[name] = sys.intern(value)
        return cls(**kwargs)
    kwargs = {}
    for name, value in data.items():
        if name in repeated and type(value) is str:
            kwargs[name] = sys.intern(value)
        else:
            kwargs[name] = _convert_field(cls, name, value)
    return cls(**kwargs)


def _all_scalars(values: Iterable[Any]) -> bool:
    for v in values:
        t = type(v)
        if t is list or t is dict:
            return False
    return True


# Fields whose values repeat across thousands of resources (the same cluster, node, gateway,
# identity...): interned at parse time so a proxy holds each once (a JSON parser makes a new string
# per occurrence). Unique values (uids, pod IPs) are not interned: that would only add a table entry.
_REPEATED_FIELDS: dict[type[Any], frozenset[str]] = {
    Endpoint: frozenset({"cluster", "network", "hbone_address", "gateway", "identity", "region", "zone",
                         "gateway_identity"}),
    Workload: frozenset({"namespace", "cluster", "network", "node", "identity", "service_account", "region", "zone",
                         "node_address"}),
}


# tuple-of-dataclass fields and single (optional) dataclass fields, by (class, field)
_NESTED: dict[tuple[type[Any], str], type[Any]] = {
    (Service, "ports"): ServicePortMap,
    (Service, "endpoints"): Endpoint,
    (Service, "routes"): WeightedBackend,
    (Authorization, "rules"): AuthzMatch,
    (AuthzMatch, "when"): AuthzCondition,
    (HttpMatch, "headers"): NamedMatch,
    (HttpMatch, "query"): NamedMatch,
    (HeaderModifier, "set"): Header,
    (HeaderModifier, "add"): Header,
    (HttpRouteRule, "matches"): HttpMatch,
    (HttpRouteRule, "backends"): HttpBackend,
    (HttpRoute, "rules"): HttpRouteRule,
    (InferencePool, "endpoints"): Endpoint,
}
# fields that travel as a table for a reader of `ENDPOINT_TABLES` (tuples of a `_FLAT` class)
_TABLED: dict[type[Any], frozenset[str]] = {
    Service: frozenset({"endpoints"}),
    InferencePool: frozenset({"endpoints"}),
}
TABLED_TYPES: frozenset[type[Any]] = frozenset(_TABLED)
_ONE: dict[tuple[type[Any], str], type[Any]] = {
    (Service, "outlier"): OutlierPolicy,
    (Service, "waypoint"): WaypointRef,
    (Service, "connection_pool"): ConnectionPoolPolicy,
    (HttpMatch, "path"): StringMatch,
    (HttpRouteRule, "request_headers"): HeaderModifier,
    (HttpRouteRule, "response_headers"): HeaderModifier,
    (HttpRouteRule, "rewrite"): UrlRewrite,
    (HttpRouteRule, "retry"): RetryPolicy,
}


def _convert_field(cls: type[Any], name: str, value: Any) -> Any:
    nested = _NESTED.get((cls, name))
    if nested is not None:
        if type(value) is dict and name in _TABLED.get(cls, ()):
            return _from_table(nested, name, value)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name}: expected a list, got {type(value).__name__}")
        return tuple(v if type(v) is nested else _build(nested, v) for v in value)
    one = _ONE.get((cls, name))
    if one is not None:
        return None if value is None or type(value) is one else _build(one, value)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def parse_resources(kind: str, items: Iterable[Mapping[str, Any]]) -> tuple[list[Any], list[ResourceError]]:
    """Parse each resource on its own: good ones are returned, bad ones reported, never fatal."""
    cls = RESOURCE_TYPES[kind]
    good: list[Any] = []
    bad: list[ResourceError] = []
    for item in items:
        if type(item) is cls:  # already built while decoding (`eager_object_hook`)
            good.append(item)
            continue
        key = ""
        if isinstance(item, Mapping):
            key = str(item.get("uid") or item.get("hostname") or item.get("trust_domain")
                      or f"{item.get('namespace', '')}/{item.get('name', '')}")
        try:
            good.append(_build(cls, item))
        except (TypeError, ValueError) as e:
            bad.append(ResourceError(kind, key, str(e)))
    return good, bad


_FIELD_SETS: dict[type[Any], tuple[frozenset[str], frozenset[str]]] = {}


def _field_sets(cls: type[Any]) -> tuple[frozenset[str], frozenset[str]]:
    """(required, all) field names of a dataclass, computed once per class (`_build` asks for
    every resource it builds)."""
    sets = _FIELD_SETS.get(cls)
    if sets is None:
        from dataclasses import MISSING, fields
        every = [f for f in fields(cls)]
        required = frozenset(f.name for f in every if f.default is MISSING and f.default_factory is MISSING)
        sets = _FIELD_SETS[cls] = (required, frozenset(f.name for f in every))
    return sets


_EAGER: tuple[tuple[type[Any], frozenset[str], frozenset[str]], ...] = tuple(
    (cls, *_field_sets(cls)) for cls in (Endpoint, Workload))


def eager_object_hook(obj: dict[str, Any]) -> Any:
    """A `json.loads(object_hook=...)` that builds Endpoints and Workloads (the resources that come
    by the thousand) the moment their JSON object is decoded, instead of after the whole document
    is a tree of dicts: a big config is then never held twice, and the heap is not left fragmented
    at the size of that transient peak (a proxy's RSS stays near its peak). An object that does
    not build is returned as is, so the normal path rejects exactly that resource, with its reason."""
    keys = obj.keys()
    for cls, required, known in _EAGER:
        if required <= keys and keys <= known:
            try:
                return _build(cls, obj)
            except (TypeError, ValueError):
                return obj
    return obj


def proxy_config_to_dict(cfg: ProxyConfig) -> dict[str, Any]:
    return {
        "proxy_id": cfg.proxy_id,
        "mode": cfg.mode.value,
        "cluster": cfg.cluster,
        "network": cfg.network,
        "trust_domain": cfg.trust_domain,
        "stamp": asdict(cfg.stamp),
        "local_identities": list(cfg.local_identities),
        **({"federated_trust_domains": list(cfg.federated_trust_domains)} if cfg.federated_trust_domains else {}),
        **{kind: [resource_to_dict(r) for r in getattr(cfg, kind)] for kind in RESOURCE_TYPES
           if kind not in L7_RESOURCE_TYPES or getattr(cfg, kind)},
    }


def proxy_config_from_dict(data: Mapping[str, Any]) -> tuple[ProxyConfig, list[ResourceError]]:
    """Parse a whole config; resources that fail are left out and returned as errors."""
    errors: list[ResourceError] = []
    parsed: dict[str, tuple[Any, ...]] = {}
    for kind in RESOURCE_TYPES:
        good, bad = parse_resources(kind, data.get(kind, []))
        parsed[kind] = tuple(good)
        errors.extend(bad)
    cfg = ProxyConfig(
        proxy_id=str(data["proxy_id"]),
        mode=ProxyMode(data["mode"]),
        cluster=str(data["cluster"]),
        network=str(data["network"]),
        trust_domain=str(data["trust_domain"]),
        stamp=Stamp(**data["stamp"]),
        local_identities=tuple(data.get("local_identities", ())),
        federated_trust_domains=tuple(data.get("federated_trust_domains", ())),
        **parsed,
    )
    return cfg, errors


# --- deltas ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigDelta:
    """What changed between two configs of one proxy: resources upserted and keys removed, per kind."""

    proxy_id: str
    stamp: Stamp
    base_version: int  # the version this delta applies on top of (0 = full state)
    upserts: Mapping[str, tuple[Any, ...]]
    removals: Mapping[str, tuple[str, ...]]
    local_identities: tuple[str, ...] | None = None  # None = unchanged

    @property
    def empty(self) -> bool:
        return not any(self.upserts.values()) and not any(self.removals.values()) and self.local_identities is None


def diff_configs(old: ProxyConfig | None, new: ProxyConfig) -> ConfigDelta:
    """The delta that turns `old` into `new` (a full-state delta when `old` is None)."""
    upserts: dict[str, tuple[Any, ...]] = {}
    removals: dict[str, tuple[str, ...]] = {}
    for kind in RESOURCE_TYPES:
        new_items = {r.key: r for r in getattr(new, kind)}
        old_items = {r.key: r for r in getattr(old, kind)} if old is not None else {}
        upserts[kind] = tuple(r for k, r in sorted(new_items.items()) if old_items.get(k) != r)
        removals[kind] = tuple(sorted(k for k in old_items if k not in new_items))
    ids = None if old is not None and old.local_identities == new.local_identities else new.local_identities
    return ConfigDelta(new.proxy_id, new.stamp, old.stamp.version if old is not None else 0, upserts, removals, ids)


def apply_delta(old: ProxyConfig | None, delta: ConfigDelta, template: ProxyConfig | None = None) -> ProxyConfig:
    """Apply a delta. A full-state delta (base_version 0) needs `template` for the proxy's header
    fields when `old` is None. Raises ValueError when the delta does not apply to `old`."""
    base = old if old is not None else template
    if base is None:
        raise ValueError("a delta needs either the previous config or a template for a full state")
    if delta.base_version != 0 and (old is None or old.stamp.version != delta.base_version):
        have = old.stamp.version if old is not None else None
        raise ValueError(f"delta is based on version {delta.base_version}, proxy has {have}; resync needed")
    kwargs: dict[str, Any] = {}
    for kind in RESOURCE_TYPES:
        items = {} if delta.base_version == 0 else {r.key: r for r in getattr(base, kind)}
        for key in delta.removals.get(kind, ()):
            items.pop(key, None)
        for r in delta.upserts.get(kind, ()):
            items[r.key] = r
        kwargs[kind] = tuple(items[k] for k in sorted(items))
    ids = base.local_identities if delta.local_identities is None else delta.local_identities
    return replace(base, stamp=delta.stamp, local_identities=ids, **kwargs)


def canonical(cfg: ProxyConfig) -> ProxyConfig:
    """Resources sorted by key: two configs with the same content compare equal."""
    resources: dict[str, Any] = {
        kind: tuple(sorted(getattr(cfg, kind), key=lambda r: r.key)) for kind in RESOURCE_TYPES
    }
    return replace(cfg, **resources)


# Resources whose fields are all scalars (str, int, float, bool, None): `_plain` copies them as is.
_FLAT: frozenset[type[Any]] = frozenset({Endpoint, ServicePortMap, WeightedBackend, OutlierPolicy, Stamp,
                                         ConnectionPoolPolicy, StringMatch, NamedMatch, Header, UrlRewrite,
                                         HttpBackend, Listener})
