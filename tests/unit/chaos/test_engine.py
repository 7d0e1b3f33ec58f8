"""The chaos engine's orchestration, against a fake lab on a fake clock (pure: no sandbox, no socket).

The fake serves each client from its own cluster, from the next one while a `kill` of its checkout
is active (after a 0.1 s detection), and back 1 s after the heal; pushes are validated with the real
fleet loader. What is proven: the order of things (setup, traffic, steady state, method, heal of what
is left, recovery, clean-up), that the fleet repo is restored when the experiment pushed, that a
steady state that never holds skips the method, that a step that cannot be applied is an error with
clean-up still done, and how statuses follow from verdicts and `expectedFailure`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import gitops
from chaos.engine import Engine, ProviderUnavailable, RunOptions
from chaos.validate import load_fleet
from clusters.lab.layout import LabError
from gitops.experiment import parse_experiment

REPO = Path(__file__).resolve().parents[3]
FLEET = REPO / "examples" / "fleet"
NEXT = {"east": "south", "south": "east", "west": "east"}


class FakeRunner:
    def __init__(self, fed: FakeFed) -> None:
        self.fed = fed

    def fault(self, kind: str, target: str, names: Sequence[str], mode: str = "drop", delay_ms: float = 0.0,
              **kw: Any) -> dict[str, Any]:
        self.fed.calls.append(f"fault {kind} {target} {' '.join(names)}")
        if self.fed.refuse_faults:
            raise LabError("the lab refused: no such pod")
        if kind == "kill" and target == "pod":
            cluster = names[0].split("/")[0]
            self.fed.serving.setdefault(cluster, []).append((self.fed.now() + 0.1, NEXT[cluster]))
        return {"ok": True, "applied": []}

    def heal(self, target: str | None = None, names: Sequence[str] = (), kind: str | None = None) -> dict[str, Any]:
        self.fed.calls.append(f"heal {target or 'all'} {' '.join(names)}".rstrip())
        if target == "pod" and names:
            cluster = names[0].split("/")[0]
            self.fed.serving.setdefault(cluster, []).append((self.fed.now() + 1.0, cluster))
        return {"ok": True, "healed": []}


class FakeFed:
    """What the engine uses of `chaos.demo.LabFederation`."""

    def __init__(self, clock: list[float], broken_clients: Sequence[str] = ()) -> None:
        self.clock = clock
        self.events: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self.serving: dict[str, list[tuple[float, str]]] = {}
        self.loads: dict[str, tuple[float, float]] = {}
        self.observers: dict[str, tuple[str | None, float]] = {}   # name -> (pod, rate) of the other replicas
        self.observers_stopped: list[str] = []
        self.load_kw: dict[str, dict[str, Any]] = {}   # load name -> what start_load was given
        self.runner = FakeRunner(self)
        self.refuse_faults = False
        self.broken = set(broken_clients)
        self.commits: list[str] = ["base"]
        self.tree = Path(tempfile.mkdtemp(prefix="fake-fleet-"))
        shutil.copytree(FLEET, self.tree / "fleet")
        self.clusters = ["east", "south", "west"]

    def now(self) -> float:
        return self.clock[0]

    def note(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"at_s": self.now(), "kind": kind, **fields}
        self.events.append(ev)
        return ev

    def head(self) -> str:
        return self.commits[-1]

    def log_path(self, source: str) -> Path:
        return self.tree / f"{source.replace('/', '-')}.log"

    def start_load(self, cluster: str, rate: float, timeout_s: float = 2.0, **kw: Any) -> Path:
        self.load_kw[kw.get("name") or cluster] = kw
        if kw.get("name", cluster) not in ("", cluster):   # another replica's (unmeasured) load
            self.observers[kw["name"]] = (kw.get("pod"), rate)
            return self.tree / "x"
        self.calls.append(f"load {cluster}")
        self.loads[cluster] = (self.now(), rate)
        return self.tree / "x"

    def stop_load(self, cluster: str) -> list[dict[str, Any]]:
        if cluster in self.observers:
            self.observers_stopped.append(cluster)
            return []
        self.calls.append(f"stop {cluster}")
        return self.records(cluster)

    def records(self, cluster: str) -> list[dict[str, Any]]:
        if cluster not in self.loads:
            return []
        t0, rate = self.loads[cluster]
        out = []
        n = int((self.now() - t0) * rate)
        for seq in range(n):
            start = t0 + seq / rate
            where = cluster
            for t, c in self.serving.get(cluster, []):
                if start >= t:
                    where = c
            ok = cluster not in self.broken
            if self.load_kw.get(cluster, {}).get("ok_status") == 403:   # a denied method: the mesh answers
                out.append({"seq": seq, "start_s": start, "latency_ms": 5.0, "outcome": "ok", "status": 403,
                            "cluster": "", "pod": "", "error": ""})
                continue
            out.append({"seq": seq, "start_s": start, "latency_ms": 5.0, "outcome": "ok" if ok else "fail",
                        "cluster": where if ok else "", "pod": "checkout-0", "error": "" if ok else "refused"})
        return out

    def tiers(self, cluster: str, service: str = "") -> list[str]:
        return [cluster, NEXT[cluster], "west" if cluster != "west" else "south"]

    def wait_converged(self, timeout_s: float = 0.0, revision: str | None = None) -> tuple[dict[str, Any], float]:
        self.calls.append(f"converged {revision}")
        return {}, 0.0

    def _push(self, edit: Callable[[Path], str]) -> str:
        message = edit(self.tree / "fleet")
        sha = f"sha-{len(self.commits)}"
        self.commits.append(sha)
        self.calls.append(f"push {message}")
        self.note("policy_pushed", target="fleet repo", detail=message)
        return sha

    def push(self, edit: Callable[[Path], str]) -> str:
        return self._push(edit)

    def restore(self, base: str, message: str) -> str | None:
        if self.commits[-1] == base:
            return None
        shutil.rmtree(self.tree / "fleet")
        shutil.copytree(FLEET, self.tree / "fleet")
        self.calls.append(f"restore {base}")
        self.commits.append(f"sha-{len(self.commits)}")
        return self.commits[-1]

    def wait_attempted(self, sha: str, timeout_s: float = 0.0) -> dict[str, Any]:
        res = gitops.load(self.tree / "fleet")
        ok = res.snapshot is not None
        return {"desired": {"revision": sha, "ok": ok}, "applied": {"revision": sha if ok else "base"},
                "problems": [p.as_dict() for p in res.errors]}

    def status(self) -> dict[str, Any]:
        return {}

    def failover_events(self, since_s: float) -> list[dict[str, Any]]:
        return [{"at_s": e["at_s"] + 0.2, "kind": "FailedOver", "from_cluster": e["cluster"],
                 "to_cluster": NEXT[e["cluster"]], "service": "checkout.shop.svc.clusterset.local",
                 "policy_file": "policies/shop/checkout.yaml:3:1", "trigger": "t"}
                for e in self.events if e["kind"] == "fault_injected" and e.get("cluster") in NEXT]


HEAD = """\
apiVersion: meshfed.dev/v1alpha1
kind: ChaosExperiment
metadata:
  name: {name}
