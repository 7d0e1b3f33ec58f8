"""The fleet repo's internal model: frozen, validated, free of pydantic.

The boundary (`gitops.schema`) parses YAML into pydantic models and converts them into these
dataclasses; everything downstream (the federation core, the controller, the lab) sees only
these. Durations are seconds (`*_s`), percentages are 0..100 integers, names are the exact
strings from the repo. Every object carries `pos`, the file:line:col of its `metadata`, and
`field_pos` maps dotted field paths (``spec.trafficPolicy.outlierDetection.interval``) to their
positions so later stages (core, identity, controller) can point at the line that set a policy.

Invariants (checked by `gitops.validate`, relied on downstream):
- names are unique per kind (and per namespace where namespaced);
- every reference (cluster, trust domain, service, network) resolves inside the snapshot;
- a `ConfigSnapshot` is immutable and stamped with the commit it was read from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import NewType

from gitops.problems import SourcePos

ClusterName = NewType("ClusterName", str)
NetworkName = NewType("NetworkName", str)
TrustDomainName = NewType("TrustDomainName", str)

API_GROUP = "meshfed.dev"
API_VERSION = "meshfed.dev/v1alpha1"
ISTIO_NETWORKING_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
ISTIO_SECURITY_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
GATEWAY_API_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1", "gateway.networking.k8s.io/v1alpha2")
INFERENCE_API_VERSIONS = ("inference.networking.k8s.io/v1",)
INFERENCE_GROUP = "inference.networking.k8s.io"
# Istio ambient's labels: a Namespace or Service with `istio.io/use-waypoint: <gateway name>` sends
# its traffic through that waypoint (a Gateway of class istio-waypoint in the same namespace);
# "none" on a Service opts it out of its namespace's waypoint.
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
WAYPOINT_CLASS = "istio-waypoint"
# On a Gateway: the clusters that run it (comma-separated names; absent = every cluster).
CLUSTERS_ANNOTATION = "meshfed.dev/clusters"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"

# The HBONE port (ztunnel.api.ports.HBONE_PORT; gitops imports nothing of ours, a test pins them equal)
DEFAULT_EAST_WEST_GATEWAY_PORT = 15008
# Envoy's outlier-detection defaults (envoy.config.cluster.v3.OutlierDetection).
ENVOY_DEFAULT_CONSECUTIVE_5XX = 5
ENVOY_DEFAULT_INTERVAL_S = 10.0
ENVOY_DEFAULT_BASE_EJECTION_S = 30.0
ENVOY_DEFAULT_MAX_EJECTION_S = 300.0
ENVOY_DEFAULT_MAX_EJECTION_PERCENT = 10


def _frozen_map(d: Mapping[str, SourcePos] | None = None) -> Mapping[str, SourcePos]:
    return MappingProxyType(dict(d or {}))


class PartitionMode(str, Enum):
    """What to do with a cluster's endpoints when its lease expires (the controller lost sight of it)."""

    FREEZE = "Freeze"      # keep serving the last observed endpoints (outlier detection still applies)
    WITHDRAW = "Withdraw"  # stop routing to them until a fresh full observation arrives


@dataclass(frozen=True, slots=True)
class PartitionPolicy:
    lease_ttl_s: float = 30.0
    mode: PartitionMode = PartitionMode.FREEZE


DEFAULT_HISTORY_RETENTION_S = 30 * 86400.0
DEFAULT_DRAIN_GRACE_S = 60.0
DEFAULT_MAX_REMOVAL_PERCENT = 50


