"""The graph `meshfed graph` exports and the console draws: health per service and cluster, and the
failover state of each client cluster, read from the engine without changing its decisions."""

from __future__ import annotations

import pytest

from federation.cli.core import graph_dot, graph_mermaid
from federation.core.explain import client_locality
from federation.core.failover import aggregate_uid, build_engine
from federation.core.graph_view import EdgeHealth, edge_health, graph_data
from federation.core.offline import offline_observations
from tests.unit.core import factory as f

CHECKOUT_HOST = "checkout.shop.svc.clusterset.local"


def engine():  # type: ignore[no-untyped-def]
    snap = f.fleet()
    return build_engine(snap, offline_observations(snap))


def _edge(data: dict, service: str, cluster: str) -> dict:  # type: ignore[type-arg]
    svc = next(s for s in data["services"] if s["hostname"] == service)
    return next(pc for pc in svc["clusters"] if pc["cluster"] == cluster)  # type: ignore[no-any-return]


def _east_pods(e) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return {(CHECKOUT_HOST, ep.uid) for ep in e.graph.endpoints_in(f.CHECKOUT, "east").values()}


@pytest.mark.parametrize("total, healthy, agg, want", [
    (0, 0, False, EdgeHealth.EMPTY),
    (2, 2, False, EdgeHealth.HEALTHY),
    (2, 1, False, EdgeHealth.DEGRADED),
    (2, 0, False, EdgeHealth.DOWN),
    (2, 2, True, EdgeHealth.DOWN),      # clients elsewhere eject the cluster's gateway aggregate
])
def test_edge_health(total: int, healthy: int, agg: bool, want: EdgeHealth) -> None:
    assert edge_health(total, healthy, agg) is want


def test_steady_state_is_healthy_and_not_failed_over() -> None:
    data = graph_data(engine())
    assert [c["name"] for c in data["clusters"]] == ["east", "south", "west"]
    assert {c["lease"] for c in data["clusters"]} == {"Live"}
    assert {pc["health"] for s in data["services"] for pc in s["clusters"]} == {"healthy"}
    assert data["failovers"] == []


def test_half_ejected_is_degraded_and_fails_over_partly() -> None:
    e = engine()
    one = sorted(_east_pods(e))[0]
    e.apply_health_verdict({one}, 1.0)
    data = graph_data(e)
    east = _edge(data, CHECKOUT_HOST, "east")
    assert east["health"] == "degraded" and east["healthy"] == len(east["endpoints"]) - 1
    assert [ep["uid"] for ep in east["endpoints"] if ep["ejected"]] == [one[1]]
    [fo] = [fo for fo in data["failovers"] if fo["from"] == "east"]
    assert fo["service"] == CHECKOUT_HOST and 0 < fo["tier0_share"] < 1     # 70 % stays home (explain agrees)
    assert fo["policy"] == "DestinationRule shop/checkout" and fo["file"] == "policies/shop/checkout.yaml:3:1"
    assert fo["to"] and "east" not in fo["to"]


def test_all_of_east_down_fails_east_over_and_marks_the_edge() -> None:
    e = engine()
    e.apply_health_verdict(_east_pods(e), 1.0)
    data = graph_data(e)
    assert _edge(data, CHECKOUT_HOST, "east")["health"] == "down"
    east = [fo for fo in data["failovers"] if fo["from"] == "east"]
    assert [(fo["service"], fo["tier0_share"]) for fo in east] == [(CHECKOUT_HOST, 0.0)]
    assert "south" in east[0]["to"]
    # the exports draw the failover and the colour of the dead edge
    dot, mer = graph_dot(data), graph_mermaid(data)
    assert f'c_east -> c_south [label="{CHECKOUT_HOST} failed over", color="#6a1b9a"' in dot
    assert 'label="0/2 healthy", color="#c62828"' in dot
    assert f"c_east ==>|{CHECKOUT_HOST} failed over| c_south" in mer
    assert "stroke:#c62828" in mer and "stroke:#6a1b9a" in mer


def test_an_ejected_gateway_aggregate_is_down() -> None:
    e = engine()
    e.apply_health_verdict({(CHECKOUT_HOST, aggregate_uid("south", f.CHECKOUT))}, 1.0)
    south = _edge(graph_data(e), CHECKOUT_HOST, "south")
    assert south["gateway_ejected"] is True and south["health"] == "down"
    assert south["healthy"] == len(south["endpoints"])   # its pods are fine: the clients elsewhere eject it


def test_building_the_graph_changes_no_decision() -> None:
    """The reconciler's tier evaluation compares with the shares it last evaluated: a graph built
    in between must not take that baseline (it would swallow the FailedOver event)."""
    e = engine()
    east = client_locality(e, "east")
    assert e.evaluate(f.CHECKOUT, [e.view(f.CHECKOUT, east)], 0.0, "t") == []   # the baseline
    e.apply_health_verdict(_east_pods(e), 1.0)
    graph_data(e)
    events = e.evaluate(f.CHECKOUT, [e.view(f.CHECKOUT, east)], 2.0, "t")
    assert [type(ev).__name__ for ev in events] == ["FailedOver"]
