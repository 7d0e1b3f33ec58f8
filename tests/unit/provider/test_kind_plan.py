"""The kind provider's plans (pure): which clusters with which subnets, which contexts, what order;
every `meshfed` step parses with meshfed's own CLI; faults that map onto kind."""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import click
import pytest

import gitops
from clusters.kind.plan import (
    NODE_IMAGE,
    KindFacts,
    KindOptions,
    KindPlanError,
    check_fleet,
    kind_config,
    metallb_pool,
    parse_network,
    plan_clusters,
    plan_down,
    plan_fault,
    plan_install,
)

REPO = Path(__file__).resolve().parents[3]
SNAP = gitops.load_worktree(REPO / "examples" / "fleet-kind")
PY = (sys.executable,)
OPTS = KindOptions(state_dir=Path("/state"), fleet_dir=Path("/fleet"), repo_dir=Path("/src"), python=PY)
FACTS = KindFacts("172.18.0.0/16", "172.18.0.1", {
    "east": {"east-control-plane": "172.18.0.2", "east-worker": "172.18.0.3", "east-worker2": "172.18.0.4"},
    "west": {"west-control-plane": "172.18.0.5", "west-worker": "172.18.0.6"},
    "south": {"south-control-plane": "172.18.0.7"}})


def meshfed_params(argv: tuple[str, ...]) -> tuple[list[str], dict[str, Any]]:
    """Parse a `python -m federation.cli.main …` step with meshfed's click commands."""
    from federation.cli.main import cli

    assert argv[:3] == (*PY, "-m", "federation.cli.main")
    cmd: click.Command = cli
    rest = list(argv[3:])
    path = []
    while isinstance(cmd, click.Group):
        sub = cmd.get_command(click.Context(cmd), rest[0])
        assert sub is not None, f"no `meshfed {rest[0]}`"
        path.append(rest.pop(0))
        cmd = sub
    return path, dict(cmd.make_context(" ".join(path), rest).params)


def test_one_kind_cluster_per_cluster_with_the_fleet_s_subnets_into_the_state_kubeconfig() -> None:
    plan = plan_clusters(SNAP, OPTS)
    creates = [c for c in plan.commands if c.creates]
    assert [c.creates for c in creates] == [("kind-cluster", n) for n in ("east", "south", "west")]
    for c in creates:
        name = c.creates[1]  # type: ignore[index]
        assert c.argv[:5] == ("kind", "create", "cluster", "--name", name)
        assert c.argv[c.argv.index("--image") + 1] == NODE_IMAGE
        assert c.argv[c.argv.index("--kubeconfig") + 1] == "/state/kubeconfig"
        cfg = json.loads(c.stdin or "")
        assert cfg["networking"] == {"podSubnet": SNAP.clusters[name].pod_cidrs[0],
                                     "serviceSubnet": SNAP.clusters[name].service_cidrs[0]}
    east = json.loads(creates[0].stdin or "")
    assert [n["role"] for n in east["nodes"]] == ["control-plane", "worker", "worker"]   # LabCluster east: 2 nodes
    assert east["nodes"][1]["labels"] == {"topology.kubernetes.io/zone": "us-east-1a",
                                          "topology.kubernetes.io/region": "us-east", "meshfed.dev/lab-node": "node-1"}
    # after the clusters: the facts the install plan needs
    assert [c.fact for c in plan.commands if c.fact] == ["kind-network", "nodes/east", "nodes/south", "nodes/west"]


def test_kind_s_default_subnets_when_the_fleet_gives_none() -> None:
    c = replace(SNAP.clusters["west"], pod_cidrs=(), service_cidrs=())
    snap = replace(SNAP, clusters=MappingProxyType({**SNAP.clusters, "west": c}))
    assert kind_config(snap, "west")["networking"] == {"podSubnet": "10.244.0.0/16", "serviceSubnet": "10.96.0.0/16"}


