"""The command lines of what the lab runs, decided from the plan (pure).

The lab calls the commands this installation ships with their real flags: `python -m ztunnel`
(`ztunnel/__main__.py`), `meshfed controller run` (`federation/cli/ops.py`, run as
`python -m federation.cli.main` because `clusters` may not import `federation`), the demo server
and the latency relay. Nothing here asks a command what it accepts:
a flag that does not exist is a bug that tests/unit/lab/test_commands.py catches by parsing each
argv with the command's own parser.

The lab's conventions for proxies: HBONE on 0.0.0.0:15008, admin on 127.0.0.1:15021 (inside the
proxy's own namespace), and for node ztunnels SOCKS5 on the pod-bridge address :15080 plus the
transparent listener :15001 and the DNS responder on the pod-bridge address :15053, with
`--capture`: the proxy programs the node namespace's iptables itself (`ztunnel.proxy.capture_rules`,
the same code the kind DaemonSet runs) so that its enrolled pods' TCP is redirected to :15001 and
their DNS (udp/tcp 53) to :15053. A proxy with a rendered `config.json` runs standalone; without
one it joins the controller (first certificate with its pod's projected ServiceAccount token, which
the lab's kubelet keeps fresh in the proxy's directory, then config over gRPC), verifying the
controller with its trust domain's roots (`roots/<td>.pem` in the controller's state directory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clusters.lab.layout import (
    CONTROLLER_BOOTSTRAP_PORT,
    CONTROLLER_GRPC_PORT,
    CONTROLLER_HTTP_PORT,
    RUN_DIR,
    SA_TOKEN_FILE,
    TRUST_ANCHORS_DIR,
)
from clusters.lab.topology import CONTROLLER_MGMT_ADDRESS, LabPlan, NetnsName, PodPlan
from ztunnel.api.identity import ProxyId
from ztunnel.api.ports import ADMIN_PORT, DNS_CAPTURE_PORT, HBONE_PORT, OUTBOUND_CAPTURE_PORT, SOCKS5_PORT

BOOTSTRAP_TOKEN_FILE = "bootstrap-token"   # an L7 proxy pod's single-use token (0600, in its proxy dir)
MESHFED = ("-m", "federation.cli.main")   # `meshfed` without relying on the console script's path


@dataclass(frozen=True, slots=True)
class ProxySpec:
    """One proxy of the plan: a node ztunnel or a cluster's east-west gateway."""

    proxy_id: str       # ztunnel/<cluster>/<node> | gateway/<cluster> | waypoint|ingress/<cluster>/<ns>/<name>
    cluster: str
    trust_domain: str
    netns: NetnsName
    socks_host: str     # node ztunnels: the pod bridge address; gateways: ""

    @property
    def key(self) -> str:
        """The supervisor's process key (`ztunnel:east/node-1`, `gateway:east`), as faults name it."""
        kind, _, rest = self.proxy_id.partition("/")
        return f"{kind}:{rest}"

    @property
    def is_node(self) -> bool:
        return ProxyId.parse(self.proxy_id).is_node

    @property
    def log_name(self) -> str:
        return self.proxy_id.replace("/", "-") + ".log"


def proxy_specs(plan: LabPlan) -> list[ProxySpec]:
    """Node ztunnels, east-west gateways, and the proxies that run as pods (waypoints, ingress
    gateways: in their pod's namespace)."""
    out: list[ProxySpec] = []
    for c in plan.clusters:
        out += [ProxySpec(str(ProxyId.node_proxy(c.name, n.name)), c.name, c.trust_domain, n.netns, n.pod_gateway)
                for n in c.nodes]
        if c.gateway is not None:
            out.append(ProxySpec(str(ProxyId.gateway(c.name)), c.name, c.trust_domain, c.gateway.netns, ""))
        out += [ProxySpec(p.proxy_id, c.name, c.trust_domain, p.netns, "") for p in c.proxy_pods()]
    return out


def ready_file(proxy_id: str) -> str:
    """Where a proxy running as a pod says it is ready (the sandbox-private RUN_DIR): what the
    kubelet reports as the pod's readiness."""
    return f"{RUN_DIR}/{proxy_id.replace('/', '.')}.ready"


