"""Explain: for a client in one cluster, how traffic to one service is spread, and why.

`explain_service` returns plain data (for `-o json|yaml`) built from the same `ServiceView` the
renderer puts into that client's ProxyConfig, so what it says is what the proxies do: the policy
in force (object, file:line, commit), the tiers in order with the rule that put each endpoint
group there, every endpoint with its health (ready; ejected, with the reason and the vote that
ejected it, straight from the engine's ejection state; and for a remote cluster the pods behind its
gateway), the share each tier gets (Envoy's priority load: health × 1.4 spilled in
order, panic when normalized health is below the threshold), the clusters left out and why, the
route split, and trust problems that concern this client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from federation.core.failover import Ejection, FailoverEngine, Locality, priority_reason
from federation.core.graph import describe_gateway
from federation.core.trust_graph import CODE_UNTRUSTED_ROUTE
from gitops.model import RouteRule, ServiceKey
from gitops.validate import host_match


class ExplainError(LookupError):
    """The service or cluster named does not exist; the message lists what does."""


def resolve_service(engine: FailoverEngine, name: str) -> ServiceKey:
    """Accept a hostname, `namespace/name`, `name.namespace`, or a unique `name`."""
    return resolve_service_named(engine, name)[0]


def resolve_service_named(engine: FailoverEngine, name: str) -> tuple[ServiceKey, str]:
    """`resolve_service`, and which form of the name matched, in words: the clusterset hostname,
    Istio's namespace sameness (`<svc>.<ns>.svc.cluster.local` names the global service), ..."""
    graph = engine.graph
    if name in graph.hostnames:
        return graph.hostnames[name], "the service's hostname"
    if "." in name and "/" not in name:
        got = host_match(name, "", engine.snapshot.federation.clusterset_domain)
        if got is not None and got[0] in graph.services:
            return got
    if "/" in name:
        ns, _, svc = name.partition("/")
        key = ServiceKey(ns, svc)
        if key in graph.services:
            return key, "namespace/name"
    return _resolve_short(engine, name), "a unique service name"


def _resolve_short(engine: FailoverEngine, name: str) -> ServiceKey:
    graph = engine.graph
    parts = name.split(".")
    if len(parts) >= 2 and ServiceKey(parts[1], parts[0]) in graph.services:
        return ServiceKey(parts[1], parts[0])
    matches = [k for k in graph.services if k.name == name]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(str(k) for k in graph.services) or "none"
    if len(matches) > 1:
        raise ExplainError(f"service name {name!r} is ambiguous ({', '.join(map(str, matches))}); "
                           f"give it as namespace/name")
    raise ExplainError(f"no global service {name!r} in the fleet repo (known: {known})")


def client_locality(engine: FailoverEngine, cluster: str, zone: str | None = None) -> Locality:
    graph = engine.graph
    if cluster not in graph.clusters:
        raise ExplainError(f"no cluster {cluster!r} in the fleet repo (known: {', '.join(graph.clusters)})")
    cv = graph.clusters[cluster]
    nodes = sorted(graph.nodes_of(cluster).values(), key=lambda n: n.name)
    if zone is not None:
        nodes = [n for n in nodes if (n.zone or cv.zone) == zone] or []
        if not nodes and zone != cv.zone:
            zones = sorted({n.zone or cv.zone for n in graph.nodes_of(cluster).values()} | {cv.zone})
            raise ExplainError(f"cluster {cluster} has no node in zone {zone!r} (zones: {', '.join(zones)})")
    if nodes:
        n = nodes[0]
        labels = tuple(sorted((k, v) for k, v in n.labels.items() if k in engine.relevant_labels))
        return Locality(cv.network, cluster, n.region or cv.region, n.zone or cv.zone, labels)
    return Locality(cv.network, cluster, cv.region, zone or cv.zone)


