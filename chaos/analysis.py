"""Chaos figures: what one client saw while a fault was injected and healed. Pure analysis, no I/O.

Inputs are what the open-loop load generator (`clusters/lab/loadgen.py`) records for each request
— `seq`, `start_s` (wall clock when the request was due), `latency_ms`, `outcome` in
{ok, fail, indeterminate} and the `cluster` that served it — plus the experiment's timeline (events
`{"at_s", "kind", "target", "fault"}` with kinds `fault_injected`, `fault_healed`,
`policy_pushed`, …, on the same wall clock as `start_s`) and the priority order of clusters the
client is expected to be served from (`["east", "south", "west"]`).

Definitions (F = the analysed fault's `at_s`, H = the matching heal's `at_s`, N = `run_length`).
Requests are ordered by (start_s, seq); "end" of a request is start_s + latency_ms.

- *preferred* cluster: `priority[0]`. *Faulted* cluster: the event's `cluster` field if present,
  else the first priority cluster named as a word in its `target` ("checkout in east"), else the
  preferred cluster. A shift is expected only when the faulted cluster is the preferred one; the
  *shift target* is then `priority[1]`.
- phases partition the requests by start time: before [.., F), during [F, H), after [H, ..);
  without a heal "during" runs to the end.
- `time_to_detect_ms`: F → the start of the first request started at or after F that did not
  succeed or was served by a cluster other than the preferred one (the first request whose outcome
  shows the fault). Quantised by the request interval; it is the *onset* seen by the load.
- `time_to_symptom_ms`: F → the earliest end among those requests, i.e. when the client first held
  evidence of the fault (for a silent cut this is about the connect timeout).
- `time_to_shift_ms`: F → the start of the first run of N consecutive requests (started at or
  after F, the run starting before H) that are all ok and served by the shift target.
  Always ≥ `time_to_detect_ms`: the run's first request is itself such evidence.
- `failed_before_shift` / `indeterminate_before_shift`: requests still in flight at F or started
  after it (end ≥ F) and started before the shift, by outcome. These are the fault's casualties.
- `flaps`: excursions after the shift settled — each maximal stretch of ok requests served by some
  cluster other than the settled one counts once. Settled cluster: the shift target in
  [shift, H); the preferred cluster after the failback settled. The failback itself (the stretch
  [H, failback)) is planned and not counted.
- `time_to_failback_ms`: H → the start of the first run of N consecutive ok requests served by the
  preferred cluster, among requests started at or after H.
- `served_by`: ok requests per cluster per phase; `ok_pct`: percent of requests that were ok.
- HTTP figures (whole run): `statuses`, requests per response status (0: no response); and
  `answered_by`, ok requests per answering workload (the pod's name without its ordinal: the share
  each version of a per-request canary split got at a waypoint).

A figure that cannot be determined is None, and `reasons[figure]` says why, in words an operator
can act on (which cluster traffic went to instead, which event is missing).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

OK, FAIL, INDETERMINATE = "ok", "fail", "indeterminate"
OUTCOMES = (OK, FAIL, INDETERMINATE)

FAULT_INJECTED = "fault_injected"
FAULT_HEALED = "fault_healed"
POLICY_PUSHED = "policy_pushed"

DEFAULT_RUN_LENGTH = 5

PHASE_BEFORE, PHASE_DURING, PHASE_AFTER = "before fault", "during fault", "after heal"
PHASES = (PHASE_BEFORE, PHASE_DURING, PHASE_AFTER)


def workload_of(pod: str) -> str:
    """'checkout-v2-0' → 'checkout-v2'; 'checkout-1' → 'checkout' (the lab names pods <workload>-<n>)."""
    head, sep, tail = pod.rpartition("-")
    return head if sep and tail.isdigit() else pod


class ChaosInputError(ValueError):
    """The records, timeline or priority cannot be analysed; the message says what to fix."""


class RequestLike(Protocol):
    """What we need of a load-generator record (`clusters.lab.loadgen.RequestResult` fits)."""

    @property
    def seq(self) -> int: ...
    @property
    def start_s(self) -> float: ...
    @property
    def latency_ms(self) -> float: ...
    @property
    def outcome(self) -> str: ...
    @property
    def cluster(self) -> str: ...


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the figures see it."""

    seq: int
    start_s: float
    latency_ms: float
    outcome: str
    cluster: str = ""
    status: int = 0      # the response's status (0: none came)
    pod: str = ""        # the pod that answered (the demo server names itself)

    @property
    def end_s(self) -> float:
        return self.start_s + self.latency_ms / 1000.0

    @property
    def ok(self) -> bool:
        return self.outcome == OK

    @classmethod
    def coerce(cls, raw: RequestLike | Mapping[str, Any]) -> RequestRecord:
        """From a loadgen JSON object (a mapping) or a `RequestResult`-like object."""
        if isinstance(raw, RequestRecord):
            return raw
        try:
            if isinstance(raw, Mapping):
                seq, start_s, latency_ms = raw["seq"], raw["start_s"], raw.get("latency_ms", 0.0)
                outcome, cluster = raw["outcome"], raw.get("cluster", "") or ""
                status, pod = raw.get("status", 0) or 0, raw.get("pod", "") or ""
            else:
                seq, start_s, latency_ms = raw.seq, raw.start_s, raw.latency_ms
                outcome, cluster = raw.outcome, raw.cluster or ""
                status, pod = getattr(raw, "status", 0) or 0, getattr(raw, "pod", "") or ""
        except (KeyError, AttributeError) as e:
            raise ChaosInputError(
                f"request record {raw!r} lacks {e}; records must carry seq, start_s, latency_ms, outcome "
                "and cluster as written by clusters/lab/loadgen.py"
            ) from e
        if outcome not in OUTCOMES:
            raise ChaosInputError(
                f"request {seq}: outcome {outcome!r} is not one of {', '.join(OUTCOMES)}; "
                "was the file written by an older load generator?"
            )
        return cls(seq=int(seq), start_s=float(start_s), latency_ms=float(latency_ms),
                   outcome=str(outcome), cluster=str(cluster), status=int(status), pod=str(pod))


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One step of the experiment, on the same wall clock as the requests' `start_s`."""

    at_s: float
    kind: str
    target: str = ""
    fault: str = ""
    cluster: str = ""
    detail: str = ""

    @classmethod
    def coerce(cls, raw: TimelineEvent | Mapping[str, Any]) -> TimelineEvent:
        if isinstance(raw, TimelineEvent):
            return raw
        try:
            at_s, kind = float(raw["at_s"]), str(raw["kind"])
        except (KeyError, TypeError, ValueError) as e:
            raise ChaosInputError(
                f"timeline event {raw!r} needs a numeric 'at_s' and a 'kind' "
                f"(e.g. {{'at_s': 1700000000.0, 'kind': '{FAULT_INJECTED}', 'target': 'checkout in east'}})"
            ) from e
        return cls(at_s=at_s, kind=kind, target=str(raw.get("target", "") or ""),
                   fault=str(raw.get("fault", "") or ""), cluster=str(raw.get("cluster", "") or ""),
                   detail=str(raw.get("detail", "") or ""))

    def describe(self) -> str:
        """What happened, in words: 'kill checkout in east', 'fleet@abc123' (the kind is said elsewhere)."""
        return " ".join(w for w in (self.fault, self.target, self.detail) if w) or self.kind.replace("_", " ")