def test_a_lab_fleet_is_refused_with_the_fix() -> None:
    lab = gitops.load_worktree(REPO / "examples" / "fleet")
    problems = check_fleet(lab)
    assert any("kind writes the context kind-east" in p and "examples/fleet-kind" in p for p in problems)
    assert any("remove `address:` from clusters/east.yaml" in p for p in problems)
    with pytest.raises(KindPlanError, match="kind-east"):
        plan_clusters(lab, OPTS)
    assert check_fleet(SNAP) == []


def test_metallb_pools_are_disjoint_slices_of_the_kind_network_s_top() -> None:
    pools = [ipaddress.ip_network(metallb_pool("172.18.0.0/16", i)) for i in (1, 2, 3)]
    assert [str(p) for p in pools] == ["172.18.255.16/28", "172.18.255.32/28", "172.18.255.48/28"]
    assert all(p.subnet_of(ipaddress.ip_network("172.18.0.0/16")) for p in pools)
    with pytest.raises(KindPlanError, match="/24 or larger"):
        metallb_pool("172.18.0.0/25", 1)
    assert parse_network('[{"Subnet":"fc00:f853::/64"},{"Subnet":"172.18.0.0/16","Gateway":"172.18.0.1"}]') == \
        ("172.18.0.0/16", "172.18.0.1")


def test_install_order_and_every_meshfed_step_parses(tmp_path: Path) -> None:
    (tmp_path / "controller" / "roots").mkdir(parents=True)
    for td in {str(c.trust_domain) for c in SNAP.clusters.values()}:   # install checks the files exist
        (tmp_path / "controller" / "roots" / f"{td}.pem").write_text("roots")
    opts = replace(OPTS, state_dir=tmp_path)
    plan = plan_install(SNAP, opts, FACTS)
    whats = [c.what for c in plan.commands]
    order = ["build the image", "load meshfed/meshfed:0.1.0 into east", "install MetalLB", "start the controller",
             "wait for the controller's serving roots", "install meshfed in east", "deploy east's LabCluster workloads",
             "wait for the node proxies in east", "wait until every proxy is SYNCED"]
    idx = [next(i for i, w in enumerate(whats) if w.startswith(o)) for o in order]
    assert idx == sorted(idx), whats
    pools = [c.stdin for c in plan.commands if c.what.startswith("MetalLB pool")]
    assert len(pools) == 3 and "172.18.255.16/28" in (pools[0] or "")
    controller = next(c for c in plan.commands if c.background)
    path, p = meshfed_params(controller.argv)
    assert path == ["controller", "run"] and p["kubeconfig"] == f"{tmp_path}/kubeconfig" and p["repo"] == "/fleet"
    assert controller.creates == ("process", "controller")
    # review finding 6: the bootstrap port (no client certificate) on the kind network only, not the LAN
    assert p["listen"] == "172.18.0.1:15012" and p["bootstrap_listen"] == "172.18.0.1:15013"
    installs = [meshfed_params(c.argv) for c in plan.commands if c.what.startswith("install meshfed")]
    assert [p["context"] for _, p in installs] == ["kind-east", "kind-south", "kind-west"]
    for path, p in installs:
        assert path == ["install"] and p["controller"] == "172.18.0.1:15012" and p["bootstrap"] == "172.18.0.1:15013"
        td = SNAP.clusters[p["context"].removeprefix("kind-")].trust_domain  # type: ignore[index]
        # each cluster's proxies get their own trust domain's roots, not every CA's pooled
        assert p["roots"] == f"{tmp_path}/controller/roots/{td}.pem" and not p["print_only"]
    kubectl = [c.argv for c in plan.commands if c.argv[0] == "kubectl"]
    assert all(a[1:5] == ("--kubeconfig", f"{tmp_path}/kubeconfig", "--context", a[4]) and a[4].startswith("kind-")
               for a in kubectl)
    status = meshfed_params(plan.commands[-1].argv)
    assert status[0] == ["status"] and plan.commands[-1].retry_for_s > 0


