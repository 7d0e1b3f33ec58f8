"""The chaos engine: run experiments against a lab federation, check them, report. The one engine —
`meshfed chaos run` and `meshfed demo` (one experiment, narrated) both drive it.

One lab per fleet repo: experiments are grouped by `spec.fleet` (in the order given), the lab is
brought up from that fleet (or a running one in the state directory is used and left running),
the controller converges, and each experiment then runs:

1. `setup` steps (pushes, pauses: not measured);
2. traffic starts from every client (open loop, `clusters.lab.loadgen`); the steady-state
   hypothesis must hold before anything is done (waited for up to `settleTimeout`: ejections from
   an earlier experiment may still be running out) — if it never does, the method is skipped and
   the experiment fails with what was measured;
3. the failover priority of each client is read from the controller (its rendered endpoints);
4. the `method`, step by step, each recorded on the timeline (fault injected / healed, push and
   whether the controller applied or rejected it as expected, pauses);
5. whatever is still injected is healed, and the hypothesis must hold again within `settleTimeout`
   (recovery: failback included);
6. the figures (`chaos.analysis`) and verdicts (`chaos.expect`) from the records of the measured
   window — from the steady-state check before the method to the recovery — plus the controller's
   failover history and the logs the expectations name;
7. clean-up, whatever happened: faults healed, traffic stopped, the fleet repo restored to the
   revision the experiment started from (and converged), so the next experiment starts clean;
8. the report: report.md + timeline.png + figures.json (`chaos.report`) and verdicts.json.

Statuses: passed; failed (an expectation or the steady state did not hold); error (could not run
to the end); for an experiment that declares `expectedFailure`, a failure is `xfail` and a pass
`xpass` (neither fails the run: the declaration is the honest statement of what happens).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.analysis import FAULT_HEALED, FAULT_INJECTED, ChaosFigures, summarize
from chaos.demo import DemoError, LabFederation
from chaos.expect import (
    ClientRun,
    Verdict,
    check_expectation,
    check_hypothesis,
    hypothesis_window,
    ordered,
    without_workloads,
)
from chaos.junit import ERROR, FAILED, PASSED, XFAIL, XPASS, CaseResult
from chaos.report import ReportPaths, write_report
from chaos.validate import (
    Fleet,
    client_workload,
    client_workload_pods,
    fault_request,
    load_fleet,
    resolve_service,
)
from clusters.lab.layout import LabError
from gitops.experiment import HEAL_ALL, Experiment, FaultSpec, Step, Traffic

POLL_S = 0.5
OBSERVER_SHARE = 0.5   # of a traffic's rate, sent by each other replica of its client workload


def observer_loads(t: Traffic, pods: list[str]) -> list[tuple[str, str]]:
    """(load name, pod) for the replicas after the first (the measured one) of `t`'s client workload."""
    return [(f"{t.client}.replica-{i}", pod) for i, pod in enumerate(pods[1:], start=1)]
CONVERGE_TIMEOUT_S = 180.0
PUSH_APPLIED, PUSH_REJECTED = "push_applied", "push_rejected"
STEP_EVENT = "step"


class ExperimentError(RuntimeError):
    """A step of an experiment could not be carried out; the message says which and why."""


class ProviderUnavailable(RuntimeError):
    """The requested provider cannot run experiments here; the message says what to use instead."""


@dataclass
class RunOptions:
    out_dir: Path
    state_dir: Path
    keep: bool = False
    provider: str = "lab"
    converge_timeout_s: float = CONVERGE_TIMEOUT_S
    per_experiment_dirs: bool = True   # reports in out_dir/<name>/ (False: out_dir itself, one experiment)


@dataclass
class ExperimentResult:
    experiment: Experiment
    status: str = ERROR
    verdicts: list[Verdict] = field(default_factory=list)
    error: str = ""
    started_at_s: float = 0.0
    duration_s: float = 0.0
    figures: dict[str, ChaosFigures] = field(default_factory=dict)
    report: ReportPaths | None = None
    out_dir: Path | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)
    priorities: dict[str, list[str]] = field(default_factory=dict)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    load: tuple[float, float] = (0.0, 0.0)   # the host's 1-minute load average at start and end
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in (PASSED, XFAIL, XPASS)

    @property
    def failed(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.ok]

    def case(self) -> CaseResult:
        e = self.experiment
        return CaseResult(e.name, e.file, self.status, self.duration_s, tuple(self.verdicts), self.error,
                          e.expected_failure, str(self.report.markdown) if self.report else "")


