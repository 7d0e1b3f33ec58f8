"""Chaos experiments as files: `kind: ChaosExperiment` (meshfed.dev/v1alpha1), read as strictly as
the fleet repo (YAML 1.2, unknown fields are errors with a hint, problems with codes and file:line).

Where they live (decided here, documented in the README): an experiment is *not* mesh
configuration, so the controller never reads one. Keep them in the fleet repo's `chaos/`
directory (outside the layout the fleet loader reads; a ChaosExperiment in a layout directory is
MF0009) or in any directory of their own, such as `examples/chaos/`. `spec.fleet` names the fleet
repo the experiment runs against, relative to the experiment file (default `..`, which is the
fleet repo for `FLEET/chaos/x.yaml`).

The shape, in the spirit of Chaos Toolkit (steady-state hypothesis, method, rollbacks) and
LitmusChaos (probes as SLOs):

    spec:
      description: what it proves           fleet: ../fleet           runLength: 5
      knownLimitation: text (shown in reports)     expectedFailure: reason (a failed expectation
                                                   is reported as expected, not as a failure)
      steadyState:
        traffic: [{from: CLUSTER, workload, service, rate, connections: New|KeepAlive,
                   maxRequestsPerConnection, timeout, ignoreWorkloads: [...],
                   method: GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS, path: /PATH,
                   expectStatus: CODE}]   # the answer this traffic must get (default: any 2xx);
                                          # e.g. 403 for a method a policy denies at a waypoint
        hypothesis: {minOkPercent, servedBy: local|CLUSTER, window}
        settleTimeout
      setup:  [steps]     # before the steady state is checked; not measured (e.g. shorten leaseTTL)
      method: [steps]     # each step is one of:
        - fault: {kind, target, names, mode, delay, rate, skew, behaviour}   id: NAME
        - heal: NAME | all
        - push: {message, edits: [{file, replace, with}] | patch: DIFF | restore: true,
                 expect: Applied|Rejected, timeout}
        - pause: DURATION
        - untilSteady: DURATION  # until the hypothesis holds again (at most DURATION), e.g. between heals
      expect:
        - client: CLUSTER
          fault: NAME               # the fault the figures refer to (default: the first)
          failoverWithin, failbackWithin, maxFailed, minFailed, maxIndeterminate, maxFlaps, minOkPercent,
          servedBy: [east, south, west|north, east]
          servedDuringFault / notServedDuringFault: [CLUSTER/POD]   # who answered while the fault lasted
          eventsInclude / eventsExclude: [{kind, from, to, policy, service}]
          logsInclude: [{source: ztunnel/east/node-2 | gateway/south | waypoint/east/shop/waypoint | controller,
                         contains: TEXT}]
          split: [{workload: checkout-v2, percent: 20, tolerance: 3}]   # share of the ok answers per
                                    # workload (a per-request canary split at a waypoint), ± tolerance points

What is checked here is what the file alone can tell (shape, types, ranges, step structure,
fault ids, which figures can be measured). Whether the clusters, workloads and pods exist, whether
a fault applies to the lab and whether an edit applies to the fleet repo needs the fleet: that is
`chaos.validate`, with the same codes.

The fault kinds and targets are the lab's (`clusters.lab.faults`); gitops imports nothing of ours,
so they are repeated here and a unit test pins them equal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic_core import PydanticCustomError

from gitops import model as m
from gitops.codes import problem
from gitops.problems import ObjectRef, Problem, SourcePos
from gitops.schema import (
    _DNS_LABEL,
    CountIn,
    DnsLabel,
    DurationIn,
    Metadata,
    _Base,
    _errors_to_problems,
    _field_pos,
    _Wrap,
    did_you_mean,
    find_pos,
    parse_duration_s,
)
from gitops.yamldoc import Doc, parse_yaml

KIND = "ChaosExperiment"
SUITE_LABEL = "chaos.meshfed.dev/suite"   # metadata.labels: comma-separated suites, e.g. "ci"

# the lab's vocabulary (clusters.lab.faults.FAULT_KINDS / TARGET_KINDS; pinned equal by a unit test)
FAULT_KINDS = ("kill", "stop", "partition", "blackhole", "latency", "link-down", "bandwidth", "clock-skew",
               "behaviour")
TARGET_KINDS = ("pod", "node", "gateway", "wan", "controller", "api")
BEHAVIOURS = ("Error503", "Slow", "Hang", "Healthy")
HEAL_ALL = "all"
STEP_KINDS = ("fault", "heal", "push", "pause", "untilSteady")
_STEP_ATTRS = ("fault", "heal", "push", "pause", "until_steady")
_FAULT_PARAMS = {"latency": "delay", "bandwidth": "rate", "clock-skew": "skew", "behaviour": "behaviour"}


# --------------------------------------------------------------------------------------------
# value types


_RATE = re.compile(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)")
_RATE_KBIT = {"kbit": 1.0, "mbit": 1000.0, "gbit": 1_000_000.0}
MIN_RATE_KBIT, MAX_RATE_KBIT = 8.0, 10_000_000.0
MAX_SKEW_S = 400 * 86400.0


def _rate_kbit(v: Any) -> float:
    if not isinstance(v, str) or not _RATE.fullmatch(v):
        raise PydanticCustomError("MF0102", "a rate is a number with a unit of kbit, mbit or gbit per second, "
                                  "e.g. 256kbit (got {value})", {"value": repr(v)})
    n, unit = _RATE.fullmatch(v).groups()  # type: ignore[union-attr]
    kbit = float(n) * _RATE_KBIT[unit]
    if not MIN_RATE_KBIT <= kbit <= MAX_RATE_KBIT:
        raise PydanticCustomError("MF0109", "rate {value} is out of range 8kbit..10gbit", {"value": v})
    return kbit


def _signed_duration_s(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, str) or not v:
        raise PydanticCustomError("MF0104", "a skew is a duration with an optional sign, e.g. '2m' or '-1h' "
                                  "(got {value})", {"value": repr(v)})
    sign = -1.0 if v[0] == "-" else 1.0
    try:
        s = sign * parse_duration_s(v[1:] if v[0] in "+-" else v)
    except ValueError as e:
        raise PydanticCustomError("MF0104", str(e)) from None
    if not abs(s) <= MAX_SKEW_S:
        raise PydanticCustomError("MF0109", "skew {value} is out of range -400d..400d", {"value": v})
    return s


def _percent_f(v: float) -> float:
    if not 0.0 <= v <= 100.0:
        raise PydanticCustomError("MF0508", "{value} is not a percentage in 0..100", {"value": v})
    return v


def _rate_per_s(v: float) -> float:
    if not 0.1 <= v <= 1000.0:
        raise PydanticCustomError("MF0109", "{value} requests per second is out of range 0.1..1000", {"value": v})
    return v


def _served_by_element(v: str) -> str:
    parts = v.split("|")
    if not all(re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", p) for p in parts):
        raise PydanticCustomError("MF0102", "{value}: write a cluster name, or alternatives as 'west|north'",
                                  {"value": repr(v)})
    return v


_PATH = re.compile(r"/[!-~]{0,1023}")   # printable ASCII, no spaces: one request-target


def _request_path(v: str) -> str:
    if not _PATH.fullmatch(v):
        raise PydanticCustomError("MF0102", "a path is an absolute request path of printable ASCII without spaces, "
                                  "e.g. /orders/7 (got {value})", {"value": repr(v)[:80]})
    return v


RequestPath = Annotated[str, AfterValidator(_request_path)]
RateKbit = Annotated[float, BeforeValidator(_rate_kbit)]
SignedDuration = Annotated[float, BeforeValidator(_signed_duration_s)]
PercentF = Annotated[float, AfterValidator(_percent_f)]
RatePerS = Annotated[float, AfterValidator(_rate_per_s)]
ServedByElement = Annotated[str, AfterValidator(_served_by_element)]


# --------------------------------------------------------------------------------------------
# pydantic (the boundary)


class TrafficS(_Base):
    from_: DnsLabel = Field(alias="from")
    workload: DnsLabel | None = None
    service: str
    rate: RatePerS = 20.0
    connections: Literal["New", "KeepAlive"] = "New"
    max_requests_per_connection: CountIn(1, 100_000) = 100  # type: ignore[valid-type]
    timeout: DurationIn(0.05, 60.0) = 3.0  # type: ignore[valid-type]
    ignore_workloads: list[DnsLabel] = Field(default_factory=list)
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = "GET"
    path: RequestPath = "/"
    expect_status: CountIn(100, 599) | None = None  # type: ignore[valid-type]


class HypothesisS(_Base):
    min_ok_percent: PercentF = 99.0
    served_by: str = "local"
    window: DurationIn(0.5, 120.0) = 3.0  # type: ignore[valid-type]


class SteadyStateS(_Base):
    traffic: list[TrafficS]
    hypothesis: HypothesisS = Field(default_factory=lambda: HypothesisS.model_validate({}))
    settle_timeout: DurationIn(1.0, 600.0) = 60.0  # type: ignore[valid-type]


class FaultS(_Base):
    kind: Literal["kill", "stop", "partition", "blackhole", "latency", "link-down", "bandwidth", "clock-skew",
                  "behaviour"]
    target: Literal["pod", "node", "gateway", "wan", "controller", "api"]
    names: list[str] = Field(default_factory=list)
    mode: Literal["drop", "reject"] | None = None
    delay: DurationIn(0.001, 10.0) | None = None  # type: ignore[valid-type]
    rate: RateKbit | None = None
    skew: SignedDuration | None = None
    behaviour: Literal["Error503", "Slow", "Hang", "Healthy"] | None = None


class EditS(_Base):
    file: str
    replace: str
    with_: str = Field(alias="with")


class PushS(_Base):
    message: str = ""
    edits: list[EditS] | None = None
    patch: str | None = None
    restore: bool = False
    expect: Literal["Applied", "Rejected"] = "Applied"
    timeout: DurationIn(1.0, 600.0) = 90.0  # type: ignore[valid-type]


class StepS(_Base):
    id: DnsLabel | None = None
    fault: FaultS | None = None
    heal: str | None = None
    push: PushS | None = None
    pause: DurationIn(0.0, 3600.0) | None = None  # type: ignore[valid-type]
    until_steady: DurationIn(0.5, 3600.0) | None = None  # type: ignore[valid-type]


class EventMatchS(_Base):
    kind: Literal["EndpointEjected", "EndpointUnejected", "FailedOver", "FailedBack", "ClusterLeaseExpired",
                  "ClusterFenced", "ClusterRecovered"]
    from_: str | None = Field(None, alias="from")
    to: str | None = None
    policy: str | None = None
    service: str | None = None


class LogMatchS(_Base):
    source: str
    contains: str


class SplitS(_Base):
    workload: DnsLabel
    percent: PercentF
    tolerance: PercentF = 3.0


class ExpectationS(_Base):
    client: DnsLabel
    fault: DnsLabel | None = None
    failover_within: DurationIn(0.0, 600.0) | None = None  # type: ignore[valid-type]
    failback_within: DurationIn(0.0, 600.0) | None = None  # type: ignore[valid-type]
    max_failed: CountIn(0, 10_000_000) | None = None  # type: ignore[valid-type]
    min_failed: CountIn(0, 10_000_000) | None = None  # type: ignore[valid-type]
    max_indeterminate: CountIn(0, 10_000_000) | None = None  # type: ignore[valid-type]
    max_flaps: CountIn(0, 100_000) | None = None  # type: ignore[valid-type]
    min_ok_percent: PercentF | None = None
    served_by: list[ServedByElement] | None = None
    served_during_fault: list[str] = Field(default_factory=list)
    not_served_during_fault: list[str] = Field(default_factory=list)
    events_include: list[EventMatchS] = Field(default_factory=list)
    events_exclude: list[EventMatchS] = Field(default_factory=list)
    logs_include: list[LogMatchS] = Field(default_factory=list)
    split: list[SplitS] = Field(default_factory=list)


class ChaosExperimentSpec(_Base):
    description: str
    fleet: str = ".."
    run_length: CountIn(1, 100) = 5  # type: ignore[valid-type]
    known_limitation: str = ""
    expected_failure: str = ""
    steady_state: SteadyStateS
    setup: list[StepS] = Field(default_factory=list)
    method: list[StepS]
    expect: list[ExpectationS] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------
# the model (frozen, no pydantic)


@dataclass(frozen=True, slots=True)
class Traffic:
    client: str                  # the cluster the requests come from (also the client's name in `expect`)
    workload: str | None         # its client workload (default: the cluster's first client workload)
    service: str                 # hostname, NAME or NS/NAME of a GlobalService
    rate_per_s: float
    keep_alive: bool
    max_requests_per_connection: int
    timeout_s: float
    ignore_workloads: tuple[str, ...]
    pos: SourcePos
    method: str = "GET"
    path: str = "/"
    expect_status: int | None = None   # None: any 2xx is the right answer

    @property
    def expects_refusal(self) -> bool:
        """The right answer is not a 2xx: the mesh (a waypoint's policy) answers, no workload does,
        so which cluster served it is not part of the measure."""
        return self.expect_status is not None and not 200 <= self.expect_status < 300


@dataclass(frozen=True, slots=True)
class Hypothesis:
    min_ok_percent: float
    served_by: str               # "local" (each client's own cluster) or a cluster name
    window_s: float


@dataclass(frozen=True, slots=True)
class FaultSpec:
    kind: str
    target: str
    names: tuple[str, ...]
    mode: str = "drop"
    delay_ms: float = 0.0
    rate_kbit: float = 0.0
    skew_s: float = 0.0
    behaviour: str = ""

    def describe(self) -> str:
        extra = {"partition": self.mode, "latency": f"{self.delay_ms:g}ms", "bandwidth": f"{self.rate_kbit:g}kbit",
                 "clock-skew": f"{self.skew_s:+g}s", "behaviour": self.behaviour}.get(self.kind, "")
        return " ".join(w for w in (self.kind, self.target, *self.names, extra) if w)

    def cluster(self) -> str:
        """The cluster a fault hits (the first name's cluster; '' for the controller and a WAN path)."""
        if self.target in ("controller", "wan") or not self.names:
            return ""
        return self.names[0].split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class Edit:
    file: str
    replace: str
    with_: str
    pos: SourcePos

    def path_in(self, repo: Path) -> Path | None:
        """The file this edit names inside the checkout `repo`, or None when there is no such file
        or it lies outside `repo` ('../x', an absolute path, a symlink out): an experiment edits
        the fleet repo and nothing else. (`chaos validate` and the engine both ask here.)"""
        path = repo / self.file
        if not path.is_file() or not path.resolve().is_relative_to(repo.resolve()):
            return None
        return path


@dataclass(frozen=True, slots=True)
class PushSpec:
    message: str
    edits: tuple[Edit, ...] = ()
    patch: str | None = None
    restore: bool = False
    expect_applied: bool = True
    timeout_s: float = 90.0


@dataclass(frozen=True, slots=True)
class Step:
    kind: str                    # fault | heal | push | pause | untilSteady
    pos: SourcePos
    id: str = ""                 # fault: its id (default "fault-<n>", n counted from 1 in the method)
    fault: FaultSpec | None = None
    heal: str = ""               # a fault id or "all"
    push: PushSpec | None = None
    pause_s: float = 0.0         # pause: how long; untilSteady: the longest it waits

    def describe(self) -> str:
        if self.fault is not None:
            return f"fault {self.id}: {self.fault.describe()}"
        if self.kind == "heal":
            return f"heal {self.heal}"
        if self.push is not None:
            what = "restore the fleet repo" if self.push.restore else self.push.message
            return f"push ({what}; expect {'Applied' if self.push.expect_applied else 'Rejected'})"
        if self.kind == "untilSteady":
            return f"until the steady state holds again (at most {self.pause_s:g}s)"
        return f"pause {self.pause_s:g}s"


@dataclass(frozen=True, slots=True)
class EventMatch:
    kind: str
    from_cluster: str | None = None
    to_cluster: str | None = None
    policy: str | None = None
    service: str | None = None

    def describe(self) -> str:
        parts = [self.kind]
        if self.from_cluster:
            parts.append(f"from {self.from_cluster}")
        if self.to_cluster:
            parts.append(f"to {self.to_cluster}")
        if self.service:
            parts.append(f"service {self.service}")
        if self.policy:
            parts.append(f"policy {self.policy}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class SplitExpect:
    """`percent` ± `tolerance` points of a client's ok answers come from `workload`."""

    workload: str
    percent: float
    tolerance: float

    def describe(self) -> str:
        return f"{self.workload} {self.percent:g}% ± {self.tolerance:g}"


@dataclass(frozen=True, slots=True)
class LogMatch:
    source: str                  # ztunnel/<cluster>/<node> | gateway/<cluster> | controller
    contains: str


@dataclass(frozen=True, slots=True)
class Expectation:
    client: str
    pos: SourcePos
    fault: str | None = None
    failover_within_s: float | None = None
    failback_within_s: float | None = None
    max_failed: int | None = None
    min_failed: int | None = None     # for an honest "these requests will fail" (what L4 cannot avoid)
    max_indeterminate: int | None = None
    max_flaps: int | None = None
    min_ok_percent: float | None = None
    served_by: tuple[tuple[str, ...], ...] | None = None   # each element: the clusters it accepts
    served_during_fault: tuple[str, ...] = ()      # CLUSTER/POD that answered while the fault lasted
    not_served_during_fault: tuple[str, ...] = ()  # CLUSTER/POD that answered nothing while it lasted
    events_include: tuple[EventMatch, ...] = ()
    events_exclude: tuple[EventMatch, ...] = ()
    logs_include: tuple[LogMatch, ...] = ()
    split: tuple[SplitExpect, ...] = ()
    field_pos: Mapping[str, SourcePos] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    file: str                    # as given to the loader (reports and problems name it)
    fleet_dir: str               # absolute path of the fleet repo it runs against
    description: str
    suites: tuple[str, ...]
    known_limitation: str
    expected_failure: str
    run_length: int
    traffic: tuple[Traffic, ...]
    hypothesis: Hypothesis
    settle_timeout_s: float
    setup: tuple[Step, ...]
    method: tuple[Step, ...]
    expect: tuple[Expectation, ...]
    pos: SourcePos
    field_pos: Mapping[str, SourcePos] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def faults(self) -> tuple[Step, ...]:
        return tuple(s for s in self.method if s.fault is not None)

    def at(self, dotted: str) -> SourcePos:
        return find_pos(self.field_pos, dotted, self.pos)


@dataclass(frozen=True, slots=True)
class ExperimentSet:
    experiments: tuple[Experiment, ...]
    problems: tuple[Problem, ...]

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity.value == "Error")


# --------------------------------------------------------------------------------------------
# parsing


def experiment_files(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[Problem]]:
    """The experiment files named by `paths`: files as given, directories by their *.yaml / *.yml
    (not recursively: a fleet repo kept next to experiments, e.g. examples/chaos/fleets/, is not read)."""
    out: list[str] = []
    probs: list[Problem] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(str(p / n) for n in os.listdir(p) if n.endswith((".yaml", ".yml")) and (p / n).is_file())
            if not found:
                probs.append(problem("MF0007", f"{p} holds no experiment files (*.yaml)", SourcePos(str(p)),
                                     hint="name experiment files, or a directory that holds some"))
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            probs.append(problem("MF0007", f"{p}: no such file or directory", SourcePos(str(p)),
                                 hint="name experiment files (*.yaml) or directories that hold them"))
    return out, probs


def load_experiments(paths: Iterable[str | os.PathLike[str]]) -> ExperimentSet:
    """Read every experiment named by `paths` (files or directories). Never raises on bad input."""
    files, probs = experiment_files(paths)
    exps: list[Experiment] = []
    seen: dict[str, Experiment] = {}
    for f in files:
        try:
            data = Path(f).read_bytes()
        except OSError as e:
            probs.append(problem("MF0006", f"{f}: cannot read: {e.strerror}", SourcePos(f),
                                 hint="check the file's permissions"))
            continue
        exp, more = parse_experiment(f, data)
        probs += more
        if exp is None:
            continue
        if exp.name in seen:
            probs.append(problem("MF0708", f"experiment {exp.name!r} is also defined in {seen[exp.name].file}",
                                 exp.at("metadata.name"), obj=ObjectRef(KIND, exp.name),
                                 hint="give each experiment its own metadata.name"))
            continue
        seen[exp.name] = exp
        exps.append(exp)
    return ExperimentSet(tuple(exps), tuple(probs))


def parse_experiment(file: str, data: bytes) -> tuple[Experiment | None, list[Problem]]:
    """One file -> (experiment or None, problems). Pure apart from resolving `spec.fleet` to a path."""
    doc, probs = parse_yaml(file, data)
    if doc is None:
        return None, probs
    top = SourcePos(file, 1, 1)
    d = doc.data
    if not isinstance(d, dict):
        return None, [problem("MF0007", "the file must hold one mapping with apiVersion, kind, metadata and spec",
                              doc.value_at(()), hint="see the README's 'Chaos experiments' section for an example")]
    if d.get("kind") != KIND or d.get("apiVersion") != m.API_VERSION:
        where = doc.value_at(("kind",)) if "kind" in d else top
        return None, [problem("MF0008", f"{file} is not a {m.API_VERSION} {KIND} (apiVersion "
                              f"{d.get('apiVersion')!r}, kind {d.get('kind')!r})", where,
                              hint=f"start the file with 'apiVersion: {m.API_VERSION}' and 'kind: {KIND}'")]
    for key in d:
        if key not in ("apiVersion", "kind", "metadata", "spec"):
            guess = did_you_mean(key, ["apiVersion", "kind", "metadata", "spec"])
            probs.append(problem("MF0101", f"unknown field {key!r}", doc.pos((key,)),
                                 hint=(f"did you mean {guess!r}? " if guess else "")
                                 + "supported here: apiVersion, kind, metadata, spec"))
    for key in ("metadata", "spec"):
        if key not in d:
            probs.append(problem("MF0103", f"missing required field {key!r}", top, hint=f"add a '{key}:' block"))
    if probs:
        return None, probs
    meta_raw = d["metadata"]
    ref = ObjectRef(KIND, str(meta_raw.get("name") if isinstance(meta_raw, dict) else "?"))
    meta: Metadata | None = None
    spec: ChaosExperimentSpec | None = None
    try:
        meta = Metadata.model_validate(meta_raw)
    except ValidationError as e:
        probs += _errors_to_problems(doc, _Wrap.for_meta(), e, ref, ("metadata",))
    try:
        spec = ChaosExperimentSpec.model_validate(d["spec"])
    except ValidationError as e:
        probs += _errors_to_problems(doc, _Wrap.for_spec(ChaosExperimentSpec), e, ref, ("spec",))
    if probs or meta is None or spec is None:
        return None, probs
    if meta.namespace:
        return None, [problem("MF0101", f"{KIND} is not namespaced: remove metadata.namespace",
                              doc.pos(("metadata", "namespace")), obj=ref, hint="keep name, labels, annotations")]
    if not _DNS_LABEL.fullmatch(meta.name):
        # the name is a path component of the reports (`--out DIR/<name>/`) and the JUnit test's
        # name: '../x' or '/x' would write reports outside DIR
        return None, [problem("MF0106", f"experiment name {meta.name[:80]!r} is not a DNS-1123 label",
                              doc.value_at(("metadata", "name")), obj=ref,
                              hint="the name becomes the report directory (--out DIR/<name>/): use lower-case "
                                   "letters, digits and '-', at most 63 characters, e.g. 'cert-expiry'")]
    return _convert(doc, meta, spec, ref)


def _step(ctx: _Ctx, where: str, s: StepS, n_fault: int) -> tuple[Step | None, list[Problem]]:
    pos = ctx.at(where)
    given = [k for k, attr in zip(STEP_KINDS, _STEP_ATTRS, strict=True) if getattr(s, attr) is not None]
    if len(given) != 1:
        what = "nothing" if not given else " and ".join(given)
        return None, [problem("MF0702", f"{where} does {what}", pos, obj=ctx.ref,
                              hint="write one of fault, heal, push, pause or untilSteady per step (add steps for "
                                   "more)")]
    kind = given[0]
    if s.id is not None and kind != "fault":
        return None, [problem("MF0702", f"{where}: only a fault step takes an id (this one is a {kind})",
                              ctx.at(f"{where}.id"), obj=ctx.ref, hint="remove the id")]
    if s.fault is not None:
        f = s.fault
        probs: list[Problem] = []
        need = _FAULT_PARAMS.get(f.kind)
        for param in ("delay", "rate", "skew", "behaviour"):
            given_param = getattr(f, param) is not None
            if param == need and not given_param:
                probs.append(problem("MF0701", f"{where}.fault: a {f.kind} fault needs '{param}'",
                                     ctx.at(f"{where}.fault"), obj=ctx.ref,
                                     hint=_FAULT_HINTS[param]))
            elif param != need and given_param:
                probs.append(problem("MF0701", f"{where}.fault.{param}: a {f.kind} fault takes no {param}",
                                     ctx.at(f"{where}.fault.{param}"), obj=ctx.ref, hint=f"remove '{param}'"))
        if f.mode is not None and f.kind != "partition":
            probs.append(problem("MF0701", f"{where}.fault.mode: only a partition has a mode (drop or reject)",
                                 ctx.at(f"{where}.fault.mode"), obj=ctx.ref, hint="remove 'mode'"))
        if f.kind == "behaviour" and f.target != "pod":
            probs.append(problem("MF0701", f"{where}.fault: a behaviour applies to pods (the demo servers), not "
                                 f"to a {f.target}", ctx.at(f"{where}.fault.target"), obj=ctx.ref,
                                 hint="target: pod, names: [CLUSTER/NAMESPACE/POD]"))
        if probs:
            return None, probs
        spec = FaultSpec(kind=f.kind, target=f.target, names=tuple(f.names), mode=f.mode or "drop",
                         delay_ms=(f.delay or 0.0) * 1000.0, rate_kbit=f.rate or 0.0, skew_s=f.skew or 0.0,
                         behaviour=f.behaviour or "")
        return Step("fault", pos, id=s.id or f"fault-{n_fault}", fault=spec), []
    if s.heal is not None:
        return Step("heal", pos, heal=s.heal), []
    if s.push is not None:
        p = s.push
        ways = [w for w, on in (("edits", p.edits is not None), ("patch", p.patch is not None),
                                ("restore", p.restore)) if on]
        if len(ways) != 1:
            return None, [problem("MF0704", f"{where}.push does {' and '.join(ways) or 'nothing'}",
                                  ctx.at(f"{where}.push"), obj=ctx.ref,
                                  hint="give exactly one of edits, patch or restore: true")]
        if not p.restore and not p.message.strip():
            return None, [problem("MF0103", f"{where}.push: a push that changes the fleet needs a message",
                                  ctx.at(f"{where}.push"), obj=ctx.ref, hint="add message: (the commit's subject)")]
        edits = tuple(Edit(e.file, e.replace, e.with_, ctx.at(f"{where}.push.edits[{i}]"))
                      for i, e in enumerate(p.edits or ()))
        if any(not e.replace for e in edits):
            return None, [problem("MF0704", f"{where}.push: an edit with an empty 'replace' says nothing to change",
                                  ctx.at(f"{where}.push.edits"), obj=ctx.ref,
                                  hint="replace: the exact text to change (it must occur once in the file)")]
        return Step("push", pos, push=PushSpec(p.message.strip() or "restore the fleet repo", edits, p.patch,
                                                p.restore, p.expect == "Applied", p.timeout)), []
    if s.until_steady is not None:
        return Step("untilSteady", pos, pause_s=float(s.until_steady)), []
    return Step("pause", pos, pause_s=float(s.pause or 0.0)), []


_FAULT_HINTS = {"delay": "add delay: (e.g. 200ms), added each way", "rate": "add rate: (e.g. 256kbit)",
                "skew": "add skew: (e.g. 2m or -1h)", "behaviour": "add behaviour: Error503, Slow or Hang"}


@dataclass(frozen=True, slots=True)
class _Ctx:
    doc: Doc
    ref: ObjectRef
    field_pos: Mapping[str, SourcePos]
    pos: SourcePos

    def at(self, dotted: str) -> SourcePos:
        return find_pos(self.field_pos, dotted, self.pos)


def _event(e: EventMatchS) -> EventMatch:
    return EventMatch(e.kind, e.from_, e.to, e.policy, e.service)


def _convert(doc: Doc, meta: Metadata, s: ChaosExperimentSpec, ref: ObjectRef) -> tuple[Experiment | None,
                                                                                         list[Problem]]:
    fp = _field_pos(doc)
    ctx = _Ctx(doc, ref, fp, doc.pos(("metadata",)))
    probs: list[Problem] = []
    steps: dict[str, list[Step]] = {"setup": [], "method": []}
    for section, raw in (("setup", s.setup), ("method", s.method)):
        n_fault = 0
        for i, raw_step in enumerate(raw):
            if raw_step.fault is not None:
                n_fault += 1
            step, more = _step(ctx, f"spec.{section}[{i}]", raw_step, n_fault)
            probs += more
            if step is not None:
                steps[section].append(step)
    # fault ids: unique; a heal names a fault injected before it (in the method; setup only pushes)
    injected: dict[str, Step] = {}
    for section in ("setup", "method"):
        for i, st in enumerate(steps[section]):
            where = f"spec.{section}[{i}]"
            if section == "setup" and st.kind in ("fault", "heal"):
                probs.append(problem("MF0702", f"{where}: setup runs before the steady state is checked and "
                                     f"is not measured; a {st.kind} belongs in the method", st.pos, obj=ref,
                                     hint="move it to spec.method (setup is for pushes and pauses)"))
            elif st.fault is not None:
                if st.id in injected:
                    probs.append(problem("MF0703", f"{where}: fault id {st.id!r} is used twice", st.pos, obj=ref,
                                         hint="give each fault step its own id"))
                injected[st.id] = st
            elif st.kind == "heal" and st.heal != HEAL_ALL and st.heal not in injected:
                known = ", ".join(injected) or "none yet"
                probs.append(problem("MF0703", f"{where}: heal {st.heal!r} names no fault injected before it "
                                     f"(faults so far: {known})", ctx.at(f"{where}.heal"), obj=ref,
                                     hint="heal: <id of an earlier fault step> or heal: all"))
    clients = [t.from_ for t in s.steady_state.traffic]
    for i, c in enumerate(clients):
        if c in clients[:i]:
            probs.append(problem("MF0201", f"spec.steadyState.traffic[{i}]: traffic from {c} is declared twice",
                                 ctx.at(f"spec.steadyState.traffic[{i}]"), obj=ref,
                                 hint="one traffic entry per client cluster (raise its rate instead)"))
    if not s.steady_state.traffic:
        probs.append(problem("MF0705", "spec.steadyState.traffic is empty: nothing would be measured",
                             ctx.at("spec.steadyState.traffic"), obj=ref,
                             hint="add traffic: [{from: CLUSTER, service: HOST}]"))
    expectations: list[Expectation] = []
    method_faults = [st for st in steps["method"] if st.fault is not None]
    for i, e in enumerate(s.expect):
        where = f"spec.expect[{i}]"
        if e.client not in clients:
            probs.append(problem("MF0705", f"{where}: client {e.client!r} sends no traffic (clients: "
                                 f"{', '.join(clients) or 'none'})", ctx.at(f"{where}.client"), obj=ref,
                                 hint="add it to spec.steadyState.traffic or expect of a client that does"))
        if e.fault is not None and e.fault not in injected:
            probs.append(problem("MF0703", f"{where}.fault: no fault step has id {e.fault!r}",
                                 ctx.at(f"{where}.fault"), obj=ref,
                                 hint=f"name one of: {', '.join(injected) or 'no fault is injected'}"))
        if (e.failover_within is not None or e.failback_within is not None) and not method_faults:
            probs.append(problem("MF0705", f"{where}: failover and failback are measured from a fault; the "
                                 "method injects none", ctx.at(where), obj=ref,
                                 hint="add a fault step, or expect servedBy / maxFailed instead"))
        if e.failback_within is not None and method_faults:
            fid = e.fault or method_faults[0].id
            idx = next(j for j, st in enumerate(steps["method"]) if st.id == fid and st.fault is not None)
            if not any(st.kind == "heal" and st.heal in (fid, HEAL_ALL) for st in steps["method"][idx + 1:]):
                probs.append(problem("MF0705", f"{where}.failbackWithin: fault {fid!r} is never healed in the "
                                     "method, so there is no failback to time", ctx.at(f"{where}.failbackWithin"),
                                     obj=ref, hint=f"add a step 'heal: {fid}' after it"))
        if e.served_by is not None and not e.served_by:
            probs.append(problem("MF0705", f"{where}.servedBy is empty", ctx.at(f"{where}.servedBy"), obj=ref,
                                 hint="list the clusters in the order they should serve, e.g. [east, south, east]"))
        for field_name, pods in (("servedDuringFault", e.served_during_fault),
                                 ("notServedDuringFault", e.not_served_during_fault)):
            for j, pod in enumerate(pods):
                if pod.count("/") != 1 or not all(pod.split("/")):
                    probs.append(problem("MF0102", f"{where}.{field_name}[{j}]: {pod!r} is not CLUSTER/POD",
                                         ctx.at(f"{where}.{field_name}[{j}]"), obj=ref,
                                         hint="e.g. east/checkout-1 (the pod that answers, as the echo names it)"))
            if pods and not method_faults:
                probs.append(problem("MF0705", f"{where}.{field_name}: the method injects no fault", ctx.at(where),
                                     obj=ref, hint="add a fault step, or drop this expectation"))
        traffic_of = next((t for t in s.steady_state.traffic if t.from_ == e.client), None)
        refused = traffic_of is not None and traffic_of.expect_status is not None and \
            not 200 <= traffic_of.expect_status < 300
        if e.split and refused:
            probs.append(problem("MF0705", f"{where}.split: {e.client}'s traffic expects status "
                                 f"{traffic_of.expect_status if traffic_of else '?'}, which no workload answers",
                                 ctx.at(f"{where}.split"), obj=ref,
                                 hint="measure a split on traffic that gets 2xx answers"))
        split_names = [x.workload for x in e.split]
        for j, w in enumerate(split_names):
            if w in split_names[:j]:
                probs.append(problem("MF0705", f"{where}.split[{j}]: workload {w!r} is listed twice",
                                     ctx.at(f"{where}.split[{j}]"), obj=ref, hint="one entry per workload"))
        alternatives = {frozenset(x.split("|")) for x in e.served_by or ()}
        shared = sorted({c for a in alternatives for b in alternatives if a != b for c in a & b})
        if shared:
            probs.append(problem("MF0705", f"{where}.servedBy names {', '.join(shared)} in two different alternatives: "
                                 "a request served there could belong to either", ctx.at(f"{where}.servedBy"),
                                 obj=ref, hint="write each cluster always alone or always in the same 'a|b' group"))
        expectations.append(Expectation(
            client=e.client, pos=ctx.at(where), fault=e.fault, failover_within_s=e.failover_within,
            failback_within_s=e.failback_within, max_failed=e.max_failed, min_failed=e.min_failed,
            max_indeterminate=e.max_indeterminate,
            max_flaps=e.max_flaps, min_ok_percent=e.min_ok_percent,
            served_by=tuple(tuple(x.split("|")) for x in e.served_by) if e.served_by else None,
            served_during_fault=tuple(e.served_during_fault), not_served_during_fault=tuple(e.not_served_during_fault),
            events_include=tuple(_event(x) for x in e.events_include),
            events_exclude=tuple(_event(x) for x in e.events_exclude),
            logs_include=tuple(LogMatch(x.source, x.contains) for x in e.logs_include),
            split=tuple(SplitExpect(x.workload, x.percent, x.tolerance) for x in e.split),
            field_pos=MappingProxyType({k[len(where) + 1:]: v for k, v in fp.items() if k.startswith(where + ".")})))
    if probs:
        return None, probs
    base = Path(doc.file).parent
    fleet = (base / s.fleet).resolve()
    suites = tuple(x.strip() for x in meta.labels.get(SUITE_LABEL, "").split(",") if x.strip())
    traffic = tuple(Traffic(t.from_, t.workload, t.service, t.rate, t.connections == "KeepAlive",
                            t.max_requests_per_connection, t.timeout, tuple(t.ignore_workloads),
                            ctx.at(f"spec.steadyState.traffic[{i}]"), t.method, t.path, t.expect_status)
                    for i, t in enumerate(s.steady_state.traffic))
    h = s.steady_state.hypothesis
    return Experiment(
        name=meta.name, file=doc.file, fleet_dir=str(fleet), description=" ".join(s.description.split()),
        suites=suites, known_limitation=" ".join(s.known_limitation.split()),
        expected_failure=" ".join(s.expected_failure.split()), run_length=s.run_length, traffic=traffic,
        hypothesis=Hypothesis(h.min_ok_percent, h.served_by, h.window), settle_timeout_s=s.steady_state.settle_timeout,
        setup=tuple(steps["setup"]), method=tuple(steps["method"]), expect=tuple(expectations), pos=ctx.pos,
        field_pos=fp), []


__all__ = ["BEHAVIOURS", "FAULT_KINDS", "HEAL_ALL", "KIND", "SUITE_LABEL", "TARGET_KINDS", "Edit", "EventMatch",
           "Expectation", "Experiment", "ExperimentSet", "FaultSpec", "Hypothesis", "LogMatch", "PushSpec",
           "SplitExpect", "Step", "Traffic", "experiment_files", "load_experiments", "parse_experiment"]
