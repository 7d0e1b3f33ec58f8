"""Semantic validation: checks across objects, after each file parsed on its own.

`check_objects(objects, all_paths)` is a pure function of the parsed objects (and the set of paths
in the tree, for referenced files); it returns every problem it finds rather than stopping at the
first, so `meshfed validate` shows a whole review's worth at once. Each check names the object,
the file:line:col of the field at fault (from the object's `field_pos`), the cause and the fix.

Decisions recorded here (they are also in `gitops.codes`):

- Pool size for maxEjectionPercent (MF0505): the pool a *node proxy* balances over, which is
  its view of the service, not the service's replica count: the pods of the exporting clusters on
  the proxy's own network (reached directly) plus one entry per exporting cluster on another
  network behind an east-west gateway (reached through it, ejected as a whole). Pod counts come
  from the `replicas` of the server workloads in the LabClusters. Envoy ejects a host only while
  `(ejected + 1) * 100 / pool <= maxEjectionPercent`, so a proxy can eject at least one host iff
  `pool * maxEjectionPercent >= 100`; the check takes the smallest pool of any cluster's proxies
  and names that cluster. Fleets without LabClusters have no declared pool: skipped.
- Locality failover needs outlier detection in the *same* traffic policy (a DestinationRule
  replaces the service's inline policy and the federation default wholesale, as in Istio).
- failover rules may be mutual (us-east -> us-west and back is the common backup pair); a region
  failing over to itself or two rules for one region are cycles/ambiguities (MF0502).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field

from gitops import model as m
from gitops.codes import problem
from gitops.problems import Problem, SourcePos
from gitops.schema import FleetObject, did_you_mean, find_pos, kind_of, ref_of

RESERVED_NET = ipaddress.ip_network("10.255.0.0/16")  # the lab's management network
TOPOLOGY_KEYS = {
    "topology.istio.io/network": "network",
    "topology.kubernetes.io/region": "region",
    "topology.kubernetes.io/zone": "zone",
    "topology.istio.io/subzone": "subzone",
    "topology.istio.io/cluster": "cluster",
}
_TD_CHARS = re.compile(r"[a-z0-9._-]+")  # patterns here are used with fullmatch: "$" lets "x\n" through
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def spiffe_trust_domain_error(name: str) -> str | None:
    """Why `name` is not a valid SPIFFE trust domain, or None. Upper case is rejected, not folded."""
    if not name:
        return "a trust domain name must not be empty"
    if len(name.encode()) > 255:
        return f"is {len(name.encode())} bytes; a SPIFFE trust domain is at most 255 bytes"
    if "://" in name:
        return "contains a scheme; write the bare trust domain (no spiffe://)"
    if ":" in name:
        return "contains a port; a SPIFFE trust domain has no port"
    if any(c.isupper() for c in name):
        return "contains upper-case letters; SPIFFE trust domains are lower case (not folded silently)"
    if not _TD_CHARS.fullmatch(name):
        bad = sorted({c for c in name if not re.match(r"[a-z0-9._-]", c)})
        return f"contains characters not allowed in a SPIFFE trust domain: {''.join(bad)!r}"
    return None


def resolve_host(host: str, namespace: str, clusterset_domain: str) -> m.ServiceKey | None:
    """A DestinationRule host -> the service it names (FQDN in the clusterset or cluster domain,
    `<svc>.<ns>`, or a short name relative to the rule's namespace, as Istio resolves them)."""
    got = host_match(host, namespace, clusterset_domain)
    return got[0] if got is not None else None


def host_match(host: str, namespace: str, clusterset_domain: str) -> tuple[m.ServiceKey, str] | None:
    """`resolve_host` and which form of the name matched, in words (explain says it).

    Istio's namespace sameness: a global service is the same service in every cluster, so its
    cluster-local name `<svc>.<ns>.svc.cluster.local` names it as well as the clusterset one."""
    for suffix, how in ((f".svc.{clusterset_domain}", f"clusterset name (.svc.{clusterset_domain})"),
                        (".svc.cluster.local", "cluster-local name (.svc.cluster.local): namespace sameness, "
                                               "the same service in every cluster"),
                        (".svc", "short in-cluster name (<svc>.<ns>.svc)")):
        if host.endswith(suffix):
            parts = host[: -len(suffix)].split(".")
            return (m.ServiceKey(parts[1], parts[0]), how) if len(parts) == 2 else None
    parts = host.split(".")
    if len(parts) == 1:
        return m.ServiceKey(namespace, parts[0]), f"short name relative to namespace {namespace}"
    if len(parts) == 2:
        return m.ServiceKey(parts[1], parts[0]), "<svc>.<ns> name"
    return None


def normalised(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


@dataclass
class _Fleet:
    """Indexes over the parsed objects; built once, read by every check."""

    federation: m.Federation | None
    clusters: dict[str, m.Cluster]
    trust: dict[str, m.TrustDomain]
    services: dict[m.ServiceKey, m.GlobalService]
    labs: dict[str, m.LabCluster]
    drs: list[m.DestinationRule]
    authz: list[m.AuthorizationPolicy]
    routes: list[m.Route]
    broken: frozenset[tuple[str, str, str]] = frozenset()
    namespaces: dict[str, m.Namespace] = dc_field(default_factory=dict)
    gateways: dict[m.ServiceKey, m.Gateway] = dc_field(default_factory=dict)
    pools: dict[m.ServiceKey, m.InferencePool] = dc_field(default_factory=dict)

    def waypoint_of(self, key: m.ServiceKey) -> m.Gateway | None:
        svc = self.services.get(key)
        return m.waypoint_of(svc, self.namespaces.get(key.namespace), self.gateways) if svc is not None else None

    def failed(self, kind: str, name: str, namespace: str = "") -> bool:
        """Was an object of this identity written but unparseable (already reported)?"""
        return (kind, namespace, name) in self.broken

    @property
    def domain(self) -> str:
        return self.federation.clusterset_domain if self.federation else "clusterset.local"

    def regions(self) -> set[str]:
        return {c.region for c in self.clusters.values()}


class _Out:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, code: str, obj: FleetObject, field: str, message: str, hint: str = "") -> None:
        self.problems.append(problem(code, message, at(obj, field), hint=hint, obj=ref_of(obj)))


def at(obj: FleetObject, field: str) -> SourcePos:
    fp: Mapping[str, SourcePos] = obj.field_pos
    return find_pos(fp, field, obj.pos) if field else obj.pos


def check_objects(objects: Sequence[FleetObject], all_paths: Iterable[str] = (),
                  broken: frozenset[tuple[str, str, str]] = frozenset()) -> list[Problem]:
    """Every cross-object problem. `broken` holds (kind, namespace, name) of objects whose files
    failed to parse: references to them are not reported again as unknown."""
    out = _Out()
    paths = set(all_paths)
    _check_duplicates(objects, out)
    feds = [o for o in objects if isinstance(o, m.Federation)]
    if not feds:
        out.problems.append(problem("MF0011", "the fleet repo has no Federation", SourcePos("federation.yaml"),
                                    hint="add federation.yaml with kind: Federation at the repository root"))
    fleet = _Fleet(
        federation=feds[0] if feds else None,
        clusters={o.name: o for o in objects if isinstance(o, m.Cluster)},
        trust={o.name: o for o in objects if isinstance(o, m.TrustDomain)},
        services={o.key: o for o in objects if isinstance(o, m.GlobalService)},
        labs={o.cluster: o for o in objects if isinstance(o, m.LabCluster)},
        drs=[o for o in objects if isinstance(o, m.DestinationRule)],
        authz=[o for o in objects if isinstance(o, m.AuthorizationPolicy)],
        routes=[o for o in objects if isinstance(o, m.Route)],
        broken=broken,
        namespaces={o.name: o for o in objects if isinstance(o, m.Namespace)},
        gateways={o.key: o for o in objects if isinstance(o, m.Gateway)},
        pools={o.key: o for o in objects if isinstance(o, m.InferencePool)},
    )
    for t in fleet.trust.values():
        _check_trust_domain(t, fleet, paths, out)
    _check_clusters(fleet, out)
    for s in fleet.services.values():
        _check_service(s, fleet, out)
    _check_destination_rules(fleet, out)
    if fleet.federation and fleet.federation.default_traffic_policy:
        covered = {k for k, s in fleet.services.items() if s.traffic_policy is not None}
        covered |= {k for d in fleet.drs if (k := resolve_host(d.host, d.namespace, fleet.domain))}
        pool_services = [s for k, s in fleet.services.items() if k not in covered]
        _check_traffic_policy(fleet.federation, "spec.defaultTrafficPolicy", fleet.federation.default_traffic_policy,
                              pool_services, fleet, out)
    for a in fleet.authz:
        _check_authz(a, fleet, out)
    _check_waypoints(fleet, out)
    _check_gateways(fleet, out)
    _check_routes(fleet, out)
    _check_pools(fleet, out)
    for lab in fleet.labs.values():
        _check_lab(lab, fleet, out)
    return out.problems


# ------------------------------------------------------------------------------------------------


def _identity(obj: FleetObject) -> tuple[str, str, str]:
    r = ref_of(obj)
    return kind_of(obj), r.namespace or "", r.name


def _check_duplicates(objects: Sequence[FleetObject], out: _Out) -> None:
    seen: dict[tuple[str, str, str], FleetObject] = {}
    for o in objects:
        kind, ns, name = _identity(o)
        key = (kind, normalised(ns), normalised(name))
        first = seen.get(key)
        if first is None:
            seen[key] = o
            continue
        same = _identity(first) == (kind, ns, name)
        how = "" if same else f" (equal to {ref_of(first)} after case folding / Unicode normalisation)"
        if kind == "Federation":
            out.problems.append(problem("MF0011", f"a second Federation {name!r}; the fleet repo has exactly one",
                                        o.pos, obj=ref_of(o), hint=f"remove it; the Federation is at {first.pos}"))
            continue
        out.add("MF0201", o, "metadata.name", f"duplicate {kind} name {name!r}{how}; first defined at {first.pos}",
                hint="rename or remove one of them")


def _check_trust_domain(t: m.TrustDomain, fleet: _Fleet, paths: set[str], out: _Out) -> None:
    why = spiffe_trust_domain_error(t.name)
    if why:
        out.add("MF0401", t, "metadata.name", f"trust domain {t.name!r} {why}",
                hint="use a lower-case DNS-like name such as east.mesh.local")
    seen: set[str] = set()
    for i, other in enumerate(t.federates_with):
        field = f"spec.federatesWith[{i}]"
        if other == t.name:
            out.add("MF0403", t, field, f"trust domain {t.name!r} federates with itself",
                    hint="remove it: a trust domain always trusts its own bundle")
        elif other in seen:
            out.add("MF0403", t, field, f"{other!r} is listed twice in federatesWith", hint="remove the repeat")
        elif other not in fleet.trust and not fleet.failed("TrustDomain", other):
            guess = did_you_mean(other, list(fleet.trust))
            out.add("MF0203", t, field, f"federatesWith names unknown trust domain {other!r}",
                    hint=(f"did you mean {guess!r}? " if guess else "") + f"add trust/{other}.yaml or fix the name")
        seen.add(other)
    ca = t.ca
    if ca.mode is m.CaMode.EXTERNAL:
        if not ca.bundle_file:
            out.add("MF0403", t, "spec.ca.mode", "an External CA needs spec.ca.bundleFile (its SPIFFE bundle)",
                    hint="add bundleFile: trust/bundles/<domain>.json and commit the bundle")
        elif ca.bundle_file.startswith("/") or ".." in ca.bundle_file.split("/"):
            out.add("MF0006", t, "spec.ca.bundleFile", f"bundleFile {ca.bundle_file!r} leaves the repository",
                    hint="use a path relative to the repository root, without '..'")
        elif ca.bundle_file not in paths:
            out.add("MF0012", t, "spec.ca.bundleFile", f"bundleFile {ca.bundle_file!r} is not in the repository",
                    hint="commit the bundle file or fix the path")
    else:
        signing = [r for r in ca.roots if r.signing]
        if len(signing) != 1:
            out.add("MF0403", t, "spec.ca.roots", f"a Managed CA needs exactly one signing root, has {len(signing)}",
                    hint="set signing: true on exactly one root (rotate by moving it between commits)")
        names = [r.name for r in ca.roots]
        if len(set(names)) != len(names):
            out.add("MF0201", t, "spec.ca.roots", "CA root names repeat", hint="give each root its own name")


def _nets(c: m.Cluster, out: _Out) -> list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    nets: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    for attr, field in (("pod_cidrs", "spec.podCIDRs"), ("service_cidrs", "spec.serviceCIDRs")):
        for i, text in enumerate(getattr(c, attr)):
            f = f"{field}[{i}]"
            try:
                net = ipaddress.ip_network(text, strict=True)
            except ValueError as e:
                out.add("MF0301", c, f, f"{text!r} is not a valid CIDR: {e}",
                        hint="write a network address with its prefix, e.g. 10.10.0.0/16 (host bits zero)")
                continue
            if net.version == RESERVED_NET.version and net.overlaps(RESERVED_NET):  # type: ignore[arg-type]
                out.add("MF0301", c, f, f"{text} overlaps 10.255.0.0/16, reserved for meshfed's lab management network",
                        hint="pick another range")
                continue
            nets.append((f, net))
    return nets


def _check_clusters(fleet: _Fleet, out: _Out) -> None:
    by_network: dict[str, list[tuple[m.Cluster, str, ipaddress.IPv4Network | ipaddress.IPv6Network]]] = defaultdict(list)
    gateways: dict[tuple[str, int], m.Cluster] = {}
    td_ca: dict[str, tuple[m.Cluster, m.CaSpec]] = {}
    for c in fleet.clusters.values():
        if not _DNS_LABEL.fullmatch(c.name):
            out.add("MF0106", c, "metadata.name", f"cluster name {c.name!r} is not a DNS-1123 label",
                    hint="use lower-case letters, digits and '-'")
        nets = _nets(c, out)
        for i, (f1, n1) in enumerate(nets):
            for f2, n2 in nets[i + 1:]:
                if n1.version == n2.version and n1.overlaps(n2):  # type: ignore[arg-type]
                    out.add("MF0302", c, f2, f"{n2} overlaps {n1} ({f1}) in the same cluster",
                            hint="pod and service ranges must be disjoint")
        for f, net in nets:
            for other, _f2, n2 in by_network[c.network]:
                if net.version == n2.version and net.overlaps(n2):  # type: ignore[arg-type]
                    out.add("MF0302", c, f, f"{net} overlaps {n2} of cluster {other.name!r} ({other.pos.file}) on "
                            f"network {c.network!r}",
                            hint="clusters on one network need disjoint ranges; give them different ranges or put "
                                 "them on different networks")
        by_network[c.network].extend((c, f, n) for f, n in nets)
        if c.trust_domain not in fleet.trust and not fleet.failed("TrustDomain", c.trust_domain):
            guess = did_you_mean(c.trust_domain, list(fleet.trust))
            out.add("MF0203", c, "spec.trustDomain", f"cluster {c.name!r} uses unknown trust domain {c.trust_domain!r}",
                    hint=(f"did you mean {guess!r}? " if guess else "") + f"add trust/{c.trust_domain}.yaml or fix the name")
        elif c.trust_domain in fleet.trust:
            td = fleet.trust[c.trust_domain]
            effective = c.ca or td.ca
            if c.ca is not None and not _same_ca(c.ca, td.ca):
                out.add("MF0402", c, "spec.ca", f"cluster {c.name!r} declares a CA for trust domain {td.name!r} that "
                        f"differs from the trust domain's own CA ({td.pos.file})",
                        hint=f"remove spec.ca to use {td.name}'s CA, or give {c.name} its own trust domain")
            prior = td_ca.get(td.name)
            if prior is not None and not _same_ca(prior[1], effective):
                out.add("MF0402", c, "spec.trustDomain", f"cluster {c.name!r} claims trust domain {td.name!r} of "
                        f"cluster {prior[0].name!r} with a different CA",
                        hint=f"give {c.name} its own trust domain and federate it with {td.name}")
            td_ca.setdefault(td.name, (c, effective))
        gw = c.east_west_gateway
        if gw is not None and gw.address is not None:  # None: the address comes from the cluster
            if not _is_address(gw.address):
                out.add("MF0301", c, "spec.eastWestGateway.address",
                        f"{gw.address!r} is neither an IP address nor a DNS name", hint="e.g. 172.30.0.11")
            key = (gw.address, gw.port)
            if key in gateways:
                out.add("MF0303", c, "spec.eastWestGateway.address", f"east-west gateway {gw.address}:{gw.port} is "
                        f"also cluster {gateways[key].name!r}'s", hint="each cluster needs its own gateway address")
            gateways.setdefault(key, c)


def _same_ca(a: m.CaSpec, b: m.CaSpec) -> bool:
    if a.mode != b.mode:
        return False
    if a.mode is m.CaMode.EXTERNAL:
        return a.bundle_file == b.bundle_file
    return a.roots == b.roots


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(text))


