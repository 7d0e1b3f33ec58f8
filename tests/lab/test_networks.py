"""Real networks in the lab (root): kind's identical address ranges on different networks, and two
clusters sharing one network — end to end, with the controller, node ztunnels and gateways.

The fleet is examples/fleet made to look like four kind clusters:

    east   net-east   us-east      10.244.0.0/16 + 10.96.0.0/12   (kind's defaults)
    south  net-south  us-east      10.244.0.0/16 + 10.96.0.0/12   (the same)
    west   net-west   us-west      10.244.0.0/16 + 10.96.0.0/12   (the same)
    fra    net-east   eu-central   10.40.0.0/16  + 10.140.0.0/16  (shares east's network)

with checkout's failoverPriority `[topology.istio.io/network, topology.kubernetes.io/region]`, so
from east the order is east → fra (same network) → south, west. One node per cluster, checkout ×2
and a frontend in each (the canary, cart and their policies are left out to keep the lab small).

What is proven:
- three clusters with identical pod and service CIDRs converge; the same pod IP exists in each,
  and every cluster's frontend resolves checkout.shop.svc.clusterset.local through its node's DNS
  responder to its own cluster's VIP (the same address everywhere) and is served locally;
- cross-network calls between them go through the east-west gateways with end-to-end mTLS (the
  echo reports the caller's identity), whatever the identical ranges;
- east and fra share a network: the lab routes their nodes and pods to each other (and nobody
  else's); `explain` says "fra direct (same network)"; with east's checkout killed, east's traffic
  fails over to fra — directly, node to node: it still flows with both clusters' gateways down —
  and fails back when east heals.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chaos.demo import LabFederation

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
# another run may own /tmp/meshfed-networks: MESHFED_NETWORKS_STATE_DIR picks another (logs stay there)
STATE_DIR = Path(os.environ.get("MESHFED_NETWORKS_STATE_DIR", "/tmp/meshfed-networks"))
KIND_PODS, KIND_SERVICES = "10.244.0.0/16", "10.96.0.0/12"
SERVICE = "checkout.shop.svc.clusterset.local"
CHECKOUT_PODS = "{}/shop/checkout-[0-9]*"

LAB = """apiVersion: meshfed.dev/v1alpha1
kind: LabCluster
metadata:
  name: {name}
spec:
  nodes:
    - name: node-1
  workloads:
    - name: checkout
      namespace: shop
      service: checkout
      replicas: 2
      serviceAccount: checkout
      port: 8080
      behaviour: Healthy
    - name: frontend
      namespace: shop
      role: client
      replicas: 1
      serviceAccount: frontend
"""


def _print(*parts: Any) -> None:
    print("[networks]", *parts, flush=True)


def _sub(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def kind_like_fleet(dst: Path) -> Path:
    """examples/fleet → the fleet of this module's docstring (a plain directory; the lab makes it a repo)."""
    shutil.copytree(REPO / "examples" / "fleet", dst)
    for gone in ("services/shop/cart.yaml", "services/shop/checkout-v2.yaml", "policies/shop/checkout-canary.yaml",
                 "policies/shop/checkout-v2-allow-frontend.yaml"):
        (dst / gone).unlink()
    for name, pods, services in (("east", "10.10.0.0/16", "10.110.0.0/16"), ("south", "10.30.0.0/16", "10.130.0.0/16"),
                                 ("west", "10.20.0.0/16", "10.120.0.0/16")):
        _sub(dst / "clusters" / f"{name}.yaml", pods, KIND_PODS)
        _sub(dst / "clusters" / f"{name}.yaml", services, KIND_SERVICES)
    fra = (dst / "clusters" / "east.yaml").read_text()
    for old, new in (("name: east", "name: fra"), ("region: us-east", "region: eu-central"),
                     ("zone: us-east-1a", "zone: eu-central-1a"), ("context: lab-east", "context: lab-fra"),
                     ("172.30.0.11", "172.30.0.14"), (KIND_PODS, "10.40.0.0/16"), (KIND_SERVICES, "10.140.0.0/16")):
        assert old in fra, old
        fra = fra.replace(old, new)
    (dst / "clusters" / "fra.yaml").write_text(fra)  # network net-east, trust domain east.mesh.local: east's
    for name in ("east", "south", "west", "fra"):
        (dst / "lab" / f"{name}.yaml").write_text(LAB.format(name=name))
    _sub(dst / "services" / "shop" / "checkout.yaml", "    - south\n", "    - south\n    - fra\n")
    _sub(dst / "policies" / "shop" / "checkout.yaml",
         "          - topology.kubernetes.io/region\n          - topology.istio.io/network\n",
         "          - topology.istio.io/network\n          - topology.kubernetes.io/region\n")
    return dst


