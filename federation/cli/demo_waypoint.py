"""`meshfed demo --scenario waypoint`: the L7 story on this machine (`examples/l7`).

1. build the two-cluster lab (waypoints per enrolled namespace and cluster, an ingress gateway in
   east) and start the controller; 2. converge: every proxy SYNCED, waypoints and ingress included;
3. the canary split per request: 2,000 requests on one keep-alive connection, 80/20, and the
   caller's identity as the pod sees it; 4. a request-level DENY and the waypoint's access-log line;
5. east's checkout answers 503: the waypoint's 5xx outlier detection ejects it, east fails over to
   west through the east-west gateways, the controller's history says so (policy file, commit);
6. the Istio guide's inference route through the ingress Gateway (its 20/80 model split) and the
   InferencePool's picker; 7. tear down unless --keep.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from federation.cli.output import EXIT_FAILED


def _say(text: str = "") -> None:
    click.echo(text)


def _step(n: int, title: str) -> None:
    _say("")
    _say(click.style(f"── {n}. {title}", bold=True))


def run_waypoint_demo(fleet: Path, state_dir: Path, keep: bool) -> int:
    from chaos.demo import DemoError, LabFederation
    from chaos.waypoint import canary_split, delete_denied, fail_version, inference, models
    from clusters.lab.layout import LabError
    from clusters.lab.sandbox import SandboxUnavailable
    from federation.cli.demo import _print_cli, _print_status

    fed = LabFederation(fleet, state_dir)
    t_start = time.monotonic()
    try:
        _step(1, f"build the lab from {fleet} and start the controller")
        lab = fed.up(up_timeout_s=300)
        _say(f"lab up in {lab.get('up_wall_s', 0):.1f} s: clusters {', '.join(fed.clusters)}; {fed.proxy_count()} "
             "proxies (node ztunnels, east-west gateways, waypoints, the ingress gateway)")

        _step(2, "wait for the controller to converge: every proxy SYNCED, the waypoints and the ingress too")
        _, took_s = fed.wait_converged(timeout_s=300)
        _say(f"converged {took_s:.1f} s after the lab came up")
        _print_status(fed.controller_url)

        _step(3, "checkout's canary split, per request at east's waypoint: 2,000 requests on ONE connection")
        split = canary_split(fed, "east", 2000)
        _say(f"served by {split.by_workload} in {split.seconds:.1f} s: checkout-v2 {split.share('checkout-v2'):.1%} "
             "(the route says 20%; a per-connection split would send all 2,000 to one version)")
        _say(f"caller identity the pods saw: {', '.join(split.identities)} (the waypoint forwards it)")

        _step(4, "DELETE on checkout: denied at the waypoint (AuthorizationPolicy with methods, targetRefs)")
        res, line = delete_denied(fed, "east")
        _say(f"the client got {res['codes']} with body {res['bodies'][:1]}")
        if line is not None:
            _say(f"the waypoint's access log: policy {line.get('policy')}: {line.get('reason')}")

        _step(5, "east's checkout answers 503: ejected by 5xx outlier detection, failed over to west")
        f = fail_version(fed, "east", ["checkout-0", "checkout-1"], "checkout")
        after = f"{f.ejected_after_ms:.0f} ms" if f.ejected_after_ms is not None else "n/a"
        _say(f"ejected {', '.join(f.ejected) or 'nothing'} {after} after the fault")
        _say(f"requests to checkout during the fault: {f.requests}, failed {f.failed}; after the ejection "
             f"{f.after_ejection}, failed {f.failed_after}, served by {', '.join(f.served_after) or 'nobody'}")
        _say("the controller's record of it (`meshfed failover history checkout`):")
        _print_cli(fed.controller_url, "failover", "history", "checkout")

        _step(6, "the guide's inference route through the ingress Gateway ai-gateway, and the InferencePool")
        split6 = models(inference(fed, 200))
        _say(f"POST /v1/completions ×200: {split6} (the route: llm-model-v2 20, llm-model-v1 80)")
        for model in ("llm-model-v1", "llm-model-v2"):
            _say(f"POST /v1/chat/completions model {model} ×10 (InferencePool, least queue): "
                 f"{inference(fed, 10, '/v1/chat/completions', model)}")
        _say(f"the whole story took {time.monotonic() - t_start:.0f} s")
        return 0
    except (DemoError, LabError, SandboxUnavailable) as e:
        _say(click.style(f"demo failed: {e}", fg="red"))
        return EXIT_FAILED
    finally:
        if keep:
            _say(f"lab left running (--keep): state in {state_dir}; `meshfed lab down --state-dir {state_dir}`")
        elif fed.runner is not None:
            res_down = fed.down()
            _say(f"lab torn down ({'clean' if res_down.get('ok') else 'forced'})")
