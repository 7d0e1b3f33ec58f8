"""Plain classes for the controller's inputs: the Git source and one agent per cluster.

Ray hosts them (`federation.ray.actors`; the Git source through `git_feed.GitFeed`), tests drive
them directly. An agent hands its observations to a callback as *bytes* (`federation.controller.wire`).

- `GitSource` follows a branch with `gitops.watch.BranchFollower` (a directory that is not a Git
  repository is followed as a worktree, revision "WORKTREE"). It reports a good snapshot, or the
  problems of a bad revision (Flux: last attempted vs last applied lives in the watch and in the
  reconciler). The loader re-parses only the files a commit changed (it gets the last good
  snapshot back).
- `ClusterAgent` owns discovery for one cluster (`clusters.kube.discovery.KubeDiscovery`, the real
  kubernetes client against a kind cluster or the lab's emulated API server) and its *lease*:
  renewed by every successful LIST or watch event, valid for the federation's partition
  `lease_ttl_s`. Sending is latest-wins: while one observation is on its way, newer ones replace
  each other, so a burst costs one hop, not one per event.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusters.kube.observation import ClusterObservation
from federation.controller.wire import encode_observation
from gitops.model import ClusterApiKind, ConfigSnapshot
from ztunnel.api.clock import steady_wall_clock

log = logging.getLogger(__name__)

# --- Git -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GitPolicy:
    """What the controller accepts from the fleet repo's branch (`meshfed controller run
    --require-signed-commits --allowed-signers FILE | --gnupg-home DIR`, `--allow-force-push`):
    unsigned heads, or heads signed by a key not among the configured ones, are refused when
    signatures are required; a head that does not descend from the applied revision (a force
    push, a reset) is refused unless force pushes are allowed. `gitops.watch` enforces both."""

    require_signed: bool = False
    allow_force_push: bool = False
    gnupg_home: str | None = None            # trusted OpenPGP keys
    allowed_signers_file: str | None = None  # trusted SSH keys (gpg.ssh.allowedSignersFile format)

    def __post_init__(self) -> None:
        if self.require_signed and not (self.gnupg_home or self.allowed_signers_file):
            raise ValueError("signed commits are required but no trusted keys are named: give an SSH "
                             "allowed-signers file (--allowed-signers) or a GnuPG home (--gnupg-home)")

    def watch(self) -> Any:
        from gitops.watch import BranchWatch

        return BranchWatch(allow_non_fast_forward=self.allow_force_push, require_signed=self.require_signed)

    def describe(self) -> dict[str, Any]:
        return {"require_signed_commits": self.require_signed, "allow_force_push": self.allow_force_push,
                "gnupg_home": self.gnupg_home or "", "allowed_signers_file": self.allowed_signers_file or ""}


@dataclass(frozen=True, slots=True)
class FleetFailure:
    sha: str
    subject: str
    problems: tuple[dict[str, Any], ...]


class GitSource:
    """Follows the fleet repo. `poll(now_s)` returns a new snapshot, a failure, or None."""

    def __init__(self, repo: str, branch: str = "main", fallback_sha: str | None = None,
                 policy: GitPolicy | None = None) -> None:
        from gitops.watch import BranchFollower

        self.repo, self.branch = repo, branch
        self.policy = policy or GitPolicy()
        is_url = "://" in repo or repo.startswith("git@")
        self.worktree = not is_url and not (Path(repo) / ".git").exists() and not (Path(repo) / "HEAD").exists()
        if self.worktree and self.policy.require_signed:
            raise ValueError(f"{repo} is not a Git repository: signed commits cannot be required of a worktree "
                             "(follow a repository, or drop --require-signed-commits)")
        mirror = None
        if is_url:
            # the bare mirror of a URL is a cache, not state: the Git source may run on any Ray node
            # and only the state owner's node holds the state directory. A private temporary
            # directory per source (0700), removed with it; fleet repos are small to fetch again.
            tmp = tempfile.mkdtemp(prefix="meshfed-fleet-mirror-")
            weakref.finalize(self, shutil.rmtree, tmp, True)
            mirror = os.path.join(tmp, "fleet.git")
        self.follower = BranchFollower(repo, branch, mirror_dir=mirror, gnupg_home=self.policy.gnupg_home,
                                       allowed_signers_file=self.policy.allowed_signers_file,
                                       watch=self.policy.watch())
        self.snapshot: ConfigSnapshot | None = None
        self._reported_failure: tuple[str, str] | None = None
        self._next_worktree_poll_s = 0.0
        self.last_error = ""
        self.worktree_access_error = ""   # worktree mode: the directory could not be read
        self._logged_fetch_error = ""
        # After a restart the branch head may be a bad commit: serve the last applied revision
        # (from the store) until a good head arrives, as a controller that never stopped would.
        self.fallback_sha = fallback_sha if fallback_sha and fallback_sha != "WORKTREE" else None

    def trigger(self) -> None:
        """Check now (e.g. a webhook or `meshfed` asked)."""
        self.follower.watch.trigger()
        self._next_worktree_poll_s = 0.0

    def poll(self, now_s: float) -> ConfigSnapshot | FleetFailure | None:
        if self.worktree:
            return self._poll_worktree(now_s)
        snap = self.follower.poll(now_s)
        self._log_reachability(self.follower.watch.last_fetch_error or "")
        if snap is not None:
            log.debug("fleet revision %s loaded from %s (%s)", snap.revision.short, self.repo, self.branch)
            self.snapshot, self.last_error = snap, ""
            return snap
        w = self.follower.watch
        rev = w.last_attempted_revision
        if self.snapshot is None and self.fallback_sha and w.last_error and self._reported_failure is not None:
            return self._load_fallback()
        if w.last_error and rev is not None and (rev.sha, w.last_error) != self._reported_failure:
            self._reported_failure = (rev.sha, w.last_error)
            self.last_error = w.last_error
            problems = tuple(p.as_dict() for p in w.last_problems) or (
                {"code": "MF-GIT", "message": w.last_error, "hint": "check the repository and branch"},)
            return FleetFailure(rev.sha, rev.subject, problems)
        return None

    def _log_reachability(self, fetch_error: str) -> None:
        """One line when the repository stops answering (or says something new), one when it is back."""
        if fetch_error == self._logged_fetch_error:
            return
        if fetch_error:
            log.warning("fleet repo %s (branch %s) cannot be read: %s; proxies keep the last applied revision",
                        self.repo, self.branch, fetch_error,
                        extra={"fields": {"event": "RepositoryUnreachable", "repo": self.repo, "error": fetch_error}})
        else:
            log.info("fleet repo %s (branch %s) can be read again", self.repo, self.branch,
                     extra={"fields": {"event": "RepositoryReachable", "repo": self.repo}})
        self._logged_fetch_error = fetch_error

    def _load_fallback(self) -> ConfigSnapshot | FleetFailure | None:
        from gitops import FleetError, RepoAccessError, load_revision

        sha, self.fallback_sha = self.fallback_sha, None
        assert sha is not None
        try:
            snap = load_revision(self.follower.local_repo(), sha)
        except (FleetError, RepoAccessError) as e:
            self.last_error = f"last applied revision {sha[:8]} cannot be loaded either: {e}"
            return None
        self.snapshot = self.follower.snapshot = snap
        self.follower.watch.last_applied_revision = snap.revision
        return snap

    def _poll_worktree(self, now_s: float) -> ConfigSnapshot | FleetFailure | None:
        from gitops import FleetError, RepoAccessError, load_worktree

        if now_s < self._next_worktree_poll_s:
            return None
        interval = self.snapshot.federation.git_poll_interval_s if self.snapshot else 2.0
        self._next_worktree_poll_s = now_s + min(interval, 2.0)
        try:
            snap = load_worktree(self.repo, self.snapshot)
            self.worktree_access_error = ""
        except (FleetError, RepoAccessError) as e:
            self.worktree_access_error = str(e) if isinstance(e, RepoAccessError) else ""
            self._log_reachability(self.worktree_access_error)
            problems = tuple(p.as_dict() for p in getattr(e, "problems", ())) or (
                {"code": "MF-REPO", "message": str(e), "hint": "check --repo"},)
            key = ("WORKTREE", str(e))
            if key == self._reported_failure:
                return None
            self._reported_failure = key
            self.last_error = str(e)
            return FleetFailure("WORKTREE", "uncommitted worktree", problems)
        self._log_reachability("")
        if self.snapshot is not None and dict(snap.file_digests) == dict(self.snapshot.file_digests):
            return None
        self.snapshot, self._reported_failure, self.last_error = snap, None, ""
        return snap

    def status(self) -> dict[str, Any]:
        w = self.follower.watch
        return {
            "repo": self.repo, "branch": self.branch, "worktree": self.worktree, **self.policy.describe(),
            "last_applied": w.last_applied_revision.sha if w.last_applied_revision else
            (self.snapshot.revision.sha if self.snapshot else ""),
            "last_attempted": w.last_attempted_revision.sha if w.last_attempted_revision else "",
            "last_error": self.last_error or (w.last_error or ""),
            # reachability apart from rejections: `meshfed check` must not report a rejected
            # commit as an unreachable repository
            "fetch_error": self.worktree_access_error if self.worktree else (w.last_fetch_error or ""),
        }


# --- clusters --------------------------------------------------------------------------------------


@dataclass
class Lease:
    """Renewed by successful watches; valid for `ttl_s` after the last renewal (the agent's elapsed clock)."""

    ttl_s: float
    renewed_at_s: float | None = None

    def renew(self, now_s: float) -> None:
        self.renewed_at_s = now_s

    def valid(self, now_s: float) -> bool:
        return self.renewed_at_s is not None and now_s - self.renewed_at_s <= self.ttl_s

    def remaining_s(self, now_s: float) -> float:
        return 0.0 if self.renewed_at_s is None else max(0.0, self.ttl_s - (now_s - self.renewed_at_s))


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """What an agent is started with; a change of any field means a new agent."""

    cluster: str
    kubeconfig: str | None
    context: str
    api_kind: str
    lease_ttl_s: float
    watch_timeout_s: int
    namespace_selector: str = ""  # enrolled namespaces (kubectl grammar); "" = all

    def args(self) -> tuple[str, str | None, str, str, float, int, str]:
        return (self.cluster, self.kubeconfig, self.context, self.api_kind, self.lease_ttl_s, self.watch_timeout_s,
                self.namespace_selector)


def agent_specs(fleet_clusters: Mapping[str, Mapping[str, Any]], default_kubeconfig: str | None,
                watch_timeout_s: int | None = None, in_cluster: str | None = None) -> dict[str, AgentSpec]:
    """One agent per cluster of the applied revision (`queries.fleet_clusters`). A watch is
    restarted at least three times per lease unless `watch_timeout_s` says otherwise, so a quiet
    but healthy cluster renews its lease. `in_cluster` names the cluster the controller runs in
    (`controller run --in-cluster CLUSTER`): its agent uses the pod's service account, not a context."""
    from clusters.kube.discovery import IN_CLUSTER_CONTEXT

    out = {}
    for name, c in fleet_clusters.items():
        ttl_s = float(c["lease_ttl_s"])
        here = name == in_cluster
        out[name] = AgentSpec(name, None if here else (c.get("kubeconfig") or default_kubeconfig),
                              IN_CLUSTER_CONTEXT if here else c["context"], c["api_kind"], ttl_s,
                              watch_timeout_s or max(2, int(ttl_s / 3)), str(c.get("namespace_selector", "")))
    return out


class ClusterAgent:
    """Discovery + lease for one cluster. `start(send, send_lease)` calls `send(bytes)` with encoded
    observations and `send_lease(cluster, age_s)` with heartbeats (how long ago the API last answered).

    The lease must not depend on watch churn: a quiet cluster produces no events, and a watch that
    ends without change produces no observation. So a heartbeat thread runs every `ttl/3`: when no
    request has succeeded for that long it sends a cheap one (`KubeDiscovery.probe`, GET /version),
    then reports the last success to the reconciler (`send_lease`), which keeps the failover
    engine's lease Live. When the API answers again after the reconciler has heard nothing for most
    of a TTL (`told_s`: the latest success it was told of, by heartbeat or observation), the agent
    LISTs everything and sends that complete observation: recovering an Expired (or Fenced) lease
    takes a complete, fresh view, not a ping. That decision rests on what the reconciler was told,
    not on the agent's own lease at some instant: a probe that blocked across the outage, or a
    status read, must not hide the lapse (the engine would stay Expired — under Withdraw, the
    cluster withdrawn — until something in the cluster changed; found by a chaos experiment,
    examples/chaos/api-outage-withdraw.yaml).
    """

    RESEND_AFTER_TTL_FRACTION = 0.8  # resending a complete view is harmless: err on that side

    def __init__(self, cluster: str, kubeconfig: str | None, context: str, api_kind: str = ClusterApiKind.KUBECONFIG.value,
                 lease_ttl_s: float = 30.0, namespace_selector: str = "", watch_timeout_s: int = 30,
                 clock: Callable[[], float] | None = None, heartbeat_interval_s: float | None = None) -> None:
        """`clock`: elapsed time for the lease and heartbeats (default `steady_wall_clock()`: a wall
        clock stepped by NTP must not make the lease look expired or renewed)."""
        from clusters.kube.discovery import KubeDiscovery

        self.cluster, self.api_kind = cluster, api_kind
        self.clock = clock = clock if clock is not None else steady_wall_clock()
        self.discovery = KubeDiscovery(cluster, kubeconfig, context, namespace_selector=namespace_selector,
                                       watch_timeout_s=watch_timeout_s, clock=clock)
        self.lease = Lease(lease_ttl_s)
        # 0 turns the heartbeat off (what a quiet cluster did before it existed: see the tests)
        self.heartbeat_interval_s = lease_ttl_s / 3 if heartbeat_interval_s is None else heartbeat_interval_s
        self._send: Callable[[bytes], None] | None = None
        self._send_lease: Callable[[str, float], None] | None = None
        self._latest: ClusterObservation | None = None
        self._cv = threading.Condition()
        self._sender: threading.Thread | None = None
        self._heartbeat: threading.Thread | None = None
        self._stop_heartbeat = threading.Event()
        self._stopped = False
        self.sent = 0
        self.heartbeats = 0
        self.probes = 0
        self._answering: bool | None = None   # what the log last said about the API (None: nothing yet)
        self.resends = 0
        self.told_s: float | None = None  # latest API success the reconciler has been told of (agent's clock)
        # the observation channel, for status: a send that never returns shows as a growing
        # `send_in_flight_s` while heartbeats (another call) keep the lease alive
        self.sending_since_s: float | None = None
        self.last_sent_s: float | None = None

    def start(self, send: Callable[[bytes], None], send_lease: Callable[[str, float], None] | None = None) -> None:
        self._send = send
        self._send_lease = send_lease
        self._sender = threading.Thread(target=self._send_loop, name=f"agent-{self.cluster}", daemon=True)
        self._sender.start()
        self.discovery.start(self._on_change)
        if self.heartbeat_interval_s > 0:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"lease-{self.cluster}", daemon=True)
            self._heartbeat.start()

    def _on_change(self, obs: ClusterObservation) -> None:
        self.lease.renew(self.clock())
        with self._cv:
            self._latest = obs
            self._cv.notify()

    def _heartbeat_loop(self) -> None:
        while not self._stop_heartbeat.wait(self.heartbeat_interval_s):
            try:
                self.heartbeat_once()
            except Exception as e:  # never let the heartbeat die; the lease (and status) tell the rest
                self.discovery.last_error = f"heartbeat: {type(e).__name__}: {e}"

    def heartbeat_once(self) -> None:
        """Probe if nothing succeeded for an interval, renew, report; resend a complete view after a lapse."""
        from clusters.kube.discovery import DiscoveryError

        now = self.clock()
        failing = self.discovery.failing_kinds()
        if failing:
            self._note_api(False, "cannot list or watch " + "; ".join(f"{k}: {e}" for k, e in sorted(failing.items())))
            return  # a kind we cannot list or watch: we do not see the cluster; let the lease run out
        last = self.discovery.last_success_s
        if last is None or now - last >= self.heartbeat_interval_s:
            try:
                self.discovery.probe()
                self.probes += 1
            except DiscoveryError as e:
                self._note_api(False, str(e))
                return  # the API does not answer: let the lease run out
        self._note_api(True, "")
        told = self.told_s
        if told is None or self.clock() - told >= self.RESEND_AFTER_TTL_FRACTION * self.lease.ttl_s:
            if told is not None:
                log.info("cluster %s: nothing told to the reconciler for %.0f s (its lease may have lapsed); "
                         "sending a complete list to recover it", self.cluster, self.clock() - told)
            # the reconciler may have expired the lease: recovering takes a complete, fresh view
            # (a LIST of every kind), not the cache
            try:
                obs = self.discovery.list_all()
            except DiscoveryError:
                return
            self._on_change(obs)
            self.resends += 1
        self.renew_from_discovery()
        renewed = self.lease.renewed_at_s
        if renewed is None:
            return
        if self._send_lease is not None:
            # an age, not a timestamp: the reconciler may run on another node with another clock
            self._send_lease(self.cluster, max(0.0, self.clock() - renewed))
            self.heartbeats += 1
            self._told(renewed)

    def _told(self, at_s: float) -> None:
        with self._cv:
            if self.told_s is None or at_s > self.told_s:
                self.told_s = at_s

    def _note_api(self, answering: bool, why: str) -> None:
        """Log the API's transitions (not every heartbeat): unreachable once, back once."""
        if answering == self._answering:
            return
        if not answering:
            left = self.lease.remaining_s(self.clock())
            log.warning("cluster %s: API server %s not usable: %s; the lease runs out in %.0f s", self.cluster,
                        self.discovery.context, why, left,
                        extra={"fields": {"event": "ClusterApiUnreachable", "cluster": self.cluster, "error": why,
                                          "lease_remaining_s": round(left, 1)}})
        elif self._answering is False:
            log.info("cluster %s: API server %s answers again", self.cluster, self.discovery.context,
                     extra={"fields": {"event": "ClusterApiReachable", "cluster": self.cluster}})
        self._answering = answering

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while self._latest is None and not self._stopped:
                    self._cv.wait(1.0)
                if self._stopped:
                    return
                obs, self._latest = self._latest, None
            assert self._send is not None and obs is not None
            self.sending_since_s = self.clock()
            try:
                self._send(encode_observation(obs))
                self.sent += 1
                self.last_sent_s = self.clock()
                self._told(obs.observed_at_s)
            except Exception:  # the reconciler restarts; the next change or resync re-sends
                with self._cv:
                    if self._latest is None:
                        self._latest = obs
                time.sleep(0.5)
            finally:
                self.sending_since_s = None

    def relist(self) -> None:
        """LIST everything again and send it now (a restarted reconciler needs a complete observation)."""
        assert self._send is not None, "start() the agent first"
        self._send(encode_observation(self.discovery.list_all()))

    def renew_from_discovery(self) -> bool:
        """Renew the lease from the watch threads' last success (they also renew on quiet streams)."""
        last = self.discovery.last_success_s
        if last is not None and (self.lease.renewed_at_s is None or last > self.lease.renewed_at_s):
            self.lease.renew(last)
        return self.lease.valid(self.clock())

    def stop(self) -> None:
        self._stop_heartbeat.set()
        self.discovery.stop()
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def status(self) -> dict[str, Any]:
        """What the lease would say if renewed now — without renewing it (only the heartbeat renews
        from discovery)."""
        now = self.clock()
        last = self.discovery.last_success_s
        renewed = self.lease.renewed_at_s
        if last is not None and (renewed is None or last > renewed):
            renewed = last
        view = Lease(self.lease.ttl_s, renewed)
        obs = self.discovery.observation()
        return {
            "cluster": self.cluster, "api": self.api_kind, "context": self.discovery.context,
            "up": view.valid(now), "lease_remaining_s": round(view.remaining_s(now), 1),
            "lease_renewed_at_s": renewed, "complete": obs.complete,
            "endpoints": len(obs.endpoints), "last_error": self.discovery.last_error,
            # what this agent sees and has sent, next to what the reconciler applied (`meshfed
            # status`): a controller that lags its agent names the layer that lost the change
            "observed_ready_endpoints": sum(1 for e in obs.endpoints if e.ready),
            "observations_sent": self.sent, "last_sent_s": self.last_sent_s,
            "send_in_flight_s": round(now - self.sending_since_s, 1) if self.sending_since_s is not None else 0.0,
            "observation_pending": self._latest is not None,
        }
