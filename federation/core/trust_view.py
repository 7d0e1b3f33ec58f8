"""The trust view `meshfed trust` shows: per trust domain its CA mode, bundle and roots (fingerprint,
not-after, signing), the federation edges, and what would break mTLS (one-sided or unknown edges,
expired or soon-expiring roots, unreadable material).

Pure: built from the repo's TrustDomain objects and public key material (`TrustMaterial`), wherever
that came from — the repo and the CA state directory offline, or the live CAs through the
controller — with `now_s` passed in. The edges are read by `federation.core.trust_graph`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from federation.core.trust_graph import FederationListing, federation_listings, one_sided_message
from gitops.model import CaMode, TrustDomain
from ztunnel.api.bundle import SpiffeBundle, fingerprint_sha256

EXPIRY_WARNING_S = 30 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class TrustMaterial:
    """What is known about one trust domain's public keys, wherever it came from."""

    bundle: SpiffeBundle | None = None
    named_roots: Mapping[str, x509.Certificate] = field(default_factory=dict)  # root name -> certificate
    source: str = ""   # "repo:trust/x.bundle.json", "state:/var/lib/meshfed/ca/x", "controller:URL"
    error: str = ""    # why the material could not be read


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _root_row(name: str | None, signing: bool | None, cert: x509.Certificate | None, now_s: float,
              problems: list[str], td: str) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "signing": signing, "fingerprint": None, "notAfter": None,
                           "expiresIn_s": None, "subject": None}
    if cert is not None:
        na = cert.not_valid_after_utc.timestamp()
        row.update(fingerprint=fingerprint_sha256(cert), notAfter=iso_utc(na), expiresIn_s=round(na - now_s),
                   subject=cert.subject.rfc4514_string())
        label = name or row["subject"]
        if na <= now_s:
            problems.append(f"{td}: root {label} expired at {iso_utc(na)}; rotate it (publish, switch, retire)")
        elif na - now_s < EXPIRY_WARNING_S:
            problems.append(f"{td}: root {label} expires {iso_utc(na)} (in {(na - now_s) / 86400:.0f} days); "
                            "start a staged rotation now")
    return row


def build_trust_view(trust_domains: Mapping[str, TrustDomain], materials: Mapping[str, TrustMaterial],
                     now_s: float) -> dict[str, Any]:
    """Plain data (JSON-able) describing the trust graph; `problems` lists what would break mTLS."""
    problems: list[str] = []
    names = sorted(trust_domains)
    listings: dict[str, list[FederationListing]] = {}
    trusted_by: dict[str, list[str]] = {n: [] for n in names}
    for listing in federation_listings(trust_domains):
        listings.setdefault(listing.source, []).append(listing)
        if listing.known_peer:
            trusted_by[listing.peer].append(listing.source)
    domains: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    for n in names:
        td = trust_domains[n]
        mat = materials.get(n, TrustMaterial())
        roots: list[dict[str, Any]] = []
        fps_named: set[str] = set()
        if td.ca.mode is CaMode.MANAGED:
            for spec_root in td.ca.roots:
                cert = mat.named_roots.get(spec_root.name)
                roots.append(_root_row(spec_root.name, spec_root.signing, cert, now_s, problems, n))
                if cert is not None:
                    fps_named.add(fingerprint_sha256(cert))
                elif mat.named_roots:
                    problems.append(f"{n}: root {spec_root.name} is in the repo but not in the CA state yet "
                                    "(the controller creates it on its next reconcile)")
        if mat.bundle is not None:
            for cert in mat.bundle.authorities:
                if fingerprint_sha256(cert) not in fps_named:
                    roots.append(_root_row(None, None, cert, now_s, problems, n))
        if mat.error:
            problems.append(f"{n}: {mat.error}")
        for listing in listings.get(n, ()):
            edges.append({"from": n, "to": listing.peer, "mutual": listing.mutual})
            if not listing.known_peer:
                problems.append(f"{n} federates with {listing.peer}, which is not a TrustDomain in this repo")
            elif not listing.mutual:
                message, hint = one_sided_message(n, listing.peer)
                problems.append(f"{message}; {hint}")
        domains.append({
            "name": n,
            "caMode": td.ca.mode.value,
            "workloadCertTTL_s": td.ca.workload_cert_ttl_s,
            "bundleSequence": mat.bundle.sequence if mat.bundle is not None else None,
            "bundleRefreshHint_s": mat.bundle.refresh_hint_s if mat.bundle is not None else None,
            "bundleSource": mat.source or None,
            "roots": roots,
            "trusts": [n, *td.federates_with],
            "trustedBy": [n, *sorted(trusted_by[n])],
        })
    return {"trustDomains": domains, "edges": edges, "problems": problems}
