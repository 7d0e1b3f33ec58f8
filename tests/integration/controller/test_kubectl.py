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
    assert table.splitlines()[0].split()[:2] in (["NAME", "AGE"], ["NAMESPACE", "NAME"])
    assert all(n in table for n in names)


def test_kubectl_get_one_object_and_api_resources(kubeconfig: Path) -> None:
    pod = json.loads(kubectl(kubeconfig, "get", "pod", "cart-1", "-n", "shop", "-o", "json"))
    assert pod["status"]["podIP"] == "10.1.0.1" and pod["metadata"]["namespace"] == "shop"
    res = kubectl(kubeconfig, "api-resources", "--no-headers")
    rows = {line.split()[0]: line.split() for line in res.splitlines()}
    assert set(rows) >= {"pods", "services", "nodes", "namespaces", "endpointslices"}
    assert "true" in rows["pods"] and "false" in rows["nodes"]
