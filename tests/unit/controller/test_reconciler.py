"""Reconciler, debounce, health reports and the status store, driven with explicit `now_s`.
(The vote itself is tested in tests/unit/core/test_health.py.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusters.kube.observation import ClusterObservation, EndpointInfo
from federation.controller.reconciler import (
    Debouncer,
    Reconciler,
    RenderInput,
    RenderOutput,
)
from federation.controller.store import Store
from federation.core.health import EndpointReport
from gitops.model import ConfigSnapshot, Federation, Revision
from ztunnel.api.config import Endpoint, ProxyConfig, ProxyMode, Service, Stamp


def snap(sha: str, subject: str = "msg") -> ConfigSnapshot:
    return ConfigSnapshot(revision=Revision(sha, subject), federation=Federation("f", "mesh"), clusters={},
                          trust_domains={}, services={}, lab_clusters={}, destination_rules={},
                          authorization_policies=(), routes=())


def obs(cluster: str, pods: list[str], at: float = 0.0) -> ClusterObservation:
    return ClusterObservation(cluster, at, True, endpoints=tuple(
        EndpointInfo("shop", "checkout", p, "10.0.0.1", "n1", "sa") for p in pods))


def fake_render(inp: RenderInput) -> RenderOutput:
    """One proxy per cluster; its workloads-count is carried in the network name (test-only).
    Every proxy routes to every observed `checkout` endpoint (uid `<cluster>/<pod>`)."""
    if inp.snapshot.revision.subject == "explode":
        raise RuntimeError("renderer blew up")
    out = {}
    eps = tuple(Endpoint(f"{c}/{e.pod}", c, c, e.address, 8080, "") for c, o in sorted(inp.observations.items())
                for e in o.endpoints)
    checkout = Service("checkout", "shop", "checkout", "", (), eps)
    for c, o in inp.observations.items():
        healthy = [e for e in o.endpoints if ("checkout", f"{c}/{e.pod}") not in inp.unhealthy]
        out[f"ztunnel/{c}/n1"] = ProxyConfig(f"ztunnel/{c}/n1", ProxyMode.NODE, c, f"n{len(healthy)}", "td",
                                             Stamp(0, inp.snapshot.revision.sha, 0), services=(checkout,))
    return RenderOutput(out)


class Pushes:
    def __init__(self) -> None:
        self.calls: list[dict[str, ProxyConfig]] = []

    def __call__(self, configs: object) -> None:
        self.calls.append(dict(configs))  # type: ignore[call-overload]


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store.in_state_dir(tmp_path / "state")


def test_burst_of_changes_becomes_one_push(store: Store) -> None:
    pushes = Pushes()
    r = Reconciler(fake_render, pushes, store)
    r.on_observation(obs("east", ["p0"]), now_s=0.0)
    r.on_snapshot(snap("a" * 40), now_s=0.0)
    assert r.reconcile(now_s=0.0) and len(pushes.calls) == 1   # the commit: at once
    for i in range(1, 50):  # 49 endpoint changes within 50 ms
        r.on_observation(obs("east", [f"p{j}" for j in range(i + 1)]), now_s=0.001 * i)
    assert not r.reconcile(now_s=0.1)          # still within 100 ms of the last change
    assert r.reconcile(now_s=0.15)
    assert len(pushes.calls) == 2 and pushes.calls[1]["ztunnel/east/n1"].network == "n50"
    assert not r.reconcile(now_s=1.0)          # nothing new


def test_a_commit_is_due_at_once_but_a_burst_of_commits_waits_for_a_quiet_period() -> None:
    d = Debouncer(after_s=0.1, max_s=10.0)
    d.note(5.0, at_once=True)                  # a commit after a quiet period: no one to wait for
    assert d.due(5.0)
    d.take(5.0)
    d.note(5.02, at_once=True)                 # the next commit 20 ms after that render
    assert not d.due(5.1) and d.due(5.12)      # waits the quiet period like any change
    d.take(5.12)
    d.note(6.0)                                # an endpoint change: trailing, as before
    d.note(6.05, at_once=True)                 # a commit joins it: the pending set goes at once
    assert d.deadline_s() == 6.05
    d.take(6.05)
    d.note(7.0)
    assert d.deadline_s() == pytest.approx(7.1)


def test_debounce_is_bounded_by_max_delay() -> None:
    d = Debouncer(after_s=0.1, max_s=10.0)
    t = 0.0
    while t < 12.0:
        d.note(t)
        if d.due(t + 0.05):
            break
        t += 0.05
    assert d.deadline_s() == pytest.approx(10.0)


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=30))
def test_debounce_deadline_never_exceeds_max_after_first(times: list[float]) -> None:
    d = Debouncer(after_s=0.1, max_s=10.0)
    times = sorted(times)
    for t in times:
        d.note(t)
    deadline = d.deadline_s()
    assert deadline is not None
    assert deadline <= times[0] + 10.0 and deadline <= times[-1] + 0.1


def test_bad_commit_keeps_last_applied_and_reports(store: Store) -> None:
    pushes = Pushes()
    r = Reconciler(fake_render, pushes, store)
    r.on_snapshot(snap("a" * 40, "good"), now_s=0)
    r.on_observation(obs("east", ["p1"]), now_s=0)
    r.reconcile(now_s=1)
    r.on_fleet_error("b" * 40, "broken", [{"code": "MF0102", "message": "unknown field", "hint": "remove it"}], now_s=2)
    r.on_snapshot(snap("c" * 40, "explode"), now_s=3)
    r.reconcile(now_s=4)
    assert len(pushes.calls) == 1
    st_ = r.status()
    assert st_["applied"]["revision"] == "a" * 40
    assert st_["desired"]["revision"] == "c" * 40 and st_["desired"]["ok"] is False
    assert "renderer blew up" in st_["problems"][0]["message"]
    assert store.last_applied().sha == "a" * 40  # type: ignore[union-attr]
    assert store.last_attempted().sha == "c" * 40  # type: ignore[union-attr]
    # a restarted reconciler reads both back
    r2 = Reconciler(fake_render, Pushes(), store)
    assert r2.status()["applied"]["revision"] == "a" * 40 and r2.status()["desired"]["ok"] is False


def test_complete_observation_prunes_and_partial_upserts() -> None:
    pushes = Pushes()
    r = Reconciler(fake_render, pushes)
    r.on_snapshot(snap("a" * 40), now_s=0)
    r.on_observation(obs("east", ["p1", "p2", "p3"]), now_s=0)
    r.reconcile(now_s=1)
    part = replace(obs("east", ["p4"]), complete=False, removed_endpoints=(("shop", "checkout", "p1"),))
    r.on_observation(part, now_s=2)
    assert {e.pod for e in r.observations["east"].endpoints} == {"p2", "p3", "p4"}
    r.on_observation(obs("east", ["p2"]), now_s=3)  # e.g. after a controller restart: fresh LIST
    assert {e.pod for e in r.observations["east"].endpoints} == {"p2"}


def test_health_reports_trigger_a_push_marking_endpoints_unhealthy() -> None:
    pushes = Pushes()
    r = Reconciler(fake_render, pushes)
    r.on_snapshot(snap("a" * 40), now_s=0)
    r.on_observation(obs("east", ["p1", "p2"]), now_s=0)
    for c in ("west", "south", "north"):
        r.on_observation(obs(c, []), now_s=0)
    r.reconcile(now_s=1)
    for c in ("west", "south", "north"):  # every proxy's config routes to east/p1
        r.on_health(f"ztunnel/{c}/n1", [EndpointReport("checkout", "east/p1", "east", 0, 7, True)], now_s=2)
    assert r.reconcile(now_s=2.2)
    assert pushes.calls[-1]["ztunnel/east/n1"].network == "n1"
    assert r.status()["unhealthy_endpoints"] == ["checkout east/p1"]


def test_health_reports_count_only_from_proxies_that_route_to_the_endpoint() -> None:
    """A proxy id the render never produced (a stray token holder, a proxy of a removed cluster)
    reports east/p1 ejected, as often as it likes; one real observer joins in. Neither ejects it:
    the stray reports are not votes, and one observer of four is not a quorum."""
    pushes = Pushes()
    r = Reconciler(fake_render, pushes)
    r.on_snapshot(snap("a" * 40), now_s=0)
    r.on_observation(obs("east", ["p1", "p2"]), now_s=0)
    for c in ("west", "south", "north"):
        r.on_observation(obs(c, []), now_s=0)
    r.reconcile(now_s=1)
    bad = [EndpointReport("checkout", "east/p1", "east", 0, 7, True)]
    for i in range(50):
        r.on_health(f"ztunnel/nowhere/n{i}", bad, now_s=2)
    r.on_health("ztunnel/west/n1", bad, now_s=2)
    r.reconcile(now_s=2.2, force=True)
    st_ = r.status()
    assert st_["unhealthy_endpoints"] == [] and st_["health_reports_ignored"] == 50
    assert pushes.calls[-1]["ztunnel/east/n1"].network == "n2"   # both pods still healthy
    assert set(r.aggregator.proxy_views) == {f"ztunnel/{c}/n1" for c in ("east", "west", "south", "north")}


def test_store_epoch_grows_and_failover_history_filters(store: Store) -> None:
    e1, e2 = store.bump_epoch(100.0), store.bump_epoch(100.0)   # the same instant: still one more
    assert e2 == e1 + 1
    store.record_failover("checkout.shop", "FailedOver", from_cluster="east", to_cluster="west",
                          trigger="EndpointEjected east/shop/p1", policy_file="policies/checkout.yaml:4:3",
                          revision="a" * 40, at_s=100)
    store.record_failover("cart.shop", "FailedOver", at_s=200)
    assert [f.service for f in store.failover_history()] == ["checkout.shop", "cart.shop"]
    assert [f.service for f in store.failover_history(since_s=150)] == ["cart.shop"]
    assert store.failover_history("checkout.shop")[0].policy_file == "policies/checkout.yaml:4:3"
    store.record_acks([("ztunnel/a/n1", 2, 5, "a" * 40)])
    store.record_nack("ztunnel/a/n1", "bad port")
    acks = store.proxy_acks()["ztunnel/a/n1"]
    assert acks["version"] == 5 and acks["last_nack"] == "bad port"
    assert oct(Path(store.path).stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(("listed", "at_s", "pushed"), [
    (("east",), 1.0, False),            # west not listed yet: a push would withdraw its endpoints
    (("east", "west"), 1.0, True),      # every cluster listed: warm
    (("east",), 11.0, True),            # warm-up bounded: west may be down for good
])
def test_no_push_until_every_cluster_is_listed_after_a_start(listed: tuple[str, ...], at_s: float,
                                                             pushed: bool) -> None:
    from dataclasses import replace

    pushes = Pushes()
    r = Reconciler(fake_render, pushes, warmup_max_s=10.0)
    s = replace(snap("a" * 40), clusters={"east": object(), "west": object()})  # type: ignore[dict-item]
    r.on_snapshot(s, now_s=0.0)
    r.on_observation(obs("east", ["p1"]), now_s=0.0)
    r.reconcile(now_s=0.5)
    for c in listed[1:]:
        r.on_observation(obs(c, ["p1"]), now_s=0.6)
    r.reconcile(now_s=at_s, force=True)
    assert bool(pushes.calls) is pushed and r.warm is pushed
    if pushed:
        assert set(pushes.calls[0]) == {f"ztunnel/{c}/n1" for c in listed}


def test_state_changes_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 15: commit applied / rejected and cluster up are INFO/WARNING lines with an `event`
    field; a cluster is "up" at its first complete observation, even after partial ones."""
    import logging

    caplog.set_level(logging.INFO, logger="federation.controller.reconciler")
    r = Reconciler(fake_render, Pushes())
    r.on_snapshot(snap("a" * 40, "good"), now_s=0)
    r.on_observation(replace(obs("east", ["p1"]), complete=False), now_s=0)   # a watch's partial first
    r.on_observation(obs("east", ["p1"]), now_s=0)
    r.on_observation(obs("east", ["p1", "p2"]), now_s=0.5)                   # not "up" a second time
    r.reconcile(now_s=1)
    r.on_fleet_error("b" * 40, "broken", [{"code": "MF0102", "message": "unknown field", "file": "x.yaml",
                                           "line": 3}], now_s=2)

    def events(kind: str) -> list[logging.LogRecord]:
        return [rec for rec in caplog.records if getattr(rec, "fields", {}).get("event") == kind]

    (up,) = events("ClusterUp")
    assert up.levelno == logging.INFO and up.fields["cluster"] == "east"  # type: ignore[attr-defined]
    (applied,) = events("CommitApplied")
    assert applied.fields["revision"] == "a" * 40 and "commit aaaaaaaa applied (good)" in applied.getMessage()  # type: ignore[attr-defined]
    (rejected,) = events("CommitRejected")
    assert rejected.levelno == logging.WARNING
    assert "[MF0102] unknown field" in rejected.getMessage() and "proxies keep revision aaaaaaaa" in rejected.getMessage()
    assert rejected.fields["problems"] == ["MF0102 x.yaml:3 unknown field"]  # type: ignore[attr-defined]
