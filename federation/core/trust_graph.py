"""The trust-domain graph: which cluster uses which trust domain, who federates with whom, which
identities a proxy in cluster X accepts from cluster Y, and the bundle set each proxy needs.

Federation must be explicit *both ways*. A connection from X to Y is mutual TLS: X verifies Y's
certificate against Y's trust-domain bundle, and Y verifies X's. So X and Y can talk only when
their trust domains are equal or each lists the other in `federatesWith`. A one-sided listing is
reported (it is almost always a forgotten half of a change) and does not grant anything.

Problems are found here, before any handshake: `route_problems` lists every (client cluster,
global service, serving cluster) where the client could be routed to endpoints whose identity it
does not trust; the failover engine drops those endpoints from the client's view.

Codes (catalogue in `gitops.codes`, range MF04xx identity and trust):
- MF0405 one-sided federation: A federates with B, B does not list A;
- MF0406 a client cluster cannot reach (some of) a global service's endpoints because the trust
  domains do not federate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gitops.model import ConfigSnapshot, ServiceKey, TrustDomain
from gitops.problems import ObjectRef, Problem, Severity, SourcePos

CODE_ONE_SIDED = "MF0405"
CODE_UNTRUSTED_ROUTE = "MF0406"


@dataclass(frozen=True, slots=True)
class TrustEdge:
    a: str
    b: str
    mutual: bool


@dataclass(frozen=True, slots=True)
class FederationListing:
    """One `federatesWith` entry as declared: `source` lists `peer`."""

    source: str
    peer: str
    mutual: bool        # the peer lists `source` back
    known_peer: bool    # the peer is a TrustDomain of this repo


def federation_listings(trust_domains: Mapping[str, TrustDomain]) -> list[FederationListing]:
    """Every federatesWith entry of the repo, in name order: the one reading of the trust edges that
    the graph, validation and `meshfed trust` share."""
    out: list[FederationListing] = []
    for a in sorted(trust_domains):
        for b in trust_domains[a].federates_with:
            known = b in trust_domains
            out.append(FederationListing(a, b, known and a in trust_domains[b].federates_with, known))
    return out


def one_sided_message(a: str, b: str) -> tuple[str, str]:
    """(message, hint) for `a` listing `b` without `b` listing `a`."""
    return (f"trust domain {a} federates with {b}, but {b} does not federate with {a}; mutual TLS needs "
            f"both sides, so no identity crosses this edge",
            f"add {a} to spec.federatesWith in trust/{b}.yaml, or remove {b} here")


class TrustGraph:
    """Trust relationships of one fleet revision. Immutable once built."""

    def __init__(self, snapshot: ConfigSnapshot) -> None:
        self.snapshot = snapshot
        self.domains: tuple[str, ...] = tuple(sorted(snapshot.trust_domains))
        self.cluster_domain: dict[str, str] = {n: c.trust_domain for n, c in snapshot.clusters.items()}
        listed: dict[str, frozenset[str]] = {
            n: frozenset(td.federates_with) for n, td in snapshot.trust_domains.items()
        }
        self._listed = listed
        self._trusts: dict[str, frozenset[str]] = {
            a: frozenset({a} | {b for b in listed[a] if a in listed.get(b, frozenset())}) for a in listed
        }
        # clusters referencing a trust domain the repo does not declare still trust themselves
        for td in self.cluster_domain.values():
            self._trusts.setdefault(td, frozenset({td}))

    # --- queries ----------------------------------------------------------------------------

    def trusts(self, a: str, b: str) -> bool:
        """Do trust domains `a` and `b` accept each other's identities (mutual federation)?"""
        return b in self._trusts.get(a, frozenset({a}))

    def clusters_trust(self, x: str, y: str) -> bool:
        return self.trusts(self.cluster_domain[x], self.cluster_domain[y])

    def trusted_domains(self, domain: str) -> frozenset[str]:
        return self._trusts.get(domain, frozenset({domain}))

    def accepted_trust_domains(self, cluster: str) -> tuple[str, ...]:
        """Trust domains whose identities a proxy in `cluster` accepts (its own first)."""
        own = self.cluster_domain[cluster]
        return (own, *sorted(self.trusted_domains(own) - {own}))

    def accepts_identity(self, cluster: str, identity: str) -> bool:
        td = identity_trust_domain(identity)
        return td is not None and td in self.trusted_domains(self.cluster_domain[cluster])

    def accepted_from(self, x: str, y: str, identities: Iterable[str]) -> tuple[str, ...]:
        """Which of cluster y's `identities` a proxy in cluster x accepts."""
        if not self.clusters_trust(x, y):
            return ()
        return tuple(sorted(i for i in identities if self.accepts_identity(x, i)))

    def bundle_set(self, cluster: str) -> tuple[str, ...]:
        """Trust domains whose bundles a proxy in `cluster` needs: its own and every mutual peer."""
        return self.accepted_trust_domains(cluster)

    def edges(self) -> list[TrustEdge]:
        out: list[TrustEdge] = []
        for a in self.domains:
            for b in sorted(self._listed.get(a, ())):
                if a < b or a not in self._listed.get(b, frozenset()):
                    out.append(TrustEdge(a, b, a in self._listed.get(b, frozenset())))
        return out

    # --- problems ---------------------------------------------------------------------------

    def federation_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        for listing in federation_listings(self.snapshot.trust_domains):
            if listing.known_peer and not listing.mutual:
                td = self.snapshot.trust_domains[listing.source]
                message, hint = one_sided_message(listing.source, listing.peer)
                problems.append(Problem(CODE_ONE_SIDED, message, td.field_pos.get("spec.federatesWith", td.pos),
                                        hint=hint, obj=ObjectRef("TrustDomain", listing.source),
                                        severity=Severity.WARNING))
        return problems

    def route_problems(self, exported: Mapping[ServiceKey, Iterable[str]] | None = None) -> list[Problem]:
        """Every client cluster that would be routed to endpoints it cannot trust."""
        problems: list[Problem] = []
        snap = self.snapshot
        clusters = sorted(snap.clusters)
        for key, svc in sorted(snap.services.items(), key=lambda kv: str(kv[0])):
            servers = sorted(exported[key]) if exported is not None and key in exported else sorted(svc.export_from)
            for x in clusters:
                untrusted = [y for y in servers if y in self.cluster_domain and not self.clusters_trust(x, y)]
                if not untrusted:
                    continue
                x_td = self.cluster_domain[x]
                reach = "none of its endpoints" if len(untrusted) == len(servers) else "the endpoints in " + ", ".join(untrusted)
                problems.append(Problem(
                    CODE_UNTRUSTED_ROUTE,
                    f"clients in cluster {x} (trust domain {x_td}) cannot use {reach} of service {key}: "
                    f"{', '.join(sorted({self.cluster_domain[y] for y in untrusted}))} and {x_td} do not "
                    f"federate with each other, so the mTLS handshake would fail",
                    svc.pos if svc.pos.file else SourcePos(f"services/{key.namespace}/{key.name}.yaml"),
                    hint="list the trust domains in each other's spec.federatesWith, or stop exporting "
                         "the service from those clusters",
                    obj=ObjectRef("GlobalService", key.name, key.namespace),
                    severity=Severity.WARNING,
                ))
        return problems


def identity_trust_domain(identity: str) -> str | None:
    """`spiffe://td/ns/x/sa/y` -> `td`; also accepts Istio's principal form `td/ns/x/sa/y`."""
    rest = identity.removeprefix("spiffe://")
    td, sep, _ = rest.partition("/")
    return td if sep and td else None
