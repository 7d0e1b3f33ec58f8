"""The certificate authority of each trust domain: roots, SVID issuance from CSRs, key storage.

One `TrustDomainCA` per trust domain (cryptography, ECDSA P-256 by default). Two shapes:

- **managed**: meshfed holds one or more self-signed roots (`CaSpec.roots`); the `signing` root
  signs workload certificates directly. The bundle lists every root (old and new during a staged
  rotation, see `federation.core.rotation`).
- **plug-in** (Istio's "cacerts"): the user supplies a root certificate plus an intermediate
  certificate and key; meshfed signs with the intermediate and never sees the root's key. The
  bundle publishes the root *and* the intermediate.

Either way every SVID is signed *directly* by a certificate in its trust domain's bundle. That is
the issuance half of the verification design in `ztunnel.api.verify`: Python 3.11's `ssl` gives the
verifier only the peer's leaf, so the leaf alone must determine its issuer.

Issuance (`issue_from_csr`) checks, in order: the CSR parses and its signature is valid (proof of
possession); it carries exactly one URI SAN and it is a strict workload SPIFFE ID; that identity
belongs to this CA's trust domain; the requester is entitled to it (a node proxy only for
workloads scheduled on its node, a gateway only its own — the controller computes the
`Entitlement`); the key is ECDSA P-256/P-384 or RSA >= 2048. The leaf: exactly that URI SAN
(critical, empty subject), cA=false, keyUsage digitalSignature (critical), extendedKeyUsage
serverAuth+clientAuth, NotBefore backdated `backdate_s` for clock skew (from the earlier of the
calendar and the real clock when the calendar is simulated: `ztunnel.api.clock`), TTL the trust domain's
`workloadCertTTL` (24 h by default): a request may ask for less, never for more, and never beyond
the issuer's own not-after.

Key storage (`CaStateDir`): `<state>/ca/<trust-domain>/<root>.keypair.pem`, the root's private
key and its certificate in one file, written as one unit (`ztunnel.api.secret_files`: atomic,
0600, fsynced with its directory) and create-once: a root is never overwritten, so two writers
racing to create it (the state directory's lock, `federation.controller.statelock`, should make
that impossible) end up with the same root. Loading checks that the key belongs to the
certificate and refuses with the way out when it does not. `<root>.cert.pem` next to it is a
public copy of the certificate for readers that must not open keys (`meshfed trust`); a state
directory from before the pair files (`<root>.key.pem` + `<root>.cert.pem`) is loaded, checked
the same way, and converted. Files are 0600 in 0700 directories owned by the controller's user.
Opening the directory refuses to proceed when anything is looser (or a symlink, or owned by
someone else): the controller must not start.
Private keys are never logged (`repr` omits them) and a CA object refuses to be pickled, so it
cannot end up in Ray's object store or on the wire by accident.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gitops.model import CaMode, TrustDomain
from ztunnel.api.bundle import (
    DEFAULT_REFRESH_HINT_S,
    BundleError,
    SpiffeBundle,
    certificates_to_pem,
    emit_bundle,
    is_ca_certificate,
    load_pem_certificates,
    parse_bundle,
)
from ztunnel.api.clock import calendar, calendar_now
from ztunnel.api.config import TrustBundle
from ztunnel.api.identity import IdentityError, SpiffeId, check_trust_domain, generate_key_and_csr
from ztunnel.api.secret_files import SecretFileError, fsync_dir, read_secret, write_secret

DEFAULT_WORKLOAD_TTL_S = 24 * 3600.0
DEFAULT_ROOT_TTL_S = 10 * 365 * 24 * 3600.0
DEFAULT_BACKDATE_S = 300.0
MIN_RSA_BITS = 2048

CaPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_ROOT_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class CaError(Exception):
    """The CA cannot do what was asked; the message says why and what to do."""


class CsrDenied(CaError):
    """A CSR was refused. `code` is stable (metrics, NACK details); the message is for humans."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.code = code


class CaPermissionError(CaError):
    """CA key storage is not private enough; the controller refuses to start."""


@dataclass(frozen=True, slots=True)
class Entitlement:
    """Which identities a requester may obtain (computed by the controller from the graph)."""

    requester: str                 # "ztunnel/<cluster>/<node>" or "gateway/<cluster>"
    identities: frozenset[str]

    @classmethod
    def of(cls, requester: str, identities: Iterable[str | SpiffeId]) -> Entitlement:
        return cls(requester, frozenset(str(i) for i in identities))