spec:
  description: probe
  fleet: {fleet}
{extra}  steadyState:
    traffic:
      - from: east
        service: checkout.shop.svc.clusterset.local
        rate: 20
        timeout: 1s
    hypothesis: {{window: 2s}}
    settleTimeout: 5s
"""


def experiment(body: str, name: str = "probe", extra: str = "") -> Any:
    exp, probs = parse_experiment("x.yaml", (HEAD.format(name=name, fleet=FLEET, extra=extra) + body).encode())
    assert exp is not None, [p.render() for p in probs]
    return exp


CRASH = """\
  method:
    - id: crash
      fault: {kind: kill, target: pod, names: ["east/shop/checkout-*"]}
    - pause: 6s
    - heal: crash
  expect:
    - client: east
      failoverWithin: 1s
      failbackWithin: 3s
      maxFailed: 0
      servedBy: [east, south, east]
      eventsInclude: [{kind: FailedOver, from: east, to: south}]
"""


@pytest.fixture()
def env(tmp_path: Path) -> tuple[Engine, FakeFed, list[float], Any]:
    clock = [1_000.0]

    def sleep(s: float) -> None:
        clock[0] += s

    engine = Engine(RunOptions(out_dir=tmp_path / "out", state_dir=tmp_path / "lab"), clock=lambda: clock[0],
                    sleep=sleep)
    fleet, _ = load_fleet(FLEET)
    return engine, FakeFed(clock), clock, fleet


def test_a_crash_runs_in_order_passes_and_reports(env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    engine, fed, _, fleet = env
    res = engine.run_one(fed, fleet, experiment(CRASH))  # type: ignore[arg-type]
    assert res.status == "passed", [v.message() for v in res.failed] or res.error
    assert fed.calls == ["converged None", "load east", "fault kill pod east/shop/checkout-*",
                         "heal pod east/shop/checkout-*", "heal all", "stop east"]   # no push: nothing to restore
    # east's frontend's other replica sends too (a second observer for the health vote), unmeasured
    assert fed.observers == {"east.replica-1": ("east/shop/frontend-1", 10.0)}
    assert fed.observers_stopped == ["east.replica-1"]
    names = [v.name for v in res.verdicts]
    assert names[:2] == ["steadyState (before)", "steadyState (after)"]
    assert {"failoverWithin", "failbackWithin", "maxFailed", "servedBy", "eventsInclude"} <= set(names)
    assert res.priorities == {"east": ["east", "south", "west"]}
    assert res.report is not None and res.report.markdown.read_text().startswith("# probe: probe")
    assert (res.out_dir / "verdicts.json").exists() and (res.out_dir / "requests-east.jsonl").exists()


def test_whatever_is_still_injected_is_healed_and_then_recovery_is_awaited(
        env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    engine, fed, _, fleet = env
    body = CRASH.replace("    - heal: crash\n", "").replace("      failbackWithin: 3s\n", "")
    res = engine.run_one(fed, fleet, experiment(body))  # type: ignore[arg-type]
    assert res.status == "passed", [v.message() for v in res.failed] or res.error
    heals = [e for e in res.timeline if e["kind"] == "fault_healed"]
    assert len(heals) == 1 and heals[0]["detail"] == "end of the method"


def test_pushes_are_judged_and_the_fleet_repo_is_restored(env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    engine, fed, _, fleet = env
    body = """\
  method:
    - push:
        message: a typo
        expect: Rejected
        edits: [{file: policies/shop/checkout.yaml, replace: "maxEjectionPercent: 100", with: "maxEjectionPercnt: 100"}]
    - pause: 2s
  expect:
    - client: east
      maxFailed: 0
      servedBy: [east]
