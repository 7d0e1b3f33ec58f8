"""What an unauthenticated caller of the bootstrap port may cost us (review finding 6).

A request on the bootstrap port has no client certificate: anyone who can reach the port can send
one, and one carrying a JWT-shaped string makes the controller ask a cluster's API server for a
TokenReview (an HTTP request, on a worker thread). Unbounded, a single client floods both the
controller's log and the API server, and slow reviews pin the threads that the state owner's disk
work shares. The bounds, decided here (pure: the caller passes `now_s`), enforced by the gRPC
adapter (`federation.server.grpc_services.ConfigServer`):

- `BootstrapAdmission`: per source address, a token bucket (`rate_per_s`, `burst`); across all
  sources, at most `max_in_flight` checks at once (the adapter runs them on an executor of that
  many threads, and refuses, rather than queues, the excess). A refused caller is told when to
  retry; a real proxy retries every few seconds anyway, so a node restart storm behind one NAT
  address is slowed, not lost. The bucket map is bounded (`max_sources`, least recently seen
  evicted: an evicted source starts with a full bucket again, which the in-flight cap still bounds).

No cache of the API servers' answers: a reused answer is stale both ways (a deleted pod's token
would still be accepted for the cache's lifetime, a token refused by a skewed API-server clock
still refused after it is fixed), and the two bounds above already cap what a flood costs the API
server (`max_in_flight` reviews at once, and `burst` then `rate_per_s` per source address).

Invariants: `in_flight` equals admitted minus released; the bucket map never exceeds `max_sources`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

BOOTSTRAP_RATE_PER_S = 5.0        # per source address: a proxy retries every <= 2 s
BOOTSTRAP_BURST = 20              # a few proxies behind one address bootstrapping together
BOOTSTRAP_MAX_IN_FLIGHT = 8       # checks at once, all sources (the adapter's executor threads)
BOOTSTRAP_MAX_SOURCES = 4096


@dataclass
class BootstrapAdmission:
    """May a bootstrap check from `source` start now? (Not thread-safe: the adapter calls it on its
    event loop.)"""

    rate_per_s: float = BOOTSTRAP_RATE_PER_S
    burst: float = BOOTSTRAP_BURST
    max_in_flight: int = BOOTSTRAP_MAX_IN_FLIGHT
    max_sources: int = BOOTSTRAP_MAX_SOURCES
    in_flight: int = 0
    refused: int = 0
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)  # source -> (tokens, at_s)

    def admit(self, source: str, now_s: float) -> str:
        """"" when the check may start (the caller must `release` it), else why not and when to retry."""
        if self.in_flight >= self.max_in_flight:
            self.refused += 1
            return (f"the controller is checking {self.in_flight} bootstrap credentials already; retry in a "
                    "second")
        tokens, at_s = self._buckets.pop(source, (self.burst, now_s))
        tokens = min(self.burst, tokens + max(0.0, now_s - at_s) * self.rate_per_s)
        admitted = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if admitted else tokens, now_s)   # now the most recently seen
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        if not admitted:
            self.refused += 1
            return (f"too many bootstrap requests from {source} (at most {self.rate_per_s:g} a second); retry in "
                    f"{(1.0 - tokens) / self.rate_per_s:.1f} s")
        self.in_flight += 1
        return ""

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    @property
    def sources(self) -> int:
        return len(self._buckets)
