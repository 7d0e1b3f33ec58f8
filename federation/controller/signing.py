"""Certificate signing policy: which identities a proxy may get, and who may act as which proxy.

The controller runs one CA per trust domain of the applied fleet (`federation.controller.ca`,
keys in the state directory). `SigningPolicy` decides, the gRPC adapter
(`federation.server.grpc_services.ConfigServer`) only authenticates and translates:

- **CSR entitlement** (`sign`): a proxy authenticated by its client certificate may get its own
  identity (`ztunnel.api.identity.proxy_spiffe_id`, in its cluster's trust domain) plus the
  identities of the workloads in its rendered config (`local_identities`: it terminates mTLS for
  them). A proxy authenticated by a **bootstrap token** gets its own identity only: a token is a
  weaker credential, handed to every proxy of a cluster (`federation.controller.bootstrap`).
- **Acting as a proxy** (`ProxyAuthorizer`): only the proxy's own identity in the trust domain of
  the cluster its id names may subscribe, report health or renew as that proxy.
- **Client verification** (`verify_client`): trust-domain-bound — the leaf's issuer must be a
  root of the trust domain its SAN names. gRPC checks chains only against the pooled roots of
  every CA, and with a pool trust domain A's CA could mint B's identities.
- **Leaves issued** (`record_leaf`): the latest not-after per (trust domain, signing root), the
  staged root rotation's input (`federation.core.rotation_gate`), recorded *before* a chain
  leaves: a leaf we could not record could later be broken by retiring its root.
- **The controller's serving certificate** (`server_tls`): an SVID of the first trust domain with
  the DNS name proxies verify (`CONTROLLER_TLS_NAME`), itself recorded as a live leaf.

CA objects refuse to be pickled: they never leave the process that holds this policy (the state
owner; see `federation.ray.placement`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gitops.model import ConfigSnapshot, TrustDomain
from ztunnel.api.identity import PROXY_NAMESPACE, proxy_spiffe_id

log = logging.getLogger(__name__)


def cluster_named_by(proxy_id: str) -> str:
    """The cluster a proxy id names (`ztunnel/<cluster>/<node>`, `gateway/<cluster>`); "" when it
    names none (the authorizer then refuses it: no cluster "" is in the fleet)."""
    parts = proxy_id.split("/")
    return parts[1] if len(parts) >= 2 else ""


@dataclass(frozen=True, slots=True)
class Requester:
    proxy_id: str
    identity: str        # SPIFFE ID from the client certificate ("" without one)
    bootstrap: bool      # authenticated by a bootstrap token instead of a certificate
    cluster: str = ""    # the cluster the bootstrap token belongs to


class Signer(Protocol):
    def sign(self, who: Requester, csr_pem: bytes, ttl_s: float) -> tuple[list[bytes], list[bytes], float]:
        """(chain leaf-first, roots, expires_at_s); raises PermissionError with the reason."""
        ...


@dataclass
class ProxyAuthorizer:
    """May identity X act as proxy P? Only when X is P's own identity in the trust domain of P's
    cluster (`ztunnel.api.identity.proxy_spiffe_id`): another proxy's certificate, a workload's, or one of
    another trust domain cannot subscribe as P."""

    cluster_trust_domains: dict[str, str] = field(default_factory=dict)
    proxy_namespace: str = PROXY_NAMESPACE

    def __call__(self, proxy_id: str, identity: str) -> str:
        """"" when allowed, else the reason."""
        cluster = cluster_named_by(proxy_id)
        td = self.cluster_trust_domains.get(cluster)
        if td is None:
            return f"proxy {proxy_id} names cluster {cluster!r}, which is not in the fleet repo"
        try:
            want = proxy_spiffe_id(td, proxy_id)
        except ValueError as e:
            return str(e)
        if identity != want:
            return (f"identity {identity or '<none>'} may not act as proxy {proxy_id}: only {want} may "
                    f"(the proxy's own identity in {td}, the trust domain of cluster {cluster})")
        return ""


class LeafLedger(Protocol):
    """What the policy records in the store (`federation.controller.store.Store`)."""

    def record_leaf_issued(self, trust_domain: str, root_name: str, not_after_s: float,
                           at_s: float | None = None) -> None: ...

    def record_ca_root(self, trust_domain: str, root_name: str, fingerprint: str, not_after_s: float,
                       key_path: str = "", signing: bool = False) -> None: ...


class SigningPolicy:
    """The CAs of the applied fleet and the rules above. Invariants: `cas` holds a CA only for
    trust domains whose CA meshfed runs (an external CA has none here); `cluster_tds` is the
    cluster -> trust domain map of the snapshot the CAs were loaded from."""

    def __init__(self, state_dir: str | Path, ledger: LeafLedger,
                 rendered_identities: Callable[[str], Iterable[str]] = lambda _proxy_id: (),
                 clock: Callable[[], float] = time.time) -> None:
        self.state_dir = str(state_dir)
        self.ledger = ledger
        self.rendered_identities = rendered_identities   # proxy id -> identities of its rendered workloads
        self.clock = clock
        self.cas: dict[str, Any] = {}                    # trust domain -> federation.controller.ca.TrustDomainCA
        self.cluster_tds: dict[str, str] = {}
        self.trust_domains: dict[str, TrustDomain] = {}
        # clusters removed from the fleet but still draining (`federation.core.removal`): their
        # proxies keep acting as themselves and renewing until the drain is over
        self.draining_tds: dict[str, str] = {}

    # --- CAs -----------------------------------------------------------------------------------

    def load_cas(self, snap: ConfigSnapshot) -> dict[str, tuple[str, ...]]:
        """Load or create the CA of every trust domain of a snapshot (keys in the state directory)
        and record their roots in the store; returns the PEM roots per trust domain."""
        from cryptography.hazmat.primitives.hashes import SHA256

        from federation.controller.ca import CaStateDir

        cadir = CaStateDir(self.state_dir)
        cas: dict[str, Any] = {}
        out: dict[str, tuple[str, ...]] = {}
        for name, td in sorted(snap.trust_domains.items()):
            ca = cadir.load_or_create(td)
            if ca is None:
                continue
            cas[name] = ca
            out[name] = tuple(c for c in ca.trust_bundle().roots_pem)
        # all or nothing: a failure above leaves the previous revision's CAs and cluster map in force;
        # trust domains the snapshot no longer has stop signing
        for name, ca in sorted(cas.items()):
            _log_ca_change(name, self.cas.get(name), ca)
        self.cas = cas
        self.cluster_tds = {name: str(c.trust_domain) for name, c in snap.clusters.items()}
        self.trust_domains = dict(snap.trust_domains)
        for name, ca in sorted(cas.items()):
            for cert in ca.authorities:
                self.ledger.record_ca_root(name, cert.subject.rfc4514_string(), cert.fingerprint(SHA256()).hex(),
                                           cert.not_valid_after_utc.timestamp())
        return out

    def roots_pem(self) -> bytes:
        return b"".join(self.cas[td].roots_pem() for td in sorted(self.cas))

    # --- who may act as whom ------------------------------------------------------------------

    def member_tds(self) -> dict[str, str]:
        """Cluster -> trust domain of every cluster whose proxies may act: members and draining."""
        return {**self.draining_tds, **self.cluster_tds}

    def authorize(self, proxy_id: str, identity: str) -> str:
        """"" when `identity` may act as `proxy_id`, else the reason (see `ProxyAuthorizer`)."""
        return ProxyAuthorizer(self.member_tds(), PROXY_NAMESPACE)(proxy_id, identity)

    def verify_client(self, leaf_pem: bytes) -> str:
        """Trust-domain-bound verification of a proxy's client certificate against our own CAs:
        its SPIFFE ID, or PermissionError with the reason."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        from ztunnel.api.verify import PeerVerificationError, TrustStore

        store = TrustStore.from_bundles(*(ca.trust_bundle() for ca in self.cas.values()))
        der = x509.load_pem_x509_certificate(leaf_pem).public_bytes(Encoding.DER)
        try:
            return str(store.verify_peer(der, self.clock()))
        except PeerVerificationError as e:
            raise PermissionError(e.reason) from e

    # --- issuance ----------------------------------------------------------------------------

    def entitled_identities(self, who: Requester, trust_domain: str) -> set[str]:
        """What `who` may have certified: its own identity; plus, over mTLS only, the identities of
        the workloads its rendered config lists."""
        own = proxy_spiffe_id(trust_domain, who.proxy_id)
        if who.bootstrap:  # a bootstrap token buys the proxy's own identity only
            return {own}
        return {own, *self.rendered_identities(who.proxy_id)}

    def sign(self, who: Requester, csr_pem: bytes, ttl_s: float) -> tuple[list[bytes], list[bytes], float]:
        from cryptography import x509

        from federation.controller.ca import CsrDenied, Entitlement

        td = self.member_tds().get(who.cluster)
        ca = self.cas.get(td or "")
        if td is None or ca is None:
            raise PermissionError(f"proxy {who.proxy_id}: cluster {who.cluster!r} has no CA here "
                                  f"(unknown cluster or external CA)")
        allowed = self.entitled_identities(who, td)
        try:
            chain = ca.issue_from_csr(csr_pem, entitlement=Entitlement.of(who.proxy_id, allowed),
                                      ttl_s=ttl_s or None)
        except CsrDenied as e:
            raise PermissionError(str(e)) from e
        leaf = x509.load_pem_x509_certificate(chain)
        not_after_s = leaf.not_valid_after_utc.timestamp()
        # before the chain leaves: a leaf we could not record could later be broken by retiring its root
        self.record_leaf(td, ca, not_after_s)
        ids = _san_uris(leaf)
        how = "bootstrap token" if who.bootstrap else "its own certificate"
        log.info("certificate issued to %s (%s) for %s, valid %.0f s, signed by %s/%s", who.proxy_id, how,
                 ", ".join(ids), not_after_s - self.clock(), td, ca.signing_root or "plug-in CA",
                 extra={"fields": {"event": "CertificateIssued", "proxy": who.proxy_id, "identities": ids,
                                   "not_after_s": round(not_after_s, 3), "trust_domain": td,
                                   "root": ca.signing_root or "", "renewal": not who.bootstrap}})
        return [chain], [ca.roots_pem()], not_after_s

    def record_leaf(self, td: str, ca: Any, not_after_s: float) -> None:
        """Staged rotation's input: the latest not-after per (trust domain, signing root name). A
        plug-in CA has no named signing root; its leaves count against its (only) root, which is
        what a switch between Managed and External checks."""
        root = ca.signing_root or (ca.roots[0].name if ca.roots else "")
        self.ledger.record_leaf_issued(td, root, not_after_s)

    def server_tls(self) -> tuple[bytes, bytes, bytes]:
        """(key PEM, chain PEM, client roots PEM) for the controller's TLS port."""
        from ztunnel.api.identity import CONTROLLER_TLS_NAME

        if not self.cas:
            raise RuntimeError("TLS needs a CA: load the fleet's CAs first (no trust domain with a "
                               "meshfed-run CA in the fleet repo?)")
        td = sorted(self.cas)[0]
        svid = self.cas[td].issue_svid(f"spiffe://{td}/ns/{PROXY_NAMESPACE}/sa/meshfed-controller",
                                       dns_names=[CONTROLLER_TLS_NAME])
        self.record_leaf(td, self.cas[td], svid.not_after_s)  # proxies verify it: a live leaf of its root
        return svid.key_pem, svid.chain_pem, self.roots_pem()


