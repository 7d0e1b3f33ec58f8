"""`meshfed chaos run | list | validate`: chaos failover experiments (ChaosExperiment files).

Thin: reading is `gitops.experiment`, checking against the fleet `chaos.validate`, running and
reporting `chaos.engine` (the same engine `meshfed demo` drives). Exit codes: run 0 every
expectation held (expected failures included) / 1 an expectation or a steady state did not hold /
2 an experiment could not run to the end (or the lab did not come up); validate 0 / 1 problems;
usage 64.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.markup import escape  # cells hold "[east, south]": text, not markup

from federation.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    emit_data,
    fail,
    output_option,
    stdout,
    table,
)

DEFAULT_STATE_DIR = "/tmp/meshfed-chaos"


def _load(paths: Sequence[str], fleet: str | None, suite: str | None, only: Sequence[str]) -> tuple[list[Any], list[Any]]:
    """(experiments selected, problems) — file problems and fleet problems together."""
    from chaos.validate import validate, with_fleet
    from gitops.experiment import load_experiments

    loaded = load_experiments(paths)
    fleet_dir = Path(fleet) if fleet else None
    exps = [with_fleet(e, fleet_dir) for e in loaded.experiments]
    if suite:  # a file named on the command line always runs; --suite selects among directories' files
        named = {str(Path(p)) for p in paths if Path(p).is_file()}
        exps = [e for e in exps if suite in e.suites or str(Path(e.file)) in named]
    if only:
        unknown = sorted(set(only) - {e.name for e in exps})
        if unknown:
            fail(f"no experiment named {', '.join(unknown)} in {' '.join(paths)}",
                 hint="`meshfed chaos list PATH` shows their names", code=EXIT_USAGE)
        exps = [e for e in exps if e.name in only]
    problems = list(loaded.problems) + validate(exps)
    return exps, problems


def _print_problems(problems: Sequence[Any]) -> None:
    for p in sorted(problems, key=lambda p: (p.pos.file, p.pos.line, p.pos.col, p.code)):
        click.echo(p.render())


paths_argument = click.argument("paths", nargs=-1, required=True, type=click.Path())
fleet_option = click.option("--fleet", "fleet", default=None, type=click.Path(file_okay=False), metavar="DIR",
                            help="run every experiment against this fleet repo (instead of each spec.fleet)")
suite_option = click.option("--suite", "suite", default=None, metavar="NAME",
                            help="of the experiments in the directories given, only those labelled "
                                 "chaos.meshfed.dev/suite=NAME (e.g. ci); files named explicitly always run")


@click.group("chaos")
def chaos() -> None:
    """Chaos failover experiments: faults under steady traffic, checked against SLOs, with reports."""


@chaos.command("validate")
@paths_argument
@fleet_option
@click.option("--provider", type=click.Choice(["lab", "kind"]), default="lab", show_default=True,
              help="kind: also say, per experiment, which of its faults have no kind equivalent")
@output_option(formats=("table", "json", "yaml"))
def validate_cmd(paths: tuple[str, ...], fleet: str | None, provider: str, output: str) -> None:
    """Check experiment files, and each against its fleet repo and lab (nothing is run)."""
    from gitops.problems import Severity

    exps, problems = _load(paths, fleet, None, ())
    errors = [p for p in problems if p.severity is Severity.ERROR]
    kind = _kind_gaps(exps) if provider == "kind" and not errors else None
    if output in ("json", "yaml"):
        emit_data({"valid": not errors, "experiments": [e.name for e in exps],
                   "problems": [p.as_dict() for p in problems]}
                  | ({"kind": {name: {"maps": not gaps, "gaps": gaps} for name, gaps in kind.items()}}
                     if kind is not None else {}), output)
    else:
        _print_problems(problems)
        if errors:
            click.echo(f"invalid: {len(errors)} errors in {len(exps)} experiment(s) read", err=True)
        else:
            click.echo(f"valid: {len(exps)} experiment(s): {', '.join(e.name for e in exps)}")
        if kind is not None:
            _print_kind(kind)
    sys.exit(EXIT_PROBLEMS if errors else EXIT_OK)


def _kind_gaps(exps: Sequence[Any]) -> dict[str, list[str]]:
    """Experiment name -> its faults with no kind equivalent (kind's planner decides)."""
    from chaos.validate import kind_gaps, load_fleet

    fleets: dict[str, Any] = {}
    out: dict[str, list[str]] = {}
    for e in exps:
        if e.fleet_dir not in fleets:
            fleets[e.fleet_dir] = load_fleet(Path(e.fleet_dir))[0]
        out[e.name] = kind_gaps(e, fleets[e.fleet_dir])   # validated: the fleet loads
    return out


def _print_kind(kind: dict[str, list[str]]) -> None:
    from chaos.validate import KIND_FAULTS

    maps = [n for n, gaps in kind.items() if not gaps]
    click.echo(f"on kind, every fault maps for {len(maps)} of {len(kind)}: {', '.join(maps) or 'none'}")
    for name, gaps in kind.items():
        for g in gaps:
            click.echo(f"  {name}: {g}")
    click.echo(f"  (kind has: {KIND_FAULTS})")


@chaos.command("list")
@paths_argument
@fleet_option
@suite_option
@output_option()
def list_cmd(paths: tuple[str, ...], fleet: str | None, suite: str | None, output: str) -> None:
    """The experiments: what each proves, its faults and what it expects."""
    from gitops.experiment import load_experiments

    loaded = load_experiments(paths)
    if loaded.errors:
        _print_problems(loaded.errors)
        fail(f"{len(loaded.errors)} experiment file(s) have errors", hint="`meshfed chaos validate PATH`",
             code=EXIT_PROBLEMS)
    exps = [e for e in loaded.experiments if not suite or suite in e.suites]
    rows = [_row(e, fleet) for e in exps]
    if output in ("json", "yaml"):
        emit_data(rows, output)
        return
    cols = ["NAME", "SUITE", "FAULTS", "EXPECTS", "PROVES"]
    if output == "wide":
        cols = ["NAME", "SUITE", "FLEET", "FAULTS", "EXPECTS", "FILE", "PROVES"]
    stdout().print(table(cols, [[escape(str(r[c.lower()])) for c in cols] for r in rows]))


def _row(e: Any, fleet: str | None) -> dict[str, Any]:
    expects = []
    for x in e.expect:
        parts = []
        if x.served_by:
            parts.append("servedBy " + ">".join("|".join(a) for a in x.served_by))
        if x.failover_within_s is not None:
            parts.append(f"failover<={x.failover_within_s:g}s")
        if x.failback_within_s is not None:
            parts.append(f"failback<={x.failback_within_s:g}s")
        if x.max_failed is not None:
            parts.append(f"failed<={x.max_failed}")
        expects.append(f"{x.client}: " + ", ".join(parts))
    return {"name": e.name, "suite": ",".join(e.suites) or "-", "fleet": fleet or e.fleet_dir,
            "faults": "; ".join(s.fault.describe() for s in e.faults) or "-", "expects": "; ".join(expects) or "-",
            "file": e.file, "proves": e.description + (" (expected to fail)" if e.expected_failure else "")}


@chaos.command("run")
@paths_argument
@click.option("--provider", type=click.Choice(["lab", "kind"]), default="lab", show_default=True,
              help="where the experiments run (lab: network namespaces on this machine)")
@click.option("--junit", "junit", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="write JUnit XML (one testcase per experiment) for CI")
@click.option("--out", "out", default=None, metavar="DIR",
              help="reports go to DIR/<experiment>/ (default ./out/chaos-<timestamp>/)")
@fleet_option
@suite_option
@click.option("--only", "only", multiple=True, metavar="NAME", help="run only this experiment (repeatable)")
@click.option("--state-dir", "state_dir", default=DEFAULT_STATE_DIR, show_default=True,
              help="the lab's state directory; a lab already running there (of the same fleet) is used as is")
@click.option("--keep", is_flag=True, help="leave the lab running afterwards")
def run_cmd(paths: tuple[str, ...], provider: str, junit: str | None, out: str | None, fleet: str | None,
            suite: str | None, only: tuple[str, ...], state_dir: str, keep: bool) -> None:
    """Run experiments: steady state, faults, pushes; verdicts, reports and JUnit."""
    from chaos.engine import Engine, Narrator, ProviderUnavailable, RunOptions
    from chaos.junit import to_xml
    from chaos.report import summary_markdown
    from gitops.problems import Severity

    exps, problems = _load(paths, fleet, suite, only)
    errors = [p for p in problems if p.severity is Severity.ERROR]
    if errors:
        _print_problems(errors)
        fail(f"{len(errors)} problem(s) in the experiments; nothing was run", hint="`meshfed chaos validate PATH`",
             code=EXIT_PROBLEMS)
    if not exps:
        fail("no experiment selected", hint="check the paths and --suite / --only", code=EXIT_USAGE)
    out_dir = Path(out or f"out/chaos-{time.strftime('%Y%m%d-%H%M%S')}")

    class Lines(Narrator):
        def say(self, text: str) -> None:
            click.echo(text)

    try:
        engine = Engine(RunOptions(out_dir=out_dir, state_dir=Path(state_dir), keep=keep, provider=provider), Lines())
    except ProviderUnavailable as e:
        fail(str(e), code=EXIT_FAILED)
    t0 = time.monotonic()
    results = engine.run(exps)
    if junit:
        Path(junit).parent.mkdir(parents=True, exist_ok=True)
        Path(junit).write_text(to_xml([r.case() for r in results]))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(summary_markdown(
        [(r.experiment.name, r.status, r.error, r.verdicts) for r in results],
        f"`meshfed chaos run {' '.join(paths)}` — {time.strftime('%Y-%m-%d %H:%M')}"))
    click.echo("")
    rows = [[r.experiment.name, r.status.upper(), f"{r.duration_s:.0f}s",
             escape("; ".join(v.message() for v in r.failed)[:300] or r.error[:300] or "-")] for r in results]
    stdout().print(table(["EXPERIMENT", "RESULT", "TIME", "WHAT DID NOT HOLD"], rows))
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "error", "xfail", "xpass")}
    click.echo(f"{len(results)} experiment(s) in {time.monotonic() - t0:.0f} s: "
               + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; reports in {out_dir} (summary.md)"
               + (f"; JUnit {junit}" if junit else ""))
    if counts["error"]:
        sys.exit(EXIT_FAILED)
    sys.exit(EXIT_PROBLEMS if counts["failed"] else EXIT_OK)


def register(group: click.Group) -> None:
    group.add_command(chaos)
