"""Benchmark of the federation core: build, render all proxies, and per-change deltas at scale.

    python -m benchmarks.graph [--clusters 50] [--services 2000] [--endpoints 100000]
                               [--nodes-per-cluster 3] [--exports 5] [--deltas 200] [--repeat 3]

Synthetic federation: clusters in networks of 5 clusters each and 5 regions; every cluster its own
trust domain, all federated with each other; each service exported from `--exports` clusters with
its endpoints spread evenly over them and their nodes; one Federation-wide traffic policy with
outlier detection and failoverPriority [network, region, zone]. Every node runs a ztunnel and
every cluster an east-west gateway.

Figures (medians over `--repeat` runs, printed as one JSON object on the last line):
- `full_build_s`: graph + trust + failover engine from the snapshot and one complete observation
  per cluster (building the observation objects themselves is not timed: discovery does that);
- `render_all_s`: every proxy's ProxyConfig from scratch;
- `delta_ms_p50`/`delta_ms_p99`: one endpoint flips readiness (a partial observation) -> the
  graph, views and every affected proxy's ConfigDelta;
- `rss_mib`: peak resident set size of the process.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from types import MappingProxyType

from clusters.kube.observation import ClusterObservation, EndpointInfo, NodeInfo, ServicePortInfo
from federation.core.failover import FailoverEngine
from federation.core.graph import EndpointGraph
from federation.core.render import Renderer
from federation.core.trust_graph import TrustGraph
from gitops.model import (
    Cluster,
    ClusterApi,
    ClusterApiKind,
    ClusterName,
    ConfigSnapshot,
    EastWestGateway,
    Federation,
    GlobalService,
    LocalityLbSetting,
    NetworkName,
    OutlierDetection,
    Revision,
    ServiceKey,
    ServicePort,
    TrafficPolicy,
    TrustDomain,
    TrustDomainName,
)

CLUSTERS_PER_NETWORK = 5
REGIONS = 5


def synthetic(clusters: int, services: int, endpoints: int, nodes: int,
              exports: int) -> tuple[ConfigSnapshot, list[ClusterObservation]]:
    names = [f"c{i:03d}" for i in range(clusters)]
    tds = [TrustDomainName(f"{n}.mesh.local") for n in names]
    cl: dict[str, Cluster] = {}
    for i, n in enumerate(names):
        cl[n] = Cluster(
            name=ClusterName(n), network=NetworkName(f"net-{i // CLUSTERS_PER_NETWORK}"),
            region=f"region-{i % REGIONS}", zone=f"region-{i % REGIONS}-a", trust_domain=tds[i],
            api=ClusterApi(ClusterApiKind.LAB, f"lab-{n}"),
            east_west_gateway=EastWestGateway(f"172.31.{i // 250}.{i % 250 + 1}"),
            pod_cidrs=(f"10.{i % 250}.0.0/16",),
        )
    trust: dict[str, TrustDomain] = {td: TrustDomain(td, tuple(t for t in tds if t != td)) for td in tds}
    exports = min(exports, clusters)
    svc_map: dict[ServiceKey, GlobalService] = {}
    export_of: list[list[str]] = []
    for s in range(services):
        ns, name = f"ns{s % 20}", f"svc{s}"
        ex = [names[(s * 7 + j * max(1, clusters // exports)) % clusters] for j in range(exports)]
        ex = list(dict.fromkeys(ex))
        export_of.append(ex)
        svc_map[ServiceKey(ns, name)] = GlobalService(
            namespace=ns, name=name, export_from=tuple(ClusterName(c) for c in ex),
            ports=(ServicePort("http", 80, 8080),), service_account=name,
            hostname=f"{name}.{ns}.svc.clusterset.local")
    policy = TrafficPolicy(
        outlier_detection=OutlierDetection(consecutive_gateway_errors=3, max_ejection_percent=50),
        locality_lb=LocalityLbSetting(failover_priority=(
            "topology.istio.io/network", "topology.kubernetes.io/region", "topology.kubernetes.io/zone")))
    snap = ConfigSnapshot(
        revision=Revision("0" * 40, "synthetic"),
        federation=Federation("bench", "bench-mesh", default_traffic_policy=policy),
        clusters=MappingProxyType(cl), trust_domains=MappingProxyType(trust),
        services=MappingProxyType(svc_map), lab_clusters=MappingProxyType({}),
        destination_rules=MappingProxyType({}), authorization_policies=(), routes=(),
    )
    per_cluster: dict[str, list[EndpointInfo]] = {n: [] for n in names}
    keys = list(svc_map)
    total_slots = sum(len(e) for e in export_of)
    per_slot, extra = divmod(endpoints, total_slots)
    slot = 0
    port = (ServicePortInfo("http", 80, 8080),)
    for s, key in enumerate(keys):
        for c in export_of[s]:
            count = per_slot + (1 if slot < extra else 0)
            slot += 1
            i = names.index(c) if clusters <= 64 else int(c[1:])
            eps = per_cluster[c]
            for p in range(count):
                k = len(eps)
                eps.append(EndpointInfo(
                    namespace=key.namespace, service=key.name, pod=f"{key.name}-{p}",
                    address=f"10.{i % 250}.{1 + k // 250 % 250}.{k % 250 + 1}", node=f"node-{k % nodes}",
                    service_account=key.name, ports=port))
    obs = []
    for i, n in enumerate(names):
        ns_ = tuple(NodeInfo(f"node-{k}", f"10.{i % 250}.0.{k + 1}", cl[n].region, cl[n].zone)
                    for k in range(nodes))
        obs.append(ClusterObservation(n, 0.0, True, ns_, (), tuple(per_cluster[n])))
    return snap, obs


def run_once(snap: ConfigSnapshot, obs: list[ClusterObservation], deltas: int) -> dict[str, float]:
    gc.collect()
    t0 = time.perf_counter()
    graph = EndpointGraph(snap)
    engine = FailoverEngine(snap, graph, TrustGraph(snap))
    for o in obs:
        engine.observe(o)
    t1 = time.perf_counter()
    renderer = Renderer(engine)
    configs = renderer.render_all()
    t2 = time.perf_counter()
    # deltas: flip one endpoint's readiness at a time, spread over clusters and services
    samples: list[float] = []
    for k in range(deltas):
        o = obs[(k * 7) % len(obs)]
        if not o.endpoints:
            continue
        info = o.endpoints[(k * 7919) % len(o.endpoints)]
        flipped = EndpointInfo(info.namespace, info.service, info.pod, info.address, info.node,
                               info.service_account, info.ports, ready=not info.ready)
        partial = ClusterObservation(o.cluster, float(k), False, (), (), (flipped,))
        restore = ClusterObservation(o.cluster, float(k), False, (), (), (info,))
        for step in (partial, restore):
            s0 = time.perf_counter()
            change, _ = engine.observe(step)
            update = renderer.update(change)
            samples.append((time.perf_counter() - s0) * 1000)
            if not update.deltas:
                raise AssertionError("a readiness flip produced no delta")
    samples.sort()
    return {
        "full_build_s": t1 - t0,
        "render_all_s": t2 - t1,
        "delta_ms_p50": samples[len(samples) // 2] if samples else 0.0,
        "delta_ms_p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))] if samples else 0.0,
        "proxies": float(len(configs)),
        "endpoint_refs": float(sum(len(s.endpoints) for c in configs.values() for s in c.services)),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.graph", description=__doc__.split("\n\n")[0])
    ap.add_argument("--clusters", type=int, default=50)
    ap.add_argument("--services", type=int, default=2000)
    ap.add_argument("--endpoints", type=int, default=100_000)
    ap.add_argument("--nodes-per-cluster", type=int, default=3)
    ap.add_argument("--exports", type=int, default=5, help="clusters each service is exported from")
    ap.add_argument("--deltas", type=int, default=200, help="readiness flips (each measured twice)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    snap, obs = synthetic(args.clusters, args.services, args.endpoints, args.nodes_per_cluster, args.exports)
    runs = []
    for r in range(args.repeat):
        res = run_once(snap, obs, args.deltas)
        runs.append(res)
        print(f"run {r + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in res.items()), file=sys.stderr)
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "clusters": args.clusters, "services": args.services,
        "endpoints": sum(len(o.endpoints) for o in obs),
        "nodes_per_cluster": args.nodes_per_cluster, "exports_per_service": args.exports,
        "proxies": int(med["proxies"]), "endpoint_refs_rendered": int(med["endpoint_refs"]),
        "full_build_s": round(med["full_build_s"], 3), "render_all_s": round(med["render_all_s"], 3),
        "delta_ms_p50": round(med["delta_ms_p50"], 3), "delta_ms_p99": round(med["delta_ms_p99"], 3),
        "rss_mib": round(rss_mib, 1), "repeat": args.repeat,
    }))


if __name__ == "__main__":
    main()
