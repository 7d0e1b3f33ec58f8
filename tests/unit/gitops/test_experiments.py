"""ChaosExperiment files are read as strictly as the fleet repo: every bad input has its code, its
file:line:col and a hint; the catalogue in examples/chaos reads clean; a ChaosExperiment put among the
mesh configuration is refused (MF0009)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import gitops
from gitops.experiment import HEAL_ALL, load_experiments, parse_experiment

REPO = Path(__file__).resolve().parents[3]
CATALOGUE = REPO / "examples" / "chaos"

GOOD = """\
apiVersion: meshfed.dev/v1alpha1
kind: ChaosExperiment
metadata:
  name: crash
  labels:
    chaos.meshfed.dev/suite: ci, nightly
spec:
  description: >-
    checkout in east crashes;
    east fails over
  fleet: ../fleet
  steadyState:
    traffic:
      - from: east
        service: checkout.shop.svc.clusterset.local
        rate: 25
        connections: KeepAlive
        timeout: 1500ms
        ignoreWorkloads: [checkout-v2]
    hypothesis:
      minOkPercent: 99.5
      window: 4s
  setup:
    - push:
        message: shorter lease
        edits:
          - file: federation.yaml
            replace: "leaseTTL: 30s"
            with: "leaseTTL: 10s"
  method:
    - id: crash
      fault: {kind: kill, target: pod, names: ["east/shop/checkout-*"]}
    - pause: 8s
    - fault: {kind: latency, target: wan, names: [east, south], delay: 150ms}
    - fault: {kind: clock-skew, target: node, names: [east/node-2], skew: -2m}
    - heal: crash
    - untilSteady: 30s
    - heal: all
  expect:
    - client: east
      failoverWithin: 2s
      failbackWithin: 15s
      maxFailed: 3
      minFailed: 0
      maxIndeterminate: 1
      maxFlaps: 0
      minOkPercent: 95
      servedBy: [east, south|west, east]
      eventsInclude:
        - {kind: FailedOver, from: east, to: south, policy: policies/shop/checkout.yaml}
      eventsExclude:
        - {kind: ClusterLeaseExpired}
      logsInclude:
        - {source: ztunnel/east/node-2, contains: expired}
