"""SPIFFE trust bundles: the public roots (X.509 authorities) of one trust domain.

Wire format (SPIFFE "Trust Domain and Bundle" spec, §4): a JWK Set with two extra members::

    {"keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "…", "y": "…",
               "x5c": ["<base64 DER of the CA certificate>"]}, …],
     "spiffe_sequence": 7, "spiffe_refresh_hint": 300}

The document does not name its trust domain: the caller says which one it is for (the file is
referenced from that domain's `TrustDomain`, or arrives keyed by it).

Rules enforced here (decisions, no I/O):
- an `x509-svid` entry carries exactly one certificate in `x5c`, it must be a CA certificate, and
  the JWK's key parameters (`kty`, `crv`/`x`/`y`, `n`/`e`) must describe that certificate's key;
- entries with another `use` (e.g. `jwt-svid`) are ignored and counted, as the spec asks;
- `accept_update`: a bundle whose sequence is lower than the one in force is rejected (rollback
  or replay); the same sequence with different authorities is rejected (two publishers); an empty
  authority set removes all trust in a domain and needs an explicit `allow_empty=True`.

Bundles are public: they may live in the fleet repo and travel in `ztunnel.api.config.TrustBundle`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ztunnel.api.config import TrustBundle
from ztunnel.api.identity import IdentityError, check_trust_domain

USE_X509_SVID = "x509-svid"
DEFAULT_REFRESH_HINT_S = 300

# cryptography curve name -> JWK "crv"
_CURVE_NAMES: dict[str, str] = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


class BundleError(ValueError):
    """A bundle document or update is not acceptable; the message names the cause and the fix."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int, length: int | None = None) -> bytes:
    n = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return value.to_bytes(n, "big")


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """`AB:CD:…` SHA-256 of the DER certificate, the way `openssl x509 -fingerprint -sha256` prints it."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def load_pem_certificates(pem: bytes | str) -> list[x509.Certificate]:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    if not data.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise BundleError(f"not a PEM certificate list: {e}") from e


def certificates_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def is_ca_certificate(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(bc.ca)


def _jwk_for(cert: x509.Certificate) -> dict[str, Any]:
    key = cert.public_key()
    der_b64 = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")
    jwk: dict[str, Any] = {"use": USE_X509_SVID}
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES.get(key.curve.name)
        if crv is None:
            raise BundleError(f"curve {key.curve.name} has no JWK name; use P-256, P-384 or P-521")
        size = (key.curve.key_size + 7) // 8
        nums = key.public_numbers()
        jwk.update(kty="EC", crv=crv, x=_b64url(_int_bytes(nums.x, size)), y=_b64url(_int_bytes(nums.y, size)))
    elif isinstance(key, rsa.RSAPublicKey):
        nums_r = key.public_numbers()
        jwk.update(kty="RSA", n=_b64url(_int_bytes(nums_r.n)), e=_b64url(_int_bytes(nums_r.e)))
    else:
        raise BundleError(f"unsupported CA key type {type(key).__name__}; use ECDSA or RSA")
    jwk["x5c"] = [der_b64]
    return jwk


def _check_jwk_matches(entry: Mapping[str, Any], cert: x509.Certificate, where: str) -> None:
    key = cert.public_key()
    kty = entry.get("kty")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if kty != "EC":
            raise BundleError(f"{where}: kty is {kty!r} but the certificate holds an EC key")
        crv = entry.get("crv")
        if crv != _CURVE_NAMES.get(key.curve.name):
            raise BundleError(f"{where}: crv {crv!r} does not match the certificate's curve {key.curve.name}")
        nums = key.public_numbers()
        for name, value in (("x", nums.x), ("y", nums.y)):
            raw = entry.get(name)
            if not isinstance(raw, str) or int.from_bytes(_b64url_decode(raw), "big") != value:
                raise BundleError(f"{where}: JWK '{name}' does not match the certificate's public key")
    elif isinstance(key, rsa.RSAPublicKey):
        if kty != "RSA":
            raise BundleError(f"{where}: kty is {kty!r} but the certificate holds an RSA key")
        nums_r = key.public_numbers()
        for name, value in (("n", nums_r.n), ("e", nums_r.e)):
            raw = entry.get(name)
            if not isinstance(raw, str) or int.from_bytes(_b64url_decode(raw), "big") != value:
                raise BundleError(f"{where}: JWK '{name}' does not match the certificate's public key")
    else:
        raise BundleError(f"{where}: unsupported CA key type {type(key).__name__}")


@dataclass(frozen=True, slots=True)
class SpiffeBundle:
    """The X.509 authorities of one trust domain at one sequence number."""

    trust_domain: str
    authorities: tuple[x509.Certificate, ...]
    sequence: int = 0
    refresh_hint_s: int | None = DEFAULT_REFRESH_HINT_S
    ignored_entries: int = 0  # non-x509 entries (e.g. jwt-svid) present in the parsed document

    def __post_init__(self) -> None:
        try:
            check_trust_domain(self.trust_domain)
        except IdentityError as e:
            raise BundleError(str(e)) from e
        if self.sequence < 0:
            raise BundleError(f"bundle of {self.trust_domain}: spiffe_sequence must be >= 0")

    def fingerprints(self) -> tuple[str, ...]:
        return tuple(fingerprint_sha256(c) for c in self.authorities)

    def same_authorities(self, other: SpiffeBundle) -> bool:
        return set(self.fingerprints()) == set(other.fingerprints())

    def to_trust_bundle(self) -> TrustBundle:
        return TrustBundle(
            trust_domain=self.trust_domain,
            roots_pem=tuple(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in self.authorities),
            sequence=self.sequence,
        )

    @classmethod
    def from_trust_bundle(cls, tb: TrustBundle) -> SpiffeBundle:
        certs: list[x509.Certificate] = []
        for pem in tb.roots_pem:
            certs.extend(load_pem_certificates(pem))
        return cls(tb.trust_domain, tuple(certs), tb.sequence, None)


def emit_bundle(bundle: SpiffeBundle) -> str:
    """The SPIFFE bundle JSON document (stable key order, one authority per JWK)."""
    doc: dict[str, Any] = {"keys": [_jwk_for(c) for c in bundle.authorities],
                           "spiffe_sequence": bundle.sequence}
    if bundle.refresh_hint_s is not None:
        doc["spiffe_refresh_hint"] = bundle.refresh_hint_s
    return json.dumps(doc, indent=2) + "\n"


def parse_bundle(document: str | bytes, trust_domain: str, *, allow_empty: bool = False) -> SpiffeBundle:
    """Parse a SPIFFE bundle document for `trust_domain`, strictly (see module docstring)."""
    where = f"bundle of {trust_domain}"
    try:
        doc = json.loads(document)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{where}: not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: expected a JSON object (a JWK Set), got {type(doc).__name__}")
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise BundleError(f"{where}: 'keys' must be a list of JWKs")
    sequence = doc.get("spiffe_sequence", 0)
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise BundleError(f"{where}: spiffe_sequence must be a non-negative integer, got {sequence!r}")
    hint = doc.get("spiffe_refresh_hint")
    if hint is not None and (isinstance(hint, bool) or not isinstance(hint, int) or hint <= 0):
        raise BundleError(f"{where}: spiffe_refresh_hint must be a positive integer (seconds), got {hint!r}")
    authorities: list[x509.Certificate] = []
    seen: set[str] = set()
    ignored = 0
    for i, entry in enumerate(keys):
        at = f"{where}: keys[{i}]"
        if not isinstance(entry, dict):
            raise BundleError(f"{at}: expected a JWK object")
        if entry.get("use") != USE_X509_SVID:
            ignored += 1  # jwt-svid or unknown use: ignored per the SPIFFE bundle spec
            continue
        x5c = entry.get("x5c")
        if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
            raise BundleError(f"{at}: an x509-svid entry must carry exactly one certificate in 'x5c'")
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
        except ValueError as e:
            raise BundleError(f"{at}: x5c[0] is not a base64 DER certificate ({e})") from e
        if not is_ca_certificate(cert):
            raise BundleError(f"{at}: certificate {cert.subject.rfc4514_string()!r} is not a CA "
                              "(basicConstraints cA=false); a bundle lists CA certificates only")
        _check_jwk_matches(entry, cert, at)
        fp = fingerprint_sha256(cert)
        if fp in seen:
            raise BundleError(f"{at}: duplicate authority {fp[:23]}…; list each root once")
        seen.add(fp)
        authorities.append(cert)
    bundle = SpiffeBundle(trust_domain, tuple(authorities), sequence, hint, ignored)
    if not authorities and not allow_empty:
        raise BundleError(
            f"{where} has no x509-svid authorities: accepting it would make every certificate of "
            f"{trust_domain} untrusted. If that is intended, confirm it explicitly (allow_empty / --allow-empty-bundle)")
    return bundle


def accept_update(current: SpiffeBundle | None, new: SpiffeBundle, *, allow_empty: bool = False) -> SpiffeBundle:
    """Decide whether `new` may replace `current` (the bundle in force); return the one to use."""
    if current is not None and current.trust_domain != new.trust_domain:
        raise BundleError(f"bundle for {new.trust_domain} offered as an update of {current.trust_domain}")
    if not new.authorities and not allow_empty:
        raise BundleError(
            f"bundle of {new.trust_domain} (sequence {new.sequence}) is empty: every certificate of "
            f"{new.trust_domain} would be rejected. Confirm explicitly (allow_empty) if that is intended")
    if current is None:
        return new
    if new.sequence < current.sequence:
        raise BundleError(
            f"bundle of {new.trust_domain}: sequence {new.sequence} is lower than {current.sequence} in force "
            "(a rollback or a replayed old bundle); publish it with a higher spiffe_sequence")
    if new.sequence == current.sequence and not new.same_authorities(current):
        raise BundleError(
            f"bundle of {new.trust_domain}: sequence {new.sequence} is already in force with different "
            "authorities; every change to the authorities must increase spiffe_sequence")
    return new
