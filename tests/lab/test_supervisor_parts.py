"""The supervisor's parts on their own, with real sockets, processes and namespaces (root).

- the control socket answers each request on its own thread: a request stuck in its handler does
  not delay the next one; malformed and oversized requests get an error, not a hang;
- PID 1 (`processes.run_as_init`) reaps the sandbox's orphans while the supervisor's own
  `subprocess` calls keep their exit statuses (a reaper in the same process would steal them:
  `false` would report 0), and passes the supervisor's exit status on;
- a proxy's credential is its pod's projected ServiceAccount token, which the lab's kubelet
  requests from the cluster's emulated API server (TokenRequest over HTTP) and writes 0600 without
  following a planted symlink; that server's TokenReview then vouches for the pod and its node.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from clusters.lab import sandbox
from clusters.lab.control import MAX_REQUEST_BYTES, ControlServer, control_request
from clusters.lab.layout import LabError
from clusters.lab.processes import ProcessTable
from clusters.lab.proxies import DataPlane
from clusters.lab.topology import plan_lab
from tests.unit.lab.fleet_fixture import fleet

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path: Path) -> Any:
    release = threading.Event()
    entered = threading.Event()

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        if req.get("op") == "slow":
            entered.set()
            release.wait(30)
        if req.get("op") == "refuse":
            raise LabError("refused: because")
        return {"ok": True, "op": req.get("op")}

    stop = threading.Event()
    srv = ControlServer(tmp_path / sandbox.CONTROL_SOCKET, handler)
    srv.bind()
    t = threading.Thread(target=srv.serve, args=(stop,))
    t.start()
    yield tmp_path, release, entered
    release.set()
    stop.set()
    t.join(5)
    assert not (tmp_path / sandbox.CONTROL_SOCKET).exists()


def test_a_stuck_request_does_not_delay_the_next(server: Any) -> None:
    state_dir, release, entered = server
    slow: dict[str, Any] = {}
    t = threading.Thread(target=lambda: slow.update(control_request(state_dir, {"op": "slow"}, 30)))
    t.start()
    assert entered.wait(5)
    t0 = time.monotonic()
    for _ in range(5):
        assert control_request(state_dir, {"op": "status"}, 5)["op"] == "status"
    took_s = time.monotonic() - t0
    assert t.is_alive() and took_s < 1.0, took_s
    release.set()
    t.join(5)
    assert slow["op"] == "slow"


def test_errors_are_answers(server: Any) -> None:
    state_dir, _, _ = server
    with pytest.raises(LabError, match="refused: because"):
        control_request(state_dir, {"op": "refuse"})
    path = str(state_dir / sandbox.CONTROL_SOCKET)
    for payload, expect in ((b"{not json", "bad request"), (b"[1]", "a request is a JSON object"),
                            (b" " * (MAX_REQUEST_BYTES + 10), f"more than {MAX_REQUEST_BYTES} bytes")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server may stop reading an oversized request early
            answer = json.loads(s.recv(65536))
        assert answer["ok"] is False and expect in answer["error"], answer
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


INIT_SCRIPT = r"""
import json, os, subprocess, sys, threading, time
from clusters.lab.processes import run_as_init

def main():
    wrong = []
    def orphans():  # each sh leaves a child behind that outlives it: PID 1 inherits it
        for _ in range(60):
            subprocess.run(["sh", "-c", "sleep 0.01 & exit 0"], check=False)
    def statuses():
        for _ in range(300):
            if subprocess.run(["false"], check=False).returncode != 1:
                wrong.append(1)
    ts = [threading.Thread(target=orphans) for _ in range(2)] + [threading.Thread(target=statuses)]
    for t in ts: t.start()
    for t in ts: t.join()
    time.sleep(0.5)
    zombies = [p for p in os.listdir("/proc") if p.isdigit()
               and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"]
    print(json.dumps({"wrong_statuses": len(wrong), "zombies": zombies, "pid": os.getpid()}), flush=True)
    return 7

sys.exit(run_as_init(main))
"""


def test_pid_1_reaps_orphans_without_stealing_the_supervisors_exit_statuses() -> None:
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", INIT_SCRIPT],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 7, r.stderr  # the supervisor's status, passed on by init
    out = json.loads(r.stdout)
    assert out["pid"] != 1            # the supervisor is init's child
    assert out["wrong_statuses"] == 0
    assert out["zombies"] == []


def test_a_proxys_projected_token_comes_from_its_clusters_api_and_is_written_safely(tmp_path: Path) -> None:
    from clusters.kube.auth import TokenReviewer
    from clusters.lab.apiserver import EmulatedApiServer
    from clusters.lab.kubelet import Kubelet, NodeState, TokenProjector, proxy_volumes

    clusters, labs, services = fleet(1, 1)
    plan = plan_lab(clusters, labs, services)
    plane = DataPlane(tmp_path, plan, ProcessTable(), tmp_path, with_controller=True)
    spec = next(s for s in plane.specs if s.proxy_id == "ztunnel/east/node-1")
    d = Path(plane.dirs()[spec.proxy_id])
    d.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("do not overwrite\n")
    (d / "sa-token").symlink_to(victim)  # planted: a writer that follows links would clobber victim
    east = plan.clusters[0]
    with EmulatedApiServer() as api:
        kubelet = Kubelet(east, api, lambda: {}, lambda: {n.name: NodeState(True) for n in east.nodes},
                          TokenProjector(api, proxy_volumes(east, plane.token_path)))
        kubelet.sync()   # the proxy pods first, then their tokens
        token_file = plane.token_path(spec.proxy_id)
        assert token_file == d / "sa-token"
        st = os.lstat(token_file)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert victim.read_text() == "do not overwrite\n"
        # the token is the cluster's, for the controller, bound to the proxy's pod on its node
        api.write_kubeconfig(tmp_path / "kubeconfig", "lab-east")
        review = TokenReviewer("east", str(tmp_path / "kubeconfig"), "lab-east").review(
            token_file.read_text().strip(), ["meshfed-controller"])
        assert review.authenticated and review.username == "system:serviceaccount:meshfed-system:ztunnel"
        assert review.extra["authentication.kubernetes.io/node-name"] == ("node-1",)
        assert review.extra["authentication.kubernetes.io/pod-name"] == ("ztunnel-node-1",)
    # and nothing of the controller's was written: there is no shared bootstrap secret any more
    assert not (tmp_path / "controller").exists()