"""
    res = engine.run_one(fed, fleet, experiment(body))  # type: ignore[arg-type]
    assert res.status == "passed", [v.message() for v in res.failed] or res.error
    (push,) = [v for v in res.verdicts if v.name == "push"]
    assert push.ok and push.measured.startswith("rejected (1 problem(s))") and "MF0101" in push.evidence[0]
    assert fed.calls[-2:] == ["restore base", f"converged {fed.commits[-1]}"]
    assert (fed.tree / "fleet" / "policies" / "shop" / "checkout.yaml").read_text() == \
        (FLEET / "policies" / "shop" / "checkout.yaml").read_text()


def test_a_push_expected_applied_that_is_rejected_fails(env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    engine, fed, _, fleet = env
    body = """\
  method:
    - push:
        message: a typo
        edits: [{file: policies/shop/checkout.yaml, replace: "interval: 5s", with: "interval: 5 s"}]
"""
    res = engine.run_one(fed, fleet, experiment(body))  # type: ignore[arg-type]
    assert res.status == "failed"
    (push,) = res.failed
    assert push.name == "push" and push.expected.endswith("Applied") and push.measured.startswith("rejected")


def test_a_steady_state_that_never_holds_skips_the_method(env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    engine, _, clock, fleet = env
    fed = FakeFed(clock, broken_clients=["east"])
    res = engine.run_one(fed, fleet, experiment(CRASH))  # type: ignore[arg-type]
    assert res.status == "failed" and not any(c.startswith("fault") for c in fed.calls)
    (v,) = res.failed
    assert v.name == "steadyState (before)" and "still not holding 5 s" in v.evidence[-1]
    assert fed.calls[-1] == "stop east"


def test_a_step_that_cannot_be_applied_is_an_error_and_clean_up_still_runs(
        env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    engine, fed, _, fleet = env
    fed.refuse_faults = True
    res = engine.run_one(fed, fleet, experiment(CRASH))  # type: ignore[arg-type]
    assert res.status == "error" and "could not be applied: the lab refused" in res.error
    assert fed.calls[-2:] == ["heal all", "stop east"]


@pytest.mark.parametrize(("expectation", "status"), [("maxFailed: 0", "xpass"), ("failoverWithin: 0s", "xfail")])
def test_expected_failures(env: tuple[Engine, FakeFed, list[float], Any], expectation: str, status: str) -> None:
    engine, fed, _, fleet = env
    body = CRASH.split("  expect:")[0] + f"  expect:\n    - client: east\n      {expectation}\n"
    res = engine.run_one(fed, fleet, experiment(body, extra="  expectedFailure: L4 cannot see it\n"))  # type: ignore[arg-type]
    assert res.status == status and res.ok


def test_the_kind_provider_says_what_to_use_instead(tmp_path: Path) -> None:
    with pytest.raises(ProviderUnavailable, match="--provider lab"):
        Engine(RunOptions(out_dir=tmp_path, state_dir=tmp_path, provider="kind"))


def test_after_a_controller_fault_clean_up_waits_for_the_mesh_to_converge_again(
        env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    """A restarted controller answers only once Ray is up again: results (its failover history) and
    the next experiment must wait for it."""
    engine, fed, _, fleet = env
    body = """\
  method:
    - id: ctl
      fault: {kind: kill, target: controller}
    - pause: 3s
    - heal: ctl
  expect:
    - client: east
      maxFailed: 0
