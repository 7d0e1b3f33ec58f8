"""The lab's pods (demo servers) as the supervisor sees them: control socket, health, behaviour.

Each demo server listens on a Unix socket in the sandbox-private RUN_DIR besides its pod address;
the supervisor probes `/healthz` there (what the kubelets report as readiness) and switches the
server's behaviour there, without entering the pod's network namespace.
"""

from __future__ import annotations

import os
import socket

from clusters.lab.commands import ready_file
from clusters.lab.kubelet import PodPhase, PodState
from clusters.lab.layout import RUN_DIR
from clusters.lab.processes import ProcessTable
from clusters.lab.topology import PodPlan

MAX_ANSWER_BYTES = 1 << 20


def pod_key(p: PodPlan) -> str:
    """The process-table key of a pod's process: a proxy pod's is its proxy's (`waypoint:east/shop/waypoint`)."""
    if p.is_proxy:
        kind, _, rest = p.proxy_id.partition("/")
        return f"{kind}:{rest}"
    return f"pod:{p.key}"


def pod_socket(p: PodPlan) -> str:
    return f"{RUN_DIR}/{p.cluster}.{p.namespace}.{p.name}.sock"


def probe_pod(procs: ProcessTable, p: PodPlan, timeout_s: float = 0.3) -> PodState:
    mp = procs.get(pod_key(p))
    if mp is None or mp.popen is None:
        return PodState(PodPhase.PENDING, False)
    if not mp.alive():
        return PodState(PodPhase.FAILED, False, mp.pid)
    if mp.stopped:
        return PodState(PodPhase.RUNNING, False, mp.pid)
    if p.is_proxy:  # a waypoint or ingress proxy: ready once it serves (it writes its ready file)
        return PodState(PodPhase.RUNNING, os.path.exists(ready_file(p.proxy_id)), mp.pid)
    try:
        code, _ = unix_http(pod_socket(p), "GET", "/healthz", timeout_s)
        ready = code == 200
    except (OSError, ValueError, IndexError):
        ready = False
    return PodState(PodPhase.RUNNING, ready, mp.pid)


def set_behaviour(p: PodPlan, behaviour: str, timeout_s: float = 2.0) -> tuple[int, str]:
    return unix_http(pod_socket(p), "PUT", f"/behaviour/{behaviour}", timeout_s)


def unix_http(path: str, method: str, url: str, timeout_s: float) -> tuple[int, str]:
    """One HTTP/1.1 request over a Unix socket: (status, body)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(path)
        s.sendall(f"{method} {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while len(data) <= MAX_ANSWER_BYTES and (chunk := s.recv(65536)):
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        # a pod dying mid-answer closes the socket with nothing (or half a status line) sent: that
        # is "not ready", not a crash of whoever asked (the kubelet's probe thread)
        raise ConnectionError(f"no HTTP answer on {path} ({len(data)} bytes)")
    return int(parts[1]), body.decode(errors="replace")
