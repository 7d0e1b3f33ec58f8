"""The lab's L7 pieces, planned purely: a pod per Gateway and cluster (where the offline model puts
it), not captured by its node, allowed to the WAN's HBONE port by its cluster's edge; the proxy
command it runs (parsed by ztunnel's own parser); model-server pods; readiness by ready file."""

from __future__ import annotations

import sys
from pathlib import Path

import gitops
from clusters.lab.commands import pod_argv, proxy_argv, proxy_specs, ready_file
from clusters.lab.kubelet import PodPhase, desired_objects
from clusters.lab.pods import pod_key, probe_pod
from clusters.lab.processes import ProcessTable
from clusters.lab.topology import Iptables, plan_lab
from federation.core.failover import build_engine
from federation.core.offline import offline_observations
from federation.core.render import render_configs
from gitops.model import GATEWAY_NAME_LABEL
from ztunnel.proxy.capture_rules import enrolled_addresses

L7 = Path(__file__).resolve().parents[3] / "examples" / "l7"
PY = [sys.executable]


def plan():  # type: ignore[no-untyped-def]
    s = gitops.load_worktree(L7)
    return s, plan_lab(s.clusters, s.lab_clusters, s.services, gateways=s.gateways)


def test_one_proxy_pod_per_gateway_and_cluster_on_the_first_node() -> None:
    snap, p = plan()
    east = {x.proxy_id: x for x in p.cluster("east").proxy_pods()}
    west = {x.proxy_id: x for x in p.cluster("west").proxy_pods()}
    assert sorted(east) == ["ingress/east/ai-serving/ai-gateway", "waypoint/east/my-app/waypoint",
                            "waypoint/east/shop/waypoint"]
    assert sorted(west) == ["waypoint/west/my-app/waypoint", "waypoint/west/shop/waypoint"]  # ai-gateway: east only
    wp = east["waypoint/east/shop/waypoint"]
    assert (wp.name, wp.service_account, wp.node, wp.port) == ("waypoint-0", "waypoint", "node-1", 15008)
    assert wp.labels[GATEWAY_NAME_LABEL] == "waypoint" and wp.labels["istio.io/dataplane-mode"] == "none"
    ing = east["ingress/east/ai-serving/ai-gateway"]
    assert (ing.name, ing.service_account, ing.port) == ("ai-gateway-istio-0", "ai-gateway-istio", 80)
    # the offline model (explain, plan) names and places them the same way
    obs = {o.cluster: o for o in offline_observations(snap)}
    offline = {(e.namespace, e.pod): e for e in obs["east"].endpoints if GATEWAY_NAME_LABEL in e.labels}
    assert sorted(offline) == sorted((x.namespace, x.name) for x in east.values())
    assert all(offline[(x.namespace, x.name)].node == x.node for x in east.values())


def test_proxy_pods_are_not_captured_and_reach_the_wan_hbone_port() -> None:
    snap, p = plan()
    c = p.cluster("east")
    exempt = [x.address for x in c.proxy_pods("node-1")]
    assert exempt
    # The node proxy captures exactly its node's workloads in its config (--capture, main's
    # ztunnel.proxy.capture_rules); the render leaves waypoint and ingress pods out of them, so
    # neither their connections nor their DNS are redirected, while the node's app pods are.
    configs = render_configs(build_engine(snap, offline_observations(snap)))
    node_cfg = next(cfg for cfg in configs.values() if cfg.proxy_id == "ztunnel/east/node-1")
    addresses = enrolled_addresses(node_cfg)
    captured = {(w.namespace, w.name) for w in node_cfg.workloads if w.address in addresses}
    proxies = {(x.namespace, x.name) for x in c.proxy_pods("node-1")}
    apps = {(x.namespace, x.name) for x in c.pods if x.node == "node-1"} - proxies
    assert not captured & proxies
    assert apps and captured == apps
    gw = c.gateway
    assert gw is not None
    edge = [a.args for a in p.actions if isinstance(a, Iptables) and a.netns == gw.netns]
    for ip in exempt:
        assert any(f"{ip}/32" in a and "--dport" in a and "ACCEPT" in a for a in edge), ip
        assert any(f"{ip}/32" in a and "SNAT" in a for a in edge), ip
    # ordinary pods get neither
    client = next(x for x in c.pods if x.name == "frontend-0")
    assert not any(f"{client.address}/32" in a for a in edge)


