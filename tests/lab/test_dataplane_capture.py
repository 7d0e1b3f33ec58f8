"""Transparent capture end to end, in network namespaces this test creates (root).

    pod-a (client) ──veth──► node-a: iptables REDIRECT (programmed by the ztunnel, `--capture`) → ztunnel :15001
        (SO_ORIGINAL_DST recovers the VIP) ──HBONE mTLS :15008──► node-b: ztunnel → pod-b (demo server)

Both ztunnels run as `python -m ztunnel` with exactly the argv the lab builds
(`clusters.lab.commands.proxy_argv`), so a mismatch between the lab's flags and the proxy's CLI
fails here; with `--capture` each installs the capture rules of its own node namespace
(`ztunnel.proxy.capture_rules`, what the kind DaemonSet runs too) and captures only the pods its
config names as this node's workloads (enrolled). The destination pod carries
the PROXY v2 label, so the demo server reports the *verified* caller identity it got in TLV 0xD0.
The VIP the client dials exists nowhere on the network: only the capture can answer it.

DNS takes the same path: the client pod's resolv.conf (as kubelet writes it) names a nameserver
that exists nowhere either; the node's capture rules send its udp/tcp 53 to node-a's ztunnel DNS
responder, which answers the global name with the VIP. The pod has no hosts file entry for it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from clusters.lab.commands import proxy_argv
from clusters.lab.demo_server import PROXY_LABEL
from tests.integration import dataplane_topology as topo
from ztunnel.api.config import ProxyConfig, Workload

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
TD = "lab.mesh"
SUFFIX = f"{os.getpid() % 100000}"
NS = {k: f"mfcap{SUFFIX}-{k}" for k in ("pa", "na", "nb", "pb")}
# 10.77.0.0/16: private to these namespaces (never 10.255.0.0/16)
POD_A, CBR_A = "10.77.1.2", "10.77.1.1"
NODE_A, NODE_B = "10.77.0.1", "10.77.0.2"
POD_B, CBR_B = "10.77.2.2", "10.77.2.1"
VIP = "10.77.100.1"
APP_PORT = 8080
CLIENT = topo.Pod("lab", "na", "client", POD_A, topo.ident(TD, "shop", "client"), namespace="shop",
                  node_address=NODE_A)
SERVER = topo.Pod("lab", "nb", "server", POD_B, topo.ident(TD, "shop", "server"), namespace="shop",
                  node_address=NODE_B, labels={PROXY_LABEL: "v2"})
HOST = "demo.shop.svc.clusterset.local"
NAMESERVER = "10.77.100.53"  # the "cluster DNS" in the pod's resolv.conf: nothing listens there
RESOLV_CONF = f"search shop.svc.cluster.local svc.cluster.local cluster.local\nnameserver {NAMESERVER}\noptions ndots:5\n"

GET = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET /who HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
head, _, body = data.partition(b"\r\n\r\n")
print(json.dumps({"status": int(head.split()[1]), "body": json.loads(body)}))
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


def veth(a_ns: str, a_if: str, a_cidr: str, b_ns: str, b_if: str, b_cidr: str) -> None:
    sh("ip", "link", "add", a_if, "netns", a_ns, "type", "veth", "peer", "name", b_if, "netns", b_ns)
    for ns, ifname, cidr in ((a_ns, a_if, a_cidr), (b_ns, b_if, b_cidr)):
        sh("ip", "-n", ns, "addr", "add", cidr, "dev", ifname)
        sh("ip", "-n", ns, "link", "set", ifname, "up")


def cleanup_netns() -> None:
    for ns in NS.values():
        sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


@dataclass
class Lab:
    procs: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]
    configs: dict[str, tuple[Path, object]]  # proxy id -> (config.json, the ProxyConfig written there)


def wait_for_log(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}):\n{text[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not seen in {path} within {timeout_s:g}s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not sh("which", "iptables", check=False).stdout.strip():
        pytest.skip("iptables is not installed (scripts/setup-system.sh installs it)")
    cleanup_netns()
    tmp = tmp_path_factory.mktemp("capture")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    written: dict[str, tuple[Path, object]] = {}
    try:
        for ns in NS.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # the client pod's resolver, as kubelet writes it (`ip netns exec` binds it over /etc/resolv.conf)
        (Path("/etc/netns") / NS["pa"]).mkdir(parents=True, exist_ok=True)
        (Path("/etc/netns") / NS["pa"] / "resolv.conf").write_text(RESOLV_CONF)
        # the node side of the pod link is named cbr0, as the lab's bridge
        veth(NS["pa"], "eth0", f"{POD_A}/24", NS["na"], "cbr0", f"{CBR_A}/24")
        veth(NS["na"], "eth1", f"{NODE_A}/24", NS["nb"], "eth1", f"{NODE_B}/24")
        veth(NS["pb"], "eth0", f"{POD_B}/24", NS["nb"], "cbr0", f"{CBR_B}/24")
        sh("ip", "-n", NS["pa"], "route", "add", "default", "via", CBR_A)
        sh("ip", "-n", NS["pb"], "route", "add", "default", "via", CBR_B)
        # the nodes route each other's pods (a pod that is not captured goes there directly)
        sh("ip", "-n", NS["na"], "route", "add", "10.77.2.0/24", "via", NODE_B)
        sh("ip", "-n", NS["nb"], "route", "add", "10.77.1.0/24", "via", NODE_A)
        for ns in (NS["na"], NS["nb"]):
            in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")

        # config and certificates, laid out the way the lab expects (proxies/<id>/config.json, certs/)
        hbone = 15008
        svc = topo.service(HOST, VIP, 80, APP_PORT, [topo.endpoint(SERVER, APP_PORT, hbone)],
                           sans=[SERVER.identity], connect_timeout_s=2.0)
        wl = [CLIENT.workload(), SERVER.workload()]
        cfgs = {
            "ztunnel/lab/na": (topo.proxy_config("ztunnel/lab/na", "lab", TD, workloads=wl, services=[svc],
                                                 bundles=[TD], local_identities=[CLIENT.identity]),
                               CLIENT.identity, NS["na"], CBR_A),
            "ztunnel/lab/nb": (topo.proxy_config("ztunnel/lab/nb", "lab", TD, workloads=wl, services=[svc],
                                                 bundles=[TD], local_identities=[SERVER.identity]),
                               SERVER.identity, NS["nb"], CBR_B),
        }
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for proxy_id, (cfg, identity, ns, cbr) in cfgs.items():
            d = tmp / proxy_id.replace("/", "_")
            topo.write_cert_dir(d / "certs", {identity: topo.svid(identity)})
            topo.write_config(d / "config.json", replace(cfg, network="lab"))
            written[proxy_id] = (d / "config.json", replace(cfg, network="lab"))
            argv = proxy_argv([sys.executable], proxy_id, d, cbr, standalone=True)
            assert "--controller" not in argv  # a rendered config means standalone
            assert "--capture" in argv         # the node proxy programs its own capture
            logs[proxy_id] = tmp / f"{proxy_id.replace('/', '-')}.log"
            with open(logs[proxy_id], "wb") as log:
                procs[proxy_id] = subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=REPO, env=env,
                                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        logs["pod"] = tmp / "pod-b.log"
        with open(logs["pod"], "wb") as log:
            procs["pod"] = subprocess.Popen(
                ["ip", "netns", "exec", NS["pb"], sys.executable, "-m", "clusters.lab.demo_server",
                 "--cluster", "lab", "--namespace", "shop", "--pod", "server", "--node", "nb",
                 "--address", POD_B, "--port", str(APP_PORT)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        for proxy_id in cfgs:
            wait_for_log(logs[proxy_id], '"kind":"listening"', procs[proxy_id])
        deadline = time.monotonic() + 20
        while in_ns(NS["nb"], sys.executable, "-c",
                    f"import socket; socket.create_connection(('{POD_B}', {APP_PORT}), 1).close()",
                    check=False).returncode != 0:
            assert time.monotonic() < deadline, "demo server never listened"
            time.sleep(0.1)
        yield Lab(procs, logs, written)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        cleanup_netns()


def get_from_pod(url_host: str, port: int) -> dict[str, object]:
    r = in_ns(NS["pa"], sys.executable, "-c", GET, url_host, str(port))
    result: dict[str, object] = json.loads(r.stdout)
    return result


def test_vip_is_captured_and_reaches_the_server_over_hbone(lab: Lab) -> None:
    answer = get_from_pod(VIP, 80)
    assert answer["status"] == 200
    body = answer["body"]
    assert isinstance(body, dict)
    assert body["pod"] == "server"
    # the identity came through mTLS and the PROXY v2 header: the client's, verified at node-b
    assert body["peer_identity"] == CLIENT.identity
    assert str(body["peer_address"]).startswith(POD_A + ":")
    # node-a's access log: the outbound connection was captured transparently (SO_ORIGINAL_DST)
    log_a = lab.logs["ztunnel/lab/na"].read_text()
    outbound = [json.loads(line) for line in log_a.splitlines()
                if '"direction":"outbound"' in line and '"kind":"access"' in line]
    assert outbound and outbound[-1]["dst"] == HOST and outbound[-1]["via"] == f"{NODE_B}:15008"


def test_pod_ip_is_captured_too(lab: Lab) -> None:
    """Dialing the server's pod IP directly also goes through the mesh (never plaintext on the wire)."""
    answer = get_from_pod(POD_B, APP_PORT)
    body = answer["body"]
    assert isinstance(body, dict)
    assert answer["status"] == 200 and body["peer_identity"] == CLIENT.identity


