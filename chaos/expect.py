"""Verdicts: an experiment's expectations checked against what was measured. Pure, no I/O.

Inputs are plain data the engine collected — the load generator's records per client (JSON
objects: seq, start_s, latency_ms, outcome, cluster, pod, error), the experiment's timeline
(`chaos.analysis.TimelineEvent`), the controller's failover history (the status API's records:
at_s, kind, from_cluster, to_cluster, service, policy_file, trigger), and the text each log grew
by — and the figures `chaos.analysis.summarize` computed from them.

Every `Verdict` names the expectation (client, field, the bound, the file:line it was written
at), the measured figure, and the evidence a person needs to believe it: which requests (seq,
time since the run started, outcome, error), which events. A failed verdict's evidence is what
`chaos run` prints and what JUnit carries.

Definitions used here (the rest are `chaos.analysis`'s):
- *served-by segments*: ok requests in start order, each cluster mapped to the alternative of the
  expected `servedBy` list that names it; a segment starts when `run_length` consecutive ok
  requests are served by one alternative, so a stray request or two (a probe after an ejection
  expired) does not make a segment. Failed and indeterminate requests neither start nor break one.
- *steady state*: over the hypothesis window (ending one request timeout ago, so every request in
  it has finished), at least `minOkPercent` of the requests were ok *and* served by the expected
  cluster (the client's own for `local`). For traffic whose right answer is a refusal (`expectStatus`
  403: the mesh answers, no workload), ok alone: no cluster served it.
- *split*: a workload's share of the client's ok answers over the measured window (`answered_by`).
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chaos.analysis import FAIL, INDETERMINATE, OK, ChaosFigures, workload_of
from gitops.experiment import EventMatch, Expectation, Hypothesis, LogMatch
from gitops.problems import SourcePos

MAX_EVIDENCE = 5          # requests / events listed per verdict (the count says how many in all)
LOCAL = "local"

Record = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Verdict:
    client: str               # "" for experiment-wide checks
    name: str                 # "maxFailed", "servedBy", "steadyState (before)", …
    expected: str             # "<= 0", "[east, south, east]"
    measured: str             # "12", "[east, south]"
    ok: bool
    evidence: tuple[str, ...] = ()
    pos: SourcePos | None = None

    @property
    def title(self) -> str:
        who = f"{self.client}: " if self.client else ""
        return f"{who}{self.name} {self.expected}"

    def message(self) -> str:
        """One line for a terminal or a JUnit failure: expectation, measured, where it was written."""
        where = f" ({self.pos})" if self.pos is not None else ""
        return f"{self.title}: measured {self.measured}{where}"

    def as_dict(self) -> dict[str, Any]:
        return {"client": self.client, "name": self.name, "expected": self.expected, "measured": self.measured,
                "ok": self.ok, "evidence": list(self.evidence), "at": str(self.pos) if self.pos else None}


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of ok requests served by one alternative of `servedBy`."""

    alternative: tuple[str, ...]
    clusters: tuple[str, ...]       # who actually served within it
    first_seq: int
    first_start_s: float
    requests: int

    def label(self) -> str:
        return "|".join(self.alternative)


@dataclass(frozen=True, slots=True)
class ClientRun:
    """What one client saw during the measured window, plus what the analysis made of it."""

    client: str
    records: tuple[Record, ...]          # in start order, within the measured window, ignored workloads out
    figures: ChaosFigures
    fault_figures: Mapping[str, ChaosFigures] = field(default_factory=dict)   # by fault id


# --- helpers --------------------------------------------------------------------------------------


def ordered(records: Iterable[Record]) -> list[Record]:
    return sorted(records, key=lambda r: (float(r.get("start_s", 0.0)), int(r.get("seq", 0))))


