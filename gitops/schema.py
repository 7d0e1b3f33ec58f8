"""The boundary: YAML documents -> pydantic models (strict, extra='forbid') -> `gitops.model`.

Pydantic stays here. Every model is strict (no "8080" -> 8080, no "yes" -> True) and forbids
unknown fields; each pydantic error is translated into a `Problem` with the file:line:col of the
offending key and a stable code. For an unknown field the message lists the supported fields and
the closest match ("did you mean"); for a field that exists upstream in Istio / Gateway API but
that meshfed does not implement, the code is MF0108 and the message says so, so that a pasted
upstream object never has a field silently ignored.

Field names follow the upstream APIs (Istio, Kubernetes MCS, Gateway API): camelCase, with the
upstream spellings of the irregular ones (`consecutive5xxErrors`, `podCIDRs`, `meshID`).

meshfed's own kinds, as YAML (all under apiVersion meshfed.dev/v1alpha1):

    Federation   spec: meshID, clustersetDomain, reconcileInterval, gitPollInterval,
                       partition{leaseTTL, mode: Freeze|Withdraw}, defaultTrafficPolicy,
                       historyRetention, removal{drainGrace, maxClusterPercent, maxEndpointPercent,
                       intended{clusters, services}}
    Cluster      metadata.labels; spec: network, locality{region, zone}, trustDomain,
                       api{kind: Lab|Kubeconfig, context, kubeconfig}, eastWestGateway{address, port}
                       (address optional: omitted, it comes from the gateway Service's load
                       balancer status), podCIDRs, serviceCIDRs, ca (optional: the CA this
                       cluster's workloads use, must equal its trust domain's), namespaceSelector
                       {matchLabels, matchExpressions} (enrolled namespaces; default
                       istio.io/dataplane-mode=ambient, {} = all)
    TrustDomain  spec: federatesWith, ca{mode: Managed|External, roots[{name, signing}],
                       bundleFile, workloadCertTTL}
    GlobalService metadata.namespace; spec: exportFrom, serviceAccount,
                       ports[{name, port, targetPort, appProtocol}], hostname, trafficPolicy
    LabCluster   spec: nodes[{name, zone}], workloads[{name, namespace, service, role, replicas,
                       nodes, serviceAccount, port, behaviour}]

`trafficPolicy` everywhere is the Istio DestinationRule subset (outlierDetection,
loadBalancer.localityLbSetting, connectionPool.tcp.connectTimeout) plus meshfed's
`outlierDetection.maxEjectionTime` (Envoy's max_ejection_time; Istio does not expose it).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from gitops import model as m
from gitops.codes import problem
from gitops.problems import ObjectRef, Problem, SourcePos
from gitops.yamldoc import Doc, Path

# --------------------------------------------------------------------------------------------
# value types

_DURATION_RE = re.compile(r"(?:([0-9]+(?:\.[0-9]+)?)(h|ms|m|s|us|µs|ns))+")  # fullmatch: no "5s\n"; ASCII digits only
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration_s(text: str) -> float:
    """Istio/Go duration text -> seconds. Raises ValueError with a usable message."""
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration; write a number with a unit, e.g. 500ms, 5s, 1m30s, 2h")
    return sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))


def _duration(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, str):
        raise PydanticCustomError("MF0104", "durations are strings with a unit, e.g. '5s' (got {value})",
                                  {"value": repr(v)})  # templates take no !r: quote here
    try:
        return parse_duration_s(v)
    except ValueError as e:
        raise PydanticCustomError("MF0104", str(e)) from None


def _port(v: int) -> int:
    if not 1 <= v <= 65535:
        raise PydanticCustomError("MF0105", "port {value} is out of range 1..65535", {"value": v})
    return v


def _percent(v: int) -> int:
    if not 0 <= v <= 100:
        raise PydanticCustomError("MF0508", "{value} is not a percentage in 0..100", {"value": v})
    return v


def _non_negative(v: int) -> int:
    if v < 0:
        raise PydanticCustomError("MF0102", "{value} must not be negative", {"value": v})
    return v


def _fmt_s(v: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
        if v >= size and v / size == int(v / size):
            return f"{int(v / size)}{unit}"
    return f"{v:g}s"


def _duration_within(min_s: float, max_s: float) -> Any:
    def check(v: float) -> float:
        if not (min_s <= v <= max_s):  # also catches inf and nan (a duration of 10^400 seconds)
            shown = "more than can be represented" if v != v or v == float("inf") else _fmt_s(v)
            raise PydanticCustomError("MF0109", "duration {value} is out of range {lo}..{hi}",
                                      {"value": shown, "lo": _fmt_s(min_s), "hi": _fmt_s(max_s)})
        return v
    return AfterValidator(check)


def _int_within(min_v: int, max_v: int) -> Any:
    def check(v: int) -> int:
        if v < 0 <= min_v:
            raise PydanticCustomError("MF0102", "{value} must not be negative", {"value": v})
        if not (min_v <= v <= max_v):
            raise PydanticCustomError("MF0109", "{value} is out of range {lo}..{hi}", {"value": v, "lo": min_v, "hi": max_v})
        return v
    return AfterValidator(check)


def DurationIn(min_s: float, max_s: float) -> Any:
    """A Go/Istio duration string, bounded to what makes sense for the field."""
    return Annotated[float, BeforeValidator(_duration), _duration_within(min_s, max_s)]


def CountIn(min_v: int, max_v: int) -> Any:
    return Annotated[int, _int_within(min_v, max_v)]


_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # fullmatch


def _dns_label(v: str) -> str:
    if not _DNS_LABEL.fullmatch(v):
        raise PydanticCustomError(
            "MF0106", "{value} is not a DNS-1123 label (lower-case letters, digits and '-', "
            "at most 63 characters, alphanumeric at both ends)", {"value": repr(v)})
    return v


def _service_ref(v: str) -> str:
    ns, _, name = v.partition("/")
    if not (_DNS_LABEL.fullmatch(ns) and _DNS_LABEL.fullmatch(name)):
        raise PydanticCustomError("MF0102", "{value!r} does not name a service as namespace/name", {"value": v})
    return v


Duration = Annotated[float, BeforeValidator(_duration)]
ServiceRef = Annotated[str, AfterValidator(_service_ref)]
Port = Annotated[int, AfterValidator(_port)]
Percent = Annotated[int, AfterValidator(_percent)]
Count = Annotated[int, _int_within(0, 1_000_000)]   # consecutive-error thresholds and the like
DnsLabel = Annotated[str, AfterValidator(_dns_label)]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, alias_generator=to_camel,
                              populate_by_name=False, frozen=True)
    # Fields that exist in the upstream API but that meshfed does not implement (-> MF0108).
    upstream_unsupported: ClassVar[frozenset[str]] = frozenset()


# --------------------------------------------------------------------------------------------
# shared: metadata and traffic policy (Istio DestinationRule subset)

class Metadata(_Base):
    name: str
    namespace: DnsLabel | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    upstream_unsupported = frozenset({"uid", "resourceVersion", "generation", "creationTimestamp",
                                      "ownerReferences", "finalizers", "managedFields", "generateName",
                                      "deletionTimestamp"})


class OutlierDetectionS(_Base):
    consecutive_5xx_errors: Count | None = Field(None, alias="consecutive5xxErrors")
    consecutive_gateway_errors: Count | None = None
    consecutive_local_origin_failures: Count | None = None
    split_external_local_origin_errors: bool = False
    interval: DurationIn(0.001, 3600.0) = m.ENVOY_DEFAULT_INTERVAL_S  # type: ignore[valid-type]
    base_ejection_time: DurationIn(0.001, 3600.0) = m.ENVOY_DEFAULT_BASE_EJECTION_S  # type: ignore[valid-type]
    max_ejection_time: DurationIn(0.001, 86400.0) = m.ENVOY_DEFAULT_MAX_EJECTION_S  # type: ignore[valid-type]
    max_ejection_percent: Percent = m.ENVOY_DEFAULT_MAX_EJECTION_PERCENT
    min_health_percent: Percent = 0
    upstream_unsupported = frozenset({"consecutiveErrors"})


class FailoverS(_Base):
    from_: str = Field(alias="from")
    to: str


class DistributeS(_Base):
    from_: str = Field(alias="from")
    to: dict[str, CountIn(0, 100)]  # type: ignore[valid-type]


class LocalityLbSettingS(_Base):
    enabled: bool = True
    failover_priority: list[str] = Field(default_factory=list)
    failover: list[FailoverS] = Field(default_factory=list)
    distribute: list[DistributeS] = Field(default_factory=list)


class LoadBalancerS(_Base):
    locality_lb_setting: LocalityLbSettingS | None = None
    upstream_unsupported = frozenset({"simple", "consistentHash", "warmupDurationSecs", "warmup"})


MAX_UINT32 = 2**32 - 1


class TcpSettingsS(_Base):
    connect_timeout: DurationIn(0.001, 300.0) | None = None  # type: ignore[valid-type]
    max_connections: CountIn(1, MAX_UINT32) | None = None  # type: ignore[valid-type]
    upstream_unsupported = frozenset({"tcpKeepalive", "maxConnectionDuration", "idleTimeout"})


class HttpSettingsS(_Base):
    http1_max_pending_requests: CountIn(1, MAX_UINT32) | None = Field(None, alias="http1MaxPendingRequests")  # type: ignore[valid-type]
    max_requests_per_connection: CountIn(0, MAX_UINT32) | None = None  # type: ignore[valid-type]
    upstream_unsupported = frozenset({"http2MaxRequests", "maxRetries", "idleTimeout", "h2UpgradePolicy",
                                      "useClientProtocol", "maxConcurrentStreams"})


class ConnectionPoolS(_Base):
    tcp: TcpSettingsS | None = None
    http: HttpSettingsS | None = None


class TrafficPolicyS(_Base):
    outlier_detection: OutlierDetectionS | None = None
    load_balancer: LoadBalancerS | None = None
    connection_pool: ConnectionPoolS | None = None
    upstream_unsupported = frozenset({"tls", "portLevelSettings", "tunnel", "proxyProtocol"})


# --------------------------------------------------------------------------------------------
# meshfed.dev/v1alpha1 kinds

class PartitionS(_Base):
    lease_ttl: DurationIn(1.0, 3600.0) = Field(30.0, alias="leaseTTL")  # type: ignore[valid-type]
    mode: Literal["Freeze", "Withdraw"] = "Freeze"


class IntendedRemovalsS(_Base):
    clusters: list[DnsLabel] = Field(default_factory=list)
    services: list[ServiceRef] = Field(default_factory=list)      # "namespace/name"


class RemovalS(_Base):
    drain_grace: DurationIn(0.0, 86400.0) = m.DEFAULT_DRAIN_GRACE_S  # type: ignore[valid-type]
    max_cluster_percent: Percent = m.DEFAULT_MAX_REMOVAL_PERCENT
    max_endpoint_percent: Percent = m.DEFAULT_MAX_REMOVAL_PERCENT
    intended: IntendedRemovalsS = Field(default_factory=lambda: IntendedRemovalsS.model_validate({}))


class FederationSpec(_Base):
    mesh_id: str = Field(alias="meshID")
    clusterset_domain: str = "clusterset.local"
    reconcile_interval: DurationIn(0.1, 3600.0) = 10.0  # type: ignore[valid-type]
    git_poll_interval: DurationIn(1.0, 86400.0) = 15.0  # type: ignore[valid-type]
    partition: PartitionS = Field(default_factory=lambda: PartitionS.model_validate({}))
    default_traffic_policy: TrafficPolicyS | None = None
    history_retention: DurationIn(3600.0, 3650 * 86400.0) = m.DEFAULT_HISTORY_RETENTION_S  # type: ignore[valid-type]
    removal: RemovalS = Field(default_factory=lambda: RemovalS.model_validate({}))


class LocalityS(_Base):
    region: str
    zone: str


class ClusterApiS(_Base):
    kind: Literal["Lab", "Kubeconfig"]
    context: str
    kubeconfig: str | None = None


class GatewayS(_Base):
    address: str | None = None  # omitted: from the gateway Service's status.loadBalancer.ingress
    port: Port = m.DEFAULT_EAST_WEST_GATEWAY_PORT


def _label_requirement(v: Any) -> Any:
    # In/NotIn need values, Exists/DoesNotExist take none (as the Kubernetes API server checks).
    if isinstance(v, LabelRequirementS):
        has_values = bool(v.values)
        if v.operator in ("In", "NotIn") and not has_values:
            raise PydanticCustomError("MF0102", "operator {op} needs at least one value", {"op": v.operator})
        if v.operator in ("Exists", "DoesNotExist") and has_values:
            raise PydanticCustomError("MF0102", "operator {op} takes no values", {"op": v.operator})
    return v


class LabelRequirementS(_Base):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class NamespaceSelectorS(_Base):
    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[Annotated[LabelRequirementS, AfterValidator(_label_requirement)]] = Field(
        default_factory=list)


class CaRootS(_Base):
    name: str
    signing: bool = False


class CaS(_Base):
    mode: Literal["Managed", "External"] = "Managed"
    roots: list[CaRootS] | None = None
    bundle_file: str | None = None
    workload_cert_ttl: DurationIn(60.0, 90 * 86400.0) = Field(24 * 3600.0, alias="workloadCertTTL")  # type: ignore[valid-type]


class ClusterSpec(_Base):
    network: DnsLabel
    locality: LocalityS
    trust_domain: str
    api: ClusterApiS
    east_west_gateway: GatewayS | None = None
    pod_cidrs: list[str] = Field(default_factory=list, alias="podCIDRs")
    service_cidrs: list[str] = Field(default_factory=list, alias="serviceCIDRs")
    ca: CaS | None = None
    # Ambient enrollment; omitted: namespaces labelled istio.io/dataplane-mode=ambient; {}: all.
    namespace_selector: NamespaceSelectorS | None = None


class TrustDomainSpec(_Base):
    federates_with: list[str] = Field(default_factory=list)
    ca: CaS = Field(default_factory=lambda: CaS.model_validate({}))


class ServicePortS(_Base):
    name: str
    port: Port
    target_port: Port | None = None
    app_protocol: str = "tcp"
    upstream_unsupported = frozenset({"protocol", "nodePort"})


class GlobalServiceSpec(_Base):
    export_from: list[str]
    service_account: str
    ports: list[ServicePortS]
    hostname: str | None = None
    traffic_policy: TrafficPolicyS | None = None


class LabNodeS(_Base):
    name: DnsLabel
    zone: str | None = None


class LabWorkloadS(_Base):
    name: DnsLabel
    namespace: DnsLabel
    service: str | None = None
    role: Literal["server", "client"] = "server"
    replicas: CountIn(0, 1000) = 1  # type: ignore[valid-type]
    nodes: list[str] = Field(default_factory=list)
    service_account: str
    port: Port = 8080
    behaviour: Literal["Healthy", "Error503", "Slow", "Hang"] = "Healthy"
    labels: dict[str, str] = Field(default_factory=dict)
    model: LabModelS | None = None


class LabModelS(_Base):
    name: str
    latency: DurationIn(0.0, 60.0) = 0.05  # type: ignore[valid-type]
    concurrency: CountIn(1, 1000) = 1  # type: ignore[valid-type]


class LabClusterSpec(_Base):
    nodes: list[LabNodeS]
    workloads: list[LabWorkloadS] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------
# upstream kinds

class DestinationRuleSpec(_Base):
    host: str
    traffic_policy: TrafficPolicyS | None = None
    upstream_unsupported = frozenset({"subsets", "exportTo", "workloadSelector"})


class SourceS(_Base):
    principals: list[str] = Field(default_factory=list)
    not_principals: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    not_namespaces: list[str] = Field(default_factory=list)
    upstream_unsupported = frozenset({"requestPrincipals", "notRequestPrincipals", "ipBlocks", "notIpBlocks",
                                      "remoteIpBlocks", "notRemoteIpBlocks", "serviceAccounts",
                                      "notServiceAccounts"})


class FromS(_Base):
    source: SourceS


class OperationS(_Base):
    ports: list[str] = Field(default_factory=list)
    not_ports: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)
    not_methods: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    not_paths: list[str] = Field(default_factory=list)
    hosts: list[str] = Field(default_factory=list)
    not_hosts: list[str] = Field(default_factory=list)


class ToS(_Base):
    operation: OperationS


class ConditionS(_Base):
    key: str
    values: list[str] = Field(default_factory=list)
    not_values: list[str] = Field(default_factory=list)


class AuthzRuleS(_Base):
    from_: list[FromS] = Field(default_factory=list, alias="from")
    to: list[ToS] = Field(default_factory=list)
    when: list[ConditionS] = Field(default_factory=list)


class SelectorS(_Base):
    match_labels: dict[str, str] = Field(default_factory=dict)


class PolicyTargetRefS(_Base):
    group: str | None = None
    kind: str
    name: str


class AuthorizationPolicySpec(_Base):
    selector: SelectorS | None = None
    target_refs: list[PolicyTargetRefS] = Field(default_factory=list)
    action: Literal["ALLOW", "DENY"] = "ALLOW"
    rules: list[AuthzRuleS] = Field(default_factory=list)
    upstream_unsupported = frozenset({"provider", "targetRef"})


class ParentRefS(_Base):
    group: str | None = None
    kind: str | None = None
    name: str
    namespace: str | None = None
    port: Port | None = None
    section_name: str | None = None


class BackendRefS(_Base):
    group: str | None = None
    kind: str | None = None
    name: str
    namespace: str | None = None
    port: Port | None = None
    weight: CountIn(0, 1_000_000) = 1  # type: ignore[valid-type]  # Gateway API's maximum
    upstream_unsupported = frozenset({"filters"})


class TcpRouteRuleS(_Base):
    backend_refs: list[BackendRefS]
    upstream_unsupported = frozenset({"name"})


class TcpRouteSpec(_Base):
    parent_refs: list[ParentRefS]
    rules: list[TcpRouteRuleS]
    upstream_unsupported = frozenset({"useDefaultGateways"})


class PathMatchS(_Base):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = "/"


class NamedMatchS(_Base):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str
    value: str


class HttpMatchS(_Base):
    path: PathMatchS | None = None
    headers: list[NamedMatchS] = Field(default_factory=list)
    query_params: list[NamedMatchS] = Field(default_factory=list)
    method: Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"] | None = None


class HeaderValueS(_Base):
    name: str
    value: str


class HeaderModifierS(_Base):
    set: list[HeaderValueS] = Field(default_factory=list)
    add: list[HeaderValueS] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)


class PathModifierS(_Base):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None


class UrlRewriteS(_Base):
    hostname: str | None = None
    path: PathModifierS | None = None


class RouteFilterS(_Base):
    type: str
    request_header_modifier: HeaderModifierS | None = None
    response_header_modifier: HeaderModifierS | None = None
    url_rewrite: UrlRewriteS | None = Field(None, alias="urlRewrite")
    upstream_unsupported = frozenset({"requestRedirect", "requestMirror", "extensionRef", "cors", "externalAuth"})


class TimeoutsS(_Base):
    request: DurationIn(0.0, 86400.0) | None = None  # type: ignore[valid-type]
    backend_request: DurationIn(0.0, 86400.0) | None = None  # type: ignore[valid-type]


class RetryS(_Base):
    codes: list[CountIn(400, 599)] = Field(default_factory=list)  # type: ignore[valid-type]
    attempts: CountIn(0, 100) | None = None  # type: ignore[valid-type]
    backoff: DurationIn(0.0, 60.0) | None = None  # type: ignore[valid-type]


class RouteRuleS(_Base):
    name: str | None = None
    matches: list[HttpMatchS] = Field(default_factory=list)
    filters: list[RouteFilterS] = Field(default_factory=list)
    backend_refs: list[BackendRefS] = Field(default_factory=list)
    timeouts: TimeoutsS | None = None
    retry: RetryS | None = None
    upstream_unsupported = frozenset({"sessionPersistence"})


class RouteSpec(_Base):
    parent_refs: list[ParentRefS]
    hostnames: list[str] = Field(default_factory=list)
    rules: list[RouteRuleS]
    upstream_unsupported = frozenset({"useDefaultGateways"})


class GrpcMethodMatchS(_Base):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    service: str | None = None
    method: str | None = None


class GrpcMatchS(_Base):
    method: GrpcMethodMatchS | None = None
    headers: list[NamedMatchS] = Field(default_factory=list)


class GrpcRuleS(_Base):
    name: str | None = None
    matches: list[GrpcMatchS] = Field(default_factory=list)
    filters: list[RouteFilterS] = Field(default_factory=list)
    backend_refs: list[BackendRefS] = Field(default_factory=list)
    upstream_unsupported = frozenset({"sessionPersistence"})


class GrpcRouteSpec(_Base):
    parent_refs: list[ParentRefS]
    hostnames: list[str] = Field(default_factory=list)
    rules: list[GrpcRuleS]


class AllowedNamespacesS(_Base):
    from_: Literal["Same", "All"] = Field("Same", alias="from")
    upstream_unsupported = frozenset({"selector"})


class AllowedRoutesS(_Base):
    namespaces: AllowedNamespacesS | None = None
    upstream_unsupported = frozenset({"kinds"})


class ListenerS(_Base):
    name: str
    port: Port
    protocol: str
    hostname: str | None = None
    allowed_routes: AllowedRoutesS | None = None
    upstream_unsupported = frozenset({"tls"})


class GatewaySpec(_Base):
    gateway_class_name: str
    listeners: list[ListenerS]
    upstream_unsupported = frozenset({"addresses", "infrastructure", "backendTLS", "allowedListeners"})


class NamespaceSpec(_Base):
    upstream_unsupported = frozenset({"finalizers"})


class TargetPortS(_Base):
    number: Port


class EndpointPickerRefS(_Base):
    group: str | None = None
    kind: str | None = None
    name: str
    port: TargetPortS | None = None
    failure_mode: Literal["FailOpen", "FailClose"] = "FailClose"


class InferencePoolSpec(_Base):
    selector: SelectorS
    target_ports: list[TargetPortS]
    endpoint_picker_ref: EndpointPickerRefS


# --------------------------------------------------------------------------------------------
# kinds: (apiVersions, kind) -> spec model, namespaced?

@dataclass(frozen=True, slots=True)
class KindInfo:
    kind: str
    api_versions: tuple[str, ...]
    spec: type[_Base]
    namespaced: bool


KINDS: dict[str, KindInfo] = {k.kind: k for k in (
    KindInfo("Federation", (m.API_VERSION,), FederationSpec, False),
    KindInfo("Cluster", (m.API_VERSION,), ClusterSpec, False),
    KindInfo("TrustDomain", (m.API_VERSION,), TrustDomainSpec, False),
    KindInfo("GlobalService", (m.API_VERSION,), GlobalServiceSpec, True),
    KindInfo("LabCluster", (m.API_VERSION,), LabClusterSpec, False),
    KindInfo("DestinationRule", m.ISTIO_NETWORKING_VERSIONS, DestinationRuleSpec, True),
    KindInfo("AuthorizationPolicy", m.ISTIO_SECURITY_VERSIONS, AuthorizationPolicySpec, True),
    KindInfo("HTTPRoute", m.GATEWAY_API_VERSIONS, RouteSpec, True),
    KindInfo("TCPRoute", ("gateway.networking.k8s.io/v1alpha2",), TcpRouteSpec, True),
    KindInfo("GRPCRoute", m.GATEWAY_API_VERSIONS, GrpcRouteSpec, True),
    KindInfo("Gateway", m.GATEWAY_API_VERSIONS, GatewaySpec, True),
    KindInfo("InferencePool", m.INFERENCE_API_VERSIONS, InferencePoolSpec, True),
    KindInfo("Namespace", ("v1",), NamespaceSpec, False),
)}
# Kinds whose `spec` may be left out (Kubernetes Namespaces usually have none).
SPEC_OPTIONAL = frozenset({"Namespace"})


def accepted_kinds() -> str:
    return ", ".join(f"{k.api_versions[0]}/{k.kind}" for k in KINDS.values())


FleetObject = (m.Federation | m.Cluster | m.TrustDomain | m.GlobalService | m.LabCluster
               | m.DestinationRule | m.AuthorizationPolicy | m.Route | m.Namespace | m.Gateway
               | m.InferencePool)


@dataclass(frozen=True, slots=True)
class Parsed:
    """One file's object: what it is (kind/name/namespace as written) and its model form."""

    kind: str
    name: str
    namespace: str | None
    obj: FleetObject


