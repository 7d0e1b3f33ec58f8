"""Authorization: one pure decision over `ztunnel.api.config.Authorization` resources, for ztunnel
(per connection) and for waypoints and ingress gateways (per request).

Istio's AuthorizationPolicy semantics. Where a policy applies:

- at ztunnel (`evaluate`): policies without `targets` living in the destination workload's
  namespace (or the root namespace, mesh-wide) whose `selector` labels are a subset of the
  workload's labels (an empty selector selects every workload of the namespace);
- at an L7 proxy (`evaluate_request`): policies whose `targets` name the destination Service
  ("Service/<ns>/<name>") or the proxy's Gateway ("Gateway/<ns>/<name>"): Istio ambient's
  targetRefs. A waypoint sees the caller's verified identity (the peer of the HBONE tunnel the
  caller's ztunnel opened) and the request.

Then, in both places:
1. If any applicable DENY policy has a matching rule → denied.
2. If there are applicable ALLOW policies and none has a matching rule → denied.
3. Otherwise → allowed.

Request-level fields (`methods`, `paths`, `hosts`, `when`) need the request. Evaluated without one
(ztunnel), a rule that sets them is taken the way Istio's ztunnel takes it: an ALLOW rule never
matches, a DENY rule matches on its connection-level fields alone (fail closed). Validation warns
about such policies (MF0512). Paths and hosts follow Istio: exact, `prefix*`, `*suffix` or `*`;
hosts compare case-insensitively, with or without the port; methods exactly. `when` supports
`request.headers[<name>]` with `values` (any matches) and `notValues` (none matches; a missing
header matches no value).

A rule (`AuthzMatch`) matches when every field it sets matches (fields left empty match anything);
an ALLOW or DENY policy with no rules matches nothing (Istio: an ALLOW with no rules denies all
— its presence alone makes step 2 apply). Principals are compared as Istio writes them
(`<td>/ns/<ns>/sa/<sa>`, the SPIFFE id without `spiffe://`); the `spiffe://` form is accepted too.
`*` is allowed as a whole value, as a prefix (`*/ns/shop/sa/*` is two wildcards: each `*` matches any
run of characters) or a suffix, as in Istio.

Source namespaces across trust domains. A namespace name means something only inside its trust
domain: `shop` in west.mesh.local is not `shop` in east.mesh.local (another cluster, another
team). Istio has one trust domain per mesh, so its `namespaces: [shop]` never had to say which;
here it must, and the rule is:

- `namespaces: [shop]` (a bare name, wildcards allowed) matches peers in namespace `shop` of the
  *destination's own* trust domain only;
- `namespaces: [west.mesh.local/ns/shop]` matches `shop` of west.mesh.local: the principal syntax
  cut after the namespace, so a policy that means another trust domain says so the way its
  `principals` would; `*/ns/shop` is `shop` of any trust domain (the old, federation-blind match).

The same holds for `notNamespaces`. `principals` already name their trust domain and are unchanged.

The decision carries a reason naming the policy, so a refused connection can tell the client (and
the access log) why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ztunnel.api.config import Authorization, AuthzMatch

ROOT_NAMESPACE = "istio-system"


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is connecting, as established by mTLS (`principal` is the full SPIFFE id)."""

    principal: str   # spiffe://td/ns/x/sa/y, or "" for a plaintext peer
    namespace: str
    trust_domain: str = ""

    @property
    def qualified_namespace(self) -> str:
        """`<td>/ns/<namespace>`: what a trust-domain-qualified `namespaces` entry is matched against."""
        return f"{self.trust_domain}/ns/{self.namespace}" if self.namespace else ""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    policy: str = ""  # namespace/name of the deciding policy ("" when allowed by default)


def peer_from_identity(identity: str) -> Peer:
    """Peer of a SPIFFE id string; the namespace is the `/ns/<ns>/` segment."""
    parts = identity.removeprefix("spiffe://").split("/")
    if len(parts) >= 5 and parts[1] == "ns":
        return Peer(identity, parts[2], parts[0])
    return Peer(identity, "")


def _istio_principal(principal: str) -> str:
    return principal.removeprefix("spiffe://")