@dataclass(frozen=True, slots=True)
class PhaseCounts:
    """Requests started in one phase, by outcome, and ok requests by serving cluster."""

    phase: str
    requests: int
    ok: int
    failed: int
    indeterminate: int
    served_by: tuple[tuple[str, int], ...]

    @property
    def ok_pct(self) -> float | None:
        return 100.0 * self.ok / self.requests if self.requests else None

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "requests": self.requests, "ok": self.ok, "failed": self.failed,
                "indeterminate": self.indeterminate, "ok_pct": self.ok_pct,
                "served_by": dict(self.served_by)}


@dataclass(frozen=True, slots=True)
class ChaosFigures:
    """The figures of one client through one fault (definitions in the module docstring)."""

    client: str
    priority: tuple[str, ...]
    run_length: int
    fault: str | None
    fault_at_s: float | None
    heal_at_s: float | None
    faulted_cluster: str | None
    shift_cluster: str | None
    requests: int
    ok_requests: int
    failed_requests: int
    indeterminate_requests: int
    time_to_detect_ms: float | None
    time_to_symptom_ms: float | None
    time_to_shift_ms: float | None
    failed_before_shift: int | None
    indeterminate_before_shift: int | None
    flaps: int | None
    time_to_failback_ms: float | None
    phases: tuple[PhaseCounts, ...]
    reasons: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = field(default=())
    statuses: tuple[tuple[int, int], ...] = ()       # (status, requests), status 0 = no response
    answered_by: tuple[tuple[str, int], ...] = ()    # (workload, ok requests), most first

    @property
    def statuses_text(self) -> str:
        return ", ".join(f"{s or 'none'} ×{n}" for s, n in self.statuses) or "none"

    @property
    def answered_by_text(self) -> str:
        total = sum(n for _, n in self.answered_by)
        return ", ".join(f"{w} {100.0 * n / total:.1f}% ({n})" for w, n in self.answered_by) or "nobody"

    @property
    def ok_pct(self) -> float | None:
        return 100.0 * self.ok_requests / self.requests if self.requests else None

    @property
    def preferred_cluster(self) -> str:
        return self.priority[0]

    def reason(self, figure: str) -> str | None:
        """Why `figure` is None (None when it is defined)."""
        return dict(self.reasons).get(figure)

    def phase(self, name: str) -> PhaseCounts:
        for p in self.phases:
            if p.phase == name:
                return p
        raise KeyError(f"no phase {name!r}; phases are {', '.join(PHASES)}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "client": self.client, "priority": list(self.priority), "run_length": self.run_length,
            "fault": self.fault, "fault_at_s": self.fault_at_s, "heal_at_s": self.heal_at_s,
            "faulted_cluster": self.faulted_cluster, "shift_cluster": self.shift_cluster,
            "requests": self.requests, "ok_requests": self.ok_requests,
            "failed_requests": self.failed_requests, "indeterminate_requests": self.indeterminate_requests,
            "ok_pct": self.ok_pct,
            "time_to_detect_ms": self.time_to_detect_ms, "time_to_symptom_ms": self.time_to_symptom_ms,
            "time_to_shift_ms": self.time_to_shift_ms, "failed_before_shift": self.failed_before_shift,
            "indeterminate_before_shift": self.indeterminate_before_shift, "flaps": self.flaps,
            "time_to_failback_ms": self.time_to_failback_ms,
            "phases": [p.as_dict() for p in self.phases],
            "reasons": dict(self.reasons), "notes": list(self.notes),
            "statuses": {str(s): n for s, n in self.statuses}, "answered_by": dict(self.answered_by),
        }


