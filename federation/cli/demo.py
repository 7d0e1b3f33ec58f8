"""`meshfed demo`: the whole story on this machine, in one command (and `make demo`).

1. build the three-cluster lab from the fleet repo (network namespaces, emulated API servers,
   demo pods, node ztunnels, east-west gateways) and start the controller;
2. show `meshfed status` converged: every proxy SYNCED at the fleet's revision;
3. steady open-loop traffic from the frontend of every cluster to checkout; show who serves it
   and that every hop is mTLS with the expected identities (the echo reports the caller's
   verified SPIFFE ID, including across clusters through the east-west gateways);
4. `git push` a policy change to the lab's Git server — the canary split of checkout from 90/10
   to 50/50 (HTTPRoute weights) and faster outlier detection — show the new revision SYNCED on
   every proxy, the proxies running the new policy, and the split measured on the first cluster's
   traffic (which pod answered: checkout-N or checkout-v2-0) before and after the push;
5. kill checkout's backends in the first cluster and show its traffic fail over to the next one
   in priority order; restore them and show failback (the canary's share is left out of these
   figures: it runs in the first cluster and the fault does not touch it);
6. print the measured figures (chaos.analysis) and write the report (chaos.report);
7. tear everything down unless --keep.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from federation.cli.output import EXIT_FAILED, EXIT_USAGE, fail

DEFAULT_STATE_DIR = "/tmp/meshfed-demo"
LOAD_RATE_PER_S = {"first": 25.0, "other": 10.0}
FAULT_HOLD_S = 8.0
FAILBACK_WAIT_S = 25.0
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


def run_demo(fleet: Path, state_dir: Path, out_dir: Path, keep: bool) -> int:
    from chaos.analysis import summarize
    from chaos.demo import (
        CANARY_WORKLOAD,
        SERVICE_HOST,
        DemoError,
        LabFederation,
        between,
        failed_back_at,
        replace_in,
        served_summary,
        set_canary_weights,
        split_summary,
        without_canary,
        workload_of,
    )
    from chaos.report import write_report
    from clusters.lab.layout import LabError
    from clusters.lab.sandbox import SandboxUnavailable

    fed = LabFederation(fleet, state_dir)
    t_start = time.monotonic()
    try:
        _step(1, f"build the lab from {fleet} and start the controller")
        lab = fed.up()
        _say(f"lab up in {lab.get('up_wall_s', 0):.1f} s: clusters {', '.join(fed.clusters)}; "
             f"{fed.proxy_count()} proxies; kubeconfig {lab.get('kubeconfig')} "
             f"(try `kubectl --kubeconfig {lab.get('kubeconfig')} --context lab-east get pods -A`)")
        _say(f"fleet repo served at {lab.get('git_url')}; controller status API at {fed.controller_url}")

        _step(2, "wait for the controller to converge: every proxy SYNCED at the fleet's revision")
        st, took_s = fed.wait_converged(timeout_s=180)
        _say(f"converged {took_s:.1f} s after the lab came up (Ray start, discovery, CSRs, first push)")
        _print_status(fed.controller_url)
        first = fed.clusters[0]
        priority = {c: fed.tiers(c) for c in fed.clusters}
        for c in fed.clusters:
            _say(f"failover order from {c}: {' → '.join(priority[c])}")

        _step(3, f"steady traffic from each cluster's frontend to {SERVICE_HOST}")
        for c in fed.clusters:
            fed.start_load(c, LOAD_RATE_PER_S["first" if c == first else "other"])
        time.sleep(4.0)
        t_now = time.time()
        for c in fed.clusters:
            recs = between(fed.records(c), t_now - 3.0, t_now)
            _say(f"from {c}: {served_summary(recs)} (last 3 s)")
        _say("one request from each frontend (the echo reports the caller's verified identity):")
        for c in fed.clusters:
            a = fed.ask(fed.client_pod(c))
            _say(f"  {c} frontend → served by {a.get('cluster')}/{a.get('pod')}, caller identity "
                 f"{a.get('peer_identity') or a.get('error')}")

        _step(4, "git push a policy change: checkout's canary from 10% to 50%, faster outlier detection")
        rev_before = (st.get("desired") or {}).get("revision", "")
        t_wall = time.time()
        split_before = split_summary(between(fed.records(first), t_wall - SPLIT_WINDOW_S, t_wall))

        def edit(wt: Path) -> str:
            set_canary_weights(wt, 50, 50)
            dr = wt / "policies" / "shop" / "checkout.yaml"
            replace_in(dr, "consecutiveGatewayErrors: 3", "consecutiveGatewayErrors: 2")
            replace_in(dr, "baseEjectionTime: 15s", "baseEjectionTime: 5s")
            return "checkout: canary checkout-v2 at 50%; eject after 2 gateway errors, for 5s"

        t_push = time.monotonic()
        sha = fed.push(edit)
        _say(f"pushed {sha[:8]} (was {rev_before[:8]}) to the lab's Git server")
        st, _ = fed.wait_converged(timeout_s=90, revision=sha)
        _say(f"revision {sha[:8]} SYNCED on all {len(st['proxies'])} proxies "
             f"{time.monotonic() - t_push:.1f} s after the push")
        _print_status(fed.controller_url)
        node = f"node:{first}/{fed.lab['clusters'][0]['nodes'][0]['name']}"
        for svc in fed.proxy_config(node)["config"]["services"]:
            if svc["hostname"] == SERVICE_HOST:
                _say(f"{node.split(':', 1)[1]} ztunnel now runs outlier policy {svc.get('outlier')}")
                split = ", ".join(f"{b['hostname']} {b['weight']}" for b in svc.get("routes", []))
                _say(f"  and route weights {split}")
        t_synced = time.time()
        time.sleep(SPLIT_WINDOW_S)
        split_after = split_summary(between(fed.records(first), t_synced, t_synced + SPLIT_WINDOW_S))
        _say(f"canary split of {first}'s traffic to checkout (which pod answered, {SPLIT_WINDOW_S:.0f} s each):")
        _say(f"  before the push: {split_before}")
        _say(f"  after the push:  {split_after}")

        _step(5, f"kill checkout's backends in {first}; then restore them")
        pods = f"{first}/shop/checkout-[0-9]*"
        time.sleep(2.0)
        f_ev = fed.fault("kill", "pod", [pods], label="kill", cluster=first)
        _say(f"killed {pods}")
        time.sleep(FAULT_HOLD_S)
        during = between(fed.records(first), f_ev["at_s"], time.time())
        _say(f"from {first} during the fault: {served_summary(without_canary(during))} "
             f"(+ {len(during) - len(without_canary(during))} served by the canary in {first}, untouched)")
        for _ in range(5):  # one that checkout served, not the canary (its share stays in {first})
            a = fed.ask(fed.client_pod(first))
            if workload_of(str(a.get("pod", ""))) != CANARY_WORKLOAD:
                break
        _say(f"  a request from {first} now: served by {a.get('cluster')}/{a.get('pod')}, caller identity "
             f"{a.get('peer_identity') or a.get('error')} (end-to-end mTLS through both gateways)")
        h_ev = fed.heal("pod", [pods], label="kill", cluster=first, fault_target=pods)
        _say(f"restored {pods}; waiting for failback")
        deadline = time.time() + FAILBACK_WAIT_S
        while time.time() < deadline:
            back = failed_back_at(fed.records(first), first, h_ev["at_s"])
            if back is not None and time.time() - back > 3.0:
                break
            time.sleep(0.5)
        time.sleep(2.0)

        _step(6, "figures")
        # the canary's requests are left out: they are served in the first cluster, which the fault
        # does not touch there, and would read as "not failed over" (see `without_canary`)
        raw = {c: fed.stop_load(c) for c in fed.clusters}
        records = {c: without_canary(raw[c]) for c in fed.clusters}
        figures = {c: summarize(records[c], fed.events, priority[c], c) for c in fed.clusters}
        fig = figures[first]
        _say(f"client {first} (priority {' → '.join(priority[first])}), fault: kill checkout in {first} "
             "(requests served by the canary left out)")
        _say(f"  time to detect:      {_ms(fig.time_to_detect_ms)}")
        _say(f"  time to shift:       {_ms(fig.time_to_shift_ms)} (to {fig.shift_cluster})")
        _say(f"  failed before shift: {fig.failed_before_shift} failed, "
             f"{fig.indeterminate_before_shift} indeterminate")
        _say(f"  time to failback:    {_ms(fig.time_to_failback_ms)}")
        _say(f"  flaps:               {fig.flaps}")
        _say(f"  requests:            {fig.requests} ({fig.failed_requests} failed, "
             f"{fig.indeterminate_requests} indeterminate, {fig.ok_pct or 0:.1f}% ok)")
        for name in ("time_to_detect_ms", "time_to_shift_ms", "time_to_failback_ms"):
            if fig.reason(name):
                _say(f"  ({name}: {fig.reason(name)})")
        for c in fed.clusters[1:]:
            f2 = figures[c]
            _say(f"client {c}: {f2.requests} requests, {f2.failed_requests} failed, "
                 f"{f2.indeterminate_requests} indeterminate, served by "
                 f"{served_summary(records[c]).split(';')[0]} "
                 f"(+ {len(raw[c]) - len(records[c])} by the canary)")
        _say("")
        _say("the controller's record of it (`meshfed failover history checkout`):")
        _print_cli(fed.controller_url, "failover", "history", "checkout")
        paths = write_report(out_dir, f"meshfed demo: kill checkout in {first} (canary's requests left out)",
                             figures, records, fed.events)
        _say("")
        _say(f"report: {paths.markdown}, {paths.timeline_png}, {paths.figures_json}")
        _say(f"the whole story took {time.monotonic() - t_start:.0f} s")
        return 0
    except (DemoError, LabError, SandboxUnavailable) as e:
        _say(click.style(f"demo failed: {e}", fg="red"))
        return EXIT_FAILED
    finally:
        if keep:
            _say(f"lab left running (--keep): state in {state_dir}; `meshfed lab down --state-dir {state_dir}` "
                 f"removes it; `meshfed status --controller {_url_or(fed)}`")
        elif fed.runner is not None:
            res = fed.down()
            _say(f"lab torn down ({'clean' if res.get('ok') else 'forced'})")


def _url_or(fed: Any) -> str:
    try:
        return str(fed.controller_url)
    except Exception:
        return "<see lab.json>"


def register(group: click.Group) -> None:
    @group.command("demo")
    @click.option("--scenario", type=click.Choice(["failover", "waypoint"]), default="failover", show_default=True,
                  help="failover: the three-cluster L4 story; waypoint: L7 (canary per request, request-level "
                       "DENY, 503 ejection and failover through waypoints, the ingress Gateway, inference)")
    @click.option("--fleet", default=None, type=click.Path(file_okay=False),
                  help="fleet repo directory (default examples/fleet, or examples/l7 for --scenario waypoint)")
    @click.option("--keep", is_flag=True, help="leave the lab running for exploration")
    @click.option("--out", "out", default=None, metavar="DIR",
                  help="report directory (default ./out/demo-<timestamp>/)")
    @click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, help="the lab's state directory")
    def demo(scenario: str, fleet: str | None, keep: bool, out: str | None, state_dir: str) -> None:
        """Build a lab, converge, and tell one story: fail over and back (default), or the waypoints'."""
        fleet = fleet or ("examples/l7" if scenario == "waypoint" else "examples/fleet")
        if not Path(fleet).is_dir():
            fail(f"fleet directory {fleet} does not exist", hint="run from the repository root or pass --fleet",
                 code=EXIT_USAGE)
        if scenario == "waypoint":
            from federation.cli.demo_waypoint import run_waypoint_demo

            raise SystemExit(run_waypoint_demo(Path(fleet), Path(state_dir), keep))
        out_dir = Path(out or f"out/demo-{time.strftime('%Y%m%d-%H%M%S')}")
        raise SystemExit(run_demo(Path(fleet), Path(state_dir), out_dir, keep))
