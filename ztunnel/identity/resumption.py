"""TLS 1.3 session tickets for the inner, end-to-end mTLS of double HBONE (client side).

Why: every new connection through an east-west gateway is a new inner mTLS session between the
source node and the destination node (inner tunnels are not pooled: the destination authorizes
each one). A full handshake signs and verifies certificates on both sides; resuming with a ticket
the destination gave us on an earlier connection skips that work (an ephemeral ECDHE still runs:
`psk_dhe_ke`, forward secrecy kept).

What a ticket may be used for — the invariants `SessionTickets` keeps:
- a ticket is filed under the full key of the dial that earned it: source identity, destination
  node, gateway, the identities the destination was expected to prove, SNI — and it is only
  offered by the same client `ssl.SSLContext` (our certificate) against the same `TrustStore`
  (a new config or a rotated certificate builds new ones, which strands every older ticket);
- a resumed session is still *verified*: the caller runs the same trust-domain-bound identity
  check (`ProxyBase.verify_peer`) on the certificate the session carries, against the identities
  expected now; a mismatch refuses the connection and drops the ticket (tests:
  `test_a_resumed_session_with_another_peer_identity_is_refused`);
- a ticket is used until `RESUMPTION_MAX_AGE_S` after the full handshake that earned it, then a
  full handshake shows the peer's certificate again (a rotated one is seen within that time); the
  server side keeps the same bound by building a new server context, hence new ticket keys, at
  least that often (`ProxyBase._inbound_context`);
- the ticket of a full handshake is reused for every resumption until then (not replaced by the
  tickets resumed handshakes bring): TLS 1.3 stateless tickets allow it (0-RTT, where reuse would
  matter, is off), a chain of resumptions cannot stretch the age bound, and fetching a session
  from Python's `ssl` costs ~0.2 ms (it re-serializes it) — as much as the resumption saves on one
  side. What reuse gives away is unlinkability: the inner ClientHello (seen by the gateway that
  relays it) carries the same ticket each time, which links connections the outer tunnel's
  identity already names as ours;
- bounded: at most `max_entries` keys (the oldest is dropped), one ticket per key.

Pure bookkeeping: no I/O, the clock is passed in.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

# How long a peer authenticated by a full handshake may be resumed without showing its
# certificate again (client and server side alike). Short next to certificate lifetimes (hours),
# long next to a burst of connections.
RESUMPTION_MAX_AGE_S = 300.0
MAX_TICKET_KEYS = 4096

TicketKey = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Ticket:
    session: ssl.SSLSession
    context: ssl.SSLContext
    store: object
    authenticated_at_s: float


class SessionTickets:
    """Resumable sessions by dial key. `find` before a handshake, `remember` after a verified one,
    `forget` after a refused one."""

    def __init__(self, max_entries: int = MAX_TICKET_KEYS, max_age_s: float = RESUMPTION_MAX_AGE_S) -> None:
        self.max_entries, self.max_age_s = max_entries, max_age_s
        self._tickets: dict[TicketKey, _Ticket] = {}
        self.offered = 0      # handshakes we offered a ticket in
        self.resumed = 0      # ... that the peer accepted
        self.refused_after_resume = 0  # resumed, then the identity check refused the peer

    def __len__(self) -> int:
        return len(self._tickets)

    def find(self, key: TicketKey, context: ssl.SSLContext, store: object, now_s: float) -> ssl.SSLSession | None:
        t = self._tickets.get(key)
        if t is None:
            return None
        if t.context is not context or t.store is not store or now_s - t.authenticated_at_s >= self.max_age_s:
            del self._tickets[key]  # another certificate, another trust store, or too old: full handshake
            return None
        self.offered += 1
        return t.session

    def note_resumed(self) -> None:
        """The peer took the ticket `find` returned (and then passed the identity check)."""
        self.resumed += 1

    def remember(self, key: TicketKey, session: ssl.SSLSession | None, context: ssl.SSLContext, store: object,
                 authenticated_at_s: float) -> None:
        """Keep `session` (of a full handshake, at `authenticated_at_s`, whose peer passed the identity
        check) for the next dials."""
        if session is None or not session.has_ticket:
            return
        if key not in self._tickets and len(self._tickets) >= self.max_entries:
            del self._tickets[next(iter(self._tickets))]  # oldest key first (dicts keep insertion order)
        self._tickets.pop(key, None)
        self._tickets[key] = _Ticket(session, context, store, authenticated_at_s)

    def forget(self, key: TicketKey, refused_after_resume: bool = False) -> None:
        self._tickets.pop(key, None)
        if refused_after_resume:
            self.refused_after_resume += 1

    def clear(self) -> None:
        self._tickets.clear()
