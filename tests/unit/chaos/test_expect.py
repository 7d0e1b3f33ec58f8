"""Verdicts from synthetic runs (pure): every expectation passes when it holds and fails — naming the
measured figure and the evidence (which requests, which events) — when it does not; the steady-state
hypothesis; served-by segments; JUnit XML that parses."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from types import MappingProxyType
from typing import Any

import pytest

from chaos.analysis import summarize
from chaos.expect import (
    ClientRun,
    Verdict,
    check_expectation,
    check_hypothesis,
    event_matches,
    hypothesis_window,
    served_segments,
    service_matches,
    without_workloads,
)
from chaos.junit import ERROR, FAILED, PASSED, XFAIL, CaseResult, to_xml
from gitops.experiment import EventMatch, Expectation, Hypothesis, LogMatch
from gitops.problems import SourcePos

T0 = 5_000.0
STEP_S = 0.04          # 25 requests/s
FAULT_AT = T0 + 4.0    # request #100 starts at the fault
HEAL_AT = T0 + 12.0    # request #300
POS = SourcePos("examples/chaos/x.yaml", 30, 7)


def build(*segments: tuple[int, str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for count, outcome, cluster in segments:
        for _ in range(count):
            n = len(out)
            out.append({"seq": n, "start_s": T0 + n * STEP_S, "latency_ms": 3.0, "outcome": outcome,
                        "cluster": cluster if outcome == "ok" else "", "pod": "checkout-0",
                        "error": "" if outcome == "ok" else "ConnectionRefusedError: [Errno 111]"})
    return out


TIMELINE = [{"at_s": FAULT_AT, "kind": "fault_injected", "target": "pod east/shop/checkout-*", "cluster": "east",
             "fault": "crash: kill"},
            {"at_s": HEAL_AT, "kind": "fault_healed", "target": "pod east/shop/checkout-*", "cluster": "east",
             "fault": "crash: kill"}]
EVENTS = [{"at_s": FAULT_AT + 0.3, "kind": "FailedOver", "from_cluster": "east", "to_cluster": "south",
           "service": "checkout.shop.svc.clusterset.local", "policy_file": "policies/shop/checkout.yaml:3:1",
           "trigger": "discovery: new observation from east"},
          {"at_s": HEAL_AT + 2.0, "kind": "FailedBack", "from_cluster": "east", "to_cluster": "",
           "service": "checkout.shop.svc.clusterset.local", "policy_file": "policies/shop/checkout.yaml:3:1",
           "trigger": "discovery"}]


def run_of(records: list[dict[str, Any]]) -> ClientRun:
    fig = summarize(records, TIMELINE, ["east", "south", "west"], "east")
    return ClientRun("east", tuple(records), fig, {"crash": fig})


def expect(**kw: Any) -> Expectation:
    fp = {k: SourcePos("examples/chaos/x.yaml", 31 + i, 7) for i, k in enumerate(
        ("failoverWithin", "failbackWithin", "maxFailed", "minFailed", "maxIndeterminate", "maxFlaps", "servedBy"))}
    return Expectation(client="east", pos=POS, field_pos=MappingProxyType(fp), **kw)


GOOD = build((100, "ok", "east"), (2, "fail", ""), (198, "ok", "south"), (100, "ok", "east"))


def verdicts(e: Expectation, records: list[dict[str, Any]] = GOOD, events: list[dict[str, Any]] = EVENTS,
             logs: dict[str, str] | None = None) -> list[Verdict]:
    return check_expectation(e, run_of(records), T0, events, logs or {}, 5)


def test_a_crash_that_failed_over_and_back_meets_its_slos() -> None:
    vs = verdicts(expect(failover_within_s=0.2, failback_within_s=1.0, max_failed=2, max_indeterminate=0,
                         max_flaps=0, min_ok_percent=99.0, served_by=(("east",), ("south",), ("east",)),
                         events_include=(EventMatch("FailedOver", "east", "south", "policies/shop/checkout.yaml"),
                                         EventMatch("FailedBack", "east")),
                         events_exclude=(EventMatch("ClusterLeaseExpired"),)))
    assert [v.name for v in vs] == ["failoverWithin", "failbackWithin", "maxFailed", "maxIndeterminate", "maxFlaps",
                                    "minOkPercent", "servedBy", "eventsInclude", "eventsInclude", "eventsExclude"]
    assert all(v.ok for v in vs), [v.message() for v in vs if not v.ok]
    shift = vs[0]
    assert shift.measured == "80 ms" and shift.pos == SourcePos("examples/chaos/x.yaml", 31, 7)


def test_max_failed_zero_on_a_fault_that_loses_requests_names_the_requests() -> None:
    (v,) = verdicts(expect(max_failed=0))
    assert not v.ok and v.measured == "2"
    assert v.message() == "east: maxFailed <= 0: measured 2 (examples/chaos/x.yaml:33:7)"
    assert v.evidence[0] == "2 failed request(s); the first 2:"
    assert "request seq 100 at t=+4.000s: fail (ConnectionRefusedError: [Errno 111])" in v.evidence[1]
    assert "request seq 101" in v.evidence[2]


def test_min_failed_states_the_damage_a_fault_must_do() -> None:
    (v,) = verdicts(expect(min_failed=2))
    assert v.ok
    (v,) = verdicts(expect(min_failed=50))
    assert not v.ok and "only 2 request(s) failed" in v.evidence[0]


def test_served_by_lists_the_segments_it_saw() -> None:
    stuck = build((100, "ok", "east"), (300, "ok", "south"))
    (v,) = verdicts(expect(served_by=(("east",), ("south",), ("east",))), stuck)
    assert not v.ok and v.measured == "[east, south]" and v.expected == "[east, south, east]"
    assert "south from t=+4.000s (seq 100, 300 ok requests, served by south)" in v.evidence[2]


def test_failover_within_fails_with_the_reason_when_there_was_no_shift() -> None:
    no_shift = build((100, "ok", "east"), (200, "fail", ""), (100, "ok", "east"))
    (v,) = verdicts(expect(failover_within_s=2.0), no_shift)
    assert not v.ok and v.measured == "n/a"
    assert any("no run of 5 consecutive ok requests served by south" in line for line in v.evidence)


def test_failback_too_slow() -> None:
    slow = build((100, "ok", "east"), (300, "ok", "south"), (25, "ok", "east"))
    (v,) = verdicts(expect(failback_within_s=0.5), slow)
    assert not v.ok and v.measured == "4000 ms"


def test_events_include_and_exclude_name_what_the_controller_recorded() -> None:
    (missing,) = verdicts(expect(events_include=(EventMatch("FailedOver", "east", "west"),)))
    assert not missing.ok and missing.measured == "0 matching"
    assert missing.evidence == ("the controller recorded: FailedBack ×1, FailedOver ×1 in the experiment's window",)
    (present,) = verdicts(expect(events_exclude=(EventMatch("FailedOver", "east"),)))
    assert not present.ok and present.evidence[0].startswith("event FailedOver east -> south at t=+4.300s")


def test_logs_include() -> None:
    e = expect(logs_include=(LogMatch("ztunnel/east/node-2", "clocks is wrong"),))
    (v,) = verdicts(e, logs={"ztunnel/east/node-2": '{"kind":"handshake"}\n{"error":"one of the two clocks is wrong"}\n'})
    assert v.ok and "clocks is wrong" in v.evidence[0]
    (v,) = verdicts(e, logs={"ztunnel/east/node-2": "nothing\n"})
    assert not v.ok and "grew by 8 characters" in v.evidence[0]


@pytest.mark.parametrize(("wanted", "hostname", "ok"), [
    ("checkout", "checkout.shop.svc.clusterset.local", True),
    ("shop/checkout", "checkout.shop.svc.clusterset.local", True),
    ("checkout.shop.svc.clusterset.local", "checkout.shop.svc.clusterset.local", True),
    ("checkout", "checkout-v2.shop.svc.clusterset.local", False),
    ("other/checkout", "checkout.shop.svc.clusterset.local", False),
])
def test_service_matching(wanted: str, hostname: str, ok: bool) -> None:
    assert service_matches(wanted, hostname) is ok
    assert event_matches(EventMatch("FailedOver", service=wanted), {"kind": "FailedOver", "service": hostname}) is ok


def test_segments_need_a_run_and_alternatives_merge() -> None:
    stray = build((50, "ok", "east"), (3, "ok", "south"), (50, "ok", "east"))
    assert [s.label() for s in served_segments(stray, [("east",)], 5)] == ["east"]
    mixed = build((50, "ok", "east"), (2, "ok", "west"), (2, "ok", "north"), (3, "ok", "west"), (4, "ok", "north"),
                  (50, "ok", "east"))
    segs = served_segments(mixed, [("east",), ("west", "north"), ("east",)], 5)
    assert [s.label() for s in segs] == ["east", "west|north", "east"]
    assert segs[1].clusters == ("north", "west") and segs[1].requests == 11


def test_the_steady_state_hypothesis() -> None:
    recs = build((100, "ok", "east"), (10, "fail", ""), (90, "ok", "south"))
    h = Hypothesis(99.0, "local", 2.0)
    early = hypothesis_window(recs, T0 + 4.0 + 1.0, h, 1.0)       # [T0+2, T0+4): all east
    assert len(early) == 50
    assert check_hypothesis("east", early, h, "before").ok
    late = hypothesis_window(recs, T0 + 8.0, h, 1.0)              # [T0+5, T0+7): south
    v = check_hypothesis("east", late, h, "after")
    assert not v.ok and v.measured.startswith("0.0% ok by east of 50 requests (ok by south 50")
    assert not check_hypothesis("east", [], h, "before", min_requests=10).ok


def test_ignored_workloads_drop_only_their_ok_answers() -> None:
    recs = [{"outcome": "ok", "pod": "checkout-v2-0"}, {"outcome": "ok", "pod": "checkout-1"},
            {"outcome": "fail", "pod": ""}]
    assert without_workloads(recs, ["checkout-v2"]) == recs[1:]


def test_junit_xml_parses_and_says_what_failed() -> None:
    failed = verdicts(expect(max_failed=0))
    ok = verdicts(expect(max_flaps=0))
    cases = [CaseResult("backend-crash", "examples/chaos/backend-crash.yaml", PASSED, 26.2, tuple(ok)),
             CaseResult("crash-broken", "x.yaml", FAILED, 30.0, tuple(ok + failed), report="out/crash-broken/report.md"),
             CaseResult("lab-broke", "y.yaml", ERROR, 1.0, (), error="the lab did not come up: <sandbox & co>"),
             CaseResult("hang", "z.yaml", XFAIL, 20.0, tuple(failed), expected_failure="L4 cannot see it")]
    root = ET.fromstring(to_xml(cases, timestamp_s=0.0))
    assert root.tag == "testsuites" and root.attrib["tests"] == "4"
    assert (root.attrib["failures"], root.attrib["errors"], root.attrib["skipped"]) == ("1", "1", "1")
    (suite,) = root.findall("testsuite")
    tc = {c.attrib["name"]: c for c in suite.findall("testcase")}
    assert tc["backend-crash"].find("failure") is None and tc["backend-crash"].attrib["time"] == "26.200"
    failure = tc["crash-broken"].find("failure")
    assert failure is not None
    assert failure.attrib["message"] == "east: maxFailed <= 0: measured 2 (examples/chaos/x.yaml:33:7)"
    assert "request seq 100" in (failure.text or "")
    err = tc["lab-broke"].find("error")
    assert err is not None and err.attrib["message"] == "the lab did not come up: <sandbox & co>"
    skipped = tc["hang"].find("skipped")
    assert skipped is not None and skipped.attrib["message"] == "expected failure: L4 cannot see it"
    out = tc["crash-broken"].find("system-out")
    assert out is not None and "report: out/crash-broken/report.md" in (out.text or "")


def test_the_run_summary_has_a_row_per_experiment_and_per_expectation() -> None:
    from chaos.report import summary_markdown

    ok = verdicts(expect(max_flaps=0, served_by=(("east",), ("south",), ("east",))))
    bad = verdicts(expect(max_failed=0))
    steady = [Verdict("east", "steadyState (before)", ">= 99% ok by east over 3s", "50.0% ok by east of 60", False)]
    md = summary_markdown([("crash", "passed", "", ok), ("broken", "failed", "", bad),
                           ("starved", "failed", "", steady), ("lab", "error", "the lab did not come up", [])], "run")
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert rows[1] == ("| crash | east maxFlaps <= 0; east servedBy [east, south, east] | 0; [east, south, east] "
                       "| yes |")
    assert rows[2] == "| broken | east maxFailed <= 0 | 2 | **no** (failed) |"
    assert "steadyState (before): 50.0% ok by east of 60" in rows[3]
    assert rows[4] == "| lab | — | error: the lab did not come up | **no** (error) |"
    assert "| broken | east | maxFailed | <= 0 | 2 | **no** |" in md


def test_which_pods_answered_while_the_fault_lasted() -> None:
    recs = build((100, "ok", "east"), (200, "ok", "east"), (100, "ok", "east"))
    for r in recs[100:300]:
        r["pod"] = "checkout-1" if r["seq"] % 2 else "checkout-0"
    e = expect(served_during_fault=("east/checkout-1",), not_served_during_fault=("east/checkout-9",))
    served, not_served = verdicts(e, recs)
    assert served.ok and served.measured == "100 ok answers"
    assert not_served.ok and "east/checkout-0 100, east/checkout-1 100" in served.evidence[0]
    e = expect(not_served_during_fault=("east/checkout-1",))
    (v,) = verdicts(e, recs)
    assert not v.ok and v.measured == "100 ok answers" and "t=+4.000s to t=+12.000s" in v.evidence[0]


# --- HTTP-level figures: a waypoint's per-request split, a refused method ------------------------------


def answered(pods: list[str], status: int = 200, outcome: str = "ok") -> list[dict[str, Any]]:
    return [{"seq": n, "start_s": T0 + n * STEP_S, "latency_ms": 3.0, "outcome": outcome, "status": status,
             "cluster": "east" if status == 200 else "", "pod": pod, "error": ""} for n, pod in enumerate(pods)]


def test_split_is_each_workloads_share_of_the_ok_answers() -> None:
    from gitops.experiment import SplitExpect

    recs = answered(["checkout-0", "checkout-1", "checkout-0", "checkout-v2-0"] * 50)   # 75 / 25
    recs += [{**recs[0], "seq": 999, "outcome": "fail", "status": 503, "pod": ""}]      # not an answer
    fig = summarize(recs, [], ["east"], "east")
    assert fig.answered_by == (("checkout", 150), ("checkout-v2", 50))
    assert fig.statuses == ((200, 200), (503, 1))
    assert fig.as_dict()["answered_by"] == {"checkout": 150, "checkout-v2": 50}
    run = ClientRun("east", tuple(recs), fig)
    e = Expectation(client="east", pos=POS, split=(SplitExpect("checkout-v2", 20.0, 3.0),
                                                    SplitExpect("checkout", 80.0, 5.0)))
    v2, v1 = check_expectation(e, run, T0, [], {}, 5)
    assert (v2.name, v2.expected, v2.measured, v2.ok) == ("split", "checkout-v2 20% ± 3", "25.0% of 200 ok answers",
                                                          False)
    assert v2.evidence == ("ok answers by workload: checkout 75.0% (150), checkout-v2 25.0% (50)",)
    assert v1.ok    # 75 % is within 80 ± 5
    (none,) = check_expectation(Expectation(client="east", pos=POS, split=(SplitExpect("checkout", 80.0, 5.0),)),
                                ClientRun("east", (), summarize([], [], ["east"], "east")), T0, [], {}, 5)
    assert not none.ok and none.measured == "n/a (no ok answer)"


def test_a_refusal_the_traffic_expects_holds_the_steady_state_without_a_serving_cluster() -> None:
    """DELETE denied at a waypoint: 403 is the right answer (the load generator counts it ok) and no
    workload, hence no cluster, answered it."""
    window = answered([""] * 20, status=403)
    h = Hypothesis(99.0, "local", 4.0)
    assert check_hypothesis("west", window, h, "before", refusal=True).ok
    assert not check_hypothesis("west", window, h, "before").ok          # as served traffic: nobody served it
    leaked = window[:19] + answered(["checkout-0"], status=200, outcome="fail")   # a DELETE that got through
    assert not check_hypothesis("west", leaked, Hypothesis(100.0, "local", 4.0), "before", refusal=True).ok


def test_pods_served_during_a_fault_may_be_a_glob() -> None:
    recs = build((100, "ok", "east"), (200, "ok", "south"), (100, "ok", "east"))
    for r in recs:
        if r["cluster"] == "south":
            r["pod"] = "checkout-1"
    v1, v2, v3 = verdicts(expect(served_during_fault=("south/checkout-*", "south/checkout-0"),
                                 not_served_during_fault=("east/*",)), recs)
    assert (v1.ok, v1.measured) == (True, "200 ok answers")
    assert (v2.ok, v2.measured) == (False, "0 ok answers")
    assert v3.ok
