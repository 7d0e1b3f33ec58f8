"""Run a command inside the lab from the host, like `kubectl exec`: `meshfed lab exec` and `LabRunner.exec`.

The host enters the sandbox itself; the supervisor is not involved, so an exec of any length never
delays another lab command. The lab's named network namespaces exist only in the sandbox's private
/run/netns mount, so the command line is

    nsenter --target UNSHARE [--user] --mount --net --pid=/proc/UNSHARE/ns/pid_for_children --
        setpriv --pdeathsig TERM -- ip netns exec NETNS ARGV…

UNSHARE is the sandbox's `unshare` process (`sandbox.json`): after unshare(2) it is itself in the
lab's mount and network namespaces (and user namespace when not root); its `pid_for_children` is
the lab's PID namespace, so the command sees the lab's /proc and its PIDs mean the lab's processes.
nsenter forks once to enter the PID namespace and mirrors the child's exit status (a signal too);
`setpriv --pdeathsig TERM` ends the command if nsenter dies first (a caller's timeout kills nsenter).

`meshfed lab exec` connects that command to the user's stdio like `kubectl exec` (`stdio_plan`):

- no terminal involved (pipes, files: scripts and tests): this process exec()s the command line,
  so stdio, signals and the exit status pass straight through and nothing is buffered;
- `-t`: the command gets a terminal of its own — a new pty whose slave end becomes its controlling
  terminal in a new session *inside* the lab's PID namespace (`setsid --ctty`) — and this process
  relays the user's terminal (raw) to it, window size included. Handing over the user's own
  terminal does not work across PID namespaces: an interactive shell cannot see the terminal's
  foreground process group (a host PID), so job control fails and, at exit, so does restoring it
  (`sh: Cannot set tty process group`, exit status 2 instead of the shell's). docker exec -t and
  kubectl exec -t allocate a pty for the same reason;
- no `-t` but a terminal on our stdio: the command must not see a terminal (as with kubectl), so
  stdio is relayed through pipes, as it comes.

`-i` passes stdin (without it the command reads /dev/null, or nothing). Exit status: the command's
(128+N when signal N ended it).
"""

from __future__ import annotations

import enum
import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from tty import setraw
from typing import NoReturn

from clusters.lab import sandbox
from clusters.lab.layout import LabError, resolve_target
from clusters.lab.topology import NetnsName

NO_TTY_WARNING = "Unable to use a TTY - input is not a terminal or the right kind of file"  # kubectl's words
RELAY_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class SandboxRef:
    """The `unshare` process that owns a running lab."""

    pid: int
    user_namespace: bool   # the sandbox has its own user namespace (started by a non-root user)


@dataclass(frozen=True, slots=True)
class ExecResult:
    returncode: int
    stdout: str
    stderr: str


def find_sandbox(state_dir: Path) -> SandboxRef:
    """The running lab's sandbox, or a LabError that says how to get one."""
    try:
        sandbox.check_state_dir(state_dir)
    except sandbox.SandboxUnavailable as e:
        raise LabError(str(e)) from None
    box = sandbox.read_json(state_dir / sandbox.SANDBOX_FILE)
    pid, ticks = box.get("pid"), box.get("start_ticks")
    if not isinstance(pid, int) or not sandbox.is_same_process(pid, ticks if isinstance(ticks, int) else None) \
            or sandbox.is_zombie(pid):
        raise LabError(f"no lab is running in {state_dir}; start one with `meshfed lab up --state-dir {state_dir}`")
    return SandboxRef(pid, bool(box.get("user_namespace", False)))


def find_target(state_dir: Path, where: str) -> NetnsName:
    """The namespace of `where` in the running lab (from the targets the supervisor publishes)."""
    state = sandbox.read_json(state_dir / sandbox.STATE_FILE)
    if state.get("phase") != "Ready":
        raise LabError(f"the lab in {state_dir} is not ready (phase {state.get('phase') or 'unknown'}); "
                       "see `meshfed lab status`")
    targets = state.get("targets")
    if not isinstance(targets, dict):
        raise LabError(f"{state_dir}/{sandbox.STATE_FILE} lists no exec targets: was the lab started by an "
                       "older meshfed? `meshfed lab down` then `meshfed lab up`")
    return resolve_target(targets, where)


def enter_argv(box: SandboxRef, netns: NetnsName, argv: Sequence[str], *, new_session: bool = False) -> list[str]:
    """The command line that runs `argv` in `netns` of the sandbox (pure). `new_session`: the
    command leads a new session whose controlling terminal is its stdin (a pty we allocated)."""
    if not argv:
        raise LabError("name a command to run, e.g. `meshfed lab exec pod:east/shop/frontend-0 -- sh`")
    cmd = ["nsenter", f"--target={box.pid}"]
    if box.user_namespace:
        cmd.append("--user")  # first: it grants the capabilities the other setns calls need
    cmd += ["--mount", "--net", f"--pid=/proc/{box.pid}/ns/pid_for_children", "--",
            "setpriv", "--pdeathsig", "TERM", "--"]
    if new_session:
        cmd += ["setsid", "--ctty", "--wait"]
    if netns:
        cmd += ["ip", "netns", "exec", netns]
    return cmd + list(argv)


# --- programmatic: captured output ----------------------------------------------------------------


def run_captured(box: SandboxRef, netns: NetnsName, argv: Sequence[str], *, stdin: bytes | None = None,
                 timeout_s: float | None = None) -> ExecResult:
    cmd = enter_argv(box, netns, argv)
    try:
        r = subprocess.run(cmd, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                           capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)[:200]} did not finish within {timeout_s} s (killed)") from None
    return ExecResult(_exit_code(r.returncode), r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))


