"""`meshfed validate` and `meshfed plan`: the fleet repo as a reviewer sees it.

Both are thin: reading and validation live in `gitops`, the diff in `gitops.plan.diff_snapshots`.
Exit codes follow ARCHITECTURE.md: validate 0 valid / 1 problems / 2 could not read; plan 0 no
change / 1 changes / 2 could not complete; usage errors 64. Problems go to stdout (they are the
command's result); failures to read go to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import click

import gitops
from federation.cli.output import (
    EXIT_OK,
    EXIT_PROBLEMS,
    emit_data,
    fail,
    output_option,
)
from gitops.plan import ChangeAction, PlanResult, diff_snapshots
from gitops.problems import FleetError, Problem, RepoAccessError, Severity


def _short(value: Any, width: int = 60) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_problems(problems: list[Problem]) -> None:
    for p in problems:
        click.echo(p.render())


@click.command("validate")
@click.argument("path", default=".", type=click.Path(file_okay=False))
@click.option("--revision", "revision", default=None, metavar="REF",
              help="validate this commit of the Git repository at PATH instead of the working tree")
@output_option(formats=("table", "json", "yaml"))
def validate_cmd(path: str, revision: str | None, output: str) -> None:
    """Validate a fleet repo (working tree, or a commit with --revision)."""
    try:
        result = gitops.load(path, revision)
    except RepoAccessError as e:
        fail(str(e), hint="check the path (and --revision)")
    problems = sorted(result.problems, key=lambda p: (p.pos.file, p.pos.line, p.pos.col, p.code))
    errors = [p for p in problems if p.severity is Severity.ERROR]
    if output in ("json", "yaml"):
        rev = result.snapshot.revision.sha if result.snapshot else (revision or "WORKTREE")
        emit_data({"valid": not errors, "revision": rev, "errors": len(errors),
                   "warnings": len(problems) - len(errors), "problems": [p.as_dict() for p in problems]}, output)
    else:
        _print_problems(problems)
        if result.snapshot is not None:
            s = result.snapshot
            summary = (f"{len(s.clusters)} clusters, {len(s.trust_domains)} trust domains, {len(s.services)} "
                       f"services, {len(s.destination_rules)} destination rules, "
                       f"{len(s.authorization_policies)} authorization policies, {len(s.routes)} routes, "
                       f"{len(s.lab_clusters)} lab clusters")
            waypoints = sum(1 for g in s.gateways.values() if g.is_waypoint)
            if s.gateways or s.inference_pools:  # (L7 objects: said only where a fleet has them)
                summary += (f", {waypoints} waypoints, {len(s.gateways) - waypoints} gateways, "
                            f"{len(s.inference_pools)} inference pools")
            warn = f" ({len(problems)} warnings)" if problems else ""
            click.echo(f"valid{warn}: {path} @ {s.revision.short} — {summary}")
        else:
            click.echo(f"invalid: {len(errors)} errors, {len(problems) - len(errors)} warnings", err=True)
    sys.exit(EXIT_PROBLEMS if errors else EXIT_OK)


@click.command("plan")
@click.argument("path", default=".", type=click.Path(file_okay=False))
@click.option("--from", "from_ref", required=True, metavar="REF", help="the revision in force (e.g. origin/main)")
@click.option("--to", "to_ref", required=True, metavar="REF",
              help="the revision to push (a commit, or WORKTREE for uncommitted files)")
@output_option(formats=("table", "json", "yaml"))
def plan_cmd(path: str, from_ref: str, to_ref: str, output: str) -> None:
    """Show what moving the fleet from one revision to another would change."""
    old = _load_or_fail(path, from_ref)
    new = _load_or_fail(path, to_ref)
    result = _with_refusals(_with_effects(diff_snapshots(old, new), old, new), old, new)
    if output in ("json", "yaml"):
        emit_data(result.as_dict(), output)
    else:
        _print_plan(result)
    sys.exit(EXIT_PROBLEMS if result.changed or result.refused else EXIT_OK)


def _load_or_fail(path: str, ref: str) -> gitops.ConfigSnapshot:
    try:
        if ref == "WORKTREE":
            return gitops.load_worktree(path)
        return gitops.load_revision(path, ref)
    except RepoAccessError as e:
        fail(str(e), hint="check the path and both revisions")
    except FleetError as e:
        _print_problems(list(e.problems))
        fail(f"the fleet repo does not validate at {ref}: {len(e.problems)} errors",
             hint=f"fix them, or see: meshfed validate {path} --revision {ref}")


def _offline_observations(old: gitops.ConfigSnapshot, new: gitops.ConfigSnapshot) -> list[Any]:
    from federation.core.offline import offline_observations

    observations = {o.cluster: o for o in offline_observations(old)}
    observations.update({o.cluster: o for o in offline_observations(new)})
    return list(observations.values())


def _with_refusals(result: PlanResult, old: gitops.ConfigSnapshot, new: gitops.ConfigSnapshot) -> PlanResult:
    """What the controller would refuse (the same removal guard, over the LabCluster endpoints)."""
    from federation.core.removal import guard_removal

    refusals = guard_removal(old, new, _offline_observations(old, new))
    return replace(result, refusals=tuple(refusals)) if refusals else result


def _with_effects(result: PlanResult, old: gitops.ConfigSnapshot, new: gitops.ConfigSnapshot) -> PlanResult:
    """Add what the change does to the mesh: tiers, access, gateways and proxies, per cluster.

    Offline, the observation is what the LabCluster objects declare (the same model `explain`
    uses); an unchanged mesh adds no effect, so a comment-only commit still plans as "no changes".
    """
    from federation.core.planning import plan_effects

    effects = plan_effects(old, new, _offline_observations(old, new))
    touched = {c: e for c, e in effects["clusters"].items() if any(e.values())}
    if not touched:
        return result
    return replace(result, effects=tuple({"cluster": c, **e} for c, e in sorted(touched.items())))


_EFFECT_LINES: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("tier_changes", lambda e: f"{e['endpoint']} for {e['service']} from zone {e['client_zone']}: "
                               f"tier {e['old_tier']} -> {e['new_tier']}"),
    ("access_changes", lambda e: f"{e['identity']} {e['change']} access to {e['service']}"),
    ("gateways_touched", lambda e: f"{e['proxy']} {e['change']}"
                                   + (f" {e['old']} -> {e['new']}" if e["change"] == "address" else "")),
    ("proxies_changed", lambda e: f"{e['proxy']} {e['change']}"
                                  + (f" ({', '.join(e['services'])})" if e.get("services") else "")),
)


def _print_effects(result: PlanResult) -> None:
    if not result.effects:
        return
    click.echo("effects on the mesh (offline, from the LabCluster workloads):")
    for effect in result.effects:
        click.echo(f"  cluster {effect['cluster']}:")
        for kind, line in _EFFECT_LINES:
            for e in effect.get(kind, ()):
                click.echo(f"    {kind.replace('_', ' ')}: {line(e)}")


_SIGN = {ChangeAction.ADDED: "+", ChangeAction.REMOVED: "-", ChangeAction.CHANGED: "~"}


def _print_plan(result: PlanResult) -> None:
    """Terraform-like text: one line per object (+ added, - removed, ~ changed), then its fields."""
    click.echo(f"plan {result.old_revision.short} ({result.old_revision.subject}) -> "
               f"{result.new_revision.short} ({result.new_revision.subject})")
    if not result.changes:
        click.echo("no changes")
        return
    for c in result.changes:
        click.echo(f"{_SIGN[c.action]} {c.obj} ({c.pos.file})")
        for f in c.fields:
            click.echo(f"    {f.path}: {_short(f.old)} -> {_short(f.new)}")
    _print_effects(result)
    counts = {a: sum(1 for c in result.changes if c.action is a) for a in ChangeAction}
    click.echo(f"{counts[ChangeAction.ADDED]} to add, {counts[ChangeAction.CHANGED]} to change, "
               f"{counts[ChangeAction.REMOVED]} to remove")
    if result.refusals:
        click.echo("REFUSED: the controller would not apply this revision (the last applied one stays in force):")
        _print_problems(list(result.refusals))


def register(group: click.Group) -> None:
    group.add_command(validate_cmd)
    group.add_command(plan_cmd)

