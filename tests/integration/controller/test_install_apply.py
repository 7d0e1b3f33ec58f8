"""`meshfed install` against an API server: what it prints, `kubectl apply -f -` accepts and the
server serves back; without --print it applies through clusters.kube.apply (the emulated server
has no server-side apply: a missing object is created), and a second install changes nothing.

kubectl is skipped (with the reason) when it is not on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusters.lab.apiserver import EmulatedApiServer

REPO = Path(__file__).resolve().parents[3]
KUBECTL = shutil.which("kubectl")


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[tuple[EmulatedApiServer, Path]]:
    with EmulatedApiServer() as srv:
        yield srv, srv.write_kubeconfig(tmp_path / "kubeconfig", "lab-east")


def meshfed(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "federation.cli.main", *args], capture_output=True, text=True,
                          input=stdin, env=env, cwd=REPO, timeout=120, check=False)


def served(srv: EmulatedApiServer) -> dict[tuple[str, str], dict[str, object]]:
    out = {}
    for api_version, kind in (("v1", "Namespace"), ("v1", "ServiceAccount"), ("v1", "ConfigMap"), ("v1", "Service"),
                              ("apps/v1", "DaemonSet"), ("apps/v1", "Deployment"),
                              ("rbac.authorization.k8s.io/v1", "ClusterRole"),
                              ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding")):
        for o in srv.list(api_version, kind):
            out[(kind, o["metadata"]["name"])] = o
    return out


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH (apt install kubectl)")
def test_install_print_piped_to_kubectl_apply_is_served_back(api: tuple[EmulatedApiServer, Path]) -> None:
    srv, kubeconfig = api
    printed = meshfed("install", "--context", "lab-east", "--print")
    assert printed.returncode == 0, printed.stderr
    assert KUBECTL is not None
    applied = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), "--context", "lab-east", "apply", "-f", "-"],
                             input=printed.stdout, capture_output=True, text=True, timeout=120, check=False)
    assert applied.returncode == 0, applied.stderr
    lines = applied.stdout.splitlines()
    assert "daemonset.apps/ztunnel created" in lines and "service/eastwest-gateway created" in lines
    assert "clusterrole.rbac.authorization.k8s.io/meshfed-discovery created" in lines
    objs = served(srv)
    ds = objs[("DaemonSet", "ztunnel")]
    assert ds["metadata"]["namespace"] == "meshfed-system"  # type: ignore[index]
    assert ds["spec"]["template"]["spec"]["hostNetwork"] is True  # type: ignore[index]
    assert objs[("Service", "eastwest-gateway")]["spec"]["type"] == "LoadBalancer"  # type: ignore[index]
    # what kubectl gets back is what meshfed rendered (plus what the server adds)
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in
                (json.loads(doc) for doc in printed.stdout.split("---\n") if doc.strip())}
    assert set(rendered) <= set(objs)
    for key, doc in rendered.items():
        for field in ("spec", "data", "rules", "roleRef", "subjects"):
            if field in doc:
                assert objs[key][field] == doc[field], (key, field)
        assert objs[key]["metadata"]["labels"] == doc["metadata"]["labels"]  # type: ignore[index]
    again = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), "--context", "lab-east", "apply", "-f", "-"],
                           input=printed.stdout, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and all(line.endswith("unchanged") for line in again.stdout.splitlines())


def test_install_applies_through_the_kubernetes_doorway_and_again_idempotently(
        api: tuple[EmulatedApiServer, Path], tmp_path: Path) -> None:
    srv, kubeconfig = api
    roots = tmp_path / "roots.pem"
    roots.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    args = ("install", "--context", "lab-east", "--kubeconfig", str(kubeconfig), "--controller", "100.64.0.1:15012",
            "--bootstrap", "100.64.0.1:15013", "--controller-roots", str(roots))
    first = meshfed(*args)
    assert first.returncode == 0, first.stderr
    assert "daemonset/meshfed-system/ztunnel created" in first.stdout.splitlines()
    objs = served(srv)
    assert objs[("ConfigMap", "meshfed-controller-roots")]["data"] == {"roots.pem": roots.read_text()}
    args_ = objs[("DaemonSet", "ztunnel")]["spec"]["template"]["spec"]["containers"][0]["args"]  # type: ignore[index]
    assert args_[args_.index("--controller") + 1] == "100.64.0.1:15012"
    versions = {k: o["metadata"]["resourceVersion"] for k, o in objs.items()}  # type: ignore[index]
    second = meshfed(*args)  # the object exists: the apply PATCH lands (the emulator stores it as a merge)
    assert second.returncode == 0 and all(line.endswith(" applied") for line in second.stdout.splitlines())
    assert set(served(srv)) == set(objs)  # nothing new, nothing lost
    assert len(versions) == len(objs)
    workloads = meshfed("install", "--context", "lab-east", "--kubeconfig", str(kubeconfig), "--workloads")
    assert workloads.returncode == 0, workloads.stderr
    shop = {o["metadata"]["name"]: o for o in srv.list("v1", "Namespace", label_selector="istio.io/dataplane-mode=ambient")}
    assert set(shop) == {"shop"}


def test_install_into_an_unreachable_cluster_says_so(tmp_path: Path) -> None:
    r = meshfed("install", "--context", "lab-east", "--kubeconfig", str(tmp_path / "missing"))
    assert r.returncode == 2 and "lab-east" in r.stderr