def match_value(pattern: str, value: str) -> bool:
    """Istio's string match: `*` is the only wildcard (a run of any characters); everything else,
    `?` and `[` included, is literal."""
    if pattern == "*":
        return bool(value)
    if "*" in pattern:
        literal = [re.escape(part) for part in pattern.split("*")]
        return re.fullmatch(".*".join(literal), value, re.DOTALL) is not None
    return pattern == value


def _principal_match(patterns: Iterable[str], principal: str) -> bool:
    short = _istio_principal(principal)
    return any(match_value(_istio_principal(p), short) for p in patterns) if short else False


def namespace_matches(pattern: str, peer: Peer, local_trust_domain: str) -> bool:
    """One `namespaces` entry against a peer: a bare name means the local trust domain's namespace,
    `<td>/ns/<namespace>` (wildcards allowed) names the trust domain (see the module docstring)."""
    if not peer.namespace:
        return False
    if "/" in pattern:
        return match_value(pattern, peer.qualified_namespace)
    return peer.trust_domain == local_trust_domain and match_value(pattern, peer.namespace)


def _any_namespace(patterns: Iterable[str], peer: Peer, local_trust_domain: str) -> bool:
    return any(namespace_matches(p, peer, local_trust_domain) for p in patterns)


@dataclass(frozen=True, slots=True)
class Request:
    """What an L7 proxy knows of one request. `headers`: lower-case names, repeated values joined
    with ","; `path` without the query; `host` as sent (a port may follow)."""

    method: str
    path: str
    host: str
    headers: Mapping[str, str]


