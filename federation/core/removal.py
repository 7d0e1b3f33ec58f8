"""Clusters leaving the fleet: the removal guard and the two-phase drain. Pure; `now_s` passed in.

**The guard** (`guard_removal`, problem MF0516). A commit that deletes more of the fleet than
`spec.removal.maxClusterPercent` of the clusters or `spec.removal.maxEndpointPercent` of the
global endpoints (default 50 % each) is refused like an invalid commit: the last applied revision
stays in force. What the commit names under `spec.removal.intended` (clusters by name, services
as namespace/name) is a stated intent and does not count towards the shares: a field in the
Federation object, reviewed with the commit, not a commit-message convention. Global endpoints
are the endpoints of global services exported from their cluster, counted over the same
observations for both revisions (the controller's live ones; `meshfed plan` uses the LabClusters),
so a share means "this much of the traffic's destinations disappears". The controller and
`meshfed plan` call the same function.

**The drain** (`Drain`, `start_drains`, `step_drains`). Deleting a cluster's file does not stop
its agent and revoke its credentials at once. A cluster leaves in two phases:

    (in the fleet) --commit without it--> DRAINING --withdrawn + grace--> REMOVED
          ^                                   |
          +------- commit with it again ------+   (the drain is cancelled)

- DRAINING (event `ClusterDraining`): the revision without the cluster is rendered, so every
  other proxy's view loses its endpoints and gateway and traffic moves to what is left. The
  cluster's own proxies keep their last config, its agent keeps running and its proxies keep
  their credentials (they may still serve clients in flight).
- The drain is *withdrawn* once a revision without the cluster is applied (the proxies ACKed it,
  `federation.core.rollout`): traffic has moved. `drainGrace` later the cluster is REMOVED
  (event `ClusterRemoved`): the controller forgets its proxies (their sessions, status and
  records), revokes its bootstrap credentials and stops its agent.

Each event carries provenance: the commit that removed the cluster and the file it was in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from clusters.kube.observation import ClusterObservation
from federation.core.events import Provenance
from gitops.codes import problem
from gitops.model import ConfigSnapshot, ServiceKey
from gitops.problems import ObjectRef, Problem
from gitops.schema import find_pos

REMOVAL_CODE = "MF0516"

GlobalEndpoint = tuple[str, str, str]   # (namespace/service, cluster, pod)


# --- the guard -------------------------------------------------------------------------------------


def global_endpoints(snapshot: ConfigSnapshot, observations: Iterable[ClusterObservation]) -> set[GlobalEndpoint]:
    """Endpoints of the snapshot's global services, from the clusters that export them."""
    out: set[GlobalEndpoint] = set()
    for obs in observations:
        if obs.cluster not in snapshot.clusters:
            continue
        for e in obs.endpoints:
            svc = snapshot.services.get(ServiceKey(e.namespace, e.service))
            if svc is not None and obs.cluster in svc.export_from:
                out.add((f"{e.namespace}/{e.service}", obs.cluster, e.pod))
    return out


@dataclass(frozen=True, slots=True)
class RemovalAssessment:
    removed_clusters: tuple[str, ...]
    unintended_clusters: tuple[str, ...]
    clusters_before: int
    removed_endpoints: int
    unintended_endpoints: int
    endpoints_before: int
    max_cluster_percent: int
    max_endpoint_percent: int

    @property
    def cluster_percent(self) -> float:
        return 100.0 * len(self.unintended_clusters) / self.clusters_before if self.clusters_before else 0.0

    @property
    def endpoint_percent(self) -> float:
        return 100.0 * self.unintended_endpoints / self.endpoints_before if self.endpoints_before else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cluster_percent": round(self.cluster_percent, 1),
                "endpoint_percent": round(self.endpoint_percent, 1)}


def assess_removal(old: ConfigSnapshot, new: ConfigSnapshot,
                   observations: Iterable[ClusterObservation]) -> RemovalAssessment:
    obs = list(observations)
    policy = new.federation.removal
    removed = tuple(sorted(set(old.clusters) - set(new.clusters)))
    unintended = tuple(c for c in removed if c not in policy.intended_clusters)
    before, after = global_endpoints(old, obs), global_endpoints(new, obs)
    gone = before - after
    excused = {e for e in gone if e[1] in policy.intended_clusters or e[0] in policy.intended_services}
    return RemovalAssessment(removed, unintended, len(old.clusters), len(gone), len(gone - excused), len(before),
                             policy.max_cluster_percent, policy.max_endpoint_percent)


REMOVAL_HINT = ("if this is intended, name what the commit removes in federation.yaml under spec.removal.intended "
                "(clusters: [...], services: [namespace/name, ...]) or raise spec.removal.maxClusterPercent / "
                "maxEndpointPercent; otherwise restore the deleted files. The last applied revision stays in force")


def guard_removal(old: ConfigSnapshot, new: ConfigSnapshot,
                  observations: Iterable[ClusterObservation]) -> list[Problem]:
    """MF0516 problems when `new` removes more of `old` than its Federation allows (see above)."""
    a = assess_removal(old, new, observations)
    fed = new.federation
    pos = find_pos(fed.field_pos, "spec.removal", fed.pos)
    ref = ObjectRef("Federation", fed.name)
    out: list[Problem] = []
    if a.cluster_percent > a.max_cluster_percent:
        files = ", ".join(f"{c} ({old.clusters[c].pos.file})" for c in a.unintended_clusters)
        out.append(problem(REMOVAL_CODE,
                           f"this commit removes {len(a.unintended_clusters)} of {a.clusters_before} clusters "
                           f"({a.cluster_percent:.0f} %, more than spec.removal.maxClusterPercent "
                           f"{a.max_cluster_percent} %) without saying it is intended: {files}",
                           pos, REMOVAL_HINT, ref))
    if a.endpoint_percent > a.max_endpoint_percent:
        out.append(problem(REMOVAL_CODE,
                           f"this commit removes {a.unintended_endpoints} of {a.endpoints_before} global endpoints "
                           f"({a.endpoint_percent:.0f} %, more than spec.removal.maxEndpointPercent "
                           f"{a.max_endpoint_percent} %) without saying it is intended",
                           pos, REMOVAL_HINT, ref))
    return out


