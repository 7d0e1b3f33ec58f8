"""The `meshfed` command. Each command group lives in its own module and registers itself here.

Usage errors exit 64 (sysexits EX_USAGE), like kubectl's habits extended with BSD's code, so that
scripts can tell "you called it wrong" (64) from "it found problems" (1) and "it failed" (2).

`--log-level` and `--log-format` are accepted by every command, before or after its name (like
kubectl's `-v`): the root group and each command get the same two options, whose callbacks
configure logging once per context (`ztunnel.api.logsetup`, the one place that sets it up). The
most specific value wins: a flag on the command over one on `meshfed`, a flag over
$MESHFED_LOG_LEVEL/$MESHFED_LOG_FORMAT. Commands that print results log only warnings unless
asked; long-running ones (`controller run`) log state changes at INFO by default.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click
from click.core import ParameterSource

from federation.cli.output import EXIT_USAGE
from ztunnel.api import logsetup

# Modules that define a `register(group)` function. Order is the order in `meshfed --help`.
COMMAND_MODULES = (
    "federation.cli.fleet",   # validate, plan
    "federation.cli.lab",     # lab up|status|down|fault (--provider lab|kind)
    "federation.cli.kind",    # install, image build
    "federation.cli.trust",   # trust
    "federation.cli.core",    # explain, graph
    "federation.cli.ops",     # controller run, status, clusters, services, endpoints, failover, check
    "federation.cli.demo",    # demo
    "federation.cli.completion",  # completion bash|zsh|fish
    "federation.cli.chaos",   # chaos run|list|validate
)


# Commands whose default log level is INFO: they run for long and their log is what an operator reads.
DAEMON_COMMANDS = {"controller run": "info"}
DEFAULT_LOG_LEVEL = "warning"

HELP_EPILOG = """\b
Exit codes (every command):
  0   ok
  1   problems found: invalid fleet, failing checks, unsynced proxies, a plan with changes,
      an unknown cluster, service or process name
  2   could not run: unreadable repo, unreachable controller, the lab or kind failed
  64  usage: an unknown flag, a missing or malformed argument
\b
Every read command takes -o table|wide|json|yaml (graph: -o json|yaml|dot|mermaid|table).
Every command takes --log-level debug|info|warning|error and --log-format text|json
(or $MESHFED_LOG_LEVEL, $MESHFED_LOG_FORMAT); logs go to stderr, results to stdout.
Fleet repo: --fleet DIR or $MESHFED_FLEET, else "." when it holds federation.yaml.
Shell completion: eval "$(meshfed completion bash)"   (zsh, fish: see meshfed completion --help).
"""

_PRIORITY = {ParameterSource.COMMANDLINE: 3, ParameterSource.ENVIRONMENT: 2}


def _log_option_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Remember the most specific --log-level/--log-format seen so far (shared by every context of
    one invocation through `ctx.meta`), then configure logging for the command at hand."""
    chosen: dict[str, tuple[int, str]] = ctx.meta.setdefault("meshfed.log", {})
    if value is not None and param.name is not None:
        source = ctx.get_parameter_source(param.name)
        rank = _PRIORITY.get(source, 1) if source is not None else 1
        if rank >= chosen.get(param.name, (0, ""))[0]:
            chosen[param.name] = (rank, value.lower())
            if param.name == "log_format" and rank == _PRIORITY[ParameterSource.COMMANDLINE]:
                # processes this command starts (the lab's controller and proxies) log the same way
                os.environ[logsetup.ENV_FORMAT] = value.lower()
    command = " ".join(ctx.command_path.split()[1:])
    level = chosen.get("log_level", (0, DAEMON_COMMANDS.get(command, DEFAULT_LOG_LEVEL)))[1]
    logsetup.configure(level, chosen.get("log_format", (0, "text"))[1])


def log_options() -> list[click.Option]:
    """The two logging options, for the root group and every command."""
    common: dict[str, Any] = {"expose_value": False, "is_eager": True, "callback": _log_option_callback,
                              "show_envvar": True}
    return [
        click.Option(["--log-level"], type=click.Choice(logsetup.LEVELS, case_sensitive=False), default=None,
                     envvar=logsetup.ENV_LEVEL, metavar="LEVEL",
                     help="debug|info|warning|error (default: warning; info for controller run)", **common),
        click.Option(["--log-format"], type=click.Choice(logsetup.FORMATS, case_sensitive=False), default=None,
                     envvar=logsetup.ENV_FORMAT, metavar="FORMAT",
                     help="text|json: one JSON object per line for log shippers (default text)", **common),
    ]


def add_log_options(cmd: click.Command) -> None:
    """Give `cmd` and every command below it the logging options (once)."""
    if not any(p.name == "log_level" for p in cmd.params):
        cmd.params.extend(log_options())
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            add_log_options(sub)


class MeshfedGroup(click.Group):
    def run(self, args: list[str] | None = None) -> None:
        """Like click's standalone mode, but usage errors exit 64 instead of 2 (2 = could not complete)."""
        try:
            self.main(args=args, prog_name="meshfed", standalone_mode=False)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help() if e.ctx else str(e))
            sys.exit(0)
        except click.UsageError as e:
            e.show()
            sys.exit(EXIT_USAGE)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            e.show()
            sys.exit(EXIT_USAGE if e.exit_code == 2 else e.exit_code)


@click.group(cls=MeshfedGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=HELP_EPILOG)
@click.version_option(package_name="meshfed")
def cli() -> None:
    """meshfed federates Kubernetes clusters into one zero-trust mesh, driven from Git."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(cli)
add_log_options(cli)


def main() -> None:
    cli.run()


if __name__ == "__main__":
    main()
