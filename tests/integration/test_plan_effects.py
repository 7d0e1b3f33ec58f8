"""`meshfed plan` between two real commits reports what the change does to the mesh: which
endpoints change tier for which client cluster, and which proxies get new config."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_gitops_git import commit, edit, meshfed, repo  # noqa: F401 (fixture)


def test_plan_reports_tier_changes_and_touched_proxies(repo: Path) -> None:  # noqa: F811
    edit(repo, "policies/shop/checkout.yaml",
         "          - topology.kubernetes.io/region\n          - topology.istio.io/network",
         "          - topology.istio.io/network")
    commit(repo, "checkout: fail over by network only")

    out = meshfed("plan", str(repo), "--from", "HEAD~1", "--to", "HEAD", "-o", "json")
    assert out.returncode == 1, out.stderr
    plan = json.loads(out.stdout)
    by_cluster = {e["cluster"]: e for e in plan["effects"]}
    # from east and south, west (another region AND network) moves up from tier 2 to tier 1 ...
    for client in ("east", "south"):
        changes = {(t["endpoint"], t["old_tier"], t["new_tier"]) for t in by_cluster[client]["tier_changes"]}
        assert ("west/shop/checkout@gateway", 2, 1) in changes
        assert {p["proxy"] for p in by_cluster[client]["proxies_changed"]} == {
            f"ztunnel/{client}/node-1", f"ztunnel/{client}/node-2"}
    # ... while nothing changes for clients in west (every other cluster differs at the network)
    assert "west" not in by_cluster

    text = meshfed("plan", str(repo), "--from", "HEAD~1", "--to", "HEAD")
    assert "tier changes: west/shop/checkout@gateway" in text.stdout


def test_plan_without_mesh_effect_has_no_effects(repo: Path) -> None:  # noqa: F811
    edit(repo, "policies/shop/checkout.yaml", "interval: 5s", "interval: 6s")
    commit(repo, "checkout: slower outlier sweep")
    out = meshfed("plan", str(repo), "--from", "HEAD~1", "--to", "HEAD", "-o", "json")
    plan = json.loads(out.stdout)
    assert out.returncode == 1 and plan["changes"]
    assert all(not e["tier_changes"] for e in plan["effects"])