def test_the_kind_like_fleet_is_valid(tmp_path: Path) -> None:
    """The fleet this module runs passes the validator (identical ranges on different networks are fine)."""
    import gitops

    snap = gitops.load_worktree(kind_like_fleet(tmp_path / "fleet"))
    assert {c.network for c in snap.clusters.values()} == {"net-east", "net-south", "net-west"}
    assert snap.clusters["fra"].network == snap.clusters["east"].network


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabFederation]:
    from clusters.lab.layout import LabError

    f = LabFederation(kind_like_fleet(tmp_path_factory.mktemp("networks") / "fleet"), STATE_DIR)
    try:
        lab = f.up()
    except LabError as e:
        if "already running" in str(e):
            pytest.fail(f"{e} (or set MESHFED_NETWORKS_STATE_DIR to run beside it)")
        f.down()
        raise
    except BaseException:
        f.down()
        raise
    try:
        _, took_s = f.wait_converged(timeout_s=240)
        _print(f"lab up in {lab.get('up_wall_s')} s, converged {took_s:.1f} s later")
        yield f
    finally:
        f.down()


def cluster(fed: LabFederation, name: str) -> dict[str, Any]:
    return next(c for c in fed.lab["clusters"] if c["name"] == name)


def pod_ip(fed: LabFederation, name: str, pod: str) -> str:
    return str(next(p["address"] for p in cluster(fed, name)["pods"] if p["name"] == pod))


def served_by(fed: LabFederation, client: str, target: str, timeout_s: float = 40.0) -> dict[str, Any]:
    """Ask from `client`'s frontend until `target` serves; the last answer."""
    deadline = time.monotonic() + timeout_s
    a: dict[str, Any] = {}
    while time.monotonic() < deadline:
        a = fed.ask(fed.client_pod(client), timeout_s=3.0)
        if a.get("cluster") == target:
            return a
        time.sleep(0.3)
    return a


GET = r"""
import json, socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(json.dumps(json.loads(data.partition(b"\r\n\r\n")[2])))
except OSError as e:
    print(json.dumps({"error": type(e).__name__}))
"""


def plain_get(fed: LabFederation, where: str, host: str, port: int = 8080, timeout_s: float = 1.0) -> dict[str, Any]:
    """A TCP request from a node's namespace (nodes are not captured: the lab's routes, not the mesh)."""
    r = fed.runner.exec(where, [sys.executable, "-c", GET, host, str(port), str(timeout_s)], timeout_s=timeout_s + 10)
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_identical_ranges_converge_and_each_cluster_resolves_and_serves_locally(fed: LabFederation) -> None:
    st = fed.status()
    assert st is not None and len(st["proxies"]) == fed.proxy_count() == 8
    kind = [cluster(fed, c) for c in ("east", "south", "west")]
    assert {(c["pod_cidr"], c["service_cidr"]) for c in kind} == {(KIND_PODS, KIND_SERVICES)}
    assert len({pod_ip(fed, c["name"], "checkout-0") for c in kind}) == 1, "the same pod IP in every cluster"
    vip = next(s["cluster_ip"] for s in kind[0]["services"] if s["name"] == "checkout")
    for c in ("east", "south", "west", "fra"):
        res = fed.runner.exec(fed.client_pod(c), [sys.executable, "-c",
                                                  f"import socket; print(socket.gethostbyname({SERVICE!r}))"])
        want = vip if c != "fra" else next(s["cluster_ip"] for s in cluster(fed, "fra")["services"]
                                           if s["name"] == "checkout")
        assert res.stdout.strip() == want, (c, res.stdout, res.stderr)
        a = served_by(fed, c, c)
        assert a.get("cluster") == c, (c, a)
    assert vip.startswith("10.96.0.")


