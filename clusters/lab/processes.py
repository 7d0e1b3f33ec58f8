"""Process supervision inside the sandbox: the lab's processes, and reaping as PID 1.

Two processes run the sandbox (see `run_as_init`):

    PID 1  init: reaps every orphan of the sandbox and forwards signals to PID 2; when PID 2 exits
           it exits with the same status, and the kernel ends every process of the namespace.
    PID 2  the supervisor (threads: control requests, kubelets, API servers, portal).

Why not one process: PID 1 inherits every orphan, and the supervisor's threads run
`subprocess.run` (ip, iptables) concurrently. A reaper in the same process would
race them: `waitpid(-1)` can collect an `iptables` child before `subprocess` does, which then
reports exit status 0 for a command that failed. With init apart, the supervisor's children are
only the ones it started, and `subprocess` reaps each of its own.

`ProcessTable` holds every long-running process of the lab by key (`pod:C/NS/NAME`,
`ztunnel:C/NODE`, `gateway:C`, `controller`, `job:NAME`, `latency:…`). Invariants: a key names at
most one process; a process killed by a fault (`killed`) is not restarted except by heal; start,
signal and terminate of one process are serialized by its own lock, so requests about different
processes never wait for each other.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clusters.lab.topology import NetnsName


@dataclass
class ManagedProcess:
    key: str
    netns: NetnsName
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    stopped: bool = False     # SIGSTOPped by a fault (gray failure)
    killed: bool = False      # SIGKILLed by a fault: stays down until heal
    started_at_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def state(self) -> str:
        if self.popen is None:
            return "absent"
        if not self.alive():
            return "dead"
        return "stopped" if self.stopped else "running"

    def start(self) -> None:
        cmd = (["ip", "netns", "exec", self.netns] if self.netns else []) + self.argv
        with self._lock:
            if self.alive():
                return
            with open(self.log, "ab") as log:
                self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self.stopped = self.killed = False
            self.started_at_s = time.time()

    def signal(self, sig: int) -> None:
        with self._lock:
            self._signal(sig)

    def _signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self, wait_s: float = 2.0) -> None:
        """SIGKILL as a fault: it stays down (`killed`) until heal starts it again."""
        with self._lock:
            self._signal(signal.SIGKILL)
            self.killed = True
            if self.popen is not None:
                try:
                    self.popen.wait(wait_s)
                except subprocess.TimeoutExpired:
                    pass

    def pause(self) -> None:
        with self._lock:
            self._signal(signal.SIGSTOP)
            self.stopped = True

    def resume(self) -> None:
        with self._lock:
            self._signal(signal.SIGCONT)
            self.stopped = False

    def terminate(self, grace_s: float = 1.0) -> int | None:
        """SIGTERM (after SIGCONT: a stopped process cannot exit), SIGKILL after `grace_s`; the exit code."""
        with self._lock:
            if self.popen is None:
                return None
            if self.popen.poll() is None:
                self._signal(signal.SIGCONT)
                self.popen.terminate()
                try:
                    self.popen.wait(grace_s)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(2)
            return self.popen.returncode


class ProcessTable:
    """The lab's processes by key. The table's lock guards the mapping only; it is never held while
    a process starts, stops or is waited for."""

    def __init__(self) -> None:
        self._procs: dict[str, ManagedProcess] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> ManagedProcess | None:
        with self._lock:
            return self._procs.get(key)

    def put(self, mp: ManagedProcess) -> ManagedProcess | None:
        """Register `mp` under its key; returns the process it replaced (the caller stops it)."""
        with self._lock:
            old = self._procs.get(mp.key)
            self._procs[mp.key] = mp
            return old

    def pop(self, key: str) -> ManagedProcess | None:
        with self._lock:
            return self._procs.pop(key, None)

    def snapshot(self) -> list[ManagedProcess]:
        with self._lock:
            return list(self._procs.values())

    def pid(self, key: str) -> int | None:
        mp = self.get(key)
        return mp.pid if mp is not None and mp.alive() else None

    def state(self, key: str) -> str:
        mp = self.get(key)
        return "absent" if mp is None else mp.state

    def terminate_all(self, grace_s: float = 0.5) -> None:
        """SIGTERM everything at once, then wait: shutting down takes one grace period, not one per process."""
        procs = [mp for mp in self.snapshot() if mp.alive()]
        for mp in procs:
            mp.resume()
            mp.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for mp in procs:
            mp.terminate(max(0.0, deadline - time.monotonic()))


# --- PID 1 ------------------------------------------------------------------------------------------

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def run_as_init(main: Callable[[], int]) -> int:
    """Run `main` in a child and be the sandbox's init: reap every process that ends here, pass
    signals on to the child, and return the child's exit status (128+N if a signal ended it).

    Call it before any thread starts: the child is forked."""
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        code = 70  # EX_SOFTWARE, if main raises
        try:
            code = main()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def forward(sig: int, _frame: object) -> None:
        try:
            os.kill(child, sig)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:  # cannot happen while the child lives; be safe
            return 70
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
