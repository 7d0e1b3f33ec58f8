"""`meshfed completion bash|zsh|fish`, and the dynamic completions the commands use.

The script is click's own (`click.shell_completion`): the shell calls `meshfed` back with
`_MESHFED_COMPLETE=<shell>_complete` and the words typed so far, and click asks each parameter's
`shell_complete` function for candidates. Ours complete:

- cluster names (`--from CLUSTER`) and service names (`explain SERVICE`, `endpoints SERVICE`,
  `failover history SERVICE`): from the fleet repo the command line names (PATH or --fleet, else
  $MESHFED_FLEET, else "." when it holds federation.yaml) by file name — the loader enforces
  `clusters/<name>.yaml` and `services/<ns>/<name>.yaml`, so no YAML is parsed; commands that talk
  to a controller ask it first (--controller or $MESHFED_CONTROLLER, one short request);
- lab processes (`lab logs PROCESS`): the log files of the lab's state directory.

A completion never fails and never waits long: any error means "no candidates".
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import click
from click.shell_completion import CompletionItem, get_completion_class

from federation.cli.output import ENV_FLEET, FLEET_MARKER

COMPLETION_TIMEOUT_S = 1.0
ENV_CONTROLLER = "MESHFED_CONTROLLER"
SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_MESHFED_COMPLETE"


def _fleet_dir(ctx: click.Context) -> Path | None:
    for value in (ctx.params.get("path"), ctx.params.get("fleet"), os.environ.get(ENV_FLEET), "."):
        if value and (Path(str(value)) / FLEET_MARKER).is_file():
            return Path(str(value))
    return None


def fleet_clusters(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "clusters").glob("*.yaml"))


def fleet_services(root: Path) -> list[str]:
    """Short names, or `namespace/name` for a name that more than one namespace uses."""
    pairs = sorted((p.parent.name, p.stem) for p in (root / "services").glob("*/*.yaml"))
    names = [n for _, n in pairs]
    return sorted({n if names.count(n) == 1 else f"{ns}/{n}" for ns, n in pairs})


def _controller_json(ctx: click.Context, path: str) -> object:
    url = ctx.params.get("controller") or os.environ.get(ENV_CONTROLLER)
    if not url:
        return None
    with urllib.request.urlopen(str(url).rstrip("/") + path, timeout=COMPLETION_TIMEOUT_S) as r:
        return json.loads(r.read())


def _items(names: Iterable[str], incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def _names(ctx: click.Context, live_path: str, from_live: Callable[[object], list[str] | None],
           from_fleet: Callable[[Path], list[str]]) -> list[str]:
    """Names from the controller the command talks to (unless the command line names a fleet
    repo), else, or when it does not answer, from the fleet repo."""
    if not (ctx.params.get("path") or ctx.params.get("fleet")):
        try:
            names = from_live(_controller_json(ctx, live_path))
            if names is not None:
                return names
        except Exception:  # not running, not reachable, not a controller: use the fleet repo
            pass
    root = _fleet_dir(ctx)
    return from_fleet(root) if root is not None else []


def _live_clusters(doc: object) -> list[str] | None:
    return sorted(map(str, doc)) if isinstance(doc, dict) else None


def _live_services(doc: object) -> list[str] | None:
    if not isinstance(doc, list):
        return None
    return sorted({str(s.get("service", "")).split(".")[0] for s in doc if isinstance(s, dict)} - {""})


def complete_clusters(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    try:
        return _items(_names(ctx, "/api/v1/clusters", _live_clusters, fleet_clusters), incomplete)
    except Exception:  # a completion must never break the shell
        return []


def complete_services(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    try:
        return _items(_names(ctx, "/api/v1/services", _live_services, fleet_services), incomplete)
    except Exception:
        return []


def completion_script(root: click.Command, shell: str, prog_name: str = "meshfed") -> str:
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - SHELLS are click's
        raise click.BadParameter(f"no completion for {shell}; one of {', '.join(SHELLS)}")
    return cls(root, {}, prog_name, COMPLETE_VAR).source()


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion_cmd(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script (commands, flags, cluster/service/process names).

    \b
    bash:  eval "$(meshfed completion bash)"      (or save it under /etc/bash_completion.d/meshfed)
    zsh:   eval "$(meshfed completion zsh)"       (after compinit)
    fish:  meshfed completion fish | source       (or save it as ~/.config/fish/completions/meshfed.fish)
    """
    click.echo(completion_script(ctx.find_root().command, shell), nl=False)


def register(group: click.Group) -> None:
    group.add_command(completion_cmd)
