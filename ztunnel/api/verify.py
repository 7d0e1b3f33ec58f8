"""Trust-domain-bound verification of a peer's X.509-SVID.

The problem this module exists for: with one pooled CA file (all roots of all federated trust
domains), OpenSSL accepts any leaf that chains to *some* root — so trust domain A's CA can mint
`spiffe://b/...` and a plain `ssl` verification lets it through. Istio ambient sidesteps this by
assuming one shared root; meshfed gives each cluster its own trust domain, so it must bind the
issuer to the trust domain named in the leaf.

Design (sound on Python 3.11, whose `ssl` exposes only the peer's leaf after the handshake):

1. Issuance rule (federation.controller.ca): every SVID is signed *directly* by a certificate that is listed
   in its trust domain's bundle (a managed root, or for a plug-in CA the intermediate, which the
   bundle publishes next to its root). So the leaf alone is enough to decide who issued it.
2. `ssl` with CERT_REQUIRED against the union of all known authorities is only a first gate
   (`ztunnel.identity.tls`): it proves possession of the leaf's private key and rejects strangers early.
3. After the handshake, `TrustStore.verify_peer` checks the leaf with `cryptography` against the
   bundle of the trust domain named in its URI SAN only — never against the pool.

`verify_peer` runs these checks, in this order, and stops at the first failure (each failure has a
stable `code` for metrics and a message naming the likely cause and fix):

 1. `malformed`        the bytes are a DER X.509 certificate;
 2. `not_leaf`         basicConstraints does not say cA=true (an SVID is never a CA);
 3. `san`              exactly one URI SAN, and it parses strictly as
                       `spiffe://<lowercase td>/ns/<ns>/sa/<sa>` (no root path, no other scheme);
 4. `key_usage`        keyUsage present with digitalSignature, without keyCertSign/cRLSign;
                       extendedKeyUsage, if present, includes serverAuth and clientAuth;
 5. `weak_key`         the leaf key is ECDSA P-256/P-384 or RSA >= 2048 bits;
 6. `unknown_trust_domain`  the store holds a bundle for the SAN's trust domain;
 7. `not_federated`    the local trust domain accepts the peer's (same domain, or a federatesWith
                       edge), when the caller names its local trust domain;
 8. `untrusted_issuer` the leaf is signed directly by an authority in *that* trust domain's bundle
                       (issuer name and signature); a leaf signed by another domain's authority is
                       reported as a cross-trust-domain forgery;
 9. `issuer_validity`  that authority is itself within its validity window (with skew);
10. `not_yet_valid` / `expired`  the leaf's validity window contains `now` give or take
                       `clock_skew_s` (default 120 s);
                       (9 and 10 word their messages "… certificate is not yet valid: …" /
                       "… certificate has expired: …", see `validity_problem`)
11. `wrong_identity`   if the caller expected identities (the destination's SANs), the peer's
                       SPIFFE ID is one of them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ztunnel.api.bundle import (
    certificates_to_pem,
    fingerprint_sha256,
    is_ca_certificate,
    load_pem_certificates,
)
from ztunnel.api.config import TrustBundle
from ztunnel.api.identity import IdentityError, SpiffeId, check_trust_domain

DEFAULT_CLOCK_SKEW_S = 120.0
MIN_RSA_BITS = 2048
ALLOWED_CURVES = frozenset({"secp256r1", "secp384r1"})


class PeerVerificationError(Exception):
    """The peer's certificate is not acceptable. `code` is stable (for metrics); `reason` is for humans."""

    def __init__(self, reason: str, code: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def _ts(dt: datetime) -> float:
    return dt.astimezone(UTC).timestamp() if dt.tzinfo else dt.replace(tzinfo=UTC).timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Why a certificate's validity window does not contain now, in the words X.509 stacks log
# (OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID / _HAS_EXPIRED): operators grep and alert on them, and
# the chaos catalogue (examples/chaos/cert-expiry.yaml, clock-skew-beyond-tolerance.yaml) expects
# them in the proxy's log. Each message starts "<whose> certificate is not yet valid: ..." or
# "<whose> certificate has expired: ..." and goes on with the dates and what to do.
NOT_YET_VALID = "not yet valid"
EXPIRED = "expired"


def validity_problem(not_before_s: float, not_after_s: float, now_s: float, skew_s: float) -> str | None:
    """`NOT_YET_VALID`, `EXPIRED`, or None when `now_s` is inside the window widened by `skew_s`
    on both sides (the clocks of issuer and verifier may disagree by that much)."""
    if now_s < not_before_s - skew_s:
        return NOT_YET_VALID
    if now_s > not_after_s + skew_s:
        return EXPIRED
    return None


def _outside_validity(whose: str, subject: str, cert: x509.Certificate, now_s: float, skew_s: float, *,
                      not_yet: str, expired: str, code: str = "") -> PeerVerificationError | None:
    """The refusal of a certificate whose window (give or take `skew_s`) misses `now_s`, worded
    "<whose> certificate is not yet valid: <subject> starts at …: <not_yet>" or "<whose>
    certificate has expired: <subject> ended at …: <expired>"; None if it is valid. `code`:
    the error's code (default: `not_yet_valid` / `expired`)."""
    nb, na = _ts(cert.not_valid_before_utc), _ts(cert.not_valid_after_utc)
    problem = validity_problem(nb, na, now_s, skew_s)
    if problem == NOT_YET_VALID:
        return PeerVerificationError(
            f"{whose} certificate is not yet valid: {subject} starts at {_iso(nb)}, {nb - now_s:.0f} s from now "
            f"(more than the {skew_s:.0f} s skew allowed): {not_yet}", code or "not_yet_valid")
    if problem == EXPIRED:
        return PeerVerificationError(
            f"{whose} certificate has expired: {subject} ended at {_iso(na)}, {now_s - na:.0f} s ago: {expired}",
            code or "expired")
    return None


def peer_spiffe_ids(cert: x509.Certificate) -> list[str]:
    """The URI SANs of a certificate, as strings (empty if it has no SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


class TrustStore:
    """Authorities per trust domain plus who accepts whom. Immutable after construction.

    `bundles`: trust domain -> the authorities of its bundle (roots, and for plug-in CAs the issuing
    intermediate). `federated`: local trust domain -> the other trust domains it accepts (its
    `federatesWith`); `None` means every trust domain with a bundle here is accepted (the controller
    already sends a proxy only the bundles it may trust).
    """

    def __init__(self, bundles: Mapping[str, Sequence[x509.Certificate]],
                 federated: Mapping[str, Collection[str]] | None = None,
                 *, clock_skew_s: float = DEFAULT_CLOCK_SKEW_S) -> None:
        table: dict[str, tuple[x509.Certificate, ...]] = {}
        for td, certs in bundles.items():
            try:
                check_trust_domain(td)
            except IdentityError as e:
                raise ValueError(f"trust store: {e}") from e
            for c in certs:
                if not is_ca_certificate(c):
                    raise ValueError(f"trust store: authority {c.subject.rfc4514_string()!r} of {td} is not a CA")
            table[td] = tuple(certs)
        self._bundles: Mapping[str, tuple[x509.Certificate, ...]] = MappingProxyType(table)
        self._federated: Mapping[str, frozenset[str]] | None = (
            None if federated is None else MappingProxyType({k: frozenset(v) for k, v in federated.items()}))
        self._owner_by_fp: dict[str, list[str]] = {}
        for td, certs in table.items():
            for c in certs:
                self._owner_by_fp.setdefault(fingerprint_sha256(c), []).append(td)
        self.clock_skew_s = clock_skew_s

    @classmethod
    def from_bundles(cls, *bundles: TrustBundle | Iterable[TrustBundle],
                     federated: Mapping[str, Collection[str]] | None = None,
                     clock_skew_s: float = DEFAULT_CLOCK_SKEW_S) -> TrustStore:
        """Build from `ztunnel.api.config.TrustBundle`s, given one by one or as iterables (`config.bundles`)."""
        table: dict[str, list[x509.Certificate]] = {}
        flat: list[TrustBundle] = []
        for b in bundles:
            if isinstance(b, TrustBundle):
                flat.append(b)
            else:
                flat.extend(b)
        for tb in flat:
            certs = table.setdefault(tb.trust_domain, [])
            for pem in tb.roots_pem:
                certs.extend(load_pem_certificates(pem))
        return cls(table, federated, clock_skew_s=clock_skew_s)

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return tuple(sorted(self._bundles))

    def authorities(self, trust_domain: str) -> tuple[x509.Certificate, ...]:
        return self._bundles.get(trust_domain, ())

    def roots_pem(self) -> bytes:
        """The union of all authorities, PEM: for `ssl`'s first gate only, never for the binding check."""
        seen: set[str] = set()
        unique: list[x509.Certificate] = []
        for certs in self._bundles.values():
            for c in certs:
                fp = fingerprint_sha256(c)
                if fp not in seen:
                    seen.add(fp)
                    unique.append(c)
        return certificates_to_pem(unique)

    def accepts(self, local_trust_domain: str, peer_trust_domain: str) -> bool:
        if local_trust_domain == peer_trust_domain or self._federated is None:
            return True
        return peer_trust_domain in self._federated.get(local_trust_domain, frozenset())

    # --- the check ----------------------------------------------------------------------------

    def verify_peer(self, leaf_der: bytes, now_s: float, expected: Collection[str] | None = None,
                    local_trust_domain: str | None = None) -> SpiffeId:
        """Verify a peer leaf (DER) and return its identity; raise `PeerVerificationError` otherwise."""
        # 1. decode
        try:
            leaf = x509.load_der_x509_certificate(leaf_der)
        except ValueError as e:
            raise PeerVerificationError(f"peer certificate is not valid DER X.509 ({e})", "malformed") from e
        # 2. not a CA
        try:
            bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
            if bc.ca:
                raise PeerVerificationError(
                    "peer presented a CA certificate (basicConstraints cA=true) as its identity; an SVID is a "
                    "leaf — the peer is misconfigured with its CA's certificate instead of its workload certificate",
                    "not_leaf")
        except x509.ExtensionNotFound:
            pass
        # 3. exactly one URI SAN, a strict meshfed SPIFFE ID
        uris = peer_spiffe_ids(leaf)
        if len(uris) != 1:
            raise PeerVerificationError(
                f"peer certificate has {len(uris)} URI SANs ({', '.join(uris) or 'none'}); an X.509-SVID carries "
                "exactly one — it was not issued by a SPIFFE CA (check the peer's certificate source)", "san")
        try:
            peer = SpiffeId.parse(uris[0])
        except IdentityError as e:
            raise PeerVerificationError(f"peer URI SAN is not a valid workload SPIFFE ID: {e}", "san") from e
        # 4. key usages
        try:
            ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            raise PeerVerificationError(
                f"peer certificate of {peer} has no keyUsage extension; an X.509-SVID must set digitalSignature "
                "(re-issue it from a SPIFFE-conformant CA)", "key_usage") from None
        if not ku.digital_signature or ku.key_cert_sign or ku.crl_sign:
            raise PeerVerificationError(
                f"peer certificate of {peer} has the wrong keyUsage (digitalSignature={ku.digital_signature}, "
                f"keyCertSign={ku.key_cert_sign}, cRLSign={ku.crl_sign}); an SVID needs digitalSignature and "
                "must not sign certificates", "key_usage")
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            missing = [n for n, oid in (("serverAuth", ExtendedKeyUsageOID.SERVER_AUTH),
                                        ("clientAuth", ExtendedKeyUsageOID.CLIENT_AUTH)) if oid not in eku]
            if missing:
                raise PeerVerificationError(
                    f"peer certificate of {peer} lacks extendedKeyUsage {', '.join(missing)}; mesh mTLS needs both "
                    "(re-issue it with serverAuth and clientAuth)", "key_usage")
        except x509.ExtensionNotFound:
            pass
        # 5. key strength
        key = leaf.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in ALLOWED_CURVES:
                raise PeerVerificationError(f"peer key of {peer} uses curve {key.curve.name}; use P-256 or P-384",
                                            "weak_key")
        elif isinstance(key, rsa.RSAPublicKey):
            if key.key_size < MIN_RSA_BITS:
                raise PeerVerificationError(f"peer RSA key of {peer} has {key.key_size} bits; at least "
                                            f"{MIN_RSA_BITS} are required", "weak_key")
        else:
            raise PeerVerificationError(f"peer key type {type(key).__name__} of {peer} is not supported",
                                        "weak_key")
        # 6. a bundle for the SAN's trust domain
        td = peer.trust_domain
        authorities = self._bundles.get(td)
        if not authorities:
            known = ", ".join(self.trust_domains) or "none"
            raise PeerVerificationError(
                f"peer {peer} belongs to trust domain {td!r}, for which this proxy has no bundle (known: {known}); "
                f"if {td!r} should be trusted, add it to the local TrustDomain's federatesWith in the fleet repo",
                "unknown_trust_domain")
        # 7. federation edge
        if local_trust_domain is not None and not self.accepts(local_trust_domain, td):
            raise PeerVerificationError(
                f"peer {peer} is from trust domain {td!r}, which {local_trust_domain!r} does not federate with; "
                f"add {td!r} to federatesWith of TrustDomain {local_trust_domain!r} if this traffic is intended",
                "not_federated")
        # 8. issuer binding: signed directly by an authority of *that* trust domain
        issuer = self._find_issuer(leaf, authorities)
        if issuer is None:
            foreign = self._find_issuer_anywhere(leaf, exclude=td)
            if foreign is not None:
                raise PeerVerificationError(
                    f"cross-trust-domain forgery: peer claims {peer} but its certificate was signed by an authority "
                    f"of trust domain(s) {', '.join(foreign)}, not of {td!r}; a CA may only issue identities of its "
                    "own trust domain (check for a shared/pooled CA between trust domains)", "untrusted_issuer")
            raise PeerVerificationError(
                f"peer {peer} is not signed by any authority in the bundle of {td!r} "
                f"(issuer {leaf.issuer.rfc4514_string()!r}); its CA may have rotated or the bundle here is stale — "
                f"check `meshfed trust` for the roots of {td!r} and the proxy's config sync", "untrusted_issuer")
        # 9. the issuing authority is valid now
        skew = self.clock_skew_s
        refusal = _outside_validity(
            "issuer", f"the authority that signed {peer} ({issuer.subject.rfc4514_string()})", issuer, now_s, skew,
            # a root is valid from its creation: seeing it from the future is a clock error, not a
            # reason to rotate it
            not_yet="this node's clock is behind the CA's (or the CA's is ahead) — check NTP on both",
            expired=f"rotate the root of {td!r} (publish, switch, retire), or check NTP if this node's clock is "
                    "ahead", code="issuer_validity")
        if refusal is not None:
            raise refusal
        # 10. leaf validity with skew tolerance
        refusal = _outside_validity(
            "peer", str(peer), leaf, now_s, skew,
            not_yet="one of the two clocks is wrong — check NTP on both nodes",
            expired="the peer could not renew it — its CA (the controller) is probably unreachable, or its clock "
                    "is wrong")
        if refusal is not None:
            raise refusal
        # 11. expected identity
        wanted = {str(e) for e in expected} if expected else set()  # accept SpiffeId objects too
        if wanted and str(peer) not in wanted:
            shown = ", ".join(sorted(wanted)[:3]) + (" …" if len(wanted) > 3 else "")
            raise PeerVerificationError(
                f"peer presented {peer} but the destination expects {shown}; likely the endpoint address "
                "now belongs to another workload (stale endpoint) or the service's serviceAccount is wrong "
                "in the fleet repo", "wrong_identity")
        return peer

    def _find_issuer(self, leaf: x509.Certificate,
                     candidates: Iterable[x509.Certificate]) -> x509.Certificate | None:
        for ca in candidates:
            try:
                leaf.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return ca
        return None

    def _find_issuer_anywhere(self, leaf: x509.Certificate, exclude: str) -> list[str] | None:
        owners: list[str] = []
        for td, certs in self._bundles.items():
            if td != exclude and self._find_issuer(leaf, certs) is not None:
                owners.append(td)
        return owners or None
