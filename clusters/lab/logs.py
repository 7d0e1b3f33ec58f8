"""The lab's process logs, read on the host side (`meshfed lab logs [PROCESS] [-f]`).

Every process the supervisor starts writes stdout and stderr to `<state>/logs/<file>.log`; the
supervisor itself writes `<state>/lab.log`. This module names them the way the rest of the lab
names processes (the supervisor's process keys, which faults use too):

    supervisor                    lab.log (bring-up, faults, kubelets)
    controller                    logs/controller.log
    ztunnel:east/node-1           logs/ztunnel-east-node-1.log   (also: ztunnel/east/node-1)
    gateway:east                  logs/gateway-east.log          (also: gateway/east)
    pod:east/shop/checkout-0      logs/pod-east.shop.checkout-0.log
    job:load-east                 logs/job-load-east.log
    latency                       logs/latency.log

and, for any file, its stem (`ztunnel-east-node-1`). Proxy and pod names come from `lab.json` when
the lab wrote one (a name with `-` in it is ambiguous in a file name); otherwise from the file
names alone. Logs stay after `lab down` until the next `lab up`.

`LogFollower` is `tail -f` over several files: offsets per file, partial lines held back until
their newline, a file that shrank (rotated or truncated) read again from its start. It never
reads more than `MAX_READ_BYTES` of a file per poll, so a log that grows fast cannot starve the
others or fill memory.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusters.lab.layout import LOG_DIR, LabError

SUPERVISOR = "supervisor"
SUPERVISOR_LOG = "lab.log"
MAX_READ_BYTES = 1 << 20
TAIL_BLOCK_BYTES = 64 * 1024
MAX_PENDING_BYTES = 64 * 1024   # a "line" longer than this is emitted in pieces


def _keys_from_state(state: Mapping[str, Any]) -> dict[str, str]:
    """File stem -> process key, from lab.json's clusters (exact even when names contain '-')."""
    out: dict[str, str] = {}
    for c in state.get("clusters") or []:
        name = str(c.get("name", ""))
        for n in c.get("nodes") or []:
            out[f"ztunnel-{name}-{n.get('name')}"] = f"ztunnel:{name}/{n.get('name')}"
        if c.get("gateway"):
            out[f"gateway-{name}"] = f"gateway:{name}"
        for p in c.get("pods") or []:
            out[f"pod-{name}.{p.get('namespace')}.{p.get('name')}"] = f"pod:{name}/{p.get('namespace')}/{p.get('name')}"
    return out


def key_of(stem: str, known: Mapping[str, str]) -> str:
    """The process key of a log file's stem (see the module docstring)."""
    if stem in known:
        return known[stem]
    if stem.startswith("job-"):
        return "job:" + stem[len("job-"):]
    if stem.startswith("pod-") and stem.count(".") >= 2:
        cluster, ns, name = stem[len("pod-"):].split(".", 2)
        return f"pod:{cluster}/{ns}/{name}"
    if stem.startswith("gateway-"):
        return "gateway:" + stem[len("gateway-"):]
    return stem


def log_files(state_dir: Path) -> dict[str, Path]:
    """Process key -> log file, for every log of the lab in `state_dir` (sorted by key)."""
    try:
        state = json.loads((state_dir / "lab.json").read_text())
    except (OSError, ValueError):
        state = {}
    known = _keys_from_state(state if isinstance(state, dict) else {})
    out: dict[str, Path] = {}
    if (state_dir / SUPERVISOR_LOG).is_file():
        out[SUPERVISOR] = state_dir / SUPERVISOR_LOG
    log_dir = state_dir / LOG_DIR
    if log_dir.is_dir():
        for p in log_dir.glob("*.log"):
            out[key_of(p.stem, known)] = p
    return dict(sorted(out.items()))


def _aliases(key: str, path: Path) -> set[str]:
    names = {key, path.stem}
    kind, sep, rest = key.partition(":")
    if sep:
        names.add(f"{kind}/{rest}")   # proxy ids: ztunnel/east/node-1, gateway/east
    return names


def select(files: Mapping[str, Path], patterns: Sequence[str]) -> dict[str, Path]:
    """The logs `patterns` name (names, aliases or globs); every log for no pattern. A pattern that
    names nothing raises LabError listing what there is."""
    if not patterns:
        return dict(files)
    out: dict[str, Path] = {}
    for pat in patterns:
        hits = {k: p for k, p in files.items() if any(fnmatch.fnmatchcase(a, pat) for a in _aliases(k, p))}
        if not hits:
            raise LabError(f"no log named {pat!r} in this lab; logs: {', '.join(files) or 'none'}")
        out.update(hits)
    return dict(sorted(out.items()))


def tail_lines(path: Path, n: int, end: int | None = None) -> list[str]:
    """The last `n` lines of `path` (every line for n < 0) before byte `end` (default: the end of
    the file), read from the end: a long log is not read whole for its last lines."""
    if n == 0:
        return []
    with open(path, "rb") as f:
        f.seek(0, 2)
        pos = f.tell() if end is None else min(end, f.tell())
        if n < 0:
            f.seek(0)
            return f.read(pos).decode(errors="replace").splitlines()
        data = b""
        while pos > 0 and data.count(b"\n") <= n:
            step = min(TAIL_BLOCK_BYTES, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    return data.decode(errors="replace").splitlines()[-n:]


@dataclass
class _Cursor:
    offset: int = 0
    pending: bytes = b""


@dataclass
class LogFollower:
    """`tail -f` over the files `find()` returns (called every poll: new files join as they appear).

    Starts at each file's end (`from_start=False`) or beginning; `poll()` returns the complete lines
    written since, as (name, line)."""

    find: Callable[[], Mapping[str, Path]]
    from_start: bool = False
    cursors: dict[str, _Cursor] = field(default_factory=dict)
    _primed: bool = False

    def poll(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        files = self.find()
        for name, path in files.items():
            try:
                size = path.stat().st_size
            except OSError:
                continue
            cur = self.cursors.get(name)
            if cur is None:
                # files present at the start begin at their end (their tail was shown already);
                # files that appear later are new: read them whole
                cur = self.cursors[name] = _Cursor(size if (not self._primed and not self.from_start) else 0)
            if size < cur.offset:   # truncated or replaced: start over
                cur.offset, cur.pending = 0, b""
            if size == cur.offset:
                continue
            with open(path, "rb") as f:
                f.seek(cur.offset)
                chunk = f.read(min(size - cur.offset, MAX_READ_BYTES))
            cur.offset += len(chunk)
            data = cur.pending + chunk
            *lines, rest = data.split(b"\n")
            if len(rest) > MAX_PENDING_BYTES:
                lines.append(rest)
                rest = b""
            cur.pending = rest
            out.extend((name, line.decode(errors="replace")) for line in lines)
        self._primed = True
        return out

    def offset(self, name: str) -> int | None:
        """Where following `name` starts (after a first `poll`): print its tail up to here."""
        cur = self.cursors.get(name)
        return None if cur is None else cur.offset

    def follow(self, emit: Callable[[str, str], None], stop: Callable[[], bool], sleep: Callable[[float], None],
               interval_s: float = 0.2) -> None:
        """Poll until `stop()`; each new line goes to `emit(name, line)`."""
        while not stop():
            for name, line in self.poll():
                emit(name, line)
            sleep(interval_s)
