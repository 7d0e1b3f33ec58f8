"""The reconciler's process without Ray or threads: `step(now_s)` decides when to reconcile, the
outbox sends only differences (everything again on "resync"), and the Git feed's delivery order."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest

from benchmarks.simproxy import make_config
from federation.controller import reconcile_service
from federation.controller.checks import LOOP_STALL_S, build_checks
from federation.controller.git_feed import GitFeed
from federation.controller.reconcile_service import IDLE_WAIT_S, DeltaOutbox, ReconcileService
from federation.controller.reconciler import RenderInput, RenderOutput
from federation.controller.sources import FleetFailure
from federation.controller.wire import decode_config_deltas
from gitops.model import ConfigSnapshot, Federation, Revision
from ztunnel.api.config import ProxyConfig, Stamp


def snap(sha: str) -> ConfigSnapshot:
    return ConfigSnapshot(revision=Revision(sha, "msg"), federation=Federation("f", "mesh"), clusters={},
                          trust_domains={}, services={}, lab_clusters={}, destination_rules={},
                          authorization_policies=(), routes=())


def cfg(pid: str, rev: str, version: int, services: int = 2) -> ProxyConfig:
    return replace(make_config(pid, rev, services=services), stamp=Stamp(1, rev, version))


class Sent:
    """The config service's side of the outbox: records blobs, answers as told."""

    def __init__(self, answers: Sequence[str] = ()) -> None:
        self.blobs: list[bytes] = []
        self.answers = list(answers)

    def __call__(self, blob: bytes) -> str:
        self.blobs.append(blob)
        return self.answers.pop(0) if self.answers else "ok"

    def deltas(self, i: int) -> dict[str, Any]:
        return {d.proxy_id: d.delta for d in decode_config_deltas(self.blobs[i])}


def test_the_outbox_sends_differences_and_everything_on_resync() -> None:
    sent = Sent(answers=["ok", "ok", "ok", "resync"])
    box = DeltaOutbox(sent)
    a1, b1 = cfg("ztunnel/a/n1", "r1", 1), cfg("ztunnel/a/n2", "r1", 1)
    box.push({"ztunnel/a/n1": a1, "ztunnel/a/n2": b1})
    assert {p: d.base_version for p, d in sent.deltas(0).items()} == {"ztunnel/a/n1": 0, "ztunnel/a/n2": 0}
    a2 = cfg("ztunnel/a/n1", "r2", 2, services=3)
    box.push({"ztunnel/a/n1": a2})
    (delta,) = sent.deltas(1).values()
    assert delta.base_version == 1 and sum(len(v) for v in delta.upserts.values()) == 1   # svc2 only
    # n2 is no longer rendered: the service is told to forget it
    box.remove(["ztunnel/a/n2"])
    assert [(d.proxy_id, d.remove) for d in decode_config_deltas(sent.blobs[2])] == [("ztunnel/a/n2", True)]
    # the service lost its state ("resync"): everything current, in full
    a3 = cfg("ztunnel/a/n1", "r3", 3, services=1)
    box.push({"ztunnel/a/n1": a3})
    assert len(sent.blobs) == 5 and box.resyncs == 1
    assert {p: d.base_version for p, d in sent.deltas(4).items()} == {"ztunnel/a/n1": 0}
    assert box.last_sent == {"ztunnel/a/n1": a3}


def test_a_send_that_fails_records_nothing_so_the_retry_sends_the_same_delta() -> None:
    """Issue 11 item 7: the outbox recorded a config as sent before sending it, so a failed send was
    lost and the next delta was computed from a base the service never had."""
    sent = Sent()
    box = DeltaOutbox(sent)
    a1 = cfg("ztunnel/a/n1", "r1", 1)
    box.push({"ztunnel/a/n1": a1})
    a2 = cfg("ztunnel/a/n1", "r2", 2, services=3)

    def broken(_blob: bytes) -> str:
        raise ConnectionError("config service restarting")

    box.send = broken
    with pytest.raises(ConnectionError):
        box.push({"ztunnel/a/n1": a2})
    assert box.last_sent == {"ztunnel/a/n1": a1}
    box.send = sent
    box.push({"ztunnel/a/n1": a2})
    (delta,) = sent.deltas(1).values()
    assert delta.base_version == 1 and box.last_sent == {"ztunnel/a/n1": a2}


@dataclass
class EndpointEjected:   # the name the service counts (federation.core.events.EndpointEjected)
    enforced: bool


class Render:
    """One node proxy; its version follows the number of renders."""

    def __init__(self) -> None:
        self.calls = 0
        self.events: list[Any] = []

    def __call__(self, inp: RenderInput) -> RenderOutput:
        self.calls += 1
        out = RenderOutput({"ztunnel/a/n1": cfg("ztunnel/a/n1", inp.snapshot.revision.sha, 1)}, self.events)
        self.events = []
        return out


