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
