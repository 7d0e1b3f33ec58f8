"""The lab calls the commands it ships with their real flags: each argv the lab builds is parsed by
the command's own parser (ztunnel's argparse, the `meshfed` click commands) without running it.

Before: the lab ran `--help` and passed synonyms no command defines (`--fleet`, `--grpc-listen`,
`--http-listen`); a parser that rejects an argv fails here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import pytest

from clusters.lab import faults as F
from clusters.lab.commands import (
    controller_argv,
    latency_relay_argv,
    pod_argv,
    proxy_argv,
    proxy_specs,
)
from clusters.lab.layout import CONTROLLER_BOOTSTRAP_PORT, CONTROLLER_GRPC_PORT, CONTROLLER_HTTP_PORT
from clusters.lab.topology import CONTROLLER_MGMT_ADDRESS, plan_lab
from tests.unit.lab.fleet_fixture import fleet

PY = [sys.executable]


def ztunnel_args(argv: list[str]) -> Any:
    from ztunnel.__main__ import build_parser

    assert argv[:3] == [*PY, "-m", "ztunnel"]
    return build_parser().parse_args(argv[3:])  # exits (SystemExit) on an unknown flag


def meshfed_params(argv: list[str], *path: str) -> dict[str, Any]:
    """Parse `argv` with the click command at `meshfed <path…>`; its parameters."""
    from federation.cli.main import cli

    assert argv[:3] == [*PY, "-m", "federation.cli.main"]
    assert argv[3:3 + len(path)] == list(path)
    cmd: click.Command = cli
    for name in path:
        assert isinstance(cmd, click.Group)
        sub = cmd.get_command(click.Context(cmd), name)
        assert sub is not None, f"no `meshfed {' '.join(path)}`"
        cmd = sub
    ctx = cmd.make_context(" ".join(path), argv[3 + len(path):])
    return dict(ctx.params)


def test_a_standalone_node_ztunnel_serves_its_config_with_capture_and_socks(tmp_path: Path) -> None:
    a = ztunnel_args(proxy_argv(PY, "ztunnel/east/node-1", tmp_path, "10.10.1.1", standalone=True))
    assert a.config == tmp_path / "config.json" and a.cert_dir == tmp_path / "certs"
    assert a.state_dir == tmp_path / "state"
    assert a.hbone == "0.0.0.0:15008" and a.admin == "127.0.0.1:15021"
    assert a.socks == "10.10.1.1:15080" and a.transparent == "0.0.0.0:15001"
    assert a.controller == "" and a.bootstrap == ""  # a rendered config means standalone
    assert a.proxy_id == "ztunnel/east/node-1"
    assert a.capture is True  # the proxy programs the node's capture rules (ztunnel.proxy.capture_rules)


def test_a_node_ztunnel_answers_its_pods_dns_on_the_pod_bridge(tmp_path: Path) -> None:
    """Where the capture sends pods' DNS (the pod bridge address, 15053); the lab has no kube-dns and
    no internet, so unknown names are NXDOMAIN rather than forwarded; gateways serve no DNS."""
    a = ztunnel_args(proxy_argv(PY, "ztunnel/east/node-1", tmp_path, "10.10.1.1", standalone=True))
    assert a.dns == "10.10.1.1:15053"
    assert a.dns_upstream == ["none"] and a.dns_unanswered == "nxdomain"
    assert ztunnel_args(proxy_argv(PY, "gateway/east", tmp_path, "", standalone=True)).dns == ""
    servfail = proxy_argv(PY, "ztunnel/east/node-1", tmp_path, "10.10.1.1", standalone=True, dns_unanswered="servfail")
    assert ztunnel_args(servfail).dns_unanswered == "servfail"  # `meshfed lab up --dns-unanswered servfail`


def test_a_node_ztunnel_without_config_joins_the_controller(tmp_path: Path) -> None:
    ctl = tmp_path / "controller"
    a = ztunnel_args(proxy_argv(PY, "ztunnel/east/node-1", tmp_path, "10.10.1.1", standalone=False,
                                trust_domain="east.mesh.local", controller_dir=ctl))
    assert a.config is None
    assert a.controller == f"{CONTROLLER_MGMT_ADDRESS}:{CONTROLLER_GRPC_PORT}"
    assert a.bootstrap == f"{CONTROLLER_MGMT_ADDRESS}:{CONTROLLER_BOOTSTRAP_PORT}"
    # no shared secret: its pod's projected ServiceAccount token (the lab's kubelet writes it there)
    assert a.sa_token_file == tmp_path / "sa-token" and a.bootstrap_token_file is None
    assert a.trust_domain == "east.mesh.local"
    # the controller is verified against the proxy's own trust domain's roots only
    assert a.controller_roots == ctl / "roots" / "east.mesh.local.pem"
    assert a.proxy_id == "ztunnel/east/node-1"
    assert a.state_dir == tmp_path / "state"  # where its keys and certificates survive a restart


def test_a_gateway_has_no_socks_listener_and_no_capture(tmp_path: Path) -> None:
    a = ztunnel_args(proxy_argv(PY, "gateway/east", tmp_path, "", standalone=True))
    assert a.socks == "" and a.transparent == "" and a.capture is False


def test_joining_the_controller_needs_its_directory_and_trust_domain(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trust domain"):
        proxy_argv(PY, "gateway/east", tmp_path, "", standalone=False)


def test_the_controller_runs_with_flags_meshfed_controller_run_defines(tmp_path: Path) -> None:
    p = meshfed_params(controller_argv(PY, "http://127.0.0.1:9/fleet.git", tmp_path / "controller",
                                       tmp_path / "kubeconfig"), "controller", "run")
    assert p["repo"] == "http://127.0.0.1:9/fleet.git"
    assert p["state_dir"] == str(tmp_path / "controller")
    assert p["listen"] == f"0.0.0.0:{CONTROLLER_GRPC_PORT}"
    assert p["bootstrap_listen"] == f"0.0.0.0:{CONTROLLER_BOOTSTRAP_PORT}"
    # the status API stays on loopback (the portal and the push hook reach it there, with the token)
    assert p["status_listen"] == f"127.0.0.1:{CONTROLLER_HTTP_PORT}"
    assert p["kubeconfig"] == str(tmp_path / "kubeconfig")
    assert p["insecure"] is False
    assert p["standby"] is True     # a restarted lab controller waits for its killed predecessor


def test_meshfed_controller_bootstrap_token_takes_a_proxy_id_and_a_ttl(tmp_path: Path) -> None:
    """Hand-provisioned proxies (not the lab's) get their token from this command."""
    argv = [*PY, "-m", "federation.cli.main", "controller", "bootstrap-token", "--state-dir",
            str(tmp_path / "controller"), "--proxy-id", "gateway/east", "--ttl", "30m"]
    p = meshfed_params(argv, "controller", "bootstrap-token")
    assert p == {"state_dir": str(tmp_path / "controller"), "proxy_id": "gateway/east", "ttl": "30m"}


def test_the_lab_and_the_controller_agree_on_the_token_file_name() -> None:
    from clusters.lab.layout import STATUS_API_TOKEN_FILE
    from federation.controller.api_token import STATUS_API_TOKEN_FILE as CONTROLLERS

    assert STATUS_API_TOKEN_FILE == CONTROLLERS


def test_pod_and_relay_argv_name_their_modules() -> None:
    clusters, labs, services = fleet(1, 1)
    pod = plan_lab(clusters, labs, services).clusters[0].pods[0]
    argv = pod_argv(PY, pod, "/run/meshfed/x.sock")
    assert argv[1:3] == ["-m", "clusters.lab.demo_server"]
    assert argv[argv.index("--address") + 1] == pod.address and argv[-1] == "/run/meshfed/x.sock"
    assert latency_relay_argv(PY, 15099, 30.0)[1:] == ["-m", "clusters.lab.faults", "--port", "15099",
                                                       "--delay-ms", "30.0"]


def test_every_proxy_of_the_plan_has_the_key_faults_signal() -> None:
    """A kill of a node or gateway names the process by the key the data plane registered it under."""
    clusters, labs, services = fleet(3, 2)
    plan = plan_lab(clusters, labs, services)
    specs = {s.key: s for s in proxy_specs(plan)}
    assert len(specs) == 9  # 3 clusters x (2 node ztunnels + 1 gateway)
    node_kill = F.plan_fault(plan, F.FaultRequest("kill", "node", ("east/node-1",)))
    gw_kill = F.plan_fault(plan, F.FaultRequest("kill", "gateway", ("west",)))
    for step in (*node_kill[:1], *gw_kill):
        assert isinstance(step, F.Signal) and step.process in specs
    east1 = specs["ztunnel:east/node-1"]
    assert east1.proxy_id == "ztunnel/east/node-1" and east1.is_node
    assert east1.socks_host == plan.cluster("east").node("node-1").pod_gateway
    assert specs["gateway:west"].netns == plan.cluster("west").gateway.netns  # type: ignore[union-attr]
