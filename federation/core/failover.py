"""The failover engine: priority tiers per (client locality, service), the one ejection state (fed by
the proxies' health verdict), partition policy with fencing, and the events that explain every
decision.

Tiers (Istio/Envoy semantics). For a client in locality `source` and a service with policy P:

- `failoverPriority: [l1, …, ln]` — an endpoint's raw priority is n − (number of leading labels on
  which it matches the client). The well-known labels are `topology.istio.io/network`,
  `topology.istio.io/cluster`, `topology.kubernetes.io/region`, `topology.kubernetes.io/zone`; any
  other label is compared between the endpoint's pod labels and the client node's labels; a
  `label=value` entry matches endpoints whose label has that value (Istio's override form).
- `failover: [{from, to}]` (or locality LB enabled with no mode) — Istio's locality priorities:
  0 same region and zone, 1 same region, 2 the `to` region of the rule for the client's region,
  3 everything else.
- `distribute` — everything in tier 0, weighted by the rule matching the client's locality;
  localities the rule does not name get no traffic (they are left out).
- no locality LB, locality LB disabled, or no outlier detection — one tier (Istio applies locality
  failover only with outlierDetection: nothing would ever be ejected otherwise).
Raw priorities are renumbered densely from 0 in each view (`ztunnel.api.config` invariant).

Views. A view is the endpoint list a client locality gets for one service. Endpoints in the
client's network are listed pod by pod (dialled through the destination node's ztunnel); endpoints
in another network are reached through that network's east-west gateway (double HBONE, the gateway
picks the pod), so each remote cluster appears as one aggregate endpoint
`<cluster>/<namespace>/<service>@gateway` whose weight is its number of healthy pods (its
capacity) and which is healthy while any of them is. Endpoints whose cluster the client does not
trust (see `trust_graph`), remote clusters without a gateway and withdrawn clusters are left out.

Health = ready ∧ not ejected. The engine is the one place ejection state lives: the proxies'
outlier detectors vote (`federation.core.health`), and the verdict comes in through
`apply_health_verdict`, which ejects and unejects endpoints here (reason `HealthReportQuorum`) and
says so in events with the service's provenance. An ejected endpoint counts as unhealthy in tier
health exactly as a not-ready one does, so a silent cut (pods stay ready, every connection times
out) fails over and back like a crash. Shares per tier come from `ztunnel.api.lb.priority_load`
(overprovisioning 1.4; panic threshold = the DestinationRule's `minHealthPercent` when outlier
detection is configured, as Istio sets it, Envoy's 50 otherwise).

Partition policy, per cluster, as an explicit state machine (see `LeaseState`):
LIVE —lease expired→ EXPIRED —partial observation→ FENCED —complete observation→ LIVE
(EXPIRED —complete observation→ LIVE; FENCED —lease expired→ EXPIRED). While not LIVE, a
Withdraw policy removes the cluster's endpoints from every view; Freeze keeps the last observed
ones. Either way partial observations are not applied while fenced: a recovered cluster's
endpoints come back only with a fresh complete observation (so a stale half-view never routes).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from clusters.kube.observation import ClusterObservation
from federation.core.events import (
    ClusterFenced,
    ClusterLeaseExpired,
    ClusterRecovered,
    CoreEvent,
    EndpointEjected,
    EndpointUnejected,
    FailedBack,
    FailedOver,
    Provenance,
)
from federation.core.graph import EndpointGraph, EndpointNode, GraphChange, gateway_identity
from federation.core.health import HealthKey
from federation.core.trust_graph import TrustGraph
from gitops.model import (
    ConfigSnapshot,
    LocalityLbSetting,
    OutlierDetection,
    PartitionMode,
    ServiceKey,
)
from gitops.problems import SourcePos
from ztunnel.api.config import ConnectionPoolPolicy, Endpoint, OutlierPolicy
from ztunnel.api.lb import PriorityLoad, TierHealth, priority_load

LABEL_NETWORK = "topology.istio.io/network"
LABEL_CLUSTER = "topology.istio.io/cluster"
LABEL_REGION = "topology.kubernetes.io/region"
LABEL_ZONE = "topology.kubernetes.io/zone"
TOPOLOGY_LABELS = (LABEL_NETWORK, LABEL_CLUSTER, LABEL_REGION, LABEL_ZONE)
DEFAULT_CONNECT_TIMEOUT_S = 1.0
ENVOY_PANIC_THRESHOLD_PCT = 50.0
DISTRIBUTE_WEIGHT_SCALE = 1000


class TierMode(str, Enum):
    FLAT = "Flat"
    FAILOVER_PRIORITY = "FailoverPriority"
    LOCALITY_FAILOVER = "LocalityFailover"
    DISTRIBUTE = "Distribute"


# --- policy -------------------------------------------------------------------------------------


def outlier_policy(od: OutlierDetection) -> OutlierPolicy:
    return OutlierPolicy(
        consecutive_5xx_errors=od.consecutive_5xx_errors,
        consecutive_gateway_errors=od.consecutive_gateway_errors,
        consecutive_local_origin_failures=od.consecutive_local_origin_failures,
        split_external_local_origin_errors=od.split_external_local_origin_errors,
        interval_s=od.interval_s,
        base_ejection_time_s=od.base_ejection_time_s,
        max_ejection_time_s=od.max_ejection_time_s,
        max_ejection_percent=od.max_ejection_percent,
        min_health_percent=od.min_health_percent,
    )


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """The effective traffic policy of one service, resolved once per fleet revision."""

    key: ServiceKey
    hostname: str
    mode: TierMode
    locality: LocalityLbSetting | None
    outlier: OutlierPolicy | None
    panic_threshold_pct: float
    connect_timeout_s: float
    policy_ref: str          # "DestinationRule shop/checkout" / "GlobalService shop/cart" / "Federation x"
    source: SourcePos | None
    commit: str
    connection_pool: ConnectionPoolPolicy | None = None

    @property
    def signature(self) -> tuple[object, ...]:
        """What tier ranking depends on: equal signatures rank localities identically."""
        loc = self.locality
        if self.mode is TierMode.FLAT:
            return (TierMode.FLAT,)
        if loc is None:
            return (self.mode,)
        distribute = tuple((r.from_locality, tuple(sorted(r.to.items()))) for r in loc.distribute)
        return (self.mode, loc.failover_priority, loc.failover, distribute)

    @property
    def source_text(self) -> str:
        return f"{self.source}@{self.commit[:12]}" if self.source is not None else ""


def resolve_policy(snapshot: ConfigSnapshot, key: ServiceKey) -> ServicePolicy:
    svc = snapshot.services[key]
    tp, pos = snapshot.traffic_policy_for(key)
    if key in snapshot.destination_rules:
        ref = f"DestinationRule {snapshot.destination_rules[key].namespace}/{snapshot.destination_rules[key].name}"
    elif svc.traffic_policy is not None:
        ref = f"GlobalService {key}"
    elif tp is not None:
        ref = f"Federation {snapshot.federation.name}"
    else:
        ref = ""
    od = tp.outlier_detection if tp is not None else None
    loc = tp.locality_lb if tp is not None else None
    outlier = outlier_policy(od) if od is not None else None
    if od is None or (loc is not None and not loc.enabled):
        mode = TierMode.FLAT
    elif loc is not None and loc.failover_priority:
        mode = TierMode.FAILOVER_PRIORITY
    elif loc is not None and loc.distribute:
        mode = TierMode.DISTRIBUTE
    else:
        mode = TierMode.LOCALITY_FAILOVER
    panic = float(od.min_health_percent) if od is not None else ENVOY_PANIC_THRESHOLD_PCT
    timeout = tp.connect_timeout_s if tp is not None and tp.connect_timeout_s is not None else DEFAULT_CONNECT_TIMEOUT_S
    cp = tp.connection_pool if tp is not None else None
    pool = ConnectionPoolPolicy(cp.max_connections, cp.http1_max_pending_requests,
                                cp.max_requests_per_connection) if cp is not None else None
    return ServicePolicy(key, svc.hostname, mode, loc, outlier, panic, timeout, ref, pos, snapshot.revision.sha, pool)


# --- localities and ranking -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Locality:
    network: str
    cluster: str
    region: str
    zone: str
    labels: tuple[tuple[str, str], ...] = ()  # sorted (name, value): only labels a policy compares

    def label(self, name: str) -> str:
        if name == LABEL_NETWORK:
            return self.network
        if name == LABEL_CLUSTER:
            return self.cluster
        if name == LABEL_REGION:
            return self.region
        if name == LABEL_ZONE:
            return self.zone
        for k, v in self.labels:
            if k == name:
                return v
        return ""

    @property
    def class_key(self) -> Locality:
        """Proxies with equal localities get identical views (labels hold only the names some
        policy compares, see `FailoverEngine.relevant_labels`)."""
        return self

    def __str__(self) -> str:
        return f"{self.cluster} ({self.network}, {self.region}/{self.zone})"


def _matches_pattern(pattern: str, loc: Locality) -> bool:
    parts = pattern.split("/")
    for want, have in zip(parts, (loc.region, loc.zone), strict=False):
        if want != "*" and want != have:
            return False
    return True


def _specificity(pattern: str) -> int:
    return sum(1 for p in pattern.split("/") if p != "*")


def raw_priority(policy: ServicePolicy, source: Locality, dest: Locality) -> int | None:
    """The raw (not yet densified) priority of endpoints at `dest` for a client at `source`;
    None = no traffic (a distribute rule does not name that locality)."""
    loc = policy.locality
    if policy.mode is TierMode.FLAT:
        return 0
    if policy.mode is TierMode.FAILOVER_PRIORITY and loc is not None:
        labels = loc.failover_priority
        for i, label in enumerate(labels):
            name, eq, value = label.partition("=")
            matched = dest.label(name) == value if eq else dest.label(name) == source.label(name)
            if not matched:
                return len(labels) - i
        return 0
    if policy.mode is TierMode.LOCALITY_FAILOVER:
        if dest.region == source.region:
            return 0 if dest.zone == source.zone else 1
        targets = {r.to_region for r in (loc.failover if loc is not None else ()) if r.from_region == source.region}
        return 2 if dest.region in targets else 3
    # DISTRIBUTE: tier 0 when some `to` key names the destination locality
    return 0 if distribute_pattern(policy, source, dest) is not None else None


def distribute_pattern(policy: ServicePolicy, source: Locality, dest: Locality) -> tuple[str, int] | None:
    """(`to` key, weight %) of the distribute rule that applies, or None if the rule leaves `dest` out.
    A client no rule matches gets everything with equal weight ("*", 100)."""
    loc = policy.locality
    if loc is None:
        return ("*", 100)
    rule = next((r for r in loc.distribute if _matches_pattern(r.from_locality, source)), None)
    if rule is None:
        return ("*", 100)
    keys = sorted((k for k in rule.to if _matches_pattern(k, dest)), key=lambda k: (-_specificity(k), k))
    if not keys or rule.to[keys[0]] <= 0:
        return None
    return (keys[0], rule.to[keys[0]])


def priority_reason(policy: ServicePolicy, source: Locality, dest: Locality, raw: int | None) -> str:
    """Why `dest` gets priority `raw` for `source`, in words (for explain)."""
    loc = policy.locality
    if raw is None:
        return "no traffic: the distribute rule for this client does not name this locality"
    if policy.mode is TierMode.FLAT:
        if policy.outlier is None:
            return "one tier: no outlierDetection, so no locality failover (Istio)"
        return "one tier: locality load balancing disabled"
    if policy.mode is TierMode.FAILOVER_PRIORITY and loc is not None:
        labels = loc.failover_priority
        matched = labels[:len(labels) - raw]
        parts = [f"matches {', '.join(f'{m.partition(chr(61))[0]}={dest.label(m.partition(chr(61))[0])}' for m in matched)}"] if matched else []
        if raw:
            name, eq, value = labels[len(labels) - raw].partition("=")
            want = value if eq else source.label(name)
            parts.append(f"differs at {name} ({dest.label(name) or '-'} ≠ {want or '-'})")
        return "; ".join(parts)
    if policy.mode is TierMode.LOCALITY_FAILOVER:
        return {0: "same region and zone", 1: f"same region {dest.region}, other zone",
                2: f"failover region {dest.region} for {source.region}",
                3: "any other region"}[raw]
    pat = distribute_pattern(policy, source, dest)
    return f"distribute: {pat[0]} gets {pat[1]}%" if pat else "distribute"


# --- partition state machine ------------------------------------------------------------------


class LeaseState(str, Enum):
    LIVE = "Live"
    EXPIRED = "Expired"
    FENCED = "Fenced"


class LeaseEvent(str, Enum):
    EXPIRE = "expire"
    PARTIAL = "partial"
    COMPLETE = "complete"


_LEASE_TRANSITIONS: dict[tuple[LeaseState, LeaseEvent], LeaseState] = {
    (LeaseState.LIVE, LeaseEvent.EXPIRE): LeaseState.EXPIRED,
    (LeaseState.LIVE, LeaseEvent.PARTIAL): LeaseState.LIVE,
    (LeaseState.LIVE, LeaseEvent.COMPLETE): LeaseState.LIVE,
    (LeaseState.EXPIRED, LeaseEvent.PARTIAL): LeaseState.FENCED,
    (LeaseState.EXPIRED, LeaseEvent.COMPLETE): LeaseState.LIVE,
    (LeaseState.FENCED, LeaseEvent.PARTIAL): LeaseState.FENCED,
    (LeaseState.FENCED, LeaseEvent.COMPLETE): LeaseState.LIVE,
    (LeaseState.FENCED, LeaseEvent.EXPIRE): LeaseState.EXPIRED,
}


class InvalidLeaseTransition(RuntimeError):
    def __init__(self, cluster: str, state: LeaseState, event: LeaseEvent) -> None:
        super().__init__(f"cluster {cluster}: lease cannot go from {state.value} on {event.value}")


def next_lease_state(cluster: str, state: LeaseState, event: LeaseEvent) -> LeaseState:
    try:
        return _LEASE_TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidLeaseTransition(cluster, state, event) from None


@dataclass(slots=True)
class Lease:
    state: LeaseState = LeaseState.LIVE
    last_seen_s: float | None = None
    ever_seen: bool = False


# --- ejections --------------------------------------------------------------------------------


class EjectionReason(str, Enum):
    """Why the engine ejects an endpoint. (One reason today: the controller runs no outlier
    detector of its own; the proxies detect and the quorum of their reports decides.)"""

    HEALTH_REPORT_QUORUM = "HealthReportQuorum"


@dataclass(frozen=True, slots=True)
class Ejection:
    """An endpoint the engine holds ejected: unhealthy in every view until the verdict lifts it."""

    reason: EjectionReason
    since_s: float
    trigger: str          # the vote, in words (`HealthAggregator.describe`)
    count: int            # times this endpoint was ejected (1 = first time), while it stays known


DEFAULT_EJECT_TRIGGER = "health reports: a quorum of proxies ejects {uid}"
DEFAULT_UNEJECT_TRIGGER = "health reports: the quorum no longer ejects {uid}"


# --- views ------------------------------------------------------------------------------------


class Piece(NamedTuple):
    """A part of a view before tiers are densified: one group of same-network pods, or one remote
    cluster behind its gateway. Ordered by (raw, sort_key); sort keys are unique within a view."""

    raw: int
    sort_key: tuple[object, ...]
    via_gateway: bool
    cluster: str
    locality: Locality
    members: tuple[EndpointNode, ...]
    distribute: tuple[str, int] | None
    slot: int  # index of the group in the service's cache (endpoint-tuple cache key)


@dataclass(frozen=True, slots=True)
class ServiceView:
    """What a client locality gets for one service: endpoints with dense tiers, and the shares."""

    hostname: str
    source: Locality
    endpoints: tuple[Endpoint, ...]
    pieces: tuple[Piece, ...]           # for explain: raw priority and members of each endpoint group
    tier_of_piece: tuple[int, ...]
    excluded: tuple[tuple[str, str], ...] = ()  # (cluster, why) left out of the view
    # Equal ids <=> identical endpoint lists (sources with the same view share it); never reused.
    view_id: int = 0

    def tier_health(self) -> list[TierHealth]:
        n = max((e.tier for e in self.endpoints), default=-1) + 1
        healthy = [0] * n
        total = [0] * n
        for e in self.endpoints:
            total[e.tier] += 1
            healthy[e.tier] += e.healthy
        return [TierHealth(h, t) for h, t in zip(healthy, total, strict=True)]

    def load(self, panic_threshold_pct: float) -> PriorityLoad:
        return priority_load(self.tier_health(), panic_threshold_pct=panic_threshold_pct)


# (slot, locality id, locality, members, sort key)
_Group = tuple[int, int, Locality, tuple[EndpointNode, ...], tuple[object, ...]]


@dataclass(slots=True)
class _ClusterEntry:
    cluster: str
    network: str
    direct: list[_Group]
    aggregate: _Group | None  # None: the cluster has no east-west gateway


@dataclass(slots=True)
class _ServiceCache:
    clusters: list[_ClusterEntry] = field(default_factory=list)
    endpoints: dict[tuple[object, ...], tuple[Endpoint, ...]] = field(default_factory=dict)
    views: dict[tuple[tuple[int, int, int], ...], tuple[int, tuple[Endpoint, ...]]] = field(default_factory=dict)
    # the last view per source, with the source's routability it was built for: a commit's
    # failover evaluation and its render ask for the same views (the cache goes with the service's
    # invalidation, and `_sources` is rebuilt when routability changes)
    by_source: dict[Locality, tuple[_SourceInfo, ServiceView]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _SourceInfo:
    source_id: int
    network: str
    usable: frozenset[str]           # clusters this source may be routed to (trusted, not withdrawn)
    why_not: Mapping[str, str]       # the others, and why


class FailoverEngine:
    """Owns the decision state (ejections, leases) and builds views from the graph.

    Invariants:
    - `_ejections` is the one ejection state of the controller: per service hostname of the
      fleet, the endpoints held ejected; an endpoint enters it only while the graph knows it (a
      pod of the service, or a remote cluster's gateway aggregate), so peers' reports cannot grow
      it beyond the graph; it changes only in `apply_health_verdict` (and loses services the
      fleet drops in `set_snapshot`);
    - `dirty` collects services whose views may have changed since the last `take_dirty`;
    - views are a pure function of (graph, trust, policies, ejection state, lease state).
    """

    def __init__(self, snapshot: ConfigSnapshot, graph: EndpointGraph, trust: TrustGraph) -> None:
        self.graph = graph
        self.trust = trust
        self.snapshot = snapshot
        self.policies: dict[ServiceKey, ServicePolicy] = {}
        self._ejections: dict[str, dict[str, Ejection]] = {}     # hostname -> uid -> ejection
        self._ejection_counts: dict[HealthKey, int] = {}
        self._leases: dict[str, Lease] = {c: Lease() for c in graph.clusters}
        self._cache: dict[ServiceKey, _ServiceCache] = {}
        self._rank_tables: dict[tuple[int, int], dict[int, int | None]] = {}
        self._sig_ids: dict[ServiceKey, int] = {}
        self._view_ids = 0
        self._loc_ids: dict[Locality, int] = {}
        self._sources: dict[Locality, _SourceInfo] = {}
        self._last_shares: dict[tuple[str, Locality], tuple[float, ...]] = {}
        self.relevant_labels: frozenset[str] = frozenset()
        self.dirty: set[ServiceKey] = set()
        self.set_snapshot(snapshot, trust)

    # --- configuration ----------------------------------------------------------------------

    def set_snapshot(self, snapshot: ConfigSnapshot, trust: TrustGraph) -> None:
        self.snapshot = snapshot
        self.trust = trust
        self.policies = {k: resolve_policy(snapshot, k) for k in self.graph.services}
        sigs: dict[tuple[object, ...], int] = {}
        self._sig_ids = {k: sigs.setdefault(p.signature, len(sigs)) for k, p in self.policies.items()}
        self.relevant_labels = frozenset(
            lb.partition("=")[0] for p in self.policies.values() if p.locality is not None
            for lb in p.locality.failover_priority if lb.partition("=")[0] not in TOPOLOGY_LABELS)
        live_hosts = {p.hostname for p in self.policies.values()}
        for host in [h for h in self._ejections if h not in live_hosts]:
            del self._ejections[host]  # the service left the fleet: nothing routes to it any more
        for hk in [hk for hk in self._ejection_counts if hk[0] not in live_hosts]:
            del self._ejection_counts[hk]
        for c in self.graph.clusters:
            self._leases.setdefault(c, Lease())
        for c in [c for c in self._leases if c not in self.graph.clusters]:
            del self._leases[c]
        self._cache.clear()
        self._rank_tables.clear()
        self._sources.clear()
        self.dirty.update(self.graph.services)

    def mode(self) -> PartitionMode:
        return self.snapshot.federation.partition.mode

    def _provenance(self, trigger: str, key: ServiceKey | None = None) -> Provenance:
        if key is not None and key in self.policies:
            p = self.policies[key]
            return Provenance(trigger, p.policy_ref, str(p.source) if p.source else "", p.commit)
        fed = self.snapshot.federation
        return Provenance(trigger, f"Federation {fed.name}",
                          str(fed.field_pos.get("spec.partition", fed.pos)), self.snapshot.revision.sha)

    # --- observations and leases --------------------------------------------------------------

    def observe(self, obs: ClusterObservation) -> tuple[GraphChange, list[CoreEvent]]:
        """Apply an observation to the graph, honouring fencing. Returns what changed and events."""
        lease = self._leases.setdefault(obs.cluster, Lease())
        events: list[CoreEvent] = []
        was = lease.state
        lease.state = next_lease_state(obs.cluster, lease.state,
                                       LeaseEvent.COMPLETE if obs.complete else LeaseEvent.PARTIAL)
        lease.last_seen_s = obs.observed_at_s
        lease.ever_seen = True
        if lease.state is not was:
            self._sources.clear()  # routability of this cluster may have changed
        if lease.state is LeaseState.FENCED:
            if was is not LeaseState.FENCED:
                events.append(ClusterFenced(obs.cluster, obs.observed_at_s,
                                            self._provenance(f"partial observation from {obs.cluster}")))
            return GraphChange(), events  # fenced: wait for a complete observation
        change = self.graph.apply_observation(obs)
        if was is not LeaseState.LIVE:
            touched = self._services_in(obs.cluster)
            change = change.merge(GraphChange(services=frozenset(touched)))
            events.append(ClusterRecovered(obs.cluster, obs.observed_at_s,
                                           len(self.graph.cluster_state(obs.cluster).endpoints),
                                           self._provenance(f"complete observation from {obs.cluster}")))
        for key in change.services:
            self._invalidate(key)
        return change, events

    def renew_lease(self, cluster: str, at_s: float) -> None:
        """A heartbeat: the cluster's API answered at `at_s` although nothing changed. Keeps a Live
        lease alive; an Expired or Fenced lease recovers only with a complete observation."""
        lease = self._leases.get(cluster)
        if lease is None or lease.state is not LeaseState.LIVE:
            return
        if lease.last_seen_s is None or at_s > lease.last_seen_s:
            lease.last_seen_s = at_s

    def _services_in(self, cluster: str) -> set[ServiceKey]:
        return {k for k in self.graph.services if self.graph.endpoints_in(k, cluster)}

    def lease_state(self, cluster: str) -> LeaseState:
        return self._leases[cluster].state

    def routable(self, cluster: str) -> bool:
        lease = self._leases.get(cluster)
        if lease is None or lease.state is LeaseState.LIVE:
            return True
        return self.mode() is PartitionMode.FREEZE

    def tick(self, now_s: float) -> list[CoreEvent]:
        """Expire leases at `now_s`. (Ejections do not expire on a timer here: the vote lifts them
        when its reports stop ejecting, or age out after their TTL.)"""
        events: list[CoreEvent] = []
        ttl_s = self.snapshot.federation.partition.lease_ttl_s
        for cluster in sorted(self._leases):
            lease = self._leases[cluster]
            if lease.state is LeaseState.EXPIRED or lease.last_seen_s is None:
                continue
            if now_s - lease.last_seen_s >= ttl_s:
                lease.state = next_lease_state(cluster, lease.state, LeaseEvent.EXPIRE)
                self._sources.clear()
                affected = self._services_in(cluster)
                for key in affected:
                    self._invalidate(key)
                events.append(ClusterLeaseExpired(
                    cluster, self.mode().value, lease.last_seen_s, now_s,
                    len(self.graph.cluster_state(cluster).endpoints),
                    self._provenance(f"no observation from {cluster} for {now_s - lease.last_seen_s:.1f}s "
                                     f"(leaseTTL {ttl_s:g}s)")))
        return events

    # --- ejections (fed by the proxies' health verdict) ----------------------------------------

    def _pool(self, key: ServiceKey) -> set[str]:
        """The uids an ejection of service `key` can name: its pods, plus one aggregate per remote
        cluster with a gateway (clients in other networks report against the aggregate)."""
        pool = {ep.uid for eps in self.graph.endpoints_of(key).values() for ep in eps.values()}
        pool.update(aggregate_uid(c, key) for c, eps in self.graph.endpoints_of(key).items()
                    if eps and self.graph.clusters[c].gateway)
        return pool

    def apply_health_verdict(self, unhealthy: Collection[HealthKey], now_s: float,
                             triggers: Mapping[HealthKey, str] | None = None,
                             ) -> tuple[set[ServiceKey], list[CoreEvent]]:
        """Make the ejection state what the vote says (`federation.core.health`): eject the
        endpoints in `unhealthy` that are not ejected yet, uneject those it no longer names.

        `triggers` says why, per key (the vote in words); it becomes the events' trigger, next to
        the service's policy object, file:line and commit. Keys the engine cannot route are left
        out: services the fleet does not define, and endpoints the graph does not know (yet: the
        verdict is applied on every reconcile, so an endpoint observed later is ejected then).
        Returns the services whose views changed (for the tier evaluation that yields
        FailedOver/FailedBack) and the events: per service, ejections before unejections, by uid."""
        triggers = triggers or {}
        wanted: dict[str, set[str]] = {}
        for host, uid in unhealthy:
            if host in self.graph.hostnames:
                wanted.setdefault(host, set()).add(uid)
        touched: set[ServiceKey] = set()
        events: list[CoreEvent] = []
        for host in sorted(wanted.keys() | self._ejections.keys()):
            key = self.graph.hostnames[host]
            current = self._ejections.get(host, {})
            want = wanted.get(host, set())
            new = want - current.keys()
            if new:
                new &= self._pool(key)
            gone = current.keys() - want
            if not new and not gone:
                continue
            for uid in sorted(new):
                hk = (host, uid)
                trigger = triggers.get(hk) or DEFAULT_EJECT_TRIGGER.format(uid=uid)
                count = self._ejection_counts[hk] = self._ejection_counts.get(hk, 0) + 1
                current[uid] = Ejection(EjectionReason.HEALTH_REPORT_QUORUM, now_s, trigger, count)
                events.append(EndpointEjected(host, uid, EjectionReason.HEALTH_REPORT_QUORUM.value, count, 0.0,
                                              True, now_s, self._provenance(trigger, key)))
            for uid in sorted(gone):
                ej = current.pop(uid)
                trigger = triggers.get((host, uid)) or DEFAULT_UNEJECT_TRIGGER.format(uid=uid)
                events.append(EndpointUnejected(host, uid, now_s, now_s - ej.since_s,
                                                self._provenance(trigger, key)))
            if current:
                self._ejections[host] = current
            else:
                self._ejections.pop(host, None)
            touched.add(key)
            self._invalidate(key)
            pool = self._pool(key)  # forget the counts of endpoints that left the graph
            for hk in [hk for hk in self._ejection_counts
                       if hk[0] == host and hk[1] not in pool and hk[1] not in current]:
                del self._ejection_counts[hk]
        return touched, events

    def restore_ejections(self, other: FailoverEngine) -> None:
        """Take over `other`'s ejection state, without events: a new revision rebuilds the engine,
        but what the proxies vote has not changed. What this engine cannot route (services the
        new revision drops, endpoints its graph does not know) is left behind, as
        `apply_health_verdict` would leave it out."""
        for host, ejections in other._ejections.items():
            key = self.graph.hostnames.get(host)
            if key is None:
                continue
            pool = self._pool(key)
            kept = {uid: ej for uid, ej in ejections.items() if uid in pool}
            if kept:
                self._ejections[host] = kept
                self._invalidate(key)
        self._ejection_counts.update((hk, n) for hk, n in other._ejection_counts.items()
                                     if hk[0] in self.graph.hostnames)

    def ejections(self, key: ServiceKey) -> Mapping[str, Ejection]:
        """The endpoints of service `key` held ejected (uid -> why): views, explain, status."""
        policy = self.policies.get(key)
        return self._ejections.get(policy.hostname, {}) if policy is not None else {}

    def ejected(self, key: ServiceKey) -> frozenset[str]:
        return frozenset(self.ejections(key))

    def ejected_endpoints(self) -> frozenset[HealthKey]:
        """Every (service hostname, uid) held ejected."""
        return frozenset((host, uid) for host, ejs in self._ejections.items() for uid in ejs)

    # --- views --------------------------------------------------------------------------------

    def _invalidate(self, key: ServiceKey) -> None:
        self._cache.pop(key, None)
        self.dirty.add(key)

    def take_dirty(self) -> set[ServiceKey]:
        out, self.dirty = self.dirty, set()
        return out

    def _loc_id(self, loc: Locality) -> int:
        lid = self._loc_ids.get(loc)
        if lid is None:
            lid = self._loc_ids[loc] = len(self._loc_ids)
        return lid

    def _service_cache(self, key: ServiceKey) -> _ServiceCache:
        cache = self._cache.get(key)
        if cache is not None:
            return cache
        cache = self._cache[key] = _ServiceCache()
        policy = self.policies[key]
        label_names = [lb.partition("=")[0] for lb in (policy.locality.failover_priority if policy.locality else ())]
        extra = [n for n in label_names if n not in TOPOLOGY_LABELS]
        slot = 0
        for cluster, eps in sorted(self.graph.endpoints_of(key).items()):
            if not eps:
                continue
            cv = self.graph.clusters[cluster]
            by_sig: dict[tuple[str, ...], list[EndpointNode]] = {}
            for ep in eps.values():
                sig = (ep.zone, ep.region, *(ep.labels.get(n, "") for n in extra))
                by_sig.setdefault(sig, []).append(ep)
            direct: list[_Group] = []
            for sig in sorted(by_sig):
                members = tuple(sorted(by_sig[sig], key=lambda e: e.uid))
                first = members[0]
                labels = tuple(sorted((n, first.labels.get(n, "")) for n in extra))
                loc = Locality(cv.network, cluster, first.region, first.zone, labels)
                direct.append((slot, self._loc_id(loc), loc, members, (cluster, first.zone, first.region, labels, "")))
                slot += 1
            aggregate: _Group | None = None
            if cv.gateway:
                loc = Locality(cv.network, cluster, cv.region, cv.zone)
                members = tuple(m for g in direct for m in g[3])
                aggregate = (slot, self._loc_id(loc), loc, members, (cluster, "", "", (), "@gateway"))
                slot += 1
            cache.clusters.append(_ClusterEntry(cluster, cv.network, direct, aggregate))
        return cache

    def _source(self, source: Locality) -> _SourceInfo:
        info = self._sources.get(source)
        if info is None:
            src_td = self.trust.cluster_domain.get(source.cluster, "")
            usable: set[str] = set()
            why: dict[str, str] = {}
            for name, cv in self.graph.clusters.items():
                if not self.routable(name):
                    why[name] = f"withdrawn: lease {self._leases[name].state.value.lower()} (partition mode Withdraw)"
                elif not self.trust.trusts(src_td, cv.trust_domain):
                    why[name] = f"trust domain {cv.trust_domain} does not federate with {src_td} both ways"
                else:
                    usable.add(name)
            info = self._sources[source] = _SourceInfo(self._loc_id(source), source.network,
                                                       frozenset(usable), why)
        return info

    def view(self, key: ServiceKey, source: Locality) -> ServiceView:
        """The endpoints a client at `source` gets for service `key`, tiered and weighted."""
        policy = self.policies[key]
        cache = self._service_cache(key)
        src = self._source(source)
        last = cache.by_source.get(source)
        if last is not None and last[0] is src:
            return last[1]
        tk = (self._sig_ids[key], src.source_id)
        table = self._rank_tables.get(tk)
        if table is None:
            table = self._rank_tables[tk] = {}
        distribute = policy.mode is TierMode.DISTRIBUTE
        pieces: list[Piece] = []
        excluded: list[tuple[str, str]] = []
        for entry in cache.clusters:
            cluster = entry.cluster
            if cluster not in src.usable:
                excluded.append((cluster, src.why_not.get(cluster, "not routable")))
                continue
            if entry.network == src.network:
                groups = entry.direct
                via = False
            elif entry.aggregate is not None:
                groups = [entry.aggregate]
                via = True
            else:
                excluded.append((cluster, f"network {entry.network} has no east-west gateway in {cluster}"))
                continue
            for slot, loc_id, loc, members, sort_key in groups:
                if loc_id in table:
                    raw = table[loc_id]
                else:
                    raw = table[loc_id] = raw_priority(policy, source, loc)
                if raw is None:
                    excluded.append((cluster, f"distribute rule leaves out {loc.region}/{loc.zone}"))
                    continue
                dist = distribute_pattern(policy, source, loc) if distribute else None
                pieces.append(Piece(raw, sort_key, via, cluster, loc, members, dist, slot))
        pieces.sort()
        dist_counts: dict[str, int] = {}
        if distribute:
            for p in pieces:
                if p.distribute is not None:
                    dist_counts[p.distribute[0]] = dist_counts.get(p.distribute[0], 0) + (
                        1 if p.via_gateway else len(p.members))
        tiers: list[int] = []
        sig: list[tuple[int, int, int]] = []
        dense, last_raw = -1, -1
        for p in pieces:
            if p.raw != last_raw:
                dense += 1
                last_raw = p.raw
            tiers.append(dense)
            weight = 0
            if p.distribute is not None:
                n = dist_counts.get(p.distribute[0], 1)
                weight = max(1, round(p.distribute[1] * DISTRIBUTE_WEIGHT_SCALE / 100 / n))
            sig.append((p.slot, dense, weight))
        view_sig = tuple(sig)
        hit = cache.views.get(view_sig)
        if hit is None:
            ejected = self.ejections(key)
            endpoints: list[Endpoint] = []
            cached_eps = cache.endpoints
            for p, ck in zip(pieces, view_sig, strict=True):
                cached = cached_eps.get(ck)
                if cached is None:
                    cached = cached_eps[ck] = self._endpoints_for(key, p, ck[1], ck[2], ejected)
                endpoints.extend(cached)
            self._view_ids += 1
            hit = cache.views[view_sig] = (self._view_ids, tuple(endpoints))
        view = ServiceView(policy.hostname, source, hit[1], tuple(pieces), tuple(tiers), tuple(excluded), hit[0])
        cache.by_source[source] = (src, view)
        return view

    def _endpoints_for(self, key: ServiceKey, p: Piece, tier: int, weight: int,
                       ejected: Mapping[str, Ejection]) -> tuple[Endpoint, ...]:
        """Health = ready and not ejected; a gateway aggregate is healthy while it is not ejected
        itself and any of its pods is healthy (its weight: how many are)."""

        def ok(ep: EndpointNode) -> bool:
            return ep.ready and ep.uid not in ejected

        if p.via_gateway:
            cv = self.graph.clusters[p.cluster]
            uid = aggregate_uid(p.cluster, key)
            healthy_n = sum(1 for m in p.members if ok(m))
            agg_ok = healthy_n > 0 and uid not in ejected
            first = p.members[0]
            return (Endpoint(
                workload_uid=uid, cluster=p.cluster, network=cv.network, address="", port=first.port,
                hbone_address="", gateway=cv.gateway, identity=first.identity, tier=tier,
                weight=weight or (healthy_n or len(p.members)), healthy=agg_ok,
                region=cv.region, zone=cv.zone, gateway_identity=gateway_identity(cv.trust_domain)),)
        w = weight or 1
        if not ejected:
            return tuple(Endpoint(m.uid, m.cluster, m.network, m.address, m.port, m.hbone_address, "",
                                  m.identity, tier, w, m.ready, m.region, m.zone) for m in p.members)
        return tuple(Endpoint(m.uid, m.cluster, m.network, m.address, m.port, m.hbone_address, "",
                              m.identity, tier, w, ok(m), m.region, m.zone) for m in p.members)

    def gateway_endpoints(self, key: ServiceKey, cluster: str) -> tuple[Endpoint, ...]:
        """What the east-west gateway of `cluster` routes to for `key`: its own cluster's pods,
        one tier (a gateway never fails over to another cluster; the client side does)."""
        cache = self._service_cache(key)
        ck = ("gateway", cluster)
        cached = cache.endpoints.get(ck)
        if cached is None:
            ejected = self.ejections(key)
            out: list[Endpoint] = []
            for entry in cache.clusters:
                if entry.cluster != cluster:
                    continue
                for slot, _lid, loc, members, sort_key in entry.direct:
                    part = cache.endpoints.get((slot, 0, 0))
                    if part is None:
                        part = cache.endpoints[(slot, 0, 0)] = self._endpoints_for(
                            key, Piece(0, sort_key, False, cluster, loc, members, None, slot), 0, 0, ejected)
                    out.extend(part)
            cached = cache.endpoints[ck] = tuple(sorted(out, key=lambda e: e.workload_uid))
        return cached


    # --- failover events ----------------------------------------------------------------------

    def evaluate(self, key: ServiceKey, views: Iterable[ServiceView], now_s: float, trigger: str,
                 source_label: Mapping[Locality, str] | None = None) -> list[CoreEvent]:
        """Compare each source's tier shares with the last evaluation: FailedOver when tier 0
        stops taking all of it, FailedBack when it takes all of it again."""
        policy = self.policies[key]
        events: list[CoreEvent] = []
        for v in views:
            ck = v.source.class_key
            shares = v.load(policy.panic_threshold_pct).shares
            prev = self._last_shares.get((policy.hostname, ck))
            self._last_shares[(policy.hostname, ck)] = shares
            if prev is None or not shares:
                continue
            name = (source_label or {}).get(ck, v.source.cluster)
            was_full = bool(prev) and prev[0] >= 1.0 - 1e-9
            is_full = shares[0] >= 1.0 - 1e-9
            if was_full and not is_full:
                to = tuple(sorted({e.cluster for e in v.endpoints if e.tier > 0 and shares[e.tier] > 0}))
                events.append(FailedOver(policy.hostname, name, shares, prev, to, now_s,
                                         self._provenance(trigger, key)))
            elif is_full and not was_full:
                events.append(FailedBack(policy.hostname, name, shares, prev, now_s, self._provenance(trigger, key)))
        return events


def aggregate_uid(cluster: str, key: ServiceKey) -> str:
    """The uid of a remote cluster's pods of a service, as one endpoint behind its gateway."""
    return f"{cluster}/{key.namespace}/{key.name}@gateway"


def build_engine(snapshot: ConfigSnapshot, observations: Iterable[ClusterObservation]) -> FailoverEngine:
    """Graph + trust + engine for one snapshot and a set of observations (offline tools, tests)."""
    graph = EndpointGraph(snapshot)
    engine = FailoverEngine(snapshot, graph, TrustGraph(snapshot))
    for obs in observations:
        engine.observe(obs)
    return engine