@dataclass(frozen=True, slots=True)
class RootKey:
    """One root of a managed CA (certificate and, when meshfed holds it, the private key)."""

    name: str
    cert: x509.Certificate
    key: CaPrivateKey | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    identity: SpiffeId
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    not_after_s: float


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _check_root_name(name: str) -> str:
    if not _ROOT_NAME_RE.fullmatch(name):
        raise CaError(f"root name {name!r} must be a DNS label (lowercase letters, digits, '-')")
    return name


def generate_root(trust_domain: str, name: str, *, now_s: float | None = None,
                  ttl_s: float = DEFAULT_ROOT_TTL_S) -> RootKey:
    """A self-signed ECDSA P-256 root for `trust_domain` (path length 0: it signs leaves only)."""
    check_trust_domain(trust_domain)
    _check_root_name(name)
    now = calendar_now() if now_s is None else now_s
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshfed"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} {name}"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_dt(calendar().not_before_anchor_s(now) - DEFAULT_BACKDATE_S))
        .not_valid_after(_dt(now + ttl_s))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return RootKey(name, cert, key)


def _check_key_strength(key: object, what: str) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise CsrDenied(f"{what} uses curve {key.curve.name}; use P-256 or P-384", "weak_key")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrDenied(f"{what} is RSA-{key.key_size}; at least {MIN_RSA_BITS} bits are required", "weak_key")
    else:
        raise CsrDenied(f"{what} has unsupported key type {type(key).__name__}", "weak_key")