def _check_service(s: m.GlobalService, fleet: _Fleet, out: _Out) -> None:
    if not _DNS_LABEL.fullmatch(s.name):
        out.add("MF0106", s, "metadata.name", f"service name {s.name!r} is not a DNS-1123 label",
                hint="use lower-case letters, digits and '-'")
    if not s.export_from:
        out.add("MF0205", s, "spec.exportFrom", f"service {s.key} is exported from no cluster",
                hint="list the clusters that serve it under spec.exportFrom")
    seen: set[str] = set()
    for i, c in enumerate(s.export_from):
        field = f"spec.exportFrom[{i}]"
        if c in seen:
            out.add("MF0205", s, field, f"cluster {c!r} is listed twice in exportFrom", hint="remove the repeat")
        elif c not in fleet.clusters and not fleet.failed("Cluster", c):
            guess = did_you_mean(c, list(fleet.clusters))
            out.add("MF0202", s, field, f"exportFrom names unknown cluster {c!r}",
                    hint=(f"did you mean {guess!r}? " if guess else "") + f"add clusters/{c}.yaml or fix the name")
        seen.add(c)
    ports: dict[int, int] = {}
    names: dict[str, int] = {}
    for i, p in enumerate(s.ports):
        if p.port in ports:
            out.add("MF0102", s, f"spec.ports[{i}].port", f"port {p.port} is declared twice (ports[{ports[p.port]}])",
                    hint="each service port once")
        if p.name in names:
            out.add("MF0102", s, f"spec.ports[{i}].name", f"port name {p.name!r} is used twice", hint="rename one")
        ports.setdefault(p.port, i)
        names.setdefault(p.name, i)
    expected = f"{s.name}.{s.namespace}.svc.{fleet.domain}"
    if "spec.hostname" in s.field_pos and s.hostname != expected:
        out.add("MF0107", s, "spec.hostname", f"hostname {s.hostname!r} does not match the service",
                hint=f"use {expected!r} or leave hostname out")
    if s.traffic_policy is not None:
        _check_traffic_policy(s, "spec.trafficPolicy", s.traffic_policy, [s], fleet, out)


