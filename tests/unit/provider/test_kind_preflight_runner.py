"""Preflight says what is missing with the fix, before anything is created; the one runner records
what it created and stops at the first failure; `lab up --provider kind` without Docker fails fast."""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

import gitops
from clusters.kind import preflight
from clusters.kind.plan import Command, KindOptions, Plan
from clusters.kind.provider import KindProvider, PreflightFailed
from clusters.kind.runner import CommandRunner, KindError
from federation.cli.main import cli

REPO = Path(__file__).resolve().parents[3]
SNAP = gitops.load_worktree(REPO / "examples" / "fleet-kind")
GOOD = preflight.HostFacts(
    commands={"docker": "/usr/bin/docker", "kind": "/usr/local/bin/kind", "kubectl": "/usr/bin/kubectl"},
    docker_engine="27.3.1", kind_version="kind v0.32.0", networks={"bridge": ["172.17.0.0/16"], "kind": ["172.18.0.0/16"]},
    routes=["default", "192.168.1.0/24"], inotify_watches=524288, inotify_instances=512)


def fixes(facts: preflight.HostFacts, snap: gitops.ConfigSnapshot | None = SNAP) -> dict[str, str]:
    return {c.name: c.fix for c in preflight.failed(preflight.evaluate(facts, snap))}


def test_a_machine_with_everything_passes() -> None:
    assert fixes(GOOD) == {}


def test_no_docker_engine_no_kind_and_low_inotify_each_come_with_their_fix() -> None:
    facts = replace(GOOD, commands={**GOOD.commands, "kind": None}, docker_engine=None,
                    docker_error="Cannot connect to the Docker daemon", inotify_watches=8192, inotify_instances=128)
    got = fixes(facts)
    assert set(got) == {"kind on PATH", "Docker engine answers", "inotify watches >= 524288", "inotify instances >= 512"}
    assert "go install sigs.k8s.io/kind@v0.32.0" in got["kind on PATH"]
    assert "systemctl start docker" in got["Docker engine answers"]
    assert "fs.inotify.max_user_watches=524288" in got["inotify watches >= 524288"]


def test_subnets_that_collide_with_this_machine_are_named() -> None:
    facts = replace(GOOD, routes=["default", "10.10.0.0/16"], networks={**GOOD.networks, "corp": ["10.120.0.0/16"]})
    [check] = [c for c in preflight.evaluate(facts, SNAP) if not c.ok]
    assert check.name == "cluster subnets are free on this machine"
    assert "east podCIDRs 10.10.0.0/16 overlaps host route 10.10.0.0/16" in check.detail
    assert "west serviceCIDRs 10.120.0.0/16 overlaps docker network corp" in check.detail


def test_a_lab_fleet_and_existing_clusters_are_problems_before_anything_is_created() -> None:
    got = fixes(replace(GOOD, kind_clusters=["east"]), gitops.load_worktree(REPO / "examples" / "fleet"))
    assert "the fleet runs on kind" in got and "no kind cluster of that name exists" in got
    assert "kind delete cluster --name east" in got["no kind cluster of that name exists"]


class FakeExec:
    def __init__(self, fail: Sequence[str] = ()) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail = set(fail)

    def __call__(self, argv: Sequence[str], stdin: str | None, timeout_s: float, env: object) -> tuple[int, str, str]:
        self.calls.append(tuple(argv))
        if any(f in " ".join(argv) for f in self.fail):
            return 1, "", "boom: the engine said no"
        return 0, "out", ""


def test_the_runner_records_what_it_created_and_stops_at_the_first_failure(tmp_path: Path) -> None:
    ex = FakeExec(fail=["create cluster --name b"])
    r = CommandRunner(tmp_path, execute=ex, out=io.StringIO())
    plan = Plan((Command(("kind", "create", "cluster", "--name", "a"), "create a", creates=("kind-cluster", "a")),
                 Command(("kind", "create", "cluster", "--name", "b"), "create b", creates=("kind-cluster", "b")),
                 Command(("never",), "never")))
    with pytest.raises(KindError, match=re.escape("create b: `kind create cluster --name b` failed (exit 1):\nboom")):
        r.run(plan)
    assert ex.calls == [("kind", "create", "cluster", "--name", "a"), ("kind", "create", "cluster", "--name", "b")]
    assert CommandRunner(tmp_path).state.created == [("kind-cluster", "a")]   # b failed: not recorded
    assert stat.S_IMODE(os.stat(tmp_path / "kind-state.json").st_mode) == 0o600


