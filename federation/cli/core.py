"""`meshfed explain` and `meshfed graph`: the federation core, offline, on a fleet repo.

Both load the working tree at PATH (`gitops.load_worktree`), stand the declared LabClusters in for
discovery (`federation.core.offline`), build the graph, trust graph and failover engine, and print.
Exit codes: 0 ok, 1 the answer contains problems (explain: untrusted routes or nothing to route
to), 2 could not complete (unreadable or invalid repo), 64 usage (unknown service or cluster).
"""

from __future__ import annotations

import sys
from typing import Any

import click

import gitops
from federation.cli.ops import token_file_option
from federation.cli.output import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, emit_data, fail, output_option
from federation.core.explain import ExplainError, explain_service, explain_text
from federation.core.failover import FailoverEngine, build_engine
from federation.core.graph_view import graph_data
from federation.core.offline import offline_observations
from gitops.problems import FleetError, RepoAccessError


def _engine(path: str) -> FailoverEngine:
    try:
        snapshot = gitops.load_worktree(path)
    except RepoAccessError as e:
        fail(str(e), hint="check the path to the fleet repo")
    except FleetError as e:
        for p in e.problems:
            click.echo(p.render(), err=True)
        fail(f"the fleet repo at {path} does not validate: {len(e.problems)} problems",
             hint=f"see: meshfed validate {path}")
    return build_engine(snapshot, offline_observations(snapshot))


@click.command("explain")
@click.argument("service")
@click.argument("path", default=None, required=False, type=click.Path(file_okay=False))
@click.option("--from", "from_cluster", required=True, metavar="CLUSTER", help="the client's cluster")
@click.option("--zone", default=None, help="the client's zone (default: the cluster's first node)")
@click.option("--controller", default=None, envvar="MESHFED_CONTROLLER",
              help="explain live from this controller's status API (or $MESHFED_CONTROLLER) when no PATH is given")
@token_file_option
@output_option(formats=("table", "json", "yaml"))
def explain_cmd(service: str, path: str | None, from_cluster: str, zone: str | None, controller: str | None,
                output: str) -> None:
    """Explain how a client in CLUSTER reaches SERVICE: tiers, endpoints, health, shares, and why.

    Offline on the fleet repo at PATH (default "."), or live with --controller and no PATH."""
    if path is None and controller:
        from federation.cli.ops import fetch

        data = fetch(controller, "/api/v1/explain", service=service, zone=zone, **{"from": from_cluster})
        if "error" in data:
            fail(data["error"], hint="`meshfed services` lists the services, `meshfed clusters` the clusters",
                 code=EXIT_USAGE if data.get("usage") else EXIT_PROBLEMS)
    else:
        engine = _engine(path or ".")
        try:
            data = explain_service(engine, service, from_cluster, zone)
        except ExplainError as e:
            fail(str(e), hint="meshfed graph PATH lists services and clusters", code=EXIT_USAGE)
    if output in ("json", "yaml"):
        emit_data(data, output)
    else:
        click.echo(explain_text(data))  # quorum ejections come from the engine (explain_service)
    nothing = not any(g["endpoints"] for t in data["tiers"] for g in t["groups"])
    sys.exit(EXIT_PROBLEMS if data["problems"] or nothing else EXIT_OK)


# the console's palette (federation/server/static/console.css) in the exports
HEALTH_COLOUR = {"healthy": "#2e7d32", "degraded": "#ef6c00", "down": "#c62828", "empty": "#9e9e9e"}
FAILOVER_COLOUR = "#6a1b9a"


def _health_label(pc: dict[str, Any]) -> str:
    ejected = " (gateway ejected)" if pc.get("gateway_ejected") else ""
    return f"{pc['healthy']}/{len(pc['endpoints'])} healthy{ejected}"


def _id(*parts: str) -> str:
    return "_".join("".join(ch if ch.isalnum() else "_" for ch in p) for p in parts)


