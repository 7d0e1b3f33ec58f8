"""A silent cut, as the controller sees it: east's checkout pods stay *ready* in the Kubernetes API
(nothing in discovery changes), but every connection to them times out, so the proxies that dial
them eject them locally and say so in their health reports. The reconciler hands the vote to the
failover engine, which ejects them, fails east's clients over to the next tier (south) and back
once the reports stop ejecting — each step an event with its trigger, the DestinationRule's file
and line, and the commit — and explain shows the ejection straight from the engine.

Driven like the Ray host drives it: `on_snapshot`/`on_observation`/`on_health` with explicit
`now_s`, `reconcile(now_s)`, the real `CoreRender`, the example fleet, the status store.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gitops
from federation.controller.reconciler import CoreRender, Reconciler
from federation.controller.store import Store
from federation.core.events import EndpointEjected, EndpointUnejected, FailedBack, FailedOver
from federation.core.explain import explain_service, explain_text
from federation.core.health import EndpointReport
from federation.core.offline import offline_observations
from ztunnel.api.config import ProxyConfig

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "fleet"
CHECKOUT = "checkout.shop.svc.clusterset.local"
EAST_PODS = ["east/shop/checkout-0", "east/shop/checkout-1"]
# the proxies that dial east's checkout pods directly: east's node proxies and east's gateway
OBSERVERS = ["ztunnel/east/node-1", "ztunnel/east/node-2", "gateway/east"]
POLICY_FILE = re.compile(r"^policies/shop/checkout\.yaml:\d+:\d+$")


class Pushes:
    def __init__(self) -> None:
        self.last: dict[str, ProxyConfig] = {}

    def __call__(self, changed: object) -> None:
        self.last.update(changed)  # type: ignore[call-overload]


def report(ejected: bool) -> list[EndpointReport]:
    return [EndpointReport(CHECKOUT, uid, "east", 0 if ejected else 5, 4 if ejected else 0, ejected)
            for uid in EAST_PODS]


def health_in(configs: dict[str, ProxyConfig], pid: str) -> dict[str, bool]:
    svc = next(s for s in configs[pid].services if s.hostname == CHECKOUT)
    return {e.workload_uid: e.healthy for e in svc.endpoints if e.workload_uid in EAST_PODS}


def checkout_events(r: Reconciler, since: int) -> list[object]:
    return [ev for ev in r.events[since:]
            if isinstance(ev, EndpointEjected | EndpointUnejected | FailedOver | FailedBack) and ev.service == CHECKOUT]


@pytest.mark.parametrize("heal", ["reports say healthy", "reports stop (TTL)"])
def test_silent_cut_in_east_fails_over_to_south_and_back(tmp_path: Path, heal: str) -> None:
    snap = gitops.load_worktree(EXAMPLE)
    sha = snap.revision.sha
    store = Store.in_state_dir(tmp_path / "state")
    render, pushes = CoreRender(), Pushes()
    r = Reconciler(render, pushes, store)
    r.on_snapshot(snap, now_s=0.0)
    for obs in offline_observations(snap, observed_at_s=0.0):   # every pod ready, now and throughout
        assert all(e.ready for e in obs.endpoints)
        r.on_observation(obs, now_s=0.0)
    assert r.reconcile(now_s=1.0)
    assert r.warm and health_in(pushes.last, "ztunnel/east/node-1") == dict.fromkeys(EAST_PODS, True)
    mark = len(r.events)

    # -- the cut: the observers' local outlier detection ejects both pods; discovery sees nothing
    for pid in OBSERVERS:
        r.on_health(pid, report(ejected=True), now_s=2.0)
    assert r.reconcile(now_s=2.2)
    cut = checkout_events(r, mark)
    assert [type(ev).__name__ for ev in cut] == ["EndpointEjected", "EndpointEjected", "FailedOver"]
    ejected, over = cut[:2], cut[2]
    assert [ev.endpoint for ev in ejected] == EAST_PODS  # type: ignore[attr-defined]
    for ev in ejected:
        assert isinstance(ev, EndpointEjected) and ev.reason == "HealthReportQuorum" and ev.at_s == 2.2
        assert ev.provenance.trigger.startswith(f"health reports: 3 of 3 proxies observing {ev.endpoint} eject it")
        assert ev.provenance.policy == "DestinationRule shop/checkout"
        assert POLICY_FILE.match(ev.provenance.file) and ev.provenance.commit == sha
    assert isinstance(over, FailedOver)
    assert (over.source, over.to_clusters, over.shares[0]) == ("east", ("south",), 0.0)
    assert over.provenance.trigger == f"EndpointEjected {', '.join(EAST_PODS)} (HealthReportQuorum)"
    assert POLICY_FILE.match(over.provenance.file) and over.provenance.commit == sha

    # every proxy that routes to them gets them unhealthy: east's node proxies and east's gateway
    for pid in ("ztunnel/east/node-1", "ztunnel/east/node-2", "gateway/east"):
        assert health_in(pushes.last, pid) == dict.fromkeys(EAST_PODS, False), pid
    assert r.status()["unhealthy_endpoints"] == [f"{CHECKOUT} {uid}" for uid in EAST_PODS]

    # explain, on the live engine and without any patching, shows the ejection and its reason
    data = explain_service(render.engine, "checkout", "east")
    [t0, *_] = data["tiers"]
    assert t0["share"] == 0.0 and [g["cluster"] for g in t0["groups"]] == ["east"]
    eps = {e["uid"]: e for e in t0["groups"][0]["endpoints"]}
    assert set(eps) == set(EAST_PODS)
    assert all(e["ejected"] and e["reason"] == "HealthReportQuorum" and not e["healthy"] for e in eps.values())
    assert all(p["ready"] and p["ejected"] for p in t0["groups"][0]["pods"])   # ready, yet ejected
    assert data["ejections"]["active"] == EAST_PODS
    assert "ejected for everyone (quorum of proxies' health reports)" in explain_text(data)

    # the failover history has it, with provenance (what `meshfed failover history` shows)
    hist = [(h.kind, h.from_cluster, h.to_cluster) for h in store.failover_history(CHECKOUT)]
    assert hist == [("EndpointEjected", "east", ""), ("EndpointEjected", "east", ""), ("FailedOver", "east", "south")]
    row = store.failover_history(CHECKOUT)[-1]
    assert POLICY_FILE.match(row.policy_file) and row.revision == sha and "HealthReportQuorum" in row.trigger

    # nothing new while the cut lasts
    mark = len(r.events)
    for pid in OBSERVERS:
        r.on_health(pid, report(ejected=True), now_s=5.0)
    r.reconcile(now_s=5.2, force=True)
    assert checkout_events(r, mark) == []

    # -- the heal: the observers' ejections expire and they say so, or they stop reporting at all
    mark = len(r.events)
    if heal == "reports say healthy":
        for pid in OBSERVERS:
            r.on_health(pid, report(ejected=False), now_s=20.0)
        assert r.reconcile(now_s=20.2)
        at_s, vote = 20.2, "health reports: 0 of 3 proxies observing {} eject it"
    else:
        assert r.reconcile(now_s=34.0, force=True) and checkout_events(r, mark) == []  # reports 29 s old: fresh
        assert r.reconcile(now_s=36.0, force=True)                                    # 31 s: the vote forgets
        at_s, vote = 36.0, "health reports: 0 of 0 proxies observing {} eject it"
    back = checkout_events(r, mark)
    assert [type(ev).__name__ for ev in back] == ["EndpointUnejected", "EndpointUnejected", "FailedBack"]
    for ev in back[:2]:
        assert isinstance(ev, EndpointUnejected) and ev.at_s == at_s and ev.ejected_for_s == pytest.approx(at_s - 2.2)
        assert ev.provenance.trigger.startswith(vote.format(ev.endpoint))
        assert POLICY_FILE.match(ev.provenance.file) and ev.provenance.commit == sha
    fb = back[2]
    assert isinstance(fb, FailedBack) and (fb.source, fb.shares[0]) == ("east", 1.0)
    assert fb.provenance.trigger == f"EndpointUnejected {', '.join(EAST_PODS)}"
    assert POLICY_FILE.match(fb.provenance.file) and fb.provenance.commit == sha
    assert health_in(pushes.last, "ztunnel/east/node-1") == dict.fromkeys(EAST_PODS, True)
    assert r.status()["unhealthy_endpoints"] == []
    assert [h.kind for h in store.failover_history(CHECKOUT)][-3:] == ["EndpointUnejected", "EndpointUnejected",
                                                                       "FailedBack"]


def test_a_new_commit_during_the_cut_neither_reannounces_nor_forgets_the_ejection(tmp_path: Path) -> None:
    """CoreRender rebuilds the engine on a new revision; the ejections carry over (the vote has not
    changed), without a second EndpointEjected, and the failback still comes when the vote lifts."""
    from dataclasses import replace

    from gitops.model import Revision

    snap = gitops.load_worktree(EXAMPLE)
    render, pushes = CoreRender(), Pushes()
    r = Reconciler(render, pushes)
    r.on_snapshot(snap, now_s=0.0)
    for obs in offline_observations(snap, observed_at_s=0.0):
        r.on_observation(obs, now_s=0.0)
    r.reconcile(now_s=1.0)
    for pid in OBSERVERS:
        r.on_health(pid, report(ejected=True), now_s=2.0)
    r.reconcile(now_s=2.2)
    mark = len(r.events)
    r.on_snapshot(replace(snap, revision=Revision("f" * 40, "unrelated change")), now_s=3.0)
    assert r.reconcile(now_s=3.2)
    assert r.applied["revision"] == "f" * 40
    assert checkout_events(r, mark) == []
    assert render.engine.ejected_endpoints() == {(CHECKOUT, uid) for uid in EAST_PODS}
    assert health_in(pushes.last, "ztunnel/east/node-1") == dict.fromkeys(EAST_PODS, False)
    for pid in OBSERVERS:
        r.on_health(pid, report(ejected=False), now_s=4.0)
    r.reconcile(now_s=4.2)
    back = checkout_events(r, mark)
    assert [type(ev).__name__ for ev in back] == ["EndpointUnejected", "EndpointUnejected", "FailedBack"]
    assert all(ev.provenance.commit == "f" * 40 for ev in back)  # type: ignore[attr-defined]


def test_a_failed_rebuild_does_not_leave_a_new_engine_beside_the_old_renderer() -> None:
    """Review finding: CoreRender swapped in the new revision's engine before fetching the CA roots
    (a Ray call); when that call failed, the old revision kept rendering with the old renderer while
    ejections and observations went to the new engine — a silent cut then never reached the configs."""
    from dataclasses import replace

    snap = gitops.load_worktree(EXAMPLE)
    fail_for = {"b" * 40}

    def roots(s: object) -> dict[str, tuple[str, ...]]:
        sha = s.revision.sha  # type: ignore[attr-defined]
        if sha in fail_for:
            fail_for.discard(sha)
            raise ConnectionError("config server restarting")
        return {}

    render, pushes = CoreRender(bundle_roots=roots), Pushes()
    r = Reconciler(render, pushes)
    r.on_snapshot(snap, now_s=0.0)
    for obs in offline_observations(snap, observed_at_s=0.0):
        r.on_observation(obs, now_s=0.0)
    assert r.reconcile(now_s=1.0)
    r.on_snapshot(replace(snap, revision=replace(snap.revision, sha="b" * 40)), now_s=1.5)
    assert r.reconcile(now_s=2.0)                      # the render fails: the old revision keeps serving
    assert r.failures and r.failures[-1].step == "render" and r.applied["revision"] == snap.revision.sha
    for pid in OBSERVERS:                              # the silent cut, during the old revision
        r.on_health(pid, report(ejected=True), now_s=3.0)
    assert r.reconcile(now_s=3.2)
    assert health_in(pushes.last, "ztunnel/east/node-1") == dict.fromkeys(EAST_PODS, False)
    assert any(isinstance(ev, FailedOver) and ev.service == CHECKOUT for ev in r.events)
    assert render.engine is not None and render.engine.snapshot.revision.sha == snap.revision.sha


def test_one_confused_proxy_cannot_eject_for_the_whole_mesh(tmp_path: Path) -> None:
    """Health-report poisoning, on the real render: west's node proxies do not route to east's pods
    (they reach east through its gateway), so their reports on them are not votes, however many;
    one of east's observers alone is not a quorum either (three proxies route to the pods). Only a
    second observer agreeing ejects them."""
    snap = gitops.load_worktree(EXAMPLE)
    render, pushes = CoreRender(), Pushes()
    r = Reconciler(render, pushes)
    r.on_snapshot(snap, now_s=0.0)
    for obs in offline_observations(snap, observed_at_s=0.0):
        r.on_observation(obs, now_s=0.0)
    assert r.reconcile(now_s=1.0)
    assert sorted(r.aggregator.observers[(CHECKOUT, EAST_PODS[0])]) == sorted(OBSERVERS)
    mark = len(r.events)
    for t in range(5):
        for pid in ("ztunnel/west/node-1", "ztunnel/west/node-2", "gateway/west", "ztunnel/south/node-1"):
            r.on_health(pid, report(ejected=True), now_s=2.0 + t)
        r.on_health(OBSERVERS[0], report(ejected=True), now_s=2.0 + t)
        r.reconcile(now_s=2.5 + t, force=True)
    assert checkout_events(r, mark) == []
    assert health_in(pushes.last, "ztunnel/east/node-2") == dict.fromkeys(EAST_PODS, True)
    assert r.status()["health_reports_ignored"] == 5 * 4 * len(EAST_PODS)
    r.on_health(OBSERVERS[2], report(ejected=True), now_s=8.0)   # east's gateway agrees
    assert r.reconcile(now_s=8.2)
    assert [type(ev).__name__ for ev in checkout_events(r, mark)] == ["EndpointEjected", "EndpointEjected",
                                                                       "FailedOver"]
