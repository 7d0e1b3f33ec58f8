"""Two clocks, named for what they mean.

- The **calendar** (`calendar_now`): wall time for everything that is a date — certificate and
  token validity, renewal schedules, the root rotation gate, history retention. Normally
  `time.time()`. For the lab's time-travel soak it can run ahead of the real clock: when
  `$MESHFED_CALENDAR_OFFSET_FILE` names a file, the calendar is `time.time()` plus the number of
  seconds that file holds (absent file: offset 0). The lab's test moves every process's calendar
  at once by rewriting that one file; each process re-reads it at most every `RECHECK_S`, and only
  when the file changed (inode, mtime, size).
- The **elapsed** clock (`steady_wall_clock`): durations — leases, debounce, backoff, timeouts,
  ejection windows. Monotonic, so that neither an NTP step nor the simulated calendar can expire
  every lease at once; expressed on the wall scale (anchored to the wall clock when made) because
  the same values stamp events and history. Over a long run it drifts from the wall clock by
  whatever NTP slewed or stepped since the anchor; nothing compares it with a certificate date.

Loops that wait for a calendar deadline (a renewal at half-life) wait at most `calendar_wait_s()`:
with a simulated calendar that is `SIMULATED_WAIT_MAX_S`, so a jump of days is noticed within a
second instead of at the end of a sleep planned on the old date.

OpenSSL (Python `ssl`, grpcio) checks validity against the real clock, which no offset moves: a CA
under a simulated calendar therefore starts certificates at `not_before_anchor_s(now)` — the
earlier of the calendar and the real clock — so they are valid on both (see
`federation.controller.ca`).

Bad content in the offset file is an error naming the file and the fix: on the first read it is
raised (a process must not start on a calendar it cannot read); later, the last good offset keeps
serving and the problem is logged once per change of the file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

CALENDAR_OFFSET_ENV = "MESHFED_CALENDAR_OFFSET_FILE"
RECHECK_S = 0.1              # the offset file is stat()ed at most this often per process
SIMULATED_WAIT_MAX_S = 1.0   # a calendar-deadline wait never sleeps longer while the calendar is simulated
MAX_OFFSET_S = 10 * 365 * 86400.0  # a simulated calendar runs ahead by days or months, not decades

log = logging.getLogger(__name__)


class CalendarClockError(RuntimeError):
    """The calendar offset file cannot be used; the message names the file and the fix."""


def parse_offset(text: str, path: str) -> float:
    """The offset in seconds a calendar offset file holds (one number; blank lines and `#`
    comments allowed); CalendarClockError naming the file and line otherwise."""
    values: list[tuple[int, str]] = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
                                     if line.strip() and not line.strip().startswith("#")]
    if len(values) != 1:
        raise CalendarClockError(f"{path}: a calendar offset file holds exactly one number (seconds the calendar "
                                 f"runs ahead of the real clock), found {len(values)} values; write e.g. "
                                 f"'86400' for one day ahead, or unset ${CALENDAR_OFFSET_ENV}")
    line_no, value = values[0]
    try:
        offset = float(value)
    except ValueError:
        raise CalendarClockError(f"{path}:{line_no}: {value[:40]!r} is not a number of seconds; write e.g. '86400' "
                                 f"for one day ahead") from None
    if not 0.0 <= offset <= MAX_OFFSET_S:  # (NaN fails both comparisons)
        raise CalendarClockError(f"{path}:{line_no}: offset {value[:40]} s is outside 0 .. {MAX_OFFSET_S:.0f} s: the "
                                 "simulated calendar only runs ahead of the real clock (certificates must stay "
                                 "valid for OpenSSL's real-clock checks), by at most ten years")
    return offset


class CalendarClock:
    """The calendar: `wall()` plus the offset in `offset_file` (None: the wall clock itself).
    Thread-safe; `now()` costs a monotonic read, plus a stat() at most every `RECHECK_S`."""

    def __init__(self, offset_file: str | os.PathLike[str] | None, *, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.offset_file = Path(offset_file) if offset_file else None
        self._wall = wall
        self._mono = mono
        self._lock = threading.Lock()
        self._offset_s = 0.0
        self._checked_at: float | None = None
        self._seen: tuple[int, int, int] | None = None   # (inode, mtime ns, size) of the file last read
        self._good_read = False

    @property
    def simulated(self) -> bool:
        return self.offset_file is not None

    def now(self) -> float:
        return self._wall() + self.offset_s()

    def offset_s(self) -> float:
        if self.offset_file is None:
            return 0.0
        with self._lock:
            t = self._mono()
            if self._checked_at is None or t - self._checked_at >= RECHECK_S:
                self._checked_at = t
                self._refresh(self.offset_file)
            return self._offset_s

    def _refresh(self, path: Path) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            self._seen, self._offset_s, self._good_read = None, 0.0, True
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._seen:
            return
        self._seen = key
        try:
            offset = parse_offset(path.read_text(), str(path))
        except (OSError, UnicodeDecodeError, CalendarClockError) as e:
            if not self._good_read:
                raise CalendarClockError(str(e)) from e
            log.error("calendar offset file: %s; keeping the last good offset (%.0f s)", e, self._offset_s)
            return
        self._offset_s, self._good_read = offset, True

    def wait_s(self, planned_s: float) -> float:
        """How long a loop waiting for a calendar deadline `planned_s` away may sleep before it
        looks at the calendar again."""
        return min(planned_s, SIMULATED_WAIT_MAX_S) if self.simulated else planned_s

    def not_before_anchor_s(self, now_s: float) -> float:
        """Where a certificate issued at calendar time `now_s` starts (before the backdate): the
        earlier of `now_s` and the real clock when the calendar is simulated, so the certificate is
        valid for OpenSSL's real-clock checks too; `now_s` otherwise."""
        return min(now_s, self._wall()) if self.simulated else now_s


_calendar: CalendarClock | None = None
_calendar_lock = threading.Lock()


def calendar() -> CalendarClock:
    """This process's calendar (from `$MESHFED_CALENDAR_OFFSET_FILE`, read once)."""
    global _calendar
    if _calendar is None:
        with _calendar_lock:
            if _calendar is None:
                _calendar = CalendarClock(os.environ.get(CALENDAR_OFFSET_ENV) or None)
    return _calendar


def calendar_now() -> float:
    """The calendar's now, in seconds since the epoch: what every date decision takes."""
    return calendar().now()


def calendar_wait_s(planned_s: float) -> float:
    return calendar().wait_s(planned_s)


def steady_wall_clock(*, wall: Callable[[], float] | None = None,
                      mono: Callable[[], float] | None = None) -> Callable[[], float]:
    """An elapsed clock on the wall scale: the wall time when made, advanced by the monotonic
    clock only. Leases, debounce and backoff judged on it survive a wall-clock step."""
    mono_fn = mono if mono is not None else time.monotonic
    anchor_s = (wall if wall is not None else time.time)() - mono_fn()

    def now() -> float:
        return anchor_s + mono_fn()

    return now


def write_offset(path: str | os.PathLike[str], offset_s: float) -> None:
    """Set the simulated calendar's offset (atomically: readers see the old or the new number)."""
    parse_offset(f"{offset_s!r}", str(path))
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{offset_s!r}\n")
    os.replace(tmp, p)
