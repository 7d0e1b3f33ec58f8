"""The reconciler: fleet snapshot + cluster observations + proxy health -> one ProxyConfig per proxy.

A plain class (Ray hosts it in `federation.ray.actors`; tests drive it directly with `now_s`). It
never does I/O itself: rendering is an injected function (the core's `federation.core.render`), the
push is an injected callback (the config server), durable records go to `federation.controller.store`.

Inputs arrive at any time (`on_snapshot`, `on_fleet_error`, `on_observation`, `on_health`) and
only mark the state dirty; `Debouncer` decides when to reconcile: 100 ms after the last change,
but no later than 10 s after the first unhandled one (Istio's PILOT_DEBOUNCE_AFTER /
PILOT_DEBOUNCE_MAX), so a burst of endpoint changes becomes one push.

`reconcile(now_s)` runs numbered, guarded steps; a failing step is recorded and the loop goes on
with the last good result (the control loop never dies on one bad step):

  1. take the pending inputs (snapshot, observations, leases);
  2. gate a new commit before anything of it takes effect: staged CA root rotation
     (`federation.core.rotation_gate`) compares its CA specs with the *applied* ones and the leaves
     the CA issued; a commit that skips a stage or would invalidate live certificates is rejected
     like an invalid commit (problem MF0407) and the last rendered snapshot stays — unless it is
     safe once the revision still *applying* is applied: then it waits for that. The removal
     guard (`federation.core.removal`, MF0516) refuses a commit that removes too much of the fleet.
     Rendering is what loads the CAs (`CoreRender.bundle_roots` -> the config server's
     `ensure_cas`), so a rejected commit never switches the signer. Clusters the commit removes
     start draining (their proxies stay authorized: `ClusterOps.set_draining`);
  3. take the verdict of the proxies' health reports (`federation.core.health`);
  4. render every proxy's config (a failure keeps the last good configs and is reported): the
     render hands the verdict to the failover engine, which ejects and unejects endpoints, and
     evaluates failover, from it; draining clusters are not rendered (every other proxy's view
     loses them);
  5. checkpoint: record the attempt — *applying* until the proxies ACK it;
  6. deliver the configs that changed to the config service, and removals of proxies no longer
     rendered (the config service diffs and versions them per proxy) — once warm: after a
     (re)start nothing is pushed until every cluster of the snapshot has sent a complete
     observation (a fresh LIST), or `warmup_max_s` has passed. Proxies still run the configs of
     the previous controller; a render from a partial view would withdraw the endpoints of the
     clusters not listed yet (istiod likewise waits for its informers' sync). A delivery that
     fails is retried with backoff (`due` turns true again), never dropped;
  7. rollout: ask the config service which rendered proxies run the applying revision; when the
     quorum is reached (`federation.core.rollout`) it becomes the applied revision, its CA specs
     the gate's reference, and drains of clusters it no longer has are withdrawn;
  8. drains whose withdrawal is applied and whose grace is over: the cluster is removed (its
     proxies forgotten, its credentials revoked, its agent stopped by the driver);
  9. record events (failovers, drains) in the store.

Flux semantics: `last_attempted` is the newest revision we tried (with its problems);
`last_applied` the newest that rendered, was delivered and was ACKed by the proxies' quorum. A
bad commit leaves every proxy on the last applied revision.

Health: each proxy reports, per (service, endpoint), whether its local outlier detection ejects it
(`on_health`). The vote (`federation.core.health.HealthAggregator`: a quorum of fresh observers,
where an observer is a proxy whose rendered config routes to the endpoint — step 5 hands the vote
every render's views) gives the verdict; the failover engine (`federation.core.failover`) is the
one place ejection state lives and the verdict is one of its inputs: endpoints a quorum ejects are
unhealthy in every proxy's view, their ejection and the failover it causes are events with
provenance, and explain shows them. `unhealthy` is the last verdict the render applied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from clusters.kube.observation import ClusterObservation
from federation.controller import queries
from federation.core.health import (
    EndpointReport as EndpointReport,  # re-exported: federation.ray imports it here
)
from federation.core.health import HealthAggregator, HealthKey, HealthVerdict, is_l7_proxy, observable
from federation.core.removal import (
    Drain,
    guard_removal,
    mark_withdrawn,
    removed_event,
    start_drains,
    step_drains,
)
from federation.core.rollout import APPLY_TIMEOUT_S, ProxyRollout, RolloutDecision, decide_rollout
from federation.core.rotation_gate import ca_spec_from_dict, ca_spec_to_dict, ca_specs_of, gate_commit
from gitops.model import CaSpec, ConfigSnapshot
from gitops.problems import Problem
from ztunnel.api.clock import steady_wall_clock
from ztunnel.api.config import ProxyConfig

DEBOUNCE_AFTER_S = 0.1
DEBOUNCE_MAX_S = 10.0
WARMUP_MAX_S = 30.0
DELIVERY_RETRY_INITIAL_S = 0.2
DELIVERY_RETRY_MAX_S = 10.0
MAX_LISTED_UNDELIVERED = 100
MAX_OBSERVABLE_MEMO = 10_000     # distinct services tuples whose observable keys are remembered

log = logging.getLogger(__name__)


# --- debounce -----------------------------------------------------------------------------------


@dataclass
class Debouncer:
    """Quiet period `after_s` since the last change, bounded by `max_s` since the first one.

    A change noted `at_once` (a Git commit: one revision is already a whole batch, and nothing
    that follows belongs to it) is due immediately — unless the last render was less than
    `after_s` ago, when it waits like any other change: commits pushed in a burst still render
    once per quiet period, not once each. Endpoint and health changes come in bursts (a rollout,
    a node going away) and keep the trailing quiet period."""

    after_s: float = DEBOUNCE_AFTER_S
    max_s: float = DEBOUNCE_MAX_S
    first_s: float | None = None
    last_s: float | None = None
    changes: int = 0
    at_once_s: float | None = None      # when a change noted `at_once` made the pending set due
    taken_s: float | None = None        # when the pending set was last taken (a render started)

    def note(self, now_s: float, at_once: bool = False) -> None:
        if self.first_s is None:
            self.first_s = now_s
        self.last_s = now_s
        self.changes += 1
        if at_once and self.at_once_s is None and (self.taken_s is None or now_s - self.taken_s >= self.after_s):
            self.at_once_s = now_s

    def deadline_s(self) -> float | None:
        if self.first_s is None or self.last_s is None:
            return None
        if self.at_once_s is not None:
            return self.at_once_s
        return min(self.last_s + self.after_s, self.first_s + self.max_s)

    def due(self, now_s: float) -> bool:
        d = self.deadline_s()
        return d is not None and now_s >= d

    def take(self, now_s: float | None = None) -> int:
        n, self.first_s, self.last_s, self.changes, self.at_once_s = self.changes, None, None, 0, None
        self.taken_s = now_s
        return n


# --- render contract -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderInput:
    snapshot: ConfigSnapshot
    observations: Mapping[str, ClusterObservation]
    leases: Mapping[str, float]                      # cluster -> last successful watch (wall clock s)
    unhealthy: frozenset[HealthKey]                  # the health verdict: (hostname, workload uid) a quorum ejects
    now_s: float
    health_triggers: Mapping[HealthKey, str] = field(default_factory=dict)  # the vote in words, per key that may change


@dataclass(frozen=True)
class RenderOutput:
    configs: Mapping[str, ProxyConfig]
    events: Sequence[Any] = ()                       # federation.core.events objects
    problems: Sequence[str] = ()                     # non-fatal, shown in status


RenderFn = Callable[[RenderInput], RenderOutput]
PushFn = Callable[[Mapping[str, ProxyConfig]], None]          # raises when the config service did not take them
ForgetFn = Callable[[Collection[str]], None]                  # proxies no longer rendered
RolloutFn = Callable[[str, Sequence[str]], Sequence[ProxyRollout]]   # revision, rendered proxies -> facts


class ClusterOps(Protocol):
    """What the config service does for a cluster leaving the fleet (`federation.core.removal`)."""

    def set_draining(self, clusters: Mapping[str, str]) -> None: ...

    def remove_cluster(self, cluster: str, why: str) -> Sequence[str]: ...


@dataclass
class StepFailure:
    step: str
    error: str
    at_s: float


@dataclass
class Applying:
    """A revision that rendered and was handed to the config service, until its rollout quorum."""

    snapshot: ConfigSnapshot
    since_s: float

    @property
    def revision(self) -> str:
        return self.snapshot.revision.sha


def _cluster_of(proxy_id: str) -> str:
    parts = proxy_id.split("/")
    return parts[1] if len(parts) >= 2 else ""


class Reconciler:
    """Invariants: `configs` is the last good render (what proxies should run); it changes only when
    a render succeeds. `delivered` is what the config service accepted of it (a failed push leaves
    the difference undelivered and retries it with backoff). `applied` names the newest revision
    whose rollout reached the quorum (`federation.core.rollout`); `applying` the rendered one
    still waiting for it. `drains` are the clusters on their way out (`federation.core.removal`)."""

    def __init__(self, render: RenderFn, push: PushFn, store: Any = None,
                 debounce: Debouncer | None = None, aggregator: HealthAggregator | None = None,
                 clock: Callable[[], float] | None = None, warmup_max_s: float = WARMUP_MAX_S, *,
                 forget: ForgetFn | None = None, rollout: RolloutFn | None = None,
                 cluster_ops: ClusterOps | None = None, apply_timeout_s: float = APPLY_TIMEOUT_S,
                 calendar: Callable[[], float] | None = None) -> None:
        """`rollout` None: nobody to ask, a revision is applied once pushed (tests, benchmarks).
        Two clocks (`ztunnel.api.clock`): `now_s` and `clock` are elapsed time on the wall scale
        (default `steady_wall_clock()`): leases, debounce, ejections, backoff, timeouts, and the
        stamps of events; `calendar` is the date, for the one decision about certificates here
        (the root rotation gate: has the old root's last leaf expired?). `calendar` None: one clock
        for both, `now_s` (tests drive time that way; `ReconcileService` passes the calendar)."""
        self.render, self.push, self.store = render, push, store
        self.forget, self.rollout, self.cluster_ops = forget, rollout, cluster_ops
        self.apply_timeout_s = apply_timeout_s
        self.warmup_max_s = warmup_max_s
        self.started_s: float | None = None   # first input seen (clock of the callers)
        self.warm = False
        self.debounce = debounce or Debouncer()
        self.aggregator = aggregator or HealthAggregator()
        self.clock = clock if clock is not None else steady_wall_clock()
        self.calendar = calendar
        self.snapshot: ConfigSnapshot | None = None          # last rendered (good) snapshot
        self.pending_snapshot: ConfigSnapshot | None = None
        self.observations: dict[str, ClusterObservation] = {}
        self.listed_clusters: set[str] = set()   # clusters whose first complete observation came (logged)
        self.leases: dict[str, float] = {}
        self.configs: dict[str, ProxyConfig] = {}
        self.delivered: dict[str, ProxyConfig] = {}
        self.delivery_failures = 0
        self.delivery_error = ""
        self.delivery_retry_at_s: float | None = None
        self.attempted: dict[str, Any] = {}                  # revision, subject, ok, problems
        self.applied: dict[str, Any] = {}
        self.applying: Applying | None = None
        self.rollout_decision: RolloutDecision | None = None
        self.waiting: dict[str, Any] = {}                    # a commit held until the applying one is applied
        self.problems: list[dict[str, Any]] = []             # of the last attempt
        self.render_problems: list[str] = []
        self.failures: list[StepFailure] = []
        self.reconciles = 0
        self.last_duration_s = 0.0
        self.durations_s: list[float] = []
        self.pushed_proxies = 0
        self.unhealthy: frozenset[HealthKey] = frozenset()   # the last verdict the render applied
        self.events: list[Any] = []
        self.applied_ca: dict[str, CaSpec] = {}              # CA specs of the applied revision (the gate's reference)
        self._viewed: dict[str, ProxyConfig] = {}            # the configs the vote's views were taken from
        self._observable_memo: dict[tuple[int, ...], tuple[tuple[Any, ...], frozenset[HealthKey]]] = {}
        self.drains: dict[str, Drain] = {}
        self.removed_clusters: list[dict[str, Any]] = []     # the last few drains that finished
        self._recover_from_store()

    def _recover_from_store(self) -> None:
        if self.store is None:
            return
        att, app = self.store.last_attempted(), self.store.last_applied()
        if att is not None:
            self.attempted = {"revision": att.sha, "subject": att.subject, "ok": att.outcome != "failed",
                              "at_s": att.attempted_at_s}
            self.problems = list(att.problems)
        if app is not None:
            self.applied = {"revision": app.sha, "subject": app.subject, "at_s": app.attempted_at_s}
        specs = self.store.applied_ca_specs()
        if specs:
            self.applied_ca = {td: ca_spec_from_dict(d) for td, d in specs.items()}
        drains = self.store.drains() if hasattr(self.store, "drains") else None
        if drains:
            self.drains = {d["cluster"]: Drain.from_dict(d) for d in drains}
            self._call_cluster_ops("drains", lambda ops: ops.set_draining(self._draining_tds()), self.clock())

    # --- inputs (cheap; mark dirty) -------------------------------------------------------------

    def on_snapshot(self, snapshot: ConfigSnapshot, now_s: float | None = None) -> None:
        self.pending_snapshot = snapshot
        self.waiting = {}
        self.debounce.note(self.clock() if now_s is None else now_s, at_once=True)

    def on_fallback_snapshot(self, snapshot: ConfigSnapshot) -> None:
        """The last applied revision, reloaded from Git after a restart because the branch head
        would be rejected or removes clusters: adopt it as the last known good (no attempt
        recorded) when none is in memory, so the proxies keep being served while the head is
        judged against it."""
        if self.snapshot is None:
            self.snapshot = snapshot

    def on_fleet_error(self, sha: str, subject: str, problems: Sequence[Problem | dict[str, Any]],
                       now_s: float | None = None) -> None:
        """A revision that failed to load/validate: recorded as attempted, nothing is pushed."""
        now = self.clock() if now_s is None else now_s
        plist = [p.as_dict() if isinstance(p, Problem) else dict(p) for p in problems]
        self.attempted = {"revision": sha, "subject": subject, "ok": False, "at_s": now}
        self.problems = plist
        kept = str(self.applied.get("revision") or "")[:8] or "none yet"
        log.warning("commit %s rejected (%s): %d problem(s): %s; proxies keep revision %s", sha[:8], subject,
                    len(plist), "; ".join(f"[{p.get('code')}] {p.get('message')}" for p in plist[:3]), kept,
                    extra={"fields": {"event": "CommitRejected", "revision": sha, "subject": subject,
                                      "problems": [f"{p.get('code')} {p.get('file', '')}:{p.get('line', '')} "
                                                   f"{p.get('message')}" for p in plist[:10]],
                                      "applied_revision": self.applied.get("revision", "")}})
        if self.store is not None:
            self.store.record_attempt(sha, subject, ok=False, problems=plist, at_s=now)

    def on_observation(self, obs: ClusterObservation, now_s: float | None = None) -> None:
        prev = self.observations.get(obs.cluster)
        if obs.complete and obs.cluster not in self.listed_clusters:
            # an agent may send partial observations (a kind's watch) before its first complete LIST
            self.listed_clusters.add(obs.cluster)
            log.info("cluster %s up: first complete observation (%d nodes, %d services, %d endpoints)", obs.cluster,
                     len(obs.nodes), len(obs.services), len(obs.endpoints),
                     extra={"fields": {"event": "ClusterUp", "cluster": obs.cluster, "nodes": len(obs.nodes),
                                       "services": len(obs.services), "endpoints": len(obs.endpoints)}})
        if prev is not None and not obs.complete:
            obs = _merge_partial(prev, obs)
        self.observations[obs.cluster] = obs
        self.leases[obs.cluster] = obs.observed_at_s
        self.debounce.note(self.clock() if now_s is None else now_s)

    def on_lease(self, cluster: str, last_success_s: float) -> None:
        """A cluster agent's heartbeat: its API answered at `last_success_s` (no render needed: the
        periodic tick applies it before expiring leases)."""
        self.leases[cluster] = last_success_s

    def on_health(self, proxy_id: str, outcomes: Sequence[EndpointReport], now_s: float | None = None) -> None:
        """`proxy_id` (authenticated by the config server) reports on the endpoints it dials. Only
        reports on endpoints of its own rendered config count (see `federation.core.health`); a
        report that changes the verdict of what it touched marks the state dirty (expiry is the
        periodic tick's business)."""
        now = self.clock() if now_s is None else now_s
        touched = self.aggregator.report(proxy_id, outcomes, now)
        if touched and self.aggregator.unhealthy_among(touched, now) != self.unhealthy.intersection(touched):
            self.debounce.note(now)

    def _update_views(self, configs: Mapping[str, ProxyConfig]) -> None:
        """Tell the vote what each proxy routes to (its rendered config): a proxy votes only on
        those endpoints. Configs the render kept (the same object) are skipped."""
        seen = self._viewed
        for pid in [p for p in seen if p not in configs]:
            del seen[pid]
            self.aggregator.forget_proxy(pid)
        memo = self._observable_memo
        if len(memo) > MAX_OBSERVABLE_MEMO:
            memo.clear()
        for pid, cfg in configs.items():
            if seen.get(pid) is not cfg:
                seen[pid] = cfg
                # node proxies of one locality share their Service objects: one walk over the
                # endpoints per distinct services tuple, not one per proxy (the entry holds the
                # tuple, so its ids stay its own); a proxy keeps the same frozenset object, which
                # `set_view` then recognises without comparing
                # an L7 proxy's view also depends on its id and routes (`l7_reach`): not shared
                if is_l7_proxy(pid):
                    self.aggregator.set_view(pid, observable(cfg))
                    continue
                key = tuple(map(id, cfg.services))
                hit = memo.get(key)
                if hit is None or hit[0] != cfg.services:
                    hit = memo[key] = (cfg.services, observable(cfg))
                self.aggregator.set_view(pid, hit[1])

    # --- the loop --------------------------------------------------------------------------------

    def due(self, now_s: float) -> bool:
        return self.debounce.due(now_s) or self._delivery_due(now_s)

    def _delivery_due(self, now_s: float) -> bool:
        return self.delivery_retry_at_s is not None and now_s >= self.delivery_retry_at_s

    def deadline_s(self) -> float | None:
        """When `due` turns true next without new input (the debounce, or a delivery retry)."""
        times = [t for t in (self.debounce.deadline_s(), self.delivery_retry_at_s) if t is not None]
        return min(times) if times else None

    def reconcile(self, now_s: float | None = None, force: bool = False) -> bool:
        """Run the steps if debounced changes are due (or `force`). True when it ran. Only a
        delivery retry due: deliver what is undelivered, nothing is rendered."""
        now = self.clock() if now_s is None else now_s
        if not force and not self.debounce.due(now):
            if not self._delivery_due(now):
                return False
            self._deliver(now)
            self._advance_rollout(now)
            return True
        started = time.perf_counter()
        self.debounce.take(now)
        self.reconciles += 1
        events: list[Any] = []
        # 1. take inputs
        candidate = self.pending_snapshot
        if candidate is None and self.snapshot is None:
            return True  # nothing to render until the first good snapshot arrives
        # 2. gate the new commit (staged CA root rotation, removal guard) before anything of it is applied
        if candidate is not None:
            verdict_of_gate = self._gate(candidate, now)
            if verdict_of_gate != "ok":
                candidate = None
                if self.snapshot is None:
                    return True
        snapshot = candidate or self.snapshot
        assert snapshot is not None
        drains_before = dict(self.drains)
        if candidate is not None and self.snapshot is not None:
            self.drains, drain_events = start_drains(self.snapshot, candidate, self.drains, now,
                                                     queries.fleet_clusters(self.snapshot))
            if drain_events:
                events.extend(drain_events)
                self._call_cluster_ops("drains", lambda ops: ops.set_draining(self._draining_tds()), now)
        # 3. the health verdict (described for what it ejects and for what it may stop ejecting)
        verdict: HealthVerdict = self._guard("aggregate", lambda: self.aggregator.verdict(now, also=self.unhealthy),
                                             HealthVerdict(self.unhealthy), now)
        unhealthy = verdict.unhealthy
        # 4. render (the engine applies the verdict); draining clusters' observations are not the fleet's
        observed = {c: o for c, o in self.observations.items() if c not in self.drains}
        out = self._guard("render", lambda: self.render(RenderInput(snapshot, observed, dict(self.leases),
                                                                     unhealthy, now, verdict.triggers)),
                          None, now)
        if out is None:
            if candidate is not None:
                rev = candidate.revision
                self.on_fleet_error(rev.sha, rev.subject, [{"code": "MF-RENDER", "message": self.failures[-1].error,
                                                            "hint": "a controller bug or an unsupported combination; "
                                                                    "the proxies keep the last applied revision"}], now)
                self.pending_snapshot = None
                if self.drains != drains_before:
                    self.drains = drains_before
                    self._call_cluster_ops("drains", lambda ops: ops.set_draining(self._draining_tds()), now)
            return True
        # 5. checkpoint the revision: applying until the proxies ACK it (applied at once without `rollout`)
        self.unhealthy = unhealthy
        # who may vote on what: the views just rendered
        self._guard("views", lambda: self._update_views(out.configs), None, now)
        if candidate is not None:
            rev = candidate.revision
            self.snapshot, self.pending_snapshot = candidate, None
            self.attempted = {"revision": rev.sha, "subject": rev.subject, "ok": True, "at_s": now}
            self.problems = []
            self.applying = Applying(candidate, now)
            if self.store is not None:
                # without `rollout` nobody will confirm it: recorded applied now, as a store without
                # an "applying" state expects
                extra = {"applying": True} if self.rollout is not None else {}
                self._guard("checkpoint", lambda: self.store.record_attempt(rev.sha, rev.subject, ok=True, at_s=now,
                                                                            **extra), None, now)
                self._save_drains(now)
            log.info("commit %s accepted (%s): %d proxy configs rendered; applying until the proxies ACK it",
                     rev.sha[:8], rev.subject, len(out.configs),
                     extra={"fields": {"event": "CommitApplying", "revision": rev.sha, "subject": rev.subject,
                                       "proxies": len(out.configs)}})
        self.render_problems = list(out.problems)
        # 6. deliver what changed to the config service (once warm: see the module docstring)
        if not self._warm_up(snapshot, now):
            self.debounce.note(now)  # come back when more observations may have arrived
            return True
        self.configs = dict(out.configs)
        self._deliver(now)
        # 7. the rollout: applied once the proxies' ACKs reach the quorum
        self._advance_rollout(now)
        # 8. drains whose withdrawal is applied and whose grace is over: forget the cluster
        events.extend(self._finish_drains(now))
        # 9. events
        events.extend(out.events)
        if events:
            self._guard("events", lambda: self._record_events(events), None, now)
        self.last_duration_s = time.perf_counter() - started
        self.durations_s = ([*self.durations_s, self.last_duration_s])[-200:]
        return True

    # --- steps ---------------------------------------------------------------------------------

    def _gate(self, candidate: ConfigSnapshot, now_s: float) -> str:
        """Step 2: "ok", "rejected" (recorded as a failed attempt) or "waiting" (the rotation is
        safe once the revision being applied is applied: the candidate is held until then, or
        rejected if that revision does not apply within the timeout). Fails closed: if a check
        cannot run (e.g. the store is unreadable), the commit is rejected with that error."""
        def live(td: str) -> Mapping[str, float]:
            return dict(self.store.leaf_not_after(td)) if self.store is not None else {}

        # leaves' not-after are dates: compared on the calendar, which a wall-clock step moves and
        # the elapsed `now_s` does not
        today_s = self.calendar() if self.calendar is not None else now_s

        problems: Any = self._guard("gate", lambda: [p.as_dict() for p in gate_commit(self.applied_ca, candidate,
                                                                                         live, today_s)], None, now_s)
        if problems is None:
            problems = [{"code": "MF-GATE", "message": "could not check the CA root rotation of this commit: "
                                                       + self.failures[-1].error,
                         "hint": "check the controller's state directory (controller.sqlite); the proxies keep "
                                 "the last applied revision, push again or restart the controller to retry"}]
        elif problems and self.applying is not None and self.applying.revision != candidate.revision.sha:
            ahead = ca_specs_of(self.applying.snapshot)
            overdue = self.rollout_decision is not None and self.rollout_decision.overdue
            if not overdue and not self._guard("gate", lambda: gate_commit(ahead, candidate, live, today_s), [0], now_s):
                if self.waiting.get("revision") != candidate.revision.sha:
                    log.info("commit %s (%s) waits for %s to be applied: its CA root rotation is safe only after "
                             "that revision reached the proxies", candidate.revision.sha[:8],
                             candidate.revision.subject, self.applying.revision[:8],
                             extra={"fields": {"event": "CommitWaiting", "revision": candidate.revision.sha,
                                               "behind": self.applying.revision}})
                self.waiting = {"revision": candidate.revision.sha, "subject": candidate.revision.subject,
                                "behind": self.applying.revision, "since_s": self.waiting.get("since_s", now_s)}
                return "waiting"
        if not problems and self.snapshot is not None:
            problems = [p.as_dict() for p in guard_removal(self.snapshot, candidate, self.observations.values())]
        if not problems:
            self.waiting = {}
            return "ok"
        rev = candidate.revision
        self.pending_snapshot = None
        self.waiting = {}
        self.on_fleet_error(rev.sha, rev.subject, problems, now_s)
        return "rejected"

    def _deliver(self, now_s: float) -> None:
        """Hand the config service what it does not have yet: changed configs, and removals of
        proxies no longer rendered (a draining cluster's proxies keep theirs until it is removed).
        A failure leaves them undelivered and retries after a backoff (any new render waits too)."""
        changed = {pid: cfg for pid, cfg in self.configs.items() if self.delivered.get(pid) != cfg}
        removed = sorted(pid for pid in self.delivered if pid not in self.configs
                         and _cluster_of(pid) not in self.drains)
        if not changed and not removed:
            self.delivery_retry_at_s = None
            return
        if self.delivery_retry_at_s is not None and now_s < self.delivery_retry_at_s:
            return
        try:
            if changed:
                log.debug("reconcile %d: delivering %d of %d proxy configs", self.reconciles, len(changed),
                          len(self.configs))
                self.push(changed)
                self.delivered.update(changed)
                self.pushed_proxies += len(changed)
            if removed and self.forget is not None:
                self.forget(removed)
            for pid in removed:
                self.delivered.pop(pid, None)
        except Exception as e:
            self.delivery_failures += 1
            self.delivery_error = f"{type(e).__name__}: {e}"
            delay = min(DELIVERY_RETRY_MAX_S, DELIVERY_RETRY_INITIAL_S * 2 ** (self.delivery_failures - 1))
            self.delivery_retry_at_s = now_s + delay
            self.failures = ([*self.failures, StepFailure("push", self.delivery_error, now_s)])[-50:]
            return
        self.delivery_failures, self.delivery_retry_at_s = 0, None

    def undelivered(self) -> list[str]:
        return sorted({pid for pid, cfg in self.configs.items() if self.delivered.get(pid) != cfg}
                      | {pid for pid in self.delivered if pid not in self.configs and _cluster_of(pid) not in self.drains})

    def _advance_rollout(self, now_s: float) -> None:
        a = self.applying
        if a is None or not self.warm:
            return
        if self.rollout is None:  # nobody to ask: applied once the config service has it all
            if not self.undelivered():
                self._mark_applied(a, now_s)
            return
        facts: Any = self._guard("rollout", lambda: self.rollout(a.revision, sorted(self.configs)), None, now_s)  # type: ignore[misc]
        if facts is None:
            return
        was_overdue = self.rollout_decision is not None and self.rollout_decision.overdue
        self.rollout_decision = d = decide_rollout(a.revision, facts, a.since_s, now_s, self.apply_timeout_s)
        if d.overdue and not was_overdue:
            log.warning("commit %s still applying after %.0f s: pending %s; NACKed by %s; the applied revision stays "
                        "%s", a.revision[:8], now_s - a.since_s, ", ".join(d.pending) or "-",
                        ", ".join(d.nacked) or "-", str(self.applied.get("revision") or "")[:8] or "none yet",
                        extra={"fields": {"event": "RolloutOverdue", "revision": a.revision,
                                          "pending": list(d.pending), "nacked": list(d.nacked)}})
        if d.applied:
            self._mark_applied(a, now_s)

    def _mark_applied(self, a: Applying, now_s: float) -> None:
        rev = a.snapshot.revision
        self.applying, self.rollout_decision = None, None
        self.applied = {"revision": rev.sha, "subject": rev.subject, "at_s": now_s}
        log.info("commit %s applied (%s): %s, %d proxy configs", rev.sha[:8], rev.subject,
                 "the proxies' ACKs reached the quorum" if self.rollout is not None else "delivered",
                 len(self.configs), extra={"fields": {"event": "CommitApplied", "revision": rev.sha,
                                                      "subject": rev.subject, "proxies": len(self.configs)}})
        self.applied_ca = ca_specs_of(a.snapshot)
        self.drains = mark_withdrawn(self.drains, a.snapshot, now_s)
        if self.store is not None:
            self._guard("checkpoint", lambda: self._checkpoint_applied(a.snapshot, now_s), None, now_s)
        if self.waiting:
            self.debounce.note(now_s)  # the commit held behind this one: gate it again now

    def _checkpoint_applied(self, snapshot: ConfigSnapshot, now_s: float) -> None:
        assert self.store is not None
        if self.rollout is not None:
            self.store.mark_applied(snapshot.revision.sha)
        self.store.record_applied_ca_specs({td: ca_spec_to_dict(spec) for td, spec in ca_specs_of(snapshot).items()})
        if hasattr(self.store, "record_applied_clusters"):
            self.store.record_applied_clusters(sorted(snapshot.clusters))
        self._save_drains(now_s)

    def restore_cluster_ops(self, now_s: float) -> None:
        """The config service restarted: tell it again which clusters are draining."""
        if self.drains:
            self._call_cluster_ops("drains", lambda ops: ops.set_draining(self._draining_tds()), now_s)

    def _draining_tds(self) -> dict[str, str]:
        return {c: d.trust_domain for c, d in self.drains.items()}

    def _save_drains(self, now_s: float) -> None:
        if self.store is not None and hasattr(self.store, "record_drains"):
            self._guard("checkpoint", lambda: self.store.record_drains([d.as_dict() for d in self.drains.values()]),
                        None, now_s)

    def _call_cluster_ops(self, step: str, fn: Callable[[ClusterOps], Any], now_s: float) -> Any:
        if self.cluster_ops is None:
            return None
        ops: ClusterOps = self.cluster_ops
        return self._guard(step, lambda: fn(ops), None, now_s)

    def _finish_drains(self, now_s: float) -> list[Any]:
        self.drains, done = step_drains(self.drains, now_s)
        events: list[Any] = []
        for d in done:
            why = f"cluster {d.cluster} removed by commit {d.revision[:8]}"
            mine = sorted(pid for pid in self.delivered if _cluster_of(pid) == d.cluster)
            def remove(ops: ClusterOps, c: str = d.cluster, w: str = why) -> Sequence[str]:
                return ops.remove_cluster(c, w)

            forgotten = self._call_cluster_ops("drains", remove, now_s)
            if forgotten is None:
                if self.cluster_ops is not None:  # it failed: try again at the next run
                    self.drains[d.cluster] = d
                    continue
                if mine and self.forget is not None:
                    self._guard("drains", lambda m=mine: self.forget(m), None, now_s)  # type: ignore[misc]
                forgotten = mine
            for pid in mine:
                self.delivered.pop(pid, None)
            self.observations.pop(d.cluster, None)
            self.leases.pop(d.cluster, None)
            ev = removed_event(d, now_s, set(forgotten) | set(mine))
            events.append(ev)
            self.removed_clusters = [*self.removed_clusters, {"cluster": d.cluster, "at_s": now_s,
                                                               "revision": d.revision,
                                                               "proxies_forgotten": list(ev.proxies_forgotten)}][-10:]
        if done:
            self._call_cluster_ops("drains", lambda ops: ops.set_draining(self._draining_tds()), now_s)
            self._save_drains(now_s)
        return events

    def _warm_up(self, snapshot: ConfigSnapshot, now_s: float) -> bool:
        if not self.warm:
            if self.started_s is None:
                self.started_s = now_s
            listed = all(c in self.observations and self.observations[c].complete for c in snapshot.clusters)
            self.warm = listed or now_s - self.started_s >= self.warmup_max_s
            if self.warm:
                missing = sorted(c for c in snapshot.clusters if c not in self.observations)
                log.info("warm: %s; pushing configs", "every cluster listed" if listed else
                         f"waited {self.warmup_max_s:.0f} s, still missing {', '.join(missing)}")
        return self.warm

    def _guard(self, step: str, fn: Callable[[], Any], fallback: Any, now_s: float) -> Any:
        try:
            return fn()
        except Exception as e:
            self.failures = ([*self.failures, StepFailure(step, f"{type(e).__name__}: {e}", now_s)])[-50:]
            log.warning("reconcile step %s failed, keeping the last good result: %s: %s", step, type(e).__name__, e,
                        exc_info=log.isEnabledFor(logging.DEBUG),
                        extra={"fields": {"event": "ReconcileStepFailed", "step": step}})
            return fallback

    def _record_events(self, events: Sequence[Any]) -> None:
        from federation.core.events import event_to_dict

        self.events = (self.events + list(events))[-500:]
        for ev in events:
            log_core_event(ev)
        if self.store is None:
            return
        for ev in events:
            d = event_to_dict(ev)
            kind = str(d.get("kind") or type(ev).__name__)
            prov = d.get("provenance") or {}
            self.store.record_failover(
                str(d.get("service") or d.get("cluster") or ""), kind,
                from_cluster=str(d.get("source") or d.get("cluster") or str(d.get("endpoint") or "").split("/")[0]),
                to_cluster=",".join(d.get("to_clusters") or ()) if isinstance(d.get("to_clusters"), (list, tuple)) else "",
                trigger=str(prov.get("trigger", "")), policy_file=str(prov.get("file", "")),
                revision=str(prov.get("commit", "")), detail=d, at_s=float(d.get("at_s") or self.clock()))

    # --- status ----------------------------------------------------------------------------------

    def fleet_clusters(self) -> dict[str, dict[str, Any]]:
        """The agents the driver runs: the clusters of the rendered revision and the draining ones."""
        out = queries.fleet_clusters(self.snapshot)
        for name, d in self.drains.items():
            if d.agent and name not in out:
                out[name] = {**d.agent, "draining": True}
        return out

    def status(self) -> dict[str, Any]:
        clusters = {}
        for name in sorted(set(self.observations) | set(self.leases)):
            obs = self.observations.get(name)
            clusters[name] = {
                "lease_renewed_at_s": self.leases.get(name),
                "complete": bool(obs and obs.complete),
                "nodes": len(obs.nodes) if obs else 0,
                "services": len(obs.services) if obs else 0,
                "endpoints": len(obs.endpoints) if obs else 0,
                "ready_endpoints": sum(1 for e in obs.endpoints if e.ready) if obs else 0,
                "draining": name in self.drains,
            }
        undelivered = self.undelivered()
        now = self.clock()
        applying: dict[str, Any] | None = None
        if self.applying is not None:
            rev = self.applying.snapshot.revision
            applying = {"revision": rev.sha, "subject": rev.subject, "since_s": self.applying.since_s,
                        "timeout_s": self.apply_timeout_s,
                        **({k: v for k, v in self.rollout_decision.as_dict().items() if k != "revision"}
                           if self.rollout_decision is not None else {})}
        return {
            "desired": self.attempted,
            "applied": self.applied,
            "applying": applying,
            "waiting": self.waiting or None,
            "problems": self.problems,
            "render_problems": self.render_problems,
            "step_failures": [f.__dict__ for f in self.failures[-10:]],
            "clusters": clusters,
            "reconciles": self.reconciles,
            "last_reconcile_ms": round(self.last_duration_s * 1000, 3),
            "unhealthy_endpoints": sorted(f"{s} {e}" for s, e in self.unhealthy),
            **self.aggregator.counters(),
            "proxies_rendered": len(self.configs),
            "undelivered": len(undelivered),
            "undelivered_proxies": undelivered[:MAX_LISTED_UNDELIVERED],
            "delivery": {"failures": self.delivery_failures, "last_error": self.delivery_error,
                         "retry_in_s": (round(max(0.0, self.delivery_retry_at_s - now), 2)
                                        if self.delivery_retry_at_s is not None else None)},
            "draining": [{**d.as_dict(), "withdrawn": d.withdrawn_at_s is not None} for d in self.drains.values()],
            "removed_clusters": list(self.removed_clusters),
            "warm": self.warm,
            "active_failovers": [r.as_dict() for r in self.store.active_failovers()] if self.store else [],
        }


# The core's events as log lines: what changed, why (the trigger), under which policy and commit.
_EVENT_LEVELS = {"FailedOver": logging.WARNING, "ClusterLeaseExpired": logging.WARNING,
                 "ClusterFenced": logging.WARNING}


def describe_event(ev: Any) -> str:
    """One sentence per core event (`federation.core.events`), for the log."""
    kind = type(ev).__name__
    if kind == "EndpointEjected":
        until = f" until +{ev.until_s - ev.at_s:.0f}s" if ev.until_s else ""
        return (f"endpoint {ev.endpoint} of {ev.service} ejected ({ev.reason}, ejection #{ev.ejection_count}"
                f"{'' if ev.enforced else ', not enforced: maxEjectionPercent'}){until}")
    if kind == "EndpointUnejected":
        return f"endpoint {ev.endpoint} of {ev.service} back in rotation after {ev.ejected_for_s:.1f}s"
    if kind == "FailedOver":
        return (f"{ev.service} from {ev.source} failed over to {', '.join(ev.to_clusters) or '?'} "
                f"(tier shares {list(ev.previous_shares)} -> {list(ev.shares)})")
    if kind == "FailedBack":
        return f"{ev.service} from {ev.source} failed back to its own tier (shares {list(ev.shares)})"
    if kind == "ClusterLeaseExpired":
        return (f"cluster {ev.cluster} expired: no answer from its API for the lease TTL; {ev.mode} "
                f"{ev.endpoints} endpoints")
    if kind == "ClusterFenced":
        return f"cluster {ev.cluster} fenced: it answered again, its endpoints wait for a complete list"
    if kind == "ClusterRecovered":
        return f"cluster {ev.cluster} up again: a complete list lifted the fence ({ev.endpoints} endpoints)"
    if kind == "ClusterDraining":
        return (f"cluster {ev.cluster} draining: withdrawn from every proxy's view, removed {ev.grace_s:.0f} s after "
                f"the proxies ACK that")
    if kind == "ClusterRemoved":
        return (f"cluster {ev.cluster} removed after draining {ev.drained_for_s:.0f} s: {len(ev.proxies_forgotten)} "
                f"proxies forgotten, its credentials revoked, its agent stopped")
    return kind


def log_core_event(ev: Any) -> None:
    from federation.core.events import event_to_dict

    kind = type(ev).__name__
    level = _EVENT_LEVELS.get(kind, logging.INFO)
    if not log.isEnabledFor(level):
        return
    d = event_to_dict(ev)
    prov = d.pop("provenance", None) or {}
    d.pop("type", None)
    why = f"; trigger: {prov.get('trigger')}" if prov.get("trigger") else ""
    where = f"; policy {prov.get('policy')} {prov.get('file')}".rstrip() if prov.get("policy") else ""
    commit = f" @ {str(prov.get('commit'))[:8]}" if prov.get("commit") else ""
    log.log(level, describe_event(ev) + why + where + commit,
            extra={"fields": {"event": kind, **d, "trigger": prov.get("trigger", ""), "policy": prov.get("policy", ""),
                              "policy_file": prov.get("file", ""), "revision": prov.get("commit", "")}})


def _merge_partial(prev: ClusterObservation, part: ClusterObservation) -> ClusterObservation:
    """Upsert a partial observation into the previous one (see `clusters.kube.observation`)."""
    from dataclasses import replace

    eps = {e.key: e for e in prev.endpoints}
    for k in part.removed_endpoints:
        eps.pop(k, None)
    for e in part.endpoints:
        eps[e.key] = e
    nodes = {n.name: n for n in prev.nodes} | {n.name: n for n in part.nodes}
    svcs = {(s.namespace, s.name): s for s in prev.services} | {(s.namespace, s.name): s for s in part.services}
    return replace(prev, observed_at_s=part.observed_at_s, nodes=tuple(nodes.values()),
                   services=tuple(svcs.values()), endpoints=tuple(eps[k] for k in sorted(eps)),
                   resource_version=part.resource_version)


# --- the core as a RenderFn -------------------------------------------------------------------------


class CoreRender:
    """Adapter from `RenderInput` to the federation core (graph, failover engine, renderer).

    Stateful on purpose: the graph, engine and renderer are kept across calls and fed only what
    changed (a new snapshot rebuilds them, carrying the engine's ejections over; an observation
    that is the same object as last time is skipped), so an endpoint change re-renders only the
    services it touched. The health verdict is an input of the engine like an observation: the
    engine ejects and unejects endpoints (`EndpointEjected`/`EndpointUnejected`, reason
    `HealthReportQuorum`, the vote as trigger, the service's policy object, file:line and commit
    as provenance), renders them `healthy=False` for everyone, and the same tier evaluation that
    turns readiness changes into FailedOver/FailedBack sees them: a silent cut, where pods stay
    ready, fails over and back like a crash.
    """

    def __init__(self, bundle_roots: Callable[[ConfigSnapshot], Mapping[str, tuple[str, ...]]] | None = None) -> None:
        self.bundle_roots = bundle_roots
        self._revision = ""
        self._engine: Any = None
        self._renderer: Any = None
        self._seen: dict[str, ClusterObservation] = {}
        self._configs: dict[str, ProxyConfig] = {}

    @property
    def engine(self) -> Any:
        """The live FailoverEngine of the last render (None before the first): for explain."""
        return self._engine

    def __call__(self, inp: RenderInput) -> RenderOutput:
        from federation.core.failover import FailoverEngine
        from federation.core.graph import EndpointGraph, GraphChange
        from federation.core.render import Renderer
        from federation.core.trust_graph import TrustGraph

        events: list[Any] = []
        problems: list[str] = []
        rebuilt = inp.snapshot.revision.sha != self._revision or self._engine is None
        previous = self._engine if rebuilt else None
        if rebuilt:
            # build everything first, then switch at once: a failure half-way (the CA roots come
            # over a Ray call) must not leave a new engine next to the old renderer
            graph = EndpointGraph(inp.snapshot)
            engine = FailoverEngine(inp.snapshot, graph, TrustGraph(inp.snapshot))
            roots = self.bundle_roots(inp.snapshot) if self.bundle_roots else {}
            renderer = Renderer(engine, 1, roots)
            self._engine, self._renderer = engine, renderer   # (until here the previous pair stays whole)
            self._revision, self._seen = inp.snapshot.revision.sha, {}
        change = GraphChange()
        observed: list[str] = []
        for cluster, obs in sorted(inp.observations.items()):
            if self._seen.get(cluster) is obs:
                continue
            if cluster not in inp.snapshot.clusters:
                problems.append(f"cluster {cluster} is observed but not in the fleet repo")
                continue
            c, evs = self._engine.observe(obs)
            change = change.merge(c)
            events.extend(evs)
            self._seen[cluster] = obs
            observed.append(cluster)
        if previous is not None:
            # a new revision: the proxies' vote has not changed, and must not be announced again
            self._engine.restore_ejections(previous)
        for cluster, last_success_s in sorted(inp.leases.items()):
            if cluster in inp.snapshot.clusters:
                self._engine.renew_lease(cluster, last_success_s)  # heartbeats of quiet clusters
        events.extend(self._engine.tick(inp.now_s))
        health_changed, health_events = self._engine.apply_health_verdict(inp.unhealthy, inp.now_s,
                                                                          inp.health_triggers)
        events.extend(health_events)
        # FailedOver / FailedBack: re-evaluate the tier shares of what changed (everything on a new
        # revision, which sets the baseline the next evaluation compares with), naming the cause
        triggers: dict[Any, list[str]] = {}
        if observed:
            for key in change.services:
                triggers.setdefault(key, []).append("discovery: new observation from " + ", ".join(observed))
        for key in health_changed:
            triggers.setdefault(key, []).extend(_health_trigger(health_events, self._engine.policies[key].hostname))
        to_evaluate = set(self._engine.policies) if rebuilt else set(change.services) | health_changed
        events.extend(self._failover_events(to_evaluate, inp.now_s,
                                            {k: "; ".join(v) for k, v in triggers.items()}))
        if rebuilt:
            self._configs = dict(self._renderer.render_all())
        else:
            upd = self._renderer.update(change)
            for pid in upd.removed:
                self._configs.pop(pid, None)
            for pid in set(upd.deltas) | set(upd.added):
                self._configs[pid] = self._renderer.config(pid)
        return RenderOutput(self._configs, events, problems)

    def _failover_events(self, services: set[Any], now_s: float, triggers: Mapping[Any, str]) -> list[Any]:
        """Ask the engine, per client locality that has a node proxy, whether each service's tier 0
        stopped (FailedOver) or resumed (FailedBack) taking all of that locality's traffic."""
        if not services:
            return []
        localities = sorted(self._renderer.node_localities(), key=repr)
        events: list[Any] = []
        for key in sorted(services, key=str):
            if key not in self._engine.policies:
                continue
            views = [self._engine.view(key, loc) for loc in localities]
            events.extend(self._engine.evaluate(key, views, now_s, triggers.get(key) or "reconcile"))
        return events


def _health_trigger(events: Sequence[Any], hostname: str) -> list[str]:
    """`EndpointEjected east/shop/checkout-0, east/shop/checkout-1 (HealthReportQuorum)`: what the
    verdict changed for one service, as the trigger of the failover it causes."""
    out = []
    for kind in ("EndpointEjected", "EndpointUnejected"):
        evs = [ev for ev in events if type(ev).__name__ == kind and ev.service == hostname]
        if evs:
            reason = f" ({evs[0].reason})" if kind == "EndpointEjected" else ""
            out.append(f"{kind} {', '.join(ev.endpoint for ev in evs)}{reason}")
    return out
