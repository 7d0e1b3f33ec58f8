"""A three-cluster fleet built in code, mirroring examples/fleet (east, west, south).

Used by the pure topology tests and by the lab tier, so that the lab can be exercised without the
YAML loader; the lab tests also load examples/fleet itself when `gitops.load_worktree` exists.
"""

from __future__ import annotations

from types import MappingProxyType

from gitops.model import (
    Cluster,
    ClusterApi,
    ClusterApiKind,
    ClusterName,
    EastWestGateway,
    GlobalService,
    LabCluster,
    LabNode,
    LabWorkload,
    NetworkName,
    ServiceKey,
    ServicePort,
    TrustDomainName,
)

CLUSTERS = (("east", 10, 11, "us-east"), ("west", 20, 12, "us-west"), ("south", 30, 13, "sa-east"))


def cluster(name: str, octet: int, gw: int, region: str, nodes: int = 2) -> tuple[Cluster, LabCluster]:
    c = Cluster(
        name=ClusterName(name), network=NetworkName(f"net-{name}"), region=region, zone=f"{region}-1a",
        trust_domain=TrustDomainName(f"{name}.mesh.local"),
        api=ClusterApi(ClusterApiKind.LAB, f"lab-{name}"),
        east_west_gateway=EastWestGateway(f"172.30.0.{gw}"),
        pod_cidrs=(f"10.{octet}.0.0/16",), service_cidrs=(f"10.1{octet}.0.0/16",),
    )
    node_names = tuple(f"node-{i}" for i in range(1, nodes + 1))
    lab = LabCluster(
        cluster=ClusterName(name), nodes=tuple(LabNode(n) for n in node_names),
        workloads=(
            LabWorkload("shop", "checkout", "checkout", 2, node_names, "checkout"),
            LabWorkload("shop", "cart", "cart", 2, node_names, "cart"),
            LabWorkload("shop", "frontend", None, 1, node_names[:1], "frontend", role="client"),
        ),
    )
    return c, lab


def services() -> dict[ServiceKey, GlobalService]:
    out = {}
    for name in ("checkout", "cart"):
        s = GlobalService("shop", name, tuple(ClusterName(c[0]) for c in CLUSTERS),
                          (ServicePort("http", 80, 8080, "http"),), name, f"{name}.shop.svc.clusterset.local")
        out[s.key] = s
    return out


def fleet(n_clusters: int = 3, nodes: int = 2) -> tuple[dict[str, Cluster], dict[str, LabCluster],
                                                        dict[ServiceKey, GlobalService]]:
    clusters: dict[str, Cluster] = {}
    labs: dict[str, LabCluster] = {}
    specs = list(CLUSTERS) + [(f"c{i}", 40 + i, 20 + i, "r") for i in range(n_clusters)]
    for name, octet, gw, region in specs[:n_clusters]:
        c, lab = cluster(name, octet, gw, region, nodes)
        clusters[name], labs[name] = c, lab
    return MappingProxyType(clusters), MappingProxyType(labs), services()  # type: ignore[return-value]
