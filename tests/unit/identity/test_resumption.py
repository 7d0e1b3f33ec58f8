"""Which TLS session ticket may be offered to whom (`ztunnel.identity.resumption.SessionTickets`)."""

from __future__ import annotations

import ssl
import time
from typing import Any

import pytest

from federation.controller.ca import TrustDomainCA
from tests.unit.identity.forge import key_pem, leaf, memory_handshake, pem
from ztunnel.api.verify import PeerVerificationError, TrustStore
from ztunnel.identity import tls
from ztunnel.identity.resumption import SessionTickets


class _Session:
    def __init__(self, has_ticket: bool = True) -> None:
        self.has_ticket = has_ticket


def _ctx() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


SERVER, CLIENT = "spiffe://east.mesh/ns/shop/sa/api", "spiffe://west.mesh/ns/web/sa/front"
KEY = ("spiffe://e/ns/a/sa/c", "", "gw:15008", ("spiffe://w/ns/a/sa/s",), "s.a.sa.w")


def _remember(t: SessionTickets, ctx: ssl.SSLContext, store: Any, at: float, key: tuple[Any, ...] = KEY) -> Any:
    s = _Session()
    t.remember(key, s, ctx, store, at)  # type: ignore[arg-type]
    return s


def test_a_ticket_is_offered_only_to_its_own_key_context_and_store() -> None:
    t, ctx, store = SessionTickets(), _ctx(), object()
    s = _remember(t, ctx, store, 100.0)
    other_identity = (*KEY[:3], ("spiffe://w/ns/a/sa/other",), KEY[4])
    assert t.find(other_identity, ctx, store, 101.0) is None
    assert t.find(KEY, ctx, store, 101.0) is s
    assert t.find(KEY, _ctx(), store, 101.0) is None      # a new certificate: a new context
    assert len(t) == 0                                     # ... strands the ticket for good
    _remember(t, ctx, store, 100.0)
    assert t.find(KEY, ctx, object(), 101.0) is None       # a new trust store likewise


def test_a_ticket_serves_until_the_max_age_of_its_full_handshake() -> None:
    t, ctx, store = SessionTickets(max_age_s=300.0), _ctx(), object()
    s = _remember(t, ctx, store, 100.0)
    assert t.find(KEY, ctx, store, 250.0) is s
    t.note_resumed()
    assert t.find(KEY, ctx, store, 399.0) is s
    assert (t.offered, t.resumed) == (2, 1)
    assert t.find(KEY, ctx, store, 400.0) is None          # 300 s after the full handshake
    assert len(t) == 0


def test_sessions_without_a_ticket_are_not_kept_and_the_map_is_bounded() -> None:
    t, ctx, store = SessionTickets(max_entries=2), _ctx(), object()
    t.remember(KEY, _Session(has_ticket=False), ctx, store, 0.0)  # type: ignore[arg-type]
    t.remember(KEY, None, ctx, store, 0.0)
    assert len(t) == 0
    for i in range(3):
        _remember(t, ctx, store, 0.0, key=(i,))
    assert len(t) == 2 and t.find((0,), ctx, store, 1.0) is None  # the oldest went first


def test_forget_after_a_refused_resumption_counts_it() -> None:
    t, ctx, store = SessionTickets(), _ctx(), object()
    _remember(t, ctx, store, 0.0)
    t.forget(KEY, refused_after_resume=True)
    assert len(t) == 0 and t.refused_after_resume == 1


# --- what a resumed session proves, through real TLS 1.3 resumption (memory BIOs) -----------------
# A resumed handshake exchanges no certificates: each side's SSLObject carries the peer certificate
# of the full handshake the ticket came from. `verify_connection` (run by the proxy on every
# session, full or resumed: `ProxyBase.verify_peer`) must judge that certificate's dates at *this*
# time, so a peer whose certificate expired (or is not valid yet, for a clock gone back) since the
# ticket was issued cannot keep connecting on the ticket.

def _resumed_pair() -> tuple[ssl.SSLObject, ssl.SSLObject, TrustStore, float, float, float]:
    now = time.time()  # OpenSSL's own checks run on the real clock (time itself is ours: NO_CHECK_TIME)
    east = TrustDomainCA.create("east.mesh", now_s=now - 3600)
    west = TrustDomainCA.create("west.mesh", now_s=now - 3600)
    store = TrustStore.from_bundles(east.trust_bundle(), west.trust_bundle())
    nb, na = now - 60, now + 600
    srv, srv_key = leaf(east.roots[0], [SERVER], not_before_s=nb, not_after_s=na)
    cli, cli_key = leaf(west.roots[0], [CLIENT], not_before_s=nb, not_after_s=na)
    client = tls.client_context(pem(cli), key_pem(cli_key), store)
    server = tls.server_context(pem(srv), key_pem(srv_key), store)
    first_c, _ = memory_handshake(client, server)
    assert not first_c.session_reused and first_c.session is not None and first_c.session.has_ticket
    c, s = memory_handshake(client, server, session=first_c.session)
    assert c.session_reused and s.session_reused  # no certificate was sent this time
    return c, s, store, now, nb, na


def test_a_resumed_session_carries_the_peer_certificates_and_verifies_now() -> None:
    c, s, store, now, _, _ = _resumed_pair()
    assert str(tls.verify_connection(c, store, now, expected=[SERVER])) == SERVER
    assert str(tls.verify_connection(s, store, now)) == CLIENT    # the client's, from the ticket


@pytest.mark.parametrize("when", ["expired", "not_yet_valid"])
def test_a_resumed_session_is_refused_once_the_peer_certificate_is_outside_its_dates(when: str) -> None:
    """Both sides: the client judging the server's certificate from its session, the server the
    client's from the ticket it sealed. Past not-after (+ skew) or before not-before (- skew)."""
    c, s, store, _, nb, na = _resumed_pair()
    skew = store.clock_skew_s
    at = na + skew + 1 if when == "expired" else nb - skew - 1
    words = "certificate has expired" if when == "expired" else "certificate is not yet valid"
    for obj, expected in ((c, [SERVER]), (s, None)):
        with pytest.raises(PeerVerificationError, match=words) as e:
            tls.verify_connection(obj, store, at, expected=expected)
        assert e.value.code == when
