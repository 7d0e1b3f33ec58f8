"""Hand-made certificates for negative tests: every field of a leaf is a parameter, so each test
breaks exactly one rule. Positive paths use `federation.controller.ca.TrustDomainCA` itself."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.controller.ca import RootKey

NOW_S = 1_800_000_000.0  # a fixed "now" (2027-01-15) so tests never read the clock


def dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def key_usage(*, digital_signature: bool = True, key_cert_sign: bool = False,
              crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def leaf(issuer: RootKey, uris: Sequence[str], *, not_before_s: float = NOW_S - 300,
         not_after_s: float = NOW_S + 3600, ca: bool | None = False, ku: x509.KeyUsage | None = None,
         with_ku: bool = True, eku: Sequence[x509.ObjectIdentifier] | None = (
             ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
         key: ec.EllipticCurvePrivateKey | None = None,
         issuer_name: x509.Name | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    assert issuer.key is not None
    k = key or ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forge")]))
         .issuer_name(issuer.cert.subject if issuer_name is None else issuer_name)
         .public_key(k.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(dt(not_before_s))
         .not_valid_after(dt(not_after_s)))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                            critical=False)
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if with_ku:
        b = b.add_extension(ku or key_usage(), critical=True)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return b.sign(issuer.key, hashes.SHA256()), k


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def memory_handshake(client: ssl.SSLContext, server: ssl.SSLContext, session: ssl.SSLSession | None = None,
                     server_hostname: str | None = None) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake between two contexts through memory BIOs (no sockets: the unit tier), the
    client offering `session` for resumption. Afterwards the client has read what the server sent
    after its Finished (TLS 1.3 session tickets), so `client_obj.session` can be resumed."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_hostname, session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    def step(obj: ssl.SSLObject) -> bool:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    done_c = done_s = False
    for _ in range(10):
        done_c = done_c or step(c)
        s_in.write(c_out.read())
        done_s = done_s or step(s)
        c_in.write(s_out.read())
        if done_c and done_s:
            try:
                c.read(1)  # takes in the NewSessionTicket; no application data was sent
            except ssl.SSLWantReadError:
                pass
            return c, s
    raise AssertionError("handshake did not finish")
