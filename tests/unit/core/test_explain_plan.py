"""explain, plan_effects, and the `explain`/`graph` commands on examples/fleet."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from federation.cli.core import graph_dot, graph_mermaid
from federation.cli.main import cli
from federation.core.explain import ExplainError, explain_service, explain_text, resolve_service
from federation.core.failover import build_engine
from federation.core.graph_view import graph_data
from federation.core.offline import offline_observations
from federation.core.planning import authz_allows, plan_effects
from gitops.model import AuthorizationPolicy, AuthzAction, AuthzRule, AuthzSource, TrafficPolicy
from tests.unit.core import factory as f

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "fleet"
CHECKOUT_HOST = "checkout.shop.svc.clusterset.local"


def engine():  # type: ignore[no-untyped-def]
    snap = f.fleet()
    return build_engine(snap, offline_observations(snap))


@pytest.mark.parametrize("name", [CHECKOUT_HOST, "shop/checkout", "checkout.shop", "checkout"])
def test_resolve_service(name: str) -> None:
    assert resolve_service(engine(), name) == f.CHECKOUT


def test_resolve_errors_list_what_exists() -> None:
    with pytest.raises(ExplainError, match="known: shop/cart, shop/checkout"):
        resolve_service(engine(), "payments")
    with pytest.raises(ExplainError, match="no cluster 'north'"):
        explain_service(engine(), "checkout", "north")


def test_explain_tiers_shares_and_why() -> None:
    e = engine()
    e.apply_health_verdict({(CHECKOUT_HOST, "east/shop/checkout-0")}, 1.0,
                           {(CHECKOUT_HOST, "east/shop/checkout-0"): "health reports: 2 of 2 proxies …"})
    data = explain_service(e, "checkout", "east")
    assert data["policy"]["object"] == "DestinationRule shop/checkout"
    assert data["policy"]["file"] == "policies/shop/checkout.yaml:3:1"
    [t0, t1] = data["tiers"]
    assert t0["share"] == pytest.approx(0.7) and t1["share"] == pytest.approx(0.3)   # half healthy -> 70 %
    assert [g["cluster"] for g in t0["groups"]] == ["east"]
    assert "matches topology.istio.io/network=net-east" in t0["groups"][0]["why"]
    assert [g["cluster"] for g in t1["groups"]] == ["south", "west"]
    assert "differs at topology.istio.io/network" in t1["groups"][0]["why"]
    assert data["ejections"]["active"] == ["east/shop/checkout-0"]
    # the ejection comes from the engine, with its reason and the vote
    [ep0, ep1] = t0["groups"][0]["endpoints"]
    assert (ep0["uid"], ep0["ejected"], ep0["reason"], ep0["healthy"]) == (
        "east/shop/checkout-0", True, "HealthReportQuorum", False)
    assert (ep1["ejected"], ep1["reason"], ep1["healthy"]) == (False, "", True)
    assert data["ejections"]["endpoints"] == [{"uid": "east/shop/checkout-0", "reason": "HealthReportQuorum",
                                               "since_s": 1.0, "trigger": "health reports: 2 of 2 proxies …",
                                               "count": 1}]
    text = explain_text(data)
    assert "tier 0: 70.0% of traffic" in text and "EJECTED (HealthReportQuorum)" in text and "route split" in text
    assert "ejected for everyone (quorum of proxies' health reports): east/shop/checkout-0" in text


def test_plan_failover_priority_change_moves_tiers() -> None:
    old = f.fleet()
    new = f.with_checkout_policy(old, TrafficPolicy(
        outlier_detection=f.outlier(), locality_lb=f.locality(("topology.kubernetes.io/region",
                                                               "topology.istio.io/network"))), sha="f" * 40)
    effects = plan_effects(old, new, offline_observations(new))
    east = effects["clusters"]["east"]
    moved = {(c["service"], c["endpoint"]): (c["old_tier"], c["new_tier"]) for c in east["tier_changes"]}
    assert moved == {(CHECKOUT_HOST, "west/shop/checkout@gateway"): (1, 2)}
    assert effects["summary"]["access_changes"] == 0
    assert effects["summary"]["gateways_touched"] == 0          # gateways route locally: unchanged
    assert {p["proxy"] for p in east["proxies_changed"]} == {"ztunnel/east/node-1", "ztunnel/east/node-2"}


def test_plan_authorization_change_reports_identities() -> None:
    old = f.fleet()
    deny_west = AuthorizationPolicy("shop", "deny-west", AuthzAction.DENY,
                                    (AuthzRule((AuthzSource(principals=("west.mesh.local/*",)),)),))
    new = replace(old, authorization_policies=(*old.authorization_policies, deny_west))
    effects = plan_effects(old, new, offline_observations(new))
    lost = {(c["service"], c["identity"]) for cl in effects["clusters"].values() for c in cl["access_changes"]
            if c["change"] == "loses"}
    assert (CHECKOUT_HOST, "spiffe://west.mesh.local/ns/shop/sa/frontend") in lost
    assert all("west.mesh.local" in i for _, i in lost)


def test_plan_trust_and_gateway_changes() -> None:
    old = f.fleet()
    new = f.fleet(federates={"east": ["south"], "south": ["east"], "west": []}, sha="e" * 40)
    effects = plan_effects(old, new, offline_observations(new))
    gw = effects["clusters"]["west"]["gateways_touched"]
    assert gw == [] or all(g["proxy"] == "gateway/west" for g in gw)
    lost = [c for c in effects["clusters"]["west"]["access_changes"] if c["change"] == "loses"]
    assert any(c["identity"] == "spiffe://east.mesh.local/ns/shop/sa/frontend" for c in lost)
    assert any(c["new_tier"] is None and c["endpoint"] == "west/shop/checkout@gateway"
               for c in effects["clusters"]["east"]["tier_changes"])


@pytest.mark.parametrize("identity, port, allowed", [
    ("spiffe://east.mesh.local/ns/shop/sa/frontend", 8080, True),
    ("spiffe://east.mesh.local/ns/shop/sa/cart", 8080, False),
    ("spiffe://east.mesh.local/ns/shop/sa/frontend", 9090, False),
])
def test_authz_allows(identity: str, port: int, allowed: bool) -> None:
    policies = f.fleet().authorization_policies
    assert authz_allows(policies, "shop", {"app": "checkout"}, identity, port, "east.mesh.local") is allowed
    assert authz_allows(policies, "shop", {"app": "cart"}, identity, port, "east.mesh.local") is True  # selector does not apply


def test_graph_exports() -> None:
    data = graph_data(engine())
    assert data["networks"] == {"net-east": ["east"], "net-south": ["south"], "net-west": ["west"]}
    assert {(t["from"], t["to"], t["mutual"]) for t in data["trust"]} == {
        ("east.mesh.local", "south.mesh.local", True), ("east.mesh.local", "west.mesh.local", True),
        ("south.mesh.local", "west.mesh.local", True)}
    dot = graph_dot(data)
    assert dot.startswith("digraph meshfed {") and "subgraph cluster_net_east" in dot and dot.endswith("}")
    mer = graph_mermaid(data)
    assert mer.startswith("flowchart LR") and "c_east <-.->|trust| c_south" in mer
    json.dumps(data)


def _loader_ready() -> bool:
    import gitops

    return hasattr(gitops, "load_worktree") and EXAMPLES.is_dir()


@pytest.mark.skipif(not _loader_ready(), reason="gitops.load_worktree or examples/fleet not available yet")
def test_cli_explain_and_graph_on_examples() -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["explain", "checkout", str(EXAMPLES), "--from", "east", "-o", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["service"] == CHECKOUT_HOST and data["tiers"][0]["groups"][0]["cluster"] == "east"
    res = runner.invoke(cli, ["explain", "checkout", str(EXAMPLES), "--from", "east"])
    assert res.exit_code == 0 and "tier 0: 100.0% of traffic" in res.output
    res = runner.invoke(cli, ["explain", "nope", str(EXAMPLES), "--from", "east"])
    assert res.exit_code == 1  # an unknown service is a problem found, not a usage error (issue 15)
    for fmt, head in (("json", "{"), ("dot", "digraph"), ("mermaid", "flowchart")):
        res = runner.invoke(cli, ["graph", str(EXAMPLES), "-o", fmt])
        assert res.exit_code == 0 and res.stdout.startswith(head), res.output
    # the old spelling still works, with a deprecation note on stderr
    res = runner.invoke(cli, ["graph", str(EXAMPLES), "--format", "dot"])
    assert res.exit_code == 0 and res.stdout.startswith("digraph") and "deprecated" in res.stderr
