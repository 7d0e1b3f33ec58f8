"""L4 authorization: a pure decision over `ztunnel.api.config.Authorization` resources.

Istio's AuthorizationPolicy semantics reduced to what an L4 proxy can see (peer identity, the
peer's namespace taken from its identity, destination port):

1. Policies apply to a destination workload when they live in its namespace (or in the root
   namespace, mesh-wide) and their `selector` labels are a subset of the workload's labels (an empty
   selector selects every workload of the namespace).
2. If any applicable DENY policy has a matching rule → denied.
3. If there are applicable ALLOW policies and none has a matching rule → denied.
4. Otherwise → allowed.

A rule (`AuthzMatch`) matches when every field it sets matches (fields left empty match anything);
an ALLOW or DENY policy with no rules matches nothing (Istio: an ALLOW with no rules denies all
— its presence alone makes step 3 apply). Principals are compared as Istio writes them
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


def rule_matches(rule: AuthzMatch, peer: Peer, port: int, local_trust_domain: str) -> bool:
    """`local_trust_domain`: the destination's, against which bare namespace names are read."""
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
    return not (rule.not_ports and port in rule.not_ports)


def applies_to(policy: Authorization, namespace: str, labels: Mapping[str, str],
               root_namespace: str = ROOT_NAMESPACE) -> bool:
    if policy.namespace not in (namespace, root_namespace):
        return False
    return all(labels.get(k) == v for k, v in policy.selector.items())


def evaluate(policies: Iterable[Authorization], *, peer: Peer, dest_namespace: str,
             dest_labels: Mapping[str, str], port: int, local_trust_domain: str,
             root_namespace: str = ROOT_NAMESPACE) -> Decision:
    """DENY first, then ALLOW, then allow by default. Pure; `policies` may be in any order.
    `local_trust_domain` is the destination's (bare `namespaces` entries name its namespaces)."""
    applicable = sorted((p for p in policies if applies_to(p, dest_namespace, dest_labels, root_namespace)),
                        key=lambda p: p.key)
    for p in applicable:
        if p.action == "DENY" and any(rule_matches(r, peer, port, local_trust_domain) for r in p.rules):
            return Decision(False, f"denied by DENY policy {p.key}", p.key)
    allows = [p for p in applicable if p.action == "ALLOW"]
    for p in allows:
        if any(rule_matches(r, peer, port, local_trust_domain) for r in p.rules):
            return Decision(True, f"allowed by ALLOW policy {p.key}", p.key)
    if allows:
        names = ", ".join(p.key for p in allows)
        who = peer.principal or "a peer without identity"
        return Decision(False, f"no ALLOW policy matched {who} on port {port} (ALLOW policies: {names})",
                        allows[0].key)
    return Decision(True, "allowed: no policy applies")
