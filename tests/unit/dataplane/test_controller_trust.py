"""What a proxy verifies the controller against (`ztunnel.xds.channel.ControllerTrust`): the
controller's SPIFFE ID in the proxy's own trust domain, signed by that domain's roots only; roots
that follow a rotation (learnt) joined with the operator's anchor file (re-read). Pure: no sockets."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from federation.controller.ca import TrustDomainCA
from tests.unit.identity.forge import NOW_S
from ztunnel.api.bundle import load_pem_certificates
from ztunnel.api.identity import controller_spiffe_id, controller_tls_name
from ztunnel.api.verify import PeerVerificationError
from ztunnel.xds.channel import ControllerBridge, ControllerTrust, rejected_our_certificate

EAST, WEST = "east.mesh", "west.mesh"


@pytest.fixture(scope="module")
def cas() -> dict[str, TrustDomainCA]:
    return {td: TrustDomainCA.create(td, now_s=NOW_S - 3600) for td in (EAST, WEST)}


def leaf(ca: TrustDomainCA, identity: str) -> bytes:
    svid = ca.issue_svid(identity, now_s=NOW_S, dns_names=[controller_tls_name(EAST)])
    return load_pem_certificates(svid.chain_pem)[0].public_bytes(Encoding.DER)


def anchored(tmp_path: Path, cas: dict[str, TrustDomainCA], *tds: str) -> ControllerTrust:
    anchor = tmp_path / "roots.pem"
    anchor.write_bytes(b"".join(cas[td].roots_pem() for td in tds))
    return ControllerTrust(EAST, anchor)


def test_the_pinned_identity_is_the_controllers_in_the_proxys_trust_domain(tmp_path: Path,
                                                                          cas: dict[str, TrustDomainCA]) -> None:
    trust = anchored(tmp_path, cas, EAST)
    assert trust.identity == controller_spiffe_id(EAST) == "spiffe://east.mesh/ns/meshfed-system/sa/meshfed-controller"
    assert trust.server_name == controller_tls_name(EAST)
    assert str(trust.verify(leaf(cas[EAST], trust.identity), NOW_S)) == trust.identity


@pytest.mark.parametrize(("issuer", "identity", "code"), [
    (EAST, "spiffe://east.mesh/ns/shop/sa/checkout", "wrong_identity"),          # a workload of east
    (EAST, "spiffe://east.mesh/ns/meshfed-system/sa/ztunnel.east.node-1", "wrong_identity"),
    (WEST, "spiffe://west.mesh/ns/meshfed-system/sa/meshfed-controller", "unknown_trust_domain"),  # west's controller
    (WEST, "spiffe://east.mesh/ns/meshfed-system/sa/meshfed-controller", "untrusted_issuer"),  # west's CA forging it
])
def test_anything_else_is_not_the_controller(tmp_path: Path, cas: dict[str, TrustDomainCA], issuer: str,
                                            identity: str, code: str) -> None:
    # east's roots (the controller writes roots/<td>.pem per trust domain): west's CA counts for nothing
    trust = anchored(tmp_path, cas, EAST)
    if issuer == WEST and identity.startswith("spiffe://east"):
        from cryptography.hazmat.primitives.asymmetric import ec

        from ztunnel.api.identity import SpiffeId
        key = ec.generate_private_key(ec.SECP256R1())
        pem = cas[WEST]._sign_leaf(SpiffeId.parse(identity), key.public_key(), NOW_S, None)
        der = load_pem_certificates(pem)[0].public_bytes(Encoding.DER)
    else:
        der = leaf(cas[issuer], identity)
    with pytest.raises(PeerVerificationError) as err:
        trust.verify(der, NOW_S)
    assert err.value.code == code


def test_learnt_roots_replace_each_other_and_join_the_anchor_file(tmp_path: Path, cas: dict[str, TrustDomainCA]) -> None:
    anchor = tmp_path / "roots.pem"
    anchor.write_bytes(cas[EAST].roots_pem())
    trust = ControllerTrust(EAST, anchor)
    rotated = TrustDomainCA.create(EAST, now_s=NOW_S - 3600, root_name="root-2")
    assert trust.learn(rotated.roots_pem()) is True and trust.updates == 1
    assert trust.learn(rotated.roots_pem()) is False                    # unchanged: no update
    assert len(load_pem_certificates(trust.roots_pem())) == 2           # anchor + learnt
    trust.verify(leaf(rotated, trust.identity), NOW_S)                  # the new root verifies the controller
    trust.verify(leaf(cas[EAST], trust.identity), NOW_S)                # and so does the anchor's
    again = TrustDomainCA.create(EAST, now_s=NOW_S - 3600, root_name="root-3")
    assert trust.learn(again.roots_pem())
    assert len(load_pem_certificates(trust.roots_pem())) == 2           # root-2 is gone: replaced, not kept
    anchor.write_bytes(rotated.roots_pem())                             # the operator updated the file
    assert {c.subject.rfc4514_string() for c in load_pem_certificates(trust.roots_pem())} == {
        rotated.roots[0].cert.subject.rfc4514_string(), again.roots[0].cert.subject.rfc4514_string()}


@pytest.mark.parametrize("junk", [b"", b"not pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_roots_that_do_not_parse_are_ignored(cas: dict[str, TrustDomainCA], junk: bytes) -> None:
    trust = ControllerTrust(EAST, None, cas[EAST].roots_pem())
    before = trust.learned_pem
    assert before and trust.learn(junk) is False and trust.learned_pem == before


def test_a_leaf_is_not_a_root(cas: dict[str, TrustDomainCA]) -> None:
    trust = ControllerTrust(EAST)
    svid = cas[EAST].issue_svid("spiffe://east.mesh/ns/shop/sa/x", now_s=NOW_S)
    assert trust.learn(svid.chain_pem) is False and not trust.has_roots()


@pytest.mark.parametrize(("err", "rejected"), [
    (ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"), True),
    (ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired"), True),
    (ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required"), True),
    (ssl.SSLError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), False),  # we refused it
    (ConnectionRefusedError(111, "Connection refused"), False),
])
def test_a_tls_alert_about_our_certificate_is_told_from_other_failures(err: BaseException, rejected: bool) -> None:
    assert rejected_our_certificate(err) is rejected


def test_a_lost_stream_is_explained_by_the_bridges_last_refusal(tmp_path: Path,
                                                                cas: dict[str, TrustDomainCA]) -> None:
    """gRPC only sees the bridge's local socket close ("Socket closed") when the bridge refused the
    controller's certificate; the proxy's log line must carry the bridge's reason (say, "peer
    certificate is not yet valid" on a node whose clock is an hour behind), once."""
    bridge = ControllerBridge("100.64.0.1:15012", anchored(tmp_path, cas, EAST))
    grpc_says = "UNAVAILABLE: failed to connect to all addresses; last error: Socket closed"
    assert bridge.explain(grpc_says) == grpc_says              # nothing failed yet: nothing to add
    bridge.last_error = ("controller at 100.64.0.1:15012 failed verification: peer certificate is not yet valid: "
                         "spiffe://east.mesh/ns/meshfed-system/sa/meshfed-controller's starts at …")
    explained = bridge.explain(grpc_says)
    assert explained.startswith(grpc_says) and "certificate is not yet valid" in explained
    assert bridge.explain(explained) == explained              # not twice
