"""explain for L7: which name matched (namespace sameness), the DestinationRule's host, the waypoint,
connection pool limits, and route splits per request."""

from __future__ import annotations

from pathlib import Path

import gitops
from federation.core.explain import explain_service, explain_text
from federation.core.failover import build_engine
from federation.core.offline import offline_observations

L7 = Path(__file__).resolve().parents[3] / "examples" / "l7"
FLEET = Path(__file__).resolve().parents[3] / "examples" / "fleet"


def _engine(path: Path):  # type: ignore[no-untyped-def]
    snap = gitops.load_worktree(path)
    return build_engine(snap, offline_observations(snap))


def test_the_cluster_local_name_is_the_global_service_and_explain_says_so() -> None:
    data = explain_service(_engine(L7), "my-service.my-app.svc.cluster.local", "east")
    assert data["service"] == "my-service.my-app.svc.clusterset.local"
    assert "namespace sameness" in data["name"]["matched"]
    assert data["policy"]["object"] == "DestinationRule my-app/my-service-multicluster"
    assert data["policy"]["host"] == {"written": "my-service.my-app.svc.cluster.local",
                                      "matched": data["name"]["matched"]}
    assert data["policy"]["connection_pool"]["max_connections"] == 100
    text = explain_text(data)
    assert "name: my-service.my-app.svc.cluster.local matched as cluster-local name" in text
    assert "waypoint: my-app/waypoint" in text


def test_routes_behind_a_waypoint_split_per_request_by_rule() -> None:
    data = explain_service(_engine(L7), "shop/checkout", "west")
    assert data["name"]["matched"] == "namespace/name"
    split = [(r["rule"], r["to"], r["weight"], r["per"]) for r in data["routes"]]
    assert ("split", "checkout.shop.svc.clusterset.local", 80, "request") in split
    assert ("split", "checkout-v2.shop.svc.clusterset.local", 20, "request") in split
    assert "route split (rule split), per request:" in explain_text(data)


def test_l4_routes_still_split_per_connection() -> None:
    data = explain_service(_engine(FLEET), "checkout", "east")
    assert data["waypoint"] is None and {r["per"] for r in data["routes"]} == {"connection"}
    assert "route split, per connection: checkout.shop.svc.clusterset.local 90" in explain_text(data)