def test_down_undoes_what_up_recorded_newest_first() -> None:
    plan = plan_down([("kind-cluster", "east"), ("kind-cluster", "west"), ("process", "controller")], OPTS)
    assert plan.argvs() == [("meshfed-internal", "stop-process", "controller"),
                            ("kind", "delete", "cluster", "--name", "west", "--kubeconfig", "/state/kubeconfig"),
                            ("kind", "delete", "cluster", "--name", "east", "--kubeconfig", "/state/kubeconfig")]


@pytest.mark.parametrize(("kind", "target", "names", "applies", "heals"), [
    ("kill", "pod", ("east/shop/checkout-[0-9]*",), ["delete pod -l app=checkout"], []),
    ("stop", "pod", ("east/shop/checkout",), ["scale deployment/checkout --replicas=0"],
     ["scale deployment/checkout --replicas=2"]),
    ("kill", "gateway", ("west",), ["scale deployment/eastwest-gateway --replicas=0"],
     ["scale deployment/eastwest-gateway --replicas=1"]),
    ("stop", "node", ("east/node-2",), ["docker pause east-worker2"], ["docker unpause east-worker2"]),
    ("kill", "controller", (), ["meshfed-internal stop-process controller"], ["meshfed-internal start-process controller"]),
])
def test_faults_that_map_onto_kind(kind: str, target: str, names: tuple[str, ...], applies: list[str],
                                   heals: list[str]) -> None:
    f = plan_fault(SNAP, OPTS, FACTS, kind, target, names)
    assert [any(a in " ".join(c.argv) for c in f.apply) for a in applies] == [True] * len(applies)
    assert [any(h in " ".join(c.argv) for c in f.heal) for h in heals] == [True] * len(heals)
    assert len(f.heal) == len(heals)


def test_a_wan_partition_drops_both_ways_in_the_node_containers() -> None:
    f = plan_fault(SNAP, OPTS, FACTS, "partition", "wan", ("east", "west"))
    east_side = [c.argv for c in f.apply if c.argv[2] == "east-worker"]
    assert ("docker", "exec", "east-worker", "iptables", "-w", "-I", "OUTPUT", "-d", "172.18.0.6", "-m", "comment",
            "--comment", "meshfed-partition", "-j", "DROP") in east_side
    assert any("172.18.255.48/28" in c for c in east_side)            # west's MetalLB range (west sorts 3rd)
    assert any(c.argv[2] == "west-worker" and "172.18.0.3" in c.argv for c in f.apply)
    assert [c.argv[5] for c in f.heal] == ["-D"] * len(f.apply)


def test_what_does_not_map_says_what_does() -> None:
    with pytest.raises(KindPlanError, match=re.escape("on kind: kill|stop pod")):
        plan_fault(SNAP, OPTS, FACTS, "latency", "gateway", ("east",))
    with pytest.raises(KindPlanError, match="no workload"):
        plan_fault(SNAP, OPTS, FACTS, "kill", "pod", ("east/shop/nothing-*",))


def test_the_kind_fleet_is_the_lab_fleet_with_kind_contexts_and_gateway_addresses_from_the_cluster() -> None:
    """examples/fleet-kind must not drift from examples/fleet: same files, and in clusters/ only the
    API context and the gateway address differ."""
    import re as _re

    lab_root, kind_root = REPO / "examples" / "fleet", REPO / "examples" / "fleet-kind"
    lab_files = sorted(p.relative_to(lab_root) for p in lab_root.rglob("*.yaml"))
    assert lab_files == sorted(p.relative_to(kind_root) for p in kind_root.rglob("*.yaml"))
    for rel in lab_files:
        want = (lab_root / rel).read_text()
        if rel.parts[0] == "clusters":
            name = rel.stem
            want = want.replace(f"    kind: Lab\n    context: lab-{name}\n", f"    kind: Kubeconfig\n    context: kind-{name}\n")
            want = _re.sub(r"    address: [0-9.]+\n", "", want)
        assert (kind_root / rel).read_text() == want, rel
