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


def _remove_clusters(repo: Path, *clusters: str) -> None:  # noqa: F811
    for c in clusters:
        (repo / f"clusters/{c}.yaml").unlink()
        (repo / f"lab/{c}.yaml").unlink()
        for svc in (repo / "services/shop").glob("*.yaml"):
            svc.write_text(svc.read_text().replace(f"    - {c}\n", ""))


def test_plan_shows_that_the_controller_would_refuse_a_commit_that_removes_too_much(repo: Path) -> None:  # noqa: F811
    """Issue 11 item 19: deleting west's and south's files removes 2 of 3 clusters (and most global
    endpoints): the plan says the controller refuses it (MF0516), naming the files and the fix."""
    _remove_clusters(repo, "west", "south")
    commit(repo, "drop west and south")
    out = meshfed("plan", str(repo), "--from", "HEAD~1", "--to", "HEAD", "-o", "json")
    assert out.returncode == 1, out.stderr
    plan = json.loads(out.stdout)
    assert plan["refused"] is True and {p["code"] for p in plan["refusals"]} == {"MF0516"}
    assert any("2 of 3 clusters" in p["message"] and "clusters/west.yaml" in p["message"] for p in plan["refusals"])
    text = meshfed("plan", str(repo), "--from", "HEAD~1", "--to", "HEAD")
    assert "REFUSED: the controller would not apply this revision" in text.stdout
    assert "[MF0516]" in text.stdout and "spec.removal.intended" in text.stdout

    # the Federation says it is intended: planned like any other change
    edit(repo, "federation.yaml", "  partition:\n",
         "  removal:\n    intended:\n      clusters: [west, south]\n  partition:\n")
    commit(repo, "intended: west and south leave")
    plan = json.loads(meshfed("plan", str(repo), "--from", "HEAD~2", "--to", "HEAD", "-o", "json").stdout)
    assert plan["refused"] is False and plan["refusals"] == []


def test_plan_of_a_single_cluster_removal_is_not_refused(repo: Path) -> None:  # noqa: F811
    _remove_clusters(repo, "south")
    commit(repo, "drop south")
    plan = json.loads(meshfed("plan", str(repo), "--from", "HEAD~1", "--to", "HEAD", "-o", "json").stdout)
    assert plan["refused"] is False
    assert {(c["action"], c["kind"], c["name"]) for c in plan["changes"]} >= {("removed", "Cluster", "south")}