@dataclass(frozen=True, slots=True)
class RemovalPolicy:
    """How clusters leave the fleet (`spec.removal`): a removed cluster is drained — withdrawn from
    every proxy's view — and keeps its agent and credentials for `drain_grace_s` after that; a
    commit that removes more than `max_cluster_percent` of the clusters or `max_endpoint_percent`
    of the global endpoints is refused (MF0516) unless what it removes is named in `intended_*`
    (clusters by name, services as "namespace/name")."""

    drain_grace_s: float = DEFAULT_DRAIN_GRACE_S
    max_cluster_percent: int = DEFAULT_MAX_REMOVAL_PERCENT
    max_endpoint_percent: int = DEFAULT_MAX_REMOVAL_PERCENT
    intended_clusters: tuple[str, ...] = ()
    intended_services: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Istio DestinationRule trafficPolicy.outlierDetection, Envoy semantics.

    `consecutive_gateway_errors` counts connect failures/resets/timeouts (what an L4 proxy sees);
    `consecutive_5xx_errors` includes them (Envoy: gateway errors are a subset of 5xx).
    `None` means "not set" (for 5xx: Envoy default 5; for the others: disabled).
    """

    consecutive_5xx_errors: int | None = ENVOY_DEFAULT_CONSECUTIVE_5XX
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool = False
    interval_s: float = ENVOY_DEFAULT_INTERVAL_S
    base_ejection_time_s: float = ENVOY_DEFAULT_BASE_EJECTION_S
    max_ejection_time_s: float = ENVOY_DEFAULT_MAX_EJECTION_S
    max_ejection_percent: int = ENVOY_DEFAULT_MAX_EJECTION_PERCENT
    min_health_percent: int = 0


@dataclass(frozen=True, slots=True)
class FailoverRule:
    """localityLbSetting.failover: traffic from `from_region` fails over to `to_region`."""

    from_region: str
    to_region: str


@dataclass(frozen=True, slots=True)
class DistributeRule:
    """localityLbSetting.distribute: `from_locality` ("region/zone/*") sends weights to localities."""

    from_locality: str
    to: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class LocalityLbSetting:
    """Exactly one of the three modes is non-empty (validated)."""

    enabled: bool = True
    failover_priority: tuple[str, ...] = ()
    failover: tuple[FailoverRule, ...] = ()
    distribute: tuple[DistributeRule, ...] = ()


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """DestinationRule trafficPolicy.connectionPool limits (None = not set: unlimited, as Istio)."""

    max_connections: int | None = None              # tcp.maxConnections
    http1_max_pending_requests: int | None = None   # http.http1MaxPendingRequests
    max_requests_per_connection: int | None = None  # http.maxRequestsPerConnection (0 = unlimited)


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    outlier_detection: OutlierDetection | None = None
    locality_lb: LocalityLbSetting | None = None
    connect_timeout_s: float | None = None
    connection_pool: ConnectionPool | None = None


@dataclass(frozen=True, slots=True)
class Federation:
    name: str
    mesh_id: str
    clusterset_domain: str = "clusterset.local"
    reconcile_interval_s: float = 10.0
    git_poll_interval_s: float = 15.0
    partition: PartitionPolicy = PartitionPolicy()
    default_traffic_policy: TrafficPolicy | None = None
    history_retention_s: float = DEFAULT_HISTORY_RETENTION_S   # the controller's revisions and events
    removal: RemovalPolicy = RemovalPolicy()
    pos: SourcePos = SourcePos("federation.yaml")
    field_pos: Mapping[str, SourcePos] = field(default_factory=_frozen_map)


class ClusterApiKind(str, Enum):
    KUBECONFIG = "Kubeconfig"  # a context in a kubeconfig file (kind, real clusters)
    LAB = "Lab"                # the local lab's emulated API server (context lab-<cluster>)


@dataclass(frozen=True, slots=True)
class ClusterApi:
    kind: ClusterApiKind
    context: str
    kubeconfig: str | None = None  # path; None = $KUBECONFIG / ~/.kube/config


@dataclass(frozen=True, slots=True)
class EastWestGateway:
    # IP on the WAN (shared network between clusters) or DNS name; None: the address comes from the
    # cluster (the gateway Service's status.loadBalancer.ingress, read by discovery), as on kind.
    address: str | None
    port: int = DEFAULT_EAST_WEST_GATEWAY_PORT


# Ambient enrollment (Istio's label): only namespaces a Cluster's namespaceSelector matches are
# discovered and captured.
AMBIENT_LABEL = "istio.io/dataplane-mode"
AMBIENT_VALUE = "ambient"


class SelectorOperator(str, Enum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    """One `matchExpressions` entry of a Kubernetes LabelSelector."""

    key: str
    operator: SelectorOperator
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NamespaceSelector:
    """A Kubernetes LabelSelector over Namespace labels. Empty (no labels, no expressions) matches
    every namespace, as in Kubernetes."""

    match_labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    match_expressions: tuple[LabelRequirement, ...] = ()

    def query(self) -> str:
        """The selector in the API's `labelSelector` query grammar (what kubectl -l takes)."""
        terms = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for r in self.match_expressions:
            if r.operator is SelectorOperator.IN:
                terms.append(f"{r.key} in ({','.join(r.values)})")
            elif r.operator is SelectorOperator.NOT_IN:
                terms.append(f"{r.key} notin ({','.join(r.values)})")
            elif r.operator is SelectorOperator.EXISTS:
                terms.append(r.key)
            else:
                terms.append(f"!{r.key}")
        return ",".join(terms)


