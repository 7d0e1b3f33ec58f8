"""Trust-domain-bound peer verification: every rule of `TrustStore.verify_peer`, and the pooled-CA
forgery through a real (in-memory) TLS handshake with the contexts of `ztunnel.identity.tls`."""

from __future__ import annotations

import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from federation.controller.ca import TrustDomainCA, generate_root
from tests.unit.identity.forge import NOW_S, der, key_pem, key_usage, leaf, memory_handshake, pem
from ztunnel.api.bundle import load_pem_certificates
from ztunnel.api.verify import EXPIRED, NOT_YET_VALID, PeerVerificationError, TrustStore, validity_problem
from ztunnel.identity import tls

EAST, WEST, SOUTH = "east.mesh", "west.mesh", "south.mesh"
API = f"spiffe://{EAST}/ns/shop/sa/api"
FRONT = f"spiffe://{WEST}/ns/web/sa/front"


@pytest.fixture(scope="module")
def cas() -> dict[str, TrustDomainCA]:
    return {td: TrustDomainCA.create(td, now_s=NOW_S - 86400) for td in (EAST, WEST, SOUTH)}


@pytest.fixture(scope="module")
def store(cas: dict[str, TrustDomainCA]) -> TrustStore:
    """East and west federate with each other; south's bundle is known (pooled) but not federated."""
    return TrustStore.from_bundles([c.trust_bundle() for c in cas.values()],
                                   federated={EAST: [WEST], WEST: [EAST], SOUTH: []})


def _leaf_der(ca: TrustDomainCA, ident: str, now_s: float = NOW_S, ttl_s: float | None = None) -> bytes:
    svid = ca.issue_svid(ident, now_s=now_s, ttl_s=ttl_s)
    return der(load_pem_certificates(svid.chain_pem)[0])


def _code(store: TrustStore, leaf_der: bytes, **kw: object) -> str:
    with pytest.raises(PeerVerificationError) as e:
        store.verify_peer(leaf_der, kw.pop("now_s", NOW_S), **kw)  # type: ignore[arg-type]
    return e.value.code


def test_accepts_federated_peer(cas: dict[str, TrustDomainCA], store: TrustStore) -> None:
    sid = store.verify_peer(_leaf_der(cas[WEST], FRONT), NOW_S, expected=[FRONT], local_trust_domain=EAST)
    assert str(sid) == FRONT and sid.trust_domain == WEST


def test_wrong_identity_for_expected_destination(cas: dict[str, TrustDomainCA], store: TrustStore) -> None:
    other = f"spiffe://{EAST}/ns/shop/sa/billing"
    with pytest.raises(PeerVerificationError, match="destination expects") as e:
        store.verify_peer(_leaf_der(cas[EAST], other), NOW_S, expected=[API])
    assert e.value.code == "wrong_identity"


def test_cross_trust_domain_forgery_rejected(cas: dict[str, TrustDomainCA], store: TrustStore) -> None:
    # west's root key mints an east identity (our CA refuses to; a rogue or pooled one would not):
    # it chains to a known root, but not to east's.
    forged, _ = leaf(cas[WEST].roots[0], [API])
    with pytest.raises(PeerVerificationError, match="cross-trust-domain forgery") as e:
        store.verify_peer(der(forged), NOW_S, expected=[API])
    assert e.value.code == "untrusted_issuer"
    assert "west.mesh" in e.value.reason


def test_unknown_issuer_rejected(store: TrustStore) -> None:
    stranger = TrustDomainCA.create(EAST, now_s=NOW_S - 86400)  # same name, different keys
    assert _code(store, _leaf_der(stranger, API)) == "untrusted_issuer"


def test_unknown_trust_domain(store: TrustStore) -> None:
    north = TrustDomainCA.create("north.mesh", now_s=NOW_S - 86400)
    with pytest.raises(PeerVerificationError, match="no bundle") as e:
        store.verify_peer(_leaf_der(north, "spiffe://north.mesh/ns/a/sa/b"), NOW_S)
    assert e.value.code == "unknown_trust_domain"


def test_not_federated(cas: dict[str, TrustDomainCA], store: TrustStore) -> None:
    south_leaf = _leaf_der(cas[SOUTH], f"spiffe://{SOUTH}/ns/a/sa/b")
    with pytest.raises(PeerVerificationError, match="does not federate") as e:
        store.verify_peer(south_leaf, NOW_S, local_trust_domain=EAST)
    assert e.value.code == "not_federated"
    # without a local trust domain only the binding checks apply; its own domain always accepts it
    assert store.verify_peer(south_leaf, NOW_S).trust_domain == SOUTH
    assert store.verify_peer(south_leaf, NOW_S, local_trust_domain=SOUTH).trust_domain == SOUTH