"""


def parse(text: str, name: str = "chaos/crash.yaml") -> tuple[object, list[object]]:
    return parse_experiment(name, text.encode())


def test_a_full_experiment_reads_into_the_model() -> None:
    exp, probs = parse_experiment("examples/chaos/crash.yaml", GOOD.encode())
    assert probs == [] and exp is not None
    assert exp.name == "crash" and exp.suites == ("ci", "nightly")
    assert exp.description == "checkout in east crashes; east fails over"
    assert exp.fleet_dir == str(Path("examples/chaos/../fleet").resolve())   # relative to the file
    (t,) = exp.traffic
    assert (t.client, t.rate_per_s, t.keep_alive, t.timeout_s, t.ignore_workloads) == \
        ("east", 25.0, True, 1.5, ("checkout-v2",))
    assert exp.hypothesis.min_ok_percent == 99.5 and exp.hypothesis.window_s == 4.0
    assert exp.hypothesis.served_by == "local"
    assert [s.kind for s in exp.setup] == ["push"] and exp.setup[0].push is not None
    assert exp.setup[0].push.edits[0].with_ == "leaseTTL: 10s" and exp.setup[0].push.expect_applied
    kinds = [s.kind for s in exp.method]
    assert kinds == ["fault", "pause", "fault", "fault", "heal", "untilSteady", "heal"]
    assert exp.method[5].pause_s == 30.0
    assert [s.id for s in exp.faults] == ["crash", "fault-2", "fault-3"]   # default ids count faults
    assert exp.method[2].fault is not None and exp.method[2].fault.delay_ms == 150.0
    assert exp.method[3].fault is not None and exp.method[3].fault.skew_s == -120.0
    assert exp.method[6].heal == HEAL_ALL
    (e,) = exp.expect
    assert (e.failover_within_s, e.failback_within_s, e.max_failed, e.min_failed) == (2.0, 15.0, 3, 0)
    assert e.served_by == (("east",), ("south", "west"), ("east",))
    assert e.events_include[0].to_cluster == "south" and e.logs_include[0].contains == "expired"
    assert str(e.field_pos["servedBy"]).startswith("examples/chaos/crash.yaml:")


def _replace(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


# (case, file text, code, "line:col")
CASES = [
    ("unknown field, with a guess", _replace("      failoverWithin: 2s", "      failoverWitin: 2s"), "MF0101", "41:7"),
    ("wrong type", _replace("rate: 25", 'rate: "25"'), "MF0102", "16:15"),
    ("missing description", _replace("  description: >-\n    checkout in east crashes;\n    east fails over\n", ""),
     "MF0103", "7:1"),
    ("bad duration", _replace("pause: 8s", "pause: 8 seconds"), "MF0104", "33:14"),
    ("rate out of range", _replace("rate: 25", "rate: 5000"), "MF0109", "16:15"),
    ("unknown fault kind", _replace("kind: kill", "kind: explode"), "MF0102", "32:21"),
    ("latency without delay", _replace(", delay: 150ms", ""), "MF0701", "34:7"),
    ("a kill with a delay", _replace("kind: kill, target: pod,", "kind: kill, delay: 1s, target: pod,"),
     "MF0701", "32:27"),
    ("a step doing two things", _replace("    - pause: 8s", "    - pause: 8s\n      heal: all"), "MF0702", "33:7"),
    ("a fault in setup", _replace("  setup:\n    - push:", "  setup:\n    - fault: {kind: stop, target: controller}"
                                  "\n    - push:"), "MF0702", "24:7"),
    ("heal of an unknown fault", _replace("heal: crash", "heal: crush"), "MF0703", "36:7"),
    ("a push with edits and restore", _replace("        message: shorter lease", "        message: shorter lease\n"
                                               "        restore: true"), "MF0704", "24:7"),
    ("expectation of a client without traffic", _replace("  - client: east", "  - client: west"), "MF0705",
     "40:7"),
    ("failover without a fault", GOOD.split("  method:")[0] + "  method:\n    - pause: 1s\n  expect:\n"
     "    - client: east\n      failoverWithin: 1s\n", "MF0705", "33:7"),
    ("a bad servedBy element", _replace("[east, south|west, east]", "[east, South, east]"), "MF0102", "48:24"),
    ("servedBy with overlapping alternatives", _replace("[east, south|west, east]", "[east, south|west, west]"),
     "MF0705", "48:7"),
    ("not an experiment", _replace("kind: ChaosExperiment", "kind: Experiment"), "MF0008", "2:7"),
    # the name is the report directory under --out: no way out of it (review finding 7)
    ("a name that climbs out of --out", _replace("name: crash", "name: ../../../../tmp/rv/ESCAPED"), "MF0106",
     "4:9"),
    ("an absolute name", _replace("name: crash", "name: /tmp/escaped"), "MF0106", "4:9"),
    ("a name that is not a DNS label", _replace("name: crash", "name: Crash_Test"), "MF0106", "4:9"),
]


@pytest.mark.parametrize(("case", "text", "code", "loc"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: str, text: str, code: str, loc: str) -> None:
    exp, probs = parse(text)
    hits = [p for p in probs if p.code == code]  # type: ignore[attr-defined]
    assert exp is None and hits, f"{case}: expected {code}, got {[p.render() for p in probs]}"  # type: ignore[attr-defined]
    assert str(hits[0].pos) == f"chaos/crash.yaml:{loc}", hits[0].render()  # type: ignore[attr-defined]
    assert hits[0].message and hits[0].hint, "every problem says the cause and the fix"  # type: ignore[attr-defined]


def test_messages_quote_the_value_they_refuse() -> None:
    """pydantic message templates do not apply !r: the value is quoted before it goes in."""
    _, probs = parse(_replace("[east, south|west, east]", "[east, South, east]"))
    assert "'South': write a cluster name" in probs[0].message  # type: ignore[attr-defined]
    _, probs = parse(_replace("pause: 8s", "pause: 8"))
    assert "(got 8)" in probs[0].message and "{value" not in probs[0].message  # type: ignore[attr-defined]


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)
    res = load_experiments([tmp_path])
    assert [e.name for e in res.experiments] == ["crash"]
    (p,) = res.problems
    assert p.code == "MF0708" and str(tmp_path / "a.yaml") in p.message and str(p.pos).startswith(str(tmp_path / "b.yaml"))


def test_paths_that_name_nothing_say_so(tmp_path: Path) -> None:
    res = load_experiments([tmp_path / "missing.yaml", tmp_path])
    assert [p.code for p in res.problems] == ["MF0007", "MF0007"]


def test_the_catalogue_reads_clean_and_is_large_enough() -> None:
    res = load_experiments([CATALOGUE])
    assert res.problems == ()
    assert len(res.experiments) >= 15
    ci = [e for e in res.experiments if "ci" in e.suites]
    assert len(ci) >= 6
    for e in res.experiments:  # each says what it proves
        text = Path(e.file).read_text()
        assert text.startswith("# Proves") and e.description


def test_a_chaos_experiment_among_the_mesh_config_is_misplaced(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    shutil.copytree(REPO / "examples" / "fleet", fleet)
    (fleet / "policies" / "shop" / "crash.yaml").write_text(GOOD)
    probs = gitops.validate_tree(fleet)
    (p,) = [p for p in probs if p.code == "MF0009"]
    assert str(p.pos) == "policies/shop/crash.yaml:1:1" and "chaos/crash.yaml" in p.hint
    (fleet / "policies" / "shop" / "crash.yaml").unlink()
    (fleet / "chaos").mkdir()
    (fleet / "chaos" / "crash.yaml").write_text(GOOD)
    assert gitops.validate_tree(fleet) == []     # the fleet loader does not read chaos/


def test_fleet_messages_quote_the_value_too(tmp_path: Path) -> None:
    """The same template fix in the fleet schema (found writing experiments: '{value!r}' was printed)."""
    fleet = tmp_path / "fleet"
    shutil.copytree(REPO / "examples" / "fleet", fleet)
    p = fleet / "clusters" / "east.yaml"
    p.write_text(p.read_text().replace("network: net-east", "network: Net_East"))
    (prob,) = [x for x in gitops.validate_tree(fleet) if x.code == "MF0106"]
    assert prob.message.endswith("'Net_East' is not a DNS-1123 label (lower-case letters, digits and '-', at most "
                                 "63 characters, alphanumeric at both ends)")


# --- HTTP-level traffic and figures (waypoints) ------------------------------------------------------

HTTP = """\
apiVersion: meshfed.dev/v1alpha1
kind: ChaosExperiment
metadata:
  name: canary