def test_cross_network_calls_go_through_the_gateways_despite_identical_ranges(fed: LabFederation) -> None:
    """Only west keeps its checkout: east, south and fra (every other network) are served by west
    through the gateways, with the caller's identity verified end to end."""
    others = ("east", "south", "fra")
    fed.runner.fault("kill", "pod", [CHECKOUT_PODS.format(c) for c in others])
    try:
        for client in others:
            a = served_by(fed, client, "west")
            trust = "south" if client == "south" else "east"
            _print(f"{client} → west: {a.get('pod')} caller {a.get('peer_identity')}")
            assert a.get("cluster") == "west", (client, a)
            assert a.get("peer_identity") == f"spiffe://{trust}.mesh.local/ns/shop/sa/frontend"
            assert a.get("address") == pod_ip(fed, "west", str(a.get("pod")))
            if client != "fra":  # the server's address is also a pod of the caller's own cluster
                assert a.get("address") == pod_ip(fed, client, str(a.get("pod")))
    finally:
        fed.runner.heal()
    for c in others:
        assert served_by(fed, c, c).get("cluster") == c


def test_the_lab_routes_a_shared_network_and_nothing_else(fed: LabFederation) -> None:
    fra_pod, east_pod = pod_ip(fed, "fra", "checkout-0"), pod_ip(fed, "east", "checkout-0")
    a = plain_get(fed, "node:east/node-1", fra_pod)
    assert a.get("cluster") == "fra", a
    assert plain_get(fed, "node:fra/node-1", east_pod).get("cluster") == "east"
    # another network has no route to fra's pods, and east's address there is west's own pod
    assert "error" in plain_get(fed, "node:west/node-1", fra_pod)
    assert plain_get(fed, "node:west/node-1", east_pod).get("cluster") == "west"


def test_the_same_network_cluster_is_next_and_direct_and_takes_over_without_gateways(fed: LabFederation) -> None:
    data = fed.api(f"/api/v1/explain?service={SERVICE}&from=east")
    groups = [(t["tier"], g["cluster"], g["path"]) for t in data["tiers"] for g in t["groups"]]
    _print("explain from east:", groups)
    assert groups[0][1] == "east" and groups[1] == (1, "fra", "direct (same network)"), groups
    assert all(path.startswith("via east-west gateway") for _, c, path in groups if c in ("south", "west"))

    fed.runner.fault("kill", "pod", [CHECKOUT_PODS.format("east")])
    for gw in ("east", "fra"):
        fed.runner.fault("kill", "gateway", [gw])
    try:
        a = served_by(fed, "east", "fra")
        _print(f"east → fra with both gateways down: {a.get('pod')} caller {a.get('peer_identity')}")
        assert a.get("cluster") == "fra", a
        assert a.get("peer_identity") == "spiffe://east.mesh.local/ns/shop/sa/frontend"
        for _ in range(5):  # and it stays there: fra is the next tier, not south or west
            assert fed.ask(fed.client_pod("east"), timeout_s=3.0).get("cluster") == "fra"
    finally:
        fed.runner.heal()
    assert served_by(fed, "east", "east").get("cluster") == "east", "failback after heal"
