"""Bring-up: the lab's numbered steps, inside the sandbox, each timed (see `timings` in lab.json).

     1 private mounts (/run/netns, /etc/netns, RUN_DIR)     6 kubelets (the API follows the processes;
                                                              proxies' projected ServiceAccount tokens)
     2 the network (`topology.execute` of the plan)         7 Git server for the fleet repo
     3 resolv.conf per pod (kubelet's)                      8 node ztunnels and gateways
     4 one emulated API server per cluster + kubeconfig     9 the controller
       (and the host portal's doors to them)               10 wait until every pod is ready, and the
     5 pods (demo servers; waypoint and ingress pods are     API says so
       proxies, started in 8)
A step that fails raises: the supervisor reports phase Failed with the error and shuts down what
the steps before it started (`LabServices.stop` and the process table).

Nothing here restarts a process on its own: a killed process stays dead until `heal`, that is the
fault. What the lab starts is decided by the request (`--no-ztunnel`, `--no-controller`) and the
plan, never by probing what the installed commands accept.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusters.lab import sandbox
from clusters.lab.commands import controller_argv, pod_argv
from clusters.lab.kubelet import Kubelet, NodeState, PodState, TokenProjector, proxy_volumes
from clusters.lab.layout import (
    CONTROLLER_DIR,
    CONTROLLER_HTTP_PORT,
    GIT_CREDENTIALS_FILE,
    GIT_DIR,
    KUBECONFIG_FILE,
    RUN_DIR,
    STATUS_API_TOKEN_FILE,
    LabError,
)
from clusters.lab.pods import pod_key, pod_socket, probe_pod
from clusters.lab.processes import ManagedProcess, ProcessTable
from clusters.lab.proxies import DataPlane
from clusters.lab.topology import ROOT_NS, ClusterPlan, LabPlan, execute
from ztunnel.api.secret_files import write_secret

if TYPE_CHECKING:  # heavy (kmock, dulwich): imported by the steps that need them
    from clusters.lab.apiserver import EmulatedApiServer
    from clusters.lab.gitserver import GitServer
    from clusters.lab.portal import Portal

KUBELET_INTERVAL_S = 0.1
MAX_PUSH_RECORDS = 100

log = logging.getLogger(__name__)

# What each step builds, as `meshfed lab up` prints it (keys are the `timings` names in lab.json)
STEP_TITLES = {
    "1_mounts_s": "private mounts", "2_network_s": "network", "3_resolv_conf_s": "resolv.conf per pod",
    "4_api_servers_s": "emulated API servers", "5_pods_s": "pods", "6_kubelets_s": "kubelets",
    "7_git_s": "Git server", "8_ztunnels_s": "node ztunnels and gateways", "9_controller_s": "controller",
    "10_pods_ready_s": "pods ready",
}
StepCallback = Callable[[str, float, str], None]   # (timings key, seconds, what it built)


def notify_controller(url: str, token_file: Path, refs: Mapping[str, str], timeout_s: float = 2.0) -> dict[str, Any]:
    """`POST /api/v1/reconcile` with the controller's bearer token (the file it wrote in its state
    directory): {"controller_notified": True}, or False and the error."""
    from ztunnel.api.secret_files import read_secret

    try:
        token = read_secret(token_file, max_bytes=4096).decode("ascii", "replace").strip()
    except OSError as e:
        return {"controller_notified": False, "error": f"no status API token to notify the controller with: {e}"}
    req = urllib.request.Request(url.rstrip("/") + "/api/v1/reconcile", data=json.dumps({"refs": dict(refs)}).encode(),
                                 method="POST", headers={"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {token}"})
    try:
        urllib.request.urlopen(req, timeout=timeout_s).close()
    except OSError as e:
        return {"controller_notified": False, "error": str(e)}
    return {"controller_notified": True}


@dataclass
class LabServices:
    """What bring-up started besides processes (which live in the ProcessTable)."""

    portal: Portal | None = None
    apis: dict[str, EmulatedApiServer] = field(default_factory=dict)
    kubelets: dict[str, Kubelet] = field(default_factory=dict)
    git: GitServer | None = None
    pushes: list[dict[str, Any]] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def stop(self) -> None:
        if self.git is not None:
            self.git.stop()
        for srv in self.apis.values():
            srv.stop(1.0)
        if self.portal is not None:
            self.portal.close()


class BringUp:
    def __init__(self, state_dir: Path, plan: LabPlan, request: Mapping[str, Any], procs: ProcessTable,
                 data_plane: DataPlane, node_is_down: Callable[[str, str], bool], stop: threading.Event,
                 on_step: StepCallback | None = None) -> None:
        self.on_step = on_step
        self.state_dir = state_dir
        self.plan = plan
        self.request = request
        self.procs = procs
        self.data_plane = data_plane
        self.node_is_down = node_is_down
        self.stop = stop
        self.log_dir = state_dir / "logs"
        self.services = LabServices()

    def run(self) -> LabServices:
        timings = self.services.timings
        t = t_start = time.monotonic()

        def step(name: str) -> None:
            nonlocal t
            now = time.monotonic()
            timings[name] = round(now - t, 4)
            t = now
            detail = self.describe_step(name)
            log.info("bring-up %s: %s (%.2f s)", STEP_TITLES.get(name, name), detail, timings[name])
            if self.on_step is not None:
                self.on_step(name, timings[name], detail)

        self._mounts()
        step("1_mounts_s")
        execute(self.plan.actions)
        step("2_network_s")
        self._resolv_confs()
        step("3_resolv_conf_s")
        self._portal()
        self._api_servers()
        step("4_api_servers_s")
        self._pods()
        step("5_pods_s")
        self._kubelets()
        step("6_kubelets_s")
        self._git()
        step("7_git_s")
        self._data_plane()
        step("8_ztunnels_s")
        self._controller()
        step("9_controller_s")
        self._wait_ready(float(self.request.get("ready_timeout_s", 30.0)))
        step("10_pods_ready_s")
        timings["total_s"] = round(time.monotonic() - t_start, 4)
        return self.services

    def describe_step(self, name: str) -> str:
        """What step `name` built, in a few words (for the progress lines and the log)."""
        plan, features = self.plan, self.services.features
        pods = sum(len(c.pods) for c in plan.clusters)
        nodes = sum(len(c.nodes) for c in plan.clusters)
        return {
            "1_mounts_s": "/run/netns, /etc/netns and a tmpfs for pod sockets",
            "2_network_s": f"{len(plan.clusters)} clusters, {nodes} nodes, {len(plan.netns_names)} namespaces",
            "3_resolv_conf_s": f"{pods} pods",
            "4_api_servers_s": f"{len(self.services.apis)} servers, kubeconfig contexts "
                               + ", ".join(str(c) for c in self.request.get("contexts", {}).values()),
            "5_pods_s": f"{pods} demo processes started",
            "6_kubelets_s": f"{len(self.services.kubelets)} kubelets writing Nodes, Pods, EndpointSlices",
            "7_git_s": features.get("git", ""),
            "8_ztunnels_s": features.get("ztunnel", ""),
            "9_controller_s": features.get("controller", ""),
            "10_pods_ready_s": f"{pods} pods ready and the API says so",
        }.get(name, "")

    # --- 1-5 ---------------------------------------------------------------------------------------

    def _mounts(self) -> None:
        self.log_dir.mkdir(exist_ok=True)
        sandbox.prepare_mounts()
        os.makedirs(RUN_DIR, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "meshfed-run", RUN_DIR], check=True)

    def _resolv_confs(self) -> None:
        """Each pod's /etc/resolv.conf, as kubelet writes it (`ip netns exec` binds
        /etc/netns/<ns>/resolv.conf over /etc/resolv.conf): names go to the cluster DNS address,
        which the node captures for its ztunnel's DNS responder. No hosts files."""
        for c in self.plan.clusters:
            for p in c.pods:
                d = Path("/etc/netns") / p.netns
                d.mkdir(parents=True, exist_ok=True)
                (d / "resolv.conf").write_text(self.plan.resolv_confs[(c.name, p.namespace)])

    def _portal(self) -> None:
        fd_s = os.environ.get(sandbox.HOST_NETNS_FD_ENV)
        if not fd_s or not self.request.get("portal", True):
            self.services.features["portal"] = "disabled"
            return
        from clusters.lab.portal import Portal

        try:
            portal = Portal(int(fd_s))
            portal.reserve().close()  # probe: setns into the host namespace is allowed
        except OSError as e:
            self.services.features["portal"] = f"unavailable: {e}"
            return
        self.services.portal = portal
        self.services.features["portal"] = "host loopback"

    def _door(self) -> tuple[socket.socket | None, int]:
        """A listener on the host loopback (when the portal runs) and its port: the service inside
        takes the same port, so one URL works on both sides. Reserved first, so nothing on the
        host can take the port in between."""
        if self.services.portal is None:
            return None, 0
        listener = self.services.portal.reserve()
        return listener, int(listener.getsockname()[1])

    def _api_servers(self) -> None:
        from clusters.lab.apiserver import EmulatedApiServer, merge_kubeconfig

        contexts = self.request.get("contexts", {})
        doc: dict[str, Any] = {}
        for c in self.plan.clusters:
            listener, port = self._door()
            srv = EmulatedApiServer("127.0.0.1", port or None).start()
            self.services.apis[c.name] = srv
            self.services.ports[f"api-{c.name}"] = int(srv.url.rsplit(":", 1)[1])
            if listener is not None and self.services.portal is not None:
                self.services.portal.open_door(listener, ("127.0.0.1", self.services.ports[f"api-{c.name}"]))
            doc = merge_kubeconfig(doc, srv.kubeconfig(contexts.get(c.name, f"lab-{c.name}")))
        write_secret(self.state_dir / KUBECONFIG_FILE, json.dumps(doc, indent=1).encode())

    def _pods(self) -> None:
        for c in self.plan.clusters:
            for p in c.pods:
                if p.is_proxy:
                    continue  # waypoints and ingress gateways are proxies: the data plane starts them (8)
                mp = ManagedProcess(pod_key(p), p.netns, pod_argv([sys.executable], p, pod_socket(p)),
                                    self.log_dir / f"pod-{p.cluster}.{p.namespace}.{p.name}.log")
                self.procs.put(mp)
                mp.start()

    # --- 6-7 ---------------------------------------------------------------------------------------

    def _kubelets(self) -> None:
        for c in self.plan.clusters:
            def pods(c: ClusterPlan = c) -> dict[str, PodState]:
                return {p.key: probe_pod(self.procs, p) for p in c.pods}

            def nodes(c: ClusterPlan = c) -> dict[str, NodeState]:
                out = {}
                for n in c.nodes:
                    zt = self.procs.get(f"ztunnel:{c.name}/{n.name}")
                    out[n.name] = NodeState(not self.node_is_down(c.name, n.name) and (zt is None or zt.alive()))
                return out

            api = self.services.apis[c.name]
            tokens = TokenProjector(api, proxy_volumes(c, self.data_plane.token_path))
            k = Kubelet(c, api, pods, nodes, tokens)
            self.services.kubelets[c.name] = k
            threading.Thread(target=k.run, args=(self.stop, KUBELET_INTERVAL_S), name=f"kubelet-{c.name}",
                             daemon=True).start()

    def _git(self) -> None:
        fleet = self.request.get("fleet_dir")
        if not fleet:
            self.services.features["git"] = "no fleet directory given"
            return
        from clusters.lab.gitserver import GitServer, init_fleet_repo, new_credentials, write_credentials

        bare = self.state_dir / GIT_DIR / "fleet.git"
        head = init_fleet_repo(Path(fleet), bare)
        listener, port = self._door()
        credentials = new_credentials()   # a new lab, new credentials: pushes need them (lab.json names the file)
        git = GitServer(bare, "127.0.0.1", port, on_push=self._on_push, credentials=credentials).start()
        write_credentials(self.git_credentials_file, git.url, credentials)
        self.services.git = git
        self.services.ports["git"] = git.port
        if listener is not None and self.services.portal is not None:
            self.services.portal.open_door(listener, ("127.0.0.1", git.port))
        self.services.features["git"] = f"serving {head[:8]}"

    def _on_push(self, refs: Mapping[str, str]) -> None:
        """A push landed: note it, and ask the controller (if any) to reconcile now."""
        record: dict[str, Any] = {"at_s": time.time(), "refs": dict(refs), "controller_notified": False}
        ctl = self.procs.get("controller")
        if ctl is not None and ctl.alive():
            record.update(notify_controller(f"http://127.0.0.1:{CONTROLLER_HTTP_PORT}",
                                            self.state_dir / CONTROLLER_DIR / STATUS_API_TOKEN_FILE, refs))
        pushes = self.services.pushes
        pushes.append(record)
        del pushes[:-MAX_PUSH_RECORDS]

    # --- 8-10 --------------------------------------------------------------------------------------

    def _data_plane(self) -> None:
        if self.request.get("ztunnel", "auto") == "off":
            self.services.features["ztunnel"] = "off"
            return
        started = self.data_plane.start()
        self.services.features["ztunnel"] = (
            f"running ({len(started)} started)" if started else
            "waiting for configs: write proxies/<id>/config.json + certs/ then `start-proxies`")

    @property
    def git_credentials_file(self) -> Path:
        return self.state_dir / GIT_DIR / GIT_CREDENTIALS_FILE

    def repo(self) -> str:
        """What the controller follows: the lab's Git server, else the fleet directory."""
        return self.services.git.url if self.services.git is not None else str(self.request.get("fleet_dir") or "")

    def _controller(self) -> None:
        if self.request.get("controller", "auto") == "off":
            self.services.features["controller"] = "off"
            return
        repo = self.repo()
        if not repo:
            self.services.features["controller"] = "not started: no fleet repo (lab up --fleet DIR)"
            return
        argv = controller_argv([sys.executable], repo, self.state_dir / CONTROLLER_DIR,
                               self.state_dir / KUBECONFIG_FILE)
        mp = ManagedProcess("controller", ROOT_NS, argv, self.log_dir / "controller.log")
        self.procs.put(mp)
        mp.start()
        self.services.ports["controller-http"] = CONTROLLER_HTTP_PORT
        listener, _ = self._door()  # any free host port: 15014 may be taken on the host
        if listener is not None and self.services.portal is not None:
            self.services.ports["controller-http-host"] = self.services.portal.open_door(
                listener, ("127.0.0.1", CONTROLLER_HTTP_PORT))
        self.services.features["controller"] = "running"

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = [p for c in self.plan.clusters for p in c.pods if not p.is_proxy]  # proxies wait for config
        while pending and time.monotonic() < deadline:
            pending = [p for p in pending if not probe_pod(self.procs, p, 0.5).ready]
            if pending:
                time.sleep(0.02)
        if pending:
            names = ", ".join(p.key for p in pending[:5])
            raise LabError(f"pods not ready after {timeout_s:.0f} s: {names}; see {self.log_dir}")
        # Ready means the API says so too: wait for each kubelet to have written every object once
        # after the pods became ready.
        kubelets = self.services.kubelets
        marks = {n: k.passes for n, k in kubelets.items()}
        while time.monotonic() < deadline and any(k.passes < marks[n] + 2 for n, k in kubelets.items()):
            time.sleep(0.02)