def service(now: list[float], sent: Sent, render: Render) -> ReconcileService:
    return ReconcileService(None, sent, debounce_after_s=0.1, debounce_max_s=10.0, clock=lambda: now[0],
                            tick_interval_s=1.0, render=render)


def test_step_reconciles_when_due_and_ticks_when_idle() -> None:
    now, sent, render = [100.0], Sent(), Render()
    svc = service(now, sent, render)
    assert svc.wait_s(100.0) == IDLE_WAIT_S and svc.missing_inputs()
    assert not svc.step(100.0)                           # nothing to do yet
    svc.on_snapshot(snap("a" * 40))
    assert svc.wait_s(100.0) == 0.0 and not svc.missing_inputs()   # a commit is due at once
    assert svc.step(100.0) and render.calls == 1 and len(sent.blobs) == 1
    assert svc.snapshot() is not None
    assert not svc.step(100.9)                           # idle, not yet a tick
    render.events = [EndpointEjected(True), EndpointEjected(False)]
    assert svc.step(102.0) and render.calls == 2         # a tick: leases and ejections expire with time
    assert len(sent.blobs) == 1                          # the same content: nothing pushed
    assert (svc.ejections_detected, svc.ejections_enforced) == (2, 1) and svc.rec.events == []
    st = svc.status()
    assert st["applied"]["revision"] == "a" * 40 and st["fleet_clusters"] == {}
    assert st["ejections_detected"] == 2 and st["reconciles"] == 2


def test_idle_ticks_happen_when_the_loop_wakes_more_often_than_the_tick_interval() -> None:
    """The loop wakes every IDLE_WAIT_S (0.5 s) with nothing to do; the core must still be ticked
    every tick_interval_s (1 s) so that leases and ejections expire without input."""
    now, sent, render = [100.0], Sent(), Render()
    svc = service(now, sent, render)
    svc.on_snapshot(snap("a" * 40))
    assert svc.step(100.1) and render.calls == 1
    t = 100.1
    for _ in range(10):                                  # 5 s of idle wake-ups every 0.5 s
        t += IDLE_WAIT_S
        svc.step(t)
    assert render.calls >= 1 + 4                         # at least one tick per second


def test_resync_sends_every_config_in_full() -> None:
    now, sent, render = [0.0], Sent(), Render()
    svc = service(now, sent, render)
    svc.on_snapshot(snap("b" * 40))
    svc.step(1.0)
    svc.resync()
    assert {p: d.base_version for p, d in sent.deltas(1).items()} == {"ztunnel/a/n1": 0}


