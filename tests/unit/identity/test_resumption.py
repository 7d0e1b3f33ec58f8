"""Which TLS session ticket may be offered to whom (`ztunnel.identity.resumption.SessionTickets`)."""

from __future__ import annotations

import ssl
from typing import Any

from ztunnel.identity.resumption import SessionTickets


class _Session:
    def __init__(self, has_ticket: bool = True) -> None:
        self.has_ticket = has_ticket


def _ctx() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


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
