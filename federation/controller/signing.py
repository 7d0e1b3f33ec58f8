"""Certificate signing policy: which identities a proxy may get, and who may act as which proxy.

The controller runs one CA per trust domain of the applied fleet (`federation.controller.ca`,
keys in the state directory). `SigningPolicy` decides, the gRPC adapter
(`federation.server.grpc_services.ConfigServer`) only authenticates and translates:

- **CSR entitlement** (`sign`): a proxy authenticated by its client certificate may get its own
  identity (`ztunnel.api.identity.proxy_spiffe_id`, in its cluster's trust domain) plus the
  identities of the workloads in its rendered config (`local_identities`: it terminates mTLS for
  them). A proxy authenticated by a **bootstrap credential** gets its own identity only.
- **Bootstrap credentials**, bound to one proxy each: its pod's projected ServiceAccount token,
  which the controller has its own cluster review (`clusters.kube.auth`) and `check_service_account`
  judges (the proxy's service account in meshfed-system, the controller's audience, a pod-bound
  token, and for a node proxy the node its id names); or a hand-made token for that proxy id
  (`federation.controller.bootstrap`: short-lived, single-use).
- **Acting as a proxy** (`ProxyAuthorizer`): only the proxy's own identity in the trust domain of
  the cluster its id names may subscribe, report health or renew as that proxy.
- **Client verification** (`verify_client`): trust-domain-bound — the leaf's issuer must be a
  root of the trust domain its SAN names. gRPC checks chains only against the pooled roots of
  every CA, and with a pool trust domain A's CA could mint B's identities.
- **Leaves issued** (`record_leaf`): the latest not-after per (trust domain, signing root), the
  staged root rotation's input (`federation.core.rotation_gate`), recorded *before* a chain
  leaves: a leaf we could not record could later be broken by retiring its root.
- **Certificates per proxy** (`proxy_certificates`): when and until when each identity's latest
  certificate was issued to each proxy (in the store too, across restarts): `meshfed check`
  judges each proxy's expiry by the first to expire among the identities it needs now.
- **The controller's serving certificates** (`serving`, `renew_serving_if_due`): one per trust
  domain whose CA runs here, `spiffe://<td>/ns/meshfed-system/sa/meshfed-controller` with the DNS
  name `controller_tls_name(td)` that the proxies of that trust domain send as SNI, so each proxy
  verifies the controller against its *own* trust domain's bundle (`ztunnel.xds.channel` pins the
  SPIFFE ID; the DNS name only selects the certificate). Each is a live leaf (recorded). They are
  re-issued at half their life and whenever the CA material changes (a root published, switched,
  retired): the gRPC adapter hot-swaps them for new handshakes (`ServingCertificates.generation`).

CA objects refuse to be pickled: they never leave the process that holds this policy (the state
owner; see `federation.ray.placement`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from clusters.kube.auth import NODE_NAME_EXTRA, POD_NAME_EXTRA, TokenReviewResult
from gitops.model import ConfigSnapshot, TrustDomain
from ztunnel.api.clock import calendar_now
from ztunnel.api.identity import (
    CONTROLLER_TOKEN_AUDIENCE,
    PROXY_NAMESPACE,
    IdentityError,
    ProxyId,
    controller_spiffe_id,
    controller_tls_name,
    proxy_spiffe_id,
)

SERVING_RENEW_FRACTION = 0.5   # re-issue the controller's certificates at half their life (as proxies do)

log = logging.getLogger(__name__)


def cluster_named_by(proxy_id: str) -> str:
    """The cluster a proxy id names (`ztunnel/<cluster>/<node>`, `gateway/<cluster>`); "" when it
    names none (the authorizer then refuses it: no cluster "" is in the fleet)."""
    try:
        return ProxyId.parse(proxy_id).cluster
    except IdentityError:
        return ""


TOKEN_AUDIENCE = CONTROLLER_TOKEN_AUDIENCE  # a proxy's projected token must be for us (ztunnel.api.identity)


@dataclass(frozen=True, slots=True)
class Requester:
    proxy_id: str
    identity: str        # SPIFFE ID from the client certificate ("" without one)
    bootstrap: bool      # authenticated by a bootstrap credential instead of a certificate
    cluster: str = ""    # the cluster the proxy id names


@dataclass(frozen=True, slots=True)
class BootstrapVerdict:
    """Whether a bootstrap credential may buy a proxy's own certificate. `code`: "" (yes),
    "unauthenticated" (not a valid credential), "permission_denied" (valid, but not this proxy's),
    "unavailable" (the cluster could not be asked: retry later), "resource_exhausted" (this source
    asked too often, or too many checks run already: `bootstrap_gate.BootstrapAdmission`; retry later)."""

    code: str = ""
    reason: str = ""
    credential: str = ""   # "service account token" | "bootstrap token"

    @property
    def ok(self) -> bool:
        return not self.code


def check_service_account(proxy_id: str, review: TokenReviewResult, audience: str = TOKEN_AUDIENCE) -> BootstrapVerdict:
    """May a reviewed ServiceAccount token bootstrap `proxy_id`? (Pure.)

    The token must be authenticated by the proxy's own cluster (the caller asked that one), for
    our audience, of the proxy's service account (`meshfed-system/ztunnel` for node proxies,
    `meshfed-system/eastwest-gateway` for gateways), bound to a pod; and a node proxy's token must
    have been issued for a pod on the node its id names: a ztunnel on node-1 cannot bootstrap as
    node-2's, whose workloads' identities it would then be entitled to."""
    what = "service account token"
    if not review.authenticated:
        return BootstrapVerdict("unauthenticated", "the ServiceAccount token was not accepted by the API server of "
                                f"the proxy's cluster ({review.error or 'no reason given'})", what)
    # We always name our audience in the review (`spec.audiences`). Kubernetes documents
    # (TokenReviewStatus.audiences) that such a client should find a compatible audience in
    # `status.audiences`, and that an *empty* `status.audiences` with authenticated=true means "valid
    # for the API server's own audience": an API-server token (or an authenticator that is not
    # audience-aware), not one minted for us. So empty is a refusal, not a pass.
    if audience not in review.audiences:
        if not review.audiences:
            return BootstrapVerdict("unauthenticated", f"the API server did not confirm the audience {audience!r} "
                                    "(its TokenReview answer names none, which means the token is for the API "
                                    "server itself): mount a projected serviceAccountToken with audience "
                                    f"{audience!r}", what)
        return BootstrapVerdict("unauthenticated", f"the ServiceAccount token is for {', '.join(review.audiences)}, "
                                f"not {audience!r} (set the projected token's audience)", what)
    try:
        pid = ProxyId.parse(proxy_id)
    except IdentityError as e:
        return BootstrapVerdict("permission_denied", str(e), what)
    want = f"system:serviceaccount:{pid.service_account_namespace}:{pid.service_account}"
    if review.username != want:
        return BootstrapVerdict("permission_denied", f"the token is {review.username or 'nobody'}'s; proxy "
                                f"{proxy_id} runs as {want}", what)
    pods = list(review.extra.get(POD_NAME_EXTRA, ()))
    if len(pods) != 1:
        return BootstrapVerdict("permission_denied", "the token is not bound to a pod (mount a projected "
                                "serviceAccountToken volume, not a Secret)", what)
    if pid.is_node:
        node = pid.node
        nodes = list(review.extra.get(NODE_NAME_EXTRA, ()))
        if nodes != [node]:
            return BootstrapVerdict("permission_denied", f"the token was issued to pod {pods[0]} on node "
                                    f"{nodes[0] if nodes else '<unknown>'}, but proxy {proxy_id} is the node proxy "
                                    f"of {node} (a node proxy bootstraps only as its own node's)", what)
    return BootstrapVerdict(credential=what)


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


@dataclass(frozen=True, slots=True)
class ServingCertificates:
    """The controller's TLS material at one moment (immutable; replaced whole on renewal).

    `pairs`: (key PEM, chain PEM), one per trust domain whose CA runs here, sorted by trust domain;
    the first is what a client without SNI (or with a name we do not serve) gets. `client_roots_pem`:
    every CA's authorities, the first gate for client certificates (the trust-domain-bound check
    is `verify_client`). `generation` grows with every re-issue: the gRPC adapter's certificate
    fetcher compares it to decide whether to swap."""

    generation: int
    pairs: tuple[tuple[bytes, bytes], ...]
    client_roots_pem: bytes
    identities: tuple[str, ...]
    issued_at_s: float
    not_after_s: float          # the earliest not-after of the set
    material: tuple[str, ...]   # the CA material they were issued under (see `SigningPolicy._material`)

    @property
    def renew_at_s(self) -> float:
        return self.issued_at_s + (self.not_after_s - self.issued_at_s) * SERVING_RENEW_FRACTION

    def due(self, now_s: float, material: tuple[str, ...]) -> str:
        """Why these must be re-issued now ("" when they need not): past half-life, or issued under
        CA material that changed since (a root rotated: proxies may no longer trust the old chain)."""
        if material != self.material:
            return "the CA material changed"
        if now_s >= self.renew_at_s:
            return f"half of its life is over (renew at {self.renew_at_s:.0f}, now {now_s:.0f})"
        return ""


class LeafLedger(Protocol):
    """What the policy records in the store (`federation.controller.store.Store`)."""

    def record_leaf_issued(self, trust_domain: str, root_name: str, not_after_s: float,
                           at_s: float | None = None) -> None: ...

    def record_ca_root(self, trust_domain: str, root_name: str, fingerprint: str, not_after_s: float,
                       key_path: str = "", signing: bool = False) -> None: ...

    def record_proxy_certificate(self, proxy_id: str, identity: str, issued_at_s: float,
                                 not_after_s: float) -> None: ...

    def proxy_certificates(self) -> dict[str, dict[str, tuple[float, float]]]: ...


@dataclass(frozen=True, slots=True)
class ProxyCertificates:
    """What a proxy was issued and still needs (`meshfed check`): of the identities it is entitled
    to now, the certificate that expires first. A certificate of an identity the proxy no longer
    serves (its workload left the node) is not renewed and does not count."""

    identity: str           # the one that expires first
    issued_at_s: float
    not_after_s: float
    identities: int         # how many of its current identities it holds a certificate for
    missing: int            # current identities never issued to it (a workload not served yet)

    @classmethod
    def of(cls, held: Mapping[str, tuple[float, float]], wanted: Iterable[str]) -> ProxyCertificates | None:
        wanted = sorted(set(wanted))
        mine = [(held[i][1], held[i][0], i) for i in wanted if i in held]
        if not mine:
            return None
        not_after, issued, identity = min(mine)
        return cls(identity, issued, not_after, len(mine), len(wanted) - len(mine))

    def as_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "issued_at_s": self.issued_at_s, "not_after_s": self.not_after_s,
                "identities": self.identities, "missing": self.missing}


class SigningPolicy:
    """The CAs of the applied fleet and the rules above. Invariants: `cas` holds a CA only for
    trust domains whose CA meshfed runs (an external CA has none here); `cluster_tds` is the
    cluster -> trust domain map of the snapshot the CAs were loaded from."""

    def __init__(self, state_dir: str | Path, ledger: LeafLedger,
                 rendered_identities: Callable[[str], Iterable[str]] = lambda _proxy_id: (),
                 clock: Callable[[], float] = calendar_now) -> None:
        self.state_dir = str(state_dir)
        self.ledger = ledger
        self.rendered_identities = rendered_identities   # proxy id -> identities of its rendered workloads
        self.clock = clock
        self.cas: dict[str, Any] = {}                    # trust domain -> federation.controller.ca.TrustDomainCA
        self.cluster_tds: dict[str, str] = {}
        self.trust_domains: dict[str, TrustDomain] = {}
        self._serving: ServingCertificates | None = None
        self.serving_renewals = 0
        # clusters removed from the fleet but still draining (`federation.core.removal`): their
        # proxies keep acting as themselves and renewing until the drain is over
        self.draining_tds: dict[str, str] = {}
        # proxy -> identity -> (issued, not after): bounded by the proxies and identities rendered
        # (a forgotten proxy's go with it, `forget_proxies`); kept in the store across restarts
        self.proxy_certs: dict[str, dict[str, tuple[float, float]]] = ledger.proxy_certificates()

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

    def proxy_certificates(self, proxy_id: str) -> ProxyCertificates | None:
        """The certificate `proxy_id` holds that expires first, among the identities it needs now
        (its own and its rendered workloads'); None if it was never issued one here."""
        td = self.member_tds().get(cluster_named_by(proxy_id))
        held = self.proxy_certs.get(proxy_id)
        if td is None or not held:
            return None
        try:
            own = str(proxy_spiffe_id(td, proxy_id))
        except IdentityError:
            return None
        return ProxyCertificates.of(held, [own, *self.rendered_identities(proxy_id)])

    def forget_proxies(self, proxy_ids: Iterable[str]) -> None:
        for pid in proxy_ids:
            self.proxy_certs.pop(pid, None)

    def entitled_identities(self, who: Requester, trust_domain: str) -> set[str]:
        """What `who` may have certified: its own identity; plus, over mTLS only, the identities of
        the workloads its rendered config lists."""
        own = proxy_spiffe_id(trust_domain, who.proxy_id)
        if who.bootstrap:  # a bootstrap credential buys the proxy's own identity only
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
                                      ttl_s=ttl_s or None, now_s=self.clock())
        except CsrDenied as e:
            raise PermissionError(str(e)) from e
        leaf = x509.load_pem_x509_certificate(chain)
        not_after_s = leaf.not_valid_after_utc.timestamp()
        # before the chain leaves: a leaf we could not record could later be broken by retiring its root
        self.record_leaf(td, ca, not_after_s)
        ids = _san_uris(leaf)
        issued_at_s = self.clock()
        for sid in ids:
            self.ledger.record_proxy_certificate(who.proxy_id, sid, issued_at_s, not_after_s)
            self.proxy_certs.setdefault(who.proxy_id, {})[sid] = (issued_at_s, not_after_s)
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

    # --- the controller's own certificates ----------------------------------------------------

    def _material(self) -> tuple[str, ...]:
        """What the serving certificates depend on: per trust domain, its signing root and the
        fingerprints of its authorities (a staged rotation changes one of them at each stage)."""
        from cryptography.hazmat.primitives.hashes import SHA256

        return tuple(f"{td}:{self.cas[td].signing_root}:" + ",".join(c.fingerprint(SHA256()).hex()
                                                                     for c in self.cas[td].authorities)
                     for td in sorted(self.cas))

    @property
    def current_serving(self) -> ServingCertificates | None:
        """The serving certificates if issued yet (status; never issues)."""
        return self._serving

    def serving(self) -> ServingCertificates:
        """The current serving certificates (issued on first use)."""
        if self._serving is None:
            self._serving = self._issue_serving(self.clock(), 1)
        return self._serving

    def renew_serving_if_due(self, now_s: float | None = None) -> str:
        """Re-issue the serving certificates when `ServingCertificates.due` says so; the reason
        ("" when nothing was done). Nothing is issued before the first `serving()`."""
        cur = self._serving
        if cur is None or not self.cas:
            return ""
        now = self.clock() if now_s is None else now_s
        why = cur.due(now, self._material())
        if why:
            self._serving = self._issue_serving(now, cur.generation + 1)
            self.serving_renewals += 1
        return why

    def _issue_serving(self, now_s: float, generation: int) -> ServingCertificates:
        if not self.cas:
            raise RuntimeError("TLS needs a CA: load the fleet's CAs first (no trust domain with a "
                               "meshfed-run CA in the fleet repo?)")
        pairs, identities, not_after = [], [], []
        for td in sorted(self.cas):
            ca = self.cas[td]
            svid = ca.issue_svid(controller_spiffe_id(td), now_s=now_s, dns_names=[controller_tls_name(td)])
            self.record_leaf(td, ca, svid.not_after_s)  # proxies verify it: a live leaf of its root
            pairs.append((svid.key_pem, svid.chain_pem))
            identities.append(str(svid.identity))
            not_after.append(svid.not_after_s)
        return ServingCertificates(generation, tuple(pairs), self.roots_pem(), tuple(identities), now_s,
                                   min(not_after), self._material())


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