"""
    res = engine.run_one(fed, fleet, experiment(body))  # type: ignore[arg-type]
    assert res.status == "passed", [v.message() for v in res.failed] or res.error
    assert fed.calls[-3:] == ["heal all", "converged None", "stop east"]


def test_a_cluster_whose_latest_lease_event_is_an_expiry_is_still_unobserved() -> None:
    from chaos.engine import expired_clusters

    events = [{"kind": "ClusterLeaseExpired", "from_cluster": "east", "at_s": 1.0},
              {"kind": "ClusterLeaseExpired", "from_cluster": "south", "at_s": 1.0},
              {"kind": "FailedOver", "from_cluster": "east", "at_s": 1.5},
              {"kind": "ClusterRecovered", "from_cluster": "south", "at_s": 2.0},
              {"kind": "ClusterFenced", "from_cluster": "west", "at_s": 3.0}]
    assert expired_clusters(events) == ["east", "west"]
    assert expired_clusters([*events, {"kind": "ClusterRecovered", "from_cluster": "east", "at_s": 4.0},
                             {"kind": "ClusterRecovered", "from_cluster": "west", "at_s": 4.0}]) == []


def test_setup_waits_until_every_cluster_is_observed_again(env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    """The setup push that shortens the lease TTL expires every lease for a few seconds: the steady
    state is judged only once the controller has recovered them."""
    engine, fed, clock, fleet = env
    t_recovered = clock[0] + 4.0
    events = [{"kind": "ClusterLeaseExpired", "from_cluster": "east", "at_s": clock[0]}]
    fed.failover_events = lambda since: events + (  # type: ignore[method-assign]
        [{"kind": "ClusterRecovered", "from_cluster": "east", "at_s": t_recovered}] if clock[0] >= t_recovered else [])
    res = engine.run_one(fed, fleet, experiment("""  method:
    - pause: 1s
