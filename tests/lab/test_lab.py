"""The lab tier: a real three-cluster lab in a sandbox (root). One lab per module, torn down at the end.

What is proven here: the topology (connectivity inside a cluster, no route between clusters
except through a gateway, pods off the WAN), the emulated APIs following the processes (the lab
plays kubelet), pods' resolv.conf (no hosts files), faults (kill → Failed/not ready, silent partition → timeouts, heal),
behaviour switching, the fleet repo over Git with push detection, and that `down` leaves nothing.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clusters.lab.runner import LabOptions, LabRunner
from clusters.lab.topology import plan_lab
from tests.unit.lab.fleet_fixture import fleet

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

FORWARDER = r"""
import asyncio, sys
lh, lp, th, tp = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
async def pump(r, w):
    while d := await r.read(65536):
        w.write(d); await w.drain()
    w.close()
async def handle(r, w):
    ur, uw = await asyncio.open_connection(th, tp)
    await asyncio.gather(pump(r, uw), pump(ur, w))
async def main():
    s = await asyncio.start_server(handle, lh, lp)
    async with s: await s.serve_forever()
asyncio.run(main())
"""

GET = r"""
import json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
t0 = time.monotonic()
try:
    s = socket.create_connection((host, port), timeout=timeout)
    s.sendall(b"GET /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    print(json.dumps({"status": int(head.split()[1]), "body": json.loads(body), "s": time.monotonic() - t0}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__ + ": " + str(e), "s": time.monotonic() - t0}))
"""


def _lab_processes(state_dir: Path) -> list[int]:
    """PIDs on this machine whose command line mentions the lab's state directory."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if str(state_dir).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabRunner, dict[str, Any]]]:
    state_dir = Path("/tmp") / f"mf-labtest-{os.getpid()}"
    runner = LabRunner(LabOptions(state_dir, ztunnel="off", controller="off"))
    clusters, labs, services = fleet()
    t0 = time.monotonic()
    state = runner.up(plan_lab(clusters, labs, services), REPO / "examples" / "fleet",
                      {n: c.api.context for n, c in clusters.items()})
    state["measured_up_s"] = time.monotonic() - t0
    print(f"\nlab bring-up: {state['measured_up_s']:.2f} s wall; inside: {json.dumps(state['timings'])}")
    try:
        yield runner, state
    finally:
        runner.down()
        subprocess.run(["rm", "-rf", str(state_dir)], check=False)


def get(runner: LabRunner, where: str, host: str, port: int = 8080, timeout_s: float = 2.0) -> dict[str, Any]:
    res = runner.exec(where, [PY, "-c", GET, host, str(port), str(timeout_s)], timeout_s=timeout_s + 10)
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def pod_ip(state: dict[str, Any], cluster: str, pod: str) -> str:
    c = next(c for c in state["clusters"] if c["name"] == cluster)
    return str(next(p["address"] for p in c["pods"] if p["name"] == pod))


def test_bring_up_is_ready_and_fast(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    _, state = lab
    assert state["phase"] == "Ready"
    assert state["timings"]["2_network_s"] < 5.0
    assert all(p["state"] == "running" for c in state["clusters"] for p in c["pods"])


def test_pods_reach_each_other_inside_a_cluster_across_nodes(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    runner, state = lab
    r = get(runner, "pod:east/shop/frontend-0", pod_ip(state, "east", "checkout-1"))  # node-1 -> node-2
    assert r["status"] == 200, r
    assert r["body"]["cluster"] == "east" and r["body"]["pod"] == "checkout-1" and r["body"]["node"] == "node-2"


def test_no_route_between_cluster_networks(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    runner, state = lab
    west_pod = pod_ip(state, "west", "checkout-0")
    for where in ("pod:east/shop/frontend-0", "node:east/node-1", "gateway:east"):
        r = get(runner, where, west_pod, timeout_s=1.0)
        assert "error" in r, (where, r)
    # unreachable, not a timeout: there is no route at all
    assert get(runner, "node:east/node-1", west_pod, timeout_s=1.0)["s"] < 0.9


def test_only_the_gateway_path_crosses_clusters(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    """A plain forwarder on west's gateway stands in for the east-west gateway process."""
    runner, state = lab
    west = next(c for c in state["clusters"] if c["name"] == "west")
    gw = west["gateway"]
    runner.spawn("fwd", "gateway:west", [PY, "-c", FORWARDER, gw["wan_address"], "15008",
                                         pod_ip(state, "west", "checkout-0"), "8080"])
    try:
        deadline = time.monotonic() + 5
        while True:
            r = get(runner, "node:east/node-1", gw["wan_address"], 15008, timeout_s=1.0)
            if "status" in r or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.get("status") == 200, r
        assert r["body"]["cluster"] == "west"
        # a pod cannot use the WAN directly, and only HBONE's port is forwarded
        assert "error" in get(runner, "pod:east/shop/frontend-0", gw["wan_address"], 15008, timeout_s=1.0)
    finally:
        runner.reap("fwd")


def test_pods_get_kubelets_resolv_conf_and_no_hosts_file(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    """Global names resolve through DNS (the node ztunnel's responder, proven in test_e2e and
    test_dataplane_capture), never through a hosts file: a pod's /etc/hosts knows none of them,
    and its resolver is the cluster DNS address of the service range (.10) with kubelet's search list."""
    runner, state = lab
    res = runner.exec("pod:west/shop/frontend-0",
                      [PY, "-c", "print(open('/etc/resolv.conf').read() + '---' + open('/etc/hosts').read())"])
    resolv, _, hosts = res.stdout.partition("---")
    west = next(c for c in state["clusters"] if c["name"] == "west")
    assert resolv.splitlines() == ["search shop.svc.cluster.local svc.cluster.local cluster.local",
                                   f"nameserver {west['dns_address']}", "options ndots:5"]
    assert "clusterset.local" not in hosts and "svc.cluster.local" not in hosts


def _api_objects(state: dict[str, Any], cluster: str, path: str) -> list[dict[str, Any]]:
    import urllib.request

    c = next(c for c in state["clusters"] if c["name"] == cluster)
    with urllib.request.urlopen(c["api_url"] + path, timeout=5) as resp:  # via the host portal
        return list(json.loads(resp.read())["items"])


def _ready_in_api(state: dict[str, Any], cluster: str, pod: str) -> tuple[str, bool]:
    pods = {p["metadata"]["name"]: p for p in _api_objects(state, cluster, "/api/v1/pods")}
    slices = _api_objects(state, cluster, "/apis/discovery.k8s.io/v1/endpointslices")
    ep = next(e for s in slices for e in s["endpoints"] if e["targetRef"]["name"] == pod)
    return pods[pod]["status"]["phase"], bool(ep["conditions"]["ready"])


def _wait_for(fn: Any, expected: Any, timeout_s: float = 5.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if fn() == expected:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"never saw {expected!r}; last {fn()!r}")


def test_the_api_follows_a_killed_and_healed_pod(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    runner, state = lab
    assert _ready_in_api(state, "south", "checkout-0") == ("Running", True)
    runner.fault("kill", "pod", ["south/shop/checkout-0"])
    took_s = _wait_for(lambda: _ready_in_api(state, "south", "checkout-0"), ("Failed", False))
    print(f"\nkill -> Pod Failed and endpoint not ready in the API after {took_s * 1000:.0f} ms")
    assert "error" in get(runner, "pod:south/shop/frontend-0", pod_ip(state, "south", "checkout-0"), timeout_s=1.0)
    runner.heal("pod", ["south/shop/checkout-0"])
    _wait_for(lambda: _ready_in_api(state, "south", "checkout-0"), ("Running", True))
    assert get(runner, "pod:south/shop/frontend-0", pod_ip(state, "south", "checkout-0"))["status"] == 200


def test_silent_partition_times_out_and_heals(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    runner, state = lab
    target = pod_ip(state, "west", "cart-1")
    runner.fault("partition", "pod", ["west/shop/cart-1"], mode="drop")
    r = get(runner, "pod:west/shop/frontend-0", target, timeout_s=0.5)
    assert "timed out" in r.get("error", "") or "TimeoutError" in r.get("error", ""), r
    runner.heal()
    assert get(runner, "pod:west/shop/frontend-0", target)["status"] == 200
    runner.fault("partition", "pod", ["west/shop/cart-1"], mode="reject")
    r = get(runner, "pod:west/shop/frontend-0", target, timeout_s=1.0)
    assert "Refused" in r.get("error", "") and r["s"] < 0.5, r
    runner.heal()


def test_behaviour_switches_to_503_and_back(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    runner, state = lab
    ip = pod_ip(state, "east", "cart-0")
    runner.behaviour("east", "cart-0", "Error503", "shop")
    assert get(runner, "pod:east/shop/frontend-0", ip)["status"] == 503
    runner.behaviour("east", "cart-0", "Healthy", "shop")
    assert get(runner, "pod:east/shop/frontend-0", ip)["status"] == 200


def test_fleet_repo_clone_and_push_over_git(lab: tuple[LabRunner, dict[str, Any]], tmp_path: Path) -> None:
    runner, state = lab
    url = state["git_url"]
    work = tmp_path / "fleet"
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    subprocess.run(["git", "clone", "-q", url, str(work)], check=True, env=env, timeout=30)
    assert (work / "federation.yaml").exists()
    (work / "NOTE.md").write_text("lab push test\n")
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "test push"], check=True)
    # without the lab's credentials the push is refused (401: git cannot answer the challenge)
    anonymous = subprocess.run([*git, "push", "-q", "origin", "HEAD"], env=env, timeout=30, capture_output=True,
                               text=True, check=False)
    assert anonymous.returncode != 0 and "Username" in anonymous.stderr, anonymous.stderr
    creds = Path(state["git_credentials_file"])
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    subprocess.run([*git, "-c", f"credential.helper=store --file={creds}", "push", "-q", "origin", "HEAD"],
                   check=True, env=env, timeout=30)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    pushes = runner.status()["lab"]["git_pushes"]
    assert pushes and head in pushes[-1]["refs"].values()


def test_down_leaves_no_namespace_link_or_process(tmp_path: Path) -> None:
    """A separate small lab, so the check runs even if the module lab is still in use."""
    state_dir = Path("/tmp") / f"mf-labdown-{os.getpid()}"
    runner = LabRunner(LabOptions(state_dir, ztunnel="off", controller="off", portal=False))
    clusters, labs, services = fleet(1, 1)
    state = runner.up(plan_lab(clusters, labs, services), None)
    box = json.loads((state_dir / "sandbox.json").read_text())
    assert _lab_processes(state_dir), "the lab should be running"
    report = runner.down()
    assert report["ok"] and report["graceful"]
    assert not Path(f"/proc/{box['pid']}").exists() or "Z" in Path(f"/proc/{box['pid']}/stat").read_text().split()[2]
    assert _lab_processes(state_dir) == []
    host_netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in host_netns for ns in state["netns"])
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "br-wan" not in links and "br-mgmt" not in links
    assert not (state_dir / "control.sock").exists()
    subprocess.run(["rm", "-rf", str(state_dir)], check=False)


def test_a_crashed_lab_is_swept(tmp_path: Path) -> None:
    """SIGKILL the sandbox: every lab process dies with it, and sweep removes the leftovers."""
    state_dir = Path("/tmp") / f"mf-labcrash-{os.getpid()}"
    runner = LabRunner(LabOptions(state_dir, ztunnel="off", controller="off", portal=False))
    clusters, labs, services = fleet(1, 1)
    runner.up(plan_lab(clusters, labs, services), None)
    box = json.loads((state_dir / "sandbox.json").read_text())
    os.kill(box["pid"], 9)
    deadline = time.monotonic() + 5
    while _lab_processes(state_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _lab_processes(state_dir) == []
    assert (state_dir / "control.sock").exists()  # the leftover the sweeper must remove
    report = runner.down()
    assert not report["graceful"]
    assert not (state_dir / "control.sock").exists()
    subprocess.run(["rm", "-rf", str(state_dir)], check=False)


# --- the faults chaos experiments added (their plans: tests/unit/lab/test_new_faults.py) --------------


def test_api_outage_silences_one_clusters_api_and_heals(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    import urllib.error

    _, state = lab
    runner = lab[0]
    assert _api_objects(state, "east", "/api/v1/nodes")
    runner.fault("partition", "api", ["east"], mode="reject")
    try:
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _api_objects(state, "east", "/api/v1/nodes")        # refused (through the host portal)
        assert _api_objects(state, "west", "/api/v1/nodes")     # only east's
    finally:
        runner.heal("api", ["east"])
    assert _api_objects(state, "east", "/api/v1/nodes")
    runner.fault("partition", "api", ["east"], mode="drop")
    try:
        t0 = time.monotonic()
        with pytest.raises((urllib.error.URLError, TimeoutError, OSError)):
            _api_objects(state, "east", "/api/v1/nodes")        # silence: the 5 s timeout runs out
        assert time.monotonic() - t0 >= 4.0
    finally:
        runner.heal()


def test_bandwidth_cap_installs_a_token_bucket_and_heal_removes_it(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    runner, _ = lab

    def qdisc(where: str, dev: str) -> str:
        return runner.exec(where, ["tc", "qdisc", "show", "dev", dev]).stdout

    runner.fault("bandwidth", "gateway", ["south"], rate_kbit=256)
    try:
        assert "tbf" in qdisc("gateway:south", "wan0") and "256Kbit" in qdisc("gateway:south", "wan0")
        with pytest.raises(Exception, match="already shaped"):   # one cap per device at a time
            runner.fault("bandwidth", "wan", ["south", "east"], rate_kbit=64)
    finally:
        runner.heal("gateway", ["south"])
    assert "tbf" not in qdisc("gateway:south", "wan0")
    runner.fault("bandwidth", "wan", ["east", "west"], rate_kbit=128)
    try:
        shown = runner.exec("gateway:east", ["tc", "class", "show", "dev", "wan0"]).stdout
        assert "htb" in shown and "128Kbit" in shown
    finally:
        runner.heal()
    assert "htb" not in qdisc("gateway:east", "wan0")


def test_clock_skew_restarts_one_process_with_its_clock_moved(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    """The demo server stamps its answers with its own wall clock (`served_at_s`)."""
    runner, state = lab
    ip = pod_ip(state, "west", "cart-0")
    runner.fault("clock-skew", "pod", ["west/shop/cart-0"], skew_s=3600)
    try:
        deadline = time.monotonic() + 10
        r = get(runner, "pod:west/shop/frontend-0", ip)
        while "status" not in r and time.monotonic() < deadline:  # restarting
            time.sleep(0.2)
            r = get(runner, "pod:west/shop/frontend-0", ip)
        assert abs(r["body"]["served_at_s"] - time.time() - 3600) < 30, r
        other = get(runner, "pod:west/shop/frontend-0", pod_ip(state, "west", "cart-1"))
        assert abs(other["body"]["served_at_s"] - time.time()) < 30     # the others keep real time
    finally:
        runner.heal()
    deadline = time.monotonic() + 10
    r = get(runner, "pod:west/shop/frontend-0", ip)
    while "status" not in r and time.monotonic() < deadline:
        time.sleep(0.2)
        r = get(runner, "pod:west/shop/frontend-0", ip)
    assert abs(r["body"]["served_at_s"] - time.time()) < 30, r


def test_behaviour_fault_heals_back_to_what_the_lab_declared(lab: tuple[LabRunner, dict[str, Any]]) -> None:
    runner, state = lab
    ip = pod_ip(state, "east", "cart-1")
    runner.fault("behaviour", "pod", ["east/shop/cart-1"], behaviour="Error503")
    try:
        assert get(runner, "pod:east/shop/frontend-0", ip)["status"] == 503
    finally:
        runner.heal("pod", ["east/shop/cart-1"], "behaviour")
    assert get(runner, "pod:east/shop/frontend-0", ip)["status"] == 200


def test_overlapping_kills_compose_heal_restarts_only_what_no_other_fault_holds(
        lab: tuple[LabRunner, dict[str, Any]]) -> None:
    """checkout-1 runs on west's node-2: killed by a pod fault and by a node fault, it stays down until
    both are healed (the attacker review: healing one fault restarted what the other still held)."""
    runner, state = lab
    ip = pod_ip(state, "west", "checkout-1")
    runner.fault("kill", "pod", ["west/shop/checkout-1"])
    runner.fault("kill", "node", ["west/node-2"])
    try:
        runner.heal("pod", ["west/shop/checkout-1"])
        assert _pod_state(runner, "west", "checkout-1") == "dead"   # the node fault still holds it down
        assert "error" in get(runner, "pod:west/shop/frontend-0", ip, timeout_s=1.0)
        # the kubelet reports it on its next probe pass (not at once on a loaded machine)
        _wait_for(lambda: _ready_in_api(state, "west", "checkout-1")[1], False, timeout_s=15.0)
    finally:
        runner.heal("node", ["west/node-2"])
    assert _pod_state(runner, "west", "checkout-1") == "running"
    _wait_for(lambda: _ready_in_api(state, "west", "checkout-1"), ("Running", True), timeout_s=30.0)
    assert get(runner, "pod:west/shop/frontend-0", ip)["status"] == 200


def _pod_state(runner: LabRunner, cluster: str, pod: str) -> str:
    """The supervisor's word for a pod's process: running, stopped, dead or absent."""
    c = next(c for c in runner.status()["lab"]["clusters"] if c["name"] == cluster)
    return str(next(p["state"] for p in c["pods"] if p["name"] == pod))