def _check_destination_rules(fleet: _Fleet, out: _Out) -> None:
    seen: dict[m.ServiceKey, m.DestinationRule] = {}
    for d in fleet.drs:
        key = resolve_host(d.host, d.namespace, fleet.domain)
        svc = fleet.services.get(key) if key else None
        if key is not None and svc is None and fleet.failed("GlobalService", key.name, key.namespace):
            pass  # its file failed to parse; that error is already reported
        elif key is None or svc is None:
            choices = [s.hostname or f"{s.name}.{s.namespace}.svc.{fleet.domain}" for s in fleet.services.values()]
            guess = did_you_mean(d.host, choices)
            out.add("MF0204", d, "spec.host", f"host {d.host!r} names no GlobalService",
                    hint=(f"did you mean {guess!r}? " if guess else "")
                    + "hosts are <service>.<namespace>.svc." + fleet.domain)
        else:
            if key in seen:
                out.add("MF0509", d, "spec.host", f"service {key} already has DestinationRule "
                        f"{seen[key].namespace}/{seen[key].name} ({seen[key].pos})", hint="merge the two rules")
            seen.setdefault(key, d)
        _check_traffic_policy(d, "spec.trafficPolicy", d.traffic_policy, [svc] if svc else [], fleet, out)


def pool_size(svc: m.GlobalService, fleet_labs: Mapping[str, m.LabCluster]) -> int | None:
    """Pods behind a service in the declared lab topology, or None if no exportFrom cluster has
    a LabCluster (a real fleet: the pool is not declared in the repo)."""
    labs = [fleet_labs[c] for c in svc.export_from if c in fleet_labs]
    if not labs:
        return None
    return sum(_pods_in(svc, lab) for lab in labs)