def _san_uris(cert: Any) -> list[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def _log_ca_change(trust_domain: str, before: Any, after: Any) -> None:
    """A CA loaded for the first time, a root added or retired, the signing root switched: the
    steps of a staged root rotation, each as one log line."""
    roots = [r.name for r in after.roots]
    fields = {"trust_domain": trust_domain, "roots": roots, "signing_root": after.signing_root or ""}
    if before is None:
        log.info("CA of %s loaded: roots %s, signing with %s", trust_domain, ", ".join(roots) or "(plug-in)",
                 after.signing_root or "the plug-in intermediate", extra={"fields": {"event": "CaLoaded", **fields}})
        return
    old_roots = [r.name for r in before.roots]
    added, retired = sorted(set(roots) - set(old_roots)), sorted(set(old_roots) - set(roots))
    if added or retired:
        log.info("CA roots of %s changed: %s%s (now %s)", trust_domain,
                 f"added {', '.join(added)}" if added else "", f" retired {', '.join(retired)}" if retired else "",
                 ", ".join(roots), extra={"fields": {"event": "CaRootsChanged", "added": added, "retired": retired,
                                                     **fields}})
    if before.signing_root != after.signing_root:
        log.info("certificate rotation: %s now signs with root %s (was %s); proxies get leaves of the new root "
                 "as they renew", trust_domain, after.signing_root, before.signing_root,
                 extra={"fields": {"event": "SigningRootRotated", "previous_root": before.signing_root or "",
                                   **fields}})