# -- parsing helpers (pure: strings in, values out) ------------------------------------------------

def records_from_jsonl(lines: Iterable[str]) -> list[RequestRecord]:
    """Parse the load generator's JSON lines; blank lines are skipped."""
    out: list[RequestRecord] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChaosInputError(f"line {n} is not JSON ({e.msg}); was the load generator killed "
                                  "mid-write? drop the partial last line") from e
        out.append(RequestRecord.coerce(obj))
    return out


def faulted_cluster_of(event: TimelineEvent, priority: Sequence[str]) -> str:
    """The cluster a fault hits: explicit `cluster`, else named in `target`, else the preferred one."""
    if event.cluster:
        return event.cluster
    words = set(re.findall(r"[A-Za-z0-9][A-Za-z0-9_.-]*", event.target))
    for c in priority:
        if c in words:
            return c
    return priority[0]


# -- the analysis ----------------------------------------------------------------------------------

def _first_run(records: Sequence[RequestRecord], start: int, cluster: str, n: int,
               before_s: float | None = None) -> int | None:
    """Index of the first of n consecutive ok requests served by `cluster`, from `start` on."""
    run = 0
    for i in range(start, len(records)):
        r = records[i]
        if r.ok and r.cluster == cluster:
            run += 1
            if run == n:
                first = i - n + 1
                if before_s is not None and records[first].start_s >= before_s:
                    return None
                return first
        else:
            run = 0
            if before_s is not None and r.start_s >= before_s:
                return None
    return None


def _excursions(records: Iterable[RequestRecord], settled: str) -> int:
    count = 0
    away = False
    for r in records:
        if not r.ok:
            continue
        if r.cluster != settled and not away:
            count += 1
        away = r.cluster != settled
    return count


def _phase(name: str, records: Iterable[RequestRecord]) -> PhaseCounts:
    by_outcome: Counter[str] = Counter()
    served: Counter[str] = Counter()
    for r in records:
        by_outcome[r.outcome] += 1
        if r.ok:
            served[r.cluster or "?"] += 1
    return PhaseCounts(phase=name, requests=sum(by_outcome.values()), ok=by_outcome[OK],
                       failed=by_outcome[FAIL], indeterminate=by_outcome[INDETERMINATE],
                       served_by=tuple(sorted(served.items(), key=lambda kv: (-kv[1], kv[0]))))