def _pods_in(svc: m.GlobalService, lab: m.LabCluster) -> int:
    return sum(w.replicas for w in lab.workloads
               if w.role == "server" and w.service == svc.name and w.namespace == svc.namespace)


def proxy_pools(svc: m.GlobalService, clusters: Mapping[str, m.Cluster],
                fleet_labs: Mapping[str, m.LabCluster]) -> dict[str, int] | None:
    """Per client cluster, the size of the pool its node proxies balance `svc` over (see the module
    docstring), or None when the pool is not declared (no LabCluster behind the service)."""
    if pool_size(svc, fleet_labs) is None:
        return None
    out: dict[str, int] = {}
    for client, c in clusters.items():
        size = 0
        for server in svc.export_from:
            s = clusters.get(server)
            if s is None:
                continue
            if s.network == c.network:
                size += _pods_in(svc, fleet_labs[server]) if server in fleet_labs else 0
            elif s.east_west_gateway is not None:
                size += 1  # the whole remote cluster is one entry behind its gateway
        out[client] = size
    return out


def _check_traffic_policy(owner: FleetObject, base: str, tp: m.TrafficPolicy, services: Sequence[m.GlobalService],
                          fleet: _Fleet, out: _Out) -> None:
    od = tp.outlier_detection
    odf = f"{base}.outlierDetection"
    if od is not None and f"{odf}.consecutive5xxErrors" in owner.field_pos and (od.consecutive_5xx_errors or 0) > 0:
        blind = sorted(str(s.key) for s in services if fleet.waypoint_of(s.key) is None)
        if blind:
            out.add("MF0510", owner, f"{odf}.consecutive5xxErrors",
                    f"consecutive5xxErrors counts HTTP 5xx answers, but {', '.join(blind)} "
                    f"{'has' if len(blind) == 1 else 'have'} no waypoint: the node ztunnels see connections only, "
                    "so a backend answering 503 is never ejected (connect failures still count)",
                    hint="label the Service or its Namespace istio.io/use-waypoint: <waypoint> and add that "
                         "Gateway (gatewayClassName: istio-waypoint); or use consecutiveGatewayErrors")
    if od is not None:
        if od.interval_s <= 0:
            out.add("MF0501", owner, f"{odf}.interval", "interval must be longer than zero",
                    hint="e.g. interval: 5s")
        if od.base_ejection_time_s <= 0:
            out.add("MF0501", owner, f"{odf}.baseEjectionTime", "baseEjectionTime must be longer than zero",
                    hint="e.g. baseEjectionTime: 15s")
        if od.max_ejection_time_s < od.base_ejection_time_s:
            out.add("MF0501", owner, f"{odf}.maxEjectionTime",
                    f"maxEjectionTime ({od.max_ejection_time_s:g}s) is shorter than baseEjectionTime "
                    f"({od.base_ejection_time_s:g}s)",
                    hint="maxEjectionTime caps the growing ejection time; make it at least baseEjectionTime")
        for svc in services:
            pools = proxy_pools(svc, fleet.clusters, fleet.labs)
            sized = {c: n for c, n in (pools or {}).items() if n > 0}
            if not sized:
                continue  # no declared pool (not a lab fleet) or no hosts (MF0603 says so)
            client, pool = min(sized.items(), key=lambda kv: (kv[1], kv[0]))
            if pool * od.max_ejection_percent < 100:
                need = -(-100 // pool)
                where = f"{odf}.maxEjectionPercent"
                out.add("MF0505", owner, where,
                        f"maxEjectionPercent {od.max_ejection_percent}% cannot eject even one of the {pool} host(s) "
                        f"a proxy in cluster {client} balances {svc.key} over (its pods on network "
                        f"{fleet.clusters[client].network} plus one per remote gateway; Envoy ejects only while "
                        f"(ejected+1)/pool <= maxEjectionPercent)",
                        hint=f"set maxEjectionPercent to at least {min(need, 100)} (100 allows ejecting every host)")
    lb = tp.locality_lb
    if lb is None:
        return
    lbf = f"{base}.loadBalancer.localityLbSetting"
    modes = [n for n, v in (("failoverPriority", lb.failover_priority), ("failover", lb.failover),
                            ("distribute", lb.distribute)) if v]
    if len(modes) > 1:
        out.add("MF0506", owner, f"{lbf}.{modes[1]}", f"localityLbSetting sets {' and '.join(modes)}",
                hint="keep exactly one of failoverPriority, failover and distribute")
    if lb.enabled and not lb.distribute and od is None:
        out.add("MF0504", owner, lbf, "locality failover is configured without outlierDetection in the same "
                "traffic policy: no endpoint is ever ejected, so failover would never trigger",
                hint=f"add {odf} (e.g. consecutiveGatewayErrors: 3, interval: 5s, baseEjectionTime: 15s)")
    regions = fleet.regions()
    networks: set[str] = {c.network for c in fleet.clusters.values()}
    zones = {c.zone for c in fleet.clusters.values()}
    label_keys = {k for c in fleet.clusters.values() for k in c.labels}
    known_values: dict[str, set[str]] = {"network": networks, "region": regions, "zone": zones,
                                         "cluster": set(fleet.clusters)}
    seen_keys: dict[str, int] = {}
    for i, entry in enumerate(lb.failover_priority):
        field = f"{lbf}.failoverPriority[{i}]"
        key, _, value = entry.partition("=")
        if key in seen_keys:
            out.add("MF0502", owner, field, f"failoverPriority repeats {key!r} (already entry {seen_keys[key]}): "
                    "the later level can never be reached", hint="list each label once")
        seen_keys.setdefault(key, i)
        if key not in TOPOLOGY_KEYS and key not in label_keys:
            guess = did_you_mean(key, [*TOPOLOGY_KEYS, *label_keys])
            out.add("MF0503", owner, field, f"failoverPriority label {key!r} is neither a topology label nor a "
                    "label of any cluster", hint=(f"did you mean {guess!r}? " if guess else "")
                    + "supported: " + ", ".join(TOPOLOGY_KEYS))
        elif value and key in TOPOLOGY_KEYS and TOPOLOGY_KEYS[key] in known_values:
            what = TOPOLOGY_KEYS[key]
            if value not in known_values[what]:
                guess = did_you_mean(value, sorted(known_values[what]))
                out.add("MF0503", owner, field, f"failoverPriority {entry!r} names unknown {what} {value!r}",
                        hint=(f"did you mean {guess!r}? " if guess else "")
                        + f"known: {', '.join(sorted(known_values[what]))}")
    targets: dict[str, tuple[str, int]] = {}
    for i, rule in enumerate(lb.failover):
        field = f"{lbf}.failover[{i}]"
        for attr, region in (("from", rule.from_region), ("to", rule.to_region)):
            if region not in regions:
                guess = did_you_mean(region, sorted(regions))
                out.add("MF0503", owner, f"{field}.{attr}", f"failover {attr} unknown region {region!r}",
                        hint=(f"did you mean {guess!r}? " if guess else "") + f"regions: {', '.join(sorted(regions))}")
        if rule.from_region == rule.to_region:
            out.add("MF0502", owner, field, f"failover from {rule.from_region!r} to itself is a cycle",
                    hint="fail over to another region")
        prior = targets.get(rule.from_region)
        if prior is not None and prior[0] != rule.to_region:
            out.add("MF0502", owner, field, f"region {rule.from_region!r} fails over to {prior[0]!r} "
                    f"(failover[{prior[1]}]) and to {rule.to_region!r}", hint="one target per 'from' region")
        targets.setdefault(rule.from_region, (rule.to_region, i))
    for i, dist in enumerate(lb.distribute):
        field = f"{lbf}.distribute[{i}]"
        total = sum(dist.to.values())
        if total != 100:
            out.add("MF0507", owner, f"{field}.to", f"distribute weights from {dist.from_locality!r} sum to {total}, "
                    "not 100", hint="make the weights add up to 100")
        for loc in (dist.from_locality, *dist.to):
            region = loc.split("/")[0]
            if region != "*" and region not in regions:
                out.add("MF0503", owner, field, f"distribute locality {loc!r} names unknown region {region!r}",
                        hint=f"regions: {', '.join(sorted(regions))}")


def _check_authz(a: m.AuthorizationPolicy, fleet: _Fleet, out: _Out) -> None:
    _check_authz_targets(a, fleet, out)
    # rules were expanded per `to` operation; positions point at the rule's from list
    for ri, rule in enumerate(a.rules):
        for si, src in enumerate(rule.from_):
            for attr, lst in (("principals", src.principals), ("notPrincipals", src.not_principals)):
                for pi, pr in enumerate(lst):
                    field = _authz_field(a, pr, attr, ri, si, pi)
                    why = _principal_error(pr)
                    if why:
                        out.add("MF0404", a, field, f"principal {pr!r} {why}",
                                hint="write '<trust-domain>/ns/<namespace>/sa/<service-account>', e.g. "
                                     "east.mesh.local/ns/shop/sa/frontend")
                        continue
                    td = pr.split("/")[0]
                    if "*" not in td and td not in fleet.trust and not fleet.failed("TrustDomain", td):
                        guess = did_you_mean(td, list(fleet.trust))
                        out.add("MF0203", a, field, f"principal {pr!r} names unknown trust domain {td!r}",
                                hint=(f"did you mean {guess!r}? " if guess else "")
                                + "a principal from an unknown trust domain can never match")
            for attr, lst in (("namespaces", src.namespaces), ("notNamespaces", src.not_namespaces)):
                for ni, ns in enumerate(lst):
                    why = _source_namespace_error(ns)
                    if why:
                        out.add("MF0404", a, _authz_field(a, ns, attr, ri, si, ni), f"source namespace {ns!r} {why}",
                                hint="write a namespace of the destination's own trust domain ('shop'), or "
                                     "'<trust-domain>/ns/<namespace>' for another's ('west.mesh.local/ns/shop'; "
                                     "'*/ns/shop' for any trust domain)")


def _check_authz_targets(a: m.AuthorizationPolicy, fleet: _Fleet, out: _Out) -> None:
    """targetRefs name what exists, and request-level rules land on an L7 proxy (MF0512)."""
    for i, t in enumerate(a.target_refs):
        field_ = f"spec.targetRefs[{i}].name"
        if t.kind == "Service":
            key = m.ServiceKey(a.namespace, t.name)
            if key not in fleet.services:
                if not fleet.failed("GlobalService", t.name, a.namespace):
                    out.add("MF0204", a, field_, f"targetRefs names unknown service {key}", hint=_svc_hint(key, fleet))
                continue
            if fleet.waypoint_of(key) is None:
                out.add("MF0512", a, field_, f"{key} has no waypoint: no L7 proxy enforces this policy for it",
                        hint=f"enroll {key} in a waypoint (label istio.io/use-waypoint), or target a Gateway")
        else:
            gw = fleet.gateways.get(m.ServiceKey(a.namespace, t.name))
            if gw is None:
                out.add("MF0513", a, field_, f"targetRefs names unknown Gateway {a.namespace}/{t.name}",
                        hint=_gateway_hint(a.namespace, t.name, fleet))
    if a.request_level and not a.target_refs:
        out.add("MF0512", a, "spec.rules", f"{a.action.value} policy {a.namespace}/{a.name} uses request fields "
                "(methods, paths, hosts or when) but is enforced by ztunnel (selector, no targetRefs), which sees "
                "connections only: " + ("its rules with request fields never match" if a.action is m.AuthzAction.ALLOW
                                        else "its rules with request fields match every connection (fail closed)"),
                hint="add targetRefs: [{kind: Service, group: \"\", name: <service>}] for a service behind a waypoint")


def _gateway_hint(ns: str, name: str, fleet: _Fleet) -> str:
    same = [g.name for g in fleet.gateways.values() if g.namespace == ns]
    guess = did_you_mean(name, same)
    return (f"did you mean {guess!r}? " if guess else "") + f"add policies/{ns}/{name}.yaml (kind: Gateway)"


def _check_waypoints(fleet: _Fleet, out: _Out) -> None:
    """`istio.io/use-waypoint` names a waypoint Gateway of the same namespace."""
    holders: list[tuple[FleetObject, str, str]] = [(n, n.name, "metadata.labels") for n in fleet.namespaces.values()]
    holders += [(s, s.namespace, "metadata.labels") for s in fleet.services.values()]
    for obj, ns, field_ in holders:
        labels: Mapping[str, str] = obj.labels  # type: ignore[union-attr]
        name = labels.get(m.USE_WAYPOINT_LABEL)
        if name in (None, "", "none"):
            continue
        gw = fleet.gateways.get(m.ServiceKey(ns, str(name)))
        if gw is None:
            if not fleet.failed("Gateway", str(name), ns):
                out.add("MF0513", obj, field_, f"{m.USE_WAYPOINT_LABEL}: {name} names no Gateway in namespace {ns}",
                        hint=_gateway_hint(ns, str(name), fleet) + f" with gatewayClassName: {m.WAYPOINT_CLASS}")
        elif not gw.is_waypoint:
            out.add("MF0513", obj, field_, f"{m.USE_WAYPOINT_LABEL}: {name} names Gateway {ns}/{name} of class "
                    f"{gw.gateway_class!r}, not a waypoint", hint=f"use a Gateway with gatewayClassName: {m.WAYPOINT_CLASS}")
        elif gw.waypoint_for not in ("service", "all"):
            out.add("MF0513", obj, field_, f"waypoint {ns}/{name} is not for services (istio.io/waypoint-for: "
                    f"{gw.waypoint_for})", hint="label the Gateway istio.io/waypoint-for: service")


def _check_gateways(fleet: _Fleet, out: _Out) -> None:
    for gw in fleet.gateways.values():
        for c in gw.clusters:
            if c not in fleet.clusters and not fleet.failed("Cluster", c):
                guess = did_you_mean(c, list(fleet.clusters))
                out.add("MF0202", gw, "metadata.annotations", f"{m.CLUSTERS_ANNOTATION} names unknown cluster {c!r}",
                        hint=(f"did you mean {guess!r}? " if guess else "") + f"clusters: {', '.join(fleet.clusters)}")
        if not gw.listeners:
            out.add("MF0103", gw, "spec.listeners", f"Gateway {gw.namespace}/{gw.name} has no listener",
                    hint="add a listener, e.g. {name: http, port: 80, protocol: HTTP}")


def _authz_field(a: m.AuthorizationPolicy, principal: str, attr: str, ri: int, si: int, pi: int) -> str:
    """Find the written position of a principal (rules may have been expanded per operation)."""
    for dotted, _pos in a.field_pos.items():
        if dotted.endswith(f".source.{attr}[{pi}]") and f"from[{si}]" in dotted:
            return dotted
    return f"spec.rules[{ri}].from[{si}].source.{attr}[{pi}]"


def _source_namespace_error(ns: str) -> str | None:
    """A bare namespace (of the destination's trust domain) or `<td>/ns/<namespace>`; `*` allowed
    (ztunnel.api.authz: a bare name never matches another trust domain's namespace)."""
    parts = ns.split("/")
    if len(parts) == 1:
        return None if ns and (_DNS_LABEL.fullmatch(ns) or "*" in ns) else "is not a namespace name"
    if len(parts) != 3 or parts[1] != "ns" or not parts[0] or not parts[2]:
        return "is neither a namespace nor of the form <trust-domain>/ns/<namespace>"
    if "*" not in parts[0]:
        why = spiffe_trust_domain_error(parts[0])
        if why:
            return f"has trust domain that {why}"
    return None


def _principal_error(p: str) -> str | None:
    if p == "*":
        return None
    if p.startswith("spiffe://"):
        return "starts with spiffe://; Istio principals omit the scheme"
    parts = p.split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        if p.startswith("*") or p.endswith("*"):
            return None
        return "is not of the form <trust-domain>/ns/<namespace>/sa/<account>"
    if "*" not in parts[0]:
        why = spiffe_trust_domain_error(parts[0])
        if why:
            return f"has trust domain that {why}"
    return None


def _check_routes(fleet: _Fleet, out: _Out) -> None:
    parents: dict[m.ServiceKey, m.Route] = {}
    for r in fleet.routes:
        for pi, p in enumerate(r.parents):
            where = f"spec.parentRefs[{pi}]"
            if p.kind == "Service":
                key = m.ServiceKey(p.namespace, p.name)
                if key not in fleet.services:
                    if not fleet.failed("GlobalService", p.name, p.namespace):
                        out.add("MF0204", r, f"{where}.name", f"parent service {key} is not a GlobalService",
                                hint=_svc_hint(key, fleet))
                    continue
                if key in parents:
                    first = parents[key]
                    out.add("MF0509", r, where, f"service {key} already has route "
                            f"{first.kind} {first.namespace}/{first.name} ({first.pos})", hint="merge the two routes")
                parents.setdefault(key, r)
                if r.request_level and fleet.waypoint_of(key) is None:
                    out.add("MF0511", r, "spec.rules", f"{r.kind} {r.namespace}/{r.name} needs per-request routing "
                            f"(matches, filters, timeouts, retries, several rules or InferencePool backends), but {key} "
                            "has no waypoint: a node ztunnel applies only backend weights, per connection",
                            hint=f"label {key} (or namespace {key.namespace}) istio.io/use-waypoint: <waypoint> and "
                                 "add that Gateway, or reduce the route to one rule of weighted backendRefs")
            else:
                gw = fleet.gateways.get(m.ServiceKey(p.namespace, p.name))
                if gw is None:
                    if not fleet.failed("Gateway", p.name, p.namespace):
                        out.add("MF0513", r, f"{where}.name", f"parent Gateway {p.namespace}/{p.name} does not exist",
                                hint=_gateway_hint(p.namespace, p.name, fleet))
                    continue
                if gw.is_waypoint:
                    out.add("MF0513", r, where, f"parent {p.namespace}/{p.name} is a waypoint; routes for traffic "
                            "through a waypoint attach to the Service (GAMMA)",
                            hint="set parentRefs to {group: \"\", kind: Service, name: <service>}")
                    continue
                listeners = [x for x in gw.listeners if (not p.section or x.name == p.section)
                             and (p.port is None or x.port == p.port)]
                if not listeners:
                    out.add("MF0513", r, where, f"Gateway {p.namespace}/{p.name} has no listener "
                            f"{p.section or ''}{' port ' + str(p.port) if p.port else ''}".rstrip(),
                            hint=f"listeners: {', '.join(f'{x.name} ({x.port})' for x in gw.listeners)}")
                elif r.namespace != gw.namespace and all(x.allowed_from != "All" for x in listeners):
                    out.add("MF0513", r, where, f"Gateway {p.namespace}/{p.name} accepts routes from its own namespace "
                            f"only, and this route is in {r.namespace}",
                            hint="set allowedRoutes: {namespaces: {from: All}} on the listener, or move the route")
        for ri, rule in enumerate(r.rules):
            base = f"spec.rules[{ri}]"
            for i, b in enumerate(rule.backends):
                field_ = f"{base}.backendRefs[{i}].name"
                if b.kind == "InferencePool":
                    if m.ServiceKey(b.namespace, b.name) not in fleet.pools and not fleet.failed(
                            "InferencePool", b.name, b.namespace):
                        out.add("MF0513", r, field_, f"backend InferencePool {b.namespace}/{b.name} does not exist",
                                hint=f"add policies/{b.namespace}/{b.name}.yaml (kind: InferencePool)")
                    continue
                key = m.ServiceKey(b.namespace, b.name)
                if key not in fleet.services and not fleet.failed("GlobalService", key.name, key.namespace):
                    out.add("MF0204", r, field_, f"backend {key} is not a GlobalService", hint=_svc_hint(key, fleet))
            if rule.backends and sum(b.weight for b in rule.backends) == 0:
                out.add("MF0507", r, f"{base}.backendRefs", "all backend weights are 0: the route sends nothing",
                        hint="give at least one backend a positive weight")
            _check_matches(r, base, rule, out)


def _check_matches(r: m.Route, base: str, rule: m.RouteRule, out: _Out) -> None:
    for mi, mt in enumerate(rule.matches):
        where = f"{base}.matches[{mi}]"
        if mt.path_type in ("Exact", "PathPrefix") and not mt.path.startswith("/"):
            out.add("MF0514", r, f"{where}.path.value", f"path {mt.path!r} does not start with '/'",
                    hint="write an absolute path, e.g. /v1/completions")
        regexes = [(f"{where}.path.value", mt.path)] if mt.path_type == "RegularExpression" else []
        regexes += [(f"{where}.headers", v) for t, _n, v in mt.headers if t == "RegularExpression"]
        regexes += [(f"{where}.queryParams", v) for t, _n, v in mt.query if t == "RegularExpression"]
        for field_, pattern in regexes:
            try:
                re.compile(pattern)
            except re.error as e:
                out.add("MF0514", r, field_, f"regular expression {pattern!r} does not compile: {e}",
                        hint="write a Python/RE2-compatible expression (matched against the whole value)")
    if rule.rewrite_path_type == "ReplacePrefixMatch" and (
            not rule.matches or any(mt.path_type != "PathPrefix" for mt in rule.matches)):
        out.add("MF0514", r, f"{base}.filters", "URLRewrite ReplacePrefixMatch needs every match of the rule to be a "
                "PathPrefix match (Gateway API)", hint="add matches: [{path: {type: PathPrefix, value: /…}}]")


def _check_pools(fleet: _Fleet, out: _Out) -> None:
    if not fleet.labs:
        return
    for pool in fleet.pools.values():
        ports = {w.port for lab in fleet.labs.values() for w in lab.workloads
                 if w.namespace == pool.namespace and w.role == "server"
                 and all(({"app": w.name, **w.labels}).get(k) == v for k, v in pool.selector.items())}
        if not ports:
            out.add("MF0515", pool, "spec.selector", f"InferencePool {pool.namespace}/{pool.name} selects no "
                    f"model-server workload of any LabCluster (matchLabels {dict(pool.selector)})",
                    hint="label the model-server workloads (labels: …) or fix matchLabels")
        elif not ports & set(pool.target_ports):
            out.add("MF0515", pool, "spec.targetPorts", f"the selected workloads listen on {sorted(ports)}, not on "
                    f"{list(pool.target_ports)}", hint=f"targetPorts: [{{number: {min(ports)}}}]")


def _svc_hint(key: m.ServiceKey, fleet: _Fleet) -> str:
    same_ns = [s.name for s in fleet.services if s.namespace == key.namespace]
    guess = did_you_mean(key.name, same_ns)
    return (f"did you mean {guess!r}? " if guess else "") + f"add services/{key.namespace}/{key.name}.yaml or fix the name"


def _check_lab(lab: m.LabCluster, fleet: _Fleet, out: _Out) -> None:
    cluster = fleet.clusters.get(lab.cluster)
    if cluster is None and not fleet.failed("Cluster", lab.cluster):
        guess = did_you_mean(lab.cluster, list(fleet.clusters))
        out.add("MF0202", lab, "metadata.name", f"LabCluster for unknown cluster {lab.cluster!r}",
                hint=(f"did you mean {guess!r}? " if guess else "") + f"add clusters/{lab.cluster}.yaml")
    nodes: dict[str, int] = {}
    for i, n in enumerate(lab.nodes):
        if n.name in nodes:
            out.add("MF0201", lab, f"spec.nodes[{i}].name", f"node {n.name!r} is declared twice", hint="rename one")
        nodes.setdefault(n.name, i)
    seen: dict[tuple[str, str], int] = {}
    backed: set[m.ServiceKey] = set()
    for i, w in enumerate(lab.workloads):
        base = f"spec.workloads[{i}]"
        if (w.namespace, w.name) in seen:
            out.add("MF0201", lab, f"{base}.name", f"workload {w.namespace}/{w.name} is declared twice",
                    hint="rename one")
        seen.setdefault((w.namespace, w.name), i)
        for j, node in enumerate(w.nodes):
            if node not in nodes:
                guess = did_you_mean(node, list(nodes))
                out.add("MF0601", lab, f"{base}.nodes[{j}]", f"workload {w.name!r} is placed on unknown node {node!r}",
                        hint=(f"did you mean {guess!r}? " if guess else "") + f"nodes: {', '.join(nodes)}")
        if w.service is None:
            continue
        key = m.ServiceKey(w.namespace, w.service)
        svc = fleet.services.get(key)
        if svc is None:
            if fleet.failed("GlobalService", key.name, key.namespace):
                continue
            out.add("MF0204", lab, f"{base}.service", f"workload {w.name!r} backs unknown service {key}",
                    hint=_svc_hint(key, fleet))
        elif w.role == "server":
            backed.add(key)
            if lab.cluster not in svc.export_from:
                out.add("MF0602", lab, f"{base}.service", f"workload {w.name!r} backs {key}, which is not exported "
                        f"from {lab.cluster!r}", hint=f"add {lab.cluster} to {key}'s exportFrom")
    for key, svc in fleet.services.items():
        if lab.cluster in svc.export_from and key not in backed:
            out.add("MF0603", lab, "spec.workloads", f"{key} is exported from {lab.cluster!r} but no server workload "
                    "in this LabCluster backs it", hint=f"add a workload with service: {svc.name}")
