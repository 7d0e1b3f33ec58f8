"""The `meshfed` command. Each command group lives in its own module and registers itself here.

Usage errors exit 64 (sysexits EX_USAGE), like kubectl's habits extended with BSD's code, so that
scripts can tell "you called it wrong" (64) from "it found problems" (1) and "it failed" (2).
"""

from __future__ import annotations

import importlib
import sys

import click

from federation.cli.output import EXIT_USAGE

# Modules that define a `register(group)` function. Order is the order in `meshfed --help`.
COMMAND_MODULES = (
    "federation.cli.fleet",   # validate, plan
    "federation.cli.lab",     # lab up|status|down|fault (--provider lab|kind)
    "federation.cli.kind",    # install, image build
    "federation.cli.trust",   # trust
    "federation.cli.core",    # explain, graph
    "federation.cli.ops",     # controller run, status, clusters, services, endpoints, failover, check
    "federation.cli.demo",    # demo
    "federation.cli.chaos",   # chaos run|list|validate
)


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


@click.group(cls=MeshfedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meshfed")
def cli() -> None:
    """meshfed federates Kubernetes clusters into one zero-trust mesh, driven from Git."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(cli)


def main() -> None:
    cli.run()


if __name__ == "__main__":
    main()