spec:
  description: a waypoint's canary and a denied method
  fleet: ../l7
  steadyState:
    traffic:
      - from: east
        service: checkout
      - from: west
        service: checkout
        method: DELETE
        path: /orders/7
        expectStatus: 403
  method:
    - pause: 1s
  expect:
    - client: east
      split:
        - {workload: checkout, percent: 80}
        - {workload: checkout-v2, percent: 20, tolerance: 4}
    - client: west
      minOkPercent: 100
"""


def test_http_traffic_and_a_split_read_into_the_model() -> None:
    exp, probs = parse_experiment("chaos/canary.yaml", HTTP.encode())
    assert probs == [] and exp is not None
    east, west = exp.traffic
    assert (east.method, east.path, east.expect_status, east.expects_refusal) == ("GET", "/", None, False)
    assert (west.method, west.path, west.expect_status, west.expects_refusal) == ("DELETE", "/orders/7", 403, True)
    assert [s.describe() for s in exp.expect[0].split] == ["checkout 80% ± 3", "checkout-v2 20% ± 4"]


@pytest.mark.parametrize(("case", "old", "new", "code", "loc"), [
    ("unknown method", "method: DELETE", "method: FETCH", "MF0102", "14:17"),
    ("a relative path", "path: /orders/7", "path: orders/7", "MF0102", "15:15"),
    ("a path with a space", "path: /orders/7", "path: /orders 7", "MF0102", "15:15"),
    ("a status that is none", "expectStatus: 403", "expectStatus: 999", "MF0109", "16:23"),
    ("a split of refused traffic", "  - client: west\n      minOkPercent: 100",
     "  - client: west\n      split: [{workload: checkout, percent: 100}]", "MF0705", "25:7"),
    ("a workload split twice", "{workload: checkout-v2, percent: 20, tolerance: 4}",
     "{workload: checkout, percent: 20}", "MF0705", "23:11"),
], ids=lambda x: x if isinstance(x, str) and " " in x else "")
def test_bad_http_input(case: str, old: str, new: str, code: str, loc: str) -> None:
    assert old in HTTP, old
    exp, probs = parse_experiment("chaos/canary.yaml", HTTP.replace(old, new, 1).encode())
    hits = [p for p in probs if p.code == code]
    assert exp is None and hits, f"{case}: expected {code}, got {[p.render() for p in probs]}"
    assert str(hits[0].pos) == f"chaos/canary.yaml:{loc}", hits[0].render()
    assert hits[0].message and hits[0].hint
