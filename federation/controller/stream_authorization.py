"""How long a proxy's long-lived stream stays authorised: until its certificate's not-after.

TLS checks a client certificate once, in the handshake, and gRPC's server never looks again: a
config or health stream opened with a certificate would stay authorised long after that
certificate expired (a stolen proxy key with an open stream kept receiving config for as long as
the connection lived). A zero-trust control plane grants a stream no more than the credential
that opened it: each authenticated stream is bound to the not-after of the client certificate
that authenticated it, and is ended when the calendar (`ztunnel.api.clock.calendar_now`, which
the lab's soak simulates; OpenSSL judges the handshake on the real clock instead) reaches it.

The rule, in one place:

- a stream is *due to end* at `now_s >= not_after_s` (`stream_expired`): no clock-skew tolerance,
  unlike peer verification (`ztunnel.api.verify`, 120 s): the date is the controller's own
  calendar judging a certificate its own CA issued, and the proxy renews at half-life, so a
  healthy proxy holds a certificate valid for hours when its old stream is cut;
- a stream is never opened with a certificate already due (the open is refused as expired, which
  the proxy answers by renewing), so a reconnect inside the verifier's skew window cannot loop
  between "accepted" and "cut at once".

`StreamExpiries` is the bookkeeping for one server: which open streams end when, as a heap the
server's periodic sweep pops (one sweep for every stream, instead of one timer per stream).
Sans-IO: keys are opaque (the gRPC adapter uses an `asyncio.Event` per stream), `now_s` is passed
in. Invariants: a key is bound at most once at a time; the map holds exactly the bound keys
(bounded by the open streams); the heap holds at most `COMPACT_FACTOR` times as many entries plus
`COMPACT_SLACK` (entries of released keys are dropped lazily, and the heap is rebuilt when they
pile up), so a reconnect storm cannot grow it without bound.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

COMPACT_FACTOR = 2
COMPACT_SLACK = 64


def stream_expired(not_after_s: float, now_s: float) -> bool:
    """Is a stream authenticated by a certificate valid until `not_after_s` due to end at `now_s`?"""
    return now_s >= not_after_s


class StreamExpiries(Generic[K]):
    """Open streams and the not-after each is bound to (see the module docstring)."""

    def __init__(self) -> None:
        self._bound: dict[K, tuple[float, int]] = {}          # key -> (not after, sequence of the binding)
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._bound)

    def __contains__(self, key: object) -> bool:
        return key in self._bound

    def bind(self, key: K, not_after_s: float) -> None:
        """`key`'s stream is authorised until `not_after_s` (binding a bound key again is an error:
        a stream is authenticated once, by the certificate of its connection)."""
        if key in self._bound:
            raise ValueError(f"stream {key!r} is already bound to a certificate expiry")
        seq = next(self._seq)
        self._bound[key] = (not_after_s, seq)
        heapq.heappush(self._heap, (not_after_s, seq, key))

    def release(self, key: K) -> None:
        """The stream ended on its own (or was ended): forget it. Unknown keys are ignored."""
        if self._bound.pop(key, None) is not None and \
                len(self._heap) > COMPACT_FACTOR * len(self._bound) + COMPACT_SLACK:
            self._heap = [(na, seq, k) for na, seq, k in self._heap if self._bound.get(k, (0.0, -1))[1] == seq]
            heapq.heapify(self._heap)

    def due(self, now_s: float) -> list[K]:
        """The streams due to end at `now_s`, earliest first; they are released."""
        out: list[K] = []
        while self._heap and stream_expired(self._heap[0][0], now_s):
            _na, seq, key = heapq.heappop(self._heap)
            if self._bound.get(key, (0.0, -1))[1] == seq:   # not a leftover of a released binding
                del self._bound[key]
                out.append(key)
        return out
