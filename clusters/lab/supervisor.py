"""The supervisor: the lab inside its sandbox, composed of parts that each do one job.

    python -m clusters.lab.supervisor supervise --state-dir DIR     (started by `meshfed lab up`)

runs as PID 1 of the sandbox: it forks, stays init (reaping, `processes.run_as_init`) and the
child is the `Supervisor`, which owns

- `ProcessTable` (`processes`): every process of the lab;
- `BringUp` (`bringup`): the numbered steps, and the services they start;
- `DataPlane` (`proxies`): node ztunnels and gateways;
- `FaultInjector` (`injector`): faults applied and healed;
- `ControlServer` (`control`): requests from the host, each on its own thread.

It writes `lab.json` (what runs where, the exec targets, timings, active faults) once bring-up is
done and every second after, until `down` (or SIGTERM) stops it; then it stops everything it
started. It restarts nothing on its own: a killed process stays dead until `heal`.

The host side is `clusters.lab.runner.LabRunner`; it never imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clusters.lab import faults as F
from clusters.lab import sandbox
from clusters.lab.bringup import BringUp, LabServices
from clusters.lab.control import ControlServer
from clusters.lab.injector import FaultInjector
from clusters.lab.layout import (
    CONTROLLER_GRPC_PORT,
    KUBECONFIG_FILE,
    LOG_DIR,
    PLAN_FILE,
    REQUEST_FILE,
    LabError,
    exec_targets,
    resolve_target,
)
from clusters.lab.pods import pod_key, set_behaviour
from clusters.lab.processes import ManagedProcess, ProcessTable, run_as_init
from clusters.lab.proxies import DataPlane
from clusters.lab.topology import CONTROLLER_MGMT_ADDRESS, LabPlan

STATE_WRITE_INTERVAL_S = 1.0
MAX_TRANSITIONS_SHOWN = 20
JOB_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class Supervisor:
    """Invariants: every process the lab starts is in `procs`; each part guards its own state, so
    the supervisor holds no lock across requests; `lab.json` says Ready only after bring-up
    finished and the control socket is bound, and Down once everything is stopped."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.plan: LabPlan = pickle.loads((state_dir / PLAN_FILE).read_bytes())
        self.request: dict[str, Any] = json.loads((state_dir / REQUEST_FILE).read_text())
        self.log_dir = state_dir / LOG_DIR
        self.stop = threading.Event()
        self.targets = exec_targets(self.plan)
        self.procs = ProcessTable()
        self.faults = FaultInjector(self.plan, self.procs, self.log_dir, api_ports=self._api_ports)
        # proxies join the controller only when there is one (it needs a fleet repo to follow)
        with_controller = self.request.get("controller", "auto") != "off" and bool(self.request.get("fleet_dir"))
        self.data_plane = DataPlane(state_dir, self.plan, self.procs, self.log_dir, with_controller=with_controller,
                                    dns_unanswered=str(self.request.get("dns_unanswered", "nxdomain")))
        self.bring_up = BringUp(state_dir, self.plan, self.request, self.procs, self.data_plane,
                                self.faults.node_is_down, self.stop)
        self.control = ControlServer(state_dir / sandbox.CONTROL_SOCKET, self.handle)
        self._ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "status": self._status, "fault": self._fault, "heal": self._heal, "behaviour": self._behaviour,
            "spawn": self._spawn, "reap": self._reap, "start-proxies": self._start_proxies,
            "reload-proxies": lambda _r: {"ok": True, "reloaded": self.data_plane.reload()},
            "proxy-dirs": lambda _r: {"ok": True, "proxies": self.data_plane.dirs()},
            "down": self._down,
        }

    @property
    def services(self) -> LabServices:
        return self.bring_up.services

    def _api_ports(self) -> dict[str, int]:
        return {c: p for c, p in ((k.removeprefix("api-"), v) for k, v in self.services.ports.items()
                                  if k.startswith("api-"))}

    # --- running ------------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.bring_up.run()
        except Exception as e:
            traceback.print_exc()
            self.write_state("Failed", f"{type(e).__name__}: {e}")
            self.shut_down()
            return 2
        self.control.bind()
        self.write_state()
        server = threading.Thread(target=self.control.serve, args=(self.stop,), name="lab-control-accept")
        server.start()
        try:
            while not self.stop.wait(STATE_WRITE_INTERVAL_S):
                try:
                    self.write_state()
                except Exception:  # e.g. a full disk: keep serving; the next write may succeed
                    traceback.print_exc()
        finally:
            self.stop.set()  # whatever ended the loop, the accept thread must end too
            server.join()
            self.shut_down()
            self._mark_down()
        return 0

    def shut_down(self) -> None:
        self.stop.set()
        self.procs.terminate_all(0.5)
        self.services.stop()

    # --- the control socket's operations ------------------------------------------------------------

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request (on its own thread). No lock here: each part guards its own state."""
        op = self._ops.get(str(req.get("op")))
        if op is None:
            return {"ok": False, "error": f"unknown op {req.get('op')!r}; one of {', '.join(sorted(self._ops))}"}
        try:
            return op(req)
        except (KeyError, F.FaultError) as e:  # a name the plan does not have (the message says which)
            what = str(e.args[0]) if e.args else ""
            raise LabError(what if " " in what else f"the request lacks {what!r}") from None

    def _status(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "lab": self.describe(),
                "kubelets": {n: {"writes": k.writes, "last_error": k.last_error,
                                 "transitions": k.transitions[-MAX_TRANSITIONS_SHOWN:]}
                             for n, k in self.services.kubelets.items()}}

    def _fault(self, req: dict[str, Any]) -> dict[str, Any]:
        fr = F.FaultRequest(str(req["kind"]), str(req["target"]), tuple(map(str, req.get("names", ()))),
                            str(req.get("mode", "drop")), float(req.get("delay_ms", 0.0)),
                            float(req.get("rate_kbit", 0.0)), float(req.get("skew_s", 0.0)),
                            str(req.get("behaviour", "")))
        return {"ok": True, "applied": self.faults.apply(fr)}

    def _heal(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "healed": self.faults.heal(req.get("target"), tuple(req.get("names") or ()),
                                                       req.get("kind") or None)}

    def _behaviour(self, req: dict[str, Any]) -> dict[str, Any]:
        p = self.plan.pod(req["cluster"], req["pod"], req.get("namespace"))
        code, body = set_behaviour(p, str(req["behaviour"]))
        return {"ok": code == 200, "error": body, "answer": body}

    def _spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        name = str(req["name"])
        if not name or not set(name) <= JOB_NAME_CHARS:
            raise LabError(f"job name {name!r}: use letters, digits, '-', '_' and '.' (it names logs/job-NAME.log)")
        netns = resolve_target(self.targets, str(req["where"]))
        mp = ManagedProcess(f"job:{name}", netns, [str(a) for a in req["argv"]], self.log_dir / f"job-{name}.log")
        old = self.procs.put(mp)
        if old is not None:
            old.terminate()
        mp.start()
        return {"ok": True, "pid": mp.pid}

    def _reap(self, req: dict[str, Any]) -> dict[str, Any]:
        job = self.procs.pop(f"job:{req['name']}")
        if job is None:
            raise LabError(f"no job {req['name']!r} in this lab (spawn one first)")
        return {"ok": True, "returncode": job.terminate(float(req.get("grace_s", 3.0)))}

    def _start_proxies(self, _req: dict[str, Any]) -> dict[str, Any]:
        started = self.data_plane.start()
        if started:
            self.services.features["ztunnel"] = f"running ({len(started)} started last)"
        return {"ok": True, "started": started}

    def _down(self, _req: dict[str, Any]) -> dict[str, Any]:
        self.stop.set()
        return {"ok": True}

    # --- lab.json -----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        svc, procs = self.services, self.procs
        contexts = self.request.get("contexts", {})
        clusters = []
        for c in self.plan.clusters:
            clusters.append({
                "name": c.name, "network": c.network, "trust_domain": c.trust_domain, "bridge": c.bridge,
                "pod_cidr": c.pod_cidr, "node_cidr": c.node_cidr, "service_cidr": c.service_cidr,
                "dns_address": c.dns_address,
                "context": contexts.get(c.name, f"lab-{c.name}"),
                "api_url": svc.apis[c.name].url if c.name in svc.apis else "",
                "gateway": None if c.gateway is None else {**asdict(c.gateway), "pid": procs.pid(f"gateway:{c.name}")},
                "nodes": [{**asdict(n), "ready": not self.faults.node_is_down(c.name, n.name),
                           "ztunnel_pid": procs.pid(f"ztunnel:{c.name}/{n.name}")} for n in c.nodes],
                "pods": [{"name": p.name, "namespace": p.namespace, "node": p.node, "netns": p.netns,
                          "address": p.address, "service": p.service, "service_account": p.service_account,
                          "role": p.role, "port": p.port, "pid": procs.pid(pod_key(p)),
                          "state": procs.state(pod_key(p))} for p in c.pods],
                "services": [asdict(v) for v in c.services],
            })
        return {
            "phase": "Ready", "supervisor_pid": os.getpid(), "state_dir": str(self.state_dir),
            "kubeconfig": str(self.state_dir / KUBECONFIG_FILE),
            "git_url": svc.git.url if svc.git else "", "git_pushes": list(svc.pushes),
            "git_credentials_file": str(self.bring_up.git_credentials_file) if svc.git else "",
            "controller": {"grpc": f"{CONTROLLER_MGMT_ADDRESS}:{CONTROLLER_GRPC_PORT}",
                           "pid": procs.pid("controller"), "state": procs.state("controller")},
            "wan_cidr": self.plan.wan_cidr, "mgmt_cidr": self.plan.mgmt_cidr,
            "netns": list(self.plan.netns_names), "targets": self.targets, "ports": dict(svc.ports),
            "ports_note": "api-<cluster>, git: the same port on the host loopback (portal)",
            "features": dict(svc.features), "timings": dict(svc.timings),
            "faults": [asdict(r) for r in self.faults.active()],
            "clusters": clusters,
        }

    def write_state(self, phase: str = "Ready", error: str = "") -> None:
        if phase == "Ready":
            data = self.describe()
        else:
            data = {"phase": phase, "error": error, "timings": self.services.timings,
                    "netns": list(self.plan.netns_names)}
        tmp = self.state_dir / (sandbox.STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.state_dir / sandbox.STATE_FILE)


    def _mark_down(self) -> None:
        """Keep the last description (the sweeper reads its namespaces), phase Down."""
        try:
            data = json.loads((self.state_dir / sandbox.STATE_FILE).read_text())
        except (OSError, ValueError):
            data = {"netns": list(self.plan.netns_names)}
        data["phase"] = "Down"
        tmp = self.state_dir / (sandbox.STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.state_dir / sandbox.STATE_FILE)


def supervise(state_dir: Path) -> int:
    sup = Supervisor(state_dir)
    signal.signal(signal.SIGTERM, lambda *_: sup.stop.set())
    signal.signal(signal.SIGINT, lambda *_: sup.stop.set())
    return sup.run()


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
        state_dir = Path(a.state_dir)
        sys.exit(run_as_init(lambda: supervise(state_dir)))


if __name__ == "__main__":
    main()