def _served_words(records: Iterable[RequestRecord]) -> str:
    served = Counter(r.cluster or "?" for r in records if r.ok)
    if not served:
        return "no request succeeded"
    return "ok requests served by " + ", ".join(f"{c} {n}" for c, n in served.most_common())


def _ms(a_s: float, b_s: float) -> float:
    return round((b_s - a_s) * 1000.0, 3)


def summarize(records: Iterable[RequestLike | Mapping[str, Any]],
              timeline: Iterable[TimelineEvent | Mapping[str, Any]],
              priority: Sequence[str], client: str, *,
              run_length: int = DEFAULT_RUN_LENGTH, fault_index: int = 0) -> ChaosFigures:
    """The chaos figures of `client` through the `fault_index`-th `fault_injected` event."""
    if not priority:
        raise ChaosInputError(f"client {client}: empty priority list; pass the clusters in the order "
                              "the client should be served from, e.g. ['east', 'south', 'west']")
    if run_length < 1:
        raise ChaosInputError(f"run_length must be at least 1, got {run_length}")
    prio = tuple(priority)
    preferred = prio[0]
    recs = sorted((RequestRecord.coerce(r) for r in records), key=lambda r: (r.start_s, r.seq))
    events = sorted((TimelineEvent.coerce(e) for e in timeline), key=lambda e: e.at_s)
    faults = [e for e in events if e.kind == FAULT_INJECTED]

    reasons: dict[str, str] = {}
    notes: list[str] = []
    counts = Counter(r.outcome for r in recs)

    def result(**kw: Any) -> ChaosFigures:
        base: dict[str, Any] = dict(
            client=client, priority=prio, run_length=run_length, fault=None, fault_at_s=None,
            heal_at_s=None, faulted_cluster=None, shift_cluster=None, requests=len(recs),
            ok_requests=counts[OK], failed_requests=counts[FAIL], indeterminate_requests=counts[INDETERMINATE],
            time_to_detect_ms=None, time_to_symptom_ms=None, time_to_shift_ms=None,
            failed_before_shift=None, indeterminate_before_shift=None, flaps=None,
            time_to_failback_ms=None,
            phases=(_phase(PHASE_BEFORE, recs), _phase(PHASE_DURING, ()), _phase(PHASE_AFTER, ())),
            statuses=tuple(sorted(Counter(r.status for r in recs).items())),
            answered_by=tuple(Counter(workload_of(r.pod) for r in recs if r.ok and r.pod).most_common()),
        )
        base.update(kw)
        return ChaosFigures(**base, reasons=tuple(reasons.items()), notes=tuple(notes))

    figure_names = ("time_to_detect_ms", "time_to_symptom_ms", "time_to_shift_ms", "failed_before_shift",
                    "indeterminate_before_shift", "flaps", "time_to_failback_ms")
    if not recs:
        for f in figure_names:
            reasons[f] = f"no requests were recorded for client {client}: was its load generator running?"
        return result()
    if fault_index >= len(faults):
        why = (f"the timeline has {len(faults)} '{FAULT_INJECTED}' event(s), so there is no fault "
               f"#{fault_index} to measure against")
        for f in figure_names:
            reasons[f] = why
        return result()

    fault = faults[fault_index]
    f_s = fault.at_s
    heal = next((e for e in events if e.kind == FAULT_HEALED and e.at_s >= f_s
                 and (not fault.target or not e.target or e.target == fault.target)), None)
    h_s = heal.at_s if heal is not None else None
    faulted = faulted_cluster_of(fault, prio)
    shift_to = prio[1] if faulted == preferred and len(prio) > 1 else None

    before = [r for r in recs if r.start_s < f_s]
    during = [r for r in recs if r.start_s >= f_s and (h_s is None or r.start_s < h_s)]
    after = [r for r in recs if h_s is not None and r.start_s >= h_s]
    phases = (_phase(PHASE_BEFORE, before), _phase(PHASE_DURING, during), _phase(PHASE_AFTER, after))

    base_ok = [r for r in before if r.ok]
    off_pref = sum(1 for r in base_ok if r.cluster != preferred)
    if base_ok and off_pref:
        notes.append(f"before the fault {off_pref} of {len(base_ok)} ok requests were served by clusters "
                     f"other than the preferred {preferred}: check the priority order passed in")
    if not before:
        notes.append("no request started before the fault: there is no baseline to compare with")

    # Detection: first request at/after the fault showing it.
    first_after = next((i for i, r in enumerate(recs) if r.start_s >= f_s), len(recs))
    evidence = [r for r in recs[first_after:] if not r.ok or r.cluster != preferred]
    detect_ms = symptom_ms = None
    if evidence:
        detect_ms = _ms(f_s, evidence[0].start_s)
        symptom_ms = _ms(f_s, min(r.end_s for r in evidence))
    else:
        why = (f"no request after the fault failed or was served outside {preferred}: "
               f"the fault ({fault.describe()}) was not visible to client {client}")
        reasons["time_to_detect_ms"] = reasons["time_to_symptom_ms"] = why

    # Shift.
    shift_i: int | None = None
    if shift_to is None:
        if faulted != preferred:
            why = (f"the fault hit {faulted}, not {client}'s preferred cluster {preferred}: "
                   "no shift was expected")
        else:
            why = f"the priority list has only {preferred}: there is no cluster to shift to"
        reasons["time_to_shift_ms"] = why
    else:
        shift_i = _first_run(recs, first_after, shift_to, run_length, before_s=h_s)
        if shift_i is None:
            until = "before the heal" if h_s is not None else "before the records end"
            reasons["time_to_shift_ms"] = (
                f"no run of {run_length} consecutive ok requests served by {shift_to} {until} "
                f"(during the fault: {_served_words(during)}; {phases[1].failed} failed, "
                f"{phases[1].indeterminate} indeterminate)")
            served_during = {r.cluster for r in during if r.ok}
            others = sorted(served_during - {preferred, shift_to})
            if others:
                notes.append(f"during the fault traffic went to {', '.join(others)}, not the next-priority "
                             f"{shift_to}: check the failover priority")
    shift_ms = _ms(f_s, recs[shift_i].start_s) if shift_i is not None else None

    failed_bs = indet_bs = None
    if shift_i is not None:
        shift_s = recs[shift_i].start_s
        casualties = [r for r in recs if r.end_s >= f_s and r.start_s < shift_s]
        failed_bs = sum(1 for r in casualties if r.outcome == FAIL)
        indet_bs = sum(1 for r in casualties if r.outcome == INDETERMINATE)
    else:
        why = "no shift to measure up to; see the 'during fault' phase for the failures while the fault lasted"
        reasons["failed_before_shift"] = reasons["indeterminate_before_shift"] = why

    # Failback.
    fb_i: int | None = None
    if h_s is None:
        reasons["time_to_failback_ms"] = (f"the timeline has no '{FAULT_HEALED}' event after the fault "
                                          f"({fault.describe()}): the fault was never healed")
    elif detect_ms is None:
        reasons["time_to_failback_ms"] = "the fault was not visible to this client: nothing to fail back from"
    else:
        heal_i = next((i for i, r in enumerate(recs) if r.start_s >= h_s), len(recs))
        fb_i = _first_run(recs, heal_i, preferred, run_length)
        if fb_i is None:
            reasons["time_to_failback_ms"] = (
                f"no run of {run_length} consecutive ok requests served by {preferred} after the heal "
                f"({_served_words(after)}; {phases[2].failed} failed)")
    failback_ms = _ms(h_s, recs[fb_i].start_s) if fb_i is not None and h_s is not None else None

    # Flaps.
    flaps: int | None = None
    if shift_i is not None and shift_to is not None:
        settled_window = [r for r in recs[shift_i:] if h_s is None or r.start_s < h_s]
        flaps = _excursions(settled_window, shift_to)
        if fb_i is not None:
            flaps += _excursions(recs[fb_i:], preferred)
        elif h_s is not None:
            notes.append("traffic did not settle back after the heal: flaps after the heal are not counted")
    elif shift_to is None:
        reasons["flaps"] = reasons["time_to_shift_ms"]
    else:
        reasons["flaps"] = "the shift never settled, so there is no settled state to flap away from"

    return result(
        fault=fault.describe(), fault_at_s=f_s, heal_at_s=h_s, faulted_cluster=faulted, shift_cluster=shift_to,
        time_to_detect_ms=detect_ms, time_to_symptom_ms=symptom_ms, time_to_shift_ms=shift_ms,
        failed_before_shift=failed_bs, indeterminate_before_shift=indet_bs, flaps=flaps,
        time_to_failback_ms=failback_ms, phases=phases,
    )