def explain_service(engine: FailoverEngine, service: str, from_cluster: str,
                    zone: str | None = None) -> dict[str, Any]:
    key, matched = resolve_service_named(engine, service)
    source = client_locality(engine, from_cluster, zone)
    policy = engine.policies[key]
    view = engine.view(key, source)
    load = view.load(policy.panic_threshold_pct)
    ejected = engine.ejections(key)
    tiers: list[dict[str, Any]] = []
    for piece, tier in zip(view.pieces, view.tier_of_piece, strict=True):
        while len(tiers) <= tier:
            t = len(tiers)
            tiers.append({
                "tier": t,
                "share": round(load.shares[t], 4) if t < len(load.shares) else 0.0,
                "health_pct": round(load.health_pct[t], 1) if t < len(load.health_pct) else 0.0,
                "panic": bool(load.panic[t]) if t < len(load.panic) else False,
                "raw_priority": piece.raw,
                "groups": [],
            })
        eps = [e for e in view.endpoints if e.tier == tier and e.cluster == piece.cluster
               and (e.gateway != "") == piece.via_gateway]
        members = []
        for m in piece.members:
            members.append({
                "pod": m.uid, "address": m.address, "node": m.node, "zone": m.zone, "ready": m.ready,
                **_ejection_fields(ejected, m.uid),
                "healthy": m.ready and m.uid not in ejected,
            })
        tiers[tier]["groups"].append({
            "cluster": piece.cluster,
            "network": piece.locality.network,
            "locality": f"{piece.locality.region}/{piece.locality.zone}",
            "path": "via east-west gateway " + describe_gateway(engine.graph.clusters[piece.cluster])
            if piece.via_gateway and eps else "direct (same network)",
            "why": priority_reason(policy, source, piece.locality, piece.raw),
            "endpoints": [{"uid": e.workload_uid, "healthy": e.healthy, "weight": e.weight,
                           **_ejection_fields(ejected, e.workload_uid), "identity": e.identity} for e in eps],
            "pods": members,
        })
    trust_problems = [p.as_dict() for p in engine.trust.route_problems()
                      if p.code == CODE_UNTRUSTED_ROUTE and p.obj is not None
                      and p.obj.name == key.name and p.obj.namespace == key.namespace
                      and f"cluster {from_cluster} " in p.message]
    od = policy.outlier
    snap = engine.snapshot
    dr = snap.destination_rules.get(key)
    dr_host = host_match(dr.host, dr.namespace, snap.federation.clusterset_domain) if dr is not None else None
    waypoint = snap.waypoint_for(key)
    cp = policy.connection_pool
    return {
        "service": policy.hostname,
        "name": {"asked": service, "matched": matched},
        "from": {"cluster": source.cluster, "network": source.network, "region": source.region,
                 "zone": source.zone},
        "revision": engine.snapshot.revision.sha,
        "policy": {
            "object": policy.policy_ref or "(none: defaults)",
            "file": str(policy.source) if policy.source else "",
            "mode": policy.mode.value,
            "failover_priority": list(policy.locality.failover_priority) if policy.locality else [],
            "failover": [f"{r.from_region}->{r.to_region}" for r in policy.locality.failover] if policy.locality else [],
            "outlier_detection": None if od is None else {
                "consecutive_5xx_errors": od.consecutive_5xx_errors,
                "consecutive_gateway_errors": od.consecutive_gateway_errors,
                "base_ejection_time_s": od.base_ejection_time_s,
                "max_ejection_percent": od.max_ejection_percent,
            },
            "panic_threshold_pct": policy.panic_threshold_pct,
            "overprovisioning_factor": 1.4,
            "host": {"written": dr.host, "matched": dr_host[1]} if dr is not None and dr_host is not None else None,
            "connection_pool": None if cp is None else {
                "max_connections": cp.max_connections, "http1_max_pending_requests": cp.http1_max_pending_requests,
                "max_requests_per_connection": cp.max_requests_per_connection},
        },
        "waypoint": None if waypoint is None else {
            "gateway": f"{waypoint.namespace}/{waypoint.name}", "file": str(waypoint.pos),
            "note": "node ztunnels send this service's traffic to the waypoint of their own cluster; routes, "
                    "request-level policies and 5xx outlier detection apply there, per request"},
        "shares_rule": ("tier health = min(100, 1.4 × healthy/total); tiers take min(remaining, health) in "
                        "order; scaled up when the sum is below 100; a tier below the panic threshold "
                        "uses all its hosts"),
        "total_panic": load.total_panic,
        "tiers": tiers,
        "excluded": [{"cluster": c, "why": why} for c, why in view.excluded],
        "ejections": {
            "active": sorted(ejected),
            "endpoints": [{"uid": uid, "reason": ej.reason.value, "since_s": ej.since_s, "trigger": ej.trigger,
                           "count": ej.count} for uid, ej in sorted(ejected.items())],
        },
        "routes": _routes(engine, key),
        "problems": trust_problems,
    }


def _ejection_fields(ejected: Mapping[str, Ejection], uid: str) -> dict[str, Any]:
    ej = ejected.get(uid)
    return {"ejected": ej is not None, "reason": ej.reason.value if ej is not None else ""}