def test_retries_until_success_or_the_deadline(tmp_path: Path) -> None:
    now = [0.0]
    outcomes = iter([1, 1, 0, *([1] * 100)])

    def ex(argv: Sequence[str], stdin: str | None, timeout_s: float, env: object) -> tuple[int, str, str]:
        return next(outcomes), "", "not yet"

    r = CommandRunner(tmp_path, execute=ex, out=io.StringIO(), clock=lambda: now[0],
                      sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert r.run_one(Command(("kubectl", "apply"), "pool", retry_for_s=60)).returncode == 0
    with pytest.raises(KindError, match="retried for 2 s"):
        r.run_one(Command(("x",), "x", retry_for_s=2))


def test_up_fails_fast_on_preflight_and_creates_nothing(tmp_path: Path) -> None:
    ex = FakeExec()
    opts = KindOptions(state_dir=tmp_path, fleet_dir=REPO / "examples" / "fleet-kind", repo_dir=REPO)
    runner = CommandRunner(tmp_path, execute=ex, out=io.StringIO())
    bad = replace(GOOD, docker_engine=None, docker_error="Cannot connect to the Docker daemon")
    with pytest.raises(PreflightFailed, match="nothing was created:\n  FAIL  Docker engine answers"):
        KindProvider(opts, probe=lambda: bad, runner=runner).up(SNAP)
    assert ex.calls == [] and not (tmp_path / "kind-state.json").exists()


def test_down_deletes_exactly_what_the_state_records(tmp_path: Path) -> None:
    ex = FakeExec()
    opts = KindOptions(state_dir=tmp_path, fleet_dir=REPO / "examples" / "fleet-kind", repo_dir=REPO)
    runner = CommandRunner(tmp_path, execute=ex, out=io.StringIO())
    runner.state.created = [("kind-cluster", "east"), ("kind-cluster", "west")]  # south was never made
    runner.save()
    assert KindProvider(opts, probe=lambda: GOOD, runner=runner).down() == ["kind-cluster east", "kind-cluster west"]
    assert [c[:5] for c in ex.calls] == [("kind", "delete", "cluster", "--name", "west"),
                                          ("kind", "delete", "cluster", "--name", "east")]
    assert CommandRunner(tmp_path).state.created == []


def test_lab_up_with_kind_on_a_machine_without_docker_fails_fast_with_the_preflight(tmp_path: Path) -> None:
    """The real preflight (probe) on a PATH with neither docker nor kind: exit 2, every fix printed,
    no state directory made. This machine has no Docker engine; an empty PATH makes it so anywhere."""
    env = {"PATH": str(tmp_path / "empty-bin")}
    r = CliRunner().invoke(cli, ["lab", "up", "--provider", "kind", "--fleet", str(REPO / "examples" / "fleet-kind"),
                                 "--state-dir", str(tmp_path / "state")], env=env)
    assert r.exit_code == 2
    assert "kind cannot run here yet; nothing was created" in r.output
    assert "FAIL  docker on PATH" in r.output and "install Docker Engine" in r.output
    assert "FAIL  kind on PATH" in r.output and "meshfed check --pre --provider kind" in r.output
    assert not (tmp_path / "state").exists()


def test_check_pre_reports_and_exits_1(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["check", "--pre", "--provider", "kind", "--fleet", str(REPO / "examples" / "fleet-kind"),
                                 "-o", "json"], env={"PATH": str(tmp_path)})
    assert r.exit_code == 1
    assert '"check": "docker on PATH"' in r.output and '"ok": false' in r.output


def test_image_build_is_docker_build_then_kind_load_per_cluster() -> None:
    r = CliRunner().invoke(cli, ["image", "build", "--dry-run", "--fleet", str(REPO / "examples" / "fleet-kind")])
    assert r.exit_code == 0, r.output
    lines = [line.strip() for line in r.output.splitlines() if line.startswith("    ")]
    assert lines[0].startswith("docker build -t meshfed/meshfed:0.1.0 -f ") and lines[0].endswith(str(REPO))
    assert lines[1:] == [f"kind load docker-image meshfed/meshfed:0.1.0 --name {c}" for c in ("east", "south", "west")]
    bad = CliRunner().invoke(cli, ["image", "build", "--dry-run", "--tag", "meshfed/meshfed:latest"])
    assert bad.exit_code == 64 and "give a version" in bad.output
