"""The lab's data plane: node ztunnels and east-west gateways, started from the plan.

A proxy needs a ProxyConfig and its SVIDs. Either whoever renders them (the demo, a test, an
operator) writes `proxies/<id>/config.json` and `proxies/<id>/certs/` in the state directory and
calls `start-proxies` — the proxy then runs standalone — or, when the lab runs the controller, the
proxy joins it: it gets its first certificate with its bootstrap token and its config over gRPC.

Bootstrap tokens have one owner, the controller (`federation.controller.bootstrap`). The lab asks
for each proxy's token with the command shipped for that (`meshfed controller bootstrap-token`,
see `commands.bootstrap_token_argv`) and writes only the proxy's own token file, through
`ztunnel.api.secret_files.write_secret` (atomic, 0600, never through a link).

Invariants: a proxy killed by a fault is not started again here (only heal restarts it); `start`
runs one at a time (two concurrent calls would start the same proxy twice), which delays only
another `start`, never other requests.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from clusters.lab.commands import ProxySpec, bootstrap_token_argv, proxy_argv, proxy_specs
from clusters.lab.layout import BOOTSTRAP_TOKEN_FILE, CONTROLLER_DIR, LabError, proxy_dir
from clusters.lab.processes import ManagedProcess, ProcessTable
from clusters.lab.topology import LabPlan
from ztunnel.api.secret_files import make_private_dir, write_secret

TOKEN_COMMAND_TIMEOUT_S = 60.0
TOKEN_FETCH_PARALLELISM = 4
MAX_TOKEN_CHARS = 512


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
            joining = [(spec, d) for spec, d, standalone in todo if not standalone]
            if joining:
                with ThreadPoolExecutor(TOKEN_FETCH_PARALLELISM, thread_name_prefix="bootstrap-token") as pool:
                    list(pool.map(lambda sd: self._provision_token(*sd), joining))
            for spec, d, standalone in todo:
                self._start_one(spec, d, standalone)
            return [spec.proxy_id for spec, _, _ in todo]

    def _start_one(self, spec: ProxySpec, d: Path, standalone: bool) -> None:
        make_private_dir(d / "certs")
        argv = proxy_argv([sys.executable], spec.proxy_id, d, spec.socks_host, standalone=standalone,
                          trust_domain=spec.trust_domain, controller_dir=self.controller_dir,
                          dns_unanswered=self.dns_unanswered)
        mp = ManagedProcess(spec.key, spec.netns, argv, self.log_dir / spec.log_name)
        old = self.procs.put(mp)
        if old is not None:
            old.terminate()
        mp.start()  # a node proxy programs its namespace's capture rules itself (--capture)

    def _provision_token(self, spec: ProxySpec, d: Path) -> None:
        """Ask the controller's command for this proxy's token; write the proxy's token file (0600)."""
        path = d / BOOTSTRAP_TOKEN_FILE
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                return  # a restarted proxy presents the token it was given
        except FileNotFoundError:
            pass  # anything else there (a planted link) is replaced below, never followed
        make_private_dir(d)
        argv = bootstrap_token_argv([sys.executable], self.controller_dir, spec.proxy_id)
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=TOKEN_COMMAND_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise LabError(f"`meshfed controller bootstrap-token --proxy-id {spec.proxy_id}` did not answer within "
                           f"{TOKEN_COMMAND_TIMEOUT_S:.0f} s (is {self.controller_dir} on a stuck filesystem?)") from None
        token = r.stdout.strip()
        if r.returncode != 0 or not token or len(token) > MAX_TOKEN_CHARS or any(c.isspace() for c in token):
            raise LabError(f"`meshfed controller bootstrap-token --proxy-id {spec.proxy_id}` failed "
                           f"(exit {r.returncode}): {r.stderr.strip()[-500:] or 'no token printed'}")
        write_secret(path, (token + "\n").encode())

    def reload(self) -> list[str]:
        """SIGHUP every running proxy: it re-reads its --config (standalone mode)."""
        done = []
        for spec in self.specs:
            mp = self.procs.get(spec.key)
            if mp is not None and mp.alive():
                mp.signal(signal.SIGHUP)
                done.append(spec.key)
        return done