def without_workloads(records: Iterable[Record], workloads: Sequence[str]) -> list[Record]:
    """Leave out ok requests a workload in `workloads` answered (e.g. a canary the fault does not
    touch, whose answers carry its cluster and would read as 'not failed over'). Failed and
    indeterminate requests stay: nothing answered them."""
    skip = set(workloads)
    if not skip:
        return list(records)
    return [r for r in records if not (r.get("outcome") == OK and workload_of(str(r.get("pod", ""))) in skip)]


def describe_request(r: Record, t0: float) -> str:
    where = f" by {r.get('cluster')}/{r.get('pod')}" if r.get("outcome") == OK else ""
    err = f" ({r.get('error')})" if r.get("error") else ""
    reused = ", kept connection" if r.get("reused") else ""
    return (f"request seq {r.get('seq')} at t={float(r.get('start_s', 0.0)) - t0:+.3f}s: {r.get('outcome')}"
            f"{where}{err}, {float(r.get('latency_ms', 0.0)):.0f} ms{reused}")


def describe_event(e: Record, t0: float) -> str:
    to = f" -> {e.get('to_cluster')}" if e.get("to_cluster") else ""
    pol = f" [{e.get('policy_file')}]" if e.get("policy_file") else ""
    return (f"event {e.get('kind')} {e.get('from_cluster') or e.get('service')}{to} at "
            f"t={float(e.get('at_s', 0.0)) - t0:+.3f}s: {e.get('trigger')}{pol}")


def _requests_evidence(bad: Sequence[Record], t0: float, what: str) -> tuple[str, ...]:
    if not bad:
        return ()
    lines = [f"{len(bad)} {what} request(s); the first {min(len(bad), MAX_EVIDENCE)}:"]
    lines += ["  " + describe_request(r, t0) for r in bad[:MAX_EVIDENCE]]
    if len(bad) > MAX_EVIDENCE:
        lines.append(f"  … the last: {describe_request(bad[-1], t0)}")
    return tuple(lines)


# --- served-by segments ---------------------------------------------------------------------------


def served_segments(records: Iterable[Record], alternatives: Sequence[Sequence[str]],
                    run_length: int) -> list[Segment]:
    """Segments of ok requests per alternative (a cluster no alternative names is its own)."""
    alt_of: dict[str, tuple[str, ...]] = {}
    for alt in alternatives:
        for c in alt:
            alt_of.setdefault(c, tuple(alt))
    segments: list[dict[str, Any]] = []
    run: list[Record] = []
    run_alt: tuple[str, ...] | None = None
    for r in ordered(records):
        if r.get("outcome") != OK:
            continue
        cluster = str(r.get("cluster") or "?")
        alt = alt_of.get(cluster, (cluster,))
        if alt != run_alt:
            run, run_alt = [], alt
        run.append(r)
        if segments and segments[-1]["alt"] == alt:
            segments[-1]["n"] += 1
            segments[-1]["clusters"].add(cluster)
        elif len(run) >= run_length:
            segments.append({"alt": alt, "clusters": {str(x.get("cluster")) for x in run}, "first": run[0],
                             "n": len(run)})
    return [Segment(s["alt"], tuple(sorted(s["clusters"])), int(s["first"].get("seq", 0)),
                    float(s["first"].get("start_s", 0.0)), int(s["n"])) for s in segments]


def _fmt_alts(alts: Sequence[Sequence[str]]) -> str:
    return "[" + ", ".join("|".join(a) for a in alts) + "]"


# --- the steady-state hypothesis ---------------------------------------------------------------------


def hypothesis_window(records: Iterable[Record], end_s: float, h: Hypothesis, timeout_s: float) -> list[Record]:
    """Requests started in [end − timeout − window, end − timeout): all of them have finished by `end`."""
    hi = end_s - timeout_s
    lo = hi - h.window_s
    return [r for r in records if lo <= float(r.get("start_s", 0.0)) < hi]