class Narrator:
    """What the engine tells as it goes. The default says a line per step; `meshfed demo` tells
    its story by overriding these (the engine never prints)."""

    def say(self, text: str) -> None:  # pragma: no cover - overridden by every narrator in use
        pass

    def lab_up(self, fed: LabFederation, fleet: Fleet) -> None:
        self.say(f"lab up from {fleet.path}: clusters {', '.join(fed.clusters)}; {fed.proxy_count()} proxies")

    def converged(self, fed: LabFederation, took_s: float) -> None:
        self.say(f"converged in {took_s:.1f} s: every proxy SYNCED")

    def experiment_start(self, exp: Experiment) -> None:
        self.say(f"── {exp.name}: {exp.description}")

    def steady_state(self, fed: LabFederation, exp: Experiment, verdicts: Sequence[Verdict], when: str) -> None:
        for v in verdicts:
            self.say(f"  steady state {when} {'held' if v.ok else 'did NOT hold'}: {v.client} {v.measured}")

    def priorities(self, fed: LabFederation, exp: Experiment, prio: dict[str, list[str]]) -> None:
        pass

    def step_start(self, fed: LabFederation, exp: Experiment, step: Step) -> None:
        if step.kind != "pause":
            self.say(f"  {step.describe()}")

    def step_done(self, fed: LabFederation, exp: Experiment, step: Step, info: str) -> None:
        if info:
            self.say(f"    {info}")

    def result(self, fed: LabFederation | None, res: ExperimentResult) -> None:
        mark = {PASSED: "PASS", FAILED: "FAIL", ERROR: "ERROR", XFAIL: "XFAIL", XPASS: "XPASS"}[res.status]
        self.say(f"  {mark} {res.experiment.name} ({res.duration_s:.0f} s)"
                 + (f": {res.error}" if res.error else ""))
        for v in res.failed:
            self.say(f"    {v.message()}")
            for line in v.evidence:
                self.say(f"      {line}")
        if res.report is not None:
            self.say(f"  report: {res.report.markdown}")


