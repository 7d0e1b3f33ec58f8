"""The Git feed: follows the fleet repo (`sources.GitSource`) on a thread and hands what it finds
to the reconciler (a `FleetSink`).

Order of delivery in one poll: a fallback snapshot first (after a restart on a bad head the
source reloads the last applied revision), then failures, so that the bad head stays the
"desired" revision in status. The first good snapshot after a (re)start is preceded by
`last_applied_if_gated`: when the reconciler's commit gate will reject the head (an unsafe CA
root rotation), the last applied revision goes first, or a restarted controller would have
nothing to serve.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from federation.controller.sources import FleetFailure, GitPolicy, GitSource
from gitops.model import ConfigSnapshot
from ztunnel.api.clock import calendar_now

POLL_WAKE_S = 0.2


log = logging.getLogger(__name__)

class FleetSink(Protocol):
    def on_snapshot(self, snap: ConfigSnapshot) -> None: ...

    def on_fallback_snapshot(self, snap: ConfigSnapshot) -> None: ...

    def on_fleet_error(self, sha: str, subject: str, problems: Sequence[dict[str, Any]]) -> None: ...


class AppliedRecords(Protocol):
    """The store's records the feed reads (`federation.controller.store.Store`)."""

    def last_applied(self) -> Any: ...

    def applied_ca_specs(self) -> dict[str, Any] | None: ...

    def leaf_not_after(self, trust_domain: str) -> dict[str, float]: ...


def last_applied_if_gated(source: GitSource, store: AppliedRecords, head: ConfigSnapshot,
                          now_s: float) -> ConfigSnapshot | None:
    """After a (re)start: the last applied revision, reloaded from Git, when the reconciler's commit
    gate will reject the branch head (an unsafe CA root rotation), or when the head removes a
    cluster of the last applied revision (the reconciler judges the removal against it, and drains
    the cluster instead of dropping it). Without it a restarted controller would have nothing to
    serve (the head is rejected, and unlike an invalid commit the Git source sees nothing wrong
    with it) and would load the head's CAs at start, switching the signer."""
    from federation.core.rotation_gate import ca_spec_from_dict, gate_commit
    from gitops import FleetError, RepoAccessError, load_revision

    specs, applied = store.applied_ca_specs(), store.last_applied()
    if applied is None or source.worktree or applied.sha in (head.revision.sha, "WORKTREE"):
        return None
    applied_clusters: list[str] = getattr(store, "applied_clusters", lambda: None)() or []
    removes = bool(set(applied_clusters) - set(head.clusters))
    previous = {td: ca_spec_from_dict(d) for td, d in (specs or {}).items()}
    if not removes and (not specs or not gate_commit(previous, head, store.leaf_not_after, now_s)):
        return None
    try:
        return load_revision(source.follower.local_repo(), applied.sha)
    except (FleetError, RepoAccessError):
        return None


def snapshot_for_cas(repo: str, branch: str, store: AppliedRecords, now_s: float,
                     policy: GitPolicy | None = None) -> ConfigSnapshot | None:
    """The revision whose CAs a starting controller loads before it serves TLS: the branch head,
    or the last applied revision when the commit gate will reject the head (loading the head's
    CAs would switch the signer). None when the head does not load — or is refused by `policy`
    (an unsigned head must not choose the CAs either) — and the reconciler loads the CAs once a
    good revision arrives."""
    source = GitSource(repo, branch, policy=policy)
    head = source.poll(now_s)
    if head is None or isinstance(head, FleetFailure):
        return None
    return last_applied_if_gated(source, store, head, now_s) or head


class GitFeed:
    """Invariant: the sink sees at most one `on_fallback_snapshot` per (re)start, before the
    first snapshot of the head."""

    def __init__(self, source: GitSource, store: AppliedRecords, sink: FleetSink,
                 poll_interval_s: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.source, self.store, self.sink, self.clock = source, store, sink, clock
        self.poll_override_s = poll_interval_s
        if poll_interval_s is not None:
            source.follower.watch.poll_interval_s = poll_interval_s
        self._first_snapshot = True
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def following(cls, repo: str, branch: str, store: AppliedRecords, sink: FleetSink,
                  poll_interval_s: float | None = None, policy: GitPolicy | None = None) -> GitFeed:
        """A feed for `repo`/`branch` that, after a restart, falls back to the store's last
        applied revision while the head is bad; `policy` says which heads are acceptable."""
        applied = store.last_applied()
        source = GitSource(repo, branch, fallback_sha=applied.sha if applied else None, policy=policy)
        return cls(source, store, sink, poll_interval_s)

    def start(self) -> GitFeed:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="git", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # keep following; the status shows the error
                self.source.last_error = f"{type(e).__name__}: {e}"
                log.warning("following the fleet repo failed (retrying): %s", self.source.last_error,
                            exc_info=log.isEnabledFor(logging.DEBUG))
            self._wake.wait(POLL_WAKE_S)
            self._wake.clear()

    def poll_once(self) -> None:
        results: list[ConfigSnapshot | FleetFailure] = []
        got = self.source.poll(self.clock())
        while got is not None:
            results.append(got)
            got = self.source.poll(self.clock()) if self.source.snapshot is None else None
        # a fallback snapshot (last applied, after a restart on a bad head) goes first, so that
        # the bad head stays the "desired" revision in status
        for r in sorted(results, key=lambda r: isinstance(r, FleetFailure)):
            self._deliver(r)

    def _deliver(self, got: ConfigSnapshot | FleetFailure) -> None:
        if self.poll_override_s is not None:
            self.source.follower.watch.poll_interval_s = self.poll_override_s
        if isinstance(got, FleetFailure):
            self.sink.on_fleet_error(got.sha, got.subject, list(got.problems))
            return
        if self._first_snapshot:
            self._first_snapshot = False
            self._send_fallback_if_gated(got)
        self.sink.on_snapshot(got)

    def _send_fallback_if_gated(self, head: ConfigSnapshot) -> None:
        fallback = last_applied_if_gated(self.source, self.store, head, calendar_now())  # leaves' dates: the calendar
        if fallback is not None:
            self.sink.on_fallback_snapshot(fallback)

    def trigger(self) -> None:
        self.source.trigger()
        self._wake.set()

    def resend(self) -> None:
        """Send the current snapshot again (a restarted reconciler has none)."""
        if self.source.snapshot is not None:
            self._send_fallback_if_gated(self.source.snapshot)
            self.sink.on_snapshot(self.source.snapshot)

    def status(self) -> dict[str, Any]:
        return self.source.status()
