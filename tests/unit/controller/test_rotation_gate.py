"""The reconciler's commit gate for staged CA root rotation, with a fake store and explicit `now_s`.

A commit that skips a stage or retires a root with live leaves is treated exactly like an invalid
commit: the last applied revision stays, the attempt is recorded with an MF0407 problem, nothing
of it is rendered (rendering is what loads the CAs) and nothing is pushed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from federation.controller.reconciler import Reconciler, RenderInput, RenderOutput
from federation.controller.store import RevisionRecord, Store
from federation.core.rotation import DEFAULT_RETIRE_MARGIN_S
from federation.core.rotation_gate import ca_spec_from_dict, ca_spec_to_dict, decide_commit, gate_commit
from gitops.codes import CATALOGUE
from gitops.model import CaMode, CaRoot, CaSpec, ConfigSnapshot, Federation, Revision, TrustDomain
from gitops.problems import SourcePos
from ztunnel.api.config import ProxyConfig, ProxyMode, Stamp

TD = "east.mesh.local"
HOUR_S = 3600.0


def ca(*roots: str, signing: str) -> CaSpec:
    return CaSpec(roots=tuple(CaRoot(r, r == signing) for r in roots))


def snap(sha: str, spec: CaSpec, *, other: CaSpec | None = None) -> ConfigSnapshot:
    tds = {TD: TrustDomain(TD, ca=spec, pos=SourcePos("trust/east.yaml", 1),  # type: ignore[arg-type]
                           field_pos={"spec.ca.roots": SourcePos("trust/east.yaml", 9, 5)})}
    if other is not None:
        tds["west.mesh.local"] = TrustDomain("west.mesh.local", ca=other)  # type: ignore[arg-type]
    return ConfigSnapshot(revision=Revision(sha, f"commit {sha[:1]}"), federation=Federation("f", "mesh"),
                          clusters={}, trust_domains=tds, services={}, lab_clusters={}, destination_rules={},
                          authorization_policies=(), routes=())


class FakeStore:
    """The parts of `federation.controller.store.Store` the reconciler uses, in memory."""

    def __init__(self) -> None:
        self.attempts: list[RevisionRecord] = []
        self.leaves: dict[tuple[str, str], float] = {}
        self.ca_specs: dict[str, Any] | None = None
        self.broken = False

    def active_failovers(self) -> list[Any]:
        return []

    def record_attempt(self, sha: str, subject: str, ok: bool, problems: Sequence[dict[str, Any]] = (),
                       at_s: float | None = None) -> None:
        self.attempts.append(RevisionRecord(sha, subject, at_s or 0.0, "applied" if ok else "failed",
                                            tuple(problems)))

    def last_attempted(self) -> RevisionRecord | None:
        return self.attempts[-1] if self.attempts else None

    def last_applied(self) -> RevisionRecord | None:
        return next((a for a in reversed(self.attempts) if a.outcome == "applied"), None)

    def leaf_not_after(self, trust_domain: str) -> dict[str, float]:
        if self.broken:
            raise OSError("disk I/O error")
        return {root: na for (td, root), na in self.leaves.items() if td == trust_domain}

    def record_applied_ca_specs(self, specs: dict[str, Any]) -> None:
        self.ca_specs = dict(specs)

    def applied_ca_specs(self) -> dict[str, Any] | None:
        return self.ca_specs


class Render:
    """Records which revisions were rendered (rendering loads the CAs in the real controller)."""

    def __init__(self) -> None:
        self.revisions: list[str] = []

    def __call__(self, inp: RenderInput) -> RenderOutput:
        self.revisions.append(inp.snapshot.revision.sha)
        roots = ",".join(f"{r.name}{'*' if r.signing else ''}" for r in inp.snapshot.trust_domains[TD].ca.roots)
        pid = "ztunnel/east/n1"
        return RenderOutput({pid: ProxyConfig(pid, ProxyMode.NODE, "east", roots, TD,
                                              Stamp(0, inp.snapshot.revision.sha, 0))})


class Pushes:
    def __init__(self) -> None:
        self.calls: list[dict[str, ProxyConfig]] = []

    def __call__(self, configs: Mapping[str, ProxyConfig]) -> None:
        self.calls.append(dict(configs))


def make(store: Any) -> tuple[Reconciler, Render, Pushes]:
    render, pushes = Render(), Pushes()
    r = Reconciler(render, pushes, store, warmup_max_s=0.0)
    return r, render, pushes


def commit(r: Reconciler, s: ConfigSnapshot, now_s: float) -> None:
    r.on_snapshot(s, now_s=now_s)
    assert r.reconcile(now_s=now_s, force=True)


def sha(c: str) -> str:
    return c * 40


def applied_with(store: Any, spec: CaSpec, now_s: float = 0.0) -> tuple[Reconciler, Render, Pushes]:
    r, render, pushes = make(store)
    commit(r, snap(sha("a"), spec), now_s)
    assert r.status()["applied"]["revision"] == sha("a")
    return r, render, pushes


def assert_rejected(r: Reconciler, store: Any, render: Render, pushes: Pushes, rejected: str, applied: str,
                    *, pushes_before: int, words: Sequence[str]) -> None:
    st = r.status()
    assert st["applied"]["revision"] == applied
    assert st["desired"] == {"revision": rejected, "subject": f"commit {rejected[:1]}", "ok": False,
                             "at_s": st["desired"]["at_s"]}
    (p,) = st["problems"]
    assert p["code"] == "MF0407" and p["object"] == f"TrustDomain {TD}"
    assert (p["file"], p["line"]) == ("trust/east.yaml", 9)  # spec.ca.roots of the TrustDomain
    for w in words:
        assert w in p["message"], p["message"]
    assert rejected not in render.revisions          # never rendered, so its CAs were never loaded
    assert len(pushes.calls) == pushes_before        # proxies keep their config
    assert store.last_attempted().sha == rejected and store.last_attempted().outcome == "failed"
    assert store.last_applied().sha == applied


def test_mf0407_is_in_the_catalogue() -> None:
    assert CATALOGUE["MF0407"].title == "unsafe CA root rotation"


def test_skip_publish_is_rejected_and_last_applied_kept() -> None:
    store = FakeStore()
    r, render, pushes = applied_with(store, ca("root-1", signing="root-1"))
    commit(r, snap(sha("b"), ca("root-1", "root-2", signing="root-2")), 10.0)
    assert_rejected(r, store, render, pushes, sha("b"), sha("a"), pushes_before=1,
                    words=("root 'root-2' is new and already signing", "skips the publish stage", TD))
    # the last good snapshot is still rendered (observations and health keep flowing)
    assert render.revisions[-1] == sha("a") and r.snapshot is not None and r.snapshot.revision.sha == sha("a")


def test_skip_switch_is_rejected() -> None:
    store = FakeStore()
    r, render, pushes = applied_with(store, ca("root-1", "root-2", signing="root-1"))
    commit(r, snap(sha("b"), ca("root-2", signing="root-2")), 10.0)
    assert_rejected(r, store, render, pushes, sha("b"), sha("a"), pushes_before=1,
                    words=("root 'root-1' signs certificates in the applied spec", "skips the switch stage"))


def test_retire_with_live_leaves_is_rejected_until_they_expired() -> None:
    store = FakeStore()
    r, render, pushes = applied_with(store, ca("root-1", "root-2", signing="root-2"))
    store.leaves[(TD, "root-1")] = 24 * HOUR_S           # a leaf root-1 signed lives until t = 24 h
    store.leaves[(TD, "root-2")] = 30 * HOUR_S
    store.leaves[("west.mesh.local", "root-1")] = 1e12   # another domain's leaves do not count
    commit(r, snap(sha("c"), ca("root-2", signing="root-2")), 12 * HOUR_S)
    assert_rejected(r, store, render, pushes, sha("c"), sha("a"), pushes_before=1,
                    words=("retiring root 'root-1' would invalidate live certificates", "1970-01-02T00:00:00Z"))
    # within the verifier's clock-skew margin after the expiry it is still refused
    commit(r, snap(sha("d"), ca("root-2", signing="root-2")), 24 * HOUR_S + DEFAULT_RETIRE_MARGIN_S - 1)
    assert r.status()["applied"]["revision"] == sha("a") and r.status()["desired"]["revision"] == sha("d")
    # once the longest-lived leaf has expired (plus the margin), the same change is accepted
    commit(r, snap(sha("e"), ca("root-2", signing="root-2")), 24 * HOUR_S + DEFAULT_RETIRE_MARGIN_S + 1)
    st = r.status()
    assert st["applied"]["revision"] == sha("e") and st["desired"]["ok"] is True and st["problems"] == []
    assert render.revisions[-1] == sha("e") and pushes.calls[-1]["ztunnel/east/n1"].network == "root-2*"


def test_publish_switch_retire_in_three_commits() -> None:
    store = FakeStore()
    r, render, pushes = applied_with(store, ca("root-1", signing="root-1"))
    store.leaves[(TD, "root-1")] = 2 * HOUR_S
    stages = [
        (sha("b"), ca("root-1", "root-2", signing="root-1"), 1 * HOUR_S, "root-1*,root-2"),   # publish
        (sha("c"), ca("root-1", "root-2", signing="root-2"), 1.5 * HOUR_S, "root-1,root-2*"),  # switch
        (sha("d"), ca("root-2", signing="root-2"), 3 * HOUR_S, "root-2*"),                     # retire
    ]
    for rev, spec, now_s, rendered in stages:
        commit(r, snap(rev, spec), now_s)
        st = r.status()
        assert st["applied"]["revision"] == rev and st["problems"] == [], st
        assert pushes.calls[-1]["ztunnel/east/n1"].network == rendered
        assert store.ca_specs == {TD: ca_spec_to_dict(spec)}  # the gate's reference, checkpointed
    assert [a.outcome for a in store.attempts] == ["applied"] * 4
    assert render.revisions == [sha("a"), sha("b"), sha("c"), sha("d")]


def test_a_restarted_reconciler_gates_against_the_checkpointed_specs() -> None:
    store = FakeStore()
    applied_with(store, ca("root-1", signing="root-1"))
    r2, render2, pushes2 = make(store)  # restart: nothing in memory, the store remembers the specs
    assert r2.applied_ca == {TD: ca("root-1", signing="root-1")}
    r2.on_fallback_snapshot(snap(sha("a"), ca("root-1", signing="root-1")))  # last applied, reloaded from Git
    commit(r2, snap(sha("b"), ca("root-2", signing="root-2")), 10.0)
    st = r2.status()
    assert st["applied"]["revision"] == sha("a") and st["desired"]["revision"] == sha("b")
    assert st["problems"][0]["code"] == "MF0407"
    assert render2.revisions == [sha("a")] and pushes2.calls[-1]["ztunnel/east/n1"].network == "root-1*"


def test_new_and_removed_trust_domains_are_not_rotations() -> None:
    store = FakeStore()
    r, _render, _pushes = applied_with(store, ca("root-1", signing="root-1"))
    # a new domain with a root of its own, and the first domain unchanged: accepted
    commit(r, snap(sha("b"), ca("root-1", signing="root-1"), other=ca("west-1", signing="west-1")), 1.0)
    assert r.status()["applied"]["revision"] == sha("b")
    commit(r, snap(sha("c"), ca("root-1", signing="root-1")), 2.0)  # west removed again
    assert r.status()["applied"]["revision"] == sha("c")


def test_the_gate_fails_closed_when_the_store_cannot_be_read() -> None:
    store = FakeStore()
    r, render, pushes = applied_with(store, ca("root-1", signing="root-1"))
    store.broken = True
    commit(r, snap(sha("b"), ca("root-1", "root-2", signing="root-1")), 1.0)
    st = r.status()
    assert st["applied"]["revision"] == sha("a")
    (p,) = st["problems"]
    assert p["code"] == "MF-GATE" and "disk I/O error" in p["message"]
    assert sha("b") not in render.revisions and len(pushes.calls) == 1


@pytest.mark.parametrize(("before", "after", "leaves", "ok"), [
    (ca("r1", signing="r1"), ca("r1", "r2", signing="r1"), {}, True),                  # publish
    (ca("r1", signing="r1"), ca("r1", "r2", signing="r2"), {}, False),                 # skip publish
    (ca("r1", "r2", signing="r1"), ca("r1", "r2", signing="r2"), {"r1": 1e9}, True),   # switch, r1 stays
    (ca("r1", "r2", signing="r1"), ca("r2", signing="r2"), {}, False),                 # skip switch
    (ca("r1", "r2", signing="r2"), ca("r2", signing="r2"), {"r1": 1e9}, False),        # live leaves
    (ca("r1", "r2", signing="r2"), ca("r2", signing="r2"), {"r1": 10.0}, True),        # expired long ago
    (ca("r1", signing="r1"), CaSpec(mode=CaMode.EXTERNAL, roots=(), bundle_file="b.json"), {"r1": 1e9}, False),
])
def test_gate_commit_matrix(before: CaSpec, after: CaSpec, leaves: dict[str, float], ok: bool) -> None:
    problems = gate_commit({TD: before}, snap(sha("b"), after), lambda td: leaves if td == TD else {}, 1e6)
    assert (problems == []) is ok
    assert all(p.code == "MF0407" and p.obj is not None and p.obj.name == TD for p in problems)
    assert set(decide_commit({TD: before}, snap(sha("b"), after), lambda td: leaves, 1e6)) == {TD}


def test_ca_spec_round_trips_through_the_store_form() -> None:
    for spec in (ca("root-1", "root-2", signing="root-2"),
                 CaSpec(mode=CaMode.EXTERNAL, roots=(), bundle_file="trust/b.json", workload_cert_ttl_s=600.0)):
        assert ca_spec_from_dict(ca_spec_to_dict(spec)) == spec


def test_store_keeps_the_latest_leaf_not_after_per_root(tmp_path: Path) -> None:
    store = Store.in_state_dir(tmp_path / "state")
    store.record_leaf_issued(TD, "root-1", 200.0, at_s=1.0)
    store.record_leaf_issued(TD, "root-1", 100.0, at_s=2.0)   # a shorter TTL later does not lower it
    store.record_leaf_issued(TD, "root-2", 50.0, at_s=3.0)
    store.record_leaf_issued("west.mesh.local", "root-1", 999.0, at_s=3.0)
    assert store.leaf_not_after(TD) == {"root-1": 200.0, "root-2": 50.0}
    assert store.applied_ca_specs() is None
    store.record_applied_ca_specs({TD: ca_spec_to_dict(ca("root-1", signing="root-1"))})
    # a restarted reconciler on the real store recovers them
    r = Reconciler(Render(), Pushes(), Store(store.path))
    assert r.applied_ca == {TD: ca("root-1", signing="root-1")}
