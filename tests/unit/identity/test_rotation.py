"""Staged root rotation from Git, with live-certificate dates taken from real issuance."""

from __future__ import annotations

import pytest

from federation.controller.ca import TrustDomainCA
from federation.core.rotation import RotationStage, decide_rotation
from gitops.model import CaMode, CaRoot, CaSpec
from tests.unit.identity.forge import NOW_S

DAY_S = 24 * 3600.0


def spec(*roots: tuple[str, bool]) -> CaSpec:
    return CaSpec(CaMode.MANAGED, tuple(CaRoot(n, s) for n, s in roots))


OLD = spec(("root-1", True))
PUBLISHED = spec(("root-1", True), ("root-2", False))
SWITCHED = spec(("root-1", False), ("root-2", True))
RETIRED = spec(("root-2", True))


@pytest.fixture(scope="module")
def live_root1_until() -> float:
    """The latest not-after of a leaf root-1 signed just before the switch (a real 24 h SVID)."""
    ca = TrustDomainCA.create("east.mesh", now_s=NOW_S - 10 * DAY_S)
    svid = ca.issue_svid("spiffe://east.mesh/ns/shop/sa/api", now_s=NOW_S)
    return svid.not_after_s


def test_full_rotation_in_three_commits(live_root1_until: float) -> None:
    live = {"root-1": live_root1_until}
    d1 = decide_rotation(OLD, PUBLISHED, live, NOW_S)
    assert d1.accepted and d1.stages == (RotationStage.PUBLISH,)
    d2 = decide_rotation(PUBLISHED, SWITCHED, live, NOW_S + 60)
    assert d2.accepted and d2.stages == (RotationStage.SWITCH,)
    early = decide_rotation(SWITCHED, RETIRED, live, NOW_S + 3600)
    assert not early.accepted and "invalidate live certificates" in early.reason
    assert "retire it after" in early.reason
    margin_not_passed = decide_rotation(SWITCHED, RETIRED, live, live_root1_until + 30)
    assert not margin_not_passed.accepted
    d3 = decide_rotation(SWITCHED, RETIRED, live, live_root1_until + 121)
    assert d3.accepted and d3.stages == (RotationStage.RETIRE,)


@pytest.mark.parametrize(("prev", "new", "match"), [
    (OLD, spec(("root-1", False), ("root-2", True)), "skips the publish stage"),       # publish+switch
    (OLD, spec(("root-2", True)), "skips the publish stage"),                           # replace outright
    (PUBLISHED, spec(("root-2", True)), "skips the switch stage"),                      # switch+retire
    (OLD, spec(("root-1", True), ("root-2", True)), "exactly one root"),
    (OLD, spec(("root-1", False)), "exactly one root"),
    (OLD, spec(("root-1", True), ("root-1", False)), "unique"),
])
def test_skipping_a_stage_is_rejected(prev: CaSpec, new: CaSpec, match: str) -> None:
    d = decide_rotation(prev, new, {}, NOW_S, trust_domain="east.mesh")
    assert not d.accepted
    assert match in d.reason and d.reason.startswith("trust domain east.mesh")


def test_retire_without_live_leaves_and_publish_in_one_commit() -> None:
    d = decide_rotation(SWITCHED, spec(("root-2", True), ("root-3", False)), {"root-1": NOW_S - DAY_S}, NOW_S)
    assert d.accepted and set(d.stages) == {RotationStage.PUBLISH, RotationStage.RETIRE}


def test_initial_and_unchanged() -> None:
    assert decide_rotation(None, OLD, {}, NOW_S).stages == (RotationStage.INITIAL,)
    assert decide_rotation(OLD, OLD, {"root-1": NOW_S + DAY_S}, NOW_S).stages == (RotationStage.UNCHANGED,)


def test_mode_change_only_without_live_leaves(live_root1_until: float) -> None:
    ext = CaSpec(CaMode.EXTERNAL, bundle_file="trust/east.bundle.json")
    d = decide_rotation(OLD, ext, {"root-1": live_root1_until}, NOW_S)
    assert not d.accepted and "replaces every root at once" in d.reason
    assert decide_rotation(OLD, ext, {"root-1": live_root1_until}, live_root1_until + 600).accepted
    assert not decide_rotation(OLD, CaSpec(CaMode.EXTERNAL), {}, NOW_S).accepted  # needs bundleFile
