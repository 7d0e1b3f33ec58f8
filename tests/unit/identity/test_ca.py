"""The trust domain CA: what an SVID looks like, which CSRs are refused, plug-in CAs, key storage."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.controller.ca import (
    CaError,
    CaPermissionError,
    CaStateDir,
    CsrDenied,
    Entitlement,
    TrustDomainCA,
)
from gitops.model import CaMode, CaRoot, CaSpec, TrustDomain, TrustDomainName
from tests.unit.identity.forge import NOW_S, dt, key_pem
from ztunnel.api.bundle import load_pem_certificates
from ztunnel.api.identity import generate_key_and_csr

EAST = "east.mesh"
API = f"spiffe://{EAST}/ns/shop/sa/api"
NODE = Entitlement.of("ztunnel/east/node-1", [API])


@pytest.fixture(scope="module")
def ca() -> TrustDomainCA:
    return TrustDomainCA.create(EAST, now_s=NOW_S - 86400)


def test_svid_shape(ca: TrustDomainCA) -> None:
    key_pem_, csr = generate_key_and_csr(API)
    chain = load_pem_certificates(ca.issue_from_csr(csr, entitlement=NODE, now_s=NOW_S))
    assert len(chain) == 1
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and [str(u) for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)] == [API]
    assert leaf.subject == x509.Name([])
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert leaf.not_valid_before_utc.timestamp() == pytest.approx(NOW_S - ca.backdate_s)
    assert leaf.not_valid_after_utc.timestamp() == pytest.approx(NOW_S + 24 * 3600)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    leaf.verify_directly_issued_by(ca.roots[0].cert)
    pub = serialization.load_pem_private_key(key_pem_, None).public_key()
    assert pub.public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]


def test_ttl_configurable_and_capped_by_issuer() -> None:
    short = TrustDomainCA.create(EAST, now_s=NOW_S - 100, root_ttl_s=3600, workload_ttl_s=600)
    svid = short.issue_svid(API, now_s=NOW_S)
    assert svid.not_after_s == pytest.approx(NOW_S + 600)
    # a workload TTL longer than what is left of the root: the leaf ends with its issuer
    long_lived = TrustDomainCA.create(EAST, now_s=NOW_S - 100, root_ttl_s=3600, workload_ttl_s=24 * 3600)
    capped = long_lived.issue_svid(API, now_s=NOW_S, ttl_s=24 * 3600)
    assert capped.not_after_s == pytest.approx(long_lived.roots[0].cert.not_valid_after_utc.timestamp())


@pytest.mark.parametrize("asked_s", [2.0 ** 32, 10 * 365 * 86400.0, 601.0, float("inf")])
def test_a_requested_ttl_never_exceeds_the_trust_domains_workload_cert_ttl(asked_s: float) -> None:
    """A CSR asking for 2^32 s used to get a leaf valid as long as its root (ten years)."""
    ca = TrustDomainCA.create(EAST, now_s=NOW_S - 100, workload_ttl_s=600)
    _key, csr = generate_key_and_csr(API)
    leaf = load_pem_certificates(ca.issue_from_csr(csr, entitlement=NODE, now_s=NOW_S, ttl_s=asked_s))[0]
    assert leaf.not_valid_after_utc.timestamp() == pytest.approx(NOW_S + 600)


def test_a_shorter_ttl_than_the_workload_cert_ttl_is_honoured() -> None:
    ca = TrustDomainCA.create(EAST, now_s=NOW_S - 100, workload_ttl_s=600)
    assert ca.issue_svid(API, now_s=NOW_S, ttl_s=60).not_after_s == pytest.approx(NOW_S + 60)
    with pytest.raises(CaError, match="positive"):
        ca.issue_svid(API, now_s=NOW_S, ttl_s=float("nan"))


def _csr_with(uris: list[str], key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> bytes:
    k = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                            critical=True)
    return b.sign(k, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(("csr_factory", "code"), [
    (lambda: generate_key_and_csr(f"spiffe://{EAST}/ns/shop/sa/billing").csr_pem, "not_entitled"),
    (lambda: generate_key_and_csr("spiffe://west.mesh/ns/shop/sa/api").csr_pem, "foreign_trust_domain"),
    (lambda: _csr_with([API, f"spiffe://{EAST}/ns/shop/sa/billing"]), "san"),
    (lambda: _csr_with([]), "san"),
    (lambda: _csr_with([f"spiffe://{EAST}"]), "san"),
    (lambda: _csr_with([API], rsa.generate_private_key(65537, 1024)), "weak_key"),
    (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "malformed"),
])
def test_csr_denied(ca: TrustDomainCA, csr_factory: object, code: str) -> None:
    with pytest.raises(CsrDenied) as e:
        ca.issue_from_csr(csr_factory(), entitlement=NODE, now_s=NOW_S)  # type: ignore[operator]
    assert e.value.code == code


def test_csr_for_a_foreign_identity_names_the_requester_and_the_rule(ca: TrustDomainCA) -> None:
    gateway = Entitlement.of("gateway/east", [f"spiffe://{EAST}/ns/istio-system/sa/eastwest"])
    with pytest.raises(CsrDenied, match=r"gateway/east is not entitled to .*a gateway only its own"):
        ca.issue_from_csr(generate_key_and_csr(API).csr_pem, entitlement=gateway, now_s=NOW_S)


def test_csr_with_bad_signature_denied(ca: TrustDomainCA) -> None:
    good = x509.load_pem_x509_csr(generate_key_and_csr(API).csr_pem)
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit of the signature
    bad = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrDenied) as e:
        ca.issue_from_csr(bad, entitlement=NODE, now_s=NOW_S)
    assert e.value.code in ("bad_signature", "malformed")


def test_ca_is_not_picklable_and_repr_hides_keys(ca: TrustDomainCA) -> None:
    with pytest.raises(TypeError, match="must not be pickled"):
        pickle.dumps(ca)
    assert "PRIVATE" not in repr(ca) and "key" not in repr(ca.roots[0]).lower().replace("rootkey", "")
    svid = ca.issue_svid(API, now_s=NOW_S)
    assert "PRIVATE" not in repr(svid)


def make_plugin_ca(td: str) -> tuple[TrustDomainCA, x509.Certificate]:
    """A user-held root (path length 1) and an intermediate given to meshfed, Istio cacerts-style."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corp root")])
    ca_ext = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                           data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                           encipher_only=False, decipher_only=False)
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(1)
            .not_valid_before(dt(NOW_S - 86400)).not_valid_after(dt(NOW_S + 365 * 86400))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(ca_ext, critical=True).sign(root_key, hashes.SHA256()))
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{td} intermediate")])
    inter = (x509.CertificateBuilder().subject_name(inter_name).issuer_name(root_name)
             .public_key(inter_key.public_key()).serial_number(2)
             .not_valid_before(dt(NOW_S - 86400)).not_valid_after(dt(NOW_S + 180 * 86400))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(ca_ext, critical=True).sign(root_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca = TrustDomainCA.from_plugin(td, root_cert_pem=root.public_bytes(pem), ca_cert_pem=inter.public_bytes(pem),
                                   ca_key_pem=key_pem(inter_key), now_s=NOW_S)
    return ca, root


def test_plugin_ca_publishes_root_and_intermediate() -> None:
    ca, root = make_plugin_ca(EAST)
    assert ca.authorities[0] == root and len(ca.authorities) == 2


def test_plugin_ca_rejects_mismatched_key() -> None:
    ca, root = make_plugin_ca(EAST)
    signer = ca.signer_certificate
    assert signer is not None
    pem = serialization.Encoding.PEM
    with pytest.raises(CaError, match="does not belong"):
        TrustDomainCA.from_plugin(EAST, root_cert_pem=root.public_bytes(pem), ca_cert_pem=signer.public_bytes(pem),
                                  ca_key_pem=key_pem(ec.generate_private_key(ec.SECP256R1())), now_s=NOW_S)
    other_root = TrustDomainCA.create(EAST, now_s=NOW_S).roots[0].cert
    with pytest.raises(CaError, match="must chain"):  # the intermediate offered with another root
        TrustDomainCA.from_plugin(EAST, root_cert_pem=other_root.public_bytes(pem),
                                  ca_cert_pem=signer.public_bytes(pem), ca_key_pem=_plugin_key(ca), now_s=NOW_S)


def _plugin_key(ca: TrustDomainCA) -> bytes:
    key = ca._signer_key  # test-only peek
    assert key is not None
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --- key storage -------------------------------------------------------------------------------


def _td(roots: tuple[CaRoot, ...] = (CaRoot("root-1", True),)) -> TrustDomain:
    return TrustDomain(TrustDomainName(EAST), ca=CaSpec(CaMode.MANAGED, roots))


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_state_dir_layout_and_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        store = CaStateDir(tmp_path / "state")
        ca = store.load_or_create(_td(), now_s=NOW_S)
    finally:
        os.umask(old_umask)
    assert ca is not None and ca.signing_root == "root-1"
    d = tmp_path / "state" / "ca" / EAST
    assert _mode(tmp_path / "state" / "ca") == 0o700 and _mode(d) == 0o700
    assert _mode(d / "root-1.keypair.pem") == 0o600
    # reopening loads the same root instead of minting a new one
    again = CaStateDir(tmp_path / "state").load_or_create(_td(), now_s=NOW_S)
    assert again is not None and again.roots[0].cert == ca.roots[0].cert


@pytest.mark.parametrize(("target", "mode", "match"), [
    ("key", 0o644, "mode 0644"),
    ("key", 0o640, "chmod 600"),
    ("td_dir", 0o755, "chmod 700"),
    ("ca_dir", 0o750, "mode 0750"),
])
def test_refuses_to_start_with_loose_permissions(tmp_path: Path, target: str, mode: int, match: str) -> None:
    CaStateDir(tmp_path).load_or_create(_td(), now_s=NOW_S)
    paths = {"key": tmp_path / "ca" / EAST / "root-1.keypair.pem", "td_dir": tmp_path / "ca" / EAST,
             "ca_dir": tmp_path / "ca"}
    os.chmod(paths[target], mode)
    with pytest.raises(CaPermissionError, match=match):
        CaStateDir(tmp_path)


def test_refuses_symlinked_key(tmp_path: Path) -> None:
    CaStateDir(tmp_path).load_or_create(_td(), now_s=NOW_S)
    key = tmp_path / "ca" / EAST / "root-1.keypair.pem"
    real = tmp_path / "elsewhere.pem"
    key.rename(real)
    key.symlink_to(real)
    with pytest.raises(CaPermissionError, match="symlink"):
        CaStateDir(tmp_path)


def test_refuses_world_writable_state_dir(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    with pytest.raises(CaPermissionError, match="writable by group/others"):
        CaStateDir(tmp_path)


def test_rotation_roots_created_and_bundle_sequence(tmp_path: Path) -> None:
    store = CaStateDir(tmp_path)
    ca1 = store.load_or_create(_td(), now_s=NOW_S)
    assert ca1 is not None
    b1 = store.publish_bundle(ca1)
    assert b1.sequence == 1 and store.publish_bundle(ca1).sequence == 1  # unchanged: same sequence
    published = _td((CaRoot("root-1", True), CaRoot("root-2", False)))
    ca2 = store.load_or_create(published, now_s=NOW_S)
    assert ca2 is not None and [r.name for r in ca2.roots] == ["root-1", "root-2"]
    assert ca2.signing_root == "root-1"
    b2 = store.publish_bundle(ca2)
    assert b2.sequence == 2 and len(b2.authorities) == 2
    switched = store.load_or_create(_td((CaRoot("root-1", False), CaRoot("root-2", True))), now_s=NOW_S)
    assert switched is not None and switched.signing_root == "root-2"
    assert store.publish_bundle(switched).sequence == 2  # same authorities, only the signer moved
    read = store.read_bundle(EAST)
    assert read is not None and read.same_authorities(b2)


def test_under_a_simulated_calendar_certificates_are_valid_on_both_the_calendar_and_the_real_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenSSL (Python `ssl`, grpcio) checks validity on the real clock, meshfed on the calendar:
    when the calendar runs ahead (the lab's soak), roots and leaves start at the real clock (minus
    the backdate) and end at the calendar's now plus their lifetime — valid for both."""
    from ztunnel.api import clock

    offset_s = 20 * 86400.0
    (tmp_path / "offset").write_text(f"{offset_s}\n")
    real_s = NOW_S
    monkeypatch.setattr(clock, "_calendar", clock.CalendarClock(tmp_path / "offset", wall=lambda: real_s))
    sim_s = clock.calendar_now()
    assert sim_s == real_s + offset_s
    sim_ca = TrustDomainCA.create(EAST, now_s=sim_s, root_name="root-2")
    root = sim_ca.roots[0].cert
    assert root.not_valid_before_utc.timestamp() <= real_s and root.not_valid_after_utc.timestamp() > sim_s
    leaf = x509.load_pem_x509_certificate(sim_ca.issue_from_csr(generate_key_and_csr(API).csr_pem, entitlement=NODE,
                                                                now_s=sim_s))
    assert real_s - 3600 < leaf.not_valid_before_utc.timestamp() <= real_s
    assert leaf.not_valid_after_utc.timestamp() == pytest.approx(sim_s + 86400.0)
    # with the real calendar nothing moves: not-before is the backdated now
    monkeypatch.setattr(clock, "_calendar", clock.CalendarClock(None, wall=lambda: real_s))
    plain = x509.load_pem_x509_certificate(sim_ca.issue_from_csr(generate_key_and_csr(API).csr_pem, entitlement=NODE,
                                                                 now_s=sim_s))
    assert plain.not_valid_before_utc.timestamp() == pytest.approx(sim_s - sim_ca.backdate_s)
