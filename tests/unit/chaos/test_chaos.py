"""chaos.analysis figures and chaos.report, on synthetic open-loop request sequences.

Requests are due every 10 ms from T0 (100 req/s); the fault is injected at T0 + 0.495 s, i.e. 5 ms
before request #50 starts, so "first request after the fault" figures come out at 5 ms + k·10 ms.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaos.analysis import (
    PHASE_AFTER,
    PHASE_BEFORE,
    PHASE_DURING,
    ChaosFigures,
    ChaosInputError,
    RequestRecord,
    faulted_cluster_of,
    records_from_jsonl,
    summarize,
)
from chaos.analysis import TimelineEvent as Ev
from chaos.report import render_markdown, write_report
from clusters.lab.loadgen import RequestResult

T0 = 1_000.0
STEP_S = 0.010
PRIORITY = ["east", "south", "west"]
FAULT_AT = T0 + 0.495


def build(*segments: tuple[int, str, str] | tuple[int, str, str, float]) -> list[dict[str, Any]]:
    """(count, outcome, cluster[, latency_ms]) segments → loadgen-style JSON objects, 10 ms apart."""
    out: list[dict[str, Any]] = []
    for seg in segments:
        count, outcome, cluster = seg[0], seg[1], seg[2]
        latency_ms = seg[3] if len(seg) == 4 else 2.0  # type: ignore[misc]
        for _ in range(count):
            n = len(out)
            out.append({"seq": n, "start_s": T0 + n * STEP_S, "latency_ms": latency_ms, "outcome": outcome,
                        "status": 200 if outcome == "ok" else 0, "cluster": cluster, "pod": "", "peer_identity": "",
                        "error": "" if outcome == "ok" else "timeout"})
    return out


def timeline(heal_at_s: float | None = None, target: str = "checkout in east") -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {"at_s": T0 + 0.2, "kind": "policy_pushed", "target": "fleet@abc123"},
        {"at_s": FAULT_AT, "kind": "fault_injected", "target": target, "fault": "kill"},
    ]
    if heal_at_s is not None:
        events.append({"at_s": heal_at_s, "kind": "fault_healed", "target": target})
    return events


HEAL_AT = T0 + 1.495  # 5 ms before request #150

CASES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]] = {
    "crash, zero failures": (
        build((50, "ok", "east"), (100, "ok", "south"), (50, "ok", "east")),
        timeline(HEAL_AT),
        {"time_to_detect_ms": 5.0, "time_to_symptom_ms": 7.0, "time_to_shift_ms": 5.0,
         "failed_before_shift": 0, "indeterminate_before_shift": 0, "flaps": 0,
         "time_to_failback_ms": 5.0, "failed_requests": 0},
    ),
    "crash, two failures then shift": (
        build((50, "ok", "east"), (2, "fail", "", 1.0), (98, "ok", "south"), (50, "ok", "east")),
        timeline(HEAL_AT),
        {"time_to_detect_ms": 5.0, "time_to_symptom_ms": 6.0, "time_to_shift_ms": 25.0,
         "failed_before_shift": 2, "indeterminate_before_shift": 0, "flaps": 0,
         "time_to_failback_ms": 5.0, "failed_requests": 2},
    ),
    "silent cut, timeouts then shift": (
        # request #49 is in flight at the fault and times out after the request was written
        build((49, "ok", "east"), (1, "indeterminate", "", 1000.0), (100, "fail", "", 1000.0),
              (100, "ok", "south")),
        timeline(),
        {"time_to_detect_ms": 5.0, "time_to_symptom_ms": 1005.0, "time_to_shift_ms": 1005.0,
         "failed_before_shift": 100, "indeterminate_before_shift": 1, "flaps": 0,
         "time_to_failback_ms": None, "failed_requests": 100, "indeterminate_requests": 1},
    ),
    "flapping after the shift and after the failback": (
        build((50, "ok", "east"), (10, "ok", "south"), (2, "ok", "east"), (10, "ok", "south"),
              (1, "ok", "east"), (1, "fail", ""), (76, "ok", "south"),
              (10, "ok", "east"), (1, "ok", "south"), (39, "ok", "east")),
        timeline(HEAL_AT),
        {"time_to_detect_ms": 5.0, "time_to_shift_ms": 5.0, "flaps": 3, "time_to_failback_ms": 5.0,
         "failed_before_shift": 0, "failed_requests": 1},
    ),
    "no shift at all": (
        build((50, "ok", "east"), (100, "fail", "", 3.0), (50, "ok", "east")),
        timeline(HEAL_AT),
        {"time_to_detect_ms": 5.0, "time_to_shift_ms": None, "failed_before_shift": None, "flaps": None,
         "time_to_failback_ms": 5.0, "failed_requests": 100},
    ),
    "failback after a jittery heal": (
        build((50, "ok", "east"), (100, "ok", "south"), (3, "ok", "south"), (1, "fail", ""),
              (2, "ok", "east"), (1, "indeterminate", "", 500.0), (43, "ok", "east")),
        timeline(HEAL_AT),
        {"time_to_shift_ms": 5.0, "time_to_failback_ms": 75.0, "flaps": 0, "failed_requests": 1,
         "indeterminate_requests": 1},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_figures(name: str) -> None:
    records, events, expected = CASES[name]
    f = summarize(records, events, PRIORITY, "east")
    for figure, value in expected.items():
        got = getattr(f, figure)
        assert got == (pytest.approx(value) if isinstance(value, float) else value), (figure, got, f.reasons)
        if value is None:
            assert f.reason(figure), f"{figure} is None without a reason"
        else:
            assert f.reason(figure) is None
    assert f.fault == "kill checkout in east"
    assert f.faulted_cluster == "east" and f.shift_cluster == "south"


def test_no_shift_reason_names_what_happened() -> None:
    records, events, _ = CASES["no shift at all"]
    f = summarize(records, events, PRIORITY, "east")
    reason = f.reason("time_to_shift_ms") or ""
    assert "5 consecutive ok requests served by south" in reason and "100 failed" in reason
    assert f.reason("flaps")


def test_traffic_to_the_wrong_cluster_is_no_shift_with_a_note() -> None:
    records = build((50, "ok", "east"), (100, "ok", "west"), (50, "ok", "east"))
    f = summarize(records, timeline(HEAL_AT), PRIORITY, "east")
    assert f.time_to_shift_ms is None
    assert "west 100" in (f.reason("time_to_shift_ms") or "")
    assert any("not the next-priority south" in n for n in f.notes)
    assert f.time_to_detect_ms == pytest.approx(5.0)


def test_fault_elsewhere_is_not_visible_and_expects_no_shift() -> None:
    records = build((200, "ok", "east"))
    f = summarize(records, timeline(HEAL_AT, target="checkout in west"), PRIORITY, "east")
    assert f.faulted_cluster == "west" and f.shift_cluster is None
    assert f.time_to_detect_ms is None and "not visible" in (f.reason("time_to_detect_ms") or "")
    assert "no shift was expected" in (f.reason("time_to_shift_ms") or "")
    assert f.time_to_failback_ms is None and f.reason("time_to_failback_ms")


def test_no_fault_event_leaves_every_figure_undetermined() -> None:
    f = summarize(build((30, "ok", "east")), [], PRIORITY, "east")
    assert f.time_to_detect_ms is None and f.time_to_shift_ms is None and f.flaps is None
    assert "no fault #0" in (f.reason("time_to_shift_ms") or "")
    assert f.requests == 30 and f.ok_pct == pytest.approx(100.0)


def test_no_records_says_so() -> None:
    f = summarize([], timeline(), PRIORITY, "east")
    assert f.requests == 0 and f.ok_pct is None
    assert "load generator" in (f.reason("time_to_detect_ms") or "")


def test_run_length_changes_what_counts_as_shifted() -> None:
    records = build((50, "ok", "east"), (1, "fail", ""), (2, "ok", "south"), (1, "fail", ""), (96, "ok", "south"))
    assert summarize(records, timeline(), PRIORITY, "east", run_length=1).time_to_shift_ms == pytest.approx(15.0)
    assert summarize(records, timeline(), PRIORITY, "east", run_length=3).time_to_shift_ms == pytest.approx(45.0)


def test_phases_and_served_by() -> None:
    records, events, _ = CASES["crash, two failures then shift"]
    f = summarize(records, events, PRIORITY, "east")
    before, during, after = f.phase(PHASE_BEFORE), f.phase(PHASE_DURING), f.phase(PHASE_AFTER)
    assert dict(before.served_by) == {"east": 50} and before.ok_pct == pytest.approx(100.0)
    assert dict(during.served_by) == {"south": 98} and during.failed == 2 and during.requests == 100
    assert dict(after.served_by) == {"east": 50}
    assert f.ok_pct == pytest.approx(100.0 * 198 / 200)


def test_accepts_loadgen_outcomes_and_jsonl() -> None:
    raw, events, _ = CASES["crash, two failures then shift"]
    outcomes = [RequestResult(**r) for r in raw]
    lines = [json.dumps(asdict(o)) for o in outcomes] + [""]
    a = summarize(outcomes, events, PRIORITY, "east")
    b = summarize(records_from_jsonl(lines), [Ev.coerce(e) for e in events], PRIORITY, "east")
    assert a == b
    assert a.as_dict() == json.loads(json.dumps(a.as_dict()))


@pytest.mark.parametrize(("bad", "needle"), [
    ({"seq": 1, "start_s": 1.0, "latency_ms": 1.0, "outcome": "maybe", "cluster": ""}, "not one of"),
    ({"seq": 1, "latency_ms": 1.0, "outcome": "ok"}, "start_s"),
])
def test_bad_records_say_what_to_fix(bad: dict[str, Any], needle: str) -> None:
    with pytest.raises(ChaosInputError, match=needle):
        summarize([bad], timeline(), PRIORITY, "east")


def test_bad_arguments() -> None:
    with pytest.raises(ChaosInputError, match="priority"):
        summarize([], [], [], "east")
    with pytest.raises(ChaosInputError, match="run_length"):
        summarize([], [], PRIORITY, "east", run_length=0)
    with pytest.raises(ChaosInputError, match="line 1 is not JSON"):
        records_from_jsonl(['{"seq": 1'])


@pytest.mark.parametrize(("event", "expected"), [
    (Ev(1.0, "fault_injected", target="checkout in south"), "south"),
    (Ev(1.0, "fault_injected", target="gateway west-gw", cluster="west"), "west"),
    (Ev(1.0, "fault_injected", target="wan link"), "east"),
    (Ev(1.0, "fault_injected", target="southern pods"), "east"),
])
def test_faulted_cluster(event: Ev, expected: str) -> None:
    assert faulted_cluster_of(event, PRIORITY) == expected


# -- properties ------------------------------------------------------------------------------------

step = st.tuples(st.sampled_from(["ok", "ok", "ok", "fail", "indeterminate"]),
                 st.sampled_from(["east", "south", "west", ""]),
                 st.floats(min_value=0.0, max_value=3000.0, allow_nan=False))


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(step, max_size=120), fault_i=st.integers(0, 130), heal_gap=st.integers(0, 130),
       run_length=st.integers(1, 6), heal=st.booleans())
def test_properties(steps: list[tuple[str, str, float]], fault_i: int, heal_gap: int, run_length: int,
                    heal: bool) -> None:
    records = [RequestRecord(seq=i, start_s=T0 + i * STEP_S, latency_ms=lat, outcome=o, cluster=c)
               for i, (o, c, lat) in enumerate(steps)]
    fault_at = T0 + fault_i * STEP_S - 0.003
    events = [Ev(fault_at, "fault_injected", target="checkout in east")]
    if heal:
        events.append(Ev(fault_at + heal_gap * STEP_S, "fault_healed", target="checkout in east"))
    f = summarize(records, events, PRIORITY, "east", run_length=run_length)

    assert f.ok_requests + f.failed_requests + f.indeterminate_requests == f.requests == len(records)
    assert sum(p.requests for p in f.phases) == f.requests
    for p in f.phases:
        assert p.ok + p.failed + p.indeterminate == p.requests
        assert sum(n for _, n in p.served_by) == p.ok
    if f.time_to_shift_ms is not None:
        assert f.time_to_detect_ms is not None and f.time_to_shift_ms >= f.time_to_detect_ms >= 0
        assert f.failed_before_shift is not None and f.failed_before_shift <= f.failed_requests
        assert f.indeterminate_before_shift is not None
        assert f.indeterminate_before_shift <= f.indeterminate_requests
        assert f.flaps is not None and f.flaps >= 0
    if f.time_to_failback_ms is not None:
        assert f.time_to_failback_ms >= 0
    for name in ("time_to_detect_ms", "time_to_symptom_ms", "time_to_shift_ms", "failed_before_shift",
                 "flaps", "time_to_failback_ms"):
        assert (getattr(f, name) is None) == (f.reason(name) is not None), name


# -- the report ------------------------------------------------------------------------------------

def _two_clients() -> tuple[dict[str, ChaosFigures], dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    east_records, events, _ = CASES["crash, two failures then shift"]
    south_records = build((200, "ok", "south"))
    figures = {"east": summarize(east_records, events, PRIORITY, "east"),
               "south": summarize(south_records, events, ["south", "east", "west"], "south")}
    return figures, {"east": east_records, "south": south_records}, events


def test_write_report(tmp_path: Path) -> None:
    import matplotlib.image

    figures, records, events = _two_clients()
    paths = write_report(tmp_path / "out", "meshfed demo", figures, records, events)

    md = paths.markdown.read_text()
    assert md.startswith("# meshfed demo")
    assert "| time to shift | 25.0 ms | n/a |" in md
    assert "| failed before shift | 2 | n/a |" in md
    assert "| +0.495 | fault injected: kill checkout in east |" in md
    assert "client east: traffic served by south" in md
    assert "no shift was expected" in md  # south's reason
    assert "![which cluster served each request](timeline.png)" in md

    png = paths.timeline_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(str(paths.timeline_png)).shape[:2]
    assert width >= 800 and height >= 300

    data = json.loads(paths.figures_json.read_text())
    assert data["clients"]["east"]["time_to_shift_ms"] == pytest.approx(25.0)


def test_report_without_records_or_events_still_renders(tmp_path: Path) -> None:
    f = summarize([], [], PRIORITY, "east")
    paths = write_report(tmp_path, "empty run", {"east": f}, {"east": []}, [])
    assert paths.timeline_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| time to detect | n/a |" in paths.markdown.read_text()


def test_markdown_story_is_in_time_order() -> None:
    figures, _, events = _two_clients()
    md = render_markdown("t", figures, [Ev.coerce(e) for e in events], T0, "timeline.png")
    story = [line for line in md.splitlines() if line.startswith("| +")]
    times = [float(line.split("|")[1]) for line in story]
    assert times == sorted(times) and len(story) >= 5
