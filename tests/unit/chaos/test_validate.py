"""Experiments checked against their fleet and lab (`meshfed chaos validate`): clusters, client
workloads, services, faults the lab's planner refuses, edits that do not apply — each with its code
and the experiment's file:line. And the CLI's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from chaos.validate import validate
from federation.cli.main import cli
from gitops.experiment import load_experiments

REPO = Path(__file__).resolve().parents[3]
FLEET = REPO / "examples" / "fleet"

BASE = """\
apiVersion: meshfed.dev/v1alpha1
kind: ChaosExperiment
metadata:
  name: probe
spec:
  description: a probe
  fleet: {fleet}
  steadyState:
    traffic:
      - from: east
        service: checkout.shop.svc.clusterset.local
  method:
    - id: f
      fault: {{kind: kill, target: pod, names: ["east/shop/checkout-*"]}}
    - pause: 1s
    - heal: f
    - push:
        message: faster ejection
        edits:
          - file: policies/shop/checkout.yaml
            replace: "baseEjectionTime: 15s"
            with: "baseEjectionTime: 5s"
  expect:
    - client: east
      servedBy: [east, south, east]
"""


def write(tmp_path: Path, text: str, old: str = "", new: str = "", *more: tuple[str, str]) -> Path:
    body = BASE.format(fleet=FLEET)
    for o, n in ((old, new), *more):
        if o:
            assert o in body, o
            body = body.replace(o, n, 1)
    p = tmp_path / "probe.yaml"
    p.write_text(body + text)
    return p


def problems(path: Path) -> list[tuple[str, str]]:
    res = load_experiments([path])
    assert res.problems == (), [p.render() for p in res.problems]
    return [(p.code, str(p.pos).rsplit("/", 1)[-1]) for p in validate(res.experiments)]


def test_the_base_experiment_fits_the_example_fleet(tmp_path: Path) -> None:
    assert problems(write(tmp_path, "")) == []


def test_traffic_from_a_cluster_the_fleet_does_not_have(tmp_path: Path) -> None:
    p = write(tmp_path, "", "      - from: east", "      - from: north", ("  - client: east", "  - client: north"))
    assert ("MF0706", "probe.yaml:10:9") in problems(p)


@pytest.mark.parametrize(("old", "new", "code", "loc"), [
    ("service: checkout.shop.svc.clusterset.local", "service: payments", "MF0706", "probe.yaml:10:9"),
    ('names: ["east/shop/checkout-*"]', 'names: ["east/shop/payments-*"]', "MF0701", "probe.yaml:13:7"),
    ("kind: kill, target: pod", "kind: latency, delay: 5ms, target: node", "MF0701", "probe.yaml:13:7"),
    ('replace: "baseEjectionTime: 15s"', 'replace: "baseEjectionTime: 99s"', "MF0704", "probe.yaml:20:13"),
    ("file: policies/shop/checkout.yaml", "file: policies/shop/gone.yaml", "MF0704", "probe.yaml:20:13"),
    ("servedBy: [east, south, east]", "servedBy: [east, mars, east]", "MF0706", "probe.yaml:25:7"),
    (f"fleet: {FLEET}", "fleet: /nonexistent", "MF0707", "probe.yaml:7:3"),
])
def test_what_does_not_fit_the_fleet(tmp_path: Path, old: str, new: str, code: str, loc: str) -> None:
    got = problems(write(tmp_path, "", old, new))
    assert (code, loc) in got, got


def test_edits_replay_in_order_and_restore_resets(tmp_path: Path) -> None:
    twice = """    - push:
        message: again
        edits:
          - file: policies/shop/checkout.yaml
            replace: "baseEjectionTime: 15s"
            with: "baseEjectionTime: 1s"
