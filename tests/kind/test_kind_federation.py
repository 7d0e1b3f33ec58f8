"""The kind tier: the same federation on three real kind clusters (opt-in: `pytest tests/kind
--with-kind`, needs Docker and kind; skipped with the reason otherwise, see tests/conftest.py).

One `meshfed lab up --provider kind --fleet examples/fleet-kind` for the module (clusters east,
south, west; MetalLB; the image built from this checkout and loaded; meshfed installed; the
LabCluster workloads as Deployments; the controller on this machine), torn down with `lab down`.
What only this tier proves: the DaemonSet's capture on a real node (kube-proxy's iptables next to
ours), gateway addresses that MetalLB hands out, projected-token bootstrap against a real API
server's TokenReview, pods resolving clusterset names through the DNS path, real rollouts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
FLEET = REPO / "examples" / "fleet-kind"
HOST = "checkout.shop.svc.clusterset.local"
CLUSTERS = ("east", "south", "west")
TRUST = {c: f"{c}.mesh.local" for c in CLUSTERS}

GET = r"""
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(data.partition(b"\r\n\r\n")[2].decode())
except OSError as e:
    print(json.dumps({"error": str(e)}))
"""


def meshfed(*args: str, timeout_s: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "federation.cli.main", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=timeout_s, check=False)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state = tmp_path_factory.mktemp("kind")
    up = meshfed("lab", "up", "--provider", "kind", "--fleet", str(FLEET), "--state-dir", str(state))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield state
    finally:
        down = meshfed("lab", "down", "--provider", "kind", "--state-dir", str(state), timeout_s=600)
        assert down.returncode == 0, down.stderr


def kubectl(state: Path, cluster: str, *args: str) -> str:
    r = subprocess.run(["kubectl", "--kubeconfig", str(state / "kubeconfig"), "--context", f"kind-{cluster}", *args],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, f"kubectl {' '.join(args)}: {r.stderr}"
    return r.stdout


def ask(state: Path, cluster: str, host: str, port: int = 80) -> dict[str, Any]:
    out = kubectl(state, cluster, "exec", "-n", "shop", "deploy/frontend", "--", "python", "-c", GET, host, str(port))
    try:
        return dict(json.loads(out))
    except ValueError:
        return {"error": out[:200]}


def served_by(state: Path, client: str, cluster: str, host: str = HOST, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    a: dict[str, Any] = {}
    while time.monotonic() < deadline:
        a = ask(state, client, host)
        if a.get("cluster") == cluster:
            return a
        time.sleep(1)
    return a


def test_three_clusters_every_proxy_synced(lab: Path) -> None:
    for c in CLUSTERS:
        nodes = json.loads(kubectl(lab, c, "get", "nodes", "-o", "json"))["items"]
        ds = json.loads(kubectl(lab, c, "get", "daemonset", "ztunnel", "-n", "meshfed-system", "-o", "json"))
        assert ds["status"]["numberReady"] == len(nodes)
        svc = json.loads(kubectl(lab, c, "get", "service", "eastwest-gateway", "-n", "meshfed-system", "-o", "json"))
        assert svc["status"]["loadBalancer"]["ingress"][0]["ip"]  # MetalLB gave it; the controller reads it
    st = meshfed("status", "--controller", "http://127.0.0.1:15014", "-o", "json")
    assert st.returncode == 0, st.stdout
    assert {p["sync"] for p in json.loads(st.stdout)["proxies"]} == {"SYNCED"}


def test_pods_resolve_clusterset_names_through_the_dns_path(lab: Path) -> None:
    vip = kubectl(lab, "east", "get", "service", "checkout", "-n", "shop", "-o", "jsonpath={.spec.clusterIP}")
    out = kubectl(lab, "east", "exec", "-n", "shop", "deploy/frontend", "--", "python", "-c",
                  f"import socket; print(socket.gethostbyname('{HOST}'))")
    assert out.strip() == vip


def test_a_cross_cluster_call_carries_the_caller_s_identity(lab: Path) -> None:
    a = served_by(lab, "east", "east")
    assert a.get("peer_identity") == f"spiffe://{TRUST['east']}/ns/shop/sa/frontend", a


def test_kill_fails_over_to_the_next_cluster_and_back(lab: Path) -> None:
    stop = meshfed("lab", "fault", "stop", "pod", "east/shop/checkout-[0-9]*", "--provider", "kind",
                   "--fleet", str(FLEET), "--state-dir", str(lab))
    assert stop.returncode == 0, stop.stderr
    try:
        a = served_by(lab, "east", "south")
        assert a.get("cluster") == "south", a
        assert a.get("peer_identity") == f"spiffe://{TRUST['east']}/ns/shop/sa/frontend", a  # through both gateways
    finally:
        heal = meshfed("lab", "fault", "heal", "--provider", "kind", "--fleet", str(FLEET), "--state-dir", str(lab))
        assert heal.returncode == 0, heal.stderr
    assert served_by(lab, "east", "east", timeout_s=120).get("cluster") == "east"


def test_unlabelling_a_namespace_stops_capture_on_a_real_node(lab: Path) -> None:
    kubectl(lab, "west", "label", "namespace", "shop", "istio.io/dataplane-mode-")
    try:
        deadline = time.monotonic() + 60
        a: dict[str, Any] = {}
        while time.monotonic() < deadline:
            a = ask(lab, "west", HOST)
            if "error" in a:  # nothing captures the VIP any more: the mesh is out of the path
                break
            time.sleep(1)
        assert "error" in a or not a.get("peer_identity"), a
    finally:
        kubectl(lab, "west", "label", "--overwrite", "namespace", "shop", "istio.io/dataplane-mode=ambient")
    assert served_by(lab, "west", "west").get("peer_identity") == f"spiffe://{TRUST['west']}/ns/shop/sa/frontend"
