"""`meshfed demo`: the whole story on this machine, in one command (and `make demo`).

The story is one chaos experiment, `examples/chaos/demo.yaml`, run by the one chaos engine
(`chaos.engine`) — the same run `meshfed chaos run examples/chaos --only demo` does. This module
only narrates it (a `Narrator`): what the engine does at each step, shown the way an operator
would look at it.

1. build the three-cluster lab from the fleet repo (network namespaces, emulated API servers,
   demo pods, node ztunnels, east-west gateways) and start the controller;
2. show `meshfed status` converged: every proxy SYNCED at the fleet's revision, and each cluster's
   failover order;
3. steady open-loop traffic from the frontend of every cluster to checkout; who serves it, and that
   every hop is mTLS with the expected identities (the echo reports the caller's verified SPIFFE ID,
   including across clusters through the east-west gateways);
4. the experiment's `git push` — checkout's canary from 90/10 to 50/50 (HTTPRoute weights) and
   faster outlier detection — SYNCED on every proxy, the proxies running the new policy, and the
   split measured on the first cluster's traffic before and after;
5. its fault: checkout's backends in the first cluster killed, its traffic failing over to the next
   cluster in priority order; restored, failing back (the canary's share is left out of the
   figures: it runs in the first cluster and the fault does not touch it);
6. the figures, the experiment's verdicts and the controller's record of it; the report;
7. tear everything down unless --keep.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from federation.cli.output import EXIT_FAILED, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, fail

DEFAULT_STATE_DIR = "/tmp/meshfed-demo"
DEFAULT_EXPERIMENT = "examples/chaos/demo.yaml"
SPLIT_WINDOW_S = 4.0   # how much of the first cluster's traffic the canary split is counted over


def _say(text: str = "") -> None:
    click.echo(text)


def _step(n: int, title: str) -> None:
    _say("")
    _say(click.style(f"── {n}. {title}", bold=True))


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} ms"


def _print_cli(url: str, *args: str) -> None:
    """Show what an operator would see: `meshfed ARGS --controller URL`, run as the real CLI."""
    r = subprocess.run([sys.executable, "-m", "federation.cli.main", *args, "--controller", url],
                       capture_output=True, text=True, timeout=60, check=False)
    _say(r.stdout.rstrip())


def _print_status(url: str) -> None:
    _print_cli(url, "status")


def _narrator() -> Any:
    """The demo's narrator (built lazily: the chaos engine is imported only when the demo runs)."""
    from chaos.demo import CANARY_WORKLOAD, SERVICE_HOST, between, served_summary, split_summary, workload_of
    from chaos.engine import ExperimentResult, Narrator
    from chaos.expect import without_workloads
    from gitops.experiment import Experiment, Step

    class DemoNarrator(Narrator):
        def __init__(self) -> None:
            self.t_start = time.monotonic()
            self.first = ""
            self.rev_before = ""
            self.split_before = ""
            self.synced_at_s = 0.0
            self.fault_at_s = 0.0

        def say(self, text: str) -> None:
            _say(text)

        def lab_up(self, fed: Any, fleet: Any) -> None:
            lab = fed.lab
            _step(1, f"build the lab from {fleet.path} and start the controller")
            _say(f"lab up in {lab.get('up_wall_s', 0):.1f} s: clusters {', '.join(fed.clusters)}; "
                 f"{fed.proxy_count()} proxies; kubeconfig {lab.get('kubeconfig')} "
                 f"(try `kubectl --kubeconfig {lab.get('kubeconfig')} --context lab-{fed.clusters[0]} get pods -A`)")
            _say(f"fleet repo served at {lab.get('git_url')}; controller status API at {fed.controller_url}, "
                 f"web console at {fed.controller_url}/console/")
            _step(2, "wait for the controller to converge: every proxy SYNCED at the fleet's revision")

        def converged(self, fed: Any, took_s: float) -> None:
            _say(f"converged {took_s:.1f} s after the lab came up (Ray start, discovery, CSRs, first push)")
            _print_status(fed.controller_url)
            for c in fed.clusters:
                _say(f"failover order from {c}: {' → '.join(fed.tiers(c))}")

        def experiment_start(self, exp: Experiment) -> None:
            self.first = exp.traffic[0].client
            _step(3, f"steady traffic from each cluster's frontend to {SERVICE_HOST} ({exp.file})")

        def steady_state(self, fed: Any, exp: Experiment, verdicts: Sequence[Any], when: str) -> None:
            now = time.time()
            if when == "after":
                _say(f"steady state again: {'; '.join(f'{v.client} {v.measured}' for v in verdicts)}")
                return
            for t in exp.traffic:
                recs = between(fed.records(t.client), now - 3.0 - t.timeout_s, now - t.timeout_s)
                _say(f"from {t.client}: {served_summary(recs)} (3 s)")
            if not all(v.ok for v in verdicts):
                _say(click.style("the steady state did not hold: " + "; ".join(
                    f"{v.client} {v.measured}" for v in verdicts if not v.ok), fg="red"))
                return
            _say("one request from each frontend (the echo reports the caller's verified identity):")
            for c in fed.clusters:
                a = fed.ask(fed.client_pod(c))
                _say(f"  {c} frontend → served by {a.get('cluster')}/{a.get('pod')}, caller identity "
                     f"{a.get('peer_identity') or a.get('error')}")

        def step_start(self, fed: Any, exp: Experiment, step: Step) -> None:
            now = time.time()
            if step.push is not None and not step.push.restore:
                _step(4, f"git push a policy change: {step.push.message}")
                st = fed.status() or {}
                self.rev_before = (st.get("desired") or {}).get("revision", "")
                self.split_before = split_summary(between(fed.records(self.first), now - SPLIT_WINDOW_S, now))
            elif step.fault is not None:
                split_after = split_summary(between(fed.records(self.first), self.synced_at_s,
                                                    self.synced_at_s + SPLIT_WINDOW_S))
                _say(f"canary split of {self.first}'s traffic to checkout (which pod answered, "
                     f"{SPLIT_WINDOW_S:.0f} s each):")
                _say(f"  before the push: {self.split_before}")
                _say(f"  after the push:  {split_after}")
                _step(5, f"{step.fault.describe()}; then restore them")
                self.fault_at_s = now
            elif step.kind == "heal":
                during = between(fed.records(self.first), self.fault_at_s, now)
                kept = without_workloads(during, [CANARY_WORKLOAD])
                _say(f"from {self.first} during the fault: {served_summary(kept)} "
                     f"(+ {len(during) - len(kept)} served by the canary in {self.first}, untouched)")
                a: dict[str, Any] = {}
                for _ in range(5):  # one that checkout served, not the canary (its share stays put)
                    a = fed.ask(fed.client_pod(self.first))
                    if workload_of(str(a.get("pod", ""))) != CANARY_WORKLOAD:
                        break
                _say(f"  a request from {self.first} now: served by {a.get('cluster')}/{a.get('pod')}, caller "
                     f"identity {a.get('peer_identity') or a.get('error')} (end-to-end mTLS through both gateways)")

        def step_done(self, fed: Any, exp: Experiment, step: Step, info: str) -> None:
            if step.push is not None and not step.push.restore:
                self.synced_at_s = time.time()
                _say(f"{info} (was {self.rev_before[:8]})")
                _print_status(fed.controller_url)
                node = f"node:{self.first}/{fed.lab['clusters'][0]['nodes'][0]['name']}"
                for svc in fed.proxy_config(node)["config"]["services"]:
                    if svc["hostname"] == SERVICE_HOST:
                        _say(f"{node.split(':', 1)[1]} ztunnel now runs outlier policy {svc.get('outlier')}")
                        split = ", ".join(f"{b['hostname']} {b['weight']}" for b in svc.get("routes", []))
                        _say(f"  and route weights {split}")
            elif step.fault is not None:
                _say(info)
            elif step.kind == "heal":
                _say(f"{info}; waiting for failback (the steady state again)")

        def result(self, fed: Any, res: ExperimentResult) -> None:
            _step(6, "figures")
            first = self.first or (res.experiment.traffic[0].client if res.experiment.traffic else "")
            for client, fig in res.figures.items():
                prio = " → ".join(fig.priority)
                if client == first:
                    _say(f"client {client} (priority {prio}), fault: {fig.fault} (requests served by the canary "
                         "left out)")
                    _say(f"  time to detect:      {_ms(fig.time_to_detect_ms)}")
                    _say(f"  time to shift:       {_ms(fig.time_to_shift_ms)} (to {fig.shift_cluster})")
                    _say(f"  failed before shift: {fig.failed_before_shift} failed, "
                         f"{fig.indeterminate_before_shift} indeterminate")
                    _say(f"  time to failback:    {_ms(fig.time_to_failback_ms)}")
                    _say(f"  flaps:               {fig.flaps}")
                    _say(f"  requests:            {fig.requests} ({fig.failed_requests} failed, "
                         f"{fig.indeterminate_requests} indeterminate, {fig.ok_pct or 0:.1f}% ok)")
                else:
                    served = ", ".join(f"{c} {n}" for p in fig.phases for c, n in p.served_by)
                    _say(f"client {client}: {fig.requests} requests, {fig.failed_requests} failed, "
                         f"{fig.indeterminate_requests} indeterminate, served by {served or 'nobody'}")
            _say("")
            _say(f"the experiment's expectations ({res.experiment.file}): {res.status.upper()}")
            for v in res.verdicts:
                _say(f"  {'ok  ' if v.ok else click.style('FAIL', fg='red')} {v.title}: {v.measured}")
            if res.error:
                _say(click.style(f"  {res.error}", fg="red"))
            if fed is not None:
                _say("")
                _say("the controller's record of it (`meshfed failover history checkout`):")
                _print_cli(fed.controller_url, "failover", "history", "checkout")
            if res.report is not None:
                _say("")
                _say(f"report: {res.report.markdown}, {res.report.timeline_png}, {res.report.figures_json}")
            _say(f"the whole story took {time.monotonic() - self.t_start:.0f} s")

    return DemoNarrator()


