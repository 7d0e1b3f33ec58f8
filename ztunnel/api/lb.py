"""Priority load balancing with Envoy's semantics: how much traffic each tier gets, and which
endpoint a connection goes to. Pure and deterministic: randomness comes in as a float in [0, 1).

Used by the data plane (a ztunnel picks a backend per connection, retries a failed connect on
another endpoint) and by the controller (explain, failover events) so both agree on the numbers.

Envoy's priority load (docs: "Priority levels", "Panic threshold"; source: `LoadBalancerBase::
recalculatePerPriorityState`):

1. health of tier i = min(100, overprovisioning_factor × 100 × healthy_i / total_i) (0 if empty).
2. normalized total health = min(100, Σ health_i). If it is 0 nothing is available (see 5).
3. tier loads are handed out in priority order: load_i = min(what is left of 100,
   health_i × 100 / normalized total). So when tier 0 is half healthy its health is 70 and it keeps
   70 %; the other 30 % spill to tier 1. When the sum of health is below 100 the loads are scaled
   up so that they still add up to 100 %.
4. panic, per tier: only while the normalized total is below 100, a tier whose *raw* healthy
   percentage is below the panic threshold is "in panic" and spreads its load over all its hosts,
   healthy or not. If every tier is in panic, load is split by host count over all hosts.
5. nothing healthy anywhere: with panic disabled (threshold 0) tier 0 gets 100 % and no host can be
   selected (Envoy's corner case); otherwise every tier is in panic (rule 4).

Envoy uses integer percentages; we use floats, so the loads add up to 1 up to rounding (the
remainder goes to the first tier that has health, as in Envoy). Istio maps a DestinationRule's
`outlierDetection.minHealthPercent` to the panic threshold (0 = panic disabled).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

DEFAULT_OVERPROVISIONING_FACTOR = 1.4
DEFAULT_PANIC_THRESHOLD_PCT = 50.0


class LbEndpoint(Protocol):
    """What the picker needs of an endpoint (`ztunnel.api.config.Endpoint` fits)."""

    @property
    def workload_uid(self) -> str: ...
    @property
    def tier(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def healthy(self) -> bool: ...


E = TypeVar("E", bound=LbEndpoint)


@dataclass(frozen=True, slots=True)
class TierHealth:
    healthy: int
    total: int

    def __post_init__(self) -> None:
        if not 0 <= self.healthy <= self.total:
            raise ValueError(f"TierHealth needs 0 <= healthy <= total, got {self.healthy}/{self.total}")


@dataclass(frozen=True, slots=True)
class PriorityLoad:
    shares: tuple[float, ...]       # fraction of traffic per tier, sums to 1 (when there are tiers)
    panic: tuple[bool, ...]         # tier routes to all its hosts regardless of health
    health_pct: tuple[float, ...]   # overprovisioned health per tier, 0..100
    total_health_pct: float         # normalized total health, 0..100
    total_panic: bool               # every tier in panic: shares follow host counts

    @property
    def any_panic(self) -> bool:
        return any(self.panic)


def priority_load(tiers: Sequence[TierHealth],
                  overprovisioning_factor: float = DEFAULT_OVERPROVISIONING_FACTOR,
                  panic_threshold_pct: float = DEFAULT_PANIC_THRESHOLD_PCT) -> PriorityLoad:
    n = len(tiers)
    if n == 0:
        return PriorityLoad((), (), (), 0.0, False)
    health = tuple(
        min(100.0, overprovisioning_factor * 100.0 * t.healthy / t.total) if t.total else 0.0 for t in tiers
    )
    total_avail = min(100.0, sum(health))
    if total_avail <= 0.0:
        if panic_threshold_pct <= 0:
            return PriorityLoad((1.0,) + (0.0,) * (n - 1), (False,) * n, health, 0.0, False)
        return _total_panic(tiers, health)
    loads: list[float] = []
    left = 100.0
    for h in health:
        load = min(left, h * 100.0 / total_avail)
        loads.append(load)
        left -= load
    first_available = next(i for i, h in enumerate(health) if h > 0)
    loads[first_available] += left
    if total_avail >= 100.0:
        panic = (False,) * n
    else:
        panic = tuple(
            (100.0 * t.healthy / t.total if t.total else 0.0) < panic_threshold_pct for t in tiers
        )
    if all(panic):
        return _total_panic(tiers, health)
    return PriorityLoad(tuple(x / 100.0 for x in loads), panic, health, total_avail, False)


def _total_panic(tiers: Sequence[TierHealth], health: tuple[float, ...]) -> PriorityLoad:
    n = len(tiers)
    hosts = sum(t.total for t in tiers)
    if hosts == 0:
        return PriorityLoad((1.0,) + (0.0,) * (n - 1), (True,) * n, health, 0.0, True)
    shares = [t.total / hosts for t in tiers]
    first = next(i for i, t in enumerate(tiers) if t.total)
    shares[first] += 1.0 - sum(shares)
    return PriorityLoad(tuple(shares), (True,) * n, health, min(100.0, sum(health)), True)


def priority_shares(tiers: Sequence[TierHealth],
                    overprovisioning_factor: float = DEFAULT_OVERPROVISIONING_FACTOR,
                    panic_threshold_pct: float = DEFAULT_PANIC_THRESHOLD_PCT) -> list[float]:
    """Fraction of traffic per tier (Envoy's healthy priority load), summing to 1."""
    return list(priority_load(tiers, overprovisioning_factor, panic_threshold_pct).shares)


def tier_health(endpoints: Sequence[LbEndpoint], ejected_keys: Collection[str] = frozenset(),
                exclude: Collection[str] = frozenset()) -> list[TierHealth]:
    """Healthy/total per tier 0..max tier. Excluded endpoints leave the pool altogether (a retry
    must not count a host it just failed on); ejected or controller-unhealthy ones stay in `total`."""
    if not endpoints:
        return []
    n = max(e.tier for e in endpoints) + 1
    healthy = [0] * n
    total = [0] * n
    for e in endpoints:
        if e.workload_uid in exclude:
            continue
        total[e.tier] += 1
        if e.healthy and e.workload_uid not in ejected_keys:
            healthy[e.tier] += 1
    return [TierHealth(h, t) for h, t in zip(healthy, total, strict=True)]


def _weighted(candidates: Sequence[E], r: float) -> E:
    weights = [max(0, e.weight) for e in candidates]
    total = sum(weights)
    if total <= 0:
        return candidates[min(len(candidates) - 1, int(r * len(candidates)))]
    target = r * total
    acc = 0
    for e, w in zip(candidates, weights, strict=True):
        acc += w
        if target < acc:
            return e
    return candidates[-1]


def pick_endpoint(endpoints: Sequence[E], shares: Sequence[float], ejected_keys: Collection[str],
                  rand: float, panic: Sequence[bool] = (),
                  exclude: Collection[str] = frozenset()) -> E | None:
    """Pick one endpoint: the tier by `shares` (cumulative, using `rand`), then an endpoint in it
    by weight (using what is left of `rand`). A tier in panic picks among all its hosts; otherwise
    only healthy, non-ejected ones. If the chosen tier has no candidate (stale shares) the next tiers
    are tried in order, then the earlier ones. None when nothing can be picked."""
    if not endpoints or not shares:
        return None
    r = min(max(rand, 0.0), 1.0 - 1e-12)
    n = len(shares)
    chosen, cum = n - 1, 0.0
    for i, s in enumerate(shares):
        if s > 0 and r < cum + s:
            chosen = i
            break
        cum += s
    share = shares[chosen]
    r_in = (r - cum) / share if share > 0 else r
    r_in = min(max(r_in, 0.0), 1.0 - 1e-12)
    by_tier: dict[int, list[E]] = {}
    for e in endpoints:
        if e.workload_uid not in exclude:
            by_tier.setdefault(e.tier, []).append(e)
    order = list(range(chosen, n)) + list(range(chosen))
    for t in order:
        members = by_tier.get(t, [])
        in_panic = t < len(panic) and panic[t]
        candidates = members if in_panic else [e for e in members if e.healthy and e.workload_uid not in ejected_keys]
        if candidates:
            return _weighted(candidates, r_in)
    return None


def choose_endpoint(endpoints: Sequence[E], ejected_keys: Collection[str], rand: float,
                    exclude: Collection[str] = frozenset(),
                    overprovisioning_factor: float = DEFAULT_OVERPROVISIONING_FACTOR,
                    panic_threshold_pct: float = DEFAULT_PANIC_THRESHOLD_PCT) -> E | None:
    """Compute the tier loads from the endpoints' health and pick one, leaving out `exclude`
    (hosts a connect retry already failed on): the retry lands on another endpoint of the same tier
    while it has healthy ones, and spills to the next tier as the tier runs out."""
    load = priority_load(tier_health(endpoints, ejected_keys, exclude), overprovisioning_factor,
                         panic_threshold_pct)
    return pick_endpoint(endpoints, load.shares, ejected_keys, rand, load.panic, exclude)


# The brief's name for the retry helper.
pick_with_exclusions = choose_endpoint
