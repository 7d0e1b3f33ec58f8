"""A waypoint's 5xx ejection, as the controller sees it (issue 14's lab scenario at the core level):
east's checkout pods accept connections but answer 503, so only the waypoint in front of them
(waypoint/east/shop/waypoint) sees it fail; its outlier detection ejects them and its health
reports say so. The vote must hand that to the failover engine — EndpointEjected for both pods,
FailedOver east -> west, each with the DestinationRule's file and the commit, in the failover
history — although every L7 proxy of east (the my-app waypoint, the ai-gateway ingress) carries
checkout in its config: they never send requests there, so they are not observers (see
`federation.core.health`, "what a waypoint's vote means").

Driven like the Ray host drives it: the real `CoreRender`, `examples/l7`, explicit `now_s`.
"""

from __future__ import annotations

import re
from pathlib import Path

import gitops
from federation.controller.reconciler import CoreRender, Reconciler
from federation.controller.store import Store
from federation.core.events import EndpointEjected, FailedOver
from federation.core.health import EndpointReport
from federation.core.offline import offline_observations
from ztunnel.api.config import ProxyConfig

L7_FLEET = Path(__file__).resolve().parents[3] / "examples" / "l7"
CHECKOUT = "checkout.shop.svc.clusterset.local"
MY_SERVICE = "my-service.my-app.svc.clusterset.local"
EAST_PODS = ["east/shop/checkout-0", "east/shop/checkout-1"]
WAYPOINT = "waypoint/east/shop/waypoint"


class Pushes:
    def __init__(self) -> None:
        self.last: dict[str, ProxyConfig] = {}

    def __call__(self, changed: object) -> None:
        self.last.update(changed)  # type: ignore[call-overload]


def started(tmp_path: Path) -> tuple[Reconciler, Store, Pushes, str]:
    snap = gitops.load_worktree(L7_FLEET)
    store = Store.in_state_dir(tmp_path / "state")
    pushes = Pushes()
    r = Reconciler(CoreRender(), pushes, store)
    r.on_snapshot(snap, now_s=0.0)
    for obs in offline_observations(snap, observed_at_s=0.0):
        r.on_observation(obs, now_s=0.0)
    assert r.reconcile(now_s=1.0) and r.warm
    return r, store, pushes, snap.revision.sha


def ejecting(service: str, uids: list[str]) -> list[EndpointReport]:
    """What the waypoint's HealthReporter sends after three 503s in a row on each."""
    return [EndpointReport(service, uid, uid.split("/", 1)[0], 0, 3, True) for uid in uids]


def test_the_waypoints_503_ejection_reaches_the_failover_history(tmp_path: Path) -> None:
    r, store, pushes, sha = started(tmp_path)
    mark = len(r.events)
    r.on_health(WAYPOINT, ejecting(CHECKOUT, EAST_PODS), now_s=2.0)
    assert r.reconcile(now_s=2.2)
    evs = [e for e in r.events[mark:] if isinstance(e, EndpointEjected | FailedOver) and e.service == CHECKOUT]
    assert [type(e).__name__ for e in evs] == ["EndpointEjected", "EndpointEjected", "FailedOver"], evs
    ejected, over = evs[:2], evs[2]
    assert [e.endpoint for e in ejected] == EAST_PODS  # type: ignore[union-attr]
    for e in ejected:
        assert isinstance(e, EndpointEjected) and e.reason == "HealthReportQuorum"
        assert e.provenance.trigger.startswith(
            f"health reports: 0 of 0 L4 proxies and 1 of 1 L7 proxies (waypoints, ingresses) observing {e.endpoint} "
            "eject it (each layer by itself: quorum 50%, at least 2 and 1;"), e.provenance.trigger
        assert re.match(r"^policies/shop/checkout\.yaml:\d+:\d+$", e.provenance.file) and e.provenance.commit == sha
    assert isinstance(over, FailedOver) and (over.source, over.to_clusters) == ("east", ("west",))
    hist = [(h.kind, h.from_cluster, h.to_cluster) for h in store.failover_history(CHECKOUT)]
    assert hist == [("EndpointEjected", "east", ""), ("EndpointEjected", "east", ""), ("FailedOver", "east", "west")]
    # every proxy that routes to them now has them unhealthy, the waypoint itself included
    for pid in ("ztunnel/east/node-1", "gateway/east", WAYPOINT):
        svc = next(s for s in pushes.last[pid].services if s.hostname == CHECKOUT)
        assert {e.workload_uid: e.healthy for e in svc.endpoints if e.workload_uid in EAST_PODS} == \
            dict.fromkeys(EAST_PODS, False), pid


def test_the_guides_destination_rule_ejects_one_pod_through_its_waypoint(tmp_path: Path) -> None:
    """The guide's my-service (namespace my-app, its own waypoint): one 503-ing pod of nine."""
    r, store, _, _ = started(tmp_path)
    r.on_health("waypoint/east/my-app/waypoint", ejecting(MY_SERVICE, ["east/my-app/my-service-0"]), now_s=2.0)
    assert r.reconcile(now_s=2.2)
    assert r.status()["unhealthy_endpoints"] == [f"{MY_SERVICE} east/my-app/my-service-0"]
    [h] = store.failover_history(MY_SERVICE)
    assert h.kind == "EndpointEjected" and h.policy_file.startswith("policies/my-app/my-service-multicluster.yaml:")


def test_l7_proxies_that_do_not_send_to_a_service_cannot_vote_on_it(tmp_path: Path) -> None:
    """The my-app waypoint and the ingress carry checkout in their configs (a cluster's L7 proxies
    share its service table) but never forward a request there: their reports are not votes, as
    often as they send them, and they are not counted as observers the waypoint would need."""
    r, store, _, _ = started(tmp_path)
    before = r.aggregator.ignored_reports
    for pid in ("waypoint/east/my-app/waypoint", "ingress/east/ai-serving/ai-gateway"):
        r.on_health(pid, ejecting(CHECKOUT, EAST_PODS), now_s=2.0)
    r.reconcile(now_s=2.2, force=True)
    assert r.status()["unhealthy_endpoints"] == [] and store.failover_history(CHECKOUT) == []
    assert r.aggregator.ignored_reports == before + 4
    assert {p for p in r.aggregator.observers[(CHECKOUT, EAST_PODS[0])] if not p.startswith(("ztunnel/", "gateway/"))} \
        == {WAYPOINT}