class Engine:
    def __init__(self, options: RunOptions, narrator: Narrator | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        if options.provider != "lab":
            raise ProviderUnavailable(
                f"chaos experiments do not run on {options.provider!r} yet: kind clusters come up and take the "
                "faults that map (`meshfed lab up|fault --provider kind`), but the engine's traffic, leases and "
                "logs are read from the lab's own processes. Run them with --provider lab (network namespaces "
                "on this machine); `meshfed chaos validate --provider kind PATH` says which experiments' faults "
                "map onto kind")
        self.opts = options
        self._base_sha = ""
        self._observers: list[str] = []   # load names of the replicas that send beside the measured pod
        self.narrator = narrator or Narrator()
        self.clock = clock
        self.sleep = sleep

    # --- runs -------------------------------------------------------------------------------------

    def run(self, experiments: Sequence[Experiment]) -> list[ExperimentResult]:
        """Every experiment, one lab per fleet; never raises for one experiment's failure."""
        results: list[ExperimentResult] = []
        groups: dict[str, list[Experiment]] = {}
        for e in experiments:
            groups.setdefault(e.fleet_dir, []).append(e)
        for fleet_dir, exps in groups.items():
            fleet, probs = load_fleet(Path(fleet_dir))
            if fleet is None:
                why = probs[0].message if probs else f"cannot use {fleet_dir}"
                results += [self._error(e, why) for e in exps]
                continue
            try:
                fed, ours = self.lab(fleet)
            except (LabError, DemoError, OSError) as err:
                results += [self._error(e, f"the lab did not come up: {err}") for e in exps]
                continue
            try:
                for e in exps:
                    try:
                        res = self.run_one(fed, fleet, e)
                    except Exception as err:  # one experiment's surprise must not lose the others' results
                        res = ExperimentResult(e, ERROR, error=f"{type(err).__name__}: {err} (a bug in the chaos "
                                               "engine or the lab: see the lab's logs in the state directory)",
                                               started_at_s=self.clock())
                    results.append(res)
                    self.narrator.result(fed, res)
            finally:
                if ours and not self.opts.keep:
                    fed.down()
        return results

    def _error(self, exp: Experiment, why: str) -> ExperimentResult:
        res = ExperimentResult(exp, ERROR, error=why, started_at_s=self.clock())
        self.narrator.result(None, res)
        return res

    def lab(self, fleet: Fleet) -> tuple[LabFederation, bool]:
        """A converged lab for `fleet`: the running one in the state directory if it is this fleet's
        (left running afterwards), else a new one. Returns (lab, whether we started it)."""
        fed = LabFederation(fleet.path, self.opts.state_dir)
        ours = True
        try:
            fed.attach()
            ours = False
        except LabError:
            fed.up()
        if not ours and sorted(fed.clusters) != sorted(c.name for c in fleet.plan.clusters):
            raise LabError(f"the lab running in {self.opts.state_dir} has clusters {', '.join(fed.clusters)}, not "
                           f"those of {fleet.path}; use another --state-dir, or `meshfed lab down --state-dir "
                           f"{self.opts.state_dir}`")
        try:
            self.narrator.lab_up(fed, fleet)
            _, took_s = fed.wait_converged(timeout_s=self.opts.converge_timeout_s)
            self.narrator.converged(fed, took_s)
        except BaseException:
            if ours and not self.opts.keep:
                fed.down()
            raise
        return fed, ours

    # --- one experiment ----------------------------------------------------------------------------

    def run_one(self, fed: LabFederation, fleet: Fleet, exp: Experiment) -> ExperimentResult:
        try:
            out = report_dir(self.opts.out_dir, exp.name) if self.opts.per_experiment_dirs else self.opts.out_dir
        except ExperimentError as err:  # nothing runs, nothing is written
            return ExperimentResult(exp, ERROR, error=str(err), started_at_s=self.clock())
        res = ExperimentResult(exp, started_at_s=self.clock(), out_dir=out,
                               load=(_load(), 0.0))
        self.narrator.experiment_start(exp)
        fed.events.clear()
        try:  # start from a converged mesh (a controller restarted by the experiment before may still be coming up)
            fed.wait_converged(timeout_s=self.opts.converge_timeout_s)
        except DemoError as err:
            res.error = f"the mesh did not converge before the experiment: {err}"
            res.status = ERROR
            res.duration_s = self.clock() - res.started_at_s
            return res
        try:
            base_sha = self._base_sha = fed.head()
        except (DemoError, OSError) as err:
            res.error, res.status = f"cannot read the lab's fleet repo: {err}", ERROR
            return res
        logs = {lm.source: fed.log_path(lm.source) for e in exp.expect for lm in e.logs_include}
        offsets = {s: (p.stat().st_size if p.exists() else 0) for s, p in logs.items()}
        active: dict[str, FaultSpec] = {}
        t_measure = t_end = self.clock()
        verdicts: list[Verdict] = []
        try:
            for st in exp.setup:
                verdicts += self._step(fed, exp, st, active)
            res.notes += self._await_clean_start(fed, exp)
            for t in exp.traffic:
                self._start_traffic(fed, fleet, t)
            before = self._await_steady(fed, exp, "before")
            verdicts += before
            self.narrator.steady_state(fed, exp, before, "before")
            t_measure = self.clock() - exp.hypothesis.window_s - max(t.timeout_s for t in exp.traffic)
            if all(v.ok for v in before):
                for t in exp.traffic:
                    svc = resolve_service(fleet.snapshot, t.service)
                    assert svc is not None  # validated
                    res.priorities[t.client] = fed.tiers(t.client, svc.hostname)
                self.narrator.priorities(fed, exp, res.priorities)
                for st in exp.method:
                    verdicts += self._step(fed, exp, st, active)
                if active:
                    self._heal(fed, exp, HEAL_ALL, active, why="end of the method")
                after = self._await_steady(fed, exp, "after")
                verdicts += after
                self.narrator.steady_state(fed, exp, after, "after")
            t_end = self.clock()
        except (ExperimentError, LabError, DemoError, OSError, ValueError) as err:
            res.error = str(err) if isinstance(err, ExperimentError | LabError | DemoError) else \
                f"{type(err).__name__}: {err}"
            t_end = self.clock()
        finally:
            cleanup_error = self._clean_up(fed, exp, base_sha, active)
            if cleanup_error and not res.error:
                res.error = cleanup_error
        res.timeline = list(fed.events)
        res.records = {t.client: fed.records(t.client) for t in exp.traffic}
        measured_ok = not res.error and verdicts and all(v.ok for v in verdicts if v.name.startswith("steadyState"))
        try:
            if measured_ok:
                verdicts += self._verdicts(fed, exp, res, t_measure, t_end, logs, offsets)
        except (OSError, ValueError, DemoError) as err:
            res.error = f"could not collect the results: {err}"
        res.verdicts = verdicts
        res.load = (res.load[0], _load())
        res.status = _status(exp, res)
        res.duration_s = self.clock() - res.started_at_s
        try:
            res.report = self._report(res, t_measure)
        except (OSError, ValueError) as err:
            res.error = res.error or f"could not write the report: {err}"
            res.status = ERROR
        return res

    # --- steps ----------------------------------------------------------------------------------

    def _step(self, fed: LabFederation, exp: Experiment, st: Step, active: dict[str, FaultSpec]) -> list[Verdict]:
        self.narrator.step_start(fed, exp, st)
        info = ""
        verdicts: list[Verdict] = []
        if st.fault is not None:
            f = st.fault
            req = fault_request(f)
            try:
                fed.runner.fault(req.kind, req.target, req.names, req.mode, req.delay_ms, rate_kbit=req.rate_kbit,
                                 skew_s=req.skew_s, behaviour=req.behaviour)
            except LabError as err:
                raise ExperimentError(f"{st.pos}: fault {st.id} ({f.describe()}) could not be applied: {err}") from None
            # noted once in force: a restart under faketime takes a second or two to apply
            fed.note(FAULT_INJECTED, fault=f"{st.id}: {f.kind}", target=_target(f), cluster=_cluster(f))
            active[st.id] = f
            info = f"injected {f.describe()}"
        elif st.kind == "heal":
            info = self._heal(fed, exp, st.heal, active)
        elif st.push is not None:
            verdict, info = self._push(fed, exp, st)
            verdicts.append(verdict)
        elif st.kind == "untilSteady":
            t0 = self.clock()
            held = self._until_steady(fed, exp, st.pause_s)
            info = (f"steady again after {self.clock() - t0:.1f} s" if held else
                    f"not steady after {st.pause_s:g} s; going on")
            fed.note(STEP_EVENT, target="steady state", detail=info)
        else:
            self.sleep(st.pause_s)
        self.narrator.step_done(fed, exp, st, info)
        return verdicts

    def _heal(self, fed: LabFederation, exp: Experiment, which: str, active: dict[str, FaultSpec],
              why: str = "") -> str:
        ids = list(active) if which == HEAL_ALL else [which]
        healed = []
        for fid in ids:
            f = active.pop(fid, None)
            if f is None:
                continue
            try:
                fed.runner.heal(f.target, f.names, f.kind)
            except LabError as err:
                raise ExperimentError(f"heal of {fid} ({f.describe()}) failed: {err}") from None
            fed.note(FAULT_HEALED, fault=f"{fid}: {f.kind}", target=_target(f), cluster=_cluster(f), detail=why)
            healed.append(f"{fid} ({f.describe()})")
        return "healed " + ", ".join(healed) if healed else "nothing to heal"

    def _push(self, fed: LabFederation, exp: Experiment, st: Step) -> tuple[Verdict, str]:
        p = st.push
        assert p is not None
        if p.restore:
            sha = fed.restore(self._base_sha, p.message)
            if sha is None:
                return Verdict("", "push", "restore", "nothing to restore", True, (), st.pos), "nothing to restore"
        else:
            sha = fed.push(lambda wt: _apply(wt, st))
        want = "Applied" if p.expect_applied else "Rejected"
        status = fed.wait_attempted(sha, p.timeout_s)
        desired = status.get("desired") or {}
        problems = [f"[{x.get('code')}] {x.get('file')}:{x.get('line')} {x.get('message')}"
                    for x in status.get("problems") or [] if isinstance(x, dict)]
        if desired.get("ok") is False:
            applied = str((status.get("applied") or {}).get("revision", ""))
            fed.note(PUSH_REJECTED, target="fleet repo",
                     detail=f"{sha[:8]} rejected; the last good revision {applied[:8]} keeps serving")
            measured = f"rejected ({len(problems)} problem(s)); applied stays {applied[:8]}"
            return (Verdict("", "push", f"{p.message!r} {want}", measured, not p.expect_applied, tuple(problems[:3]),
                            st.pos), f"pushed {sha[:8]}: {measured}")
        try:
            fed.wait_converged(timeout_s=p.timeout_s, revision=sha)
        except DemoError as err:
            fed.note(PUSH_REJECTED, target="fleet repo", detail=f"{sha[:8]} accepted but not SYNCED everywhere")
            return (Verdict("", "push", f"{p.message!r} {want}", "accepted, not SYNCED on every proxy", False,
                            (str(err),), st.pos), f"pushed {sha[:8]}: not SYNCED")
        fed.note(PUSH_APPLIED, target="fleet repo", detail=f"{sha[:8]} SYNCED on every proxy")
        return (Verdict("", "push", f"{p.message!r} {want}", "applied, SYNCED on every proxy", p.expect_applied, (),
                        st.pos), f"pushed {sha[:8]}: applied, SYNCED on every proxy")

    def _await_clean_start(self, fed: LabFederation, exp: Experiment) -> list[str]:
        """Before the steady state is judged: every cluster observed (no lease left Expired or Fenced:
        a setup push that shortens the lease TTL expires every lease at once for a few seconds) and
        no endpoint ejected in the controller's view (an ejection an earlier experiment caused lasts
        base × times ejected, and would steer this one's failover). Notes for the report when the
        ejections outlast settleTimeout (a fleet may have endpoints that are simply broken)."""
        deadline = self.clock() + exp.settle_timeout_s
        while True:
            down = expired_clusters(_retrying(lambda: fed.failover_events(0.0), self.sleep))
            unhealthy = sorted((fed.status() or {}).get("unhealthy_endpoints") or [])
            if not down and not unhealthy:
                return []
            if self.clock() >= deadline:
                if down:
                    raise ExperimentError(f"the controller still has {', '.join(down)} expired or fenced "
                                          f"{exp.settle_timeout_s:g} s into the experiment (settleTimeout): the "
                                          "experiment would not start from an observed mesh")
                return [f"Started with endpoints the controller still counted unhealthy after settleTimeout: "
                        f"{', '.join(unhealthy)}"]
            self.sleep(POLL_S)

    # --- traffic and the steady state ------------------------------------------------------------

    def _start_traffic(self, fed: LabFederation, fleet: Fleet, t: Traffic) -> None:
        svc = resolve_service(fleet.snapshot, t.service)
        pod = client_workload(fleet.plan, t.client, t.workload)
        if svc is None or pod is None:
            raise ExperimentError(f"{t.pos}: traffic from {t.client}: unknown service or no client workload "
                                  "(run `meshfed chaos validate`)")
        port = svc.ports[0].port if svc.ports else 80
        keep = t.max_requests_per_connection if t.keep_alive else 0
        url = f"http://{svc.hostname}:{port}{t.path}"
        ok_status = t.expect_status or 0
        fed.start_load(t.client, t.rate_per_s, t.timeout_s, url=url, pod=pod, keep_alive_max_requests=keep,
                       method=t.method, ok_status=ok_status)
        # The workload's other replicas send too, as a Deployment's do, at OBSERVER_SHARE of the rate:
        # their node proxies see a fault as well, and the controller ejects mesh-wide only when two
        # proxies that route to an endpoint agree (federation.core.health). Only the first pod is measured.
        for name, other in observer_loads(t, client_workload_pods(fleet.plan, t.client, t.workload)):
            fed.start_load(t.client, max(1.0, t.rate_per_s * OBSERVER_SHARE), t.timeout_s, url=url, pod=other,
                           keep_alive_max_requests=keep, name=name, method=t.method, ok_status=ok_status)
            self._observers.append(name)

    def _steady_verdicts(self, fed: LabFederation, exp: Experiment, when: str) -> list[Verdict]:
        now = self.clock()
        out = []
        for t in exp.traffic:
            recs = without_workloads(fed.records(t.client), t.ignore_workloads)
            window = hypothesis_window(recs, now, exp.hypothesis, t.timeout_s)
            min_n = max(1, int(t.rate_per_s * exp.hypothesis.window_s * 0.5))
            out.append(check_hypothesis(t.client, window, exp.hypothesis, when, min_n, t.expects_refusal))
        return out

    def _until_steady(self, fed: LabFederation, exp: Experiment, limit_s: float) -> bool:
        """Wait (at most `limit_s`) until a whole fresh window holds the hypothesis; whether it did."""
        first_full = self.clock() + exp.hypothesis.window_s + max(t.timeout_s for t in exp.traffic)
        deadline = self.clock() + limit_s
        while self.clock() < deadline:
            if self.clock() >= first_full and all(v.ok for v in self._steady_verdicts(fed, exp, "during")):
                return True
            self.sleep(POLL_S)
        return False

    def _await_steady(self, fed: LabFederation, exp: Experiment, when: str) -> list[Verdict]:
        first_full = self.clock() + exp.hypothesis.window_s + max(t.timeout_s for t in exp.traffic)
        deadline = max(first_full, self.clock()) + exp.settle_timeout_s
        while True:
            now = self.clock()
            if now >= first_full:
                verdicts = self._steady_verdicts(fed, exp, when)
                if all(v.ok for v in verdicts) or now >= deadline:
                    return [v if v.ok else Verdict(
                        v.client, v.name, v.expected, v.measured, False,
                        (*v.evidence, f"still not holding {exp.settle_timeout_s:g} s after it was first checked "
                                      "(settleTimeout)"), exp.at("spec.steadyState.hypothesis")) for v in verdicts]
            self.sleep(POLL_S)

    # --- clean-up -------------------------------------------------------------------------------------

    def _clean_up(self, fed: LabFederation, exp: Experiment, base_sha: str, active: dict[str, FaultSpec]) -> str:
        """Heal, stop traffic, restore the fleet repo; the first error, if any (the next experiment
        must not inherit a fault or a pushed policy)."""
        first = ""
        try:
            if active:
                self._heal(fed, exp, HEAL_ALL, active, why="clean-up")
            fed.runner.heal()   # anything else (a fault half-applied when a step failed)
        except (ExperimentError, LabError) as err:
            first = first or f"clean-up: {err}"
        if any(s.fault is not None and s.fault.target == "controller" for s in exp.method):
            try:  # a restarted controller answers (and re-converges) only after Ray is up again
                fed.wait_converged(timeout_s=self.opts.converge_timeout_s)
            except DemoError as err:
                first = first or f"clean-up: the controller did not come back: {err}"
        observers, self._observers = self._observers, []
        for name in [t.client for t in exp.traffic] + observers:
            try:
                fed.stop_load(name)
            except LabError:
                pass  # never started (the failure was before the traffic)
        try:
            sha = fed.restore(base_sha, f"chaos: restore the fleet repo after {exp.name}")
            if sha is not None:
                fed.wait_converged(timeout_s=self.opts.converge_timeout_s, revision=sha)
        except (DemoError, LabError) as err:
            first = first or f"clean-up: could not restore the fleet repo to {base_sha[:8]}: {err}"
        return first

    # --- results --------------------------------------------------------------------------------------

    def _verdicts(self, fed: LabFederation, exp: Experiment, res: ExperimentResult, t0: float, t_end: float,
                  logs: dict[str, Path], offsets: dict[str, int]) -> list[Verdict]:
        events = [e for e in _retrying(lambda: fed.failover_events(t0 - 1.0), self.sleep)
                  if t0 <= float(e.get("at_s", 0.0)) <= t_end + 1.0]
        texts = {s: _read_from(p, offsets.get(s, 0)) for s, p in logs.items()}
        out: list[Verdict] = []
        runs = self.client_runs(exp, res, t0, t_end)
        for e in exp.expect:
            out += check_expectation(e, runs[e.client], t0, events, texts, exp.run_length)
        res.figures = {c: r.figures for c, r in runs.items()}
        return out

    def client_runs(self, exp: Experiment, res: ExperimentResult, t0: float, t_end: float) -> dict[str, ClientRun]:
        """Each client's measured records and figures (per fault too), from what `res` holds."""
        faults = [e for e in res.timeline if e.get("kind") == FAULT_INJECTED]
        ids = [str(e.get("fault", "")).split(":", 1)[0] for e in faults]
        runs: dict[str, ClientRun] = {}
        for t in exp.traffic:
            recs = ordered(r for r in without_workloads(res.records.get(t.client, []), t.ignore_workloads)
                           if t0 <= float(r.get("start_s", 0.0)) <= t_end)
            prio = res.priorities.get(t.client) or [t.client]
            by_fault: dict[str, ChaosFigures] = {}
            for i, fid in enumerate(ids):
                by_fault[fid] = summarize(recs, res.timeline, _from_baseline(recs, prio, float(faults[i]["at_s"]),
                                                                             exp.run_length),
                                          t.client, run_length=exp.run_length, fault_index=i)
            first = by_fault[ids[0]] if ids else summarize(recs, res.timeline, prio, t.client,
                                                           run_length=exp.run_length)
            runs[t.client] = ClientRun(t.client, tuple(recs), first, by_fault)
        return runs

    def _report(self, res: ExperimentResult, t0: float) -> ReportPaths | None:
        out = res.out_dir
        if out is None:
            return None
        exp = res.experiment
        recs = {}
        for t in exp.traffic:
            recs[t.client] = [r for r in without_workloads(res.records.get(t.client, []), t.ignore_workloads)
                              if float(r.get("start_s", 0.0)) >= t0]
        figures = res.figures or {c: summarize(r, res.timeline, res.priorities.get(c) or [c], c,
                                               run_length=exp.run_length) for c, r in recs.items()}
        paths = write_report(out, f"{exp.name}: {exp.description}", figures, recs, res.timeline,
                             verdicts=res.verdicts, status=res.status, error=res.error,
                             notes=[*_notes(exp), *res.notes, _host_note(res.load)])
        out.mkdir(parents=True, exist_ok=True)
        (out / "verdicts.json").write_text(json.dumps({
            "experiment": exp.name, "file": exp.file, "status": res.status, "error": res.error,
            "duration_s": round(res.duration_s, 3), "priorities": res.priorities, "load_average": list(res.load),
            "verdicts": [v.as_dict() for v in res.verdicts]}, indent=2) + "\n")
        for client, rs in res.records.items():  # the raw evidence, every request
            (out / f"requests-{client}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        return paths


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 0.0


def _host_note(load: tuple[float, float]) -> str:
    """Timings are the host's as much as the mesh's: say how busy it was (every proxy is a Python
    process on the same CPUs as everything else)."""
    return (f"Host: load average {load[0]:.1f} at the start and {load[1]:.1f} at the end on {os.cpu_count()} CPU(s); "
            "on a busy machine, handshakes and relays queue for CPU and timings stretch.")


LEASE_EVENTS = {"ClusterLeaseExpired": False, "ClusterFenced": False, "ClusterRecovered": True}


def expired_clusters(events: Sequence[dict[str, Any]]) -> list[str]:
    """Clusters whose latest lease event (in the failover history) leaves them unobserved. Pure."""
    last: dict[str, tuple[float, bool]] = {}
    for e in events:
        kind = str(e.get("kind"))
        if kind in LEASE_EVENTS:
            c, at = str(e.get("from_cluster") or e.get("service")), float(e.get("at_s", 0.0))
            if c not in last or at >= last[c][0]:
                last[c] = (at, LEASE_EVENTS[kind])
    return sorted(c for c, (_, live) in last.items() if not live)


def _retrying(fn: Callable[[], list[dict[str, Any]]], sleep: Callable[[float], None],
              attempts: int = 30) -> list[dict[str, Any]]:
    """The controller's status API, asked again while it is not answering (restarting)."""
    for i in range(attempts):
        try:
            return fn()
        except (OSError, ValueError):
            if i == attempts - 1:
                raise
            sleep(2.0)
    return []


def _notes(exp: Experiment) -> list[str]:
    out = []
    if exp.known_limitation:
        out.append(f"Known limitation: {exp.known_limitation}")
    if exp.expected_failure:
        out.append(f"Declared expected failure: {exp.expected_failure}")
    return out


def _status(exp: Experiment, res: ExperimentResult) -> str:
    if res.error:
        return ERROR
    held = bool(res.verdicts) and all(v.ok for v in res.verdicts)
    if exp.expected_failure:
        return XPASS if held else XFAIL
    return PASSED if held else FAILED


def _target(f: FaultSpec) -> str:
    return " ".join((f.target, *f.names))


def _cluster(f: FaultSpec) -> str:
    """The cluster the analysis treats as faulted: a WAN path or the controller is none of the
    clients' preferred clusters, so no shift is expected from them by themselves."""
    return f.cluster() or f.target


def _from_baseline(records: Sequence[dict[str, Any]] | Sequence[Any], prio: list[str], fault_at_s: float,
                   run_length: int) -> list[str]:
    """The priority list as seen at a fault: starting from the cluster serving just before it. A
    second fault (south's gateway while east is down) is measured from where traffic then was."""
    before = [r for r in records if float(r.get("start_s", 0.0)) < fault_at_s and r.get("outcome") == "ok"]
    recent = Counter(str(r.get("cluster")) for r in before[-2 * run_length:])
    if not recent:
        return prio
    serving = recent.most_common(1)[0][0]
    return prio[prio.index(serving):] if serving in prio else prio


def report_dir(out_dir: Path, name: str) -> Path:
    """Where an experiment's reports go: `out_dir/<name>/`, never outside `out_dir` (a name is a
    DNS-1123 label once loaded — MF0106 —; this holds for any `Experiment` handed to the engine)."""
    out = out_dir / name
    if not name or out.resolve().parent != out_dir.resolve():
        raise ExperimentError(f"experiment name {name[:80]!r} would put its reports outside {out_dir}, not in a "
                              f"directory of its own there; name it with lower-case letters, digits and '-', e.g. "
                              "'cert-expiry'")
    return out


def _apply(wt: Path, st: Step) -> str:
    """Apply a push step's edits or patch to a clone of the fleet repo; the commit message."""
    import subprocess

    p = st.push
    assert p is not None
    for e in p.edits:
        path = e.path_in(wt)
        if path is None:  # `chaos validate` refuses it first; the engine does not rely on that
            raise ExperimentError(f"{e.pos}: edit of {e.file}: no such file in the lab's fleet repo (name a file "
                                  "relative to its root, e.g. policies/shop/checkout.yaml)")
        text = path.read_text()
        if text.count(e.replace) != 1:
            raise ExperimentError(f"{e.pos}: edit of {e.file}: the text to replace occurs {text.count(e.replace)} "
                                  "times in the lab's fleet repo (must be once)")
        path.write_text(text.replace(e.replace, e.with_, 1))
    if p.patch is not None:
        r = subprocess.run(["git", "-C", str(wt), "apply", "--index", "-"], input=p.patch, capture_output=True,
                           text=True, check=False, timeout=60)
        if r.returncode != 0:
            raise ExperimentError(f"{st.pos}: the patch does not apply to the lab's fleet repo: {r.stderr.strip()}")
    return p.message


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(8 * 1024 * 1024).decode(errors="replace")
    except OSError:
        return ""