class TrustDomainCA:
    """Signs SVIDs of one trust domain. Not picklable; keys never leave it except to `CaStateDir`."""

    def __init__(self, trust_domain: str, *, roots: Sequence[RootKey], signer_cert: x509.Certificate | None,
                 signer_key: CaPrivateKey | None, intermediates: Sequence[x509.Certificate] = (),
                 workload_ttl_s: float = DEFAULT_WORKLOAD_TTL_S, backdate_s: float = DEFAULT_BACKDATE_S,
                 signing_root: str | None = None) -> None:
        self.trust_domain = check_trust_domain(trust_domain)
        self.roots = tuple(roots)
        self.intermediates = tuple(intermediates)
        self._signer_cert = signer_cert
        self._signer_key = signer_key
        self.signing_root = signing_root
        if workload_ttl_s <= 0:
            raise CaError("workload certificate TTL must be positive")
        self.workload_ttl_s = workload_ttl_s
        self.backdate_s = backdate_s

    # --- constructors --------------------------------------------------------------------------

    @classmethod
    def create(cls, trust_domain: str, *, now_s: float | None = None, root_name: str = "root-1",
               root_ttl_s: float = DEFAULT_ROOT_TTL_S,
               workload_ttl_s: float = DEFAULT_WORKLOAD_TTL_S) -> TrustDomainCA:
        """A fresh managed CA with one signing root (in memory): the quick path for tests and the lab."""
        root = generate_root(trust_domain, root_name, now_s=now_s, ttl_s=root_ttl_s)
        return cls.managed(trust_domain, [root], signing=root_name, workload_ttl_s=workload_ttl_s)

    @classmethod
    def managed(cls, trust_domain: str, roots: Sequence[RootKey], *, signing: str,
                workload_ttl_s: float = DEFAULT_WORKLOAD_TTL_S) -> TrustDomainCA:
        by_name = {r.name: r for r in roots}
        if len(by_name) != len(roots):
            raise CaError(f"trust domain {trust_domain}: root names must be unique")
        signer = by_name.get(signing)
        if signer is None:
            raise CaError(f"trust domain {trust_domain}: signing root {signing!r} is not among "
                          f"{sorted(by_name)}")
        if signer.key is None:
            raise CaError(f"trust domain {trust_domain}: no private key for signing root {signing!r}")
        for r in roots:
            if not is_ca_certificate(r.cert):
                raise CaError(f"trust domain {trust_domain}: root {r.name!r} is not a CA certificate")
        return cls(trust_domain, roots=roots, signer_cert=signer.cert, signer_key=signer.key,
                   workload_ttl_s=workload_ttl_s, signing_root=signing)

    @classmethod
    def from_plugin(cls, trust_domain: str, *, root_cert_pem: bytes, ca_cert_pem: bytes, ca_key_pem: bytes,
                    now_s: float | None = None,
                    workload_ttl_s: float = DEFAULT_WORKLOAD_TTL_S) -> TrustDomainCA:
        """A plug-in CA: the user's root (certificate only) and an intermediate with its key."""
        now = calendar_now() if now_s is None else now_s
        roots = load_pem_certificates(root_cert_pem)
        inter_chain = load_pem_certificates(ca_cert_pem)
        if len(roots) != 1 or not inter_chain:
            raise CaError("plug-in CA: root-cert.pem must hold exactly one certificate and ca-cert.pem at least one")
        root, inter = roots[0], inter_chain[0]
        key = serialization.load_pem_private_key(ca_key_pem, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CaError("plug-in CA: ca-key.pem must be an ECDSA or RSA private key")
        pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        if pub != inter.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo):
            raise CaError("plug-in CA: ca-key.pem does not belong to ca-cert.pem")
        for c, what in ((root, "root-cert.pem"), (inter, "ca-cert.pem")):
            if not is_ca_certificate(c):
                raise CaError(f"plug-in CA: {what} is not a CA certificate (basicConstraints cA=true)")
            if not (c.not_valid_before_utc.timestamp() <= now <= c.not_valid_after_utc.timestamp()):
                raise CaError(f"plug-in CA: {what} is not valid now (valid {c.not_valid_before_utc:%Y-%m-%d} "
                              f"to {c.not_valid_after_utc:%Y-%m-%d})")
        # The intermediate must chain to the root (directly, or through the rest of ca-cert.pem).
        chain = [*inter_chain, root]
        for child, parent in itertools.pairwise(chain):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature) as e:
                raise CaError(f"plug-in CA: {child.subject.rfc4514_string()} is not signed by "
                              f"{parent.subject.rfc4514_string()} ({e}); ca-cert.pem must chain to root-cert.pem") from e
        try:
            ku = inter.extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.key_cert_sign:
                raise CaError("plug-in CA: ca-cert.pem lacks keyUsage keyCertSign")
        except x509.ExtensionNotFound:
            pass
        return cls(trust_domain, roots=[RootKey("plugin-root", root)], signer_cert=inter, signer_key=key,
                   intermediates=inter_chain[1:], workload_ttl_s=workload_ttl_s)

    # --- public material -------------------------------------------------------------------------

    @property
    def authorities(self) -> tuple[x509.Certificate, ...]:
        """What the bundle lists: every root, plus the issuing intermediate(s) of a plug-in CA."""
        certs = [r.cert for r in self.roots]
        if self._signer_cert is not None and all(self._signer_cert != c for c in certs):
            certs.append(self._signer_cert)
        certs.extend(c for c in self.intermediates if c not in certs)
        return tuple(certs)

    @property
    def signer_certificate(self) -> x509.Certificate | None:
        return self._signer_cert

    def bundle(self, sequence: int = 1, refresh_hint_s: int | None = DEFAULT_REFRESH_HINT_S) -> SpiffeBundle:
        return SpiffeBundle(self.trust_domain, self.authorities, sequence, refresh_hint_s)

    def trust_bundle(self, sequence: int = 1) -> TrustBundle:
        return self.bundle(sequence).to_trust_bundle()

    def roots_pem(self) -> bytes:
        return certificates_to_pem(self.authorities)

    def __repr__(self) -> str:
        return (f"TrustDomainCA({self.trust_domain!r}, roots={[r.name for r in self.roots]}, "
                f"signing={self.signing_root!r})")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a TrustDomainCA holds private keys and must not be pickled (Ray object store, wire); "
                        "pass CSRs to the actor that owns the CA instead")

    # --- issuance --------------------------------------------------------------------------------

    def issue_from_csr(self, csr_pem: bytes, *, entitlement: Entitlement, now_s: float | None = None,
                       ttl_s: float | None = None) -> bytes:
        """Check a CSR (see module docstring) and return the PEM chain: leaf, then intermediates."""
        now = calendar_now() if now_s is None else now_s
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise CsrDenied(f"CSR from {entitlement.requester} is not a PEM PKCS#10 request ({e})", "malformed") from e
        if not csr.is_signature_valid:
            raise CsrDenied(f"CSR from {entitlement.requester} has an invalid signature (no proof of possession "
                            "of the key)", "bad_signature")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) != 1:
            raise CsrDenied(f"CSR from {entitlement.requester} carries {len(uris)} URI SANs; exactly one SPIFFE "
                            "ID is required", "san")
        try:
            identity = SpiffeId.parse(uris[0])
        except IdentityError as e:
            raise CsrDenied(f"CSR from {entitlement.requester}: {e}", "san") from e
        if identity.trust_domain != self.trust_domain:
            raise CsrDenied(
                f"CSR from {entitlement.requester} asks for {identity}, an identity of trust domain "
                f"{identity.trust_domain!r}, from the CA of {self.trust_domain!r}; a CA issues only its own trust "
                "domain's identities — send it to that domain's CA", "foreign_trust_domain")
        if str(identity) not in entitlement.identities:
            allowed = ", ".join(sorted(entitlement.identities)[:5]) or "none"
            raise CsrDenied(
                f"{entitlement.requester} is not entitled to {identity} (it may obtain: {allowed}); a node proxy "
                "gets identities of workloads scheduled on its node only, a gateway only its own. If the workload "
                "was just scheduled there, retry after the next config push", "not_entitled")
        _check_key_strength(csr.public_key(), f"CSR key for {identity}")
        return self._sign_leaf(identity, csr.public_key(), now, ttl_s)

    def issue_svid(self, identity: SpiffeId | str, *, now_s: float | None = None,
                   ttl_s: float | None = None, dns_names: Sequence[str] = ()) -> IssuedSvid:
        """Generate a key and issue its SVID in one call: for tests and lab bootstrap only (in the
        mesh, keys are generated by the proxy and only CSRs reach the CA). `dns_names` adds DNS SANs
        next to the SPIFFE ID: only for the controller's own serving certificate, because gRPC
        clients verify a host name and cannot match a URI SAN (they set
        `grpc.ssl_target_name_override` to that name, as Istio's istiod.istio-system.svc)."""
        sid = identity if isinstance(identity, SpiffeId) else SpiffeId.parse(identity)
        key_pem, csr_pem = generate_key_and_csr(sid)
        if dns_names:
            csr = x509.load_pem_x509_csr(csr_pem)
            _check_key_strength(csr.public_key(), f"key for {sid}")
            chain = self._sign_leaf(sid, csr.public_key(), calendar_now() if now_s is None else now_s, ttl_s,
                                    tuple(dns_names))
        else:
            chain = self.issue_from_csr(csr_pem, entitlement=Entitlement.of("local", [sid]), now_s=now_s,
                                        ttl_s=ttl_s)
        leaf = x509.load_pem_x509_certificate(chain)
        return IssuedSvid(sid, chain, key_pem, leaf.not_valid_after_utc.timestamp())

    def _sign_leaf(self, identity: SpiffeId, public_key: object, now_s: float, ttl_s: float | None,
                   dns_names: tuple[str, ...] = ()) -> bytes:
        if self._signer_cert is None or self._signer_key is None:
            raise CaError(f"trust domain {self.trust_domain} has no signing key here (external CA without a "
                          "plug-in intermediate); its workloads must get certificates from that CA")
        # A requester may ask for less than the trust domain's workloadCertTTL, never for more: a
        # CSR asking for 2^32 s would otherwise get a leaf as old as the root, which nobody could
        # rotate away from (the staged rotation waits for the last leaf of a root to expire).
        ttl = self.workload_ttl_s if ttl_s is None else min(ttl_s, self.workload_ttl_s)
        if not ttl > 0:  # also NaN
            raise CaError("certificate TTL must be positive")
        signer_na = self._signer_cert.not_valid_after_utc.timestamp()
        if signer_na <= now_s:
            raise CaError(f"the signing certificate of {self.trust_domain} expired; rotate its root")
        not_after = min(now_s + ttl, signer_na)
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise CsrDenied(f"unsupported key type for {identity}", "weak_key")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._signer_cert.subject)
            .public_key(public_key)
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1 | 1)
            .not_valid_before(_dt(calendar().not_before_anchor_s(now_s) - self.backdate_s))
            .not_valid_after(_dt(not_after))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity)),
                                                        *(x509.DNSName(d) for d in dns_names)]),
                           critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._signer_key.public_key()),
                           critical=False)
        )
        leaf = builder.sign(self._signer_key, hashes.SHA256())
        chain = [leaf]
        if self.signing_root is None:  # plug-in: leaf, intermediate(s); the root is in the bundle
            chain.append(self._signer_cert)
            chain.extend(self.intermediates)
        return certificates_to_pem(chain)