# --- the drain ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterDraining:
    """A commit removed `cluster`: it is withdrawn from every proxy's view; its agent and
    credentials stay until the withdrawal is applied and `grace_s` has passed."""

    cluster: str
    at_s: float
    grace_s: float
    provenance: Provenance = field(default_factory=lambda: Provenance(""))


@dataclass(frozen=True, slots=True)
class ClusterRemoved:
    """The drain of `cluster` is over: its proxies are forgotten, its credentials revoked, its
    agent stopped."""

    cluster: str
    at_s: float
    drained_for_s: float
    proxies_forgotten: tuple[str, ...] = ()
    provenance: Provenance = field(default_factory=lambda: Provenance(""))


@dataclass(frozen=True, slots=True)
class ClusterDrainCancelled:
    """A commit added `cluster` back while it was draining: it is a member again."""

    cluster: str
    at_s: float
    provenance: Provenance = field(default_factory=lambda: Provenance(""))


@dataclass(frozen=True, slots=True)
class Drain:
    """One cluster on its way out. Invariant: `withdrawn_at_s` is set once, when a revision without
    the cluster is first applied; `done(now)` only after that plus `grace_s`."""

    cluster: str
    trust_domain: str
    since_s: float
    grace_s: float
    revision: str                  # the commit that removed it
    file: str                      # where the cluster was declared (file:line:col)
    agent: Mapping[str, Any]       # the agent spec of the cluster (`queries.fleet_clusters` form)
    withdrawn_at_s: float | None = None

    def done(self, now_s: float) -> bool:
        return self.withdrawn_at_s is not None and now_s >= self.withdrawn_at_s + self.grace_s

    def provenance(self, trigger: str) -> Provenance:
        return Provenance(trigger, f"Cluster {self.cluster}", self.file, self.revision)

    def as_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "trust_domain": self.trust_domain, "since_s": self.since_s,
                "grace_s": self.grace_s, "revision": self.revision, "file": self.file, "agent": dict(self.agent),
                "withdrawn_at_s": self.withdrawn_at_s}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Drain:
        w = d.get("withdrawn_at_s")
        return cls(str(d["cluster"]), str(d["trust_domain"]), float(d["since_s"]), float(d["grace_s"]),
                   str(d["revision"]), str(d["file"]), dict(d.get("agent") or {}),
                   None if w is None else float(w))


DrainEvent = ClusterDraining | ClusterRemoved | ClusterDrainCancelled


def start_drains(old: ConfigSnapshot, new: ConfigSnapshot, drains: Mapping[str, Drain], now_s: float,
                 agents: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Drain], list[DrainEvent]]:
    """`new` replaces `old`: clusters it drops start draining, draining clusters it has again are
    members again. `agents`: the agent spec of each cluster of `old`."""
    out = dict(drains)
    events: list[DrainEvent] = []
    sha = new.revision.sha
    for name in sorted(set(old.clusters) - set(new.clusters)):
        if name in out:
            continue
        c = old.clusters[name]
        d = Drain(name, str(c.trust_domain), now_s, new.federation.removal.drain_grace_s, sha, str(c.pos),
                  dict(agents.get(name, {})))
        out[name] = d
        events.append(ClusterDraining(name, now_s, d.grace_s,
                                      d.provenance(f"commit {sha[:8]} removed {c.pos.file or 'the cluster'}")))
    for name in sorted(set(out) & set(new.clusters)):
        d = out.pop(name)
        events.append(ClusterDrainCancelled(name, now_s, Provenance(
            f"commit {sha[:8]} declares cluster {name} again", f"Cluster {name}",
            str(new.clusters[name].pos), sha)))
    return out, events


def mark_withdrawn(drains: Mapping[str, Drain], applied: ConfigSnapshot, now_s: float) -> dict[str, Drain]:
    """A revision was applied: drains of clusters it does not have are withdrawn (from now)."""
    return {name: (replace(d, withdrawn_at_s=now_s) if d.withdrawn_at_s is None and name not in applied.clusters
                   else d) for name, d in drains.items()}


def step_drains(drains: Mapping[str, Drain], now_s: float) -> tuple[dict[str, Drain], list[Drain]]:
    """(still draining, finished now): a drain finishes `grace_s` after its withdrawal."""
    done = [d for d in drains.values() if d.done(now_s)]
    return {n: d for n, d in drains.items() if not d.done(now_s)}, sorted(done, key=lambda d: d.cluster)


def removed_event(d: Drain, now_s: float, forgotten: Iterable[str]) -> ClusterRemoved:
    return ClusterRemoved(d.cluster, now_s, now_s - d.since_s, tuple(sorted(forgotten)),
                          d.provenance(f"drain of {d.cluster} over: withdrawn at {d.withdrawn_at_s:.0f}, "
                                       f"grace {d.grace_s:.0f} s"))