def check_hypothesis(client: str, window: Sequence[Record], h: Hypothesis, when: str,
                     min_requests: int = 1, refusal: bool = False) -> Verdict:
    """`refusal`: the traffic's right answer comes from the mesh (e.g. 403 from a waypoint's
    policy), so an ok request is the whole measure: no cluster served it."""
    want = client if h.served_by == LOCAL else h.served_by
    n = len(window)
    good = [r for r in window if r.get("outcome") == OK and (refusal or r.get("cluster") == want)]
    if refusal:
        want = "the mesh (expected status)"
    pct = 100.0 * len(good) / n if n else 0.0
    served = Counter(str(r.get("cluster") or "the mesh") for r in window if r.get("outcome") == OK)
    bad = Counter(str(r.get("outcome")) for r in window if r.get("outcome") != OK)
    measured = (f"{pct:.1f}% ok by {want} of {n} requests (ok by " +
                (", ".join(f"{c} {k}" for c, k in served.most_common()) or "nobody") + "; " +
                (", ".join(f"{k} {o}" for o, k in bad.items()) or "none failed") + ")")
    ok = n >= min_requests and pct >= h.min_ok_percent
    evidence: tuple[str, ...] = ()
    if n < min_requests:
        evidence = (f"only {n} request(s) finished in the {h.window_s:g} s window: is the client's load "
                    "generator running (see its job log)?",)
    return Verdict(client, f"steadyState ({when})", f">= {h.min_ok_percent:g}% ok by {want} over {h.window_s:g}s",
                   measured, ok, evidence)


# --- expectations -----------------------------------------------------------------------------------


def event_matches(m: EventMatch, e: Record) -> bool:
    if e.get("kind") != m.kind:
        return False
    if m.from_cluster and str(e.get("from_cluster")) != m.from_cluster:
        return False
    if m.to_cluster and m.to_cluster not in str(e.get("to_cluster") or "").split(","):
        return False
    if m.policy and not str(e.get("policy_file") or "").startswith(m.policy):
        return False
    return not m.service or service_matches(m.service, str(e.get("service") or ""))


def service_matches(wanted: str, hostname: str) -> bool:
    """'checkout', 'shop/checkout' or the full hostname, against an event's service hostname."""
    if wanted == hostname:
        return True
    if "/" in wanted:
        ns, _, name = wanted.partition("/")
        return hostname.startswith(f"{name}.{ns}.")
    return hostname.split(".", 1)[0] == wanted


def _bound(value: float | int | None, limit: float | int, unit: str = "") -> tuple[str, bool]:
    if value is None:
        return "n/a", False
    return (f"{value:.0f}{unit}" if isinstance(value, float) else f"{value}{unit}"), value <= limit