def proxy_argv(python: Sequence[str], proxy_id: str, proxy_dir: Path, socks_host: str, *, standalone: bool,
               trust_domain: str = "", controller_dir: Path | None = None,
               dns_unanswered: str = "nxdomain") -> list[str]:
    """`python -m ztunnel …` for one lab proxy.

    standalone: the proxy serves `proxy_dir/config.json` (written by whoever rendered it) with the
    certificates in `proxy_dir/certs`. Otherwise it joins the controller on the management network
    and needs `trust_domain` and `controller_dir` (where the controller writes its trust domain's
    roots); it bootstraps with the projected token in `proxy_dir/sa-token` and keeps its keys and
    certificates in `proxy_dir/state` across restarts.
    Node ztunnels answer their pods' DNS; the lab has no kube-dns and no internet, so a name the
    mesh does not know gets `dns_unanswered` (nxdomain, as a resolver for which nothing else exists,
    or servfail, as one that reaches nobody: `meshfed lab up --dns-unanswered`).
    tests/lab/test_dataplane_capture.py runs a real ztunnel with this argv."""
    argv = [*python, "-m", "ztunnel", "--cert-dir", str(proxy_dir / "certs"), "--state-dir", str(proxy_dir / "state"),
            "--hbone", f"0.0.0.0:{HBONE_PORT}", "--admin", f"127.0.0.1:{ADMIN_PORT}", "--proxy-id", proxy_id]
    if standalone:
        argv += ["--config", str(proxy_dir / "config.json")]
    else:
        if controller_dir is None or not trust_domain:
            raise ValueError(f"{proxy_id}: a proxy that joins the controller needs its trust domain and the "
                             "controller's state directory (or a config.json to run standalone)")
        # node proxies and gateways bootstrap with their pod's projected ServiceAccount token (the
        # lab's kubelet keeps it fresh); a waypoint's or ingress's pod, whose ServiceAccount the
        # fleet names freely, with a single-use token for its proxy id (`lab_bootstrap_token`)
        credential = (["--sa-token-file", str(proxy_dir / SA_TOKEN_FILE)] if ProxyId.parse(proxy_id).kind
                      in ("ztunnel", "gateway") else ["--bootstrap-token-file", str(proxy_dir / BOOTSTRAP_TOKEN_FILE)])
        argv += ["--controller", f"{CONTROLLER_MGMT_ADDRESS}:{CONTROLLER_GRPC_PORT}",
                 "--bootstrap", f"{CONTROLLER_MGMT_ADDRESS}:{CONTROLLER_BOOTSTRAP_PORT}",
                 *credential, "--trust-domain", trust_domain,
                 "--controller-roots", str(controller_dir / TRUST_ANCHORS_DIR / f"{trust_domain}.pem")]
    if ProxyId.parse(proxy_id).is_node:
        argv += ["--socks", f"{socks_host}:{SOCKS5_PORT}", "--transparent", f"0.0.0.0:{OUTBOUND_CAPTURE_PORT}",
                 "--capture",
                 # pods' DNS, captured by the node's rules (the proxy's --capture) for its enrolled pods
                 "--dns", f"{socks_host}:{DNS_CAPTURE_PORT}", "--dns-upstream", "none",
                 "--dns-unanswered", dns_unanswered]
    else:
        argv += ["--socks", ""]  # a gateway, waypoint or ingress gateway has no local clients
    if proxy_id.startswith(("waypoint/", "ingress/")):
        argv += ["--ready-file", ready_file(proxy_id)]
    return argv


def controller_argv(python: Sequence[str], repo: str, state_dir: Path, kubeconfig: Path) -> list[str]:
    """`meshfed controller run …` in the sandbox root: gRPC and bootstrap on every address (the
    management bridge for proxies), the status API on loopback only (the host portal and the Git
    push hook reach it there; nothing in the lab's namespaces needs it). `--standby`: a controller
    the lab restarts after a fault waits for its killed predecessor's processes to let the state
    directory go instead of refusing to start."""
    return [*python, *MESHFED, "controller", "run", "--repo", repo, "--state-dir", str(state_dir),
            "--listen", f"0.0.0.0:{CONTROLLER_GRPC_PORT}",
            "--bootstrap-listen", f"0.0.0.0:{CONTROLLER_BOOTSTRAP_PORT}",
            "--status-listen", f"127.0.0.1:{CONTROLLER_HTTP_PORT}",
            "--kubeconfig", str(kubeconfig), "--standby"]


def pod_argv(python: Sequence[str], p: PodPlan, control_socket: str) -> list[str]:
    argv = [*python, "-m", "clusters.lab.demo_server", "--cluster", p.cluster, "--namespace", p.namespace,
            "--pod", p.name, "--node", p.node, "--address", p.address, "--port", str(p.port),
            "--behaviour", p.behaviour.value, "--control", control_socket]
    if p.model is not None:
        argv += ["--model", p.model.name, "--model-latency-ms", f"{p.model.latency_s * 1000:g}",
                 "--model-concurrency", str(p.model.concurrency)]
    return argv


FAKETIME_LIBRARIES = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
                      "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
                      "/usr/lib/faketime/libfaketimeMT.so.1", "/usr/local/lib/faketime/libfaketimeMT.so.1")


def skewed_argv(argv: Sequence[str], skew_s: float, library: str) -> list[str]:
    """`argv` run with its wall clock moved by `skew_s`: libfaketime preloaded through `env`, which
    execs (the `faketime` command forks, and killing it would leave the skewed process running).
    The monotonic clock moves by the same constant, which timers, timeouts and backoffs never see
    (they take differences). Not FAKETIME_DONT_FAKE_MONOTONIC: with it, Python's time.sleep (an
    absolute clock_nanosleep on the monotonic clock) fails with EINVAL, and the node proxy's capture
    set-up (subprocess with a timeout) crashed at start. A negative skew must leave the monotonic
    clock above zero (`faults.check_skew`). The MT build: our processes have threads."""
    return ["env", f"LD_PRELOAD={library}", f"FAKETIME={skew_s:+.0f}", *argv]


def latency_relay_argv(python: Sequence[str], port: int, delay_ms: float) -> list[str]:
    return [*python, "-m", "clusters.lab.faults", "--port", str(port), "--delay-ms", str(delay_ms)]