def test_uncaptured_destination_is_refused_with_a_reset(lab: Lab) -> None:
    """A destination the mesh does not know is refused by ztunnel (RST), not leaked around it."""
    r = in_ns(NS["pa"], sys.executable, "-c",
              "import socket\n"
              "try:\n    s = socket.create_connection(('10.77.99.9', 81), timeout=5)\n"
              "    s.sendall(b'x')\n    print(repr(s.recv(10)))\n"
              "except OSError as e:\n    print(type(e).__name__)\n",
              check=False)
    assert r.stdout.strip() in ("ConnectionResetError", "BrokenPipeError", "b''"), r.stdout + r.stderr


def test_admin_listens_on_loopback_inside_the_node(lab: Lab) -> None:
    r = in_ns(NS["na"], sys.executable, "-c",
              "import urllib.request\n"
              "print(urllib.request.urlopen('http://127.0.0.1:15021/ready', timeout=3).read().decode())")
    assert r.stdout.strip() == "ready"


DNS_PROBE = r"""
import json, socket, sys
import dns.flags, dns.message, dns.query, dns.rcode
host, ns = sys.argv[1], sys.argv[2]
out = {"hosts_mentions_it": host in open("/etc/hosts").read(), "resolv_conf": open("/etc/resolv.conf").read(),
       "getaddrinfo": sorted({a[4][0] for a in socket.getaddrinfo(host, 80, proto=socket.IPPROTO_TCP)})}
try:
    socket.getaddrinfo("nothing.example", 80)
    out["unknown"] = "resolved"
except socket.gaierror as e:
    out["unknown"] = e.errno == socket.EAI_NONAME
for transport, ask in (("udp", dns.query.udp), ("tcp", dns.query.tcp)):
    a = ask(dns.message.make_query(host + ".", "A"), ns, timeout=5)
    aaaa = ask(dns.message.make_query(host + ".", "AAAA"), ns, timeout=5)
    nx = ask(dns.message.make_query("nothing.example.", "A"), ns, timeout=5)
    out[transport] = {"a": [r.to_text() for rr in a.answer for r in rr], "ttl": a.answer[0].ttl if a.answer else None,
                      "aa": bool(a.flags & dns.flags.AA), "aaaa_rcode": dns.rcode.to_text(aaaa.rcode()),
                      "aaaa_answers": len(aaaa.answer), "unknown_rcode": dns.rcode.to_text(nx.rcode())}
print(json.dumps(out))
"""


