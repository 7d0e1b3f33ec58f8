"""kubectl habits for every command: `-o table|wide|json|yaml`, errors to stderr, stable exit codes."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TextIO, TypeVar

import click
from rich.console import Console
from rich.table import Table

# Exit codes (ARCHITECTURE.md "CLI"): 0 ok, 1 found problems / a diff, 2 could not complete, 64 usage.
EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_FAILED = 2
EXIT_USAGE = 64

OUTPUT_FORMATS = ("table", "wide", "json", "yaml")

F = TypeVar("F", bound=Callable[..., Any])


def output_option(default: str = "table", formats: Sequence[str] = OUTPUT_FORMATS) -> Callable[[F], F]:
    return click.option("-o", "--output", "output", type=click.Choice(list(formats)), default=default,
                        show_default=True, help="output format")


# Like kubectl: when stdout is not a terminal (a pipe, a file, CI logs), print tables at full
# width instead of wrapping cells to an assumed 80 columns, so `| grep` sees whole rows.
PIPE_WIDTH = 240


def stdout() -> Console:
    return Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def stderr() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def emit_data(data: Any, fmt: str) -> None:
    """Print machine-readable output (json/yaml) of plain data to stdout."""
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
    elif fmt == "yaml":
        from io import StringIO

        from ruamel.yaml import YAML

        y = YAML(typ="safe", pure=True)
        y.default_flow_style = False
        buf = StringIO()
        y.dump(json.loads(json.dumps(data, default=str)), buf)
        click.echo(buf.getvalue(), nl=False)
    else:  # pragma: no cover - callers route tables elsewhere
        raise ValueError(f"not a data format: {fmt}")


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> Table:
    t = Table(title=title, show_edge=False, box=None, header_style="bold", pad_edge=False)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


def fail(message: str, hint: str = "", code: int = EXIT_FAILED) -> NoReturn:
    """Print an error (and a hint) to stderr and exit with `code`."""
    err = stderr()
    err.print(f"error: {message}", markup=False)
    if hint:
        err.print(f"  hint: {hint}", markup=False)
    sys.exit(code)


# --- progress -------------------------------------------------------------------------------------


class Progress:
    """Progress lines of a command that builds or tears down something (`lab up`, `lab down`,
    `chaos run`): what is being done, one line per finished step with how long it took, and the
    total. Lines go to stderr so that `-o json` output on stdout stays machine-readable.

        progress = Progress("lab up", "3 clusters, 6 nodes, 18 pods from examples/fleet")
        with progress.step("network namespaces and links"):
            ...
        progress.done("emulated API servers", 0.12, "3 servers")   # a step timed elsewhere
        progress.finish("lab up")                                   # "lab up in 4.2 s"

    `clock` is injectable (tests); `stream` defaults to stderr at the time of each line."""

    def __init__(self, command: str, what: str = "", *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, total: int | None = None) -> None:
        self.command = command
        self.clock = clock
        self.stream = stream
        self.total = total
        self.count = 0
        self.started_s = clock()
        self.steps: list[tuple[str, float]] = []
        if what:
            self._line(f"{command}: {what}")

    def _line(self, text: str) -> None:
        click.echo(text, file=self.stream if self.stream is not None else sys.stderr)

    def done(self, what: str, seconds: float, detail: str = "") -> None:
        """A finished step (timed here or elsewhere, e.g. inside the lab's sandbox)."""
        self.count += 1
        self.steps.append((what, seconds))
        n = f"[{self.count}/{self.total}] " if self.total else ""
        label = f"{what}: {detail}" if detail else what
        self._line(f"  {n}{label:<60} {seconds:6.2f} s")

    def note(self, text: str) -> None:
        self._line(f"  {text}")

    @contextmanager
    def step(self, what: str, detail: str = "") -> Iterator[None]:
        """Time the block as one step; a step that raises is reported as failed, then re-raised."""
        t0 = self.clock()
        try:
            yield
        except BaseException:
            self._line(f"  {what}: failed after {self.clock() - t0:.2f} s")
            raise
        self.done(what, self.clock() - t0, detail)

    def elapsed_s(self) -> float:
        return self.clock() - self.started_s

    def finish(self, summary: str = "") -> float:
        """Print `<summary> in <total> s`; returns the total."""
        total = self.elapsed_s()
        self._line(f"{summary or self.command} in {total:.1f} s")
        return total


# --- the fleet repo's path ------------------------------------------------------------------------

ENV_FLEET = "MESHFED_FLEET"
FLEET_MARKER = "federation.yaml"   # a fleet repo's root holds it (gitops: MF0011)


def fleet_option(help_text: str = "fleet repo directory") -> Callable[[F], F]:
    """`--fleet DIR`, resolved by `resolve_fleet` (the same default everywhere)."""
    return click.option("--fleet", "fleet", default=None, metavar="DIR", type=click.Path(file_okay=False),
                        help=f'{help_text} (default: ${ENV_FLEET}, else "." if it holds {FLEET_MARKER})')


def find_fleet(explicit: str | None, cwd: Path | None = None,
               env: Mapping[str, str] | None = None) -> tuple[Path | None, str]:
    """Where the fleet repo is, or None and why: `explicit` (a positional PATH or --fleet) when
    given, else $MESHFED_FLEET, else "." when it holds federation.yaml. The why names --fleet, and
    the fleets below `cwd` when there are any (the repository's examples)."""
    if explicit:
        return Path(explicit), ""
    from_env = (os.environ if env is None else env).get(ENV_FLEET)
    if from_env:
        return Path(from_env), ""
    here = cwd if cwd is not None else Path.cwd()
    if (here / FLEET_MARKER).is_file():
        return Path("."), ""
    near = sorted(str(p.parent.relative_to(here)) for p in here.glob(f"*/*/{FLEET_MARKER}"))[:3]
    hint = f" (e.g. --fleet {near[0]}; fleets here: {', '.join(near)})" if near else ""
    return None, (f"no fleet repo given and {here} holds no {FLEET_MARKER}: pass --fleet DIR or set "
                  f"${ENV_FLEET}{hint}")


def resolve_fleet(explicit: str | None) -> Path:
    """`find_fleet`, or exit 64 (usage: the command needs to be told where the fleet is)."""
    path, why = find_fleet(explicit)
    if path is None:
        fail(why, code=EXIT_USAGE)
    return path


def fleet_from(path_arg: str | None, fleet: str | None) -> Path:
    """A command that takes the fleet as a positional PATH (validate, explain, graph, plan, trust)
    and as --fleet: either, not two different ones."""
    if path_arg and fleet and os.path.abspath(path_arg) != os.path.abspath(fleet):
        fail(f"two fleet repos given: PATH {path_arg} and --fleet {fleet}", hint="give one of them",
             code=EXIT_USAGE)
    return resolve_fleet(path_arg or fleet)