def run_demo(fleet: Path, experiment: Path, state_dir: Path, out_dir: Path, keep: bool) -> int:
    from chaos.demo import DemoError
    from chaos.engine import Engine, RunOptions
    from chaos.validate import load_fleet, validate, with_fleet
    from clusters.lab.layout import LabError
    from clusters.lab.sandbox import SandboxUnavailable
    from gitops.experiment import load_experiments

    loaded = load_experiments([experiment])
    exps = [with_fleet(e, fleet) for e in loaded.experiments]
    problems = [p for p in (*loaded.problems, *validate(exps)) if p.severity.value == "Error"]
    fleet_obj, _ = load_fleet(fleet)
    if problems or len(exps) != 1 or fleet_obj is None:
        for p in problems:
            _say(p.render())
        _say(click.style(f"demo failed: {experiment} is not one valid experiment for {fleet}", fg="red"))
        return EXIT_PROBLEMS
    engine = Engine(RunOptions(out_dir=out_dir, state_dir=state_dir, keep=keep, per_experiment_dirs=False),
                    _narrator())
    fed = None
    try:
        fed, _ = engine.lab(fleet_obj)
        res = engine.run_one(fed, fleet_obj, exps[0])
        engine.narrator.result(fed, res)
        return EXIT_OK if res.ok else (EXIT_FAILED if res.status == "error" else EXIT_PROBLEMS)
    except (LabError, SandboxUnavailable, DemoError) as e:
        _say(click.style(f"demo failed: {e}", fg="red"))
        return EXIT_FAILED
    finally:
        if keep:
            _say(f"lab left running (--keep): state in {state_dir}; `meshfed lab down --state-dir {state_dir}` "
                 f"removes it; `meshfed status --controller {_url_or(fed)}`")
        elif fed is not None:
            res_down = fed.down()
            _say(f"lab torn down ({'clean' if res_down.get('ok') else 'forced'})")


