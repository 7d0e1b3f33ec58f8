"""What every benchmark here measures with: quantiles and CPU time, one definition each.

- `pct(values, q)`: the q-quantile, nearest rank over the sorted values (NaN for none).
- `proc_cpu_s(pids)`: user + system CPU seconds of other running processes (/proc/<pid>/stat,
  clock ticks: 10 ms steps, for windows of seconds).
- `proc_run_s(pid)`: CPU seconds of one running process's live threads to the nanosecond
  (/proc/<pid>/task/*/schedstat), for windows of a fraction of a second (a few hundred requests).
- `cpu_s(who)`: the same for this process or its waited-for children (`resource.RUSAGE_*`).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from pathlib import Path


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile of `values`, nearest rank."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def proc_cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds of running processes (proxies, simulated clients), from
    /proc/<pid>/stat; 0 for one that is gone."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])   # utime, stime (fields 14 and 15 of stat(5))
    return total / os.sysconf("SC_CLK_TCK")


def proc_run_s(pid: int) -> float:
    """CPU seconds of `pid`'s live threads (schedstat's time on CPU, ns). Threads that ended are not
    counted, unlike `proc_cpu_s`: meant for single-loop processes (the proxies), which keep theirs."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue   # a thread that just ended
    return total / 1e9


def cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime
