"""Health aggregation: the proxies' local outlier verdicts in, one verdict per endpoint out.

Every proxy (node proxies, gateways, waypoints, ingresses) runs Envoy-style outlier detection on
what it dials (`ztunnel.api.outlier`; at L7 on HTTP status too) and reports, per (service,
endpoint), whether it currently ejects it (`EndpointReport`). One proxy's view is local: it knows only the endpoints it used, and a confused,
partitioned or compromised proxy (or whoever holds its credentials) must not eject for the whole
mesh. The vote here turns those local views into a global one:

- only an *observer* votes: a proxy whose rendered config routes to the endpoint (`observable`;
  `set_view`, fed by the reconciler with what it rendered for that proxy). A report on anything else is dropped and
  counted (`ignored_reports`): a proxy cannot vote on endpoints it never routes to;
- an endpoint is globally unhealthy when at least `quorum_fraction` of the observers that reported
  on it within `report_ttl_s` eject it, and at least `min_observers` of them do — or every
  observer there is, when fewer than `min_observers` proxies route to it at all (then there is no
  second opinion to be had: the only proxy that uses it is the only one it could hurt). With the
  default of 2, a single proxy never ejects an endpoint that another proxy also routes to;
- the vote is per layer. Node proxies and gateways (L4) see connections; waypoints and ingress
  gateways (L7) see HTTP status too. A 503-answering pod accepts every connection, so L4 observers
  answering "healthy" must not outvote an L7 ejection, nor be needed to confirm it: each layer
  decides among its own fresh observers, by the rule above, and either layer's quorum ejects;
- what a waypoint's vote means: "the requests I forward to this endpoint fail" — a vote on the
  endpoints it sends requests to (`l7_reach`: the services it is the waypoint of and its routes'
  Service backends; for an ingress, its routes' backends), not on everything its config carries.
  A cluster's L7 proxies share its service table, so counting config membership made every
  waypoint and ingress of a cluster an observer of every endpoint there: two observers needed, one
  (the waypoint in the path) able to see, and a 5xx ejection never reached the engine. With one
  waypoint per namespace and cluster, that waypoint is usually the endpoint's only L7 observer and
  decides alone — by the same rule as the only node proxy that routes to an endpoint: all of that
  service's traffic from its cluster already depends on it. Where several L7 proxies send to the
  same endpoint (a waypoint and an ingress routing to one backend, or waypoints of two namespaces),
  one of them alone still cannot eject it: it takes the quorum of those that can see it;
- a report older than `report_ttl_s` no longer counts; an endpoint nobody reported on within the
  TTL is forgotten (healthy), so a proxy that goes away cannot pin an ejection;
- `describe` gives the vote in words: the trigger of the ejection events.

Bounded state: votes exist only for (endpoint, observer) pairs that are in some rendered config,
one entry each (the latest report, with the failures reported while it stayed fresh); a view that
shrinks or a proxy that leaves the render drops its votes at once, and expired votes are pruned by
`unhealthy`. Nothing grows with the number or size of reports a peer sends.

The verdict is an input of the failover engine (`FailoverEngine.apply_health_verdict`), the one
place ejection state lives; this module decides nothing about routing. Pure: `now_s` is passed
in, nothing reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from ztunnel.api.config import ProxyConfig
from ztunnel.api.identity import ProxyId


@lru_cache(maxsize=65_536)
def is_l7_proxy(proxy_id: str) -> bool:
    """A waypoint or ingress: it sees HTTP status codes; node proxies and gateways see connections.
    (Asked per proxy on every render and vote: parsing the id costs ~5 µs, the cache hit 0.1.
    The ids are the rendered proxies'; bounded all the same.)"""
    try:
        return ProxyId.parse(proxy_id).kind in ("waypoint", "ingress")
    except ValueError:
        return False

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


@dataclass(slots=True)
class Vote:
    """An observer's latest word on one endpoint: does it eject it, when it said so, and how many
    failed requests it reported while its vote stayed fresh."""

    ejected: bool
    at_s: float
    failed: int = 0

    def fresh(self, now_s: float, ttl_s: float) -> bool:
        return now_s - self.at_s <= ttl_s


def observable(config: ProxyConfig) -> frozenset[HealthKey]:
    """The (service, endpoint) keys a proxy may vote on: every endpoint its traffic can reach, healthy
    or not (an ejected endpoint stays in the config, so its observers can clear it). A node proxy or
    a gateway dials any endpoint of its config; an L7 proxy only those of `l7_reach`."""
    services = config.services
    if is_l7_proxy(config.proxy_id):
        reach = l7_reach(config)
        services = tuple(s for s in services if s.hostname in reach)
    return frozenset((s.hostname, e.workload_uid) for s in services for e in s.endpoints)


def l7_reach(config: ProxyConfig) -> frozenset[str]:
    """The service hostnames a waypoint or ingress sends requests to. Its config carries its
    cluster's whole service table (it shares the node proxies' rendered views), but requests reach a
    waypoint only for the services that name it as their waypoint, and leave either for those or
    for the Service backends of its routes; an ingress fronts nothing and sends only to its routes'
    backends. Counting the rest as observed would make every L7 proxy of a cluster an observer of
    every endpoint there, none of which but the one in the path could ever see it fail."""
    pid = ProxyId.parse(config.proxy_id)
    fronted = {s.hostname for s in config.services if pid.kind == "waypoint" and s.waypoint is not None
               and (s.waypoint.namespace, s.waypoint.name) == (pid.namespace, pid.name)}
    backends = {b.target for r in config.http_routes for rule in r.rules for b in rule.backends if b.kind == "Service"}
    return frozenset(fronted | backends)


@dataclass
class HealthAggregator:
    """The vote. Invariants: `views[key]` holds the latest `Vote` of each observer of `key`, and only
    of proxies whose view (`set_view`) contains `key`; entries older than `report_ttl_s` are pruned
    whenever `unhealthy` runs; `observers[key]` is the set of proxies whose view contains `key`."""

    quorum_fraction: float = 0.5
    min_observers: int = 2
    report_ttl_s: float = 30.0
    # (service, endpoint) -> observer proxy id -> its latest vote
    views: dict[HealthKey, dict[str, Vote]] = field(default_factory=dict)
    # proxy id -> the keys its rendered config routes to; and the inverse index
    proxy_views: dict[str, frozenset[HealthKey]] = field(default_factory=dict)
    observers: dict[HealthKey, set[str]] = field(default_factory=dict)
    ignored_reports: int = 0   # reports on endpoints outside the reporter's view (dropped)
    _last_pair: tuple[frozenset[HealthKey], frozenset[HealthKey], frozenset[HealthKey], frozenset[HealthKey]] | None = field(
        default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.quorum_fraction <= 1.0:
            raise ValueError(f"quorum_fraction {self.quorum_fraction} must be in (0, 1]")
        if self.min_observers < 1:
            raise ValueError(f"min_observers {self.min_observers} must be at least 1")

    # --- who may vote -------------------------------------------------------------------------

    def set_view(self, proxy_id: str, keys: Iterable[HealthKey]) -> None:
        """`proxy_id`'s rendered config now routes to `keys`: it may vote on them and nothing else;
        its votes on keys it no longer routes to are dropped."""
        new = frozenset(keys)   # (the same object when `keys` is a frozenset)
        old = self.proxy_views.get(proxy_id, frozenset())
        if new is old:
            return
        gone, added = self._difference(old, new)
        if not gone and not added:
            return
        for key in gone:
            self._unobserve(proxy_id, key)
        for key in added:
            self.observers.setdefault(key, set()).add(proxy_id)
        if new:
            self.proxy_views[proxy_id] = new
        else:
            self.proxy_views.pop(proxy_id, None)

    def _difference(self, old: frozenset[HealthKey],
                    new: frozenset[HealthKey]) -> tuple[frozenset[HealthKey], frozenset[HealthKey]]:
        """(old - new, new - old), remembered for the last pair: proxies sharing a view hand in the
        same two sets one after the other (after a commit, every view is a new set)."""
        last = self._last_pair
        if last is not None and last[0] is old and last[1] is new:
            return last[2], last[3]
        gone, added = old - new, new - old
        self._last_pair = (old, new, gone, added)
        return gone, added

    def forget_proxy(self, proxy_id: str) -> None:
        """The proxy left the render: it observes nothing any more."""
        self.set_view(proxy_id, ())

    def _unobserve(self, proxy_id: str, key: HealthKey) -> None:
        obs = self.observers.get(key)
        if obs is not None:
            obs.discard(proxy_id)
            if not obs:
                del self.observers[key]
        votes = self.views.get(key)
        if votes is not None:
            votes.pop(proxy_id, None)
            if not votes:
                del self.views[key]

    # --- the vote -----------------------------------------------------------------------------

    def report(self, proxy_id: str, reports: Sequence[EndpointReport], now_s: float) -> set[HealthKey]:
        """Record `proxy_id`'s reports; returns the keys whose vote it touched. Reports on keys
        outside its view are dropped (`ignored_reports`)."""
        view = self.proxy_views.get(proxy_id, frozenset())
        touched: set[HealthKey] = set()
        for o in reports:
            key = (o.service, o.endpoint)
            if key not in view:
                self.ignored_reports += 1
                continue
            votes = self.views.setdefault(key, {})
            prev = votes.get(proxy_id)
            failed = max(0, o.failed)
            if prev is not None and prev.fresh(now_s, self.report_ttl_s):
                failed += prev.failed
            votes[proxy_id] = Vote(o.ejected, now_s, failed)
            touched.add(key)
        return touched

    def needed(self, key: HealthKey, l7: bool) -> int:
        """How many observers of one layer (`l7`: waypoints and ingresses; else node proxies and
        gateways) must eject `key`: `min_observers`, or every observer of that layer there is when
        fewer route to it (at least one)."""
        n = sum(1 for p in self.observers.get(key, ()) if is_l7_proxy(p) == l7)
        return max(1, min(self.min_observers, n))

    def _fresh(self, key: HealthKey, now_s: float) -> dict[str, Vote]:
        return {p: v for p, v in self.views.get(key, {}).items() if v.fresh(now_s, self.report_ttl_s)}

    def _ejects(self, key: HealthKey, fresh: Mapping[str, Vote]) -> bool:
        """The vote, per layer: a waypoint sees HTTP 5xx that node proxies and gateways (L4) cannot,
        so L4 observers answering "healthy" must not outvote it, nor be needed to confirm it; each
        layer's observers decide among themselves, by the same quorum rule."""
        for l7 in (False, True):
            layer = [v for p, v in fresh.items() if is_l7_proxy(p) == l7]
            ejecting = sum(1 for v in layer if v.ejected)
            if ejecting and ejecting >= self.needed(key, l7) and ejecting >= self.quorum_fraction * len(layer):
                return True
        return False

    def unhealthy(self, now_s: float) -> frozenset[HealthKey]:
        out = set()
        for key, votes in list(self.views.items()):
            fresh = {p: v for p, v in votes.items() if v.fresh(now_s, self.report_ttl_s)}
            if not fresh:
                del self.views[key]
                continue
            self.views[key] = fresh
            if self._ejects(key, fresh):
                out.add(key)
        return frozenset(out)

    def unhealthy_among(self, keys: Iterable[HealthKey], now_s: float) -> frozenset[HealthKey]:
        """`unhealthy(now_s)` restricted to `keys` (no pruning): what one report may have changed."""
        return frozenset(k for k in keys if self._ejects(k, self._fresh(k, now_s)))

    def describe(self, key: HealthKey, now_s: float) -> str:
        """Why `key` is (or is not) globally unhealthy: the vote, for the failover history. With L7
        votes, each layer's count and threshold (they decide separately)."""
        fresh = self._fresh(key, now_s)
        failed = sum(v.failed for v in fresh.values())
        layers = [[v for p, v in fresh.items() if is_l7_proxy(p) == l7] for l7 in (False, True)]
        l4, l7 = layers
        if not l7:
            counted = (f"{sum(v.ejected for v in l4)} of {len(l4)} proxies observing {key[1]} eject it "
                       f"(quorum {self.quorum_fraction:.0%}, at least {self.needed(key, False)}")
        else:
            counted = (f"{sum(v.ejected for v in l4)} of {len(l4)} L4 proxies and {sum(v.ejected for v in l7)} of "
                       f"{len(l7)} L7 proxies (waypoints, ingresses) observing {key[1]} eject it (each layer by "
                       f"itself: quorum {self.quorum_fraction:.0%}, at least {self.needed(key, False)} and "
                       f"{self.needed(key, True)}")
        return f"health reports: {counted}; {failed} failed requests reported)"

    def verdict(self, now_s: float, also: Iterable[HealthKey] = ()) -> HealthVerdict:
        """`unhealthy(now_s)` with the vote described for each unhealthy key and for `also` (e.g.
        the previous verdict's keys: an endpoint the quorum no longer ejects needs its trigger too)."""
        unhealthy = self.unhealthy(now_s)
        return HealthVerdict(unhealthy, {k: self.describe(k, now_s) for k in unhealthy.union(also)})

    def counters(self) -> dict[str, int]:
        """Sizes and drops, for status: the state is bounded by the rendered views."""
        return {"health_votes": sum(len(v) for v in self.views.values()),
                "health_observed_endpoints": len(self.observers),
                "health_reports_ignored": self.ignored_reports}
