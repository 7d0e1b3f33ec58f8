"""kubectl habits for every command: `-o table|wide|json|yaml`, errors to stderr, stable exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

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
