"""A quiet cluster keeps its lease while its API answers, however rarely its watches see events.

The watch timeout equals the lease TTL (the worst case: a watch that ends without a change produces
no observation), nothing changes in the cluster, and the controller's failover engine — fed by a
real `ClusterAgent` against an emulated API server, through a plain `Reconciler` + `CoreRender` —
must keep the cluster Live for 3 × TTL. The control run without the heartbeat shows the lease
expiring, so the test can fail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clusters.lab.apiserver import EmulatedApiServer
from federation.controller.reconciler import CoreRender, Reconciler
from federation.controller.sources import ClusterAgent
from federation.controller.wire import decode_observation
from federation.core.events import ClusterLeaseExpired
from federation.core.failover import LeaseState
from tests.integration.controller import kobjects as k
from tests.unit.core import factory as f

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TTL_S = 2.0


@pytest.fixture()
def east_api(tmp_path: Path) -> Iterator[tuple[EmulatedApiServer, Path]]:
    with EmulatedApiServer() as srv:
        srv.apply(k.namespace("shop"))
        srv.apply(k.node("node-1", "127.0.1.1", zone="us-east-1a", region="us-east"))
        srv.apply(k.service("shop", "checkout"))
        srv.apply(k.pod("shop", "checkout-0", "node-1", "10.10.0.5", sa="checkout", app="checkout"))
        srv.apply(k.endpoint_slice("shop", "checkout", [("checkout-0", "10.10.0.5", "node-1")]))
        yield srv, srv.write_kubeconfig(tmp_path / "kubeconfig", "lab-east")


def run_quiet(kubeconfig: Path, heartbeat_interval_s: float | None, duration_s: float) -> tuple[list[Any], Any, ClusterAgent]:
    snap = f.fleet(clusters=f.CLUSTERS[:1], lease_ttl_s=TTL_S)
    render = CoreRender()
    rec = Reconciler(render, push=lambda _configs: None, warmup_max_s=0.0)
    rec.on_snapshot(snap, time.time())
    events: list[Any] = []
    agent = ClusterAgent("east", str(kubeconfig), "lab-east", lease_ttl_s=TTL_S, watch_timeout_s=int(TTL_S),
                         heartbeat_interval_s=heartbeat_interval_s)
    agent.start(lambda blob: rec.on_observation(decode_observation(blob), time.time()),
                lambda cluster, age_s: rec.on_lease(cluster, time.time() - age_s))
    try:
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            rec.reconcile(time.time(), force=True)
            events.extend(rec.events)
            rec.events.clear()
            time.sleep(0.1)
    finally:
        agent.stop()
    return events, render.engine, agent


def test_quiet_cluster_keeps_its_lease_for_three_ttls(east_api: tuple[EmulatedApiServer, Path]) -> None:
    _srv, kubeconfig = east_api
    events, engine, agent = run_quiet(kubeconfig, None, 3 * TTL_S + 1.0)
    expired = [e for e in events if isinstance(e, ClusterLeaseExpired)]
    assert expired == [], f"quiet cluster expired: {expired}"
    assert engine.lease_state("east") is LeaseState.LIVE
    assert agent.heartbeats >= 3


def test_without_the_heartbeat_a_quiet_cluster_expires(east_api: tuple[EmulatedApiServer, Path]) -> None:
    _srv, kubeconfig = east_api
    events, _engine, _agent = run_quiet(kubeconfig, 0.0, 3 * TTL_S + 1.0)
    assert any(isinstance(e, ClusterLeaseExpired) and e.cluster == "east" for e in events)


def test_a_silent_api_server_still_expires(east_api: tuple[EmulatedApiServer, Path]) -> None:
    """The heartbeat renews only on a real answer: an API server that stops answering loses the lease."""
    srv, kubeconfig = east_api
    snap = f.fleet(clusters=f.CLUSTERS[:1], lease_ttl_s=TTL_S)
    render = CoreRender()
    rec = Reconciler(render, push=lambda _configs: None, warmup_max_s=0.0)
    rec.on_snapshot(snap, time.time())
    agent = ClusterAgent("east", str(kubeconfig), "lab-east", lease_ttl_s=TTL_S, watch_timeout_s=int(TTL_S))
    agent.start(lambda blob: rec.on_observation(decode_observation(blob), time.time()),
                lambda cluster, age_s: rec.on_lease(cluster, time.time() - age_s))
    events: list[Any] = []
    try:
        deadline = time.monotonic() + 10
        while render.engine is None or "east" not in rec.observations:
            assert time.monotonic() < deadline, "no observation from the emulated API"
            rec.reconcile(time.time(), force=True)
            time.sleep(0.05)
        srv.stop(0.5)
        deadline = time.monotonic() + 3 * TTL_S
        while time.monotonic() < deadline and render.engine.lease_state("east") is LeaseState.LIVE:
            rec.reconcile(time.time(), force=True)
            events.extend(rec.events)
            rec.events.clear()
            time.sleep(0.1)
    finally:
        agent.stop()
    assert render.engine.lease_state("east") is LeaseState.EXPIRED


def test_an_api_that_answers_version_but_refuses_a_kind_loses_the_lease(east_api: tuple[EmulatedApiServer, Path]) -> None:
    """Review finding: the heartbeat must not renew a cluster whose EndpointSlices we can no longer
    see (RBAC taken away) just because `GET /version` still answers."""
    srv, kubeconfig = east_api
    snap = f.fleet(clusters=f.CLUSTERS[:1], lease_ttl_s=TTL_S)
    render = CoreRender()
    rec = Reconciler(render, push=lambda _configs: None, warmup_max_s=0.0)
    rec.on_snapshot(snap, time.time())
    agent = ClusterAgent("east", str(kubeconfig), "lab-east", lease_ttl_s=TTL_S, watch_timeout_s=1)
    agent.start(lambda blob: rec.on_observation(decode_observation(blob), time.time()),
                lambda cluster, age_s: rec.on_lease(cluster, time.time() - age_s))
    try:
        deadline = time.monotonic() + 10
        while render.engine is None or "east" not in rec.observations:
            assert time.monotonic() < deadline, "no observation from the emulated API"
            rec.reconcile(time.time(), force=True)
            time.sleep(0.05)
        srv.refuse("/apis/discovery.k8s.io")
        deadline = time.monotonic() + 4 * TTL_S
        while time.monotonic() < deadline and render.engine.lease_state("east") is LeaseState.LIVE:
            rec.reconcile(time.time(), force=True)
            time.sleep(0.1)
        assert render.engine.lease_state("east") is LeaseState.EXPIRED
        assert "endpointslices" in agent.discovery.failing_kinds()
        srv.allow()
        deadline = time.monotonic() + 4 * TTL_S      # and it comes back with a fresh, complete LIST
        while time.monotonic() < deadline and render.engine.lease_state("east") is not LeaseState.LIVE:
            rec.reconcile(time.time(), force=True)
            time.sleep(0.1)
        assert render.engine.lease_state("east") is LeaseState.LIVE
    finally:
        agent.stop()