def _exit_code(returncode: int) -> int:
    """A shell's convention: 128+N when signal N ended the process."""
    return returncode if returncode >= 0 else 128 - returncode


# --- the CLI: the user's terminal -------------------------------------------------------------------


class Stdio(enum.Enum):
    DIRECT = "direct"   # exec: the command uses our stdio as is
    PTY = "pty"         # the command gets a pty of its own; we relay our terminal to it
    PIPES = "pipes"     # the command gets pipes; we relay (it must not see our terminal)


@dataclass(frozen=True, slots=True)
class StdioPlan:
    mode: Stdio
    pass_stdin: bool
    warning: str = ""


def stdio_plan(*, stdin: bool, tty: bool, isatty: tuple[bool, bool, bool]) -> StdioPlan:
    """How `meshfed lab exec [-i] [-t]` connects the command to our stdin/stdout/stderr (pure)."""
    warning = ""
    if tty and not isatty[0]:
        tty, warning = False, NO_TTY_WARNING
    if tty:
        return StdioPlan(Stdio.PTY, stdin)
    terminal_in_use = (stdin and isatty[0]) or isatty[1] or isatty[2]
    return StdioPlan(Stdio.PIPES if terminal_in_use else Stdio.DIRECT, stdin, warning)


def exec_interactive(box: SandboxRef, netns: NetnsName, argv: Sequence[str], *, stdin: bool, tty: bool) -> NoReturn:
    """Become the command, or relay it (see the module's docstring); exits with its status."""
    plan = stdio_plan(stdin=stdin, tty=tty, isatty=(os.isatty(0), os.isatty(1), os.isatty(2)))
    cmd = enter_argv(box, netns, argv, new_session=plan.mode is Stdio.PTY)
    if plan.warning:
        print(plan.warning, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; the command must not inherit that
        signal.signal(sig, signal.SIG_DFL)
    try:
        if plan.mode is Stdio.PTY:
            os._exit(_relay_pty(cmd, plan.pass_stdin))
        if plan.mode is Stdio.PIPES:
            os._exit(_relay_pipes(cmd, plan.pass_stdin))
        if not plan.pass_stdin:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"cannot run {cmd[0]}: {e} (nsenter, setpriv and setsid come with util-linux)", file=sys.stderr)
        os._exit(2)


def _forward_signals(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM/SIGHUP sent to us go to nsenter (it dies; its pdeathsig ends the command). SIGINT
    from the terminal reaches nsenter itself (same process group): we only wait. A handler, not
    SIG_IGN: an ignored signal would stay ignored in the command."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    signal.signal(signal.SIGINT, lambda _s, _f: None)


def _relay_pty(cmd: Sequence[str], pass_stdin: bool) -> int:
    """Run `cmd` on a new pty; our terminal (raw while we relay stdin) <-> the pty's master."""
    master, slave = os.openpty()
    _copy_window_size(0, master)
    proc = subprocess.Popen(list(cmd), stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)  # the master reads EIO once the command (and anything it left) closes the slave
    _forward_signals(proc)
    signal.signal(signal.SIGWINCH, lambda _s, _f: _copy_window_size(0, master))
    saved = termios.tcgetattr(0) if pass_stdin else None
    try:
        if pass_stdin:
            setraw(0, termios.TCSANOW)  # ^C, ^Z… go to the command's terminal; typed-ahead keys stay
        reading_stdin = pass_stdin
        while True:
            readable, _, _ = select.select([master, *([0] if reading_stdin else [])], [], [], 0.2)
            if master in readable:
                try:
                    data = os.read(master, RELAY_CHUNK)
                except OSError:  # EIO: every slave end is closed
                    break
                if not data:
                    break
                _write_all(1, data)
            if 0 in readable:
                data = os.read(0, RELAY_CHUNK)
                if data:
                    _write_all(master, data)
                else:
                    reading_stdin = False
            if not readable and proc.poll() is not None:
                break  # the command is gone and nothing more came (a child of it may hold the slave)
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        os.close(master)
    return _exit_code(proc.wait())


def _copy_window_size(src_fd: int, pty_master: int) -> None:
    try:
        size = fcntl.ioctl(src_fd, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(pty_master, termios.TIOCSWINSZ, size)
    except OSError:
        pass  # not a terminal: the pty keeps its default size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _relay_pipes(cmd: Sequence[str], pass_stdin: bool) -> int:
    """Run `cmd` with pipes for stdio and copy them as they come (unbuffered); its exit status."""
    proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE if pass_stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    _forward_signals(proc)
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [threading.Thread(target=_pump, args=(proc.stdout.fileno(), 1, proc.stdout.close), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr.fileno(), 2, proc.stderr.close), daemon=True)]
    if pass_stdin:
        assert proc.stdin is not None
        # daemon: it may sit in a read of our terminal after the command has exited
        threading.Thread(target=_pump, args=(0, proc.stdin.fileno(), proc.stdin.close), daemon=True).start()
    for t in pumps:
        t.start()
    returncode = proc.wait()
    for t in pumps:
        t.join()
    return _exit_code(returncode)


def _pump(src: int, dst: int, done: Callable[[], None]) -> None:
    """Copy `src` to `dst` as it comes; `done` closes our end of the pipe (the writer then gets
    EOF, or EPIPE when our reader went away)."""
    try:
        while data := os.read(src, RELAY_CHUNK):
            _write_all(dst, data)
    except OSError:
        pass  # the reader went away (EPIPE) or the source broke: stop copying
    finally:
        try:
            done()
        except OSError:
            pass

