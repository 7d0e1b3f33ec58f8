"""Build ConfigSnapshots and observations for the core's tests directly from the model dataclasses.

`fleet()` mirrors examples/fleet: clusters east/west/south on networks net-east/net-west/net-south,
regions us-east (east, south) and us-west (west), one trust domain per cluster all federated,
services shop/checkout (all three), shop/cart (east, west), shop/checkout-v2 (east), a
DestinationRule with outlier detection and failoverPriority for checkout, an AuthorizationPolicy,
a 90/10 HTTPRoute, and LabClusters with 2 nodes each. Keyword arguments change one factor at a
time so parametrized tests read as matrices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType

from clusters.kube.observation import ClusterObservation, EndpointInfo, NodeInfo
from gitops.model import (
    AuthorizationPolicy,
    AuthzAction,
    AuthzRule,
    AuthzSource,
    BackendRef,
    Cluster,
    ClusterApi,
    ClusterApiKind,
    ClusterName,
    ConfigSnapshot,
    DestinationRule,
    DistributeRule,
    EastWestGateway,
    FailoverRule,
    Federation,
    GlobalService,
    LabCluster,
    LabNode,
    LabWorkload,
    LocalityLbSetting,
    NetworkName,
    OutlierDetection,
    PartitionMode,
    PartitionPolicy,
    Revision,
    Route,
    ServiceKey,
    ServicePort,
    TrafficPolicy,
    TrustDomain,
    TrustDomainName,
)
from gitops.problems import SourcePos

SHA = "1234567890abcdef1234567890abcdef12345678"
CHECKOUT = ServiceKey("shop", "checkout")
CART = ServiceKey("shop", "cart")
CHECKOUT_V2 = ServiceKey("shop", "checkout-v2")

# name, network, region, zone, gateway, pod cidr
CLUSTERS = (
    ("east", "net-east", "us-east", "us-east-1a", "172.30.0.11", "10.10.0.0/16"),
    ("west", "net-west", "us-west", "us-west-2a", "172.30.0.12", "10.20.0.0/16"),
    ("south", "net-south", "us-east", "us-east-1b", "172.30.0.13", "10.30.0.0/16"),
)


def cluster(name: str, network: str, region: str, zone: str, gateway: str | None, cidr: str,
            trust_domain: str | None = None) -> Cluster:
    return Cluster(
        name=ClusterName(name), network=NetworkName(network), region=region, zone=zone,
        trust_domain=TrustDomainName(trust_domain or f"{name}.mesh.local"),
        api=ClusterApi(ClusterApiKind.LAB, f"lab-{name}"),
        east_west_gateway=EastWestGateway(gateway) if gateway else None,
        pod_cidrs=(cidr,), pos=SourcePos(f"clusters/{name}.yaml", 3, 1),
    )


def service(ns: str, name: str, export_from: Sequence[str], sa: str | None = None,
            policy: TrafficPolicy | None = None) -> GlobalService:
    return GlobalService(
        namespace=ns, name=name, export_from=tuple(ClusterName(c) for c in export_from),
        ports=(ServicePort("http", 80, 8080, "http"),), service_account=sa or name,
        hostname=f"{name}.{ns}.svc.clusterset.local", traffic_policy=policy,
        pos=SourcePos(f"services/{ns}/{name}.yaml", 3, 1),
    )


def outlier(**kw: object) -> OutlierDetection:
    base: dict[str, object] = {"consecutive_5xx_errors": 5, "consecutive_gateway_errors": 3, "interval_s": 5.0,
                               "base_ejection_time_s": 15.0, "max_ejection_percent": 100}
    base.update(kw)
    return OutlierDetection(**base)  # type: ignore[arg-type]


def locality(failover_priority: Sequence[str] = (), failover: Sequence[tuple[str, str]] = (),
             distribute: Sequence[tuple[str, Mapping[str, int]]] = (), enabled: bool = True) -> LocalityLbSetting:
    return LocalityLbSetting(
        enabled=enabled, failover_priority=tuple(failover_priority),
        failover=tuple(FailoverRule(a, b) for a, b in failover),
        distribute=tuple(DistributeRule(a, MappingProxyType(dict(b))) for a, b in distribute),
    )


DEFAULT_PRIORITY = ("topology.istio.io/network", "topology.kubernetes.io/region")


def fleet(*, checkout_policy: TrafficPolicy | None = None, partition: PartitionMode = PartitionMode.FREEZE,
          lease_ttl_s: float = 30.0, federates: Mapping[str, Sequence[str]] | None = None,
          clusters: Sequence[tuple[str, str, str, str, str | None, str]] = CLUSTERS,
          authz: Sequence[AuthorizationPolicy] | None = None, sha: str = SHA,
          replicas: Mapping[str, int] | None = None) -> ConfigSnapshot:
    names = [c[0] for c in clusters]
    cl = {c[0]: cluster(*c) for c in clusters}
    if federates is None:
        federates = {n: [m for m in names if m != n] for n in names}
    tds = {}
    for n in names:
        td = TrustDomainName(f"{n}.mesh.local")
        tds[td] = TrustDomain(td, tuple(TrustDomainName(f"{m}.mesh.local") for m in federates.get(n, ())),
                              pos=SourcePos(f"trust/{td}.yaml", 3, 1))
    svcs = {
        CHECKOUT: service("shop", "checkout", [n for n in ("east", "west", "south") if n in names]),
        CART: service("shop", "cart", [n for n in ("east", "west") if n in names]),
        CHECKOUT_V2: service("shop", "checkout-v2", [n for n in ("east",) if n in names], sa="checkout"),
    }
    if checkout_policy is None:
        checkout_policy = TrafficPolicy(outlier_detection=outlier(), locality_lb=locality(DEFAULT_PRIORITY))
    drs = {CHECKOUT: DestinationRule("shop", "checkout", "checkout.shop.svc.clusterset.local", checkout_policy,
                                     pos=SourcePos("policies/shop/checkout.yaml", 3, 1))}
    if authz is None:
        authz = (AuthorizationPolicy(
            "shop", "checkout-allow-frontend", AuthzAction.ALLOW,
            (AuthzRule((AuthzSource(principals=tuple(f"{n}.mesh.local/ns/shop/sa/frontend" for n in names)),),
                       ports=(8080,)),),
            selector=MappingProxyType({"app": "checkout"}),
            pos=SourcePos("policies/shop/checkout-allow-frontend.yaml", 3, 1)),)
    routes = (Route("HTTPRoute", "shop", "checkout-canary", CHECKOUT,
                    (BackendRef("checkout", "shop", 80, 90), BackendRef("checkout-v2", "shop", 80, 10)),
                    pos=SourcePos("policies/shop/checkout-canary.yaml", 3, 1)),)
    reps = {"checkout": 2, "cart": 2, "checkout-v2": 1, "frontend": 1}
    reps.update(replicas or {})
    labs = {}
    for n in names:
        workloads = [LabWorkload("shop", "checkout", "checkout", reps["checkout"], (), "checkout")]
        if n in ("east", "west"):
            workloads.append(LabWorkload("shop", "cart", "cart", reps["cart"], (), "cart"))
        if n == "east":
            workloads.append(LabWorkload("shop", "checkout-v2", "checkout-v2", reps["checkout-v2"], ("node-2",),
                                         "checkout"))
        workloads.append(LabWorkload("shop", "frontend", None, reps["frontend"], ("node-1",), "frontend",
                                     role="client"))
        labs[n] = LabCluster(ClusterName(n), (LabNode("node-1"), LabNode("node-2")), tuple(workloads))
    fed = Federation("shop-fleet", "shop-mesh", partition=PartitionPolicy(lease_ttl_s, partition),
                     default_traffic_policy=TrafficPolicy(outlier_detection=outlier(consecutive_gateway_errors=5,
                                                                                    interval_s=10.0,
                                                                                    base_ejection_time_s=30.0)),
                     pos=SourcePos("federation.yaml", 3, 1))
    return ConfigSnapshot(
        revision=Revision(sha, "test fleet"), federation=fed,
        clusters=MappingProxyType(cl), trust_domains=MappingProxyType(tds), services=MappingProxyType(svcs),
        lab_clusters=MappingProxyType(labs), destination_rules=MappingProxyType(drs),
        authorization_policies=tuple(authz), routes=routes,
    )


def with_checkout_policy(snap: ConfigSnapshot, policy: TrafficPolicy, sha: str | None = None) -> ConfigSnapshot:
    drs = dict(snap.destination_rules)
    drs[CHECKOUT] = replace(drs[CHECKOUT], traffic_policy=policy)
    rev = Revision(sha, "policy change") if sha else snap.revision
    return replace(snap, destination_rules=MappingProxyType(drs), revision=rev)


def endpoint(ns: str, svc: str, pod: str, address: str, node: str, sa: str | None = None,
             ready: bool = True, zone: str = "") -> EndpointInfo:
    return EndpointInfo(ns, svc, pod, address, node, sa or svc, ready=ready, zone=zone, labels={"app": svc})


def observation(cluster: str, endpoints: Sequence[EndpointInfo], nodes: Sequence[NodeInfo] = (),
                complete: bool = True, at_s: float = 0.0,
                removed: Sequence[tuple[str, str, str]] = ()) -> ClusterObservation:
    return ClusterObservation(cluster, at_s, complete, tuple(nodes), (), tuple(endpoints),
                              removed_endpoints=tuple(removed))
