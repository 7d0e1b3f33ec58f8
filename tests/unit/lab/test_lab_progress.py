"""`lab up` / `lab down` print a progress line per step on stderr (what, how long) and keep
stdout for results; the runner relays the steps the supervisor publishes in lab.json."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from federation.cli.main import cli

FLEET = Path(__file__).resolve().parents[3] / "examples" / "fleet"


class FakeRunner:
    def up_from_snapshot(self, snapshot: Any, path: Path, on_progress: Any = None) -> dict[str, Any]:
        for step in ({"title": "plan", "s": 0.01, "detail": "3 clusters"},
                     {"title": "network", "s": 1.25, "detail": "3 clusters, 6 nodes"},
                     {"title": "pods ready", "s": 2.5}):
            on_progress(step)
        return {"timings": {"total_s": 3.8}, "clusters": [], "kubeconfig": "/x/kubeconfig"}

    def down(self, on_progress: Any = None) -> dict[str, Any]:
        on_progress({"title": "stop requested", "s": 0.1, "detail": "the supervisor stops every process"})
        on_progress({"title": "sandbox exited", "s": 0.4})
        return {"ok": True, "graceful": True, "sandbox_pid": 1}


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("federation.cli.lab._runner", lambda *_a, **_k: FakeRunner())


def _lines(text: str) -> list[str]:
    return [" ".join(ln.split()) for ln in text.splitlines()]


def test_lab_up_prints_each_step_and_the_total(fake: None, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["lab", "up", "--fleet", str(FLEET), "--state-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    err = _lines(r.stderr)
    assert err[0] == f"lab up: building the lab from {FLEET} in {tmp_path}"
    assert any(ln.startswith("fleet repo loaded") and ln.endswith(" s") for ln in err)
    assert "network: 3 clusters, 6 nodes 1.25 s" in err and "pods ready 2.50 s" in err
    assert any(ln.startswith("lab up (inside the sandbox: 3.8 s) in ") for ln in err)
    assert "network" not in r.stdout   # progress is not output


def test_lab_up_json_keeps_stdout_machine_readable(fake: None, tmp_path: Path) -> None:
    import json

    r = CliRunner().invoke(cli, ["lab", "up", "--fleet", str(FLEET), "--state-dir", str(tmp_path), "-o", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["kubeconfig"] == "/x/kubeconfig"


def test_lab_down_prints_each_step(fake: None, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["lab", "down", "--state-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    err = _lines(r.stderr)
    assert "stop requested: the supervisor stops every process 0.10 s" in err and "sandbox exited 0.40 s" in err
    assert err[-1].startswith("lab down in ")


def test_bring_up_steps_are_described() -> None:
    from clusters.lab.bringup import STEP_TITLES

    # the keys are the `timings` names the bring-up records (lab.json); each has a title
    assert list(STEP_TITLES) == [f"{i}_{n}_s" for i, n in enumerate(
        ["mounts", "network", "resolv_conf", "api_servers", "pods", "kubelets", "git", "ztunnels", "controller",
         "pods_ready"], start=1)]


def test_runner_relays_published_steps_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """LabRunner.up polls lab.json: each step the supervisor published is reported once, in order."""
    from clusters.lab import runner as runner_mod

    seen: list[Mapping[str, Any]] = []
    states = iter([{"phase": "Starting", "steps": [{"title": "a"}]},
                   {"phase": "Starting", "steps": [{"title": "a"}, {"title": "b"}]},
                   {"phase": "Ready", "steps": [{"title": "a"}, {"title": "b"}, {"title": "c"}]}])
    relay = runner_mod.relay_steps(seen.append)
    for st in states:
        relay(st)
    assert [s["title"] for s in seen] == ["a", "b", "c"]
