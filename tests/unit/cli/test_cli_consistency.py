"""Issue 15, CLI consistency: one `-o`, one exit-code convention, one fleet default, logging flags
on every command, shell completion with cluster and service names, progress lines."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from federation.cli.main import cli
from federation.cli.output import EXIT_PROBLEMS, EXIT_USAGE, Progress, find_fleet

REPO = Path(__file__).resolve().parents[3]
FLEET = REPO / "examples" / "fleet"
READ_COMMANDS = ("validate", "plan", "explain", "graph", "trust", "status", "clusters", "services", "endpoints",
                 "failover history", "check", "lab status", "chaos validate", "chaos list")


def _commands(cmd: click.Command = cli, path: tuple[str, ...] = ()) -> dict[str, click.Command]:
    if isinstance(cmd, click.Group):
        out: dict[str, click.Command] = {}
        for name, sub in cmd.commands.items():
            out.update(_commands(sub, (*path, name)))
        return out
    return {" ".join(path): cmd}


def _choices(cmd: click.Command, name: str) -> tuple[str, ...]:
    (param,) = [p for p in cmd.params if p.name == name]
    assert isinstance(param.type, click.Choice)
    return tuple(param.type.choices)


@pytest.mark.parametrize("name", READ_COMMANDS)
def test_every_read_command_takes_the_four_output_formats(name: str) -> None:
    assert {"table", "wide", "json", "yaml"} <= set(_choices(_commands()[name], "output"))


def test_graph_takes_o_like_the_others() -> None:
    assert {"dot", "mermaid", "json"} <= set(_choices(_commands()["graph"], "output"))
    r = CliRunner().invoke(cli, ["graph", str(FLEET), "-o", "table"])
    assert r.exit_code == 0, r.output
    assert "CLUSTER" in r.stdout and "east" in r.stdout and "SERVICE" in r.stdout
    wide = CliRunner().invoke(cli, ["graph", str(FLEET), "-o", "wide"])
    assert wide.exit_code == 0 and "@" in wide.stdout   # endpoints uid@address


def test_wide_adds_to_the_table() -> None:
    narrow = CliRunner().invoke(cli, ["validate", str(REPO / "examples" / "broken"), "-o", "table"])
    wide = CliRunner().invoke(cli, ["validate", str(REPO / "examples" / "broken"), "-o", "wide"])
    assert narrow.exit_code == wide.exit_code == EXIT_PROBLEMS
    assert len(wide.stdout.splitlines()) > len(narrow.stdout.splitlines())


def test_every_command_takes_the_logging_flags_before_or_after_its_name() -> None:
    for name, cmd in _commands().items():
        names = {p.name for p in cmd.params}
        assert {"log_level", "log_format"} <= names, name
    r = CliRunner().invoke(cli, ["--log-level", "debug", "validate", str(FLEET), "--log-format", "json"])
    assert r.exit_code == 0, r.output
    bad = CliRunner().invoke(cli, ["validate", str(FLEET), "--log-format", "xml"])
    assert bad.exit_code == 2 and "text" in bad.output   # click's usage error; `meshfed` maps it to 64


def test_help_documents_the_exit_codes_and_the_flags() -> None:
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for needle in ("0 ok", "1 problems found", "2 could not run", "64 usage", "--log-level", "--log-format",
                   "-o table|wide|json|yaml", "completion"):
        assert needle in text, needle


def test_unknown_names_are_problems_not_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    r = CliRunner().invoke(cli, ["explain", "nosuch", str(FLEET), "--from", "east"])
    assert r.exit_code == EXIT_PROBLEMS and "nosuch" in r.output
    r = CliRunner().invoke(cli, ["explain", "checkout", str(FLEET), "--from", "nowhere"])
    assert r.exit_code == EXIT_PROBLEMS and "nowhere" in r.output

    def answer(_controller: str, path: str, **_params: Any) -> dict[str, Any]:
        return {"error": f"no service nosuch ({path})", "usage": True}

    monkeypatch.setattr("federation.cli.ops.fetch", answer)
    for argv in (["endpoints", "nosuch"], ["explain", "nosuch", "--from", "east", "--controller", "http://x"]):
        r = CliRunner().invoke(cli, argv)
        assert r.exit_code == EXIT_PROBLEMS and "no service nosuch" in r.output, argv


# --- the fleet repo's path ------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["validate"], ["graph"], ["explain", "checkout", "--from", "east"],
                                  ["trust"], ["install", "--context", "kind-east", "--print"], ["lab", "up"],
                                  ["lab", "fault", "stop", "pod", "east/shop/x", "--provider", "kind"]])
def test_without_a_fleet_here_every_command_names_fleet(argv: list[str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHFED_FLEET", raising=False)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == EXIT_USAGE, r.output
    assert "--fleet" in r.output and "federation.yaml" in r.output and "MF0011" not in r.output


@pytest.mark.parametrize("argv", [["validate"], ["graph", "-o", "json"], ["explain", "checkout", "--from", "east"]])
def test_the_fleet_defaults_to_here_then_to_the_environment(argv: list[str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHFED_FLEET", raising=False)
    here = tmp_path / "fleet"
    shutil.copytree(FLEET, here)
    monkeypatch.chdir(here)
    assert CliRunner().invoke(cli, argv).exit_code == 0
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MESHFED_FLEET", str(here))
    assert CliRunner().invoke(cli, argv).exit_code == 0
    r = CliRunner().invoke(cli, [*argv, "--fleet", str(here)])
    assert r.exit_code == 0, r.output


def test_lab_fault_passes_the_chaos_faults_options_and_the_kind_fleet_defaults_like_everywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Merging issue 13 into issue 15: `lab fault` keeps main's --kbit/--skew-s/--behaviour (they
    reach the runner) and its --fleet is the common one ($MESHFED_FLEET for --provider kind)."""
    calls: list[tuple[Any, ...]] = []

    class Runner:
        def fault(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            calls.append((args, kwargs))
            return {"applied": ["one"]}

    monkeypatch.setattr("federation.cli.lab._runner", lambda _state_dir: Runner())
    r = CliRunner().invoke(cli, ["lab", "fault", "bandwidth", "wan", "east", "south", "--kbit", "128",
                                 "--skew-s", "-30", "--behaviour", "Hang"])
    assert r.exit_code == 0, r.output
    (args, kwargs), = calls
    assert args[:3] == ("bandwidth", "wan", ("east", "south"))
    assert kwargs == {"rate_kbit": 128.0, "skew_s": -30.0, "behaviour": "Hang"}

    kinds: list[str] = []

    class Kind:
        def fault(self, _snap: Any, *args: Any) -> list[str]:
            return ["paused"]

    def kind(_state_dir: str | None, fleet: str, dry_run: bool = False) -> Kind:
        kinds.append(fleet)
        return Kind()

    monkeypatch.setattr("federation.cli.lab._kind", kind)
    monkeypatch.setattr("federation.cli.kind.load_fleet", lambda fleet: None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MESHFED_FLEET", str(FLEET))
    r = CliRunner().invoke(cli, ["lab", "fault", "stop", "node", "east/node-1", "--provider", "kind"])
    assert r.exit_code == 0, r.output
    assert kinds == [str(FLEET)] and "1 step(s) applied" in r.output


def test_two_different_fleets_are_refused() -> None:
    r = CliRunner().invoke(cli, ["validate", str(FLEET), "--fleet", str(REPO / "examples" / "broken")])
    assert r.exit_code == EXIT_USAGE and "give one of them" in r.output


def test_find_fleet_names_the_fleets_nearby(tmp_path: Path) -> None:
    (tmp_path / "examples" / "fleet").mkdir(parents=True)
    (tmp_path / "examples" / "fleet" / "federation.yaml").write_text("")
    path, why = find_fleet(None, cwd=tmp_path, env={})
    assert path is None and "--fleet examples/fleet" in why
    assert find_fleet(None, cwd=tmp_path / "examples" / "fleet", env={})[0] == Path(".")
    assert find_fleet(None, cwd=tmp_path, env={"MESHFED_FLEET": "/f"})[0] == Path("/f")
    assert find_fleet("given", cwd=tmp_path, env={"MESHFED_FLEET": "/f"})[0] == Path("given")


# --- completion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_a_script_per_shell(shell: str) -> None:
    r = CliRunner().invoke(cli, ["completion", shell])
    assert r.exit_code == 0 and "_MESHFED_COMPLETE" in r.stdout


def _complete(words: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What bash completion offers for the last word of `words` (click's protocol)."""
    monkeypatch.setenv("_MESHFED_COMPLETE", "bash_complete")
    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", str(len(words.split()) - (0 if words.endswith(" ") else 1)))
    r = CliRunner().invoke(cli, [], prog_name="meshfed")
    return [ln.split(",", 1)[1] for ln in r.output.splitlines() if "," in ln]


def test_completion_offers_cluster_and_service_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHFED_CONTROLLER", raising=False)
    monkeypatch.setenv("MESHFED_FLEET", str(FLEET))
    services = _complete("meshfed explain ", monkeypatch)
    assert "checkout" in services
    assert _complete("meshfed explain checkout --from ", monkeypatch) == ["east", "south", "west"]
    # endpoints talks to a controller (none answers here): the fleet repo's names
    offered = _complete("meshfed endpoints che", monkeypatch)
    assert "checkout" in offered and all(n.startswith("che") for n in offered)
    assert _complete(f"meshfed explain checkout {FLEET} --from we", monkeypatch) == ["west"]


# --- progress --------------------------------------------------------------------------------------


def test_progress_lines_say_what_and_how_long() -> None:
    ticks = iter([0.0, 1.0, 3.5, 4.0, 4.25, 9.0])
    buf = io.StringIO()
    p = Progress("lab up", "3 clusters from examples/fleet", stream=buf, clock=lambda: next(ticks), total=3)
    with p.step("network", "3 clusters, 6 nodes"):
        pass
    p.done("emulated API servers", 0.5)
    with pytest.raises(RuntimeError), p.step("pods"):
        raise RuntimeError("boom")
    assert p.finish() == 9.0
    lines = buf.getvalue().splitlines()
    assert lines[0] == "lab up: 3 clusters from examples/fleet"
    assert lines[1].startswith("  [1/3] network: 3 clusters, 6 nodes") and lines[1].endswith("2.50 s")
    assert lines[2].startswith("  [2/3] emulated API servers") and lines[2].endswith("0.50 s")
    assert lines[3] == "  pods: failed after 0.25 s"
    assert lines[4] == "lab up in 9.0 s"
    assert [s for s, _ in p.steps] == ["network", "emulated API servers"]


def test_json_output_stays_clean_of_logs() -> None:
    r = CliRunner().invoke(cli, ["validate", str(FLEET), "-o", "json", "--log-level", "debug"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["valid"] is True