def object_ref(kind: str, name: str, namespace: str | None) -> ObjectRef:
    return ObjectRef(kind, name, namespace)


# --------------------------------------------------------------------------------------------
# pydantic error -> Problem


def _unwrap(tp: Any) -> Any:
    """Strip Annotated / Optional wrappers."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
            if len(args) != 1:
                return tp
        else:
            return tp


def _model_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at `loc` (loc given by aliases)."""
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fld = next((f for n, f in tp.model_fields.items() if (f.alias or n) == part), None)
            if fld is None:
                return None
            tp = fld.annotation
        elif typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _aliases(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def did_you_mean(word: str, choices: list[str]) -> str | None:
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return lowered[word.lower()]
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


_DEFAULT_HINT = "write a value of the type and range this field takes (see the message)"
_HINTS = {
    "MF0104": "write a number with a unit, e.g. 500ms, 5s, 1m30s, 2h",
    "MF0105": "use a port in 1..65535",
    "MF0106": "use lower-case letters, digits and '-', e.g. net-east",
    "MF0508": "use a percentage in 0..100",
    "MF0109": "use a value inside the range the message gives",
    "int_type": "write an unquoted whole number, e.g. 2 (not \"2\")",
    "int_from_float": "write a whole number",
    "string_type": "quote the value so it stays a string",
    "bool_type": "write true or false (YAML 1.2: yes/no/on/off are strings)",
    "literal_error": "use one of the listed values exactly (case matters)",
    "list_type": "write a list (items starting with '- ')",
    "dict_type": "write a mapping (key: value lines)",
    "model_type": "write a mapping (key: value lines)",
}


def _errors_to_problems(doc: Doc, root: type[BaseModel], err: ValidationError, ref: ObjectRef,
                        prefix: tuple[str, ...]) -> list[Problem]:
    probs: list[Problem] = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        etype = e["type"]
        where = _dotted(loc)
        if etype == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            key = str(loc[-1])
            supported = _aliases(parent) if parent else []
            if parent is not None and key in getattr(parent, "upstream_unsupported", frozenset()):
                probs.append(problem(
                    "MF0108", f"field {where!r} is not supported by meshfed", doc.pos(loc), obj=ref,
                    hint=f"remove it; supported here: {', '.join(supported)}"))
                continue
            guess = did_you_mean(key, supported)
            hint = (f"did you mean {guess!r}? " if guess else "") + f"supported here: {', '.join(supported)}"
            probs.append(problem("MF0101", f"unknown field {where!r}", doc.pos(loc), hint=hint, obj=ref))
        elif etype == "missing":
            probs.append(problem("MF0103", f"missing required field {where!r}", doc.pos(loc[:-1]), obj=ref,
                                 hint=f"add '{loc[-1]}' under {_dotted(loc[:-1]) or 'the top level'}"))
        else:
            code = etype if etype.startswith("MF") else "MF0102"
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) or etype.startswith("MF") else f" (got {got!r})"
            probs.append(problem(code, f"{where}: {msg}{shown}", doc.value_at(loc), obj=ref,
                                 hint=_HINTS.get(code) or _HINTS.get(etype) or _DEFAULT_HINT))
    return probs


