"""Every bad-input case: the code, the file:line:col, and `meshfed validate`'s exit status."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

import gitops
from federation.cli.main import cli
from gitops import loader
from gitops.codes import CATALOGUE
from gitops.problems import Severity
from tests.unit.gitops.cases import CASES, DR
from tests.unit.gitops.conftest import EXAMPLE

MakeFleet = Callable[..., Path]


def test_example_fleet_is_clean() -> None:
    assert gitops.validate_tree(EXAMPLE) == []
    result = CliRunner().invoke(cli, ["validate", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


@pytest.mark.parametrize(("case_id", "edits", "code", "loc", "exit_status"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(fleet_copy: MakeFleet, case_id: str, edits: tuple[object, ...], code: str, loc: str,
                   exit_status: int) -> None:
    root = fleet_copy(*edits)
    problems = gitops.validate_tree(root)
    hits = [p for p in problems if p.code == code]
    assert hits, f"{case_id}: expected {code}, got {[p.render() for p in problems]}"
    assert str(hits[0].pos) == loc
    assert hits[0].message and hits[0].hint, "every problem says the cause and the fix"
    # The CLI: printed as `Severity [CODE] (Object) file:line:col message` plus a hint line.
    result = CliRunner().invoke(cli, ["validate", str(root)])
    assert result.exit_code == exit_status, result.output
    lines = [ln for ln in result.output.splitlines() if f"[{code}]" in ln and f" {loc} " in ln]
    assert lines, result.output
    assert lines[0].startswith(f"{hits[0].severity.value} [{code}]")
    if exit_status == 1:
        with pytest.raises(gitops.FleetError) as info:
            gitops.load_worktree(root)
        assert any(p.code == code for p in info.value.problems)
    else:
        assert all(p.severity is Severity.WARNING for p in problems)
        gitops.load_worktree(root)  # warnings do not stop a snapshot


def test_every_code_in_the_catalogue_is_exercised() -> None:
    exercised = {c[2] for c in CASES} | {"MF0013"}  # MF0013: test_too_many_files
    # emitted by the federation core's trust graph (federation/core/trust_graph.py), which needs the
    # whole graph; exercised in tests/unit/core/test_graph.py and test_failover.py
    exercised |= {"MF0405", "MF0406"}
    # emitted by the controller's commit gate (federation/core/rotation_gate.py), which needs the applied
    # revision and the leaves issued; exercised in tests/unit/controller/test_rotation_gate.py
    exercised |= {"MF0407"}
    # chaos experiments (ChaosExperiment files): tests/unit/gitops/test_experiments.py (the file alone)
    # and tests/unit/chaos/test_validate.py (against the fleet and its lab)
    exercised |= {"MF0701", "MF0702", "MF0703", "MF0704", "MF0705", "MF0706", "MF0707", "MF0708"}
    # the removal guard (federation/core/removal.py) compares a commit with the applied revision;
    # exercised in tests/unit/core/test_removal.py and by `meshfed plan` in tests/integration/test_plan_effects.py
    exercised |= {"MF0516"}
    assert set(CATALOGUE) == exercised


def test_too_many_files(fleet_copy: MakeFleet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_FILES", 5)
    problems = gitops.validate_tree(fleet_copy())
    assert [p.code for p in problems] == ["MF0013"]


def test_unknown_field_says_did_you_mean_and_lists_supported(fleet_copy: MakeFleet) -> None:
    root = fleet_copy(("replace", DR, "maxEjectionPercent: 100", "maxEjectionPercnt: 100"))
    (p,) = gitops.validate_tree(root)
    assert "did you mean 'maxEjectionPercent'" in p.hint
    assert "supported here: consecutive5xxErrors, consecutiveGatewayErrors" in p.hint
    assert str(p.obj) == "DestinationRule shop/checkout"


def test_max_ejection_percent_hint_names_the_smallest_working_value(fleet_copy: MakeFleet) -> None:
    root = fleet_copy(("replace", DR, "maxEjectionPercent: 100", "maxEjectionPercent: 10"))
    (p,) = gitops.validate_tree(root)
    assert p.code == "MF0505"
    # a node proxy's pool is its view: the 2 checkout pods of its own network plus one entry for
    # each of the 2 remote clusters behind their gateways (not the 6 replicas of the fleet)
    assert "4 host(s)" in p.message and "a proxy in cluster east" in p.message
    assert "at least 25" in p.hint   # 4 * 25 >= 100


@pytest.mark.parametrize(("percent", "ok"), [(16, False), (17, False), (24, False), (25, True), (100, True)])
def test_max_ejection_percent_boundary(fleet_copy: MakeFleet, percent: int, ok: bool) -> None:
    root = fleet_copy(("replace", DR, "maxEjectionPercent: 100", f"maxEjectionPercent: {percent}"))
    assert (gitops.validate_tree(root) == []) is ok


def test_json_output(fleet_copy: MakeFleet) -> None:
    root = fleet_copy(("replace", DR, "interval: 5s", "interval: 5sec"))
    result = CliRunner().invoke(cli, ["validate", str(root), "-o", "json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["valid"] is False
    (p,) = data["problems"]
    assert (p["code"], p["file"], p["line"], p["col"]) == ("MF0104", DR, 12, 17)


def test_cli_unreadable_path_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "nope")])
    assert result.exit_code == 2


def test_cli_usage_error_exits_64() -> None:
    with pytest.raises(SystemExit) as info:
        cli.run(["validate", "--output", "xml", str(EXAMPLE)])
    assert info.value.code == 64


def test_many_problems_reported_at_once(fleet_copy: MakeFleet) -> None:
    root = fleet_copy(("replace", DR, "interval: 5s", "interval: 5sec"),
                      ("replace", "clusters/east.yaml", "10.10.0.0/16", "10.10.0.1/16"),
                      ("replace", "services/shop/checkout.yaml", "    - south\n", "    - sooth\n"))
    codes = {p.code for p in gitops.validate_tree(root)}
    assert {"MF0104", "MF0301", "MF0202"} <= codes