"""
    p = write(tmp_path, "", "  expect:\n", twice + "  expect:\n")
    assert ("MF0704", "probe.yaml:26:13") in problems(p)    # the first push already changed that text
    p = write(tmp_path, "", "  expect:\n", "    - push: {restore: true}\n" + twice + "  expect:\n")
    assert problems(p) == []


def test_a_patch_is_checked_with_git_apply(tmp_path: Path) -> None:
    """Against the fleet as the earlier push left it (baseEjectionTime 5s)."""
    patch = """    - push:
        message: a patch
        patch: |
          --- a/policies/shop/checkout.yaml
          +++ b/policies/shop/checkout.yaml
          @@ -11,3 +11,3 @@
                 # consecutive5xxErrors needs a waypoint to see HTTP status (MF0510); Envoy's default 5 applies
          -      interval: 5s
          +      interval: 2s
                 baseEjectionTime: 5s
"""
    assert problems(write(tmp_path, "", "  expect:\n", patch + "  expect:\n")) == []
    bad = patch.replace("-      interval: 5s", "-      interval: 7s")
    got = problems(write(tmp_path, "", "  expect:\n", bad + "  expect:\n"))
    assert [c for c, _ in got] == ["MF0704"]


def test_cli_validate_and_list(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["chaos", "validate", str(REPO / "examples" / "chaos")])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("valid: ") and "backend-crash" in res.output
    wide = runner.invoke(cli, ["chaos", "validate", str(REPO / "examples" / "chaos"), "-o", "wide"])
    assert (wide.exit_code, wide.output) == (0, res.output)       # -o like every read command; wide is the table
    bad = write(tmp_path, "", "servedBy: [east, south, east]", "servedBy: [east, mars, east]")
    res = runner.invoke(cli, ["chaos", "validate", str(bad)])
    assert res.exit_code == 1 and "[MF0706]" in res.output and "probe.yaml:25:7" in res.output
    res = runner.invoke(cli, ["chaos", "list", str(REPO / "examples" / "chaos"), "--suite", "ci", "-o", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {r["name"] for r in rows} >= {"backend-crash", "backend-silent-cut", "gateway-crash", "controller-down",
                                         "api-outage-freeze", "bad-commit"}
    assert all(r["suite"] == "ci" and r["proves"] for r in rows)


def test_cli_run_refuses_what_does_not_validate_and_an_unavailable_provider(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = write(tmp_path, "", "servedBy: [east, south, east]", "servedBy: [east, mars, east]")
    res = runner.invoke(cli, ["chaos", "run", str(bad)])
    assert res.exit_code == 1 and "nothing was run" in res.output
    res = runner.invoke(cli, ["chaos", "run", str(write(tmp_path, "")), "--provider", "kind"])
    assert res.exit_code == 2 and "--provider lab" in res.output


@pytest.mark.parametrize(("fault", "gap"), [
    ('{kind: kill, target: pod, names: ["east/shop/checkout-*"]}', None),          # kind: delete the pods
    ("{kind: stop, target: gateway, names: [south]}", None),                        # kind: scale it to 0
    ("{kind: partition, target: wan, names: [east, south]}", None),                 # kind: iptables in nodes
    ("{kind: stop, target: node, names: [east/node-2]}", None),                     # kind: docker pause
    ("{kind: partition, target: api, names: [east]}", "`partition api` has no kind equivalent"),
    ('{kind: behaviour, target: pod, names: ["east/shop/checkout-0"], behaviour: Hang}', "`behaviour pod`"),
    ("{kind: partition, target: wan, names: [east, south], mode: reject}", "kind drops"),
])
def test_kind_gaps_are_kinds_own_planner_s_answer(tmp_path: Path, fault: str, gap: str | None) -> None:
    from chaos.validate import kind_gaps, load_fleet

    body = BASE.format(fleet=FLEET).replace('{kind: kill, target: pod, names: ["east/shop/checkout-*"]}', fault)
    (tmp_path / "probe.yaml").write_text(body)
    res = load_experiments([tmp_path / "probe.yaml"])
    assert res.problems == (), [p.render() for p in res.problems]
    fleet, probs = load_fleet(FLEET)
    assert fleet is not None, probs
    gaps = kind_gaps(res.experiments[0], fleet)
    if gap is None:
        assert gaps == []
    else:
        assert len(gaps) == 1 and gaps[0].startswith("f (") and gap in gaps[0], gaps


def test_cli_validate_on_kind_names_the_experiments_that_map() -> None:
    res = CliRunner().invoke(cli, ["chaos", "validate", "--provider", "kind", str(REPO / "examples" / "chaos"),
                                   "-o", "json"])
    assert res.exit_code == 0, res.output
    kind = json.loads(res.output)["kind"]
    assert kind["backend-crash"] == {"maps": True, "gaps": []}
    assert not kind["api-outage-freeze"]["maps"] and "partition api" in kind["api-outage-freeze"]["gaps"][0]
    res = CliRunner().invoke(cli, ["chaos", "validate", "--provider", "kind", str(REPO / "examples" / "chaos")])
    assert res.exit_code == 0 and "on kind, every fault maps for " in res.output
    assert "  clock-skew-2m: skew (clock-skew node east/node-2 +120s): `clock-skew node` has no kind" in res.output


def test_traffic_comes_from_every_replica_of_its_client_workload_and_only_the_first_is_measured(
        tmp_path: Path) -> None:
    """east's frontend has two replicas (node-1, node-2): both send, so two node proxies see a fault,
    which a mesh-wide ejection needs (federation.core.health); south's single frontend has no observer."""
    from chaos.engine import observer_loads
    from chaos.validate import client_workload, client_workload_pods, load_fleet

    fleet, probs = load_fleet(FLEET)
    assert fleet is not None, probs
    east = client_workload_pods(fleet.plan, "east", None)
    assert east == ["east/shop/frontend-0", "east/shop/frontend-1"]
    assert east[0] == client_workload(fleet.plan, "east", None)
    assert client_workload_pods(fleet.plan, "south", None) == ["south/shop/frontend-0"]
    assert client_workload_pods(fleet.plan, "east", "nope") == []
    (tmp_path / "probe.yaml").write_text(BASE.format(fleet=FLEET))
    (exp,) = load_experiments([tmp_path / "probe.yaml"]).experiments
    (t,) = exp.traffic
    assert observer_loads(t, east) == [(f"{t.client}.replica-1", "east/shop/frontend-1")]
    assert observer_loads(t, east[:1]) == []
    from clusters.lab.supervisor import JOB_NAME_CHARS
    assert all(set(f"load-{name}") <= JOB_NAME_CHARS for name, _ in observer_loads(t, east))  # a lab job's name