def _routes(engine: FailoverEngine, key: ServiceKey) -> list[dict[str, Any]]:
    """Every backend of every rule of the routes attached to the service (rule "" for an L4 route,
    applied per connection; named or numbered rules of an L7 route, applied per request)."""
    out: list[dict[str, Any]] = []
    per_request = engine.snapshot.waypoint_for(key) is not None
    for r in engine.snapshot.routes:
        if r.parent_service != key:
            continue
        for ri, rule in enumerate(r.rules or (RouteRule(backends=r.backends),)):
            for b in rule.backends:
                svc = engine.graph.services.get(ServiceKey(b.namespace, b.name)) if b.kind == "Service" else None
                target = svc.hostname if svc is not None else f"{b.kind} {b.namespace}/{b.name}"
                out.append({"route": f"{r.kind} {r.namespace}/{r.name}", "file": str(r.pos),
                            "rule": (rule.name or str(ri)) if per_request else "", "to": target,
                            "weight": b.weight, "per": "request" if per_request else "connection"})
    return out


def explain_text(data: dict[str, Any]) -> str:
    """The human form of `explain_service` (what `meshfed explain` prints by default)."""
    out: list[str] = []
    src = data["from"]
    pol = data["policy"]
    out.append(f"{data['service']} from {src['cluster']} ({src['network']}, {src['region']}/{src['zone']}) "
               f"@ {data['revision'][:12]}")
    name = data.get("name") or {}
    if name.get("asked") and name["asked"] != data["service"]:
        out.append(f"name: {name['asked']} matched as {name['matched']}")
    where = f" ({pol['file']})" if pol["file"] else ""
    out.append(f"policy: {pol['object']}{where}; mode {pol['mode']}"
               + (f" [{', '.join(pol['failover_priority'])}]" if pol["failover_priority"] else "")
               + (f" [{', '.join(pol['failover'])}]" if pol["failover"] else ""))
    if pol.get("host"):
        out.append(f"policy host: {pol['host']['written']} ({pol['host']['matched']})")
    if pol.get("connection_pool"):
        cp = pol["connection_pool"]
        out.append("connection pool: " + ", ".join(f"{k} {v}" for k, v in cp.items() if v is not None))
    if data.get("waypoint"):
        out.append(f"waypoint: {data['waypoint']['gateway']} ({data['waypoint']['file']}): {data['waypoint']['note']}")
    od = pol["outlier_detection"]
    if od is not None:
        out.append(f"outlier detection: consecutive5xx {od['consecutive_5xx_errors']}, consecutiveGateway "
                   f"{od['consecutive_gateway_errors']}, base ejection {od['base_ejection_time_s']:g}s, "
                   f"maxEjectionPercent {od['max_ejection_percent']}; panic threshold "
                   f"{pol['panic_threshold_pct']:g}%")
    else:
        out.append("outlier detection: none (nothing is ever ejected; no locality failover)")
    for t in data["tiers"]:
        panic = " PANIC (all hosts)" if t["panic"] else ""
        out.append(f"tier {t['tier']}: {t['share'] * 100:.1f}% of traffic (health {t['health_pct']:g}%){panic}")
        for g in t["groups"]:
            out.append(f"  {g['cluster']} [{g['network']} {g['locality']}] {g['path']}")
            out.append(f"    why: {g['why']}")
            for e in g["endpoints"]:
                state = "healthy" if e["healthy"] else (f"EJECTED ({e['reason']})" if e["ejected"] else "unhealthy")
                out.append(f"    - {e['uid']} weight {e['weight']} {state}")
            if g["path"] != "direct (same network)":
                for p in g["pods"]:
                    state = "ready" if p["ready"] else "not ready"
                    state += ", ejected" if p["ejected"] else ""
                    out.append(f"        · {p['pod']} {p['address']} ({state})")
    if data["total_panic"]:
        out.append("every tier is in panic: traffic is spread over all hosts by count")
    for ex in data["excluded"]:
        out.append(f"left out: {ex['cluster']}: {ex['why']}")
    quorum = [e["uid"] for e in data["ejections"]["endpoints"] if e["reason"] == "HealthReportQuorum"]
    if quorum:
        out.append("ejected for everyone (quorum of proxies' health reports): " + ", ".join(quorum))
    for e in data["ejections"]["endpoints"]:
        out.append(f"  {e['uid']}: {e['trigger']}")
    if data["routes"]:
        per = data["routes"][0].get("per", "connection")
        rules: dict[str, list[str]] = {}
        for r in data["routes"]:
            rules.setdefault(r.get("rule", ""), []).append(f"{r['to']} {r['weight']}")
        for rule, parts in rules.items():
            out.append(f"route split{' (rule ' + rule + ')' if rule else ''}, per {per}: " + ", ".join(parts))
    for p in data["problems"]:
        out.append(f"problem [{p['code']}] {p['message']}")
    out.append(f"shares: {data['shares_rule']}")
    return "\n".join(out)
