"""Exec targets: the table the supervisor publishes and the host resolves (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusters.lab.layout import LabError, exec_targets, proxy_dir, resolve_target
from clusters.lab.topology import ROOT_NS, plan_lab
from tests.unit.lab.fleet_fixture import fleet


@pytest.fixture(scope="module")
def targets() -> dict[str, str]:
    clusters, labs, services = fleet(2, 2)
    return dict(exec_targets(plan_lab(clusters, labs, services)))


def test_every_pod_node_and_gateway_is_a_target(targets: dict[str, str]) -> None:
    clusters, labs, services = fleet(2, 2)
    plan = plan_lab(clusters, labs, services)
    east = plan.cluster("east")
    assert resolve_target(targets, "root") == ROOT_NS
    assert resolve_target(targets, "node:east/node-2") == east.node("node-2").netns
    assert resolve_target(targets, "gateway:east") == east.gateway.netns  # type: ignore[union-attr]
    assert resolve_target(targets, "pod:east/shop/frontend-0") == plan.pod("east", "frontend-0", "shop").netns
    assert len(targets) == 1 + sum(len(c.nodes) + len(c.pods) + 1 for c in plan.clusters)


@pytest.mark.parametrize("where", ["bogus", "pod:east/frontend-0", "node:east", "gateway:", "pod:east//x",
                                   "root:x", "pod"])
def test_a_malformed_target_says_how_to_write_one(targets: dict[str, str], where: str) -> None:
    with pytest.raises(LabError, match="use pod:CLUSTER/NAMESPACE/POD, node:CLUSTER/NODE, gateway:CLUSTER or root"):
        resolve_target(targets, where)


def test_an_unknown_name_lists_what_exists(targets: dict[str, str]) -> None:
    with pytest.raises(LabError, match=r"no pod 'east/shop/nope' in this lab; pod targets: pod:east/shop/cart-0"):
        resolve_target(targets, "pod:east/shop/nope")
    with pytest.raises(LabError, match=r"no gateway 'north'.*gateway:east, gateway:west"):
        resolve_target(targets, "gateway:north")


def test_proxy_dirs_are_flat_under_proxies(tmp_path: object) -> None:
    from pathlib import Path

    assert proxy_dir(Path("/s"), "ztunnel/east/node-1") == Path("/s/proxies/ztunnel_east_node-1")


def test_a_pod_that_dies_mid_answer_is_not_ready_not_a_crash(tmp_path: Path) -> None:
    """Review finding: an empty answer from a dying pod raised IndexError in the kubelet's probe
    thread, which then stopped updating readiness for the whole cluster."""
    import socket
    import threading

    from clusters.lab.pods import unix_http

    path = str(tmp_path / "pod.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def die() -> None:
        conn, _ = srv.accept()
        conn.recv(1024)
        conn.close()   # no status line at all

    t = threading.Thread(target=die)
    t.start()
    with pytest.raises(OSError, match="no HTTP answer"):
        unix_http(path, "GET", "/healthz", 2.0)
    t.join()
    srv.close()