L7_FLEET = REPO / "examples" / "l7"
L7_PROBE = f"""\
apiVersion: meshfed.dev/v1alpha1
kind: ChaosExperiment
metadata:
  name: l7-probe
spec:
  description: a probe
  fleet: {L7_FLEET}
  steadyState:
    traffic:
      - from: east
        service: checkout.shop.svc.clusterset.local
  method:
    - pause: 1s
  expect:
    - client: east
      split: [{{workload: checkout-v2, percent: 20}}]
      logsInclude: [{{source: waypoint/east/shop/waypoint, contains: EndpointEjected}}]
"""


def test_waypoint_logs_and_split_workloads_are_the_labs(tmp_path: Path) -> None:
    """The lab validation lays out the same lab as the runner, its Gateways' pods included: a
    waypoint's log is a source; a split names a workload of the lab."""
    p = tmp_path / "l7-probe.yaml"
    p.write_text(L7_PROBE)
    assert problems(p) == []
    p.write_text(L7_PROBE.replace("workload: checkout-v2", "workload: checkout-v9")
                 .replace("waypoint/east/shop/waypoint", "waypoint/east/shop/nowhere"))
    assert problems(p) == [("MF0706", "l7-probe.yaml:16:15"), ("MF0706", "l7-probe.yaml:15:7")]
