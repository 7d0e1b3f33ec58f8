"""What an experiment file alone cannot tell: does it fit its fleet and its lab?

`gitops.experiment` checks the file (shape, types, steps, fault ids); this module checks it against
the fleet repo it names and the lab that fleet lays out, with the same codes and file:line:

- the fleet repo loads (MF0707);
- every cluster it names exists, traffic comes from a client workload, the service exists, log
  sources are proxies of the lab (waypoints and ingresses included) or the controller, a split
  names a workload of the lab (MF0706);
- every fault applies: the lab's own planner (`clusters.lab.faults.plan_fault`, pure) is asked with
  the fault exactly as the run will send it, so "no pod matches" and "latency on a node" are the
  lab's words, decided in one place (MF0701);
- every push applies: edits are replayed in order on the fleet's files (a restore resets them),
  each `replace` must occur exactly once; a patch must pass `git apply --check` (MF0704).

`resolve_service` and `client_workload` are also what the engine uses to start traffic, so what
validates is what runs.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import gitops
from clusters.lab.faults import FaultError, FaultRequest, plan_fault
from clusters.lab.topology import LabPlan, PlanError, plan_lab
from gitops.codes import problem
from gitops.experiment import Experiment, FaultSpec, Step
from gitops.model import ConfigSnapshot, GlobalService
from gitops.problems import ObjectRef, Problem, Severity, SourcePos

CONTROLLER_LOG = "controller"


@dataclass(frozen=True, slots=True)
class Fleet:
    """A fleet repo as experiments see it: its snapshot and the lab it lays out."""

    path: Path
    snapshot: ConfigSnapshot
    plan: LabPlan

    @property
    def clusters(self) -> list[str]:
        return sorted(self.snapshot.clusters)

    def log_sources(self) -> list[str]:
        out = [CONTROLLER_LOG]
        for c in self.plan.clusters:
            out += [f"ztunnel/{c.name}/{n.name}" for n in c.nodes]
            if c.gateway is not None:
                out.append(f"gateway/{c.name}")
            out += [p.proxy_id for p in c.proxy_pods()]   # waypoints, ingress gateways
        return out


def load_fleet(path: Path) -> tuple[Fleet | None, list[Problem]]:
    """The fleet at `path`, or why it cannot be used (its own problems, re-coded MF0707 at `path`)."""
    pos = SourcePos(str(path))
    if not (path / "federation.yaml").is_file():
        return None, [problem("MF0707", f"{path} is not a fleet repo (no federation.yaml)", pos,
                              hint="set spec.fleet to the fleet repo's directory, relative to the experiment "
                                   "file (e.g. ../fleet), or pass --fleet DIR")]
    try:
        res = gitops.load(path)
    except gitops.RepoAccessError as e:
        return None, [problem("MF0707", f"cannot read the fleet repo {path}: {e}", pos, hint="check the path")]
    if res.snapshot is None:
        first = res.errors[0].render().splitlines()[0] if res.errors else "errors"
        return None, [problem("MF0707", f"the fleet repo {path} does not validate ({len(res.errors)} error(s); first: "
                              f"{first})", pos, hint=f"run `meshfed validate {path}`")]
    try:
        # the lab exactly as the runner lays it out (`clusters.lab.runner`): its Gateways run pods too
        plan = plan_lab(res.snapshot.clusters, res.snapshot.lab_clusters, res.snapshot.services,
                        gateways=res.snapshot.gateways)
    except PlanError as e:
        return None, [problem("MF0707", f"the fleet repo {path} cannot be laid out as a lab: {e}", pos,
                              hint="add lab/<cluster>.yaml (LabCluster) for the clusters the lab should run")]
    return Fleet(path, res.snapshot, plan), []


def resolve_service(snapshot: ConfigSnapshot, name: str) -> GlobalService | None:
    """A GlobalService by hostname, NAMESPACE/NAME or NAME (when only one namespace has it)."""
    for svc in snapshot.services.values():
        if name == svc.hostname or name == f"{svc.namespace}/{svc.name}":
            return svc
    named = [s for s in snapshot.services.values() if s.name == name]
    return named[0] if len(named) == 1 else None


def client_workload(plan: LabPlan, cluster: str, workload: str | None) -> str | None:
    """The pod a client's traffic comes from: `<workload>-0`, or the cluster's first client pod."""
    try:
        pods = plan.cluster(cluster).pods
    except KeyError:
        return None
    for p in pods:
        if p.role == "client" and (workload is None or p.workload == workload):
            return f"{p.cluster}/{p.namespace}/{p.name}"
    return None


def client_workload_pods(plan: LabPlan, cluster: str, workload: str | None) -> list[str]:
    """Every pod of the client workload `client_workload` picks, that one first."""
    first = client_workload(plan, cluster, workload)
    if first is None:
        return []
    name = next(p.workload for p in plan.cluster(cluster).pods if f"{p.cluster}/{p.namespace}/{p.name}" == first)
    return [first] + [f"{p.cluster}/{p.namespace}/{p.name}" for p in plan.cluster(cluster).pods
                      if p.role == "client" and p.workload == name and f"{p.cluster}/{p.namespace}/{p.name}" != first]


def fault_request(f: FaultSpec) -> FaultRequest:
    """The lab's request for a fault step (what the engine sends, what validation dry-runs)."""
    return FaultRequest(f.kind, f.target, tuple(f.names), f.mode, f.delay_ms, f.rate_kbit, f.skew_s, f.behaviour)


