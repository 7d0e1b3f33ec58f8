"""The host side of the lab: `LabRunner` behind every `meshfed lab` verb (and the demo and tests).

`up()` computes nothing itself: it stores the plan (pure, from the fleet's Cluster/LabCluster/
GlobalService objects) and the request in the state directory, starts the sandbox
(`clusters.lab.sandbox`, which runs `python -m clusters.lab.supervisor supervise` as its PID 1) and
waits for the supervisor to write phase Ready in `lab.json`. After that:

- status, faults, heal, behaviour, spawn/reap, start/reload proxies and down are requests on the
  control socket (`clusters.lab.control`), answered by the supervisor;
- exec enters the sandbox's namespaces from here (`clusters.lab.nsexec`): streams of any length
  never go through the supervisor.

`sandbox.json` (written here) names the `unshare` process that owns the lab; `down()` asks the
supervisor to stop and kills that process if it does not, then sweeps what is left.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clusters.lab import nsexec, sandbox
from clusters.lab.control import control_request
from clusters.lab.layout import (
    CONTROLLER_DIR,
    KUBECONFIG_FILE,
    MAX_SOCKET_PATH,
    PLAN_FILE,
    PROXIES_DIR,
    REQUEST_FILE,
    LabError,
)
from clusters.lab.nsexec import ExecResult
from clusters.lab.topology import LabPlan, plan_lab
from ztunnel.api.secret_files import SecretFileError, make_private_dir

UP_POLL_S = 0.05


@dataclass
class LabOptions:
    state_dir: Path
    ztunnel: str = "auto"       # auto | off
    controller: str = "auto"    # auto | off
    portal: bool = True
    ready_timeout_s: float = 30.0
    up_timeout_s: float = 90.0
    dns_unanswered: str = "nxdomain"  # what node ztunnels answer for names the mesh does not know
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
        try:
            sandbox.check_state_dir(self.state_dir)
        except sandbox.SandboxUnavailable as e:
            raise LabError(str(e)) from None

    # --- up -------------------------------------------------------------------------------------

    def up_from_snapshot(self, snapshot: Any, fleet_dir: Path | None) -> dict[str, Any]:
        plan = plan_lab(snapshot.clusters, snapshot.lab_clusters, snapshot.services, gateways=snapshot.gateways)
        contexts = {n: c.api.context for n, c in snapshot.clusters.items()}
        return self.up(plan, fleet_dir, contexts)

    def up(self, plan: LabPlan, fleet_dir: Path | None = None, contexts: Mapping[str, str] | None = None) -> dict[str, Any]:
        sd = self.state_dir
        try:
            make_private_dir(sd)  # 0700, ours: a shared /tmp must not let another user plant state
        except SecretFileError as e:
            raise LabError(f"unsafe lab state directory: {e}") from None
        if (sd / sandbox.CONTROL_SOCKET).exists():
            try:
                control_request(sd, {"op": "status"}, 2.0)
            except LabError:
                pass  # a dead lab's socket: swept below
            else:
                raise LabError(f"a lab is already running in {sd}; `meshfed lab down --state-dir {sd}` first")
        support = sandbox.check_support()
        sandbox.sweep(sd)
        for stale in (sandbox.STATE_FILE, KUBECONFIG_FILE):
            (sd / stale).unlink(missing_ok=True)
        for stale_dir in (CONTROLLER_DIR, PROXIES_DIR):  # a new lab is a new mesh: new CAs, epochs, configs
            if (sd / stale_dir).exists():
                shutil.rmtree(sd / stale_dir)
        (sd / PLAN_FILE).write_bytes(pickle.dumps(plan))
        (sd / REQUEST_FILE).write_text(json.dumps({
            "fleet_dir": str(fleet_dir.resolve()) if fleet_dir else "", "contexts": dict(contexts or {}),
            "ztunnel": self.opts.ztunnel, "controller": self.opts.controller, "portal": self.opts.portal,
            "ready_timeout_s": self.opts.ready_timeout_s, "dns_unanswered": self.opts.dns_unanswered,
            **self.opts.extra}))
        if fleet_dir is not None and (sd / "git").exists():
            shutil.rmtree(sd / "git")
        t0 = time.monotonic()
        proc = sandbox.spawn(sandbox.python_argv("clusters.lab.supervisor", "supervise", "--state-dir", str(sd)),
                             sd / "lab.log", support)
        (sd / sandbox.SANDBOX_FILE).write_text(json.dumps({
            "pid": proc.pid, "start_ticks": sandbox.process_start_ticks(proc.pid), "started_at_s": time.time(),
            "user_namespace": not support.as_root}))
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
            time.sleep(UP_POLL_S)
        self._kill(proc.pid)
        raise LabError(f"the lab did not become ready within {self.opts.up_timeout_s:.0f} s\n{_tail(sd / 'lab.log')}")

    def _read_state(self) -> dict[str, Any]:
        return dict(sandbox.read_json(self.state_dir / sandbox.STATE_FILE))

    def _kill(self, pid: int) -> None:
        box = sandbox.read_json(self.state_dir / sandbox.SANDBOX_FILE)
        ticks = box.get("start_ticks")
        sandbox.kill_sandbox(pid, ticks if isinstance(ticks, int) else None)

    # --- requests to the supervisor -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "status"})

    def fault(self, kind: str, target: str, names: Sequence[str], mode: str = "drop",
              delay_ms: float = 0.0, *, rate_kbit: float = 0.0, skew_s: float = 0.0,
              behaviour: str = "") -> dict[str, Any]:
        # a restart under faketime waits for the old process to drain: allow for it
        return control_request(self.state_dir, {"op": "fault", "kind": kind, "target": target, "names": list(names),
                                                "mode": mode, "delay_ms": delay_ms, "rate_kbit": rate_kbit,
                                                "skew_s": skew_s, "behaviour": behaviour}, 60.0)

    def heal(self, target: str | None = None, names: Sequence[str] = (), kind: str | None = None) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "heal", "target": target, "names": list(names), "kind": kind},
                               60.0)

    def spawn(self, name: str, where: str, argv: Sequence[str]) -> dict[str, Any]:
        """Start a supervised background process (`job:NAME`) in `where`; its log is logs/job-NAME.log."""
        return control_request(self.state_dir, {"op": "spawn", "name": name, "where": where, "argv": list(argv)})

    def reap(self, name: str) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "reap", "name": name})

    def start_proxies(self) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "start-proxies"}, 120.0)

    def reload_proxies(self) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "reload-proxies"})

    def behaviour(self, cluster: str, pod: str, behaviour: str, namespace: str | None = None) -> dict[str, Any]:
        return control_request(self.state_dir, {"op": "behaviour", "cluster": cluster, "pod": pod,
                                                "namespace": namespace, "behaviour": behaviour})

    # --- exec: from here, not through the supervisor ------------------------------------------------

    def exec(self, where: str, argv: Sequence[str], *, stdin: bytes | None = None,
             timeout_s: float | None = None) -> ExecResult:
        """Run `argv` in `where` (`pod:C/NS/NAME`, `node:C/NODE`, `gateway:C`, `root`) and collect its
        output; no timeout unless given (then LabError, and the command is ended)."""
        box = nsexec.find_sandbox(self.state_dir)
        return nsexec.run_captured(box, nsexec.find_target(self.state_dir, where), argv, stdin=stdin,
                                   timeout_s=timeout_s)

    def exec_interactive(self, where: str, argv: Sequence[str], *, stdin: bool, tty: bool) -> None:
        """`meshfed lab exec`: this process becomes the command (see `nsexec.exec_interactive`)."""
        box = nsexec.find_sandbox(self.state_dir)
        nsexec.exec_interactive(box, nsexec.find_target(self.state_dir, where), argv, stdin=stdin, tty=tty)

    # --- down -------------------------------------------------------------------------------------

    def down(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Stop the lab; afterwards no process, namespace or link of it remains."""
        box = sandbox.read_json(self.state_dir / sandbox.SANDBOX_FILE)
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
                    and not sandbox.is_zombie(pid):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                except ChildProcessError:
                    pass
                time.sleep(UP_POLL_S)
            gone = sandbox.kill_sandbox(pid, t_ticks)
        report = sandbox.sweep(self.state_dir)
        return {"ok": gone, "graceful": asked, "sandbox_pid": pid, "swept": asdict(report)}


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
