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


def graph_data(engine: FailoverEngine) -> dict[str, Any]:
    """The global graph as plain data: networks, clusters (gateway, nodes), trust edges, services
    with their endpoints per cluster."""
    graph = engine.graph
    clusters = []
    for name, cv in graph.clusters.items():
        clusters.append({
            "name": name, "network": cv.network, "region": cv.region, "zone": cv.zone,
            "trust_domain": cv.trust_domain, "gateway": cv.gateway or None,
            "lease": engine.lease_state(name).value,
            "nodes": [{"name": n.name, "address": n.address, "zone": n.zone}
                      for n in sorted(graph.nodes_of(name).values(), key=lambda n: n.name)],
        })
    services = []
    for key, svc in graph.services.items():
        per_cluster = []
        for cluster, eps in sorted(graph.endpoints_of(key).items()):
            per_cluster.append({
                "cluster": cluster,
                "endpoints": [{"uid": e.uid, "address": e.address, "node": e.node, "ready": e.ready,
                               "identity": e.identity} for e in sorted(eps.values(), key=lambda e: e.uid)],
            })
        services.append({"name": str(key), "hostname": svc.hostname, "export_from": list(svc.export_from),
                         "policy": engine.policies[key].policy_ref, "clusters": per_cluster})
    return {
        "revision": engine.snapshot.revision.sha,
        "networks": {n: cs for n, cs in sorted(graph.networks().items())},
        "clusters": clusters,
        "trust": [{"from": e.a, "to": e.b, "mutual": e.mutual} for e in engine.trust.edges()],
        "services": services,
    }


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
            ready = sum(1 for e in pc["endpoints"] if e["ready"])
            out.append(f"  {_id('s', s['name'])} -> {_id('c', pc['cluster'])} "
                       f"[label=\"{ready}/{len(pc['endpoints'])} ready\"];")
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
    for s in data["services"]:
        out.append(f"  {_id('s', s['name'])}([\"{s['hostname']}\"])")
        for pc in s["clusters"]:
            ready = sum(1 for e in pc["endpoints"] if e["ready"])
            out.append(f"  {_id('s', s['name'])} -->|{ready}/{len(pc['endpoints'])} ready| {_id('c', pc['cluster'])}")
    tds = {c["trust_domain"]: c["name"] for c in data["clusters"]}
    for e in data["trust"]:
        if e["from"] in tds and e["to"] in tds:
            arrow = "<-.->" if e["mutual"] else "-.-x"
            out.append(f"  {_id('c', tds[e['from']])} {arrow}|trust| {_id('c', tds[e['to']])}")
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