def with_fleet(exp: Experiment, fleet_dir: Path | None) -> Experiment:
    return exp if fleet_dir is None else replace(exp, fleet_dir=str(fleet_dir.resolve()))


def validate(experiments: Sequence[Experiment], fleet_dir: Path | None = None) -> list[Problem]:
    """Problems of `experiments` against their fleets (`fleet_dir` overrides every spec.fleet)."""
    fleets: dict[str, tuple[Fleet | None, list[Problem]]] = {}
    out: list[Problem] = []
    for exp in (with_fleet(e, fleet_dir) for e in experiments):
        if exp.fleet_dir not in fleets:
            fleets[exp.fleet_dir] = load_fleet(Path(exp.fleet_dir))
        fleet, probs = fleets[exp.fleet_dir]
        ref = ObjectRef("ChaosExperiment", exp.name)
        if fleet is None:
            out += [problem(p.code, p.message, exp.at("spec.fleet"), hint=p.hint, obj=ref) for p in probs]
            continue
        out += check_against(exp, fleet)
    return out


def check_against(exp: Experiment, fleet: Fleet) -> list[Problem]:
    ref = ObjectRef("ChaosExperiment", exp.name)
    out: list[Problem] = []
    clusters = set(fleet.clusters)
    known = ", ".join(fleet.clusters)

    def unknown(name: str, where: SourcePos, what: str) -> None:
        if name not in clusters:
            out.append(problem("MF0706", f"{what}: no cluster {name!r} in the fleet {fleet.path} (clusters: {known})",
                               where, obj=ref, hint="name one of the fleet's clusters"))

    for t in exp.traffic:
        unknown(t.client, t.pos, "traffic from")
        if t.client in clusters and client_workload(fleet.plan, t.client, t.workload) is None:
            what = f"client workload {t.workload!r}" if t.workload else "a client workload (role: client)"
            out.append(problem("MF0706", f"traffic from {t.client}: its LabCluster has no {what}", t.pos, obj=ref,
                               hint=f"add a workload with role: client to lab/{t.client}.yaml, or name one"))
        if resolve_service(fleet.snapshot, t.service) is None:
            names = ", ".join(s.hostname for s in fleet.snapshot.services.values())
            out.append(problem("MF0706", f"traffic from {t.client}: no GlobalService {t.service!r} (services: {names})",
                               t.pos, obj=ref, hint="write its hostname, NAMESPACE/NAME or NAME"))
    if exp.hypothesis.served_by != "local":
        unknown(exp.hypothesis.served_by, exp.at("spec.steadyState.hypothesis.servedBy"), "hypothesis servedBy")
    sources = fleet.log_sources()
    for e in exp.expect:
        for alt in e.served_by or ():
            for c in alt:
                unknown(c, e.field_pos.get("servedBy", e.pos), f"expectation of {e.client}: servedBy")
        for i, m in enumerate((*e.events_include, *e.events_exclude)):
            where = e.field_pos.get(f"eventsInclude[{i}]", e.pos)
            for named in (m.from_cluster, m.to_cluster):
                if named:
                    unknown(named, where, f"expectation of {e.client}: event {m.kind}")
        workloads = sorted({p.workload for c in fleet.plan.clusters for p in c.pods if not p.is_proxy})
        for j, sp in enumerate(e.split):
            if sp.workload not in workloads:
                out.append(problem("MF0706", f"expectation of {e.client}: split names no workload {sp.workload!r} "
                                   "of the lab", e.field_pos.get(f"split[{j}]", e.pos), obj=ref,
                                   hint=f"one of: {', '.join(workloads)}"))
        for lm in e.logs_include:
            if lm.source not in sources:
                out.append(problem("MF0706", f"expectation of {e.client}: no log {lm.source!r} in this lab",
                                   e.pos, obj=ref, hint=f"one of: {', '.join(sources)}"))
    api_ports = {c: 1 for c in fleet.clusters}   # any port: the plan only needs one to exist
    for st in (*exp.setup, *exp.method):
        if st.fault is None:
            continue
        try:
            plan_fault(fleet.plan, fault_request(st.fault), api_ports)
        except (FaultError, KeyError) as err:
            msg = str(err.args[0]) if err.args else str(err)
            out.append(problem("MF0701", f"fault {st.id} ({st.fault.describe()}): {msg}", st.pos, obj=ref,
                               hint="fix the target or the fault kind (see `meshfed lab fault --help`)"))
    out += check_pushes(exp, fleet.path, ref)
    return out