# --- key storage ---------------------------------------------------------------------------------

def _refuse(path: Path, problem: str, fix: str) -> NoReturn:
    raise CaPermissionError(f"refusing to use CA key storage: {path} {problem}; {fix}")


def _check_owned_private(path: Path, *, want_dir: bool) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        _refuse(path, "is a symlink", "replace it with a real directory/file owned by the controller's user")
    if want_dir and not stat.S_ISDIR(st.st_mode):
        _refuse(path, "is not a directory", "move it away")
    if not want_dir and not stat.S_ISREG(st.st_mode):
        _refuse(path, "is not a regular file", "move it away")
    if st.st_uid != os.geteuid():
        _refuse(path, f"is owned by uid {st.st_uid}, not the controller's uid {os.geteuid()}",
                f"chown {os.geteuid()} {path}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        want = "0700" if want_dir else "0600"
        _refuse(path, f"has mode {mode:04o} (group/other access)", f"run: chmod {want[1:]} {path}")


def _mkdir_private(path: Path) -> None:
    if not path.exists():
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked by umask; be explicit
        fsync_dir(path.parent)  # the new directory survives a crash with what is written into it
    _check_owned_private(path, want_dir=True)


PAIR_SUFFIX = ".keypair.pem"
CERT_SUFFIX = ".cert.pem"
KEY_SUFFIX = ".key.pem"


def _public_der(key: object) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _read_private(path: Path) -> bytes:
    try:
        return read_secret(path)
    except SecretFileError as e:
        raise CaPermissionError(f"refusing to use CA key storage: {e}") from None


def _load_key(raw: bytes, path: Path) -> CaPrivateKey:
    try:
        key = serialization.load_pem_private_key(raw, None)
    except (ValueError, TypeError) as e:
        raise CaError(f"{path}: no readable private key ({e}); restore the state directory from a backup "
                      "(`meshfed controller restore`)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def _check_pair(key: CaPrivateKey, cert: x509.Certificate, path: Path) -> None:
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise CaError(
            f"{path}: the private key does not belong to the root certificate (a torn write, or two controllers "
            f"created this root at once). Restore the state directory from a backup (`meshfed controller "
            f"restore`); if no certificate this root signed is in use any more, remove the root's files to "
            f"have a new one created")


class CaStateDir:
    """CA keys and published bundles under `<state_dir>/ca/`. Construction checks permissions of
    everything already there and raises `CaPermissionError` on anything looser than 0700/0600."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.ca_dir = self.state_dir / "ca"
        if not self.state_dir.exists():
            self.state_dir.mkdir(mode=0o700, parents=True)
            os.chmod(self.state_dir, 0o700)
        st = os.stat(self.state_dir)
        if stat.S_IMODE(st.st_mode) & 0o022:
            _refuse(self.state_dir, f"is writable by group/others (mode {stat.S_IMODE(st.st_mode):04o})",
                    f"run: chmod go-w {self.state_dir}")
        _mkdir_private(self.ca_dir)
        self.check_permissions()

    def check_permissions(self) -> None:
        _check_owned_private(self.ca_dir, want_dir=True)
        for td_dir in sorted(self.ca_dir.iterdir()):
            _check_owned_private(td_dir, want_dir=True)
            for f in sorted(td_dir.iterdir()):
                if f.name.endswith((KEY_SUFFIX, PAIR_SUFFIX, ".tmp")):
                    _check_owned_private(f, want_dir=False)

    def _td_dir(self, trust_domain: str) -> Path:
        check_trust_domain(trust_domain)
        d = self.ca_dir / trust_domain
        _mkdir_private(d)
        return d

    def load_roots(self, trust_domain: str) -> dict[str, RootKey]:
        """Every root stored for `trust_domain`, each key checked against its certificate."""
        d = self.ca_dir / check_trust_domain(trust_domain)
        roots: dict[str, RootKey] = {}
        if not d.exists():
            return roots
        for pair_path in sorted(d.glob("*" + PAIR_SUFFIX)):
            name = pair_path.name[: -len(PAIR_SUFFIX)]
            raw = _read_private(pair_path)
            try:
                cert = x509.load_pem_x509_certificate(raw)
            except ValueError as e:
                raise CaError(f"{pair_path}: no readable certificate ({e}); restore the state directory from a "
                              "backup (`meshfed controller restore`)") from None
            pair_key = _load_key(raw, pair_path)
            _check_pair(pair_key, cert, pair_path)
            roots[name] = RootKey(name, cert, pair_key)
        for cert_path in sorted(d.glob("*" + CERT_SUFFIX)):
            name = cert_path.name[: -len(CERT_SUFFIX)]
            if name in roots:
                continue
            # written before the pair files: a key and a certificate in separate files
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key_path = d / f"{name}{KEY_SUFFIX}"
            key: CaPrivateKey | None = None
            if key_path.exists():
                key = _load_key(_read_private(key_path), key_path)
                _check_pair(key, cert, key_path)
            roots[name] = RootKey(name, cert, key)
            if key is not None:
                self.save_root(trust_domain, roots[name])  # convert: the pair file from now on
        return roots

    def save_root(self, trust_domain: str, root: RootKey) -> RootKey:
        """Store a root as one unit, create-once: if the root already exists (another writer won a
        race), that one is kept and returned."""
        d = self._td_dir(trust_domain)
        _check_root_name(root.name)
        cert_pem = root.cert.public_bytes(serialization.Encoding.PEM)
        if root.key is not None:
            key_pem = root.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
            try:
                write_secret(d / f"{root.name}{PAIR_SUFFIX}", key_pem + cert_pem, exclusive=True)
            except FileExistsError:
                kept = self.load_roots(trust_domain).get(root.name)
                if kept is not None and kept.key is not None:
                    root, cert_pem = kept, kept.cert.public_bytes(serialization.Encoding.PEM)
        write_secret(d / f"{root.name}{CERT_SUFFIX}", cert_pem)  # the public copy (`meshfed trust`)
        return root

    def load_or_create(self, td: TrustDomain, *, now_s: float | None = None,
                       root_ttl_s: float = DEFAULT_ROOT_TTL_S) -> TrustDomainCA | None:
        """The CA for a fleet-repo `TrustDomain`. MANAGED: create missing roots the spec names (a
        newly published root gets its key here); roots the spec no longer names are not loaded.
        EXTERNAL: a plug-in CA if `ca-cert.pem`, `ca-key.pem`, `root-cert.pem` are in the domain's
        directory, else None (that domain's workloads get certificates elsewhere)."""
        name = str(td.name)
        if td.ca.mode is CaMode.EXTERNAL:
            d = self.ca_dir / name
            files = [d / "root-cert.pem", d / "ca-cert.pem", d / "ca-key.pem"]
            if not all(f.exists() for f in files):
                return None
            _check_owned_private(files[2], want_dir=False)
            return TrustDomainCA.from_plugin(name, root_cert_pem=files[0].read_bytes(),
                                             ca_cert_pem=files[1].read_bytes(), ca_key_pem=_read_private(files[2]),
                                             now_s=now_s, workload_ttl_s=td.ca.workload_cert_ttl_s)
        have = self.load_roots(name)
        roots: list[RootKey] = []
        signing = ""
        for spec_root in td.ca.roots:
            root = have.get(spec_root.name)
            if root is None:
                root = self.save_root(name, generate_root(name, spec_root.name, now_s=now_s, ttl_s=root_ttl_s))
            roots.append(root)
            if spec_root.signing:
                signing = spec_root.name
        return TrustDomainCA.managed(name, roots, signing=signing, workload_ttl_s=td.ca.workload_cert_ttl_s)

    def publish_bundle(self, ca: TrustDomainCA, refresh_hint_s: int = DEFAULT_REFRESH_HINT_S) -> SpiffeBundle:
        """Write `<td>/bundle.json`; the sequence increases exactly when the authority set changes."""
        previous = self.read_bundle(ca.trust_domain)
        sequence = 1
        if previous is not None:
            sequence = previous.sequence
            if not ca.bundle(sequence).same_authorities(previous):
                sequence += 1
        bundle = ca.bundle(sequence, refresh_hint_s)
        write_secret(self._td_dir(ca.trust_domain) / "bundle.json", emit_bundle(bundle).encode("utf-8"))
        return bundle

    def read_bundle(self, trust_domain: str) -> SpiffeBundle | None:
        path = self.ca_dir / check_trust_domain(trust_domain) / "bundle.json"
        if not path.exists():
            return None
        try:
            return parse_bundle(path.read_bytes(), trust_domain, allow_empty=True)
        except BundleError as e:
            raise CaError(f"{path}: {e}") from e

    def trust_domains(self) -> list[str]:
        return sorted(p.name for p in self.ca_dir.iterdir() if p.is_dir())

