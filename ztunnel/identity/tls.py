"""`ssl` contexts for mesh mTLS (HBONE on :15008) and the post-handshake identity check.

The contexts are the *first gate*: TLS 1.3 only, CERT_REQUIRED on both sides, trust anchors =
the union of every authority in the `TrustStore`, hostname checking off (SPIFFE identities live
in URI SANs, not DNS names), ALPN `h2` (HBONE is HTTP/2 CONNECT). Passing the gate proves the peer
holds the key of a leaf that chains to *some* known authority — not that the authority may speak
for the leaf's trust domain. `verify_connection` must therefore run after every handshake, before
any byte of application data is trusted; it applies `TrustStore.verify_peer` (trust-domain bound).

OpenSSL's validity-period check is switched off (X509_V_FLAG_NO_CHECK_TIME): the leaf's and its
issuer's validity are checked in `verify_peer` with an explicit clock-skew tolerance instead, so a
±90 s skew between nodes is tolerated consistently and an expired certificate is reported with a
message that says what to do. `verify_connection` is therefore mandatory, not an extra.

Session resumption: servers issue TLS 1.3 tickets (stateless, one per handshake) and clients
offer them only for the inner end-to-end session of double HBONE (`ztunnel.identity.resumption`
says which ticket may be offered to whom). A resumed session is verified like a full one:
`verify_connection` judges the certificate the session carries (the one the full handshake
proved) at *this* time, against the trust store and the identities expected *now*. How long a
chain of resumptions may stand in for a full handshake is bounded on both sides by
`RESUMPTION_MAX_AGE_S` (clients by the age they carry per ticket; servers by renewing their
context, hence their ticket keys). TLS <= 1.2 stays off, and so does 0-RTT early data.

Key material is handed to OpenSSL through an anonymous in-memory file (`memfd_create`), so private
keys never touch the filesystem; where memfd is unavailable a 0600 file in a private 0700 temporary
directory is used and removed at once. Contexts hold a fixed certificate: when the certificate
manager rotates an identity, build new contexts (old connections keep the old one until closed).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Protocol

from ztunnel.api.identity import SpiffeId
from ztunnel.api.verify import PeerVerificationError, TrustStore

ALPN_HBONE = "h2"
X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL >= 1.1.0; not exported by Python's ssl module


class _HasPeerCert(Protocol):
    def getpeercert(self, binary_form: bool = ...) -> object: ...


@contextmanager
def _pem_path(data: bytes, name: str) -> Iterator[str]:
    """A path OpenSSL can read `data` from, valid inside the `with` block only."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="meshfed-tls-") as d:  # mkdtemp: mode 0700
        path = os.path.join(d, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        yield path


def _base_context(server_side: bool, cert_chain_pem: bytes, key_pem: bytes, store: TrustStore) -> ssl.SSLContext:
    protocol = ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Time is judged by verify_connection alone, with its clock-skew tolerance; OpenSSL's own
    # check has none and would make the tolerance dead letter for the first gate.
    ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    roots = store.roots_pem()
    if not roots:
        raise ValueError("trust store is empty: no peer could ever be verified; the proxy has no bundles yet")
    ctx.load_verify_locations(cadata=roots.decode("ascii"))
    with _pem_path(cert_chain_pem, "chain.pem") as chain_path, _pem_path(key_pem, "key.pem") as key_path:
        ctx.load_cert_chain(chain_path, key_path)
    ctx.set_alpn_protocols([ALPN_HBONE])
    return ctx


def server_context(cert_chain_pem: bytes, key_pem: bytes, store: TrustStore, tickets: bool = True) -> ssl.SSLContext:
    """Server side of mesh mTLS: requires a client certificate; issues one TLS 1.3 session ticket
    per handshake (`tickets=False`: none, every client does a full handshake)."""
    ctx = _base_context(True, cert_chain_pem, key_pem, store)
    ctx.num_tickets = 1 if tickets else 0
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


def client_context(cert_chain_pem: bytes, key_pem: bytes, store: TrustStore) -> ssl.SSLContext:
    """Client side of mesh mTLS: presents our SVID, verifies the server's after the handshake."""
    return _base_context(False, cert_chain_pem, key_pem, store)


def verify_connection(ssl_object: _HasPeerCert, store: TrustStore, now_s: float,
                      expected: Collection[str] | None = None,
                      local_trust_domain: str | None = None) -> SpiffeId:
    """The trust-domain-bound check of a completed handshake (`ssl.SSLObject` or `ssl.SSLSocket`)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        raise PeerVerificationError(
            "peer presented no certificate; mesh traffic is mutual TLS only (is the peer a mesh proxy, and is "
            "it dialing the HBONE port 15008?)", "no_certificate")
    return store.verify_peer(der, now_s, expected=expected, local_trust_domain=local_trust_domain)


def controller_client_context(roots_pem: bytes, chain_pem: bytes | None = None,
                              key_pem: bytes | None = None) -> ssl.SSLContext:
    """Client side of a proxy's TLS to the controller (`ztunnel.xds.channel`): the first gate is
    the controller trust domain's roots (no host-name check: the SPIFFE ID is pinned after the
    handshake with `TrustStore.verify_peer`, which also judges validity with its skew tolerance);
    ALPN h2 for gRPC; our SVID when we have one (the main port requires it)."""
    if not roots_pem.strip():
        raise ValueError("no roots to verify the controller with (is the controller's roots file empty?)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    if chain_pem and key_pem:
        with _pem_path(chain_pem, "chain.pem") as chain_path, _pem_path(key_pem, "key.pem") as key_path:
            ctx.load_cert_chain(chain_path, key_path)
    ctx.set_alpn_protocols(["h2"])
    return ctx
