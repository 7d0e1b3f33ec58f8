"""The faults added for chaos experiments, as the lab plans them (pure): API server outage,
bandwidth cap (tc tbf / htb), clock skew on one process (faketime), backend behaviour. The lab tier
(tests/lab/test_chaos_faults.py) applies them for real."""

from __future__ import annotations

import pytest

from clusters.lab import faults as F
from clusters.lab.commands import skewed_argv
from clusters.lab.faults import FaultError, FaultRequest, plan_fault
from clusters.lab.topology import ROOT_NS, LabPlan, plan_lab
from gitops import experiment as X
from tests.unit.lab.fleet_fixture import fleet

PORTS = {"east": 40001, "west": 40002, "south": 40003}


@pytest.fixture(scope="module")
def plan() -> LabPlan:
    clusters, labs, services = fleet()
    return plan_lab(clusters, labs, services)


@pytest.mark.parametrize(("mode", "verdict"), [("drop", "DROP"), ("reject", "REJECT")])
def test_api_outage_silences_the_api_port_both_ways(plan: LabPlan, mode: str, verdict: str) -> None:
    steps = plan_fault(plan, FaultRequest("partition", "api", ("east",), mode), PORTS)
    assert all(isinstance(s, F.Rule) and s.netns == ROOT_NS for s in steps)
    args = [s.args for s in steps if isinstance(s, F.Rule)]
    assert any(a[a.index("--dport"):a.index("--dport") + 2] == ("--dport", "40001") and verdict in a
               for a in args if "--dport" in a)
    assert any("--sport" in a and "40001" in a and verdict in a for a in args)   # open watches go quiet too
    assert not any("40002" in a for a in args)


@pytest.mark.parametrize(("req", "message"), [
    (FaultRequest("kill", "api", ("east",)), "partition api CLUSTER"),
    (FaultRequest("partition", "api", ("nowhere",)), "nowhere"),
])
def test_api_faults_that_cannot_be(plan: LabPlan, req: FaultRequest, message: str) -> None:
    with pytest.raises((FaultError, KeyError), match=message):
        plan_fault(plan, req, PORTS)


def test_an_api_outage_needs_the_running_labs_ports(plan: LabPlan) -> None:
    with pytest.raises(FaultError, match="no known port"):
        plan_fault(plan, FaultRequest("partition", "api", ("east",)))


def test_bandwidth_on_a_gateway_caps_both_directions_with_tbf(plan: LabPlan) -> None:
    gw = plan.cluster("south").gateway
    assert gw is not None
    steps = plan_fault(plan, FaultRequest("bandwidth", "gateway", ("south",), rate_kbit=256))
    shapes = [s for s in steps if isinstance(s, F.Shape)]
    assert {(s.netns, s.dev) for s in shapes} == {(gw.netns, "wan0"), (ROOT_NS, gw.wan_root_ifname)}
    for s in shapes:
        (cmd,) = s.commands
        assert cmd[:6] == ("qdisc", "add", "dev", s.dev, "root", "tbf") and "256kbit" in cmd
        burst = int(cmd[cmd.index("burst") + 1])
        assert burst >= 4 * 1600   # never less than a few full-size packets


def test_bandwidth_on_a_wan_path_caps_only_that_path(plan: LabPlan) -> None:
    east, west = plan.cluster("east").gateway, plan.cluster("west").gateway
    assert east is not None and west is not None
    steps = plan_fault(plan, FaultRequest("bandwidth", "wan", ("east", "west"), rate_kbit=128))
    by_ns = {s.netns: s for s in steps if isinstance(s, F.Shape)}
    assert set(by_ns) == {east.netns, west.netns}
    to_west = by_ns[east.netns].commands
    assert any(c[0] == "filter" and f"{west.wan_address}/32" in c and "1:2" in c for c in to_west)
    assert any(c[0] == "class" and "1:2" in c and "128kbit" in c for c in to_west)
    assert any(c[0] == "qdisc" and "default" in c and c[c.index("default") + 1] == "1" for c in to_west)  # rest uncapped