def _path_match(pattern: str, path: str) -> bool:
    """Istio's path forms: exact, `prefix*`, `*suffix`, `*`."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return path.endswith(pattern[1:])
    return path == pattern


def _host_match(pattern: str, host: str) -> bool:
    """An L7 proxy hands the normalized host (`ztunnel.proxy.l7.normalize`: lower-case, no trailing
    dot); the same canonical reading is applied to both sides here so a pattern written
    `Internal.Example.com.` or a host from elsewhere cannot miss by spelling."""
    p, h = pattern.lower(), host.lower()
    bare = h.rsplit(":", 1)[0] if ":" in h and not h.endswith("]") else h
    if p.endswith(".") and p != "*.":
        p = p[:-1]
    candidates = {h, bare, bare.removesuffix(".")}
    if bare.endswith("."):
        candidates.add(bare[:-1] + h[len(bare):])
    return any(_path_match(p, x) for x in candidates)


def _condition_matches(key: str, values: tuple[str, ...], not_values: tuple[str, ...], request: Request) -> bool:
    name = key[len("request.headers["):-1].lower() if key.startswith("request.headers[") else ""
    value = request.headers.get(name) if name else None
    if values and (value is None or not any(_path_match(v, value) for v in values)):
        return False
    return not (not_values and value is not None and any(_path_match(v, value) for v in not_values))


def request_fields_match(rule: AuthzMatch, request: Request) -> bool:
    if rule.methods and request.method not in rule.methods:
        return False
    if rule.not_methods and request.method in rule.not_methods:
        return False
    if rule.paths and not any(_path_match(p, request.path) for p in rule.paths):
        return False
    if rule.not_paths and any(_path_match(p, request.path) for p in rule.not_paths):
        return False
    if rule.hosts and not any(_host_match(h, request.host) for h in rule.hosts):
        return False
    if rule.not_hosts and any(_host_match(h, request.host) for h in rule.not_hosts):
        return False
    return all(_condition_matches(c.key, c.values, c.not_values, request) for c in rule.when)


def rule_matches(rule: AuthzMatch, peer: Peer, port: int, local_trust_domain: str, request: Request | None = None,
                 action: str = "ALLOW") -> bool:
    """Does `rule` match? `local_trust_domain`: the destination's, against which bare namespace
    names are read. Without a `request` (ztunnel), request-level fields make an ALLOW rule never
    match and a DENY rule match on its connection-level fields (Istio's fail-closed reading)."""
    if rule.principals and not _principal_match(rule.principals, peer.principal):
        return False
    if rule.not_principals and _principal_match(rule.not_principals, peer.principal):
        return False
    if rule.namespaces and not _any_namespace(rule.namespaces, peer, local_trust_domain):
        return False
    if rule.not_namespaces and _any_namespace(rule.not_namespaces, peer, local_trust_domain):
        return False
    if rule.ports and port not in rule.ports:
        return False
    if rule.not_ports and port in rule.not_ports:
        return False
    if rule.request_level:
        if request is None:
            return action == "DENY"
        return request_fields_match(rule, request)
    return True


def applies_to(policy: Authorization, namespace: str, labels: Mapping[str, str],
               root_namespace: str = ROOT_NAMESPACE) -> bool:
    """Does ztunnel enforce `policy` for a workload of `namespace` with `labels`? (Never a policy
    with targets: an L7 proxy enforces those.)"""
    if policy.targets:
        return False
    if policy.namespace not in (namespace, root_namespace):
        return False
    return all(labels.get(k) == v for k, v in policy.selector.items())


def applies_to_target(policy: Authorization, target: str) -> bool:
    """Does `policy` name `target` ("Service/<ns>/<name>" or "Gateway/<ns>/<name>") in its targetRefs?"""
    return target in policy.targets


def _decide(applicable: list[Authorization], peer: Peer, port: int, request: Request | None,
            what: str, local_trust_domain: str) -> Decision:
    for p in applicable:
        if p.action == "DENY":
            for i, r in enumerate(p.rules):
                if rule_matches(r, peer, port, local_trust_domain, request, "DENY"):
                    return Decision(False, f"denied by DENY policy {p.key} (rule {i}{_describe(r, request)})", p.key)
    allows = [p for p in applicable if p.action == "ALLOW"]
    for p in allows:
        if any(rule_matches(r, peer, port, local_trust_domain, request, "ALLOW") for r in p.rules):
            return Decision(True, f"allowed by ALLOW policy {p.key}", p.key)
    if allows:
        names = ", ".join(p.key for p in allows)
        who = peer.principal or "a peer without identity"
        return Decision(False, f"no ALLOW policy matched {who} {what} (ALLOW policies: {names})", allows[0].key)
    return Decision(True, "allowed: no policy applies")


def _describe(rule: AuthzMatch, request: Request | None) -> str:
    if not rule.request_level:
        return ""
    if request is None:
        return ": request fields cannot be checked at L4, DENY fails closed"
    parts = []
    if rule.methods:
        parts.append(f"method {request.method}")
    if rule.paths or rule.not_paths:
        parts.append(f"path {request.path}")
    if rule.hosts or rule.not_hosts:
        parts.append(f"host {request.host}")
    if rule.when:
        parts.append(", ".join(c.key for c in rule.when))
    return ": " + ", ".join(parts) if parts else ""


def evaluate(policies: Iterable[Authorization], *, peer: Peer, dest_namespace: str,
             dest_labels: Mapping[str, str], port: int, local_trust_domain: str,
             root_namespace: str = ROOT_NAMESPACE) -> Decision:
    """ztunnel's decision for one connection: DENY first, then ALLOW, then allow by default. Pure;
    `policies` may be in any order. `local_trust_domain` is the destination's (bare `namespaces`
    entries name its namespaces)."""
    applicable = sorted((p for p in policies if applies_to(p, dest_namespace, dest_labels, root_namespace)),
                        key=lambda p: p.key)
    return _decide(applicable, peer, port, None, f"on port {port}", local_trust_domain)


def evaluate_request(policies: Iterable[Authorization], *, peer: Peer, targets: Iterable[str], port: int,
                     request: Request, local_trust_domain: str) -> Decision:
    """A waypoint's or ingress gateway's decision for one request to `targets` (the destination
    Service and the proxy's own Gateway): DENY first, then ALLOW, then allow by default.
    `local_trust_domain`: the proxy's (its cluster's; bare `namespaces` entries name its namespaces)."""
    wanted = set(targets)
    applicable = sorted((p for p in policies if wanted.intersection(p.targets)), key=lambda p: p.key)
    return _decide(applicable, peer, port, request, f"for {request.method} {request.path}", local_trust_domain)
