"""What a fleet change does to traffic: the effects `meshfed plan` shows next to the object diff.

`plan_effects(old_snapshot, new_snapshot, observations)` builds the federation core for both
revisions over the same observations (offline: the LabClusters), renders every proxy, and
reports, per cluster:

- `tier_changes`: for clients in that cluster, which endpoints of which service change tier
  (or appear/disappear from their view), e.g. a failoverPriority edit moving south from tier 2
  to tier 1;
- `access_changes`: for services served from that cluster, which client identities gain or lose
  the right to connect (trust federation both ways and L4 AuthorizationPolicy: DENY first, then
  ALLOW if any applies), evaluated for every workload identity the observations know of and
  every principal the policies name;
- `gateways_touched`: whether the cluster's east-west gateway config changes (and which services);
- `proxies_changed`: node proxies whose config changes.

Pure: no clock, no I/O; deterministic ordering (sorted) so plans diff cleanly in CI logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from clusters.kube.observation import ClusterObservation
from federation.core.failover import FailoverEngine, build_engine
from federation.core.graph import describe_gateway
from federation.core.render import Renderer, authorization_of
from federation.core.trust_graph import identity_trust_domain
from gitops.model import AuthorizationPolicy, ConfigSnapshot
from ztunnel.api.authz import evaluate, peer_from_identity
from ztunnel.api.config import ProxyConfig, ProxyMode, diff_configs


def authz_allows(policies: Sequence[AuthorizationPolicy], namespace: str, labels: dict[str, str],
                 identity: str, port: int, local_trust_domain: str) -> bool:
    """The decision a destination proxy would take: the policies rendered exactly as the renderer
    pushes them (`authorization_of`) and evaluated by the data plane's own evaluator
    (`ztunnel.api.authz.evaluate`) in the destination's trust domain, so a plan can never predict
    "allow" where the proxy denies."""
    decision = evaluate([authorization_of(p) for p in policies], peer=peer_from_identity(identity),
                        dest_namespace=namespace, dest_labels=labels, port=port,
                        local_trust_domain=local_trust_domain)
    return decision.allowed


def _identities(engine: FailoverEngine) -> dict[tuple[str, str, str], str]:
    """(client cluster, namespace, service account) -> identity, for every known workload and every
    principal a policy names (mapped back to the cluster(s) of its trust domain)."""
    out: dict[tuple[str, str, str], str] = {}
    graph = engine.graph
    for cluster in graph.clusters:
        for ep in graph.cluster_state(cluster).endpoints.values():
            out[(cluster, ep.namespace, ep.service_account)] = ep.identity
    by_td: dict[str, list[str]] = {}
    for c in graph.clusters.values():
        by_td.setdefault(c.trust_domain, []).append(c.name)
    for p in engine.snapshot.authorization_policies:
        for rule in p.rules:
            for s in rule.from_:
                for principal in s.principals:
                    parts = principal.removeprefix("spiffe://").split("/")
                    if "*" in principal or len(parts) != 5:
                        continue
                    for cluster in by_td.get(parts[0], []):
                        out.setdefault((cluster, parts[2], parts[4]), "spiffe://" + "/".join(parts))
    return out


def _access(engine: FailoverEngine, idents: dict[tuple[str, str, str], str]) -> dict[tuple[str, str, tuple[str, str, str]], bool]:
    """(server cluster, service hostname, client key) -> may connect."""
    out: dict[tuple[str, str, tuple[str, str, str]], bool] = {}
    graph = engine.graph
    policies = engine.snapshot.authorization_policies
    for key, svc in graph.services.items():
        port = svc.ports[0].target_port if svc.ports else 0
        for server, eps in graph.endpoints_of(key).items():
            if not eps:
                continue
            labels = dict(next(iter(eps.values())).labels)
            server_td = graph.clusters[server].trust_domain
            for ck, identity in idents.items():
                client_cluster = ck[0]
                if client_cluster not in graph.clusters:
                    continue
                td = identity_trust_domain(identity) or ""
                ok = engine.trust.trusts(server_td, td) and authz_allows(policies, key.namespace, labels, identity, port,
                                                                         server_td)
                out[(server, svc.hostname, ck)] = ok
    return out


def _without_commit(cfg: ProxyConfig) -> ProxyConfig:
    """Services name the commit they came from (`policy_source`); a new commit alone is no effect."""
    return replace(cfg, services=tuple(replace(s, policy_source=s.policy_source.rsplit("@", 1)[0])
                                       for s in cfg.services))


def _usable(snapshot: ConfigSnapshot, observations: Iterable[ClusterObservation]) -> list[ClusterObservation]:
    return [o for o in observations if o.cluster in snapshot.clusters]


def plan_effects(old_snapshot: ConfigSnapshot, new_snapshot: ConfigSnapshot,
                 observations: Iterable[ClusterObservation]) -> dict[str, Any]:
    obs = list(observations)
    old = build_engine(old_snapshot, _usable(old_snapshot, obs))
    new = build_engine(new_snapshot, _usable(new_snapshot, obs))
    old_r, new_r = Renderer(old), Renderer(new)
    old_cfg, new_cfg = old_r.render_all(), new_r.render_all()
    clusters = sorted(set(old.graph.clusters) | set(new.graph.clusters))
    per_cluster: dict[str, dict[str, Any]] = {
        c: {"tier_changes": [], "access_changes": [], "gateways_touched": [], "proxies_changed": []} for c in clusters
    }

    # 1. tier changes, per client cluster (and zone when its nodes span several)
    for c in clusters:
        if c not in old.graph.clusters or c not in new.graph.clusters:
            continue
        old_specs = {s.locality.zone: s for s in old_r.proxy_specs() if s.cluster == c and s.mode is ProxyMode.NODE}
        new_specs = {s.locality.zone: s for s in new_r.proxy_specs() if s.cluster == c and s.mode is ProxyMode.NODE}
        for zone in sorted(set(old_specs) & set(new_specs)):
            for host in sorted(set(old.graph.hostnames) & set(new.graph.hostnames)):
                ov = old.view(old.graph.hostnames[host], old_specs[zone].locality)
                nv = new.view(new.graph.hostnames[host], new_specs[zone].locality)
                ot = {e.workload_uid: e.tier for e in ov.endpoints}
                nt = {e.workload_uid: e.tier for e in nv.endpoints}
                for uid in sorted(set(ot) | set(nt)):
                    if ot.get(uid) != nt.get(uid):
                        per_cluster[c]["tier_changes"].append({
                            "client_zone": zone, "service": host, "endpoint": uid,
                            "old_tier": ot.get(uid), "new_tier": nt.get(uid)})

    # 2. access changes, per serving cluster
    idents = _identities(old)
    idents.update(_identities(new))
    acc_old, acc_new = _access(old, idents), _access(new, idents)
    for k in sorted(set(acc_old) | set(acc_new), key=lambda k: (k[0], k[1], k[2])):
        before, after = acc_old.get(k, False), acc_new.get(k, False)
        if before != after:
            server, host, ck = k
            per_cluster[server]["access_changes"].append({
                "service": host, "identity": idents[ck], "client_cluster": ck[0],
                "change": "gains" if after else "loses"})

    # 3. gateways and proxies touched
    for pid in sorted(set(old_cfg) | set(new_cfg)):
        o, n = old_cfg.get(pid), new_cfg.get(pid)
        cluster = (n or o).cluster  # type: ignore[union-attr]
        if n is None:
            entry: dict[str, Any] = {"proxy": pid, "change": "removed"}
        elif o is None:
            entry = {"proxy": pid, "change": "added"}
        else:
            d = diff_configs(_without_commit(o), _without_commit(n))
            if d.empty:
                continue
            entry = {"proxy": pid, "change": "changed",
                     "services": sorted([*(s.hostname for s in d.upserts.get("services", ())),
                                         *d.removals.get("services", ())]),
                     "resources": {k: len(v) + len(d.removals.get(k, ())) for k, v in d.upserts.items()
                                   if v or d.removals.get(k)}}
        kind = "gateways_touched" if (n or o).mode is ProxyMode.GATEWAY else "proxies_changed"  # type: ignore[union-attr]
        per_cluster[cluster][kind].append(entry)
    for c in clusters:
        oc, nc = old.graph.clusters.get(c), new.graph.clusters.get(c)
        if oc is not None and nc is not None and oc.gateway != nc.gateway:
            per_cluster[c]["gateways_touched"].append(
                {"proxy": f"gateway/{c}", "change": "address", "old": describe_gateway(oc),
                 "new": describe_gateway(nc)})
    summary = {
        "tier_changes": sum(len(v["tier_changes"]) for v in per_cluster.values()),
        "access_changes": sum(len(v["access_changes"]) for v in per_cluster.values()),
        "gateways_touched": sum(len(v["gateways_touched"]) for v in per_cluster.values()),
        "proxies_changed": sum(len(v["proxies_changed"]) for v in per_cluster.values()),
    }
    return {"old_revision": old_snapshot.revision.sha, "new_revision": new_snapshot.revision.sha,
            "summary": summary, "clusters": per_cluster}