def test_a_pod_resolves_a_global_name_through_its_nodes_dns_responder_and_calls_it(lab: Lab) -> None:
    r = in_ns(NS["pa"], sys.executable, "-c", DNS_PROBE, HOST, NAMESERVER)
    got = json.loads(r.stdout)
    assert got["resolv_conf"] == RESOLV_CONF and not got["hosts_mentions_it"], "DNS, not a hosts file"
    assert got["getaddrinfo"] == [VIP]
    assert got["unknown"] is True, "a name the mesh does not know: NXDOMAIN in the lab (no upstream)"
    for transport in ("udp", "tcp"):
        assert got[transport] == {"a": [VIP], "ttl": 30, "aa": True, "aaaa_rcode": "NOERROR", "aaaa_answers": 0,
                                  "unknown_rcode": "NXDOMAIN"}, transport
    # and the name is callable: resolved by DNS, captured by iptables, carried over HBONE
    answer = get_from_pod(HOST, 80)
    body = answer["body"]
    assert isinstance(body, dict)
    assert answer["status"] == 200 and body["pod"] == "server" and body["peer_identity"] == CLIENT.identity
    dump = json.loads(in_ns(NS["na"], sys.executable, "-c",
                            "import urllib.request\n"
                            "print(urllib.request.urlopen('http://127.0.0.1:15021/config_dump', timeout=3)"
                            ".read().decode())").stdout)
    assert dump["dns"]["stats"]["mesh"] >= 3 and dump["dns"]["upstreams"] == []
    metrics = in_ns(NS["na"], sys.executable, "-c",
                    "import urllib.request\n"
                    "print(urllib.request.urlopen('http://127.0.0.1:15021/metrics', timeout=3).read().decode())").stdout
    mesh = [ln for ln in metrics.splitlines() if ln.startswith('meshfed_dns_queries_total{outcome="mesh"}')]
    assert mesh and float(mesh[0].split()[-1]) >= 3, metrics[-2000:]


