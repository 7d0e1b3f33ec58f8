"""SPIFFE bundle JSON: emit/parse round trip, strict entries, and the update rules."""

from __future__ import annotations

import json

import pytest

from federation.controller.ca import TrustDomainCA, generate_root
from tests.unit.identity.forge import NOW_S, leaf
from ztunnel.api.bundle import (
    BundleError,
    SpiffeBundle,
    accept_update,
    emit_bundle,
    fingerprint_sha256,
    parse_bundle,
)

TD = "east.mesh"


@pytest.fixture(scope="module")
def ca() -> TrustDomainCA:
    return TrustDomainCA.create(TD, now_s=NOW_S)


def test_emit_parse_round_trip(ca: TrustDomainCA) -> None:
    doc = json.loads(emit_bundle(ca.bundle(sequence=7, refresh_hint_s=60)))
    assert doc["spiffe_sequence"] == 7 and doc["spiffe_refresh_hint"] == 60
    (jwk,) = doc["keys"]
    assert jwk["use"] == "x509-svid" and jwk["kty"] == "EC" and jwk["crv"] == "P-256" and len(jwk["x5c"]) == 1
    parsed = parse_bundle(json.dumps(doc), TD)
    assert parsed.sequence == 7 and parsed.refresh_hint_s == 60
    assert parsed.fingerprints() == (fingerprint_sha256(ca.roots[0].cert),)


def test_jwt_entries_ignored(ca: TrustDomainCA) -> None:
    doc = json.loads(emit_bundle(ca.bundle()))
    doc["keys"].append({"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"})
    parsed = parse_bundle(json.dumps(doc), TD)
    assert len(parsed.authorities) == 1 and parsed.ignored_entries == 1


def _mutate(ca: TrustDomainCA, **changes: object) -> str:
    doc = json.loads(emit_bundle(ca.bundle()))
    doc["keys"][0].update(changes)
    return json.dumps(doc)


@pytest.mark.parametrize(("mutation", "match"), [
    ({"x": "AAAA"}, "'x' does not match"),
    ({"kty": "RSA"}, "kty"),
    ({"crv": "P-384"}, "crv"),
    ({"x5c": []}, "exactly one certificate"),
    ({"x5c": ["not base64!"]}, "not a base64 DER"),
])
def test_entry_rules(ca: TrustDomainCA, mutation: dict[str, object], match: str) -> None:
    with pytest.raises(BundleError, match=match):
        parse_bundle(_mutate(ca, **mutation), TD)


def test_leaf_in_bundle_rejected() -> None:
    root = generate_root(TD, "root-1", now_s=NOW_S)
    cert, _ = leaf(root, [f"spiffe://{TD}/ns/a/sa/b"])
    doc = json.loads(emit_bundle(SpiffeBundle(TD, (root.cert,))))
    import base64

    from cryptography.hazmat.primitives import serialization
    doc["keys"][0]["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    with pytest.raises(BundleError, match="is not a CA"):
        parse_bundle(json.dumps(doc), TD)


@pytest.mark.parametrize(("doc", "match"), [
    ("[]", "JWK Set"),
    ("{", "not JSON"),
    ('{"keys": {}}', "'keys' must be a list"),
    ('{"keys": [], "spiffe_sequence": -1}', "non-negative"),
    ('{"keys": [], "spiffe_sequence": true}', "non-negative"),
    ('{"keys": [], "spiffe_refresh_hint": 0}', "positive"),
])
def test_document_rules(doc: str, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        parse_bundle(doc, TD, allow_empty=True)


def test_empty_key_set_needs_confirmation() -> None:
    with pytest.raises(BundleError, match="confirm it explicitly"):
        parse_bundle('{"keys": [], "spiffe_sequence": 3}', TD)
    assert parse_bundle('{"keys": [], "spiffe_sequence": 3}', TD, allow_empty=True).authorities == ()
    empty = SpiffeBundle(TD, (), 4)
    with pytest.raises(BundleError, match="empty"):
        accept_update(None, empty)
    assert accept_update(None, empty, allow_empty=True) is empty


def test_sequence_regression_rejected(ca: TrustDomainCA) -> None:
    current = ca.bundle(sequence=5)
    with pytest.raises(BundleError, match="lower than 5"):
        accept_update(current, ca.bundle(sequence=4))
    assert accept_update(current, ca.bundle(sequence=5)).sequence == 5  # same content: no-op
    assert accept_update(current, ca.bundle(sequence=6)).sequence == 6


def test_same_sequence_different_authorities_rejected(ca: TrustDomainCA) -> None:
    other = TrustDomainCA.create(TD, now_s=NOW_S)
    with pytest.raises(BundleError, match="must increase"):
        accept_update(ca.bundle(sequence=5), other.bundle(sequence=5))


def test_wrong_trust_domain_update_rejected(ca: TrustDomainCA) -> None:
    west = TrustDomainCA.create("west.mesh", now_s=NOW_S)
    with pytest.raises(BundleError, match="offered as an update"):
        accept_update(ca.bundle(), west.bundle(sequence=9))


def test_trust_bundle_conversion(ca: TrustDomainCA) -> None:
    tb = ca.bundle(sequence=3).to_trust_bundle()
    assert tb.trust_domain == TD and tb.sequence == 3 and len(tb.roots_pem) == 1
    back = SpiffeBundle.from_trust_bundle(tb)
    assert back.same_authorities(ca.bundle()) and back.sequence == 3


def test_bundle_name_validated() -> None:
    with pytest.raises(BundleError, match="uppercase"):
        SpiffeBundle("East.mesh", ())