""", extra="""  setup:
    - push:
        message: lease TTL 10s
        edits: [{file: federation.yaml, replace: "leaseTTL: 30s", with: "leaseTTL: 10s"}]
"""))  # type: ignore[arg-type]
    assert res.status == "passed", res.error or [v.message() for v in res.failed]
    assert fed.loads["east"][0] >= t_recovered      # traffic (and the steady state) only after the recovery


def test_until_steady_waits_for_the_hypothesis_then_goes_on(env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    engine, fed, _, fleet = env
    body = CRASH.replace("    - heal: crash\n", "    - heal: crash\n    - untilSteady: 30s\n    - pause: 1s\n")
    res = engine.run_one(fed, fleet, experiment(body))  # type: ignore[arg-type]
    assert res.status == "passed", res.error or [v.message() for v in res.failed]
    heal = next(e for e in res.timeline if e["kind"] == "fault_healed")
    (step,) = [e for e in res.timeline if e["kind"] == "step"]
    # back home 1 s after the heal, then a whole window (2 s) of it, judged one timeout (1 s) later
    assert 4.0 <= step["at_s"] - heal["at_s"] <= 5.0 and step["detail"].startswith("steady again after")


def test_a_start_waits_for_ejections_an_earlier_experiment_left(env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    engine, fed, clock, fleet = env
    t_clear = clock[0] + 3.0
    fed.status = lambda: {"unhealthy_endpoints": [] if clock[0] >= t_clear else  # type: ignore[method-assign]
                          ["checkout.shop.svc.clusterset.local south/shop/checkout@gateway"]}
    res = engine.run_one(fed, fleet, experiment(CRASH))  # type: ignore[arg-type]
    assert res.status == "passed" and fed.loads["east"][0] >= t_clear and not res.notes
    fed2 = FakeFed(clock)
    fed2.status = lambda: {"unhealthy_endpoints": ["checkout.shop.svc.clusterset.local west/shop/checkout-0"]}  # type: ignore[method-assign]
    res = engine.run_one(fed2, fleet, experiment(CRASH))  # type: ignore[arg-type]
    assert res.notes == ["Started with endpoints the controller still counted unhealthy after settleTimeout: "
                         "checkout.shop.svc.clusterset.local west/shop/checkout-0"]
    assert res.report is not None and res.notes[0] in res.report.markdown.read_text()


class CanaryFed(FakeFed):
    """East also runs a canary (checkout-v2) that a checkout crash does not touch: every other request
    is answered by it, in east, through the whole fault."""

    def records(self, cluster: str) -> list[dict[str, Any]]:
        out = super().records(cluster)
        for r in out:
            if cluster == "east" and r["seq"] % 2:
                r.update(cluster="east", pod="checkout-v2-0")
        return out


@pytest.mark.parametrize(("ignore", "status"), [("        ignoreWorkloads: [checkout-v2]\n", "passed"),
                                                ("", "failed")])
def test_failover_and_failback_are_measured_without_the_ignored_canary(
        env: tuple[Engine, FakeFed, list[float], Any], ignore: str, status: str) -> None:
    """What `meshfed demo` relies on (main's fix "failback waits for the first cluster's own backends, not
    the canary that never left", here in the one engine): the canary's answers in east say nothing
    about failover or failback, so the experiment leaves them out."""
    engine, _, clock, fleet = env
    fed = CanaryFed(clock)
    exp = experiment(CRASH)
    if ignore:
        exp, probs = parse_experiment("x.yaml", (HEAD.format(name="probe", fleet=FLEET, extra="").replace(
            "        timeout: 1s\n", "        timeout: 1s\n" + ignore) + CRASH).encode())
        assert exp is not None, [p.render() for p in probs]
    res = engine.run_one(fed, fleet, exp)  # type: ignore[arg-type]
    assert res.status == status, [v.message() for v in res.failed] or res.error
    if status == "failed":
        # the canary's answers in east hide the move: never five in a row from south
        assert {v.name for v in res.failed} == {"failoverWithin", "servedBy"}, [v.message() for v in res.failed]


def test_http_traffic_reaches_the_load_generator_and_a_refusal_holds_the_steady_state(
        env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    """A DELETE probe expecting 403: the client's load sends that method to that path and counts
    only 403 as ok (another replica's load gets its own traffic's method); answered by the mesh, by no cluster, it still
    holds the steady state; the split of the GET traffic is measured from the pods that answered."""
    engine, fed, _, fleet = env
    text = (HEAD.format(name="probe", fleet=FLEET, extra="").replace(
        "    hypothesis:", "      - from: west\n        service: checkout.shop.svc.clusterset.local\n        rate: 20\n"
        "        method: DELETE\n        path: /orders/7\n        expectStatus: 403\n    hypothesis:")
        + CRASH + "      split: [{workload: checkout, percent: 100}]\n    - client: west\n      minOkPercent: 100\n")
    exp, probs = parse_experiment("x.yaml", text.encode())
    assert exp is not None, [p.render() for p in probs]
    res = engine.run_one(fed, fleet, exp)  # type: ignore[arg-type]
    assert res.status == "passed", [v.message() for v in res.failed] or res.error
    assert fed.load_kw["west"]["url"] == "http://checkout.shop.svc.clusterset.local:80/orders/7"
    assert (fed.load_kw["west"]["method"], fed.load_kw["west"]["ok_status"]) == ("DELETE", 403)
    assert (fed.load_kw["east.replica-1"]["method"], fed.load_kw["east.replica-1"]["ok_status"]) == ("GET", 0)
    assert (fed.load_kw["east"]["method"], fed.load_kw["east"]["ok_status"]) == ("GET", 0)
    west = [v for v in res.verdicts if v.client == "west"]
    assert [v.name for v in west] == ["steadyState (before)", "steadyState (after)", "minOkPercent"]
    assert all(v.ok for v in west) and "the mesh (expected status)" in west[0].expected
    (split,) = [v for v in res.verdicts if v.name == "split"]
    assert split.ok and split.measured.startswith("100.0% of ")
    assert res.figures["west"].statuses[0][0] == 403


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped-absolute", "a/b", ""])
def test_a_name_that_would_write_reports_outside_out_is_refused_before_anything_runs(
        env: tuple[Engine, FakeFed, list[float], Any], name: str) -> None:
    """The loader refuses such names (MF0106); the engine does not rely on it (review finding 7)."""
    engine, fed, _, fleet = env
    exp = dataclasses.replace(experiment(CRASH), name=name)
    res = engine.run_one(fed, fleet, exp)  # type: ignore[arg-type]
    assert res.status == "error" and "outside" in res.error and "lower-case letters" in res.error
    assert fed.calls == [] and res.report is None and res.out_dir is None
    assert not (engine.opts.out_dir.parent / "escaped").exists()


def test_an_edit_of_a_file_outside_the_fleet_repo_is_refused(env: tuple[Engine, FakeFed, list[float], Any]) -> None:
    """`chaos validate` refuses it first (MF0704); the engine checks again before it writes."""
    engine, fed, _, fleet = env
    outside = fed.tree / "outside.yaml"
    outside.write_text("maxEjectionPercent: 100\n")
    body = """\
  method:
    - push:
        message: climbs out
        edits: [{file: ../outside.yaml, replace: "maxEjectionPercent: 100", with: "pwned"}]
  expect:
    - client: east
      maxFailed: 0
"""
    res = engine.run_one(fed, fleet, experiment(body))  # type: ignore[arg-type]
    assert res.status == "error" and "edit of ../outside.yaml: no such file in the lab's fleet repo" in res.error
    assert outside.read_text() == "maxEjectionPercent: 100\n"
