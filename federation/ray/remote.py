"""Adapters from the plain classes' collaborators to Ray actor calls: all Ray calls between the
controller's actors are made here (the hosts in `federation.ray.actors` only wire them).

- `RemoteStore`: the `Store` methods the reconciler, the Git feed and the driver use, forwarded to
  the state owner (the config server actor), which holds the only connection to
  `controller.sqlite` (see `federation.ray.placement`).
- `RemoteReconciler`: the reconciler's inputs (a `git_feed.FleetSink`) as actor calls, encoded
  with `federation.controller.wire`.
- `RemoteConfigServer`: the reconciler's way out: per-proxy deltas, and the CAs' roots for a
  snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ray

from federation.controller.store import FailoverRecord, RevisionRecord
from federation.controller.wire import encode_json, encode_snapshot
from federation.core.rollout import ProxyRollout, rollout_from_dict
from gitops.model import ConfigSnapshot

STORE_CALL_TIMEOUT_S = 30.0
CONFIG_CALL_TIMEOUT_S = 30.0

# what `RemoteStore` forwards; the owner refuses any other name
STORE_METHODS = frozenset({
    "last_attempted", "last_applied", "record_attempt", "mark_applied", "applied_ca_specs", "record_applied_ca_specs",
    "applied_clusters", "record_applied_clusters", "drains", "record_drains",
    "leaf_not_after", "record_failover", "failover_history", "failover_count", "active_failovers", "ca_roots",
    "revisions",
})


def call_store(store: Any, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """The owner's side of `RemoteStore`."""
    if method not in STORE_METHODS:
        raise AttributeError(f"store method {method!r} is not shared with other actors (see STORE_METHODS)")
    return getattr(store, method)(*args, **kwargs)


class RemoteStore:
    """Invariant: opens nothing locally; every call is one actor call to the state owner."""

    def __init__(self, owner: Any, timeout_s: float = STORE_CALL_TIMEOUT_S) -> None:
        self.owner = owner
        self.timeout_s = timeout_s

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(self.owner.store_call.remote(method, args, kwargs), timeout=self.timeout_s)

    def last_attempted(self) -> RevisionRecord | None:
        return self._call("last_attempted")  # type: ignore[no-any-return]

    def last_applied(self) -> RevisionRecord | None:
        return self._call("last_applied")  # type: ignore[no-any-return]

    def record_attempt(self, sha: str, subject: str, ok: bool, problems: Sequence[dict[str, Any]] = (),
                       at_s: float | None = None, applying: bool = False) -> None:
        self._call("record_attempt", sha, subject, ok=ok, problems=list(problems), at_s=at_s, applying=applying)

    def mark_applied(self, sha: str) -> bool:
        return bool(self._call("mark_applied", sha))

    def applied_clusters(self) -> list[str] | None:
        return self._call("applied_clusters")  # type: ignore[no-any-return]

    def record_applied_clusters(self, clusters: Sequence[str]) -> None:
        self._call("record_applied_clusters", list(clusters))

    def drains(self) -> list[dict[str, Any]]:
        return list(self._call("drains"))

    def record_drains(self, drains: Sequence[dict[str, Any]]) -> None:
        self._call("record_drains", list(drains))

    def applied_ca_specs(self) -> dict[str, Any] | None:
        return self._call("applied_ca_specs")  # type: ignore[no-any-return]

    def record_applied_ca_specs(self, specs: dict[str, Any]) -> None:
        self._call("record_applied_ca_specs", specs)

    def leaf_not_after(self, trust_domain: str) -> dict[str, float]:
        return dict(self._call("leaf_not_after", trust_domain))

    def record_failover(self, service: str, kind: str, **fields: Any) -> None:
        self._call("record_failover", service, kind, **fields)

    def failover_history(self, service: str | None = None, since_s: float | None = None,
                         limit: int = 500) -> list[FailoverRecord]:
        return list(self._call("failover_history", service, since_s, limit))

    def revisions(self, limit: int = 20, sha: str | None = None) -> list[RevisionRecord]:
        return list(self._call("revisions", limit, sha))

    def failover_count(self) -> int:
        return int(self._call("failover_count"))

    def active_failovers(self) -> list[FailoverRecord]:
        return list(self._call("active_failovers"))

    def ca_roots(self) -> list[dict[str, Any]]:
        return list(self._call("ca_roots"))


class RemoteReconciler:
    """A `git_feed.FleetSink` (and the agents' way in) that calls the reconciler actor."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def on_snapshot(self, snap: ConfigSnapshot) -> None:
        ray.get(self.handle.on_snapshot.remote(encode_snapshot(snap)))

    def on_fallback_snapshot(self, snap: ConfigSnapshot) -> None:
        ray.get(self.handle.on_fallback_snapshot.remote(encode_snapshot(snap)))

    def on_fleet_error(self, sha: str, subject: str, problems: Sequence[dict[str, Any]]) -> None:
        ray.get(self.handle.on_fleet_error.remote(sha, subject, encode_json(list(problems))))

    def on_observation(self, blob: bytes) -> None:
        ray.get(self.handle.on_observation.remote(blob))

    def on_lease(self, cluster: str, age_s: float) -> None:
        """A cluster agent's heartbeat (see `ClusterAgent`): the API answered `age_s` ago."""
        ray.get(self.handle.on_lease.remote(cluster, age_s))


class RemoteConfigServer:
    """The config server as the reconcile service sees it."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def push_deltas(self, blob: bytes) -> str:
        return str(ray.get(self.handle.apply_deltas.remote(blob), timeout=CONFIG_CALL_TIMEOUT_S))

    def bundle_roots(self, snap: ConfigSnapshot) -> Mapping[str, tuple[str, ...]]:
        return dict(ray.get(self.handle.ensure_cas.remote(encode_snapshot(snap)), timeout=CONFIG_CALL_TIMEOUT_S))

    def rollout(self, revision: str, proxy_ids: Sequence[str]) -> list[ProxyRollout]:
        facts = ray.get(self.handle.rollout.remote(revision, list(proxy_ids)), timeout=CONFIG_CALL_TIMEOUT_S)
        return rollout_from_dict({"proxies": facts})

    def set_draining(self, clusters: Mapping[str, str]) -> None:
        ray.get(self.handle.set_draining.remote(dict(clusters)), timeout=CONFIG_CALL_TIMEOUT_S)

    def remove_cluster(self, cluster: str, why: str) -> list[str]:
        return list(ray.get(self.handle.remove_cluster.remote(cluster, why), timeout=CONFIG_CALL_TIMEOUT_S))


class RemoteShards:
    """The config shards (`federation.ray.actors.ConfigShardActor`) as the `ShardedOutbox` sees
    them: every shard's blob sent at once, each answer (or the failure of that one call) apart."""

    def __init__(self, handles: Sequence[Any], timeout_s: float = CONFIG_CALL_TIMEOUT_S) -> None:
        self.handles = list(handles)
        self.timeout_s = timeout_s

    def send_all(self, blobs: Mapping[int, bytes]) -> dict[int, str | BaseException]:
        refs = {k: self.handles[k].apply.remote(blob) for k, blob in blobs.items()}
        out: dict[int, str | BaseException] = {}
        for k, ref in refs.items():
            try:
                out[k] = str(ray.get(ref, timeout=self.timeout_s))
            except Exception as e:   # this shard failed (died, timed out, refused): the others stand
                out[k] = e
        return out
