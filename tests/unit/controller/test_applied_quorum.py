"""Issue 11 item 8: "applied" is recorded when the proxies ACK a revision, not when it is pushed.

The staged root rotation gate judges a commit against the CA specs of the applied revision; before,
that was recorded before the push, so a "switch" commit could pass while no proxy had received
the bundle of the "publish" commit before it. Here the reconciler asks a fake config service for
the rollout facts (`federation.core.rollout`), with explicit `now_s`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from federation.controller.reconciler import Reconciler
from federation.controller.store import Store
from federation.core.rollout import ProxyRollout
from federation.core.rotation_gate import ca_spec_to_dict
from tests.unit.controller.test_rotation_gate import TD, Pushes, Render, ca, sha, snap

PID = "ztunnel/east/n1"


class Proxies:
    """What the config service reports: per rendered proxy, whether it runs a revision."""

    def __init__(self) -> None:
        self.acked: set[str] = set()          # revisions the proxy ACKed
        self.nacked: set[str] = set()
        self.connected = True
        self.asked: list[str] = []

    def __call__(self, revision: str, proxy_ids: Sequence[str]) -> list[ProxyRollout]:
        self.asked.append(revision)
        state = "acked" if revision in self.acked else "nacked" if revision in self.nacked else "pending"
        return [ProxyRollout(pid, pid.split("/")[1], self.connected, state) for pid in proxy_ids]


def make(tmp_path: Path) -> tuple[Reconciler, Store, Render, Pushes, Proxies]:
    store, render, pushes, proxies = Store.in_state_dir(tmp_path / "state"), Render(), Pushes(), Proxies()
    r = Reconciler(render, pushes, store, warmup_max_s=0.0, rollout=proxies, apply_timeout_s=60.0)
    return r, store, render, pushes, proxies


def commit(r: Reconciler, rev: str, spec: object, now_s: float) -> None:
    r.on_snapshot(snap(rev, spec), now_s=now_s)  # type: ignore[arg-type]
    assert r.reconcile(now_s=now_s, force=True)


def test_a_revision_is_applying_until_the_proxies_ack_it(tmp_path: Path) -> None:
    r, store, _render, pushes, proxies = make(tmp_path)
    commit(r, sha("a"), ca("root-1", signing="root-1"), 0.0)
    st = r.status()
    assert st["applied"] == {} and st["applying"]["revision"] == sha("a")
    assert st["applying"]["pending"] == [PID] and store.last_applied() is None
    assert store.last_attempted().outcome == "applying"              # type: ignore[union-attr]
    assert pushes.calls                                              # pushed, but not applied
    proxies.acked.add(sha("a"))
    r.reconcile(now_s=1.0, force=True)
    st = r.status()
    assert st["applied"]["revision"] == sha("a") and st["applying"] is None
    assert store.last_applied().sha == sha("a")                       # type: ignore[union-attr]
    assert store.applied_ca_specs() == {TD: ca_spec_to_dict(ca("root-1", signing="root-1"))}


def test_the_rotation_gate_judges_a_commit_against_what_the_proxies_acked(tmp_path: Path) -> None:
    r, store, render, _pushes, proxies = make(tmp_path)
    proxies.acked.add(sha("a"))
    commit(r, sha("a"), ca("root-1", signing="root-1"), 0.0)
    assert r.status()["applied"]["revision"] == sha("a")
    # publish root-2: rendered and pushed, the proxies have not ACKed the new bundle yet
    commit(r, sha("b"), ca("root-1", "root-2", signing="root-1"), 10.0)
    assert r.status()["applied"]["revision"] == sha("a")
    assert store.applied_ca_specs() == {TD: ca_spec_to_dict(ca("root-1", signing="root-1"))}
    # switch to root-2 now would sign leaves the proxies cannot verify yet: the commit waits
    commit(r, sha("c"), ca("root-1", "root-2", signing="root-2"), 11.0)
    st = r.status()
    assert st["waiting"]["revision"] == sha("c") and st["waiting"]["behind"] == sha("b")
    assert sha("c") not in render.revisions and st["desired"]["revision"] == sha("b") and st["problems"] == []
    r.reconcile(now_s=12.0, force=True)
    assert sha("c") not in render.revisions                            # still waiting
    # the proxies ACK the published bundle: b is applied, and c goes through the gate at once
    proxies.acked.add(sha("b"))
    r.reconcile(now_s=13.0, force=True)
    assert r.status()["applied"]["revision"] == sha("b")
    assert r.due(13.1) and r.reconcile(now_s=13.1)                   # re-gated right after the debounce
    assert render.revisions[-1] == sha("c") and r.status()["applying"]["revision"] == sha("c")
    assert r.status()["waiting"] is None


def test_a_revision_the_proxies_refuse_is_never_applied_and_overdue_is_reported(tmp_path: Path) -> None:
    r, store, render, _pushes, proxies = make(tmp_path)
    proxies.acked.add(sha("a"))
    commit(r, sha("a"), ca("root-1", signing="root-1"), 0.0)
    proxies.nacked.add(sha("b"))
    commit(r, sha("b"), ca("root-1", "root-2", signing="root-1"), 10.0)
    r.reconcile(now_s=30.0, force=True)
    st = r.status()
    assert st["applied"]["revision"] == sha("a") and st["applying"]["nacked"] == [PID]
    assert not st["applying"]["overdue"]
    r.reconcile(now_s=71.0, force=True)
    assert r.status()["applying"]["overdue"] is True
    # a switch commit behind an overdue publish is rejected (not held forever)
    commit(r, sha("c"), ca("root-1", "root-2", signing="root-2"), 72.0)
    st = r.status()
    assert st["desired"]["revision"] == sha("c") and st["desired"]["ok"] is False
    assert st["problems"][0]["code"] == "MF0407" and sha("c") not in render.revisions
    assert store.last_applied().sha == sha("a")                        # type: ignore[union-attr]
    from federation.controller.checks import build_checks

    checks = {c["check"]: c for c in build_checks({"applying": st["applying"]}, 72.0)}
    failed = checks["rendered revision acknowledged by the proxies"]
    assert not failed["ok"] and PID in failed["cause"] and "NACK" in failed["hint"]


def test_disconnected_proxies_do_not_hold_a_revision_back(tmp_path: Path) -> None:
    r, _store, _render, _pushes, proxies = make(tmp_path)
    proxies.connected = False
    commit(r, sha("a"), ca("root-1", signing="root-1"), 0.0)
    assert r.status()["applied"]["revision"] == sha("a")


def test_a_restart_while_applying_keeps_the_previous_applied_revision(tmp_path: Path) -> None:
    r, store, _render, _pushes, proxies = make(tmp_path)
    proxies.acked.add(sha("a"))
    commit(r, sha("a"), ca("root-1", signing="root-1"), 0.0)
    commit(r, sha("b"), ca("root-1", "root-2", signing="root-1"), 10.0)
    again = Reconciler(Render(), Pushes(), Store(store.path), warmup_max_s=0.0, rollout=Proxies())
    st = again.status()
    assert st["applied"]["revision"] == sha("a") and st["desired"]["revision"] == sha("b")
    assert st["desired"]["ok"] is True and again.applied_ca == {TD: ca("root-1", signing="root-1")}