DEFAULT_NAMESPACE_SELECTOR = NamespaceSelector(MappingProxyType({AMBIENT_LABEL: AMBIENT_VALUE}))


@dataclass(frozen=True, slots=True)
class Cluster:
    name: ClusterName
    network: NetworkName
    region: str
    zone: str
    trust_domain: TrustDomainName
    api: ClusterApi
    east_west_gateway: EastWestGateway | None
    pod_cidrs: tuple[str, ...] = ()
    service_cidrs: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    pos: SourcePos = SourcePos("")
    field_pos: Mapping[str, SourcePos] = field(default_factory=_frozen_map)
    # The CA this cluster's workloads get certificates from, when it declares one (spec.ca);
    # None = its trust domain's CA. Validation requires it to equal the trust domain's CA.
    ca: CaSpec | None = None
    # Which namespaces are in the mesh (discovered, captured): spec.namespaceSelector.
    namespace_selector: NamespaceSelector = DEFAULT_NAMESPACE_SELECTOR


class CaMode(str, Enum):
    MANAGED = "Managed"    # meshfed holds the root keys in its state directory
    EXTERNAL = "External"  # an external CA; the repo holds its public bundle (SPIFFE bundle JSON)


@dataclass(frozen=True, slots=True)
class CaRoot:
    """One root of a managed CA. Staged rotation is expressed as the list of roots over commits:
    publish (add a non-signing root), switch (move `signing`), retire (drop the old root)."""

    name: str
    signing: bool


