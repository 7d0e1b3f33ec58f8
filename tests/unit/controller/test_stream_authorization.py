"""When an authenticated stream is due to end: at the not-after of the certificate that opened it,
on the calendar (`federation.controller.stream_authorization`)."""

from __future__ import annotations

import pytest

from federation.controller.stream_authorization import (
    COMPACT_FACTOR,
    COMPACT_SLACK,
    StreamExpiries,
    stream_expired,
)

NOT_AFTER_S = 1_800_000_000.0


@pytest.mark.parametrize(("now_s", "due"), [
    (NOT_AFTER_S - 3600.0, False),    # an hour to go
    (NOT_AFTER_S - 0.001, False),     # the last instant of validity
    (NOT_AFTER_S, True),              # not-after reached: no skew tolerance for our own CA's leaves
    (NOT_AFTER_S + 60.0, True),       # within the verifier's 120 s skew, still due: see the module doc
    (NOT_AFTER_S + 86400.0 * 30, True),   # a calendar that jumped a month
])
def test_a_stream_is_due_to_end_when_the_calendar_reaches_its_certificates_not_after(now_s: float, due: bool) -> None:
    assert stream_expired(NOT_AFTER_S, now_s) is due


def test_due_streams_come_out_earliest_first_and_only_once() -> None:
    leases: StreamExpiries[str] = StreamExpiries()
    leases.bind("late", NOT_AFTER_S + 100)
    leases.bind("early", NOT_AFTER_S)
    leases.bind("middle", NOT_AFTER_S + 50)
    assert leases.due(NOT_AFTER_S - 1) == []
    assert leases.due(NOT_AFTER_S + 60) == ["early", "middle"]
    assert leases.due(NOT_AFTER_S + 60) == []                     # released when found due
    assert len(leases) == 1 and "late" in leases and "early" not in leases
    assert leases.due(NOT_AFTER_S + 10_000) == ["late"]
    assert len(leases) == 0


def test_a_stream_that_ended_on_its_own_is_never_reported_due() -> None:
    leases: StreamExpiries[str] = StreamExpiries()
    leases.bind("closed", NOT_AFTER_S)
    leases.bind("open", NOT_AFTER_S)
    leases.release("closed")
    leases.release("never-bound")                                 # ignored
    assert leases.due(NOT_AFTER_S) == ["open"]


def test_a_key_reused_after_release_is_judged_on_its_new_binding_only() -> None:
    leases: StreamExpiries[str] = StreamExpiries()
    leases.bind("s", NOT_AFTER_S)
    leases.release("s")
    leases.bind("s", NOT_AFTER_S + 3600)                          # a renewed certificate
    assert leases.due(NOT_AFTER_S + 1) == []
    assert leases.due(NOT_AFTER_S + 3600) == ["s"]


def test_a_stream_is_bound_once() -> None:
    leases: StreamExpiries[str] = StreamExpiries()
    leases.bind("s", NOT_AFTER_S)
    with pytest.raises(ValueError, match="already bound"):
        leases.bind("s", NOT_AFTER_S + 3600)


def test_a_reconnect_storm_does_not_grow_the_heap_without_bound() -> None:
    """Streams that end on their own long before their certificate leave entries behind; the heap
    is compacted so that it stays within a constant factor of the open streams."""
    leases: StreamExpiries[int] = StreamExpiries()
    leases.bind(-1, NOT_AFTER_S)                                  # one long-lived stream
    for i in range(10_000):
        leases.bind(i, NOT_AFTER_S + i)
        leases.release(i)
    assert len(leases) == 1
    assert len(leases._heap) <= COMPACT_FACTOR * len(leases) + COMPACT_SLACK + 1
    assert leases.due(NOT_AFTER_S + 20_000) == [-1]
