"""SpiffeId: strict parse, exact round trip, and the trust-domain rules (lowercase, no port, ≤255 bytes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.api.identity import IdentityError, SpiffeId, check_trust_domain, is_trust_domain


def test_parse_fields_and_round_trip() -> None:
    sid = SpiffeId.parse("spiffe://east.mesh/ns/shop/sa/checkout")
    assert (sid.trust_domain, sid.namespace, sid.service_account) == ("east.mesh", "shop", "checkout")
    assert str(sid) == "spiffe://east.mesh/ns/shop/sa/checkout"
    assert sid.trust_domain_id == "spiffe://east.mesh"
    assert SpiffeId("east.mesh", "shop", "checkout") == sid


@pytest.mark.parametrize(("text", "why"), [
    ("spiffe://East.mesh/ns/a/sa/b", "uppercase"),
    ("spiffe://east.mesh:443/ns/a/sa/b", "':'"),
    ("spiffe://user@east.mesh/ns/a/sa/b", "'@'"),
    ("spiffe://east.mesh", "root path"),
    ("spiffe://east.mesh/", "root path"),
    ("https://east.mesh/ns/a/sa/b", "not a SPIFFE ID"),
    ("SPIFFE://east.mesh/ns/a/sa/b", "lowercase"),
    ("spiffe:///ns/a/sa/b", "empty"),
    ("spiffe://east.mesh/ns/a", "path must be"),
    ("spiffe://east.mesh/ns/a/sa/b/extra", "path must be"),
    ("spiffe://east.mesh/sa/b/ns/a", "path must be"),
    ("spiffe://east.mesh/ns//sa/b", "empty"),
    ("spiffe://east.mesh/ns/../sa/b", "dot segment"),
    ("spiffe://east.mesh/ns/a/sa/b?x=1", "query"),
    ("spiffe://east.mesh/ns/a/sa/b#frag", "fragment"),
    ("spiffe://east.mesh/ns/a%20b/sa/b", "percent"),
    ("spiffe://east mesh/ns/a/sa/b", "characters"),
    ("spiffe://east.mesh/ns/a b/sa/b", "characters"),
    ("spiffe://" + "a" * 256 + "/ns/a/sa/b", "255"),
])
def test_rejects(text: str, why: str) -> None:
    with pytest.raises(IdentityError, match=why):
        SpiffeId.parse(text)


def test_uppercase_is_rejected_not_folded() -> None:
    with pytest.raises(IdentityError, match=r"write 'east\.mesh'"):
        check_trust_domain("EAST.mesh")


def test_trust_domain_limits() -> None:
    assert is_trust_domain("a" * 255)
    assert not is_trust_domain("a" * 256)
    assert not is_trust_domain("")
    assert not is_trust_domain("east.mesh:8443")


def test_constructor_validates_too() -> None:
    with pytest.raises(IdentityError):
        SpiffeId("east.mesh", "a/b", "c")


_seg = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", min_size=1,
               max_size=20).filter(lambda s: s not in (".", ".."))
_td = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=40)


@given(_td, _seg, _seg)
def test_round_trip_property(td: str, ns: str, sa: str) -> None:
    text = f"spiffe://{td}/ns/{ns}/sa/{sa}"
    assert str(SpiffeId.parse(text)) == text


@given(st.text(max_size=60))
def test_parse_never_crashes_and_accepted_strings_round_trip(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except IdentityError:
        return
    assert str(sid) == text
