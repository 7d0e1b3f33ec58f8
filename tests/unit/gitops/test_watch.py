"""BranchWatch: Flux-style lastApplied/lastAttempted semantics as a pure state machine."""

from __future__ import annotations

import pytest

from gitops.model import Revision
from gitops.watch import BranchWatch, DecisionKind, HeadObservation, InvalidTransition, WatchPhase

A = Revision("a" * 40, "first")
B = Revision("b" * 40, "second (bad)")
C = Revision("c" * 40, "third")


def _check(w: BranchWatch, now: float, head: Revision, ff: bool | None = True, sig: bool | None = None) -> DecisionKind:
    assert w.due(now)
    w.begin_check(now)
    return w.observe_head(HeadObservation(head, ff, sig)).kind


def test_apply_then_bad_commit_keeps_last_good() -> None:
    w = BranchWatch(poll_interval_s=10)
    assert _check(w, 0, A, ff=None) is DecisionKind.LOAD
    w.loaded(A, poll_interval_s=15)
    assert (w.last_applied_revision, w.last_error, w.poll_interval_s) == (A, None, 15)
    assert not w.due(9.9) and w.due(10)  # the new interval applies from the next check on
    assert _check(w, 15, B) is DecisionKind.LOAD
    w.rejected(B, "MF0505 ...")
    assert w.last_applied_revision == A and w.last_attempted_revision == B and w.last_error == "MF0505 ..."
    # the same bad head is not retried on every poll ...
    assert _check(w, 30, B) is DecisionKind.SKIP
    # ... but an explicit trigger retries it, and a new head is loaded
    w.trigger()
    assert w.due(31)
    w.begin_check(31)
    assert w.observe_head(HeadObservation(B, True, None), retry_failed=True).kind is DecisionKind.LOAD
    w.rejected(B, "still bad")
    assert _check(w, 50, C) is DecisionKind.LOAD
    w.loaded(C)
    assert (w.last_applied_revision, w.last_attempted_revision, w.last_error) == (C, C, None)


def test_up_to_date_is_skipped() -> None:
    w = BranchWatch()
    _check(w, 0, A, ff=None)
    w.loaded(A)
    assert _check(w, 100, A) is DecisionKind.SKIP
    assert w.phase is WatchPhase.IDLE


@pytest.mark.parametrize(("allow", "expected"), [(False, DecisionKind.REJECT), (True, DecisionKind.LOAD)])
def test_non_fast_forward(allow: bool, expected: DecisionKind) -> None:
    w = BranchWatch(allow_non_fast_forward=allow)
    _check(w, 0, A, ff=None)
    w.loaded(A)
    assert _check(w, 100, B, ff=False) is expected
    if expected is DecisionKind.REJECT:
        assert w.last_applied_revision == A and w.last_error and "history was rewritten" in w.last_error


@pytest.mark.parametrize(("sig", "expected"), [(False, DecisionKind.REJECT), (None, DecisionKind.REJECT),
                                               (True, DecisionKind.LOAD)])
def test_signed_commits_required(sig: bool | None, expected: DecisionKind) -> None:
    w = BranchWatch(require_signed=True)
    assert _check(w, 0, A, ff=None, sig=sig) is expected


def test_transitions_outside_the_table_raise() -> None:
    w = BranchWatch()
    with pytest.raises(InvalidTransition):
        w.loaded(A)
    w.begin_check(0)
    with pytest.raises(InvalidTransition):
        w.begin_check(0)
    w.fetch_failed("network down")
    assert w.phase is WatchPhase.IDLE and w.last_error == "network down"


def test_error_clears_when_the_head_is_the_applied_revision_again() -> None:
    """A fetch failure (or a bad commit that was reverted) must not stay reported once the branch
    head is back at the applied revision: last_error is None iff attempted == applied."""
    w = BranchWatch()
    _check(w, 0, A, ff=None)
    w.loaded(A)
    w.begin_check(100)
    w.fetch_failed("network down")
    assert _check(w, 200, A) is DecisionKind.SKIP
    assert (w.last_attempted_revision, w.last_error) == (A, None)
    assert _check(w, 300, B) is DecisionKind.LOAD
    w.rejected(B, "MF0505 ...")
    assert _check(w, 400, A, ff=False) is DecisionKind.SKIP  # B reverted by a force-push back to A
    assert (w.last_attempted_revision, w.last_error, w.last_problems) == (A, None, ())


def test_fetch_errors_are_kept_apart_from_rejections() -> None:
    """`last_fetch_error` says whether the repository could be read; a rejected commit leaves it
    None (`meshfed check` must not call the repository unreachable because a commit is invalid)."""
    w = BranchWatch()
    _check(w, 0, A, ff=None)
    w.loaded(A)
    _check(w, 100, B)
    w.rejected(B, "MF0505 ...")
    assert w.last_error == "MF0505 ..." and w.last_fetch_error is None
    w.begin_check(200)
    w.fetch_failed("network down")
    assert w.last_fetch_error == "network down"
    _check(w, 300, B)   # the branch was read again: reachable, whatever the commit's verdict
    assert w.last_fetch_error is None