# --------------------------------------------------------------------------------------------
# document -> model


def _field_pos(doc: Doc) -> Mapping[str, SourcePos]:
    fp = {_dotted(p): pos for p, pos in doc.key_pos.items()}
    for p, pos in doc.value_pos.items():
        if p and isinstance(p[-1], int):
            fp[_dotted(p)] = pos
    return MappingProxyType(fp)


def parse_object(doc: Doc) -> tuple[Parsed | None, list[Problem]]:
    """Validate one document's envelope and spec and convert it to the internal model."""
    data = doc.data
    top = SourcePos(doc.file, 1, 1)
    if not isinstance(data, dict):
        return None, [problem("MF0007", "the file must hold one mapping with apiVersion, kind, metadata and spec",
                              doc.value_at(()))]
    kind = data.get("kind")
    api = data.get("apiVersion")
    if not isinstance(kind, str) or kind not in KINDS:
        guess = did_you_mean(str(kind), list(KINDS)) if isinstance(kind, str) else None
        return None, [problem("MF0008", f"unknown kind {kind!r}", doc.value_at(("kind",)) if "kind" in data else top,
                              hint=(f"did you mean {guess!r}? " if guess else "") + f"accepted: {accepted_kinds()}")]
    info = KINDS[kind]
    if api not in info.api_versions:
        return None, [problem("MF0008", f"apiVersion {api!r} is not accepted for kind {kind}",
                              doc.value_at(("apiVersion",)) if "apiVersion" in data else top,
                              hint=f"use one of: {', '.join(info.api_versions)}")]
    envelope = {"apiVersion", "kind", "metadata", "spec"}
    probs: list[Problem] = []
    for key in data:
        if key not in envelope:
            if key == "status":
                probs.append(problem("MF0108", "'status' is written by controllers, not kept in the fleet repo",
                                     doc.pos((key,)), hint="remove the status block"))
                continue
            guess = did_you_mean(key, sorted(envelope))
            probs.append(problem("MF0101", f"unknown field {key!r}", doc.pos((key,)),
                                 hint=(f"did you mean {guess!r}? " if guess else "")
                                 + "supported here: apiVersion, kind, metadata, spec"))
    for key in ("metadata", "spec"):
        if key not in data and not (key == "spec" and kind in SPEC_OPTIONAL):
            probs.append(problem("MF0103", f"missing required field {key!r}", top, hint=f"add a '{key}:' block"))
    if probs:
        return None, probs

    meta_data = data["metadata"]
    name = meta_data.get("name") if isinstance(meta_data, dict) else None
    ns = meta_data.get("namespace") if isinstance(meta_data, dict) else None
    if info.namespaced and ns is None:
        ns = namespace_from_path(doc.file)
    ref = object_ref(kind, str(name), ns if isinstance(ns, str) else None)
    meta: Metadata | None = None
    spec: Any = None
    try:
        meta = Metadata.model_validate(meta_data)
    except ValidationError as e:
        probs += _errors_to_problems(doc, _Wrap.for_meta(), e, ref, ("metadata",))
    try:
        spec = info.spec.model_validate(data.get("spec") or {})
    except ValidationError as e:
        probs += _errors_to_problems(doc, _Wrap.for_spec(info.spec), e, ref, ("spec",))
    if probs or meta is None:
        return None, probs
    if info.namespaced and not meta.namespace and isinstance(ns, str) and ns:
        # Pasted as `kubectl apply -n <ns>` would take it: the namespace directory names it.
        meta = meta.model_copy(update={"namespace": ns})
    if info.namespaced and not meta.namespace:
        return None, [problem("MF0103", f"{kind} is namespaced: metadata.namespace is required",
                              doc.pos(("metadata",)), obj=ref, hint="add 'namespace: <ns>' under metadata")]
    if not info.namespaced and meta.namespace:
        return None, [problem("MF0101", f"{kind} is not namespaced: remove metadata.namespace",
                              doc.pos(("metadata", "namespace")), obj=ref,
                              hint="supported under metadata here: name, labels, annotations")]
    ctx = _Ctx(doc, ref, _field_pos(doc), doc.pos(("metadata",)))
    converted, more = _CONVERT[kind](ctx, meta, spec)
    if converted is None:
        return None, more
    return Parsed(kind, meta.name, meta.namespace, converted), more