def test_a_step_that_raises_is_counted_and_logged_and_the_next_turn_runs(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Review note (b): an exception out of `step` ended the reconcile thread silently."""
    now, sent, render = [100.0], Sent(), Render()
    svc = service(now, sent, render)
    real_due = svc.rec.due
    calls: list[float] = []

    def due(now_s: float) -> bool:
        calls.append(now_s)
        if len(calls) == 1:
            raise RuntimeError("disk I/O error")
        return real_due(now_s)

    monkeypatch.setattr(svc.rec, "due", due)
    svc.on_snapshot(snap("a" * 40))                       # wakes the loop: turn() does not wait
    now[0] = 100.2
    with caplog.at_level("ERROR", logger="federation.controller.reconcile_service"):
        assert not svc.turn()
    assert (svc.loop_failures, svc.last_step_at_s) == (1, None) and "disk I/O error" in svc.last_loop_error
    assert "a reconcile step failed" in caplog.text
    svc.on_snapshot(snap("a" * 40))
    now[0] = 100.4
    assert svc.turn() and render.calls == 1 and svc.last_step_at_s == 100.4
    loop = svc.status()["loop"]
    assert loop["failures_total"] == 1 and loop["last_step_at_s"] == 100.4 and loop["alive"] is False  # not started


def test_the_loop_thread_survives_a_step_that_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile_service, "LOOP_FAILURE_BACKOFF_S", 0.01)
    sent, render = Sent(), Render()
    svc = ReconcileService(None, sent, debounce_after_s=0.0, render=render)
    real_step, boom = svc.step, [RuntimeError("boom")]

    def step(now_s: float) -> bool:
        if boom:
            raise boom.pop()
        return real_step(now_s)

    monkeypatch.setattr(svc, "step", step)
    svc.start()
    try:
        svc.on_snapshot(snap("a" * 40))
        deadline = time.monotonic() + 10.0
        while render.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert render.calls >= 1 and svc.loop_failures == 1
        assert svc.loop_status()["alive"] and svc.last_step_at_s is not None
    finally:
        svc.stop()


@pytest.mark.parametrize(("loop", "ok"), [
    ({"alive": True, "started_at_s": 900.0, "last_step_at_s": 999.5, "failures_total": 0, "last_error": ""}, True),
    ({"alive": True, "started_at_s": 990.0, "last_step_at_s": None, "failures_total": 0, "last_error": ""}, True),
    ({"alive": True, "started_at_s": 900.0, "last_step_at_s": 1000.0 - LOOP_STALL_S - 1, "failures_total": 40,
      "last_error": "RuntimeError: disk I/O error"}, False),
    ({"alive": False, "started_at_s": 900.0, "last_step_at_s": 999.5, "failures_total": 0, "last_error": ""}, False),
])
def test_meshfed_check_reports_a_stalled_or_dead_reconcile_loop(loop: dict[str, Any], ok: bool) -> None:
    (check,) = [c for c in build_checks({"reconciler": {"loop": loop}}, 1000.0) if c["check"] == "reconcile loop running"]
    assert check["ok"] is ok
    if not ok:
        assert check["hint"] and (("disk I/O error" in check["cause"] and "31 s" in check["cause"])
                                  or "not running" in check["cause"])


def test_metrics_expose_the_loop_s_failures_and_last_step() -> None:
    from federation.server import metrics

    st = {"reconciler": {"loop": {"alive": True, "last_step_at_s": 1234.5, "failures_total": 3}}}
    text = metrics.render(metrics.make_registry(lambda: st)).decode()
    assert "meshfed_reconcile_loop_failures_total 3.0" in text
    assert "meshfed_reconcile_last_step_timestamp_seconds 1234.5" in text


def test_a_fleet_error_wakes_the_loop() -> None:
    """Review note (e): every input wakes the loop; a failed revision did not."""
    now, sent, render = [0.0], Sent(), Render()
    svc = service(now, sent, render)
    assert not svc._wake.is_set()
    svc.on_fleet_error("c" * 40, "broken", [{"code": "MF0001", "message": "bad"}])
    assert svc._wake.is_set() and svc.status()["desired"]["ok"] is False


def test_missing_inputs_is_read_under_the_lock() -> None:
    """Review note (e): `missing_inputs` read the reconciler's snapshots without the lock `step`
    changes them under."""
    now, sent, render = [0.0], Sent(), Render()
    svc = service(now, sent, render)
    answers: list[bool] = []
    with svc._lock:   # a step in progress
        t = threading.Thread(target=lambda: answers.append(svc.missing_inputs()))
        t.start()
        t.join(0.2)
        assert answers == []          # it waits for the step
    t.join(5.0)
    assert answers == [True]


# --- agents --------------------------------------------------------------------------------------


def test_agent_specs_follow_the_fleet_and_restart_watches_within_a_lease() -> None:
    from federation.controller.sources import AgentSpec, agent_specs

    fleet_clusters = {"east": {"kubeconfig": None, "context": "lab-east", "api_kind": "kubeconfig", "lease_ttl_s": 30.0},
                      "west": {"kubeconfig": "/w", "context": "lab-west", "api_kind": "kubeconfig", "lease_ttl_s": 3.0}}
    specs = agent_specs(fleet_clusters, "/default")
    assert specs["east"] == AgentSpec("east", "/default", "lab-east", "kubeconfig", 30.0, 10)
    assert specs["west"].kubeconfig == "/w" and specs["west"].watch_timeout_s == 2   # never below 2 s
    assert agent_specs(fleet_clusters, None, watch_timeout_s=5)["east"].watch_timeout_s == 5
    assert specs["east"].args() == ("east", "/default", "lab-east", "kubeconfig", 30.0, 10, "")


def test_the_namespace_selector_goes_from_the_fleet_to_the_agent_s_discovery() -> None:
    """Enrollment end to end on the controller's side: Cluster.spec.namespaceSelector (default
    istio.io/dataplane-mode=ambient) -> fleet_clusters -> AgentSpec -> ClusterAgent -> the discovery
    cache and the server-side selector of its Namespace watch."""
    import dataclasses
    from types import MappingProxyType

    from federation.controller.queries import fleet_clusters
    from federation.controller.sources import ClusterAgent, agent_specs
    from gitops import load_worktree
    from gitops.model import LabelRequirement, NamespaceSelector, SelectorOperator
    from tests.unit.controller.test_core_render_events import EXAMPLE as EXAMPLE_FLEET

    snap = load_worktree(EXAMPLE_FLEET)
    custom = NamespaceSelector(MappingProxyType({"mesh": "on"}),
                               (LabelRequirement("tier", SelectorOperator.NOT_IN, ("db", "cache")),))
    snap = dataclasses.replace(snap, clusters={**snap.clusters,
                                               "west": dataclasses.replace(snap.clusters["west"], namespace_selector=custom)})
    specs = agent_specs(fleet_clusters(snap), None)
    assert specs["east"].namespace_selector == "istio.io/dataplane-mode=ambient"
    assert specs["west"].namespace_selector == "mesh=on,tier notin (db,cache)"
    agent = ClusterAgent(*specs["west"].args()[:4], namespace_selector=specs["west"].namespace_selector)
    assert agent.discovery.cache.namespace_selector.text == "mesh=on,tier notin (db,cache)"


def test_in_cluster_uses_the_pod_s_service_account_for_its_own_cluster_only() -> None:
    from clusters.kube.discovery import IN_CLUSTER_CONTEXT
    from federation.controller.sources import agent_specs

    fleet_clusters = {"east": {"kubeconfig": None, "context": "kind-east", "api_kind": "Kubeconfig", "lease_ttl_s": 30.0},
                      "west": {"kubeconfig": None, "context": "kind-west", "api_kind": "Kubeconfig", "lease_ttl_s": 30.0}}
    specs = agent_specs(fleet_clusters, "/etc/meshfed/kubeconfig/kubeconfig", in_cluster="east")
    assert (specs["east"].context, specs["east"].kubeconfig) == (IN_CLUSTER_CONTEXT, None)
    assert (specs["west"].context, specs["west"].kubeconfig) == ("kind-west", "/etc/meshfed/kubeconfig/kubeconfig")


# --- Git feed --------------------------------------------------------------------------------------


class Watch:
    poll_interval_s = 30.0


class Follower:
    def __init__(self) -> None:
        self.watch = Watch()


class Source:
    """Stands in for `GitSource`: hands out what it is given, one result per poll."""

    def __init__(self, results: list[Any]) -> None:
        self.results = results
        self.snapshot: ConfigSnapshot | None = None
        self.worktree = False
        self.follower = Follower()
        self.last_error = ""

    def poll(self, _now_s: float) -> Any:
        got = self.results.pop(0) if self.results else None
        if isinstance(got, ConfigSnapshot) and got.revision.sha != "f" * 40:
            self.snapshot = got
        return got


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, str]] = []

    def on_snapshot(self, snap: ConfigSnapshot) -> None:
        self.got.append(("snapshot", snap.revision.sha[:1]))

    def on_fallback_snapshot(self, snap: ConfigSnapshot) -> None:
        self.got.append(("fallback", snap.revision.sha[:1]))

    def on_fleet_error(self, sha: str, _subject: str, problems: Sequence[dict[str, Any]]) -> None:
        self.got.append(("error", sha[:1]))


class NoRecords:
    def last_applied(self) -> None:
        return None

    def applied_ca_specs(self) -> None:
        return None

    def leaf_not_after(self, _td: str) -> dict[str, float]:
        return {}


def test_the_git_feed_delivers_a_fallback_before_the_failure_of_the_head() -> None:
    # after a restart on a bad head: the failure first from Git, then the last applied revision
    failure = FleetFailure("e" * 40, "bad", ({"code": "MF0001", "message": "bad"},))
    source, sink = Source([failure, snap("a" * 40)]), Sink()
    feed = GitFeed(source, NoRecords(), sink, poll_interval_s=5.0)  # type: ignore[arg-type]
    assert source.follower.watch.poll_interval_s == 5.0
    feed.poll_once()
    assert sink.got == [("snapshot", "a"), ("error", "e")]
    feed.resend()
    assert sink.got[-1] == ("snapshot", "a")


def test_a_wall_clock_step_does_not_age_the_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the service judged leases and debounce on `time.time`: a wall clock stepped a day
    forward (NTP, or the soak's simulated calendar) made every cluster's last heartbeat a day old,
    so every lease expired at the next tick (→ Withdraw). By default it now runs on the steady
    clock (`ztunnel.api.clock.steady_wall_clock`): only monotonic time ages a lease."""
    wall, mono = [1_000_000.0], [50.0]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    monkeypatch.setattr(time, "monotonic", lambda: mono[0])
    seen: list[tuple[float, dict[str, float]]] = []

    class LeaseRender(Render):
        def __call__(self, inp: RenderInput) -> RenderOutput:
            seen.append((inp.now_s, dict(inp.leases)))
            return super().__call__(inp)

    svc = ReconcileService(None, Sent(), debounce_after_s=0.0, tick_interval_s=1.0, render=LeaseRender())
    svc.on_snapshot(snap("a" * 40))
    svc.on_lease("east", 0.0)          # the API answered just now
    wall[0] += 86400.0                 # the wall clock steps a day forward; two seconds really pass
    mono[0] += 2.0
    assert svc.step(svc.clock())
    now_s, leases = seen[-1]
    assert now_s - leases["east"] == pytest.approx(2.0)
    assert now_s == pytest.approx(1_000_002.0)   # still on the wall scale (events and history are stamped with it)