def graph_dot(data: dict[str, Any]) -> str:
    out = ["digraph meshfed {", "  rankdir=LR;", "  node [shape=box, fontname=\"Helvetica\"];"]
    for net, members in data["networks"].items():
        out.append(f"  subgraph cluster_{_id(net)} {{")
        out.append(f"    label=\"network {net}\";")
        for c in (c for c in data["clusters"] if c["name"] in members):
            gw = f"\\ngateway {c['gateway']}" if c["gateway"] else ""
            out.append(f"    {_id('c', c['name'])} [label=\"{c['name']}\\n{c['region']}/{c['zone']}"
                       f"\\n{c['trust_domain']}{gw}\"];")
        out.append("  }")
    for s in data["services"]:
        out.append(f"  {_id('s', s['name'])} [shape=ellipse, label=\"{s['hostname']}\"];")
        for pc in s["clusters"]:
            out.append(f"  {_id('s', s['name'])} -> {_id('c', pc['cluster'])} "
                       f"[label=\"{_health_label(pc)}\", color=\"{HEALTH_COLOUR[pc['health']]}\"];")
    for fo in data["failovers"]:
        for to in fo["to"]:
            out.append(f"  {_id('c', fo['from'])} -> {_id('c', to)} [label=\"{fo['service']} failed over\", "
                       f"color=\"{FAILOVER_COLOUR}\", style=bold, constraint=false];")
    tds = {c["trust_domain"]: c["name"] for c in data["clusters"]}
    for e in data["trust"]:
        if e["from"] in tds and e["to"] in tds:
            style = "dir=both" if e["mutual"] else "style=dashed, color=red"
            out.append(f"  {_id('c', tds[e['from']])} -> {_id('c', tds[e['to']])} "
                       f"[{style}, label=\"trust\", constraint=false];")
    out.append("}")
    return "\n".join(out)


def graph_mermaid(data: dict[str, Any]) -> str:
    out = ["flowchart LR"]
    for net, members in data["networks"].items():
        out.append(f"  subgraph {_id('net', net)}[\"network {net}\"]")
        for c in (c for c in data["clusters"] if c["name"] in members):
            gw = f"<br/>gateway {c['gateway']}" if c["gateway"] else ""
            out.append(f"    {_id('c', c['name'])}[\"{c['name']}<br/>{c['region']}/{c['zone']}"
                       f"<br/>{c['trust_domain']}{gw}\"]")
        out.append("  end")
    links: list[str] = []   # linkStyle takes a link's index in the order links are written
    for s in data["services"]:
        out.append(f"  {_id('s', s['name'])}([\"{s['hostname']}\"])")
        for pc in s["clusters"]:
            out.append(f"  {_id('s', s['name'])} -->|{_health_label(pc)}| {_id('c', pc['cluster'])}")
            links.append(HEALTH_COLOUR[pc["health"]])
    for fo in data["failovers"]:
        for to in fo["to"]:
            out.append(f"  {_id('c', fo['from'])} ==>|{fo['service']} failed over| {_id('c', to)}")
            links.append(FAILOVER_COLOUR)
    tds = {c["trust_domain"]: c["name"] for c in data["clusters"]}
    for e in data["trust"]:
        if e["from"] in tds and e["to"] in tds:
            arrow = "<-.->" if e["mutual"] else "-.-x"
            out.append(f"  {_id('c', tds[e['from']])} {arrow}|trust| {_id('c', tds[e['to']])}")
            links.append("" if e["mutual"] else HEALTH_COLOUR["down"])
    out.extend(f"  linkStyle {i} stroke:{colour}" for i, colour in enumerate(links) if colour)
    return "\n".join(out)


@click.command("graph")
@click.argument("path", default=".", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["json", "dot", "mermaid"]), default="json", show_default=True)
def graph_cmd(path: str, fmt: str) -> None:
    """Export the global graph (clusters, networks, gateways, trust, services, endpoints)."""
    data = graph_data(_engine(path))
    if fmt == "json":
        emit_data(data, "json")
    elif fmt == "dot":
        click.echo(graph_dot(data))
    else:
        click.echo(graph_mermaid(data))


def register(group: click.Group) -> None:
    group.add_command(explain_cmd)
    group.add_command(graph_cmd)