def namespace_from_path(path: str) -> str | None:
    """services/<ns>/… and policies/<ns>/…: the namespace an object without metadata.namespace is
    in, the way `kubectl apply -n <ns>` would place it (so upstream examples paste unchanged)."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[0] in ("services", "policies") and _DNS_LABEL.fullmatch(parts[1]):
        return parts[1]
    return None


class _Wrap:
    """Root models whose single field is `metadata` / `spec`, so error locs become document paths."""

    _cache: ClassVar[dict[tuple[str, type[BaseModel]], type[BaseModel]]] = {}

    @classmethod
    def for_meta(cls) -> type[BaseModel]:
        return cls._make("metadata", Metadata)

    @classmethod
    def for_spec(cls, spec: type[_Base]) -> type[BaseModel]:
        return cls._make("spec", spec)

    @classmethod
    def _make(cls, key: str, inner: type[BaseModel]) -> type[BaseModel]:
        if (key, inner) not in cls._cache:
            cls._cache[(key, inner)] = create_model(  # type: ignore[call-overload]
                f"Root_{key}_{inner.__name__}", **{key: (inner, ...)})
        return cls._cache[(key, inner)]


@dataclass(frozen=True, slots=True)
class _Ctx:
    doc: Doc
    ref: ObjectRef
    field_pos: Mapping[str, SourcePos]
    pos: SourcePos

    def at(self, dotted: str) -> SourcePos:
        return find_pos(self.field_pos, dotted, self.pos)


_TRIM = re.compile(r"(\.[^.\[]+|\[\d+\])$")


def find_pos(field_pos: Mapping[str, SourcePos], dotted: str, default: SourcePos) -> SourcePos:
    """Position of `dotted` (e.g. spec.ports[0].port) or of its nearest recorded ancestor."""
    while dotted:
        p = field_pos.get(dotted)
        if p is not None:
            return p
        trimmed = _TRIM.sub("", dotted)
        if trimmed == dotted:
            break
        dotted = trimmed
    return default


def _traffic_policy(tp: TrafficPolicyS | None) -> m.TrafficPolicy | None:
    if tp is None:
        return None
    od = None
    if tp.outlier_detection is not None:
        o = tp.outlier_detection
        od = m.OutlierDetection(
            consecutive_5xx_errors=o.consecutive_5xx_errors if o.consecutive_5xx_errors is not None
            else m.ENVOY_DEFAULT_CONSECUTIVE_5XX,
            consecutive_gateway_errors=o.consecutive_gateway_errors,
            consecutive_local_origin_failures=o.consecutive_local_origin_failures,
            split_external_local_origin_errors=o.split_external_local_origin_errors,
            interval_s=o.interval, base_ejection_time_s=o.base_ejection_time,
            max_ejection_time_s=o.max_ejection_time, max_ejection_percent=o.max_ejection_percent,
            min_health_percent=o.min_health_percent)
    lb = None
    if tp.load_balancer is not None and tp.load_balancer.locality_lb_setting is not None:
        s = tp.load_balancer.locality_lb_setting
        lb = m.LocalityLbSetting(
            enabled=s.enabled, failover_priority=tuple(s.failover_priority),
            failover=tuple(m.FailoverRule(f.from_, f.to) for f in s.failover),
            distribute=tuple(m.DistributeRule(d.from_, MappingProxyType(dict(d.to))) for d in s.distribute))
    cp = tp.connection_pool
    timeout = cp.tcp.connect_timeout if cp and cp.tcp else None
    pool = None
    if cp is not None and ((cp.tcp and cp.tcp.max_connections is not None) or cp.http is not None):
        pool = m.ConnectionPool(
            max_connections=cp.tcp.max_connections if cp.tcp else None,
            http1_max_pending_requests=cp.http.http1_max_pending_requests if cp.http else None,
            max_requests_per_connection=cp.http.max_requests_per_connection if cp.http else None)
    return m.TrafficPolicy(outlier_detection=od, locality_lb=lb, connect_timeout_s=timeout, connection_pool=pool)


def _ca(c: CaS) -> m.CaSpec:
    roots = tuple(m.CaRoot(r.name, r.signing) for r in c.roots) if c.roots is not None else m.CaSpec().roots
    return m.CaSpec(mode=m.CaMode(c.mode), roots=roots, bundle_file=c.bundle_file,
                    workload_cert_ttl_s=c.workload_cert_ttl)


Converted = tuple[FleetObject | None, list[Problem]]


def _conv_federation(ctx: _Ctx, meta: Metadata, s: FederationSpec) -> Converted:
    return m.Federation(
        name=meta.name, mesh_id=s.mesh_id, clusterset_domain=s.clusterset_domain,
        reconcile_interval_s=s.reconcile_interval, git_poll_interval_s=s.git_poll_interval,
        partition=m.PartitionPolicy(lease_ttl_s=s.partition.lease_ttl, mode=m.PartitionMode(s.partition.mode)),
        default_traffic_policy=_traffic_policy(s.default_traffic_policy),
        history_retention_s=s.history_retention,
        removal=m.RemovalPolicy(drain_grace_s=s.removal.drain_grace, max_cluster_percent=s.removal.max_cluster_percent,
                                max_endpoint_percent=s.removal.max_endpoint_percent,
                                intended_clusters=tuple(s.removal.intended.clusters),
                                intended_services=tuple(s.removal.intended.services)),
        pos=ctx.pos, field_pos=ctx.field_pos), []


def _namespace_selector(s: NamespaceSelectorS | None) -> m.NamespaceSelector:
    if s is None:
        return m.DEFAULT_NAMESPACE_SELECTOR
    return m.NamespaceSelector(
        MappingProxyType(dict(s.match_labels)),
        tuple(m.LabelRequirement(r.key, m.SelectorOperator(r.operator), tuple(r.values)) for r in s.match_expressions))


def _conv_cluster(ctx: _Ctx, meta: Metadata, s: ClusterSpec) -> Converted:
    gw = m.EastWestGateway(s.east_west_gateway.address, s.east_west_gateway.port) if s.east_west_gateway else None
    return m.Cluster(
        name=m.ClusterName(meta.name), network=m.NetworkName(s.network), region=s.locality.region,
        zone=s.locality.zone, trust_domain=m.TrustDomainName(s.trust_domain),
        api=m.ClusterApi(m.ClusterApiKind(s.api.kind), s.api.context, s.api.kubeconfig),
        east_west_gateway=gw, pod_cidrs=tuple(s.pod_cidrs), service_cidrs=tuple(s.service_cidrs),
        labels=MappingProxyType(dict(meta.labels)), ca=_ca(s.ca) if s.ca else None,
        namespace_selector=_namespace_selector(s.namespace_selector),
        pos=ctx.pos, field_pos=ctx.field_pos), []


def _conv_trust(ctx: _Ctx, meta: Metadata, s: TrustDomainSpec) -> Converted:
    return m.TrustDomain(
        name=m.TrustDomainName(meta.name), federates_with=tuple(m.TrustDomainName(t) for t in s.federates_with),
        ca=_ca(s.ca), pos=ctx.pos, field_pos=ctx.field_pos), []


def _conv_service(ctx: _Ctx, meta: Metadata, s: GlobalServiceSpec) -> Converted:
    ns = meta.namespace or ""
    ports = tuple(m.ServicePort(p.name, p.port, p.target_port or p.port, p.app_protocol) for p in s.ports)
    # The hostname needs the Federation's clustersetDomain: validate.py checks an explicit one and
    # `finish_services` fills in the default.
    return m.GlobalService(
        namespace=ns, name=meta.name, export_from=tuple(m.ClusterName(c) for c in s.export_from), ports=ports,
        service_account=s.service_account, hostname=s.hostname or "",
        traffic_policy=_traffic_policy(s.traffic_policy), pos=ctx.pos, field_pos=ctx.field_pos,
        labels=MappingProxyType(dict(meta.labels))), []


def _conv_lab(ctx: _Ctx, meta: Metadata, s: LabClusterSpec) -> Converted:
    return m.LabCluster(
        cluster=m.ClusterName(meta.name), nodes=tuple(m.LabNode(n.name, n.zone) for n in s.nodes),
        workloads=tuple(m.LabWorkload(
            namespace=w.namespace, name=w.name, service=w.service, replicas=w.replicas, nodes=tuple(w.nodes),
            service_account=w.service_account, port=w.port, behaviour=m.DemoBehaviour(w.behaviour), role=w.role,
            labels=MappingProxyType(dict(w.labels)),
            model=m.LabModel(w.model.name, w.model.latency, w.model.concurrency) if w.model else None)
            for w in s.workloads),
        pos=ctx.pos, field_pos=ctx.field_pos), []


def _conv_dr(ctx: _Ctx, meta: Metadata, s: DestinationRuleSpec) -> Converted:
    api = ctx.doc.data["apiVersion"]
    return m.DestinationRule(
        namespace=meta.namespace or "", name=meta.name, host=s.host,
        traffic_policy=_traffic_policy(s.traffic_policy) or m.TrafficPolicy(), api_version=api,
        pos=ctx.pos, field_pos=ctx.field_pos), []


def _ports(ctx: _Ctx, values: list[str], where: str) -> tuple[tuple[int, ...], list[Problem]]:
    out: list[int] = []
    probs: list[Problem] = []
    for i, v in enumerate(values):
        if not v.isdigit() or not 1 <= int(v) <= 65535:
            probs.append(problem("MF0105", f"{where}[{i}]: {v!r} is not a port in 1..65535",
                                 ctx.at(f"{where}[{i}]"), obj=ctx.ref, hint="ports are written as strings: \"8080\""))
        else:
            out.append(int(v))
    return tuple(out), probs


def _conv_authz(ctx: _Ctx, meta: Metadata, s: AuthorizationPolicySpec) -> Converted:
    rules: list[m.AuthzRule] = []
    probs: list[Problem] = []
    for ri, r in enumerate(s.rules):
        sources = tuple(m.AuthzSource(tuple(f.source.principals), tuple(f.source.not_principals),
                                      tuple(f.source.namespaces), tuple(f.source.not_namespaces)) for f in r.from_)
        when: list[m.AuthzWhen] = []
        for wi, c in enumerate(r.when):
            if not _WHEN_KEY.fullmatch(c.key):
                probs.append(problem("MF0108", f"spec.rules[{ri}].when[{wi}].key {c.key!r} is not supported by meshfed",
                                     ctx.at(f"spec.rules[{ri}].when[{wi}].key"), obj=ctx.ref,
                                     hint="supported: request.headers[<name>]"))
                continue
            if not c.values and not c.not_values:
                probs.append(problem("MF0103", f"spec.rules[{ri}].when[{wi}] needs values or notValues",
                                     ctx.at(f"spec.rules[{ri}].when[{wi}]"), obj=ctx.ref,
                                     hint="add values: [...] (or notValues)"))
                continue
            when.append(m.AuthzWhen(c.key, tuple(c.values), tuple(c.not_values)))
        ops = r.to or [ToS.model_validate({"operation": {}})]
        for ti, t in enumerate(ops):
            base = f"spec.rules[{ri}].to[{ti}].operation"
            ports, p1 = _ports(ctx, t.operation.ports, base + ".ports")
            not_ports, p2 = _ports(ctx, t.operation.not_ports, base + ".notPorts")
            probs += p1 + p2
            o = t.operation
            for attr in ("paths", "not_paths"):
                for pi, path in enumerate(getattr(o, attr)):
                    if not (path.startswith("/") or path.startswith("*") or path == ""):
                        field = f"{base}.{'notPaths' if attr == 'not_paths' else 'paths'}[{pi}]"
                        probs.append(problem("MF0102", f"{field}: {path!r} is not a path", ctx.at(field), obj=ctx.ref,
                                             hint="paths start with '/' (a '*' prefix or suffix is a wildcard)"))
            rules.append(m.AuthzRule(from_=sources, ports=ports, not_ports=not_ports,
                                     methods=tuple(o.methods), not_methods=tuple(o.not_methods),
                                     paths=tuple(o.paths), not_paths=tuple(o.not_paths), hosts=tuple(o.hosts),
                                     not_hosts=tuple(o.not_hosts), when=tuple(when)))
    targets: list[m.TargetRef] = []
    for i, tr in enumerate(s.target_refs):
        group = tr.group or ""
        if (tr.kind, group) not in (("Service", ""), ("Service", "core"), ("Gateway", "gateway.networking.k8s.io")):
            probs.append(problem("MF0108", f"spec.targetRefs[{i}]: kind {tr.kind!r} (group {group!r}) is not supported",
                                 ctx.at(f"spec.targetRefs[{i}]"), obj=ctx.ref,
                                 hint="target a Service (group \"\") or a Gateway (group gateway.networking.k8s.io)"))
            continue
        targets.append(m.TargetRef(tr.kind, tr.name, group))
    if targets and s.selector is not None:
        probs.append(problem("MF0102", "spec: selector and targetRefs are mutually exclusive (Istio)",
                             ctx.at("spec.targetRefs"), obj=ctx.ref,
                             hint="keep targetRefs to have the waypoint or gateway enforce the policy"))
    if probs:
        return None, probs
    api = ctx.doc.data["apiVersion"]
    selector = MappingProxyType(dict(s.selector.match_labels)) if s.selector else MappingProxyType({})
    return m.AuthorizationPolicy(
        namespace=meta.namespace or "", name=meta.name, action=m.AuthzAction(s.action), rules=tuple(rules),
        selector=selector, api_version=api, pos=ctx.pos, field_pos=ctx.field_pos, target_refs=tuple(targets)), []


_WHEN_KEY = re.compile(r"request\.headers\[[A-Za-z0-9!#$%&'*+.^_`|~-]+\]")
_CORE_GROUPS = ("", "core")


def _parent(ctx: _Ctx, i: int, p: ParentRefS, ns: str) -> m.ParentRef | Problem:
    kind = p.kind or "Gateway"
    group = p.group if p.group is not None else ("" if kind == "Service" else "gateway.networking.k8s.io")
    where = f"spec.parentRefs[{i}]"
    if kind == "Service" and group in _CORE_GROUPS:
        if p.section_name:
            return problem("MF0108", f"{where}.sectionName on a Service parent is not supported", ctx.at(where),
                           obj=ctx.ref, hint="use port to pick the Service port")
        return m.ParentRef("Service", p.namespace or ns, p.name, p.port)
    if kind == "Gateway" and group == "gateway.networking.k8s.io":
        return m.ParentRef("Gateway", p.namespace or ns, p.name, p.port, p.section_name or "")
    return problem("MF0108", f"{where}: parent kind {kind!r} (group {group!r}) is not supported", ctx.at(where),
                   obj=ctx.ref, hint="attach to a Service (group \"\", kind Service) or a Gateway")


def _backend(ctx: _Ctx, where: str, b: BackendRefS, ns: str, allow_pools: bool) -> m.BackendRef | Problem:
    kind = b.kind or "Service"
    group = b.group or ""
    if kind == "Service" and group in _CORE_GROUPS:
        return m.BackendRef(b.name, b.namespace or ns, b.port, b.weight)
    if allow_pools and kind == "InferencePool" and group == m.INFERENCE_GROUP:
        if b.namespace and b.namespace != ns:
            return problem("MF0108", f"{where}: an InferencePool backend must be in the route's namespace",
                           ctx.at(where), obj=ctx.ref, hint="remove namespace")
        return m.BackendRef(b.name, ns, b.port, b.weight, kind="InferencePool")
    supported = "Service" + (f" or InferencePool (group {m.INFERENCE_GROUP})" if allow_pools else "")
    return problem("MF0108", f"{where}: backend kind {kind!r} (group {group!r}) is not supported", ctx.at(where),
                   obj=ctx.ref, hint=f"use kind {supported}")


def _header_filter(h: HeaderModifierS) -> m.HeaderFilter:
    return m.HeaderFilter(tuple((x.name, x.value) for x in h.set), tuple((x.name, x.value) for x in h.add),
                          tuple(h.remove))


def _filters(ctx: _Ctx, base: str, filters: list[RouteFilterS], grpc: bool) -> tuple[dict[str, Any], list[Problem]]:
    out: dict[str, Any] = {}
    probs: list[Problem] = []
    kinds = {"RequestHeaderModifier": "request_header_modifier", "ResponseHeaderModifier": "response_header_modifier"}
    if not grpc:
        kinds["URLRewrite"] = "url_rewrite"
    for i, f in enumerate(filters):
        where = f"{base}.filters[{i}]"
        attr = kinds.get(f.type)
        if attr is None:
            probs.append(problem("MF0108", f"{where}: filter type {f.type!r} is not supported by meshfed", ctx.at(where),
                                 obj=ctx.ref, hint=f"supported: {', '.join(kinds)}"))
            continue
        value = getattr(f, attr)
        others = [a for a in ("request_header_modifier", "response_header_modifier", "url_rewrite")
                  if a != attr and getattr(f, a) is not None]
        if value is None or others:
            probs.append(problem("MF0102", f"{where}: type {f.type} needs exactly its own field ({to_camel(attr)})",
                                 ctx.at(where), obj=ctx.ref, hint=f"write {to_camel(attr)}: under type: {f.type}"))
            continue
        if attr in out:
            probs.append(problem("MF0102", f"{where}: a second {f.type} filter in one rule", ctx.at(where),
                                 obj=ctx.ref, hint="merge the two filters"))
            continue
        out[attr] = value
    return out, probs


def _conv_route(ctx: _Ctx, meta: Metadata, s: Any) -> Converted:
    ns = meta.namespace or ""
    kind = ctx.ref.kind
    probs: list[Problem] = []
    if not s.parent_refs:
        return None, [problem("MF0103", "spec.parentRefs: a route needs a parent (a Service or a Gateway)",
                              ctx.at("spec.parentRefs"), obj=ctx.ref, hint="add a parentRefs entry")]
    parents: list[m.ParentRef] = []
    for i, p in enumerate(s.parent_refs):
        got = _parent(ctx, i, p, ns)
        if isinstance(got, Problem):
            probs.append(got)
        else:
            parents.append(got)
    if kind == "TCPRoute" and any(p.kind != "Service" for p in parents):
        probs.append(problem("MF0108", "spec.parentRefs: a TCPRoute attaches to a Service only (GAMMA)",
                             ctx.at("spec.parentRefs"), obj=ctx.ref, hint="set group: \"\" and kind: Service"))
    if len({p.kind for p in parents}) > 1:
        probs.append(problem("MF0108", "spec.parentRefs: mixing Service and Gateway parents in one route is not "
                             "supported", ctx.at("spec.parentRefs"), obj=ctx.ref, hint="write one route per kind of parent"))
    if len([p for p in parents if p.kind == "Service"]) > 1:
        probs.append(problem("MF0108", "spec.parentRefs: meshfed attaches a route to one Service", ctx.at("spec.parentRefs"),
                             obj=ctx.ref, hint="write one route per Service"))
    if kind == "TCPRoute" and len(s.rules) != 1:
        probs.append(problem("MF0108", f"spec.rules: a TCPRoute has exactly one rule here, got {len(s.rules)}",
                             ctx.at("spec.rules"), obj=ctx.ref, hint="merge the backendRefs into one rule"))
    rules: list[m.RouteRule] = []
    for ri, r in enumerate(s.rules):
        base = f"spec.rules[{ri}]"
        backends: list[m.BackendRef] = []
        for bi, b in enumerate(r.backend_refs):
            got_b = _backend(ctx, f"{base}.backendRefs[{bi}]", b, ns, allow_pools=kind == "HTTPRoute")
            if isinstance(got_b, Problem):
                probs.append(got_b)
            else:
                backends.append(got_b)
        if kind == "TCPRoute":
            rules.append(m.RouteRule(backends=tuple(backends)))
            continue
        grpc = kind == "GRPCRoute"
        filt, fp = _filters(ctx, base, r.filters, grpc)
        probs += fp
        matches = tuple(_grpc_match(mt) for mt in r.matches) if grpc else tuple(_http_match(mt) for mt in r.matches)
        rw: UrlRewriteS | None = filt.get("url_rewrite")
        rw_type = rw_path = ""
        if rw is not None and rw.path is not None:
            rw_type = rw.path.type
            rw_path = (rw.path.replace_full_path if rw_type == "ReplaceFullPath" else rw.path.replace_prefix_match) or ""
            if not rw_path.startswith("/"):
                probs.append(problem("MF0514", f"{base}: URLRewrite {rw_type} needs a path starting with '/'",
                                     ctx.at(f"{base}.filters"), obj=ctx.ref,
                                     hint=f"set {'replaceFullPath' if rw_type == 'ReplaceFullPath' else 'replacePrefixMatch'}: /…"))
        t = getattr(r, "timeouts", None)
        retry = getattr(r, "retry", None)
        rules.append(m.RouteRule(
            name=r.name or "", matches=matches, backends=tuple(backends),
            request_headers=_header_filter(filt["request_header_modifier"]) if "request_header_modifier" in filt else None,
            response_headers=_header_filter(filt["response_header_modifier"]) if "response_header_modifier" in filt else None,
            rewrite_hostname=(rw.hostname or "") if rw is not None else "", rewrite_path_type=rw_type,
            rewrite_path=rw_path,
            timeout_s=t.request if t is not None else None,
            backend_timeout_s=t.backend_request if t is not None else None,
            retry=m.RouteRetry(retry.attempts, tuple(retry.codes), retry.backoff) if retry is not None else None))
    if probs:
        return None, probs
    service_parent = next((p for p in parents if p.kind == "Service"), None)
    first = rules[0].backends if rules else ()
    api = ctx.doc.data["apiVersion"]
    return m.Route(kind=kind, namespace=ns, name=meta.name,
                   parent_service=m.ServiceKey(service_parent.namespace, service_parent.name) if service_parent else None,
                   backends=tuple(b for b in first if b.kind == "Service"), api_version=api, pos=ctx.pos,
                   field_pos=ctx.field_pos, parents=tuple(parents), rules=tuple(rules),
                   hostnames=tuple(getattr(s, "hostnames", ()))), []


def _http_match(mt: HttpMatchS) -> m.RouteMatch:
    return m.RouteMatch(
        path_type=mt.path.type if mt.path else "", path=mt.path.value if mt.path else "",
        headers=tuple((h.type, h.name.lower(), h.value) for h in mt.headers),
        query=tuple((q.type, q.name, q.value) for q in mt.query_params), method=mt.method or "")


def _grpc_match(mt: GrpcMatchS) -> m.RouteMatch:
    """GRPCRoute method matches as HTTP/2 paths (`/<service>/<method>`, always POST)."""
    headers = tuple((h.type, h.name.lower(), h.value) for h in mt.headers)
    mm = mt.method
    if mm is None or (not mm.service and not mm.method):
        return m.RouteMatch(headers=headers, method="POST")
    if mm.type == "Exact":
        if mm.service and mm.method:
            return m.RouteMatch("Exact", f"/{mm.service}/{mm.method}", headers, (), "POST")
        if mm.service:
            return m.RouteMatch("PathPrefix", f"/{mm.service}", headers, (), "POST")
        return m.RouteMatch("RegularExpression", f"/[^/]+/{re.escape(mm.method or '')}", headers, (), "POST")
    return m.RouteMatch("RegularExpression", f"/{mm.service or '[^/]+'}/{mm.method or '[^/]+'}", headers, (), "POST")


def _conv_namespace(ctx: _Ctx, meta: Metadata, s: NamespaceSpec) -> Converted:
    return m.Namespace(name=meta.name, labels=MappingProxyType(dict(meta.labels)), pos=ctx.pos,
                       field_pos=ctx.field_pos), []


def _conv_gateway(ctx: _Ctx, meta: Metadata, s: GatewaySpec) -> Converted:
    probs: list[Problem] = []
    listeners: list[m.GatewayListener] = []
    waypoint = s.gateway_class_name == m.WAYPOINT_CLASS
    for i, lst in enumerate(s.listeners):
        want = ("HBONE",) if waypoint else ("HTTP",)
        if lst.protocol not in want:
            probs.append(problem("MF0108", f"spec.listeners[{i}].protocol {lst.protocol!r} is not supported for a "
                                 f"{'waypoint' if waypoint else 'gateway'}", ctx.at(f"spec.listeners[{i}].protocol"),
                                 obj=ctx.ref, hint=f"use protocol: {want[0]}"
                                 + ("" if waypoint else " (HTTPS/TLS/TCP listeners are not implemented)")))
        if waypoint and lst.port != m.DEFAULT_EAST_WEST_GATEWAY_PORT:
            probs.append(problem("MF0102", f"spec.listeners[{i}].port: a waypoint listens for HBONE on "
                                 f"{m.DEFAULT_EAST_WEST_GATEWAY_PORT}", ctx.at(f"spec.listeners[{i}].port"), obj=ctx.ref,
                                 hint=f"port: {m.DEFAULT_EAST_WEST_GATEWAY_PORT}"))
        allowed = lst.allowed_routes.namespaces.from_ if lst.allowed_routes and lst.allowed_routes.namespaces else "Same"
        listeners.append(m.GatewayListener(lst.name, lst.port, lst.protocol, lst.hostname or "", allowed))
    seen: dict[int, str] = {}
    for i, lst2 in enumerate(listeners):
        if lst2.port in seen and not waypoint:
            probs.append(problem("MF0102", f"spec.listeners[{i}]: port {lst2.port} is also listener {seen[lst2.port]!r}'s",
                                 ctx.at(f"spec.listeners[{i}].port"), obj=ctx.ref,
                                 hint="one listener per port (hostnames on one port are not implemented)"))
        seen.setdefault(lst2.port, lst2.name)
    clusters_text = meta.annotations.get(m.CLUSTERS_ANNOTATION, "")
    clusters = tuple(c.strip() for c in clusters_text.split(",") if c.strip())
    waypoint_for = meta.labels.get("istio.io/waypoint-for", "service")
    if waypoint and waypoint_for not in ("service", "all"):
        probs.append(problem("MF0108", f"metadata.labels: istio.io/waypoint-for {waypoint_for!r} is not supported",
                             ctx.at("metadata.labels"), obj=ctx.ref, hint="use service (the default) or all"))
    if probs:
        return None, probs
    return m.Gateway(namespace=meta.namespace or "", name=meta.name, gateway_class=s.gateway_class_name,
                     listeners=tuple(listeners), clusters=clusters, waypoint_for=waypoint_for,
                     labels=MappingProxyType(dict(meta.labels)), api_version=ctx.doc.data["apiVersion"],
                     pos=ctx.pos, field_pos=ctx.field_pos), []


def _conv_pool(ctx: _Ctx, meta: Metadata, s: InferencePoolSpec) -> Converted:
    probs: list[Problem] = []
    if not s.selector.match_labels:
        probs.append(problem("MF0103", "spec.selector.matchLabels: an InferencePool selects its model servers by label",
                             ctx.at("spec.selector"), obj=ctx.ref, hint="add matchLabels, e.g. app: vllm"))
    if not s.target_ports:
        probs.append(problem("MF0103", "spec.targetPorts: at least one port the model servers listen on",
                             ctx.at("spec.targetPorts"), obj=ctx.ref, hint="add targetPorts: [{number: 8000}]"))
    ref = s.endpoint_picker_ref
    if (ref.kind or "Service") != "Service" or (ref.group or "") not in _CORE_GROUPS:
        probs.append(problem("MF0108", "spec.endpointPickerRef: only a Service reference is supported",
                             ctx.at("spec.endpointPickerRef"), obj=ctx.ref, hint="remove group/kind"))
    if probs:
        return None, probs
    return m.InferencePool(namespace=meta.namespace or "", name=meta.name,
                           selector=MappingProxyType(dict(s.selector.match_labels)),
                           target_ports=tuple(p.number for p in s.target_ports), picker_name=ref.name,
                           picker_port=ref.port.number if ref.port else None, failure_mode=ref.failure_mode,
                           api_version=ctx.doc.data["apiVersion"], pos=ctx.pos, field_pos=ctx.field_pos), []


_CONVERT: dict[str, Callable[[_Ctx, Metadata, Any], Converted]] = {
    "Federation": _conv_federation,
    "Cluster": _conv_cluster,
    "TrustDomain": _conv_trust,
    "GlobalService": _conv_service,
    "LabCluster": _conv_lab,
    "DestinationRule": _conv_dr,
    "AuthorizationPolicy": _conv_authz,
    "HTTPRoute": _conv_route,
    "TCPRoute": _conv_route,
    "GRPCRoute": _conv_route,
    "Namespace": _conv_namespace,
    "Gateway": _conv_gateway,
    "InferencePool": _conv_pool,
}


def kind_of(obj: FleetObject) -> str:
    if isinstance(obj, m.Route):
        return obj.kind
    return type(obj).__name__


def ref_of(obj: FleetObject) -> ObjectRef:
    """ObjectRef for any model object (used by validation and plan)."""
    kind = kind_of(obj)
    if isinstance(obj, m.LabCluster):
        return ObjectRef(kind, obj.cluster)
    if isinstance(obj, m.GlobalService | m.DestinationRule | m.AuthorizationPolicy | m.Route | m.Gateway
                  | m.InferencePool):
        return ObjectRef(kind, obj.name, obj.namespace)
    return ObjectRef(kind, obj.name)


__all__ = ["KINDS", "FleetObject", "Parsed", "Path", "did_you_mean", "kind_of", "parse_duration_s",
           "parse_object", "ref_of"]
