"""What operators ask the controller (`meshfed status/services/endpoints/explain/trust`), shaped
from the live objects: plain functions over the reconciler's snapshot, observations and rendered
configs, the engine, and the status of each part. They read, never change, and do no I/O; the
caller holds whatever lock guards the objects it passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from clusters.kube.observation import ClusterObservation
from gitops.model import ConfigSnapshot, TrustDomain
from ztunnel.api.config import ProxyConfig, ProxyMode


def services(snap: ConfigSnapshot | None, observations: Mapping[str, ClusterObservation]) -> list[dict[str, Any]]:
    """Every global service of the applied snapshot, with its endpoint counts per cluster."""
    out: list[dict[str, Any]] = []
    if snap is None:
        return out
    for key, svc in sorted(snap.services.items(), key=lambda kv: str(kv[0])):
        per = {}
        for cname, obs in observations.items():
            eps = [e for e in obs.endpoints if (e.namespace, e.service) == (key.namespace, key.name)]
            if eps:
                per[cname] = {"endpoints": len(eps), "ready": sum(1 for e in eps if e.ready)}
        _policy, pos = snap.traffic_policy_for(key)
        out.append({"service": str(key), "hostname": svc.hostname, "export_from": list(svc.export_from),
                    "ports": [p.port for p in svc.ports], "clusters": per,
                    "policy_source": str(pos) if pos else ""})
    return out


def endpoints(configs: Mapping[str, ProxyConfig], service: str, from_cluster: str | None) -> dict[str, Any]:
    """A service's endpoints as the first node proxy of `from_cluster` has them rendered. `service`
    is a hostname, `namespace/name` or `name[.namespace...]`."""
    pids = sorted(p for p in configs if configs[p].mode is ProxyMode.NODE and (from_cluster is None or
                                                                     configs[p].cluster == from_cluster))
    if not pids:
        return {"error": f"no node proxy rendered for cluster {from_cluster!r}"}
    cfg = configs[pids[0]]
    name = service.split(".")[0] if "/" not in service else service.split("/")[1]
    ns = service.split("/")[0] if "/" in service else (service.split(".")[1] if "." in service else "")
    for svc in cfg.services:
        if svc.hostname == service or (svc.name == name and (not ns or svc.namespace == ns)):
            return {
                "service": svc.hostname, "from": cfg.cluster, "viewer": cfg.proxy_id,
                "revision": cfg.stamp.revision, "policy_source": svc.policy_source,
                "endpoints": [{"workload": e.workload_uid, "cluster": e.cluster, "address": e.address,
                               "port": e.port, "via": e.gateway or e.hbone_address, "tier": e.tier,
                               "weight": e.weight, "healthy": e.healthy, "zone": e.zone}
                              for e in svc.endpoints]}
    return {"error": f"service {service} is not in the config of {cfg.proxy_id}"}


def explain(engine: Any, service: str, from_cluster: str, zone: str | None) -> dict[str, Any]:
    """`meshfed explain --controller`: the core's explain on the live engine — observations, leases
    and the ejections the proxies' health-report quorum decided, all from the engine's own state."""
    from federation.core.explain import ExplainError, explain_service

    if engine is None:
        return {"error": "the controller has not rendered a revision yet; see `meshfed status`", "usage": False}
    try:
        data = explain_service(engine, service, from_cluster, zone)
    except ExplainError as e:
        return {"error": str(e), "usage": True}
    data["live"] = True
    return data


def graph(engine: Any) -> dict[str, Any]:
    """`/api/v1/graph` (what `meshfed graph` exports, and the console draws) from the live engine:
    leases, ejections and failover state as the controller holds them now."""
    from federation.core.graph_view import graph_data

    if engine is None:
        return {"error": "the controller has not rendered a revision yet; see `meshfed status`"}
    return graph_data(engine)


def revisions(records: Sequence[Any]) -> list[dict[str, Any]]:
    """`/api/v1/revisions`: revision attempts (`store.RevisionRecord`), newest first, with the
    validation problems of a rejected one."""
    return [{"revision": r.sha, "subject": r.subject, "attempted_at_s": r.attempted_at_s,
             "ok": r.outcome == "applied", "problems": list(r.problems)} for r in records]


def fleet_clusters(snap: ConfigSnapshot | None) -> dict[str, dict[str, Any]]:
    """Per cluster of the applied snapshot, what the driver needs to run its agent."""
    if snap is None:
        return {}
    return {name: {"api_kind": c.api.kind.value, "context": c.api.context, "kubeconfig": c.api.kubeconfig,
                   "trust_domain": str(c.trust_domain), "network": str(c.network),
                   "lease_ttl_s": snap.federation.partition.lease_ttl_s,
                   "namespace_selector": c.namespace_selector.query()}
            for name, c in snap.clusters.items()}


# What a cluster agent says of its observation channel (`ClusterAgent.status`), shown per cluster
AGENT_CHANNEL_KEYS = ("observed_ready_endpoints", "observations_sent", "last_sent_s", "send_in_flight_s",
                      "observation_pending")


def assemble_status(rec: Mapping[str, Any], cs: Mapping[str, Any], agents: Mapping[str, Mapping[str, Any]],
                    git: Mapping[str, Any], *, state_dir: str, failover_events: int,
                    trust: list[dict[str, Any]], now_s: float, state_node: str = "") -> dict[str, Any]:
    """The status document (`meshfed status -o json`, `/api/v1/status`) from the reconciler's,
    the config service's, each agent's and the Git source's status. `state_node`: the id of the
    node whose state directory holds the store and the CA keys (where the state owner runs).

    A proxy is SYNCED only when it ACKed the latest config the reconciler rendered for it: one
    whose newest config has not reached the config service yet (a failed push waiting for its
    retry) is STALE there, and a rendered proxy the config service does not know yet is NOT SENT."""
    clusters = {}
    for name in sorted(set(rec.get("fleet_clusters", {})) | set(agents)):
        a, r = agents.get(name, {}), rec.get("clusters", {}).get(name, {})
        clusters[name] = {**r, **{k: a.get(k) for k in ("up", "lease_remaining_s", "last_error", "api", "context")},
                          "applied_revision": rec.get("applied", {}).get("revision", ""),
                          "draining": bool(rec.get("fleet_clusters", {}).get(name, {}).get("draining"))}
        channel = {k: a[k] for k in AGENT_CHANNEL_KEYS if k in a}
        if channel:  # the agent's own view and sends, next to the reconciler's (`ready_endpoints`)
            clusters[name]["agent"] = channel
    undelivered = set(rec.get("undelivered_proxies") or ())
    why = (rec.get("delivery") or {}).get("last_error") or "waiting for the next push"
    proxies = []
    for p in cs.get("proxies", []):
        if p["proxy"] in undelivered:
            undelivered.discard(p["proxy"])
            p = {**p, "sync": "STALE" if p["sync"] == "SYNCED" else p["sync"],
                 "last_failure": f"its newest config has not reached the config service: {why}"}
        proxies.append(p)
    for pid in sorted(undelivered):
        proxies.append({"proxy": pid, "sync": "NOT SENT", "connected": False, "desired_revision": "",
                        "acked_revision": "", "acked_version": "", "last_nack": "",
                        "last_failure": f"not delivered to the config service yet: {why}"})
    return {
        "controller": {"epoch": cs.get("epoch"), "config_port": cs.get("port"),
                       "bootstrap_port": cs.get("bootstrap_port"), "state_dir": state_dir,
                       "state_node": state_node,  # the node holding the store and CA keys
                       "lock": cs.get("lock"), "state": cs.get("state") or {}},
        "git": dict(git),
        "desired": rec.get("desired"), "applied": rec.get("applied"), "applying": rec.get("applying"),
        "waiting": rec.get("waiting"),
        "problems": rec.get("problems", []), "render_problems": rec.get("render_problems", []),
        "clusters": clusters,
        "draining": rec.get("draining", []), "removed_clusters": rec.get("removed_clusters", []),
        "proxies": proxies,
        "config_server": {k: v for k, v in cs.items() if k != "proxies"},
        "reconciler": dict(rec),
        "unhealthy_endpoints": rec.get("unhealthy_endpoints", []),
        "failover_events": failover_events,
        "trust": trust,
        "at_s": now_s,
    }


def trust_view(trust_domains: Mapping[str, TrustDomain], cas: Mapping[str, Any], now_s: float) -> dict[str, Any]:
    """`meshfed trust --controller`: who trusts whom, from the live CAs' material (`cas`: trust
    domain -> TrustDomainCA); trust domains with an external CA are named, not read."""
    from federation.core.trust_view import TrustMaterial, build_trust_view

    materials = {td: TrustMaterial(bundle=ca.bundle(), named_roots={r.name: r.cert for r in ca.roots},
                                   source="controller")
                 for td, ca in cas.items()}
    for td in set(trust_domains) - set(materials):
        materials[td] = TrustMaterial(source="controller (external CA: its bundle is read from the repo; "
                                             "run `meshfed trust PATH` for it)")
    return dict(build_trust_view(trust_domains, materials, now_s))