def captured_pods(ns: str) -> set[str]:
    rules = in_ns(ns, "iptables", "-w", "-t", "nat", "-S", "MESHFED_PODS").stdout.splitlines()
    return {r.split()[3].removesuffix("/32") for r in rules if r.startswith("-A MESHFED_PODS -s ")}


def wait_captured(ns: str, pods: set[str], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while captured_pods(ns) != pods:
        assert time.monotonic() < deadline, f"captured {captured_pods(ns)}, wanted {pods}"
        time.sleep(0.05)


def test_the_proxy_installed_the_capture_for_its_enrolled_pods_only(lab: Lab) -> None:
    assert captured_pods(NS["na"]) == {POD_A}
    assert captured_pods(NS["nb"]) == {POD_B}
    prerouting = in_ns(NS["na"], "iptables", "-w", "-t", "nat", "-S", "PREROUTING").stdout.splitlines()
    assert prerouting[1] == "-A PREROUTING -j MESHFED_PODS"   # first: before anything else
    outbound = in_ns(NS["na"], "iptables", "-w", "-t", "nat", "-S", "MESHFED_OUTBOUND").stdout.splitlines()
    assert "-A MESHFED_OUTBOUND -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053" in outbound  # --dns given


def test_the_capture_is_installed_only_after_the_listeners_it_redirects_to(lab: Lab) -> None:
    """A REDIRECT to a port nobody listens on yet fails a pod's first lookups while the proxy starts."""
    records = [json.loads(line) for line in lab.logs["ztunnel/lab/na"].read_text().splitlines() if line.startswith("{")]
    order = [r["kind"] for r in records if r.get("kind") in ("dns", "capture") and "ignored" not in r]
    assert "dns" in order and "capture" in order, order
    assert order.index("dns") < order.index("capture"), order


def test_a_pod_that_leaves_the_mesh_is_no_longer_captured_and_comes_back_without_a_restart(lab: Lab) -> None:
    """Un-enrolling = the pod is no longer one of the node's workloads in its config (the controller
    drops it when its namespace loses the ambient label): the next config removes its capture and
    its connections go out directly; the config that names it again captures it again. The client
    process (the pod) is never restarted."""
    path, cfg = lab.configs["ztunnel/lab/na"]
    assert isinstance(cfg, ProxyConfig)

    def push(version: int, workloads: tuple[Workload, ...]) -> None:  # a proxy applies only newer stamps
        topo.write_config(path, replace(cfg, workloads=workloads, stamp=replace(cfg.stamp, version=version)))
        lab.procs["ztunnel/lab/na"].send_signal(signal.SIGHUP)

    try:
        push(2, tuple(w for w in cfg.workloads if w.address != POD_A))
        wait_captured(NS["na"], set())
        body = get_from_pod(POD_B, APP_PORT)["body"]
        assert isinstance(body, dict) and not body["peer_identity"]    # plain TCP, straight to the pod
    finally:
        push(3, cfg.workloads)
    wait_captured(NS["na"], {POD_A})
    body = get_from_pod(POD_B, APP_PORT)["body"]
    assert isinstance(body, dict) and body["peer_identity"] == CLIENT.identity   # through the mesh again
