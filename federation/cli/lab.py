"""`meshfed lab`: the local lab (network namespaces in a private sandbox) — up, status, down, faults.

The work is done by `clusters.lab.runner.LabRunner`; this module only parses arguments, loads the
fleet repo (the topology comes from its Cluster and LabCluster objects) and prints. `lab exec`
enters the sandbox from this process and becomes the command (`clusters.lab.nsexec`).
The state directory defaults to $MESHFED_LAB_DIR or /tmp/meshfed-lab; `lab.json` in it describes
what runs where, `kubeconfig` has one context per lab cluster (`kubectl --context lab-east …`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from federation.cli.output import (
    EXIT_FAILED,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    emit_data,
    fail,
    output_option,
    stdout,
    table,
)

DEFAULT_STATE_DIR = "/tmp/meshfed-lab"
DEFAULT_FLEET = "examples/fleet"
DEFAULT_KIND_FLEET = "examples/fleet-kind"   # contexts kind-<cluster>, gateway addresses from MetalLB


def _state_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("MESHFED_LAB_DIR") or DEFAULT_STATE_DIR)


state_dir_option = click.option("--state-dir", "state_dir", default=None, metavar="DIR",
                                help=f"lab state directory (default $MESHFED_LAB_DIR or {DEFAULT_STATE_DIR})")


def _runner(state_dir: str | None, **opts: Any) -> Any:
    from clusters.lab.layout import LabError
    from clusters.lab.runner import LabOptions, LabRunner

    try:
        return LabRunner(LabOptions(_state_dir(state_dir), **opts))
    except LabError as e:
        fail(str(e), code=EXIT_USAGE)


def _lab_error() -> type[Exception]:
    from clusters.lab.layout import LabError

    return LabError


@click.group("lab")
def lab() -> None:
    """Run the federation on this machine: clusters as network namespaces in a private sandbox."""


provider_option = click.option(
    "--provider", type=click.Choice(["lab", "kind"]), default="lab", show_default=True,
    help="lab: network namespaces on this machine; kind: kind clusters in Docker (clusters.kind)")


def _kind(state_dir: str | None, fleet: str, dry_run: bool = False) -> Any:
    from clusters.kind.plan import KindOptions
    from clusters.kind.provider import KindProvider, default_state_dir

    sd = Path(state_dir) if state_dir else default_state_dir()
    import sys

    opts = KindOptions(state_dir=sd.resolve(), fleet_dir=Path(fleet).resolve(),
                       repo_dir=Path(__file__).resolve().parents[2], python=(sys.executable,))
    return KindProvider(opts, dry_run=dry_run)


def _kind_up(fleet: str, state_dir: str | None, dry_run: bool, output: str) -> None:
    from clusters.kind.runner import KindError
    from federation.cli.kind import load_fleet

    snapshot = load_fleet(fleet)
    provider = _kind(state_dir, fleet, dry_run)
    try:
        summary = provider.up(snapshot)
    except KindError as e:
        fail(str(e), hint="`meshfed check --pre --provider kind` lists what is missing; `meshfed lab down "
                          "--provider kind` removes what was created", code=EXIT_FAILED)
    if output in ("json", "yaml"):
        emit_data(summary, output)
        return
    if summary.get("dry_run"):
        click.echo("dry run: the cluster plan above; the install plan needs the kind network's facts")
        return
    click.echo(f"kind lab up: contexts {', '.join(summary['contexts'])} in {summary['kubeconfig']}")
    click.echo(f"controller status API: {summary['controller_status']}   (export MESHFED_CONTROLLER=...; meshfed status)")


@lab.command("up")
@click.option("--fleet", "fleet", default=DEFAULT_FLEET, show_default=True, type=click.Path(file_okay=False),
              help="fleet repo directory (its Cluster and LabCluster objects give the topology)")
@state_dir_option
@provider_option
@click.option("--no-ztunnel", is_flag=True, help="do not start node ztunnels and gateways")
@click.option("--no-controller", is_flag=True, help="do not start the controller")
@click.option("--dns-unanswered", type=click.Choice(["nxdomain", "servfail"]), default="nxdomain", show_default=True,
              help="what the node ztunnels' DNS answers for a name the mesh does not know (the lab has no "
                   "kube-dns and no internet to forward it to)")
@click.option("--dry-run", is_flag=True, help="kind: print the commands instead of running them")
@output_option()
def up(fleet: str, state_dir: str | None, provider: str, no_ztunnel: bool, no_controller: bool, dns_unanswered: str,
       dry_run: bool, output: str) -> None:
    """Build the lab from the fleet repo and leave it running (--provider kind: kind clusters)."""
    import gitops
    from clusters.lab.sandbox import SandboxUnavailable
    from clusters.lab.topology import PlanError
    from gitops.problems import FleetError

    if provider == "kind":
        _kind_up(DEFAULT_KIND_FLEET if fleet == DEFAULT_FLEET else fleet, state_dir, dry_run, output)
        return
    path = Path(fleet)
    if not path.is_dir():
        fail(f"fleet directory {path} does not exist", hint="pass --fleet PATH (e.g. examples/fleet)", code=EXIT_USAGE)
    try:
        snapshot = gitops.load_worktree(path)
    except FleetError as e:
        fail(f"the fleet repo has problems: {e}", hint=f"run `meshfed validate {path}`", code=EXIT_PROBLEMS)
    runner = _runner(state_dir, ztunnel="off" if no_ztunnel else "auto",
                     controller="off" if no_controller else "auto", dns_unanswered=dns_unanswered)
    try:
        state = runner.up_from_snapshot(snapshot, path)
    except PlanError as e:
        fail(f"cannot lay out the lab: {e}", code=EXIT_PROBLEMS)
    except (SandboxUnavailable, _lab_error()) as e:
        fail(str(e), code=EXIT_FAILED)
    if output in ("json", "yaml"):
        emit_data(state, output)
        return
    _print_summary(state)
    click.echo(f"\nlab up in {state.get('up_wall_s')} s (inside the sandbox: {state['timings'].get('total_s')} s, "
               f"network {state['timings'].get('2_network_s')} s)")
    click.echo(f"kubeconfig: {state['kubeconfig']}    fleet repo: {state.get('git_url') or '-'}")


def _print_summary(state: dict[str, Any], wide: bool = False) -> None:
    out = stdout()
    rows = []
    for c in state.get("clusters", []):
        gw = c.get("gateway") or {}
        ready = sum(1 for p in c["pods"] if p["state"] == "running")
        rows.append([c["name"], c["network"], c["pod_cidr"], len(c["nodes"]), f"{ready}/{len(c['pods'])}",
                     gw.get("wan_address", "-"), c["context"], c["api_url"]])
    out.print(table(["CLUSTER", "NETWORK", "POD CIDR", "NODES", "PODS", "GATEWAY", "CONTEXT", "API"], rows))
    if wide:
        prow = [[c["name"], p["namespace"], p["name"], p["node"], p["address"], p["state"], p["pid"] or "-"]
                for c in state.get("clusters", []) for p in c["pods"]]
        out.print()
        out.print(table(["CLUSTER", "NAMESPACE", "POD", "NODE", "IP", "STATE", "PID"], prow))
    feats = state.get("features", {})
    if feats:
        click.echo("\n" + "  ".join(f"{k}: {v}" for k, v in feats.items()))
    if state.get("faults"):
        click.echo("active faults: " + "; ".join(f"{f['kind']} {f['target']} {' '.join(f['names'])}"
                                                  for f in state["faults"]))
    port = (state.get("ports") or {}).get("controller-http-host")
    if port:
        url = f"http://127.0.0.1:{port}"
        click.echo(f"controller status API: {url}   (export MESHFED_CONTROLLER={url}; then meshfed status)")
        click.echo(f"web console: {url}/console/")


@lab.command("status")
@state_dir_option
@output_option()
def status(state_dir: str | None, output: str) -> None:
    """What runs where in the lab (live, from its supervisor)."""
    runner = _runner(state_dir)
    try:
        answer = runner.status()
    except _lab_error() as e:
        fail(str(e), code=EXIT_FAILED)
    if output in ("json", "yaml"):
        emit_data(answer["lab"], output)
        return
    _print_summary(answer["lab"], wide=output == "wide")


@lab.command("down")
@state_dir_option
@provider_option
def down(state_dir: str | None, provider: str) -> None:
    """Stop the lab: every namespace, link and process of it goes away (kind: what `up` created)."""
    if provider == "kind":
        from clusters.kind.runner import KindError

        try:
            removed = _kind(state_dir, DEFAULT_KIND_FLEET).down()
        except KindError as e:
            fail(str(e), code=EXIT_FAILED)
        click.echo("kind lab down: " + (", ".join(removed) or "nothing recorded"))
        return
    report = _runner(state_dir).down()
    if not report["ok"]:
        fail(f"the lab sandbox (pid {report['sandbox_pid']}) did not exit", code=EXIT_FAILED)
    click.echo("lab down" + ("" if report["graceful"] else " (no supervisor answered; swept leftovers)"))


@lab.command("fault", context_settings={"ignore_unknown_options": False})
@click.argument("kind", type=click.Choice(["kill", "stop", "cont", "partition", "blackhole", "latency",
                                           "link-down", "bandwidth", "clock-skew", "behaviour", "heal"]))
@click.argument("target", type=click.Choice(["pod", "node", "gateway", "wan", "controller", "api", "all"]),
                required=False, default=None)
@click.argument("names", nargs=-1)
@click.option("--mode", type=click.Choice(["drop", "reject"]), default="drop", show_default=True,
              help="partition: drop (silent, timeouts) or reject (fast, resets)")
@click.option("--ms", "delay_ms", type=float, default=50.0, show_default=True, help="latency: added delay each way")
@click.option("--kbit", "rate_kbit", type=float, default=256.0, show_default=True,
              help="bandwidth: the cap in kbit/s")
@click.option("--skew-s", "skew_s", type=float, default=120.0, show_default=True,
              help="clock-skew: seconds the process's wall clock is moved (negative: back)")
@click.option("--behaviour", "behaviour", type=click.Choice(["Error503", "Slow", "Hang", "Healthy"]),
              default="Error503", show_default=True, help="behaviour: what the demo server does")
@state_dir_option
@provider_option
@click.option("--fleet", "fleet", default=DEFAULT_FLEET, show_default=True, type=click.Path(file_okay=False),
              help="kind: the fleet the lab was made from (pod names, replicas)")
def fault(kind: str, target: str | None, names: tuple[str, ...], mode: str, delay_ms: float, rate_kbit: float,
          skew_s: float, behaviour: str, state_dir: str | None, provider: str, fleet: str) -> None:
    """Inject or heal a fault.

    \b
    meshfed lab fault kill pod east/shop/checkout-*
    meshfed lab fault partition wan east west --mode drop
    meshfed lab fault partition api east            (east's API server stops answering)
    meshfed lab fault latency gateway west --ms 30
    meshfed lab fault bandwidth wan east south --kbit 128
    meshfed lab fault clock-skew node east/node-2 --skew-s 120
    meshfed lab fault behaviour pod east/shop/checkout-0 --behaviour Hang
    meshfed lab fault stop controller
    meshfed lab fault heal            (everything)   |   heal pod east/shop/checkout-*
    meshfed lab fault stop node east/node-1 --provider kind      (docker pause)
    """
    if provider == "kind":
        _kind_fault(kind, target, names, state_dir, DEFAULT_KIND_FLEET if fleet == DEFAULT_FLEET else fleet)
        return
    runner = _runner(state_dir)
    try:
        if kind == "heal":
            res = runner.heal(None if target in (None, "all") else target, names)
            for line in res["healed"] or ["nothing to heal"]:
                click.echo(f"healed: {line}")
            return
        if target is None:
            fail("name a target: pod, node, gateway, wan, controller or api", code=EXIT_USAGE)
        res = runner.fault(kind, target, names, mode, delay_ms, rate_kbit=rate_kbit, skew_s=skew_s,
                           behaviour=behaviour)
    except _lab_error() as e:
        fail(str(e), code=EXIT_FAILED)
    click.echo(f"{kind} {target} {' '.join(names)}: {len(res['applied'])} step(s) applied")


def _kind_fault(kind: str, target: str | None, names: tuple[str, ...], state_dir: str | None, fleet: str) -> None:
    from clusters.kind.runner import KindError
    from federation.cli.kind import load_fleet

    provider = _kind(state_dir, fleet)
    try:
        if kind == "heal":
            for line in provider.heal() or ["nothing to heal"]:
                click.echo(f"healed: {line}")
            return
        if target is None:
            fail("name a target: pod, node, gateway, wan or controller", code=EXIT_USAGE)
        steps = provider.fault(load_fleet(fleet), kind, target, names)
    except KindError as e:
        fail(str(e), code=EXIT_FAILED)
    click.echo(f"{kind} {target} {' '.join(names)}: {len(steps)} step(s) applied")


@lab.command("behaviour")
@click.argument("pod")
@click.argument("mode", type=click.Choice(["Healthy", "Error503", "Slow", "Hang"], case_sensitive=False))
@state_dir_option
def behaviour(pod: str, mode: str, state_dir: str | None) -> None:
    """Switch a demo server's behaviour: POD is CLUSTER/NAMESPACE/NAME."""
    parts = pod.split("/")
    if len(parts) != 3:
        fail(f"pod {pod!r}: write CLUSTER/NAMESPACE/NAME", code=EXIT_USAGE)
    try:
        _runner(state_dir).behaviour(parts[0], parts[2], mode, parts[1])
    except _lab_error() as e:
        fail(str(e), code=EXIT_FAILED)
    click.echo(f"{pod}: {mode}")


@lab.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-i", "--stdin", "stdin", is_flag=True, help="pass stdin to the command (else it reads nothing)")
@click.option("-t", "--tty", "tty", is_flag=True, help="give the command this terminal (-it: an interactive shell)")
@state_dir_option
@click.argument("where")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(stdin: bool, tty: bool, state_dir: str | None, where: str, argv: tuple[str, ...]) -> None:
    """Run a command in a lab namespace, like `kubectl exec`: output streams, exit status is the command's.

    \b
    WHERE is pod:CLUSTER/NAMESPACE/POD, node:CLUSTER/NODE, gateway:CLUSTER or root.
    Options go before WHERE; everything after it is the command (a leading `--` is optional).
    meshfed lab exec pod:east/shop/frontend-0 -- curl -s checkout.shop.svc.clusterset.local
    meshfed lab exec -it node:east/node-1 sh
    """
    command = list(argv[1:] if argv and argv[0] == "--" else argv)
    if not command:
        fail("name a command to run after WHERE", hint="e.g. meshfed lab exec pod:east/shop/frontend-0 -- sh",
             code=EXIT_USAGE)
    try:
        _runner(state_dir).exec_interactive(where, command, stdin=stdin, tty=tty)
    except _lab_error() as e:
        fail(str(e), code=EXIT_FAILED)


def register(group: click.Group) -> None:
    group.add_command(lab)
