"""The lab's sandbox: one `unshare` that owns every namespace, link and process of a lab.

The supervisor is re-executed as

    unshare --net --mount --pid --fork --kill-child --mount-proc  python -m clusters.lab.supervisor supervise …

so the lab gets its own network stack (nothing it does can reach the machine's interfaces), its
own mount table (a private tmpfs on /run/netns and /etc/netns: named namespaces and per-namespace
resolv.conf files never appear on the host) and its own PID namespace (PID 1 is the lab's init, which
runs the supervisor as its child, `clusters.lab.processes.run_as_init`: when init dies, the kernel
kills every process of the lab). `--kill-child` makes `unshare` take init down with it, so killing
the one `unshare` process ends the lab even after a crash.

The host enters a running lab through that `unshare` process (`clusters.lab.nsexec`): it is itself
in the lab's network and mount namespaces, and its `pid_for_children` is the lab's PID namespace.

As root this just works. As another user we add `--user --map-root-user` when unprivileged user
namespaces are allowed (`kernel.unprivileged_userns_clone`, `user.max_user_namespaces`); if not,
`check_support()` says which knob is off and how to turn it on.

`sweep()` cleans up after a crashed run: a supervisor that no longer answers is killed by its
recorded PID (checked against its start time, never by name), stale sockets and run files go, and
named namespaces a pre-sandbox run might have left in the host's /run/netns are deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "lab.json"          # written by the supervisor inside the sandbox
SANDBOX_FILE = "sandbox.json"    # written by the launcher: which `unshare` process owns the lab
CONTROL_SOCKET = "control.sock"
HOST_NETNS_FD_ENV = "MESHFED_HOST_NETNS_FD"


class SandboxUnavailable(RuntimeError):
    """This machine cannot run the lab sandbox; the message names what is missing and the fix."""


@dataclass(frozen=True, slots=True)
class SandboxSupport:
    as_root: bool
    user_namespaces: bool
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def check_support() -> SandboxSupport:
    """What the sandbox needs here, and what is missing (each with the fix)."""
    problems: list[str] = []
    for tool, pkg in (("unshare", "util-linux"), ("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` is not installed: install {pkg} (scripts/setup-system.sh does it)")
    as_root = os.geteuid() == 0
    userns = False
    if not as_root:
        clone = _read_int("/proc/sys/kernel/unprivileged_userns_clone")
        max_ns = _read_int("/proc/sys/user/max_user_namespaces")
        if clone == 0:
            problems.append("unprivileged user namespaces are disabled: "
                            "sudo sysctl -w kernel.unprivileged_userns_clone=1 (or run as root)")
        elif max_ns == 0:
            problems.append("user.max_user_namespaces is 0: sudo sysctl -w user.max_user_namespaces=15000 "
                            "(or run as root)")
        elif _read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == 1:
            problems.append("AppArmor restricts unprivileged user namespaces: sudo sysctl -w "
                            "kernel.apparmor_restrict_unprivileged_userns=0 (or run as root)")
        elif shutil.which("unshare") is not None:
            probe = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "--mount", "true"],
                                   capture_output=True, text=True, check=False)
            if probe.returncode == 0:
                userns = True
            else:
                problems.append(f"cannot create a user namespace here ({probe.stderr.strip() or 'unknown error'}); "
                                "run as root, or allow unprivileged user namespaces")
    return SandboxSupport(as_root=as_root, user_namespaces=userns, problems=tuple(problems))


def unshare_command(argv: Sequence[str], support: SandboxSupport) -> list[str]:
    cmd = ["unshare"]
    if not support.as_root:
        cmd += ["--user", "--map-root-user"]
    cmd += ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private"]
    return cmd + list(argv)


def spawn(argv: Sequence[str], log_path: Path, support: SandboxSupport | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` inside a new sandbox, detached from our session; returns the `unshare` process.

    The host's network namespace travels in as an open file descriptor (its number in
    $MESHFED_HOST_NETNS_FD) so the supervisor can open loopback listeners on the host side for
    kubectl and git (see `clusters.lab.portal`).
    """
    support = support or check_support()
    if not support.ok:
        raise SandboxUnavailable("the lab sandbox cannot start here:\n  - " + "\n  - ".join(support.problems))
    host_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        env = dict(os.environ, **{HOST_NETNS_FD_ENV: str(host_fd)})
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen(unshare_command(argv, support), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, pass_fds=(host_fd,), env=env,
                                    start_new_session=True)
        finally:
            log.close()
    finally:
        os.close(host_fd)


