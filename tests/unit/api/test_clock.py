"""The two clocks (`ztunnel.api.clock`): the calendar, which the lab's soak moves through an offset
file, and the steady elapsed clock on the wall scale. Pure: fake wall and monotonic clocks, a
temporary offset file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ztunnel.api.clock import (
    RECHECK_S,
    SIMULATED_WAIT_MAX_S,
    CalendarClock,
    CalendarClockError,
    parse_offset,
    steady_wall_clock,
    write_offset,
)

WALL_S = 1_800_000_000.0


class Fake:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def test_without_an_offset_file_the_calendar_is_the_wall_clock() -> None:
    cal = CalendarClock(None, wall=Fake(WALL_S), mono=Fake(0.0))
    assert not cal.simulated and cal.now() == WALL_S
    assert cal.wait_s(45.0) == 45.0 and cal.not_before_anchor_s(WALL_S + 10) == WALL_S + 10


def test_the_calendar_follows_the_offset_file_rechecked_at_most_every_interval(tmp_path: Path) -> None:
    path = tmp_path / "offset"
    mono = Fake(100.0)
    cal = CalendarClock(path, wall=Fake(WALL_S), mono=mono)
    assert cal.simulated and cal.now() == WALL_S        # no file yet: offset 0
    write_offset(path, 86400.0)
    assert cal.now() == WALL_S                           # not re-read within RECHECK_S
    mono.now_s += 2 * RECHECK_S
    assert cal.now() == WALL_S + 86400.0
    write_offset(path, 2 * 86400.0)
    mono.now_s += 2 * RECHECK_S
    assert cal.now() == WALL_S + 2 * 86400.0
    # certificates start at the real clock, so OpenSSL (real clock) accepts them too
    assert cal.not_before_anchor_s(cal.now()) == WALL_S
    assert cal.wait_s(3600.0) == SIMULATED_WAIT_MAX_S and cal.wait_s(0.2) == 0.2


def test_bad_content_names_the_file_and_line_and_later_keeps_the_last_good_offset(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "offset"
    path.write_text("# days ahead\nsoon\n")
    mono = Fake(0.0)
    cal = CalendarClock(path, wall=Fake(WALL_S), mono=mono)
    with pytest.raises(CalendarClockError, match=rf"{path}:2: 'soon' is not a number of seconds"):
        cal.now()
    path.write_text("3600\n")
    mono.now_s += 2 * RECHECK_S
    assert cal.now() == WALL_S + 3600.0
    path.write_text("-5\n")
    os.utime(path, ns=(1, 1))   # a different mtime even within the filesystem's timestamp granularity
    mono.now_s += 2 * RECHECK_S
    assert cal.now() == WALL_S + 3600.0 and "keeping the last good offset" in caplog.text


@pytest.mark.parametrize("text, words", [
    ("", "exactly one number"), ("1\n2\n", "found 2 values"), ("nan", "outside"), ("-1", "outside"),
    ("1e12", "outside"), ("inf", "outside"),
])
def test_parse_offset_refuses(text: str, words: str) -> None:
    with pytest.raises(CalendarClockError, match=words):
        parse_offset(text, "/run/offset")


def test_the_steady_clock_ignores_wall_clock_steps() -> None:
    wall, mono = Fake(WALL_S), Fake(7.0)
    clock = steady_wall_clock(wall=wall, mono=mono)
    assert clock() == WALL_S
    wall.now_s -= 3600.0        # NTP steps the wall clock back an hour
    mono.now_s += 1.5
    assert clock() == WALL_S + 1.5