def check_expectation(e: Expectation, run: ClientRun, t0: float, events: Sequence[Record],
                      logs: Mapping[str, str], run_length: int) -> list[Verdict]:
    """Every field of one expectation, as verdicts (a field not set yields none)."""
    out: list[Verdict] = []
    recs = run.records
    fig = run.fault_figures.get(e.fault, run.figures) if e.fault else run.figures
    c = e.client

    def at(name: str) -> SourcePos:
        return e.field_pos.get(name, e.pos)

    if e.failover_within_s is not None:
        measured, ok = _bound(fig.time_to_shift_ms, e.failover_within_s * 1000.0, " ms")
        ev: list[str] = [f"fault: {fig.fault} at t={(fig.fault_at_s or t0) - t0:+.3f}s; shift target "
                         f"{fig.shift_cluster or 'none'}"]
        if fig.time_to_shift_ms is None:
            ev.append(f"why n/a: {fig.reason('time_to_shift_ms')}")
        else:
            ev.append(f"first of {run_length} consecutive ok requests served by {fig.shift_cluster} started "
                      f"{fig.time_to_shift_ms:.0f} ms after the fault; before it {fig.failed_before_shift} failed, "
                      f"{fig.indeterminate_before_shift} indeterminate")
        out.append(Verdict(c, "failoverWithin", f"<= {e.failover_within_s * 1000:.0f} ms", measured, ok,
                           tuple(ev), at("failoverWithin")))
    if e.failback_within_s is not None:
        measured, ok = _bound(fig.time_to_failback_ms, e.failback_within_s * 1000.0, " ms")
        ev = [f"heal at t={(fig.heal_at_s - t0):+.3f}s" if fig.heal_at_s is not None else "never healed"]
        if fig.time_to_failback_ms is None:
            ev.append(f"why n/a: {fig.reason('time_to_failback_ms')}")
        out.append(Verdict(c, "failbackWithin", f"<= {e.failback_within_s * 1000:.0f} ms", measured, ok,
                           tuple(ev), at("failbackWithin")))
    if e.max_failed is not None:
        bad = [r for r in recs if r.get("outcome") == FAIL]
        out.append(Verdict(c, "maxFailed", f"<= {e.max_failed}", str(len(bad)), len(bad) <= e.max_failed,
                           _requests_evidence(bad, t0, "failed"), at("maxFailed")))
    if e.min_failed is not None:
        bad = [r for r in recs if r.get("outcome") == FAIL]
        out.append(Verdict(c, "minFailed", f">= {e.min_failed}", str(len(bad)), len(bad) >= e.min_failed,
                           _requests_evidence(bad, t0, "failed") if len(bad) >= e.min_failed else
                           (f"only {len(bad)} request(s) failed: the fault did less harm than this experiment "
                            "says it must (was it applied? see the timeline)",), at("minFailed")))
    if e.max_indeterminate is not None:
        bad = [r for r in recs if r.get("outcome") == INDETERMINATE]
        out.append(Verdict(c, "maxIndeterminate", f"<= {e.max_indeterminate}", str(len(bad)),
                           len(bad) <= e.max_indeterminate, _requests_evidence(bad, t0, "indeterminate"),
                           at("maxIndeterminate")))
    if e.max_flaps is not None:
        measured, ok = _bound(fig.flaps, e.max_flaps)
        ev = [f"why n/a: {fig.reason('flaps')}"] if fig.flaps is None else \
            [f"excursions away from the settled cluster after the shift (and after failback): {fig.flaps}"]
        out.append(Verdict(c, "maxFlaps", f"<= {e.max_flaps}", measured, ok, tuple(ev), at("maxFlaps")))
    if e.min_ok_percent is not None:
        n = len(recs)
        okn = sum(1 for r in recs if r.get("outcome") == OK)
        pct = 100.0 * okn / n if n else 0.0
        bad = [r for r in recs if r.get("outcome") != OK]
        out.append(Verdict(c, "minOkPercent", f">= {e.min_ok_percent:g}%", f"{pct:.2f}% of {n}",
                           n > 0 and pct >= e.min_ok_percent, _requests_evidence(bad, t0, "not ok"),
                           at("minOkPercent")))
    if e.served_by is not None:
        segs = served_segments(recs, e.served_by, run_length)
        seen = [s.alternative for s in segs]
        ok = seen == [tuple(a) for a in e.served_by]
        ev = [f"segments ({run_length} consecutive ok requests start one):"]
        ev += [f"  {s.label()} from t={s.first_start_s - t0:+.3f}s (seq {s.first_seq}, {s.requests} ok requests, "
               f"served by {', '.join(s.clusters)})" for s in segs] or ["  none: no run of ok requests at all"]
        out.append(Verdict(c, "servedBy", _fmt_alts(e.served_by), _fmt_alts(seen), ok, tuple(ev), at("servedBy")))
    if e.served_during_fault or e.not_served_during_fault:
        out += _pods_during_fault(e, fig, recs, t0, at)
    for i, m in enumerate(e.events_include):
        hits = [x for x in events if event_matches(m, x)]
        kinds = Counter(str(x.get("kind")) for x in events)
        found = tuple(describe_event(x, t0) for x in hits[:MAX_EVIDENCE]) or (
            "the controller recorded: " + (", ".join(f"{k} ×{n}" for k, n in sorted(kinds.items())) or "nothing")
            + " in the experiment's window",)
        out.append(Verdict(c, "eventsInclude", m.describe(), f"{len(hits)} matching", bool(hits), found,
                           at(f"eventsInclude[{i}]")))
    for i, m in enumerate(e.events_exclude):
        hits = [x for x in events if event_matches(m, x)]
        out.append(Verdict(c, "eventsExclude", m.describe(), f"{len(hits)} matching", not hits,
                           tuple(describe_event(x, t0) for x in hits[:MAX_EVIDENCE]), at(f"eventsExclude[{i}]")))
    for i, lm in enumerate(e.logs_include):
        out.append(_check_log(c, lm, logs, at(f"logsInclude[{i}]")))
    total = sum(n for _, n in run.figures.answered_by)
    answered = dict(run.figures.answered_by)
    for i, sp in enumerate(e.split):
        share = 100.0 * answered.get(sp.workload, 0) / total if total else None
        ok = share is not None and abs(share - sp.percent) <= sp.tolerance
        measured = "n/a (no ok answer)" if share is None else f"{share:.1f}% of {total} ok answers"
        out.append(Verdict(c, "split", sp.describe(), measured, ok,
                           (f"ok answers by workload: {run.figures.answered_by_text}",), at(f"split[{i}]")))
    return out