@pytest.mark.parametrize(("req", "key"), [
    (FaultRequest("clock-skew", "node", ("east/node-2",), skew_s=120), "ztunnel:east/node-2"),
    (FaultRequest("clock-skew", "gateway", ("south",), skew_s=-3600), "gateway:south"),
    (FaultRequest("clock-skew", "controller", (), skew_s=60), "controller"),
])
def test_clock_skew_restarts_one_process(plan: LabPlan, req: FaultRequest, key: str) -> None:
    (step,) = plan_fault(plan, req)
    assert step == F.ClockSkew(key, req.skew_s)


def test_skewed_argv_moves_the_clocks_by_a_constant_and_execs() -> None:
    argv = skewed_argv(["python", "-m", "ztunnel"], -90.4, "/lib/libfaketimeMT.so.1")
    # env execs the command (the faketime wrapper forks: killing it would leave the skewed process)
    assert argv == ["env", "LD_PRELOAD=/lib/libfaketimeMT.so.1", "FAKETIME=-90",
                    "python", "-m", "ztunnel"]


def test_behaviour_sets_each_matching_pod_and_remembers_what_to_restore(plan: LabPlan) -> None:
    steps = plan_fault(plan, FaultRequest("behaviour", "pod", ("east/shop/checkout-*",), behaviour="Hang"))
    assert steps and all(isinstance(s, F.SetBehaviour) and s.behaviour == "Hang" and s.restore == "Healthy"
                         for s in steps)
    assert {s.pod for s in steps if isinstance(s, F.SetBehaviour)} >= {"checkout-0", "checkout-1"}


@pytest.mark.parametrize(("req", "message"), [
    (FaultRequest("behaviour", "node", ("east/node-1",), behaviour="Hang"), "applies to pods"),
    (FaultRequest("behaviour", "pod", ("east/shop/checkout-0",), behaviour="Sleepy"), "one of Healthy"),
    (FaultRequest("bandwidth", "pod", ("east/shop/checkout-0",), rate_kbit=64), "gateway's WAN link"),
    (FaultRequest("bandwidth", "gateway", ("east",)), "rate in 8"),
    (FaultRequest("clock-skew", "wan", ("east", "west"), skew_s=60), "one process's clock"),
    (FaultRequest("clock-skew", "node", ("east/node-1",)), "non-zero skew"),
    # the control socket's JSON can carry NaN and infinities; neither reaches libfaketime
    (FaultRequest("clock-skew", "node", ("east/node-1",), skew_s=float("nan")), "non-zero skew .* got nan"),
    (FaultRequest("clock-skew", "node", ("east/node-1",), skew_s=float("-inf")), "non-zero skew .* got -inf"),
    (FaultRequest("latency", "gateway", ("east",), delay_ms=float("nan")), "delay in"),
    (FaultRequest("latency", "gateway", ("east",)), "delay in"),
])
def test_new_faults_say_why_they_cannot_be(plan: LabPlan, req: FaultRequest, message: str) -> None:
    with pytest.raises(FaultError, match=message):
        plan_fault(plan, req, PORTS)


def test_experiment_files_and_the_lab_share_one_vocabulary() -> None:
    """gitops imports nothing of ours: its copies of the lab's fault kinds, targets and behaviours
    are pinned equal here (`cont` is the lab's manual undo of `stop`; experiments heal instead)."""
    assert set(X.FAULT_KINDS) == set(F.FAULT_KINDS) - {"cont"}
    assert set(X.TARGET_KINDS) == set(F.TARGET_KINDS)
    assert set(X.BEHAVIOURS) == set(F.BEHAVIOURS)
    from clusters.lab.demo_server import BEHAVIOURS as SERVER
    assert set(F.BEHAVIOURS) == set(SERVER)


@pytest.mark.parametrize(("skew_s", "monotonic_s", "ok"), [
    (120, 5.0, True), (-3600, 14_000.0, True), (-3600, 3_000.0, False), (-3600, 3_650.0, False),
])
def test_a_negative_skew_must_leave_the_monotonic_clock_above_zero(skew_s: float, monotonic_s: float,
                                                                   ok: bool) -> None:
    if ok:
        F.check_skew(skew_s, monotonic_s)
    else:
        with pytest.raises(FaultError, match=r"monotonic clock .* at most -\d+ s"):
            F.check_skew(skew_s, monotonic_s)