def _url_or(fed: Any) -> str:
    try:
        return str(fed.controller_url)
    except Exception:
        return "<see lab.json>"


def register(group: click.Group) -> None:
    @group.command("demo")
    @click.option("--scenario", type=click.Choice(["failover", "waypoint"]), default="failover", show_default=True,
                  help="failover: the three-cluster L4 story (a chaos experiment); waypoint: L7 (canary per "
                       "request, request-level DENY, 503 ejection and failover through waypoints, the ingress "
                       "Gateway, inference)")
    @click.option("--fleet", default=None, type=click.Path(file_okay=False),
                  help="fleet repo directory (default examples/fleet, or examples/l7 for --scenario waypoint)")
    @click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, type=click.Path(dir_okay=False),
                  help="failover: the chaos experiment the story runs")
    @click.option("--keep", is_flag=True, help="leave the lab running for exploration")
    @click.option("--out", "out", default=None, metavar="DIR",
                  help="report directory (default ./out/demo-<timestamp>/)")
    @click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, help="the lab's state directory")
    def demo(scenario: str, fleet: str | None, experiment: str, keep: bool, out: str | None, state_dir: str) -> None:
        """Build a lab, converge, and tell one story: fail over and back (default), or the waypoints'."""
        fleet = fleet or ("examples/l7" if scenario == "waypoint" else "examples/fleet")
        if not Path(fleet).is_dir():
            fail(f"fleet directory {fleet} does not exist", hint="run from the repository root or pass --fleet",
                 code=EXIT_USAGE)
        if scenario == "waypoint":
            from federation.cli.demo_waypoint import run_waypoint_demo

            raise SystemExit(run_waypoint_demo(Path(fleet), Path(state_dir), keep))
        if not Path(experiment).is_file():
            fail(f"experiment {experiment} does not exist", hint="run from the repository root or pass --experiment",
                 code=EXIT_USAGE)
        out_dir = Path(out or f"out/demo-{time.strftime('%Y%m%d-%H%M%S')}")
        raise SystemExit(run_demo(Path(fleet), Path(experiment), Path(state_dir), out_dir, keep))