def test_proxy_pods_have_a_management_leg_to_the_controller_only() -> None:
    from clusters.lab.topology import CONTROLLER_MGMT_ADDRESS, AddAddress, AddRoute

    _, p = plan()
    for c in p.clusters:
        for pod in c.proxy_pods():
            routes = [a for a in p.actions if isinstance(a, AddRoute) and a.netns == pod.netns]
            assert sorted((r.dst, r.via, r.dev) for r in routes) == sorted(
                [("default", pod.gateway, None), (f"{CONTROLLER_MGMT_ADDRESS}/32", None, "mgmt0")])
            [leg] = [a for a in p.actions if isinstance(a, AddAddress) and a.netns == pod.netns and a.dev == "mgmt0"]
            assert leg.cidr.endswith("/32")


def test_proxy_pods_run_the_proxy_not_the_demo_server(tmp_path: Path) -> None:
    from ztunnel.__main__ import build_parser

    _, p = plan()
    specs = {s.proxy_id: s for s in proxy_specs(p)}
    wp_pod = next(x for x in p.cluster("east").proxy_pods() if x.proxy_id == "waypoint/east/shop/waypoint")
    spec = specs["waypoint/east/shop/waypoint"]
    assert spec.netns == wp_pod.netns and not spec.is_node and spec.key == pod_key(wp_pod) == "waypoint:east/shop/waypoint"
    argv = proxy_argv(PY, spec.proxy_id, tmp_path, spec.socks_host, standalone=False, trust_domain="east.mesh.local",
                      controller_dir=tmp_path / "controller")
    a = build_parser().parse_args(argv[3:])
    assert a.proxy_id == "waypoint/east/shop/waypoint" and a.socks == "" and a.transparent == ""
    assert str(a.ready_file) == ready_file(spec.proxy_id)


def test_model_server_pods() -> None:
    from clusters.lab.demo_server import main as _main  # noqa: F401  (the command exists)

    _, p = plan()
    pod = next(x for x in p.cluster("east").pods if x.name == "llm-model-v1-0")
    assert pod.labels["pool"] == "llm" and pod.model is not None and pod.port == 8000
    argv = pod_argv(PY, pod, "/run/x.sock")
    i = argv.index("--model")
    assert argv[i + 1] == "llm-model-v1" and argv[argv.index("--model-latency-ms") + 1] == "20"
    objs = desired_objects(p.cluster("east"), {}, {})
    assert objs["Pod/ai-serving/llm-model-v1-0"]["metadata"]["labels"]["pool"] == "llm"
    assert objs["Pod/shop/waypoint-0"]["metadata"]["labels"][GATEWAY_NAME_LABEL] == "waypoint"


def test_a_proxy_pod_is_ready_when_its_ready_file_exists(tmp_path: Path, monkeypatch: object) -> None:
    import clusters.lab.pods as pods
    from clusters.lab.processes import ManagedProcess

    _, p = plan()
    wp = p.cluster("east").proxy_pods()[0]
    procs = ProcessTable()
    assert probe_pod(procs, wp).phase is PodPhase.PENDING
    mp = ManagedProcess(pod_key(wp), wp.netns, ["sleep", "30"], tmp_path / "log")
    procs.put(mp)

    class Running:  # stands in for the proxy's process (unit tests start none)
        pid = 4242

        def poll(self) -> None:
            return None

    mp.popen = Running()  # type: ignore[assignment]
    flag = tmp_path / "ready"
    monkeypatch.setattr(pods, "ready_file", lambda _pid: str(flag))  # type: ignore[attr-defined]
    assert probe_pod(procs, wp).ready is False
    flag.write_text("1")
    state = probe_pod(procs, wp)
    assert state.phase is PodPhase.RUNNING and state.ready