@pytest.fixture(scope="module")
def east_root() -> object:
    return generate_root(EAST, "root-1", now_s=NOW_S - 86400)


@pytest.fixture(scope="module")
def east_store(east_root: object) -> TrustStore:
    return TrustStore({EAST: [east_root.cert]})  # type: ignore[attr-defined]


@pytest.mark.parametrize(("kwargs", "code", "match"), [
    ({"uris": [API, f"spiffe://{EAST}/ns/shop/sa/other"]}, "san", "2 URI SANs"),
    ({"uris": []}, "san", "0 URI SANs"),
    ({"uris": ["https://east.mesh/ns/shop/sa/api"]}, "san", "not a SPIFFE ID"),
    ({"uris": [f"spiffe://{EAST}"]}, "san", "root path"),
    ({"uris": ["spiffe://EAST.mesh/ns/shop/sa/api"]}, "san", "uppercase"),
    ({"uris": [API], "ca": True}, "not_leaf", "CA certificate"),
    ({"uris": [API], "with_ku": False}, "key_usage", "no keyUsage"),
    ({"uris": [API], "ku": key_usage(digital_signature=False)}, "key_usage", "wrong keyUsage"),
    ({"uris": [API], "ku": key_usage(key_cert_sign=True)}, "key_usage", "must not sign"),
    ({"uris": [API], "eku": [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]}, "key_usage", "clientAuth"),
    ({"uris": [API], "key": ec.generate_private_key(ec.SECP521R1())}, "weak_key", "curve"),
])
def test_malformed_svids(east_root: object, east_store: TrustStore, kwargs: dict[str, object], code: str,
                         match: str) -> None:
    cert, _ = leaf(east_root, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(PeerVerificationError, match=match) as e:
        east_store.verify_peer(der(cert), NOW_S)
    assert e.value.code == code


def test_leaf_without_basic_constraints_is_a_leaf(east_root: object, east_store: TrustStore) -> None:
    cert, _ = leaf(east_root, [API], ca=None)  # type: ignore[arg-type]
    assert str(east_store.verify_peer(der(cert), NOW_S)) == API


def test_garbage_is_malformed(east_store: TrustStore) -> None:
    assert _code(east_store, b"\x30\x03\x02\x01\x00") == "malformed"


@pytest.mark.parametrize(("not_before", "not_after", "code"), [
    (NOW_S - 7200, NOW_S - 3600, "expired"),
    (NOW_S + 3600, NOW_S + 7200, "not_yet_valid"),
    (NOW_S + 2 * 3600, NOW_S + 24 * 3600, "not_yet_valid"),  # verifier 2 h behind the issuer
    (NOW_S - 24 * 3600, NOW_S - 2 * 3600, "expired"),        # verifier 2 h ahead
    (NOW_S + 90, NOW_S + 3600, None),                        # ±90 s skew is tolerated
    (NOW_S - 3600, NOW_S - 90, None),
    (NOW_S - 3600, NOW_S + 3600, None),
])
def test_validity_and_clock_skew(east_root: object, east_store: TrustStore, not_before: float,
                                 not_after: float, code: str | None) -> None:
    cert, _ = leaf(east_root, [API], not_before_s=not_before, not_after_s=not_after)  # type: ignore[arg-type]
    if code is None:
        assert str(east_store.verify_peer(der(cert), NOW_S)) == API
    else:
        assert _code(east_store, der(cert)) == code


@pytest.mark.parametrize(("verifier_offset_s", "ok"), [(-90, True), (90, True), (2 * 3600, True),
                                                        (-2 * 3600, False)])
def test_issuer_and_verifier_clocks_disagree(cas: dict[str, TrustDomainCA], store: TrustStore,
                                             verifier_offset_s: float, ok: bool) -> None:
    """A fresh 24 h SVID, verified by a peer whose clock is off: ±90 s fine; 2 h behind rejected."""
    leaf_der = _leaf_der(cas[EAST], API, now_s=NOW_S)
    if ok:
        assert str(store.verify_peer(leaf_der, NOW_S + verifier_offset_s)) == API
    else:
        assert _code(store, leaf_der, now_s=NOW_S + verifier_offset_s) == "not_yet_valid"


def test_expired_issuer_rejected() -> None:
    old = generate_root(EAST, "root-1", now_s=NOW_S - 7200, ttl_s=3600)
    cert, _ = leaf(old, [API], not_before_s=NOW_S - 7000, not_after_s=NOW_S + 3600)
    assert _code(TrustStore({EAST: [old.cert]}), der(cert)) == "issuer_validity"


@pytest.mark.parametrize(("not_before", "not_after", "words", "advice"), [
    (NOW_S - 7200, NOW_S - 3600, "peer certificate has expired: ", "could not renew it"),
    (NOW_S + 3600, NOW_S + 7200, "peer certificate is not yet valid: ", "check NTP on both nodes"),
])
def test_leaf_validity_is_reported_in_the_x509_words(east_root: object, east_store: TrustStore, not_before: float,
                                                     not_after: float, words: str, advice: str) -> None:
    """Operators (and the chaos catalogue's cert-expiry and clock-skew experiments) grep a proxy's
    log for the words every X.509 stack uses; the message then names the peer and what to do."""
    cert, _ = leaf(east_root, [API], not_before_s=not_before, not_after_s=not_after)  # type: ignore[arg-type]
    with pytest.raises(PeerVerificationError) as e:
        east_store.verify_peer(der(cert), NOW_S)
    assert str(e.value).startswith(words) and API in str(e.value) and advice in str(e.value)


def test_an_authority_seen_from_the_future_is_a_clock_error_not_a_rotation() -> None:
    """A verifier an hour behind sees a fresh root as not yet valid: the fix is its clock (NTP);
    rotating the root would not help. An expired root is the one to rotate."""
    young = generate_root(EAST, "root-1", now_s=NOW_S, ttl_s=86400)
    cert, _ = leaf(young, [API], not_before_s=NOW_S, not_after_s=NOW_S + 3600)
    with pytest.raises(PeerVerificationError) as e:
        TrustStore({EAST: [young.cert]}).verify_peer(der(cert), NOW_S - 3600)
    assert e.value.code == "issuer_validity"
    assert str(e.value).startswith("issuer certificate is not yet valid: ") and "NTP" in str(e.value)
    assert "rotate" not in str(e.value)
    old = generate_root(EAST, "root-1", now_s=NOW_S - 7200, ttl_s=3600)
    cert, _ = leaf(old, [API], not_before_s=NOW_S - 7000, not_after_s=NOW_S + 3600)
    with pytest.raises(PeerVerificationError) as e:
        TrustStore({EAST: [old.cert]}).verify_peer(der(cert), NOW_S)
    assert str(e.value).startswith("issuer certificate has expired: ") and "rotate the root of 'east.mesh'" in str(
        e.value)


@pytest.mark.parametrize(("now_s", "problem"), [
    (1000.0 - 121, NOT_YET_VALID), (1000.0 - 120, None), (2000.0 + 120, None), (2000.0 + 121, EXPIRED),
])
def test_validity_window_is_widened_by_the_skew_on_both_sides(now_s: float, problem: str | None) -> None:
    assert validity_problem(1000.0, 2000.0, now_s, 120.0) == problem


def test_issuer_name_must_match_as_well_as_signature(east_root: object, east_store: TrustStore) -> None:
    cert, _ = leaf(east_root, [API], issuer_name=x509.Name([]))  # type: ignore[arg-type]
    assert _code(east_store, der(cert)) == "untrusted_issuer"


def test_plugin_intermediate_in_bundle_is_the_direct_issuer() -> None:
    from tests.unit.identity.test_ca import make_plugin_ca

    ca, _root = make_plugin_ca(EAST)
    svid = ca.issue_svid(API, now_s=NOW_S)
    chain = load_pem_certificates(svid.chain_pem)
    assert len(chain) == 2  # leaf + intermediate; the root is in the bundle
    store = TrustStore.from_bundles(ca.trust_bundle())
    assert str(store.verify_peer(der(chain[0]), NOW_S)) == API


def test_store_rejects_bad_inputs(east_root: object) -> None:
    with pytest.raises(ValueError, match="uppercase"):
        TrustStore({"East": [east_root.cert]})  # type: ignore[attr-defined]
    cert, _ = leaf(east_root, [API])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a CA"):
        TrustStore({EAST: [cert]})


# --- through a real TLS handshake (in memory: no sockets in the unit tier) ---------------------
# OpenSSL checks validity against the real clock, so these CAs and SVIDs are minted "now".


@pytest.fixture(scope="module")
def live() -> tuple[dict[str, TrustDomainCA], TrustStore, float]:
    now = time.time()
    cas = {td: TrustDomainCA.create(td, now_s=now - 3600) for td in (EAST, WEST, SOUTH)}
    store = TrustStore.from_bundles([c.trust_bundle() for c in cas.values()],
                                    federated={EAST: [WEST], WEST: [EAST], SOUTH: []})
    return cas, store, now


def test_pooled_ca_forgery_passes_ssl_but_not_verify_connection(
        live: tuple[dict[str, TrustDomainCA], TrustStore, float]) -> None:
    cas, store, now = live
    forged, forged_key = leaf(cas[WEST].roots[0], [API], not_before_s=now - 60, not_after_s=now + 3600)  # west's root mints east's api identity
    client_id = cas[WEST].issue_svid(FRONT, now_s=now)
    server = tls.server_context(pem(forged), key_pem(forged_key), store)
    client = tls.client_context(client_id.chain_pem, client_id.key_pem, store)
    c, s = memory_handshake(client, server)               # the pooled first gate lets it through…
    assert c.selected_alpn_protocol() == "h2" and c.version() == "TLSv1.3"
    with pytest.raises(PeerVerificationError, match="forgery"):  # …the trust-domain binding does not
        tls.verify_connection(c, store, now, expected=[API], local_trust_domain=WEST)
    assert str(tls.verify_connection(s, store, now, local_trust_domain=EAST)) == FRONT


def test_genuine_handshake_verifies_both_ways(live: tuple[dict[str, TrustDomainCA], TrustStore, float]) -> None:
    cas, store, now = live
    srv = cas[EAST].issue_svid(API, now_s=now)
    cli = cas[WEST].issue_svid(FRONT, now_s=now)
    c, s = memory_handshake(tls.client_context(cli.chain_pem, cli.key_pem, store),
                      tls.server_context(srv.chain_pem, srv.key_pem, store))
    assert str(tls.verify_connection(c, store, now, expected=[API], local_trust_domain=WEST)) == API
    assert str(tls.verify_connection(s, store, now, local_trust_domain=EAST)) == FRONT
    assert not c.session_reused


@pytest.mark.parametrize(("offset_s", "code"), [(90, None), (-90, None), (2 * 3600, "not_yet_valid"),
                                               (-2 * 3600, "expired")])
def test_skew_through_the_handshake(live: tuple[dict[str, TrustDomainCA], TrustStore, float],
                                    offset_s: float, code: str | None) -> None:
    """The server's certificate window is shifted by the peer's clock error; ±90 s passes end to end."""
    cas, store, now = live
    if offset_s > 0:
        nb, na = now + offset_s, now + offset_s + 3600
    else:
        nb, na = now + offset_s - 3600, now + offset_s
    srv, srv_key = leaf(cas[EAST].roots[0], [API], not_before_s=nb, not_after_s=na)
    cli = cas[WEST].issue_svid(FRONT, now_s=now)
    c, _s = memory_handshake(tls.client_context(cli.chain_pem, cli.key_pem, store),
                       tls.server_context(pem(srv), key_pem(srv_key), store))
    if code is None:
        assert str(tls.verify_connection(c, store, time.time(), expected=[API])) == API
    else:
        with pytest.raises(PeerVerificationError) as e:
            tls.verify_connection(c, store, time.time(), expected=[API])
        assert e.value.code == code


def test_server_context_settings(live: tuple[dict[str, TrustDomainCA], TrustStore, float]) -> None:
    cas, store, now = live
    srv = cas[EAST].issue_svid(API, now_s=now)
    ctx = tls.server_context(srv.chain_pem, srv.key_pem, store)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    # one TLS 1.3 ticket per handshake (resumption of the inner end-to-end session, issue 16);
    # TLS <= 1.2 stays off, so no session ids and no 1.2 tickets
    assert ctx.num_tickets == 1 and not ctx.options & ssl.OP_NO_TICKET
    off = tls.server_context(srv.chain_pem, srv.key_pem, store, tickets=False)
    assert off.num_tickets == 0 and off.options & ssl.OP_NO_TICKET


def test_unknown_root_fails_the_first_gate(live: tuple[dict[str, TrustDomainCA], TrustStore, float]) -> None:
    cas, _, now = live
    only_east = TrustStore.from_bundles(cas[EAST].trust_bundle())
    srv = cas[EAST].issue_svid(API, now_s=now)
    cli = cas[SOUTH].issue_svid(f"spiffe://{SOUTH}/ns/a/sa/b", now_s=now)
    client = tls.client_context(cli.chain_pem, cli.key_pem, TrustStore.from_bundles(
        cas[EAST].trust_bundle(), cas[SOUTH].trust_bundle()))
    server = tls.server_context(srv.chain_pem, srv.key_pem, only_east)
    with pytest.raises(ssl.SSLError):
        c, _s = memory_handshake(client, server)
        c.read(1)  # TLS 1.3: the client learns of the rejected certificate on its first read


def test_no_peer_certificate() -> None:
    class NoCert:
        def getpeercert(self, binary_form: bool = False) -> None:
            return None

    with pytest.raises(PeerVerificationError, match="no certificate"):
        tls.verify_connection(NoCert(), TrustStore({}), 0.0)