@dataclass(frozen=True, slots=True)
class CaSpec:
    mode: CaMode = CaMode.MANAGED
    roots: tuple[CaRoot, ...] = (CaRoot("root-1", True),)
    bundle_file: str | None = None     # EXTERNAL: repo-relative path of a SPIFFE bundle
    workload_cert_ttl_s: float = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class TrustDomain:
    name: TrustDomainName
    federates_with: tuple[TrustDomainName, ...] = ()
    ca: CaSpec = CaSpec()
    pos: SourcePos = SourcePos("")
    field_pos: Mapping[str, SourcePos] = field(default_factory=_frozen_map)


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    target_port: int
    app_protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class ServiceKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class GlobalService:
    namespace: str
    name: str
    export_from: tuple[ClusterName, ...]
    ports: tuple[ServicePort, ...]
    service_account: str
    hostname: str  # <name>.<namespace>.svc.<clusterset domain>
    traffic_policy: TrafficPolicy | None = None  # inline policy; a DestinationRule overrides it
    pos: SourcePos = SourcePos("")
    field_pos: Mapping[str, SourcePos] = field(default_factory=_frozen_map)
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Namespace:
    """A Kubernetes Namespace as the fleet declares it: only its labels matter (`istio.io/use-waypoint`)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    pos: SourcePos = SourcePos("")
    field_pos: Mapping[str, SourcePos] = field(default_factory=_frozen_map)


@dataclass(frozen=True, slots=True)
class GatewayListener:
    name: str
    port: int
    protocol: str                 # HTTP (ingress) | HBONE (waypoint)
    hostname: str = ""
    allowed_from: str = "Same"    # allowedRoutes.namespaces.from: routes of the Gateway's namespace, or All


@dataclass(frozen=True, slots=True)
class Gateway:
    """A Gateway API Gateway: a waypoint (class istio-waypoint, an HBONE listener on 15008) or an
    ingress gateway (any other class; HTTP listeners). One runs in each cluster of `clusters`
    (empty: every cluster of the fleet)."""

    namespace: str
    name: str
    gateway_class: str
    listeners: tuple[GatewayListener, ...]
    clusters: tuple[str, ...] = ()
    waypoint_for: str = "service"     # istio.io/waypoint-for
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    api_version: str = GATEWAY_API_VERSIONS[0]
    pos: SourcePos = SourcePos("")
    field_pos: Mapping[str, SourcePos] = field(default_factory=_frozen_map)

    @property
    def is_waypoint(self) -> bool:
        return self.gateway_class == WAYPOINT_CLASS

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)

    def runs_in(self, cluster: str) -> bool:
        return not self.clusters or cluster in self.clusters


@dataclass(frozen=True, slots=True)
class InferencePool:
    """Gateway API Inference Extension v1 InferencePool: model-server pods chosen by an endpoint picker."""

    namespace: str
    name: str
    selector: Mapping[str, str]
    target_ports: tuple[int, ...]
    picker_name: str
    picker_port: int | None = None
    failure_mode: str = "FailClose"      # FailOpen | FailClose
    api_version: str = INFERENCE_API_VERSIONS[0]
    pos: SourcePos = SourcePos("")
    field_pos: Mapping[str, SourcePos] = field(default_factory=_frozen_map)

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)


class DemoBehaviour(str, Enum):
    HEALTHY = "Healthy"
    ERROR_503 = "Error503"
    SLOW = "Slow"
    HANG = "Hang"


@dataclass(frozen=True, slots=True)
class LabNode:
    name: str
    zone: str | None = None  # defaults to the cluster's zone


@dataclass(frozen=True, slots=True)
class LabWorkload:
    namespace: str
    name: str                      # app label / deployment name
    service: str | None            # the GlobalService (same namespace) it backs, if any
    replicas: int
    nodes: tuple[str, ...]         # placement, round-robin over these; empty = all nodes
    service_account: str
    port: int = 8080
    behaviour: DemoBehaviour = DemoBehaviour.HEALTHY
    role: str = "server"           # "server" (demo echo) or "client" (load generator)
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # extra pod labels
    model: LabModel | None = None  # a model server (OpenAI-style /v1/completions) instead of the echo


@dataclass(frozen=True, slots=True)
class LabModel:
    """The demo server's model-server mode: which model it serves and how fast."""

    name: str
    latency_s: float = 0.05        # per request, while it holds one of `concurrency` slots
    concurrency: int = 1           # requests served at once; the rest wait (the queue the picker reads)


@dataclass(frozen=True, slots=True)
class LabCluster:
    cluster: ClusterName
    nodes: tuple[LabNode, ...]
    workloads: tuple[LabWorkload, ...]
    pos: SourcePos = SourcePos("")
    field_pos: Mapping[str, SourcePos] = field(default_factory=_frozen_map)


@dataclass(frozen=True, slots=True)
class DestinationRule:
    namespace: str
    name: str
    host: str  # FQDN: <svc>.<ns>.svc.clusterset.local (or the short cluster.local form)
    traffic_policy: TrafficPolicy
    api_version: str = ISTIO_NETWORKING_VERSIONS[0]
    pos: SourcePos = SourcePos("")
    field_pos: Mapping[str, SourcePos] = field(default_factory=_frozen_map)


