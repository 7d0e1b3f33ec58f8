"""kubectl against the emulated API server: discovery, get/list of every kind we serve.

Skipped (with the reason) when kubectl is not on PATH. kubectl is the strictest consumer of the
discovery documents (`/api`, `/api/v1`, `/apis`, `/apis/discovery.k8s.io/v1`) and of list kinds,
so this is what keeps `kubectl --context lab-east get pods` working in the lab.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusters.lab.apiserver import EmulatedApiServer
from tests.integration.controller import kobjects as k

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH (apt install kubectl or see "
                                                        "https://kubernetes.io/docs/tasks/tools/)")


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    srv = EmulatedApiServer().start()
    try:
        srv.seed([k.node("node-1", "10.0.0.1"), k.namespace("shop"), k.service("shop", "cart"),
                  k.pod("shop", "cart-1", "node-1", "10.1.0.1"), k.pod("shop", "cart-2", "node-1", "10.1.0.2"),
                  k.endpoint_slice("shop", "cart", [("cart-1", "10.1.0.1", "node-1"), ("cart-2", "10.1.0.2", "node-1")])])
        path = tmp_path_factory.mktemp("kubectl") / "kubeconfig"
        srv.write_kubeconfig(path, "lab-east")
        yield path
    finally:
        srv.stop()


def kubectl(kubeconfig: Path, *args: str) -> str:
    assert KUBECTL is not None
    p = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), "--context", "lab-east", *args],
                       capture_output=True, text=True, timeout=60, env={"HOME": str(kubeconfig.parent), "PATH": ""})
    assert p.returncode == 0, f"kubectl {' '.join(args)}: {p.stderr}"
    return p.stdout


@pytest.mark.parametrize(("args", "names"), [
    (("get", "pods", "-n", "shop"), {"cart-1", "cart-2"}),
    (("get", "po", "--all-namespaces"), {"cart-1", "cart-2"}),
    (("get", "services", "-n", "shop"), {"cart"}),
    (("get", "svc", "-A"), {"cart"}),
    (("get", "nodes"), {"node-1"}),
    (("get", "namespaces"), {"shop"}),
    (("get", "endpointslices", "-n", "shop"), {"cart-abc"}),
    (("get", "endpointslices.discovery.k8s.io", "-A"), {"cart-abc"}),
])
def test_kubectl_get_lists_every_served_kind(kubeconfig: Path, args: tuple[str, ...], names: set[str]) -> None:
    out = kubectl(kubeconfig, *args, "-o", "json")
    doc = json.loads(out)
    assert doc["kind"] == "List" or doc["kind"].endswith("List")
    assert {i["metadata"]["name"] for i in doc["items"]} >= names
    table = kubectl(kubeconfig, *args)
    header = table.splitlines()[0].split()
    assert header[0] == "NAME" or header[:2] == ["NAMESPACE", "NAME"], header
    assert header[-1] == "AGE" or "AGE" in header
    assert all(n in table for n in names)


def test_kubectl_get_one_object_and_api_resources(kubeconfig: Path) -> None:
    pod = json.loads(kubectl(kubeconfig, "get", "pod", "cart-1", "-n", "shop", "-o", "json"))
    assert pod["status"]["podIP"] == "10.1.0.1" and pod["metadata"]["namespace"] == "shop"
    res = kubectl(kubeconfig, "api-resources", "--no-headers")
    rows = {line.split()[0]: line.split() for line in res.splitlines()}
    assert set(rows) >= {"pods", "services", "nodes", "namespaces", "endpointslices"}
    assert "true" in rows["pods"] and "false" in rows["nodes"]


@pytest.mark.parametrize(("args", "header", "row"), [
    (("get", "pods", "-n", "shop", "-o", "wide"),
     ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE", "NOMINATED", "NODE", "READINESS", "GATES"],
     ["cart-1", "0/1", "Running", "0", None, "10.1.0.1", "node-1", "<none>", "<none>"]),
    (("get", "pods", "-A"), ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"],
     ["shop", "cart-1", "0/1", "Running", "0", None]),
    (("get", "services", "-n", "shop"), ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"],
     ["cart", "ClusterIP", "10.96.0.10", "<none>", "80/TCP", None]),
    (("get", "nodes", "-o", "wide"),
     ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION",
      "CONTAINER-RUNTIME"], ["node-1", "Ready", "<none>", None, None, "10.0.0.1", "<none>"]),
    (("get", "endpointslices", "-n", "shop"), ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
     ["cart-abc", "IPv4", "8080", "10.1.0.1,10.1.0.2", None]),
])
def test_kubectl_get_shows_the_columns_of_a_real_cluster(kubeconfig: Path, args: tuple[str, ...],
                                                         header: list[str], row: list[str | None]) -> None:
    """The server answers kubectl's Table request (issue 15): READY, STATUS, IP, NODE for pods,
    TYPE, CLUSTER-IP, PORT(S) for services, not just NAME and AGE. None: any value (ages)."""
    lines = kubectl(kubeconfig, *args).splitlines()
    assert lines[0].split() == header
    cells = next(r for r in (ln.split() for ln in lines[1:]) if r[:2] == row[:2])
    rest = iter(cells)   # the expected values, in this order (an empty cell, e.g. VERSION, prints nothing)
    assert all(any(c == w for c in rest) for w in row if w is not None), (cells, row)
