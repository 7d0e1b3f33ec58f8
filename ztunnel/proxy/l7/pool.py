"""DestinationRule connectionPool limits as explicit accounting, one budget per service. Pure.

Envoy's circuit breakers, per upstream cluster and proxy, with Istio's names:

- `tcp.maxConnections`: connections open to the service's backends at once. A request that needs a
  new connection when the limit is reached waits for one to be released (HTTP/1.1: one request per
  connection at a time);
- `http.http1MaxPendingRequests`: how many requests may wait; one more is refused at once with 503
  (Envoy's `upstream_rq_pending_overflow`, flagged `x-envoy-overloaded: true`);
- `http.maxRequestsPerConnection`: a connection that served that many requests is closed instead
  of going back to the idle list (0 or unset: no limit).

Unset limits are unlimited (Istio sets Envoy's to 2^32 − 1). The waiting itself (futures, timers)
is the proxy's; this class only decides, so the rules are testable without an event loop.

Invariants: 0 <= active; active <= max_connections while a limit is set (a grant is given only under
it); `pending` counts requests that were told to wait and have not been granted or given up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ztunnel.api.config import ConnectionPoolPolicy


class Admission(str, Enum):
    OPEN = "open"          # open a new connection now (counted)
    WAIT = "wait"          # queue until a connection is released
    OVERFLOW = "overflow"  # refuse: too many already waiting


@dataclass(slots=True)
class UpstreamBudget:
    policy: ConnectionPoolPolicy = field(default_factory=ConnectionPoolPolicy)
    active: int = 0
    pending: int = 0
    overflows: int = 0

    def admit(self) -> Admission:
        """A request needs a new connection (no idle one to reuse)."""
        cap = self.policy.max_connections
        if cap is None or self.active < cap:
            self.active += 1
            return Admission.OPEN
        limit = self.policy.http1_max_pending_requests
        if limit is not None and self.pending >= limit:
            self.overflows += 1
            return Admission.OVERFLOW
        self.pending += 1
        return Admission.WAIT

    def granted(self) -> None:
        """A waiting request got a connection slot (one released, or freed for it)."""
        self.pending -= 1
        self.active += 1

    def handed_idle(self) -> None:
        """A waiting request got a connection another request just finished with (no new one)."""
        self.pending -= 1

    def gave_up(self) -> None:
        """A waiting request stopped waiting (timeout, cancelled)."""
        self.pending -= 1

    def released(self) -> None:
        """A connection closed (its slot may go to a waiting request: the proxy calls `granted`)."""
        self.active = max(0, self.active - 1)

    def reusable(self, requests_served: int) -> bool:
        """May a connection that served `requests_served` requests serve another?"""
        cap = self.policy.max_requests_per_connection
        return not cap or requests_served < cap