def prepare_mounts() -> None:
    """Inside the sandbox (PID 1): private tmpfs for named namespaces and per-namespace /etc files (pods' resolv.conf)."""
    for d in ("/run/netns", "/etc/netns"):
        os.makedirs(d, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", f"meshfed-{Path(d).name}", d], check=True)


# --- process identity (never kill by name) ---------------------------------------------------------


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: distinguishes a PID from a later process that reused it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_same_process(pid: int, start_ticks: int | None) -> bool:
    """Is `pid` still the process we recorded? Only with its recorded start time, and only if it is
    ours: a state file naming any pid without its start ticks (or someone else's process) must not
    make us signal it or enter its namespaces."""
    if start_ticks is None:
        return False
    ticks = process_start_ticks(pid)
    if ticks is None or ticks != start_ticks:
        return False
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.geteuid()
    except OSError:
        return False


def kill_sandbox(pid: int, start_ticks: int | None, grace_s: float = 3.0) -> bool:
    """SIGTERM then SIGKILL the recorded `unshare` process; returns True if it is gone."""
    if not is_same_process(pid, start_ticks):
        return True
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return True
            except ChildProcessError:
                pass
            if not is_same_process(pid, start_ticks) or is_zombie(pid):
                return True
            time.sleep(0.02)
    return not is_same_process(pid, start_ticks)


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# --- sweeping ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SweepReport:
    killed_pid: int | None
    removed_files: tuple[str, ...]
    removed_netns: tuple[str, ...]


def sweep(state_dir: Path) -> SweepReport:
    """Remove what a crashed (or killed) lab left behind in `state_dir` and on the host."""
    killed: int | None = None
    removed: list[str] = []
    netns_removed: list[str] = []
    state_path = state_dir / STATE_FILE
    state = read_json(state_path)
    box = read_json(state_dir / SANDBOX_FILE)
    pid, ticks = box.get("pid"), box.get("start_ticks")
    if isinstance(pid, int) and is_same_process(pid, ticks if isinstance(ticks, int) else None):
        kill_sandbox(pid, ticks if isinstance(ticks, int) else None)
        killed = pid
    for name in (CONTROL_SOCKET, SANDBOX_FILE):
        p = state_dir / name
        if p.exists() or p.is_symlink():
            p.unlink()
            removed.append(str(p))
    run_dir = state_dir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(str(run_dir))
    # Namespaces live in the sandbox's private /run/netns; only a run outside a sandbox (or an older
    # version) could leave names on the host. Delete exactly the names this lab recorded.
    names = state.get("netns")
    if isinstance(names, list):
        for name in names:
            if isinstance(name, str) and name and Path("/run/netns", name).exists():
                subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
                netns_removed.append(name)
    if state and state.get("phase") not in ("Down", None):
        state["phase"] = "Down"
        state["swept_at_s"] = time.time()
        state_path.write_text(json.dumps(state, indent=1))
    return SweepReport(killed, tuple(removed), tuple(netns_removed))


def read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def check_state_dir(state_dir: Path) -> None:
    """An existing lab state directory must be a real directory of ours that nobody else can write:
    it holds the sandbox's pid (which we signal and enter as root), the plan we unpickle and the
    credentials we hand to proxies. Raises SandboxUnavailable naming the fix."""
    try:
        st = os.lstat(state_dir)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise SandboxUnavailable(f"{state_dir} is not a directory (a link or a file); remove it or choose another "
                                 f"--state-dir")
    if st.st_uid != os.geteuid():
        raise SandboxUnavailable(f"{state_dir} belongs to uid {st.st_uid}, not to you ({os.geteuid()}): another user "
                                 f"could plant a lab state there; remove it or choose another --state-dir")
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise SandboxUnavailable(f"{state_dir} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                                 f"run: chmod 700 {state_dir}")