def _pods_during_fault(e: Expectation, fig: ChaosFigures, recs: Sequence[Record], t0: float,
                       at: Any) -> list[Verdict]:
    """Which pods answered between the fault and its heal (ok requests, by `cluster/pod`). A pod may
    be a glob (`west/checkout-*`: any of them; which one a pooled upstream connection lands on is
    not the point)."""
    if fig.fault_at_s is None:
        return [Verdict(e.client, name, ", ".join(pods), "n/a", False, (f"why n/a: {fig.reason('time_to_detect_ms')}",),
                        at(name)) for name, pods in (("servedDuringFault", e.served_during_fault),
                                                     ("notServedDuringFault", e.not_served_during_fault)) if pods]
    lo, hi = fig.fault_at_s, fig.heal_at_s if fig.heal_at_s is not None else float("inf")
    during = [r for r in recs if lo <= float(r.get("start_s", 0.0)) < hi and r.get("outcome") == OK]
    by_pod = Counter(f"{r.get('cluster')}/{r.get('pod')}" for r in during)
    window = (f"while {fig.fault} lasted (t={lo - t0:+.3f}s to "
              + (f"t={hi - t0:+.3f}s)" if hi != float("inf") else "the end)"))
    seen = "ok answers by pod " + window + ": " + (", ".join(f"{p} {n}" for p, n in by_pod.most_common()) or "none")
    def answers(pattern: str) -> int:
        return sum(n for p, n in by_pod.items() if fnmatch.fnmatchcase(p, pattern))

    out = []
    for pod in e.served_during_fault:
        n = answers(pod)
        out.append(Verdict(e.client, "servedDuringFault", pod, f"{n} ok answers", n > 0, (seen,),
                           at("servedDuringFault")))
    for pod in e.not_served_during_fault:
        n = answers(pod)
        out.append(Verdict(e.client, "notServedDuringFault", pod, f"{n} ok answers", n == 0, (seen,),
                           at("notServedDuringFault")))
    return out


def _check_log(client: str, lm: LogMatch, logs: Mapping[str, str], pos: SourcePos) -> Verdict:
    text = logs.get(lm.source, "")
    lines = [ln for ln in text.splitlines() if lm.contains in ln]
    ev = tuple(ln[:400] for ln in lines[:2]) or (f"{lm.source}'s log grew by {len(text)} characters during the "
                                                  f"experiment, none containing the text",)
    return Verdict(client, "logsInclude", f"{lm.source} contains {lm.contains!r}", f"{len(lines)} line(s)",
                   bool(lines), ev, pos)


def passed(verdicts: Iterable[Verdict]) -> bool:
    return all(v.ok for v in verdicts)