KIND_FAULTS = "kill|stop pod, kill|stop gateway, kill|stop|cont node, partition wan A B, kill|stop controller"


def kind_gaps(exp: Experiment, fleet: Fleet) -> list[str]:
    """The faults of `exp` that have no kind equivalent, each with kind's own reason (empty: every
    fault maps). Asked of `clusters.kind.plan.plan_fault` (pure), the planner `meshfed lab fault
    --provider kind` uses, with placeholder node addresses (the plan only needs the names kind gives
    the nodes: <cluster>-worker, <cluster>-worker2, …), so the answer is kind's, decided in one place."""
    from clusters.kind.plan import KindFacts, KindOptions, KindPlanError
    from clusters.kind.plan import plan_fault as plan_kind_fault

    nodes = {c.name: {f"{c.name}-control-plane": "192.0.2.1",
                      **{f"{c.name}-worker{i + 1 if i else ''}": f"192.0.2.{i + 2}" for i in range(len(c.nodes))}}
             for c in fleet.plan.clusters}
    opts = KindOptions(state_dir=Path("/nonexistent"), fleet_dir=fleet.path, repo_dir=Path("/nonexistent"))
    facts = KindFacts(network="192.0.2.0/24", gateway="192.0.2.254", node_addresses=nodes)
    gaps = []
    for st in (*exp.setup, *exp.method):
        f = st.fault
        if f is None:
            continue
        try:
            plan_kind_fault(fleet.snapshot, opts, facts, f.kind, f.target, f.names)
        except KindPlanError as e:
            gaps.append(f"{st.id} ({f.describe()}): {str(e).split('; on kind:')[0]}")   # the list: KIND_FAULTS
            continue
        if f.kind == "partition" and f.mode == "reject":
            gaps.append(f"{st.id} ({f.describe()}): kind drops (its partition has no reject mode)")
    return gaps


def check_pushes(exp: Experiment, fleet_dir: Path, ref: ObjectRef) -> list[Problem]:
    """Replay the experiment's pushes on the fleet's files: every edit and patch must apply."""
    steps = [s for s in (*exp.setup, *exp.method) if s.push is not None]
    if not steps:
        return []
    out: list[Problem] = []
    with tempfile.TemporaryDirectory(prefix="meshfed-chaos-validate-") as tmp:
        work = Path(tmp) / "fleet"

        def reset() -> None:
            if work.exists():
                shutil.rmtree(work)
            shutil.copytree(fleet_dir, work, ignore=shutil.ignore_patterns(".git"))

        reset()
        for st in steps:
            out += _replay(st, work, reset, ref)
    return out


def _replay(st: Step, work: Path, reset: Callable[[], None], ref: ObjectRef) -> list[Problem]:
    push = st.push
    assert push is not None
    if push.restore:
        reset()
        return []
    out: list[Problem] = []
    for e in push.edits:
        path = e.path_in(work)
        if path is None:
            out.append(problem("MF0704", f"edit of {e.file}: no such file in the fleet repo", e.pos, obj=ref,
                               hint="name a file relative to the fleet repo's root, e.g. policies/shop/checkout.yaml"))
            continue
        text = path.read_text()
        n = text.count(e.replace)
        if n != 1:
            out.append(problem("MF0704", f"edit of {e.file}: the text to replace occurs {n} times (must be once, after "
                               f"the experiment's earlier edits): {e.replace[:80]!r}", e.pos, obj=ref,
                               hint="quote a longer, unique piece of the file (YAML block scalars keep newlines)"))
            continue
        path.write_text(text.replace(e.replace, e.with_, 1))
    if push.patch is not None:
        r = subprocess.run(["git", "apply", "-"], cwd=work, input=push.patch,
                           capture_output=True, text=True, check=False, timeout=60)
        if r.returncode != 0:
            out.append(problem("MF0704", f"the patch does not apply to the fleet repo: {r.stderr.strip()[:300]}",
                               st.pos, obj=ref, hint="make it with `git diff` in a clone of the fleet repo"))
    return out


def errors(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity is Severity.ERROR]


def fleets_of(experiments: Iterable[Experiment]) -> Mapping[str, list[Experiment]]:
    """Experiments grouped by fleet repo, in the order given (one lab per fleet)."""
    out: dict[str, list[Experiment]] = {}
    for e in experiments:
        out.setdefault(e.fleet_dir, []).append(e)
    return out
