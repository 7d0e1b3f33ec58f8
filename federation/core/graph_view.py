"""The federation graph as plain data: what `meshfed graph` exports and the web console draws.

One builder for both, so the picture an operator sees in the browser is the one they can export
(`-o json|dot|mermaid`): networks, clusters (region/zone, trust domain, east-west gateway, lease
state, nodes), trust edges between trust domains, every global service with its endpoints per
cluster and their health, and the failover state of every (service, client cluster).

Pure: read from a `FailoverEngine` (offline: the LabClusters standing in for discovery; live: the
reconciler's engine). It asks the engine for views but never evaluates them (`evaluate` records
shares for FailedOver/FailedBack; this must not), so building the graph changes no decision.

Health of a service in a cluster (`EdgeHealth`): `healthy` when every endpoint there is ready and
not ejected, `degraded` when some are, `down` when none is (or the cluster's gateway aggregate is
ejected: clients elsewhere stopped sending to it), `empty` when the cluster has no endpoint of the
service. A client cluster is failed over for a service when tier 0 of its view (from its first
node's locality, as `meshfed explain --from CLUSTER` shows it) takes less than all of its traffic;
`to` names the clusters beyond tier 0 that take a share.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from federation.core.explain import client_locality
from federation.core.failover import FailoverEngine, aggregate_uid

FULL_SHARE = 1.0 - 1e-9   # tier 0 "takes all" (the same tolerance `FailoverEngine.evaluate` uses)


class EdgeHealth(str, Enum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"
    EMPTY = "empty"


def edge_health(total: int, healthy: int, aggregate_ejected: bool = False) -> EdgeHealth:
    if total == 0:
        return EdgeHealth.EMPTY
    if aggregate_ejected or healthy == 0:
        return EdgeHealth.DOWN
    return EdgeHealth.HEALTHY if healthy == total else EdgeHealth.DEGRADED


def graph_data(engine: FailoverEngine) -> dict[str, Any]:
    """The global graph as plain JSON-able data (see the module docstring for the meaning)."""
    graph = engine.graph
    clusters = []
    for name, cv in graph.clusters.items():
        clusters.append({
            "name": name, "network": cv.network, "region": cv.region, "zone": cv.zone,
            "trust_domain": cv.trust_domain, "gateway": cv.gateway or None,
            "lease": engine.lease_state(name).value,
            "nodes": [{"name": n.name, "address": n.address, "zone": n.zone}
                      for n in sorted(graph.nodes_of(name).values(), key=lambda n: n.name)],
        })
    services = []
    failovers = []
    for key, svc in graph.services.items():
        ejected = engine.ejections(key)
        per_cluster = []
        for cluster, eps in sorted(graph.endpoints_of(key).items()):
            endpoints = [{"uid": e.uid, "address": e.address, "node": e.node, "ready": e.ready,
                          "ejected": e.uid in ejected, "identity": e.identity}
                         for e in sorted(eps.values(), key=lambda e: e.uid)]
            healthy = sum(1 for e in endpoints if e["ready"] and not e["ejected"])
            agg_ejected = aggregate_uid(cluster, key) in ejected
            per_cluster.append({
                "cluster": cluster, "endpoints": endpoints, "healthy": healthy,
                "gateway_ejected": agg_ejected,
                "health": edge_health(len(endpoints), healthy, agg_ejected).value,
            })
        services.append({"name": str(key), "hostname": svc.hostname, "export_from": list(svc.export_from),
                         "policy": engine.policies[key].policy_ref, "clusters": per_cluster})
        failovers.extend(_failovers(engine, key))
    return {
        "revision": engine.snapshot.revision.sha,
        "networks": {n: cs for n, cs in sorted(graph.networks().items())},
        "clusters": clusters,
        "trust": [{"from": e.a, "to": e.b, "mutual": e.mutual} for e in engine.trust.edges()],
        "services": services,
        "failovers": failovers,
    }


def _failovers(engine: FailoverEngine, key: Any) -> list[dict[str, Any]]:
    policy = engine.policies[key]
    out = []
    for cluster in sorted(engine.graph.clusters):
        view = engine.view(key, client_locality(engine, cluster))
        shares = view.load(policy.panic_threshold_pct).shares
        if not shares or shares[0] >= FULL_SHARE:
            continue
        to = sorted({e.cluster for e in view.endpoints if e.tier > 0 and shares[e.tier] > 0})
        out.append({"service": policy.hostname, "from": cluster, "to": to,
                    "tier0_share": round(shares[0], 4), "policy": policy.policy_ref,
                    "file": str(policy.source) if policy.source else ""})
    return out
