"""The reconciler's core adapter turns readiness changes into failover history: when a cluster's
backends of a service stop being ready, every client locality whose tier 0 loses its share gets a
FailedOver event (to the next tier's clusters), and FailedBack when they return."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gitops
from clusters.kube.observation import ClusterObservation
from federation.controller.reconciler import CoreRender, RenderInput
from federation.core.events import FailedBack, FailedOver
from federation.core.offline import offline_observations

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "fleet"
CHECKOUT = "checkout.shop.svc.clusterset.local"


def _with_checkout_ready(obs: ClusterObservation, ready: bool, now_s: float) -> ClusterObservation:
    eps = tuple(replace(e, ready=ready, serving=ready) if e.service == "checkout" else e for e in obs.endpoints)
    return replace(obs, endpoints=eps, observed_at_s=now_s)


def test_backends_lost_in_east_record_failed_over_then_failed_back() -> None:
    snap = gitops.load_worktree(EXAMPLE)
    observations = {o.cluster: o for o in offline_observations(snap, observed_at_s=0.0)}
    render = CoreRender()

    def run(now_s: float) -> list[object]:
        out = render(RenderInput(snap, dict(observations), {c: now_s for c in observations}, frozenset(), now_s))
        return [ev for ev in out.events if isinstance(ev, FailedOver | FailedBack)]

    assert run(1.0) == []  # the baseline: nothing to compare with yet

    observations["east"] = _with_checkout_ready(observations["east"], False, 2.0)
    over = [ev for ev in run(2.0) if isinstance(ev, FailedOver) and ev.service == CHECKOUT]
    assert over, "losing east's checkout backends must fail east's clients over"
    assert {ev.source for ev in over} == {"east"}
    assert all(ev.to_clusters == ("south",) for ev in over)  # next tier from east: same region
    assert all(ev.provenance.file == "policies/shop/checkout.yaml:3:1" for ev in over)
    assert all("east" in ev.provenance.trigger for ev in over)

    assert run(3.0) == []  # nothing changed: no new event

    observations["east"] = _with_checkout_ready(observations["east"], True, 4.0)
    back = [ev for ev in run(4.0) if isinstance(ev, FailedBack) and ev.service == CHECKOUT]
    assert {ev.source for ev in back} == {"east"}


def test_the_live_graph_follows_the_engine_the_reconciler_renders_with() -> None:
    """`/api/v1/graph` (the console's picture): the reconcile service reads the graph from the
    engine its last render used — east's checkout down and its clients failed over to south."""
    from federation.controller.reconcile_service import ReconcileService

    snap = gitops.load_worktree(EXAMPLE)
    obs = {o.cluster: o for o in offline_observations(snap, observed_at_s=0.0)}
    now = [1.0]
    svc = ReconcileService(None, lambda blob: "ok", clock=lambda: now[0], debounce_after_s=0.0)
    assert "has not rendered" in svc.graph()["error"]
    svc.on_snapshot(snap)
    for o in obs.values():
        svc.on_observation(o)
    assert svc.step(now[0])
    graph = svc.graph()
    assert [c["name"] for c in graph["clusters"]] == ["east", "south", "west"] and graph["failovers"] == []
    now[0] = 2.0
    svc.on_observation(_with_checkout_ready(obs["east"], False, 2.0))
    assert svc.step(now[0])
    graph = svc.graph()
    east = next(pc for s in graph["services"] if s["hostname"] == CHECKOUT for pc in s["clusters"]
                if pc["cluster"] == "east")
    assert east["health"] == "down"
    assert [(fo["service"], fo["from"], fo["to"]) for fo in graph["failovers"]] == [(CHECKOUT, "east", ["south"])]
