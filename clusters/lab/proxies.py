"""The lab's data plane: node ztunnels and east-west gateways, started from the plan.

A proxy needs a ProxyConfig and its SVIDs. Either whoever renders them (the demo, a test, an
operator) writes `proxies/<id>/config.json` and `proxies/<id>/certs/` in the state directory and
calls `start-proxies` — the proxy then runs standalone — or, when the lab runs the controller, the
proxy joins it: it gets its first certificate with its pod's projected ServiceAccount token
(`proxies/<id>/sa-token`, which the lab's kubelet requests from the cluster's API server and keeps
fresh: `clusters.lab.kubelet.TokenProjector`) and its config over gRPC. No shared secret: the
controller has the proxy's own cluster review the token, bound to the proxy's pod and node.

Invariants: a proxy killed by a fault is not started again here (only heal restarts it); `start`
runs one at a time (two concurrent calls would start the same proxy twice), which delays only
another `start`, never other requests.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

from clusters.lab.commands import BOOTSTRAP_TOKEN_FILE, MESHFED, ProxySpec, proxy_argv, proxy_specs
from clusters.lab.layout import CONTROLLER_DIR, SA_TOKEN_FILE, LabError, proxy_dir
from clusters.lab.processes import ManagedProcess, ProcessTable
from clusters.lab.topology import LabPlan
from ztunnel.api.identity import ProxyId
from ztunnel.api.secret_files import make_private_dir, write_secret

LAB_BOOTSTRAP_TOKEN_TTL = "1h"   # the command's default: long enough for a slow lab's first certificate


class DataPlane:
    def __init__(self, state_dir: Path, plan: LabPlan, procs: ProcessTable, log_dir: Path, *,
                 with_controller: bool, dns_unanswered: str = "nxdomain") -> None:
        self.state_dir = state_dir
        self.plan = plan
        self.procs = procs
        self.log_dir = log_dir
        self.with_controller = with_controller
        self.dns_unanswered = dns_unanswered
        self.specs = proxy_specs(plan)
        self._start_lock = threading.Lock()

    @property
    def controller_dir(self) -> Path:
        return self.state_dir / CONTROLLER_DIR

    def dirs(self) -> dict[str, str]:
        return {s.proxy_id: str(proxy_dir(self.state_dir, s.proxy_id)) for s in self.specs}

    def start(self) -> list[str]:
        """Start every proxy that has a config (or a controller to join) and is not running; the ids started."""
        with self._start_lock:
            todo: list[tuple[ProxySpec, Path, bool]] = []
            for spec in self.specs:
                mp = self.procs.get(spec.key)
                if mp is not None and (mp.alive() or mp.killed):
                    continue
                d = proxy_dir(self.state_dir, spec.proxy_id)
                standalone = (d / "config.json").exists()
                if not standalone and not self.with_controller:
                    continue  # nothing to serve yet
                todo.append((spec, d, standalone))
            for spec, d, standalone in todo:
                self._start_one(spec, d, standalone)
            return [spec.proxy_id for spec, _, _ in todo]

    def _start_one(self, spec: ProxySpec, d: Path, standalone: bool) -> None:
        make_private_dir(d / "certs")
        if not standalone and ProxyId.parse(spec.proxy_id).kind not in ("ztunnel", "gateway"):
            # what an operator does for a hand-provisioned proxy (`meshfed controller bootstrap-token`):
            # a fresh single-use token for this proxy id, replacing an unused one; a restart while
            # its persisted certificate is valid does not need it
            # through the command, as an operator would (a cluster provider never imports the controller)
            out = subprocess.run([sys.executable, *MESHFED, "controller", "bootstrap-token", "--state-dir",
                                  str(self.controller_dir), "--proxy-id", spec.proxy_id, "--ttl", LAB_BOOTSTRAP_TOKEN_TTL],
                                 capture_output=True, text=True, timeout=60, check=False)
            if out.returncode != 0:
                raise LabError(f"{spec.proxy_id}: `meshfed controller bootstrap-token` failed: {out.stderr.strip()}")
            write_secret(d / BOOTSTRAP_TOKEN_FILE, out.stdout.strip().encode())
        argv = proxy_argv([sys.executable], spec.proxy_id, d, spec.socks_host, standalone=standalone,
                          trust_domain=spec.trust_domain, controller_dir=self.controller_dir,
                          dns_unanswered=self.dns_unanswered)
        mp = ManagedProcess(spec.key, spec.netns, argv, self.log_dir / spec.log_name)
        old = self.procs.put(mp)
        if old is not None:
            old.terminate()
        mp.start()  # a node proxy programs its namespace's capture rules itself (--capture)

    def token_path(self, proxy_id: str) -> Path:
        """Where the kubelet projects `proxy_id`'s ServiceAccount token (its --sa-token-file)."""
        return proxy_dir(self.state_dir, proxy_id) / SA_TOKEN_FILE

    def reload(self) -> list[str]:
        """SIGHUP every running proxy: it re-reads its --config (standalone mode)."""
        done = []
        for spec in self.specs:
            mp = self.procs.get(spec.key)
            if mp is not None and mp.alive():
                mp.signal(signal.SIGHUP)
                done.append(spec.key)
        return done