class AuthzAction(str, Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


@dataclass(frozen=True, slots=True)
class AuthzSource:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzWhen:
    """`when: [{key: request.headers[x], values, notValues}]`."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzRule:
    """One rule: matches when any `from_` source matches (or none given) and the operation (port;
    methods, paths, hosts: request level) and every `when` condition match."""

    from_: tuple[AuthzSource, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    when: tuple[AuthzWhen, ...] = ()

    @property
    def request_level(self) -> bool:
        return bool(self.methods or self.not_methods or self.paths or self.not_paths or self.hosts
                    or self.not_hosts or self.when)


@dataclass(frozen=True, slots=True)
class TargetRef:
    """targetRefs entry of an AuthorizationPolicy (Istio ambient): Service or Gateway."""

    kind: str
    name: str
    group: str = ""


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    action: AuthzAction
    rules: tuple[AuthzRule, ...]
    selector: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    api_version: str = ISTIO_SECURITY_VERSIONS[0]
    pos: SourcePos = SourcePos("")
    field_pos: Mapping[str, SourcePos] = field(default_factory=_frozen_map)
    target_refs: tuple[TargetRef, ...] = ()

    @property
    def request_level(self) -> bool:
        return any(r.request_level for r in self.rules)


@dataclass(frozen=True, slots=True)
class BackendRef:
    name: str
    namespace: str
    port: int | None
    weight: int = 1
    kind: str = "Service"          # Service | InferencePool


@dataclass(frozen=True, slots=True)
class ParentRef:
    kind: str                      # Service (GAMMA) | Gateway
    namespace: str
    name: str
    port: int | None = None
    section: str = ""              # a Gateway listener name ("" = every listener)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """One HTTPRoute `matches[]` entry (GRPCRoute matches are turned into this form)."""

    path_type: str = ""            # Exact | PathPrefix | RegularExpression ("" = any path)
    path: str = ""
    headers: tuple[tuple[str, str, str], ...] = ()    # (type, name, value)
    query: tuple[tuple[str, str, str], ...] = ()      # (type, name, value)
    method: str = ""


@dataclass(frozen=True, slots=True)
class HeaderFilter:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteRetry:
    attempts: int | None = None
    codes: tuple[int, ...] = ()
    backoff_s: float | None = None


@dataclass(frozen=True, slots=True)
class RouteRule:
    name: str = ""
    matches: tuple[RouteMatch, ...] = ()
    backends: tuple[BackendRef, ...] = ()
    request_headers: HeaderFilter | None = None
    response_headers: HeaderFilter | None = None
    rewrite_hostname: str = ""
    rewrite_path_type: str = ""    # ReplaceFullPath | ReplacePrefixMatch
    rewrite_path: str = ""
    timeout_s: float | None = None
    backend_timeout_s: float | None = None
    retry: RouteRetry | None = None

    @property
    def request_level(self) -> bool:
        """Does the rule need an L7 proxy (anything but plain weighted Service backends)?"""
        return bool(self.matches or self.request_headers or self.response_headers or self.rewrite_hostname
                    or self.rewrite_path_type or self.timeout_s is not None or self.backend_timeout_s is not None
                    or self.retry is not None or any(b.kind != "Service" for b in self.backends))


@dataclass(frozen=True, slots=True)
class Route:
    """Gateway API TCPRoute/HTTPRoute/GRPCRoute attached to a Service (GAMMA) or to Gateways.

    `parent_service` and `backends` are the L4 reading (a Service parent and its first rule's
    Service backends: what a node ztunnel applies per connection when no waypoint is involved);
    `parents` and `rules` are the whole route, as a waypoint or an ingress gateway applies it."""

    kind: str  # "TCPRoute" | "HTTPRoute" | "GRPCRoute"
    namespace: str
    name: str
    parent_service: ServiceKey | None
    backends: tuple[BackendRef, ...]
    api_version: str = GATEWAY_API_VERSIONS[0]
    pos: SourcePos = SourcePos("")
    field_pos: Mapping[str, SourcePos] = field(default_factory=_frozen_map)
    parents: tuple[ParentRef, ...] = ()
    rules: tuple[RouteRule, ...] = ()
    hostnames: tuple[str, ...] = ()

    @property
    def request_level(self) -> bool:
        return len(self.rules) > 1 or any(r.request_level for r in self.rules) or self.kind == "GRPCRoute"


@dataclass(frozen=True, slots=True)
class Revision:
    sha: str      # full 40-hex commit; "WORKTREE" for an uncommitted directory
    subject: str  # first line of the commit message

    @property
    def short(self) -> str:
        return self.sha[:8]


@dataclass(frozen=True, slots=True)
class ConfigSnapshot:
    """The fleet repo at one revision, validated. Immutable; compare revisions, not contents."""

    revision: Revision
    federation: Federation
    clusters: Mapping[str, Cluster]
    trust_domains: Mapping[str, TrustDomain]
    services: Mapping[ServiceKey, GlobalService]
    lab_clusters: Mapping[str, LabCluster]
    destination_rules: Mapping[ServiceKey, DestinationRule]  # keyed by the service the host names
    authorization_policies: tuple[AuthorizationPolicy, ...]
    routes: tuple[Route, ...]
    # repo-relative path -> git blob sha (or content sha256 for worktrees): lets the controller
    # re-parse only what a commit changed.
    file_digests: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    namespaces: Mapping[str, Namespace] = field(default_factory=lambda: MappingProxyType({}))
    gateways: Mapping[ServiceKey, Gateway] = field(default_factory=lambda: MappingProxyType({}))
    inference_pools: Mapping[ServiceKey, InferencePool] = field(default_factory=lambda: MappingProxyType({}))

    def waypoint_for(self, key: ServiceKey) -> Gateway | None:
        """The waypoint a service's traffic goes through (see `waypoint_of`)."""
        svc = self.services.get(key)
        if svc is None:
            return None
        return waypoint_of(svc, self.namespaces.get(key.namespace), self.gateways)

    def traffic_policy_for(self, key: ServiceKey) -> tuple[TrafficPolicy | None, SourcePos | None]:
        """Effective policy for a service, and where it came from: DestinationRule > inline > default."""
        dr = self.destination_rules.get(key)
        if dr is not None:
            return dr.traffic_policy, dr.pos
        svc = self.services.get(key)
        if svc is not None and svc.traffic_policy is not None:
            return svc.traffic_policy, svc.pos
        if self.federation.default_traffic_policy is not None:
            return self.federation.default_traffic_policy, self.federation.pos
        return None, None


def waypoint_name(svc: GlobalService, namespace: Namespace | None) -> str:
    """The waypoint name a service asks for: its own `istio.io/use-waypoint` label, else its
    namespace's; "" for none (a Service labelled "none" opts out of its namespace's waypoint)."""
    name = svc.labels.get(USE_WAYPOINT_LABEL)
    if name is None and namespace is not None:
        name = namespace.labels.get(USE_WAYPOINT_LABEL)
    return "" if name in (None, "", "none") else str(name)


def waypoint_of(svc: GlobalService, namespace: Namespace | None,
                gateways: Mapping[ServiceKey, Gateway]) -> Gateway | None:
    """The waypoint Gateway (same namespace, class istio-waypoint) `svc` uses, or None."""
    name = waypoint_name(svc, namespace)
    if not name:
        return None
    gw = gateways.get(ServiceKey(svc.namespace, name))
    return gw if gw is not None and gw.is_waypoint and gw.waypoint_for in ("service", "all") else None


def gateway_service_account(gw: Gateway) -> str:
    """The service account a Gateway's pods run as: a waypoint's is the Gateway's name (what
    `istioctl waypoint apply` deploys), an ingress gateway's `<name>-istio` (Istio's deployment
    controller)."""
    return gw.name if gw.is_waypoint else f"{gw.name}-istio"


def gateway_pod_name(gw: Gateway, index: int = 0) -> str:
    """The lab's (and the offline model's) name for a Gateway's pod in a cluster."""
    return f"{gateway_service_account(gw)}-{index}"


def gateway_pod_labels(gw: Gateway) -> dict[str, str]:
    """Labels of a Gateway's pods: the gateway name (how discovery finds a waypoint's or ingress
    gateway's addresses, as Istio labels them) and no ambient capture (they are proxies)."""
    return {GATEWAY_NAME_LABEL: gw.name, "istio.io/dataplane-mode": "none"}
