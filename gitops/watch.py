"""Following a branch of the fleet repo: a pure state machine and a thin Git-driving follower.

`BranchWatch` decides; `BranchFollower` acts. The watch never reads the clock or touches Git: it is
told `now`, what the branch head is, whether moving to it is a fast-forward and whether its
signature verified, and it answers with a decision. That keeps Flux's semantics testable as a
table:

- `last_applied_revision`: the revision whose snapshot is in force. Only a snapshot that loaded
  and validated cleanly moves it; a bad commit never takes down the last good config.
- `last_attempted_revision`: the newest head we tried; with `last_error` set when it failed
  (validation problems, unsigned, non-fast-forward). The same bad head is not retried on every
  poll; a new head (or an explicit trigger) is.
- Non-fast-forward history (force-push, rollback by reset) is refused unless allowed: an
  operator must opt in to move the fleet backwards.
- Signed commits can be required (`BranchWatch.require_signed`); the follower runs
  `git verify-commit` on each new head against the keys it is given: `gnupg_home` (a GnuPG home
  holding the trusted OpenPGP public keys) and/or `allowed_signers_file` (an SSH allowed-signers
  file, lines `<principal> namespaces="git" ssh-ed25519 AAAA...`, as for
  `gpg.ssh.allowedSignersFile`). An unsigned head, or one signed by a key not among them, is
  refused with an error naming the key and the configured key source.

States and transitions (anything else raises `InvalidTransition`):

    IDLE --begin_check--> CHECKING --observe_head: load--> LOADING --loaded/rejected--> IDLE
                          CHECKING --observe_head: skip/reject--> IDLE
                          CHECKING --fetch_failed--> IDLE
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gitops.model import ConfigSnapshot, Revision
from gitops.problems import FleetError, Problem, RepoAccessError

DEFAULT_POLL_INTERVAL_S = 15.0


class WatchPhase(str, enum.Enum):
    IDLE = "Idle"
    CHECKING = "Checking"
    LOADING = "Loading"


_TRANSITIONS: dict[tuple[WatchPhase, str], WatchPhase] = {
    (WatchPhase.IDLE, "begin_check"): WatchPhase.CHECKING,
    (WatchPhase.CHECKING, "skip"): WatchPhase.IDLE,
    (WatchPhase.CHECKING, "reject"): WatchPhase.IDLE,
    (WatchPhase.CHECKING, "load"): WatchPhase.LOADING,
    (WatchPhase.CHECKING, "fetch_failed"): WatchPhase.IDLE,
    (WatchPhase.LOADING, "loaded"): WatchPhase.IDLE,
    (WatchPhase.LOADING, "rejected"): WatchPhase.IDLE,
}


class InvalidTransition(RuntimeError):
    pass


class DecisionKind(str, enum.Enum):
    SKIP = "Skip"      # nothing to do (up to date, or this bad head was already reported)
    LOAD = "Load"      # read and validate this revision, then report loaded/rejected
    REJECT = "Reject"  # refuse this head without reading it (unsigned, non-fast-forward)


@dataclass(frozen=True, slots=True)
class Decision:
    kind: DecisionKind
    revision: Revision
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HeadObservation:
    revision: Revision
    fast_forward: bool | None    # None: nothing applied yet (any head is acceptable)
    signature_ok: bool | None    # None: signatures not checked
    signature_detail: str = ""


@dataclass
class BranchWatch:
    """Invariants: `last_applied_revision` only ever names a revision that loaded cleanly;
    `last_error` is None iff the last attempted revision is the applied one (or none yet)."""

    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    allow_non_fast_forward: bool = False
    require_signed: bool = False
    phase: WatchPhase = WatchPhase.IDLE
    last_applied_revision: Revision | None = None
    last_attempted_revision: Revision | None = None
    last_error: str | None = None
    last_problems: tuple[Problem, ...] = ()
    next_poll_at: float = 0.0
    trigger_pending: bool = False
    history: list[str] = field(default_factory=list)

    def _go(self, event: str) -> None:
        nxt = _TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise InvalidTransition(f"{event!r} is not allowed in phase {self.phase.value}")
        self.phase = nxt

    # --- commands from outside ------------------------------------------------------------
    def trigger(self) -> None:
        """Check now (a webhook, `meshfed sync`), regardless of the poll interval."""
        self.trigger_pending = True

    def due(self, now: float) -> bool:
        return self.phase is WatchPhase.IDLE and (self.trigger_pending or now >= self.next_poll_at)

    def begin_check(self, now: float) -> None:
        self._go("begin_check")
        self.trigger_pending = False
        self.next_poll_at = now + self.poll_interval_s

    # --- what the follower observed ---------------------------------------------------------
    def observe_head(self, head: HeadObservation, retry_failed: bool = False) -> Decision:
        rev = head.revision
        if self.last_applied_revision is not None and rev.sha == self.last_applied_revision.sha:
            decision = Decision(DecisionKind.SKIP, rev, "up to date")
            # the head is the applied revision again (fetch recovered, bad commit reverted): an
            # earlier error no longer describes the branch
            self.last_attempted_revision, self.last_error, self.last_problems = rev, None, ()
        elif (not retry_failed and self.last_error is not None and self.last_attempted_revision is not None
              and rev.sha == self.last_attempted_revision.sha):
            decision = Decision(DecisionKind.SKIP, rev, f"already rejected: {self.last_error}")
        elif self.require_signed and not head.signature_ok:
            decision = Decision(DecisionKind.REJECT, rev, f"commit {rev.short} is not signed by a trusted key"
                                f"{': ' + head.signature_detail if head.signature_detail else ''}")
        elif head.fast_forward is False and not self.allow_non_fast_forward:
            applied = self.last_applied_revision.short if self.last_applied_revision else "?"
            decision = Decision(DecisionKind.REJECT, rev, f"{rev.short} does not descend from the applied revision "
                                f"{applied} (history was rewritten); allow non-fast-forward to accept it")
        else:
            decision = Decision(DecisionKind.LOAD, rev)
        self._go(decision.kind.value.lower())
        if decision.kind is DecisionKind.REJECT:
            self._record_failure(rev, decision.reason, ())
        return decision

    def fetch_failed(self, error: str) -> None:
        self._go("fetch_failed")
        self.last_error = error
        self.history.append(f"fetch failed: {error}")

    def loaded(self, rev: Revision, poll_interval_s: float | None = None) -> None:
        self._go("loaded")
        self.last_applied_revision = rev
        self.last_attempted_revision = rev
        self.last_error = None
        self.last_problems = ()
        if poll_interval_s is not None:
            self.poll_interval_s = poll_interval_s
        self.history.append(f"applied {rev.short}")

    def rejected(self, rev: Revision, error: str, problems: tuple[Problem, ...] = ()) -> None:
        self._go("rejected")
        self._record_failure(rev, error, problems)

    def _record_failure(self, rev: Revision, error: str, problems: tuple[Problem, ...]) -> None:
        self.last_attempted_revision = rev
        self.last_error = error
        self.last_problems = problems
        self.history.append(f"rejected {rev.short}: {error}")


@dataclass
class BranchFollower:
    """Drives a `BranchWatch` against a repository (path or URL) and branch. Git work is done in
    short calls through `gitops.git`; the last good snapshot is kept and passed back to the
    loader so only changed files are parsed again."""

    repo: str
    branch: str = "main"
    mirror_dir: str | None = None     # for URLs: a local bare mirror kept across polls
    gnupg_home: str | None = None     # require_signed: GnuPG home with the trusted OpenPGP keys
    allowed_signers_file: str | None = None  # require_signed: SSH allowed-signers file (trusted keys)
    watch: BranchWatch = field(default_factory=BranchWatch)
    snapshot: ConfigSnapshot | None = None

    def local_repo(self) -> str:
        """The repository to read revisions from: the local mirror of a URL, or the path itself."""
        return self.mirror_dir if self.mirror_dir else self.repo

    def poll(self, now: float) -> ConfigSnapshot | None:
        """Check the branch if due; returns a newly applied snapshot, else None."""
        from gitops import git as _git
        from gitops import load

        w = self.watch
        if not w.due(now):
            return None
        retry = w.trigger_pending
        w.begin_check(now)
        try:
            if self.mirror_dir:
                head = _git.sync_mirror(self.repo, self.mirror_dir, self.branch)
            else:
                head = _git.resolve_revision(self.repo, f"refs/heads/{self.branch}")
            ff = None
            if w.last_applied_revision is not None and head.sha != w.last_applied_revision.sha:
                ff = _git.is_ancestor(self.local_repo(), w.last_applied_revision.sha, head.sha)
            sig_ok, detail = (None, "")
            if w.require_signed:
                sig_ok, detail = _git.verify_commit(self.local_repo(), head.sha, self.gnupg_home,
                                                    self.allowed_signers_file)
        except RepoAccessError as e:
            w.fetch_failed(str(e))
            return None
        decision = w.observe_head(HeadObservation(head, ff, sig_ok, detail), retry_failed=retry)
        if decision.kind is not DecisionKind.LOAD:
            return None
        try:
            result = load(self.local_repo(), head.sha, self.snapshot)
        except RepoAccessError as e:
            w.rejected(head, str(e))
            return None
        if result.snapshot is None:
            err = FleetError(list(result.errors))
            w.rejected(head, str(err), result.errors)
            return None
        self.snapshot = result.snapshot
        w.loaded(head, result.snapshot.federation.git_poll_interval_s)
        return result.snapshot

