"""Health aggregation: the proxies' local outlier verdicts in, one verdict per endpoint out.

Every node proxy and gateway runs Envoy-style outlier detection on what it dials
(`ztunnel.api.outlier`) and reports, per (service, endpoint), whether it currently ejects it
(`EndpointReport`). One proxy's view is local: it knows only the endpoints it used, and a confused
or partitioned proxy must not eject for the whole mesh. The vote here turns those local views
into a global one:

- an endpoint is globally unhealthy when at least `quorum_fraction` of the observers that reported
  on it within `report_ttl_s` eject it, and at least `min_observers` of them do;
- a report older than `report_ttl_s` no longer counts; an endpoint nobody reported on within the
  TTL is forgotten (healthy), so a proxy that goes away cannot pin an ejection;
- `describe` gives the vote in words: the trigger of the ejection events.

The verdict is an input of the failover engine (`FailoverEngine.apply_health_verdict`), the one
place ejection state lives; this module decides nothing about routing. Pure: `now_s` is passed
in, nothing reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

HealthKey = tuple[str, str]   # (service hostname, workload uid: a pod, or `<cluster>/<ns>/<svc>@gateway`)


@dataclass(frozen=True, slots=True)
class EndpointReport:
    """One proxy's report on one endpoint of one service."""

    service: str        # hostname
    endpoint: str       # workload uid
    cluster: str
    ok: int
    failed: int
    ejected: bool


@dataclass(frozen=True, slots=True)
class HealthVerdict:
    """What the vote says at one instant: the endpoints a quorum ejects, and why, in words, for
    every key asked about (the unhealthy ones and any others the caller named)."""

    unhealthy: frozenset[HealthKey]
    triggers: Mapping[HealthKey, str] = field(default_factory=dict)


@dataclass
class HealthAggregator:
    """The vote. Invariant: `views` holds, per (service, endpoint), the latest report of each
    observer; entries older than `report_ttl_s` are pruned whenever `unhealthy` runs."""

    quorum_fraction: float = 0.5
    min_observers: int = 1
    report_ttl_s: float = 30.0
    # (service, endpoint) -> observer proxy id -> (ejected, reported_at_s)
    views: dict[HealthKey, dict[str, tuple[bool, float]]] = field(default_factory=dict)
    totals: dict[HealthKey, list[int]] = field(default_factory=dict)  # [ok, failed]

    def report(self, proxy_id: str, reports: Sequence[EndpointReport], now_s: float) -> None:
        for o in reports:
            key = (o.service, o.endpoint)
            self.views.setdefault(key, {})[proxy_id] = (o.ejected, now_s)
            t = self.totals.setdefault(key, [0, 0])
            t[0] += o.ok
            t[1] += o.failed

    def unhealthy(self, now_s: float) -> frozenset[HealthKey]:
        out = set()
        for key, observers in list(self.views.items()):
            fresh = {p: v for p, v in observers.items() if now_s - v[1] <= self.report_ttl_s}
            if not fresh:
                del self.views[key]
                continue
            self.views[key] = fresh
            ejecting = sum(1 for ej, _ in fresh.values() if ej)
            if ejecting >= self.min_observers and ejecting >= self.quorum_fraction * len(fresh):
                out.add(key)
        return frozenset(out)

    def describe(self, key: HealthKey, now_s: float) -> str:
        """Why `key` is (or is not) globally unhealthy: the vote, for the failover history."""
        fresh = [ej for ej, at in self.views.get(key, {}).values() if now_s - at <= self.report_ttl_s]
        failed = self.totals.get(key, [0, 0])[1]
        return (f"health reports: {sum(fresh)} of {len(fresh)} proxies observing {key[1]} eject it "
                f"(quorum {self.quorum_fraction:.0%}, at least {self.min_observers}; {failed} failed requests "
                f"reported)")

    def verdict(self, now_s: float, also: Iterable[HealthKey] = ()) -> HealthVerdict:
        """`unhealthy(now_s)` with the vote described for each unhealthy key and for `also` (e.g.
        the previous verdict's keys: an endpoint the quorum no longer ejects needs its trigger too)."""
        unhealthy = self.unhealthy(now_s)
        return HealthVerdict(unhealthy, {k: self.describe(k, now_s) for k in unhealthy.union(also)})
