"""The state directory's lock: one controller at a time owns a state directory.

Two controllers on one state directory race to create CA roots, both bump the epoch and both
push: a split brain they made themselves. So the state owner takes an exclusive lock on
`<state>/controller.lock` before it opens anything else there, and keeps it for its life:

- `flock(LOCK_EX)` on an open descriptor: the kernel drops it when the holder's process exits,
  however it exits (SIGKILL included), so a standby can take over without anyone cleaning up a
  stale lock file. flock needs a local filesystem: keep the state directory off NFS.
- The holder writes who it is into the file (pid, host, since, command) so that a refused second
  controller, `meshfed check` and `meshfed controller restore` can name it. What the file says
  counts only while the lock is held: `holder()` checks that with a non-blocking shared lock.
- A second controller either refuses (`StateDirLocked`, naming the holder and both ways out) or,
  as a standby, waits until the lock is free and takes over (`acquire(wait=True)`).

Probing with a shared lock may make an acquirer's non-blocking attempt fail for an instant; an
acquirer therefore retries for `REFUSE_AFTER_S` before it refuses, and a standby polls.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ztunnel.api.secret_files import fsync_dir, make_private_dir

LOCK_FILE = "controller.lock"
REFUSE_AFTER_S = 1.0
POLL_S = 0.2
MAX_HOLDER_BYTES = 4096


@dataclass(frozen=True, slots=True)
class LockHolder:
    pid: int
    host: str
    since_s: float
    command: str = ""

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since_s)) if self.since_s else "?"
        return f"pid {self.pid} on host {self.host} (since {since})"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class StateDirLocked(RuntimeError):
    """Another controller owns the state directory; the message names it and what to do."""

    def __init__(self, state_dir: Path, holder: LockHolder | None) -> None:
        who = holder.describe() if holder is not None else "another process (it wrote no holder record)"
        super().__init__(
            f"state directory {state_dir} is in use by controller {who}: two controllers on one state "
            f"directory would race for its CA keys and epochs. Stop that controller first, or start this one "
            f"with --standby to take over when it exits")
        self.holder = holder


def _is_held(fd: int) -> bool:
    """True when someone holds the exclusive lock (a shared probe on our own descriptor fails)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _parse_holder(raw: bytes) -> LockHolder | None:
    try:
        d = json.loads(raw[:MAX_HOLDER_BYTES] or b"null")
        return LockHolder(int(d["pid"]), str(d["host"]), float(d["since_s"]), str(d.get("command", "")))
    except (ValueError, KeyError, TypeError):
        return None


def read_holder(state_dir: str | os.PathLike[str]) -> LockHolder | None:
    """Who holds the lock of `state_dir` now (None when nobody does or there is no lock file)."""
    path = Path(state_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if not _is_held(fd):
            return None
        return _parse_holder(os.pread(fd, MAX_HOLDER_BYTES, 0)) or LockHolder(0, "?", 0.0)
    finally:
        os.close(fd)


class StateDirLock:
    """Invariant: while `held`, this process holds `flock(LOCK_EX)` on the lock file and the file
    names this process."""

    def __init__(self, state_dir: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_FILE
        self.clock = clock
        self._fd: int | None = None
        self.me: LockHolder | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait: bool, on_wait: Callable[[LockHolder | None], None] | None = None,
                refuse_after_s: float = REFUSE_AFTER_S, poll_s: float = POLL_S) -> LockHolder:
        """Take the lock. Held by another: refuse (`StateDirLocked`) after `refuse_after_s`, or with
        `wait` poll until it is free (`on_wait(holder)` once per change of holder, for the log)."""
        if self._fd is not None:
            assert self.me is not None
            return self.me
        make_private_dir(self.state_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            deadline = time.monotonic() + refuse_after_s
            announced: LockHolder | bool | None = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                holder = _parse_holder(os.pread(fd, MAX_HOLDER_BYTES, 0))
                if not wait and time.monotonic() >= deadline:
                    raise StateDirLocked(self.state_dir, holder)
                if wait and on_wait is not None and holder != announced:
                    on_wait(holder)
                    announced = holder
                time.sleep(poll_s)
            me = LockHolder(os.getpid(), socket.gethostname(), self.clock(), " ".join(sys.argv[:3])[:200])
            data = json.dumps(me.as_dict()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            fsync_dir(self.state_dir)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.me = fd, me
        return me

    def release(self) -> None:
        """Give the lock up (process exit does the same)."""
        if self._fd is None:
            return
        fd, self._fd, self.me = self._fd, None, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)

    def holder(self) -> LockHolder | None:
        return self.me if self._fd is not None else read_holder(self.state_dir)
