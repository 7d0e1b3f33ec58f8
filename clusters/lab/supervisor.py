"""LabRunner (`meshfed lab up|status|down|fault`) and the supervisor that runs inside the sandbox.

Two halves, one state directory:

- `LabRunner` runs wherever the user typed the command. `up()` computes the plan (pure, from the
  fleet's Cluster/LabCluster/GlobalService objects), stores it in the state directory, starts the
  sandbox (`clusters.lab.sandbox`) and waits for the supervisor to say Ready. Everything after
  that — status, faults, exec, down — goes over a Unix socket in the state directory
  (`control.sock`: one JSON request per connection, one JSON answer), which crosses network
  namespaces, so the host side never needs to enter the sandbox.
- `Supervisor` is PID 1 of the sandbox. Bring-up, in numbered steps (each timed, see `lab.json`):
  1 private mounts; 2 build the network (topology.execute); 3 hosts files per pod namespace;
  4 one emulated API server per cluster + kubeconfig; 5 pods (demo servers); 6 kubelets;
  7 Git server for the fleet repo; 8 ztunnels/gateways and 9 the controller, when those modules
  exist in this installation; 10 host portal; then it writes `lab.json` (phase Ready) and serves
  the control socket. It reaps orphans (it is PID 1) and restarts nothing on its own: a killed
  process stays dead until `heal` — that is the fault.

`lab.json` describes what runs where (namespaces, addresses, PIDs, API URLs, Git URL, timings);
`sandbox.json` (written by the launcher) names the `unshare` process that owns it all.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clusters.lab import faults as F
from clusters.lab import sandbox
from clusters.lab.kubelet import Kubelet, NodeState, PodPhase, PodState
from clusters.lab.topology import (
    CONTROLLER_MGMT_ADDRESS,
    ROOT_NS,
    ClusterPlan,
    LabPlan,
    NetnsName,
    PodPlan,
    capture_rules,
    execute,
    plan_lab,
    run_iptables,
)
from ztunnel.api.ports import ADMIN_PORT, HBONE_PORT, OUTBOUND_CAPTURE_PORT, SOCKS5_PORT

PLAN_FILE = "plan.pickle"
KUBECONFIG_FILE = "kubeconfig"
RUN_DIR = "/run/meshfed"  # sandbox-private tmpfs: pod control sockets
CONTROLLER_GRPC_PORT = 15012
CONTROLLER_HTTP_PORT = 15014
CONTROLLER_BOOTSTRAP_PORT = 15013  # certificate service without client auth: a proxy's first SVID
CONTROLLER_DIR = "controller"      # the controller's state directory inside the lab's
BOOTSTRAP_TOKENS_FILE = "bootstrap-tokens.json"  # cluster -> token; the controller keeps what it finds
CONTROLLER_ROOTS_FILE = "controller-roots.pem"   # written by the controller at start
MAX_SOCKET_PATH = 100


class LabError(RuntimeError):
    """The lab could not do what was asked; the message says why and what to do."""


# --- control protocol -----------------------------------------------------------------------------


def control_request(state_dir: Path, request: Mapping[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
    path = state_dir / sandbox.CONTROL_SOCKET
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    except FileNotFoundError:
        raise LabError(f"no lab is running in {state_dir} (no control socket); start one with `meshfed lab up`") from None
    except OSError as e:  # refused, reset, timed out: the supervisor is gone or stuck
        raise LabError(f"the lab in {state_dir} does not answer ({e}); `meshfed lab down` cleans it up") from None
    finally:
        s.close()
    answer: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    if not answer.get("ok"):
        raise LabError(str(answer.get("error", "the lab refused the request")))
    return answer


# --- processes inside the sandbox -----------------------------------------------------------------


@dataclass
class ManagedProcess:
    key: str
    netns: NetnsName
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    stopped: bool = False
    killed: bool = False      # by a fault: stays down until heal
    started_at_s: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        cmd = (["ip", "netns", "exec", self.netns] if self.netns else []) + self.argv
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.stopped = self.killed = False
        self.started_at_s = time.time()

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def terminate(self, grace_s: float = 1.0) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        self.signal(signal.SIGCONT)
        self.popen.terminate()
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(2)


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _help_flags(argv: Sequence[str]) -> str:
    r = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60, check=False)
    return r.stdout + r.stderr if r.returncode == 0 else ""


def proxy_argv(base: Sequence[str], proxy_id: str, proxy_dir: Path, socks_host: str, flags: str,
               *, with_config: bool, trust_domain: str = "", controller_dir: Path | None = None) -> list[str]:
    """The command line of one lab proxy (pure; `flags` is `python -m ztunnel --help`'s text).

    The lab's conventions: HBONE on 0.0.0.0:15008, admin on 127.0.0.1:15021 (inside the proxy's own
    namespace), and for node ztunnels SOCKS5 on the pod-bridge address :15080 plus the transparent
    listener :15001 that the node's iptables REDIRECT (`topology.capture_rules`) sends pod TCP to.
    tests/lab/test_dataplane_capture.py runs a real ztunnel with this argv."""
    argv = [*base, "--cert-dir", str(proxy_dir / "certs"), "--state-dir", str(proxy_dir / "state"),
            "--hbone", f"0.0.0.0:{HBONE_PORT}", "--admin", f"127.0.0.1:{ADMIN_PORT}"]
    if with_config:
        argv += ["--config", str(proxy_dir / "config.json")]
    elif "--controller" in flags:
        # controller mode only without a rendered config: a proxy given a config file runs standalone
        # (ztunnel's --controller also wants --bootstrap/--trust-domain/--controller-roots)
        argv += ["--controller", f"{CONTROLLER_MGMT_ADDRESS}:{CONTROLLER_GRPC_PORT}"]
    if "--bootstrap-token-file" in flags and controller_dir is not None:
        argv += ["--bootstrap", f"{CONTROLLER_MGMT_ADDRESS}:{CONTROLLER_BOOTSTRAP_PORT}",
                 "--bootstrap-token-file", str(proxy_dir / "bootstrap-token"), "--trust-domain", trust_domain,
                 "--controller-roots", str(controller_dir / CONTROLLER_ROOTS_FILE)]
    if "--proxy-id" in flags:
        argv += ["--proxy-id", proxy_id]
    if proxy_id.startswith("ztunnel/"):
        argv += ["--socks", f"{socks_host}:{SOCKS5_PORT}", "--transparent", f"0.0.0.0:{OUTBOUND_CAPTURE_PORT}"]
    elif "--socks" in flags:
        argv += ["--socks", ""]
    return argv


class Supervisor:
    """PID 1 of the sandbox. Invariants: `procs` holds every process the lab started; a process
    with `killed=True` is not restarted except by `heal`; `faults` lists applied steps so that
    `heal` undoes exactly them."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.plan: LabPlan = pickle.loads((state_dir / PLAN_FILE).read_bytes())
        self.meta: dict[str, Any] = json.loads((state_dir / "request.json").read_text())
        self.procs: dict[str, ManagedProcess] = {}
        self.apis: dict[str, Any] = {}
        self.kubelets: dict[str, Kubelet] = {}
        self.stop = threading.Event()
        self.lock = threading.RLock()
        self.timings: dict[str, float] = {}
        self.faults: list[tuple[F.FaultRequest, list[F.FaultStep]]] = []
        self.latency: dict[tuple[str, str], ManagedProcess] = {}
        self.latency_rules: dict[tuple[str, str], tuple[tuple[str, ...], ...]] = {}
        self.hooked: set[str] = set()
        self.captured: set[str] = set()
        self._ztunnel_flags: str | None = None
        self.node_down: set[tuple[str, str]] = set()
        self.git: Any = None
        self.pushes: list[dict[str, Any]] = []
        self.portal: Any = None
        self.ports: dict[str, int] = {}
        self.ports_note = "api-<cluster>, git, controller-http: same port on the host loopback (portal)"
        self.features: dict[str, str] = {}
        self.logs = state_dir / "logs"

    # --- bring-up ---------------------------------------------------------------------------------

    def _step(self, name: str, t0: float) -> float:
        now = time.monotonic()
        self.timings[name] = round(now - t0, 4)
        return now

    def bring_up(self) -> None:
        t = t_start = time.monotonic()
        self.logs.mkdir(exist_ok=True)
        sandbox.prepare_mounts()
        os.makedirs(RUN_DIR, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "meshfed-run", RUN_DIR], check=True)
        t = self._step("1_mounts_s", t)
        execute(self.plan.actions)
        t = self._step("2_network_s", t)
        for c in self.plan.clusters:
            for p in c.pods:
                d = Path("/etc/netns") / p.netns
                d.mkdir(parents=True, exist_ok=True)
                (d / "hosts").write_text(self.plan.hosts[(c.name, p.namespace)])
        t = self._step("3_hosts_s", t)
        self._start_portal()
        self._start_apis()
        t = self._step("4_api_servers_s", t)
        for c in self.plan.clusters:
            for p in c.pods:
                self._add_pod(p).start()
        t = self._step("5_pods_s", t)
        self._start_kubelets()
        t = self._step("6_kubelets_s", t)
        self._start_git()
        t = self._step("7_git_s", t)
        self._start_data_plane()
        t = self._step("8_ztunnels_s", t)
        self._start_controller()
        t = self._step("9_controller_s", t)
        self._wait_ready(timeout_s=float(self.meta.get("ready_timeout_s", 30.0)))
        self._step("10_pods_ready_s", t)
        self.timings["total_s"] = round(time.monotonic() - t_start, 4)

    def _start_portal(self) -> None:
        fd_s = os.environ.get(sandbox.HOST_NETNS_FD_ENV)
        if not fd_s or not self.meta.get("portal", True):
            self.features["portal"] = "disabled"
            return
        try:
            from clusters.lab.portal import Portal

            portal = Portal(int(fd_s))
            portal.reserve().close()  # probe: setns into the host namespace is allowed
            self.portal = portal
            self.features["portal"] = "host loopback"
        except OSError as e:
            self.features["portal"] = f"unavailable: {e}"

    def _door(self, name: str) -> tuple[socket.socket | None, int]:
        """A host listener (if the portal runs) and the port number both sides will use."""
        if self.portal is None:
            return None, 0
        lst: socket.socket = self.portal.reserve()
        return lst, int(lst.getsockname()[1])

    def _start_apis(self) -> None:
        from clusters.lab.apiserver import EmulatedApiServer

        kubeconfig = self.state_dir / KUBECONFIG_FILE
        if kubeconfig.exists():
            kubeconfig.unlink()
        contexts = self.meta.get("contexts", {})
        for c in self.plan.clusters:
            lst, port = self._door(f"api-{c.name}")
            srv = EmulatedApiServer("127.0.0.1", port or None).start()
            self.apis[c.name] = srv
            srv.write_kubeconfig(kubeconfig, contexts.get(c.name, f"lab-{c.name}"))
            self.ports[f"api-{c.name}"] = int(srv.url.rsplit(":", 1)[1])
            if lst is not None:
                self.portal.open_door(lst, ("127.0.0.1", self.ports[f"api-{c.name}"]))

    def _add_pod(self, p: PodPlan) -> ManagedProcess:
        argv = [sys.executable, "-m", "clusters.lab.demo_server", "--cluster", p.cluster, "--namespace",
                p.namespace, "--pod", p.name, "--node", p.node, "--address", p.address, "--port", str(p.port),
                "--behaviour", p.behaviour.value, "--control", self.pod_socket(p)]
        mp = ManagedProcess(f"pod:{p.key}", p.netns, argv, self.logs / f"pod-{p.cluster}.{p.namespace}.{p.name}.log")
        self.procs[mp.key] = mp
        return mp

    @staticmethod
    def pod_socket(p: PodPlan) -> str:
        return f"{RUN_DIR}/{p.cluster}.{p.namespace}.{p.name}.sock"

    def probe_pod(self, p: PodPlan, timeout_s: float = 0.3) -> PodState:
        mp = self.procs.get(f"pod:{p.key}")
        if mp is None or mp.popen is None:
            return PodState(PodPhase.PENDING, False)
        if not mp.alive():
            return PodState(PodPhase.FAILED, False, mp.pid)
        if mp.stopped:
            return PodState(PodPhase.RUNNING, False, mp.pid)
        try:
            code, _ = _unix_http(self.pod_socket(p), "GET", "/healthz", timeout_s)
            ready = code == 200
        except OSError:
            ready = False
        return PodState(PodPhase.RUNNING, ready, mp.pid)

    def _start_kubelets(self) -> None:
        for c in self.plan.clusters:
            def pods(c: ClusterPlan = c) -> dict[str, PodState]:
                return {p.key: self.probe_pod(p) for p in c.pods}

            def nodes(c: ClusterPlan = c) -> dict[str, NodeState]:
                out = {}
                for n in c.nodes:
                    zt = self.procs.get(f"ztunnel:{c.name}/{n.name}")
                    out[n.name] = NodeState((c.name, n.name) not in self.node_down and (zt is None or zt.alive()))
                return out

            k = Kubelet(c, self.apis[c.name], pods, nodes)
            self.kubelets[c.name] = k
            threading.Thread(target=k.run, args=(self.stop, 0.1), name=f"kubelet-{c.name}", daemon=True).start()

    def _start_git(self) -> None:
        fleet = self.meta.get("fleet_dir")
        if not fleet:
            self.features["git"] = "no fleet directory given"
            return
        from clusters.lab.gitserver import GitServer, init_fleet_repo

        bare = self.state_dir / "git" / "fleet.git"
        head = init_fleet_repo(Path(fleet), bare)
        lst, port = self._door("git")
        self.git = GitServer(bare, "127.0.0.1", port, on_push=self._on_push).start()
        if lst is not None:
            self.portal.open_door(lst, ("127.0.0.1", self.git.port))
        self.ports["git"] = self.git.port
        self.features["git"] = f"serving {head[:8]}"

    def _on_push(self, refs: Mapping[str, str]) -> None:
        """A push landed: note it, and ask the controller (if any) to reconcile now."""
        record = {"at_s": time.time(), "refs": dict(refs), "controller_notified": False}
        ctl = self.procs.get("controller")
        if ctl is not None and ctl.alive():
            import urllib.request

            req = urllib.request.Request(f"http://127.0.0.1:{self.ports.get('controller-http', CONTROLLER_HTTP_PORT)}"
                                         "/api/v1/reconcile", data=json.dumps({"refs": dict(refs)}).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=2).close()
                record["controller_notified"] = True
            except OSError as e:
                record["error"] = str(e)
        self.pushes.append(record)

    def _start_data_plane(self) -> None:
        """Node ztunnels and east-west gateways (`python -m ztunnel`), when they have what they need.

        A proxy needs a ProxyConfig and its SVIDs. Either the controller delivers them (when the
        installed ztunnel takes `--controller`), or whoever renders them (the demo, a test, an
        operator) writes `proxies/<id>/config.json` and `proxies/<id>/certs/` in the state directory
        and calls `start-proxies`. Until then the step is skipped and says why.
        """
        want = self.meta.get("ztunnel", "auto")
        if want == "off":
            self.features["ztunnel"] = "off"
            return
        if not _module_available("ztunnel.__main__"):
            self.features["ztunnel"] = "not installed (no ztunnel.__main__)"
            return
        started = self.start_proxies()
        if not started:
            self.features["ztunnel"] = ("waiting for configs: write proxies/<id>/config.json + certs/ "
                                        "then `start-proxies`")

    def proxy_dir(self, proxy_id: str) -> Path:
        return self.state_dir / "proxies" / proxy_id.replace("/", "_")

    def proxy_ids(self) -> list[tuple[str, NetnsName, str]]:
        """(proxy id, namespace, SOCKS address) of every proxy the plan has."""
        out: list[tuple[str, NetnsName, str]] = []
        for c in self.plan.clusters:
            out += [(f"ztunnel/{c.name}/{n.name}", n.netns, n.pod_gateway) for n in c.nodes]
            if c.gateway is not None:
                out.append((f"gateway/{c.name}", c.gateway.netns, ""))
        return out

    def start_proxies(self) -> list[str]:
        """Start every proxy that has a config (or a controller to ask) and is not running yet."""
        base = [sys.executable, "-m", "ztunnel"]
        if self._ztunnel_flags is None:
            self._ztunnel_flags = _help_flags(base)
        flags = self._ztunnel_flags
        controller_mode = "--controller" in flags
        started: list[str] = []
        for proxy_id, netns, socks in self.proxy_ids():
            key = proxy_id.replace("ztunnel/", "ztunnel:", 1).replace("gateway/", "gateway:", 1)
            if key in self.procs and self.procs[key].alive():
                continue
            d = self.proxy_dir(proxy_id)
            cfg = d / "config.json"
            if not cfg.exists() and not controller_mode:
                continue
            (d / "certs").mkdir(parents=True, exist_ok=True)
            cluster = self.plan.cluster(proxy_id.split("/")[1])
            if controller_mode:
                self._write_bootstrap_token(cluster.name, d)
            argv = proxy_argv(base, proxy_id, d, socks, flags, with_config=cfg.exists(),
                              trust_domain=cluster.trust_domain, controller_dir=self.state_dir / CONTROLLER_DIR)
            mp = ManagedProcess(key, netns, argv, self.logs / f"{proxy_id.replace('/', '-')}.log")
            self.procs[key] = mp
            mp.start()
            started.append(proxy_id)
            if proxy_id.startswith("ztunnel/") and netns not in self.captured:
                cl, node = proxy_id.split("/")[1:]
                for rule in capture_rules(self.plan.cluster(cl).node(node)):
                    run_iptables(rule.netns, rule.args)
                self.captured.add(netns)
        if started:
            self.features["ztunnel"] = f"running ({len(started)} started last)"
        return started

    def reload_proxies(self) -> list[str]:
        """SIGHUP every running proxy: it re-reads its --config (standalone mode)."""
        done = []
        for key, mp in self.procs.items():
            if key.startswith(("ztunnel:", "gateway:")) and mp.alive():
                mp.signal(signal.SIGHUP)
                done.append(key)
        return done

    def _bootstrap_tokens(self) -> dict[str, str]:
        """One bootstrap token per cluster, in the controller's state directory (0600), created
        before any proxy starts; the controller keeps the tokens it finds there."""
        d = self.state_dir / CONTROLLER_DIR
        d.mkdir(mode=0o700, exist_ok=True)
        path = d / BOOTSTRAP_TOKENS_FILE
        tokens: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        missing = [c.name for c in self.plan.clusters if c.name not in tokens]
        if missing:
            import secrets

            tokens.update({c: secrets.token_urlsafe(24) for c in missing})
            fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(tokens, f, indent=1, sort_keys=True)
            os.replace(path.with_suffix(".tmp"), path)
        return tokens

    def _write_bootstrap_token(self, cluster: str, proxy_dir: Path) -> None:
        fd = os.open(proxy_dir / "bootstrap-token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._bootstrap_tokens()[cluster] + "\n")

    def _start_controller(self) -> None:
        want = self.meta.get("controller", "auto")
        base = [sys.executable, "-m", "federation.cli.main"]
        if want == "off":
            self.features["controller"] = "off"
            return
        if not _module_available("federation.ray.actors") or "run" not in _help_flags([*base, "controller"]):
            self.features["controller"] = "not installed (no `meshfed controller run`)"
            return
        flags = _help_flags([*base, "controller", "run"])
        repo = self.git.url if self.git else str(self.meta.get("fleet_dir", ""))
        opts = {"--repo": repo, "--fleet": repo,
                "--bootstrap-listen": f"0.0.0.0:{CONTROLLER_BOOTSTRAP_PORT}",
                "--kubeconfig": str(self.state_dir / KUBECONFIG_FILE),
                "--state-dir": str(self.state_dir / CONTROLLER_DIR),
                "--grpc-listen": f"0.0.0.0:{CONTROLLER_GRPC_PORT}",
                "--listen": f"0.0.0.0:{CONTROLLER_GRPC_PORT}",
                "--http-listen": f"0.0.0.0:{CONTROLLER_HTTP_PORT}",
                "--status-listen": f"0.0.0.0:{CONTROLLER_HTTP_PORT}"}
        argv = [*base, "controller", "run"]
        for flag, value in opts.items():
            if flag in flags:
                argv += [flag, value]
        mp = ManagedProcess("controller", ROOT_NS, argv, self.logs / "controller.log")
        self.procs[mp.key] = mp
        mp.start()
        self.ports["controller-http"] = CONTROLLER_HTTP_PORT
        lst, _ = self._door("controller")
        if lst is not None:
            self.ports["controller-http-host"] = self.portal.open_door(lst, ("127.0.0.1", CONTROLLER_HTTP_PORT))
        self.features["controller"] = "running"

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = [p for c in self.plan.clusters for p in c.pods]
        while pending and time.monotonic() < deadline:
            pending = [p for p in pending if not self.probe_pod(p, 0.5).ready]
            if pending:
                time.sleep(0.02)
        if pending:
            names = ", ".join(p.key for p in pending[:5])
            raise LabError(f"pods not ready after {timeout_s:.0f} s: {names}; see {self.logs}")
        # Ready means the API says so too: wait for each kubelet to have written every object once
        # after the pods became ready.
        marks = {n: k.passes for n, k in self.kubelets.items()}
        while time.monotonic() < deadline and any(k.passes < marks[n] + 2 for n, k in self.kubelets.items()):
            time.sleep(0.02)

    # --- description ------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        clusters = []
        contexts = self.meta.get("contexts", {})
        for c in self.plan.clusters:
            clusters.append({
                "name": c.name, "network": c.network, "trust_domain": c.trust_domain, "bridge": c.bridge,
                "pod_cidr": c.pod_cidr, "node_cidr": c.node_cidr, "service_cidr": c.service_cidr,
                "context": contexts.get(c.name, f"lab-{c.name}"),
                "api_url": self.apis[c.name].url if c.name in self.apis else "",
                "gateway": None if c.gateway is None else {
                    **asdict(c.gateway), "pid": self._pid(f"gateway:{c.name}")},
                "nodes": [{**asdict(n), "ready": (c.name, n.name) not in self.node_down,
                           "ztunnel_pid": self._pid(f"ztunnel:{c.name}/{n.name}")} for n in c.nodes],
                "pods": [{"name": p.name, "namespace": p.namespace, "node": p.node, "netns": p.netns,
                          "address": p.address, "service": p.service, "service_account": p.service_account,
                          "role": p.role, "port": p.port, "pid": self._pid(f"pod:{p.key}"),
                          "state": self._proc_state(f"pod:{p.key}")} for p in c.pods],
                "services": [asdict(v) for v in c.services],
            })
        return {
            "phase": "Ready", "supervisor_pid": os.getpid(), "state_dir": str(self.state_dir),
            "kubeconfig": str(self.state_dir / KUBECONFIG_FILE),
            "git_url": self.git.url if self.git else "", "git_pushes": self.pushes,
            "controller": {"grpc": f"{CONTROLLER_MGMT_ADDRESS}:{CONTROLLER_GRPC_PORT}",
                           "pid": self._pid("controller"), "state": self._proc_state("controller")},
            "wan_cidr": self.plan.wan_cidr, "mgmt_cidr": self.plan.mgmt_cidr,
            "netns": list(self.plan.netns_names), "ports": self.ports, "features": self.features,
            "timings": self.timings, "faults": [asdict(r) for r, _ in self.faults],
            "clusters": clusters,
        }

    def _pid(self, key: str) -> int | None:
        mp = self.procs.get(key)
        return mp.pid if mp is not None and mp.alive() else None

    def _proc_state(self, key: str) -> str:
        mp = self.procs.get(key)
        if mp is None:
            return "absent"
        if not mp.alive():
            return "dead"
        return "stopped" if mp.stopped else "running"

    def write_state(self, phase: str = "Ready", error: str = "") -> None:
        data = self.describe() if phase == "Ready" else {"phase": phase, "error": error, "timings": self.timings,
                                                          "netns": list(self.plan.netns_names)}
        tmp = self.state_dir / (sandbox.STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.state_dir / sandbox.STATE_FILE)

    # --- faults -----------------------------------------------------------------------------------

    def apply_fault(self, req: F.FaultRequest) -> list[str]:
        steps = F.plan_fault(self.plan, req)
        done: list[str] = []
        for st in steps:
            if isinstance(st, F.Signal):
                self._signal(st)
            elif isinstance(st, F.Rule):
                self._hook(st.netns)
                run_iptables(st.netns, ("-t", st.table, "-A", st.chain, *st.args))
            elif isinstance(st, F.Blackhole):
                _ip(st.netns, "route", "add", "blackhole", st.cidr)
            elif isinstance(st, F.LinkDown):
                _ip(st.netns, "link", "set", st.dev, "down")
            elif isinstance(st, F.Latency):
                self._start_latency(st)
            done.append(repr(st))
        if req.target == "node" and req.kind in ("kill", "stop", "partition", "link-down"):
            self.node_down.add(tuple(req.names[0].split("/", 1)))  # type: ignore[arg-type]
        if req.kind != "cont":
            self.faults.append((req, steps))
        return done

    def _signal(self, st: F.Signal) -> None:
        mp = self.procs.get(st.process)
        if mp is None:
            if st.process.startswith(("ztunnel:", "gateway:", "controller")):
                return  # not running in this lab (module not installed): nothing to signal
            raise F.FaultError(f"no process {st.process} in this lab")
        if st.signal == "KILL":
            mp.signal(signal.SIGKILL)
            mp.killed = True
            if mp.popen is not None:
                mp.popen.wait(2)
        elif st.signal == "STOP":
            mp.signal(signal.SIGSTOP)
            mp.stopped = True
        else:
            mp.signal(signal.SIGCONT)
            mp.stopped = False

    def _hook(self, netns: str) -> None:
        if netns in self.hooked:
            return
        for args in F.hook_chain_rules():
            run_iptables(NetnsName(netns), args)
        self.hooked.add(netns)

    def _start_latency(self, st: F.Latency) -> None:
        port = 15099 + len(self.latency)
        mp = ManagedProcess(f"latency:{st.netns}/{st.destination}", st.netns,
                            [sys.executable, "-m", "clusters.lab.faults", "--port", str(port),
                             "--delay-ms", str(st.delay_ms)], self.logs / "latency.log")
        mp.start()
        time.sleep(0.3)
        self.latency[(st.netns, st.destination)] = mp
        for args in F.latency_rules(st, port):
            run_iptables(st.netns, args)
        self.latency_rules[(st.netns, st.destination)] = F.latency_rules(st, port)

    def heal(self, target: str | None = None, names: Sequence[str] = ()) -> list[str]:
        """Undo faults (all, or those on `target` `names`) and restart what they killed."""
        healed: list[str] = []
        keep: list[tuple[F.FaultRequest, list[F.FaultStep]]] = []
        for req, steps in self.faults:
            if target and (req.target != target or (names and tuple(names) != req.names)):
                keep.append((req, steps))
                continue
            for st in steps:
                try:
                    self._undo(st)
                except Exception as e:  # keep healing the rest; report what failed
                    healed.append(f"could not undo {st!r}: {e}")
            if req.target == "node":
                self.node_down.discard(tuple(req.names[0].split("/", 1)))  # type: ignore[arg-type]
            healed.append(f"{req.kind} {req.target} {' '.join(req.names)}")
        self.faults = keep
        return healed

    def _undo(self, st: F.FaultStep) -> None:
        if isinstance(st, F.Signal):
            mp = self.procs.get(st.process)
            if mp is None:
                return
            if st.signal == "KILL" or not mp.alive():
                if not mp.alive():
                    mp.start()
            elif st.signal == "STOP":
                mp.signal(signal.SIGCONT)
                mp.stopped = False
        elif isinstance(st, F.Rule):
            run_iptables(st.netns, ("-t", st.table, "-D", st.chain, *st.args))
        elif isinstance(st, F.Blackhole):
            _ip(st.netns, "route", "del", "blackhole", st.cidr)
        elif isinstance(st, F.LinkDown):
            _ip(st.netns, "link", "set", st.dev, "up")
        elif isinstance(st, F.Latency):
            mp = self.latency.pop((st.netns, st.destination), None)
            if mp is not None:
                for args in self.latency_rules.pop((st.netns, st.destination), ()):
                    run_iptables(st.netns, [a if a != "-A" else "-D" for a in args])
                mp.terminate()

    # --- control socket ---------------------------------------------------------------------------

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        with self.lock:
            if op == "status":
                return {"ok": True, "lab": self.describe(),
                        "kubelets": {n: {"writes": k.writes, "last_error": k.last_error,
                                         "transitions": k.transitions[-20:]} for n, k in self.kubelets.items()}}
            if op == "fault":
                fr = F.FaultRequest(req["kind"], req["target"], tuple(req.get("names", ())),
                                    req.get("mode", "drop"), float(req.get("delay_ms", 0.0)))
                return {"ok": True, "applied": self.apply_fault(fr)}
            if op == "heal":
                return {"ok": True, "healed": self.heal(req.get("target"), req.get("names", ()))}
            if op == "behaviour":
                p = self.plan.pod(req["cluster"], req["pod"], req.get("namespace"))
                code, body = _unix_http(self.pod_socket(p), "PUT", f"/behaviour/{req['behaviour']}", 2.0)
                return {"ok": code == 200, "error": body, "answer": body}
            if op == "exec":
                ns = self._netns_of(req["where"])
                r = subprocess.run(["ip", "netns", "exec", ns, *req["argv"]] if ns else list(req["argv"]),
                                   capture_output=True, text=True, timeout=float(req.get("timeout_s", 30)),
                                   check=False)
                return {"ok": True, "returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
            if op == "spawn":
                ns = self._netns_of(req["where"])
                mp = ManagedProcess(f"job:{req['name']}", NetnsName(ns), list(req["argv"]),
                                    self.logs / f"job-{req['name']}.log")
                old = self.procs.get(mp.key)
                if old is not None:
                    old.terminate()
                self.procs[mp.key] = mp
                mp.start()
                return {"ok": True, "pid": mp.pid}
            if op == "reap":
                job = self.procs.get(f"job:{req['name']}")
                if job is None:
                    return {"ok": False, "error": f"no job {req['name']}"}
                job.terminate(float(req.get("grace_s", 3.0)))
                return {"ok": True, "returncode": job.popen.returncode if job.popen else None}
            if op == "start-proxies":
                return {"ok": True, "started": self.start_proxies()}
            if op == "reload-proxies":
                return {"ok": True, "reloaded": self.reload_proxies()}
            if op == "proxy-dirs":
                return {"ok": True, "proxies": {pid: str(self.proxy_dir(pid)) for pid, _, _ in self.proxy_ids()}}
            if op == "down":
                self.stop.set()
                return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _netns_of(self, where: str) -> str:
        """`pod:C/NS/NAME`, `node:C/NODE`, `gateway:C`, or `root`."""
        kind, _, rest = where.partition(":")
        if kind == "root":
            return ""
        if kind == "pod":
            c, ns, name = rest.split("/")
            return self.plan.pod(c, name, ns).netns
        if kind == "node":
            c, _, n = rest.partition("/")
            return self.plan.cluster(c).node(n).netns
        if kind == "gateway":
            gw = self.plan.cluster(rest).gateway
            if gw is None:
                raise LabError(f"cluster {rest} has no gateway")
            return gw.netns
        raise LabError(f"where {where!r}: use pod:C/NS/NAME, node:C/NODE, gateway:C or root")

    def serve(self) -> None:
        path = self.state_dir / sandbox.CONTROL_SOCKET
        if path.exists():
            path.unlink()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        os.chmod(path, 0o600)
        srv.listen(16)
        srv.settimeout(0.2)
        last_state = 0.0
        while not self.stop.is_set():
            self._reap_orphans()
            if time.monotonic() - last_state > 1.0:
                with self.lock:
                    self.write_state()
                last_state = time.monotonic()
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()
        srv.close()
        path.unlink(missing_ok=True)

    def _serve_one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            try:
                answer = self.handle(json.loads(data))
            except Exception as e:
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            conn.sendall(json.dumps(answer, default=str).encode())

    def _reap_orphans(self) -> None:
        """PID 1 duty: reap exited processes that are not ours (ours are reaped by Popen)."""
        ours = {mp.pid for mp in self.procs.values() if mp.pid is not None}
        ours |= {mp.pid for mp in self.latency.values() if mp.pid is not None}
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in ours:
                return
            try:
                os.waitpid(info.si_pid, 0)
            except ChildProcessError:
                return

    def shut_down(self) -> None:
        for mp in list(self.latency.values()) + list(self.procs.values()):
            mp.terminate(0.5)
        if self.git is not None:
            self.git.stop()
        for srv in self.apis.values():
            srv.stop(1.0)
        if self.portal is not None:
            self.portal.close()


def _ip(netns: str, *args: str) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def _unix_http(path: str, method: str, url: str, timeout_s: float) -> tuple[int, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(path)
        s.sendall(f"{method} {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


def supervise(state_dir: Path) -> int:
    sup = Supervisor(state_dir)
    signal.signal(signal.SIGTERM, lambda *_: sup.stop.set())
    try:
        sup.bring_up()
    except Exception as e:
        traceback.print_exc()
        sup.write_state("Failed", f"{type(e).__name__}: {e}")
        sup.shut_down()
        return 2
    sup.write_state()
    try:
        sup.serve()
    finally:
        sup.shut_down()
        state = json.loads((state_dir / sandbox.STATE_FILE).read_text())
        state["phase"] = "Down"
        (state_dir / sandbox.STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
    return 0


# --- the host side -----------------------------------------------------------------------------------


@dataclass
class LabOptions:
    state_dir: Path
    ztunnel: str = "auto"       # auto | off
    controller: str = "auto"    # auto | off
    portal: bool = True
    ready_timeout_s: float = 30.0
    up_timeout_s: float = 90.0
    extra: dict[str, Any] = field(default_factory=dict)


class LabRunner:
    """`meshfed lab` verbs. Invariants: at most one lab per state directory; `down()` leaves no
    process of the lab running (it kills the recorded `unshare` if the supervisor does not exit)."""

    def __init__(self, options: LabOptions) -> None:
        self.opts = options
        self.state_dir = options.state_dir.resolve()
        if len(str(self.state_dir / sandbox.CONTROL_SOCKET)) > MAX_SOCKET_PATH:
            raise LabError(f"state directory {self.state_dir} is too long for a Unix socket path; "
                           "use a shorter --state-dir (e.g. /tmp/meshfed-lab)")

    # up --------------------------------------------------------------------------------------------

    def up_from_snapshot(self, snapshot: Any, fleet_dir: Path | None) -> dict[str, Any]:
        plan = plan_lab(snapshot.clusters, snapshot.lab_clusters, snapshot.services)
        contexts = {n: c.api.context for n, c in snapshot.clusters.items()}
        return self.up(plan, fleet_dir, contexts)

    def up(self, plan: LabPlan, fleet_dir: Path | None = None, contexts: Mapping[str, str] | None = None) -> dict[str, Any]:
        sd = self.state_dir
        sd.mkdir(parents=True, exist_ok=True)
        if (sd / sandbox.CONTROL_SOCKET).exists():
            try:
                control_request(sd, {"op": "status"}, 2.0)
                raise LabError(f"a lab is already running in {sd}; `meshfed lab down --state-dir {sd}` first")
            except LabError as e:
                if "already running" in str(e):
                    raise
        sandbox.sweep(sd)
        for stale in (sandbox.STATE_FILE, KUBECONFIG_FILE):
            (sd / stale).unlink(missing_ok=True)
        for stale_dir in (CONTROLLER_DIR, "proxies"):  # a new lab is a new mesh: new CAs, epochs, configs
            if (sd / stale_dir).exists():
                shutil.rmtree(sd / stale_dir)
        (sd / PLAN_FILE).write_bytes(pickle.dumps(plan))
        (sd / "request.json").write_text(json.dumps({
            "fleet_dir": str(fleet_dir.resolve()) if fleet_dir else "", "contexts": dict(contexts or {}),
            "ztunnel": self.opts.ztunnel, "controller": self.opts.controller, "portal": self.opts.portal,
            "ready_timeout_s": self.opts.ready_timeout_s, **self.opts.extra}))
        if fleet_dir is not None and (sd / "git").exists():
            shutil.rmtree(sd / "git")
        t0 = time.monotonic()
        proc = sandbox.spawn(sandbox.python_argv("clusters.lab.supervisor", "supervise", "--state-dir", str(sd)),
                             sd / "lab.log")
        (sd / sandbox.SANDBOX_FILE).write_text(json.dumps({
            "pid": proc.pid, "start_ticks": sandbox.process_start_ticks(proc.pid), "started_at_s": time.time()}))
        deadline = t0 + self.opts.up_timeout_s
        while time.monotonic() < deadline:
            state = self._read_state()
            phase = state.get("phase")
            if phase == "Ready" and (sd / sandbox.CONTROL_SOCKET).exists():
                state["up_wall_s"] = round(time.monotonic() - t0, 3)
                return state
            if phase == "Failed" or proc.poll() is not None:
                self._kill(proc.pid)
                raise LabError(f"the lab failed to start: {state.get('error') or 'the sandbox exited'}\n"
                               f"{_tail(sd / 'lab.log')}")
            time.sleep(0.05)
        self._kill(proc.pid)
        raise LabError(f"the lab did not become ready within {self.opts.up_timeout_s:.0f} s\n{_tail(sd / 'lab.log')}")

    def _read_state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.state_dir / sandbox.STATE_FILE).read_text())
            return data
        except (OSError, ValueError):
            return {}

    def _kill(self, pid: int) -> None:
        box = sandbox._read_json(self.state_dir / sandbox.SANDBOX_FILE)
        ticks = box.get("start_ticks")
        sandbox.kill_sandbox(pid, ticks if isinstance(ticks, int) else None)

    # status / verbs ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "status"})

    def fault(self, kind: str, target: str, names: Sequence[str], mode: str = "drop",
              delay_ms: float = 0.0) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "fault", "kind": kind, "target": target, "names": list(names),
                                                "mode": mode, "delay_ms": delay_ms})

    def heal(self, target: str | None = None, names: Sequence[str] = ()) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "heal", "target": target, "names": list(names)})

    def exec(self, where: str, argv: Sequence[str], timeout_s: float = 30.0) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "exec", "where": where, "argv": list(argv),
                                                "timeout_s": timeout_s}, timeout_s + 5)

    def spawn(self, name: str, where: str, argv: Sequence[str]) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "spawn", "name": name, "where": where, "argv": list(argv)})

    def start_proxies(self) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "start-proxies"}, 60.0)

    def reload_proxies(self) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "reload-proxies"})

    def reap(self, name: str) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "reap", "name": name})

    def behaviour(self, cluster: str, pod: str, behaviour: str, namespace: str | None = None) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "behaviour", "cluster": cluster, "pod": pod,
                                                "namespace": namespace, "behaviour": behaviour})

    def down(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Stop the lab; afterwards no process, namespace or link of it remains."""
        box = sandbox._read_json(self.state_dir / sandbox.SANDBOX_FILE)
        pid, ticks = box.get("pid"), box.get("start_ticks")
        asked = False
        try:
            control_request(self.state_dir, {"op": "down"}, 5.0)
            asked = True
        except LabError:
            pass
        gone = True
        if isinstance(pid, int):
            t_ticks = ticks if isinstance(ticks, int) else None
            deadline = time.monotonic() + (timeout_s if asked else 0.0)
            while time.monotonic() < deadline and sandbox.is_same_process(pid, t_ticks) \
                    and not sandbox._is_zombie(pid):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                except ChildProcessError:
                    pass
                time.sleep(0.05)
            gone = sandbox.kill_sandbox(pid, t_ticks)
        report = sandbox.sweep(self.state_dir)
        return {"ok": gone, "graceful": asked, "sandbox_pid": pid, "swept": asdict(report)}


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m clusters.lab.supervisor")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("supervise", help="run the lab (inside the sandbox; started by `meshfed lab up`)")
    s.add_argument("--state-dir", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "supervise":
        if os.getpid() != 1:
            print("supervise runs as PID 1 of the lab sandbox; use `meshfed lab up`", file=sys.stderr)
            sys.exit(64)
        sys.exit(supervise(Path(a.state_dir)))


if __name__ == "__main__":
    main()
