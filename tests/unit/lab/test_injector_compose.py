"""The fault injector with overlapping faults and half-applied ones (an attacker review's findings).

Heal restores only what no other still-active fault holds: a pod killed by `kill pod` and by
`kill node` stays down until both are healed, in either order; a process both stopped and killed
comes back stopped while the stop lasts; a demo server's behaviour falls back to the one another
active fault set. A latency fault that fails half-way leaves no redirect rule and no relay behind,
even when one of the rollback's own deletions fails; a bandwidth fault whose first `tc` command
fails does not delete a root qdisc it never added.

Commands are recorded, not run (iptables/ip/tc and the processes are fakes): the lab tier applies
the same faults for real.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from clusters.lab import faults as F
from clusters.lab import injector as I
from clusters.lab.layout import LabError
from clusters.lab.processes import ManagedProcess, ProcessTable
from clusters.lab.topology import ROOT_NS, LabPlan, NetnsName, PodPlan, plan_lab
from tests.unit.lab.fleet_fixture import fleet


class FakeProcess(ManagedProcess):
    """A process that only records what was done to it."""

    up: bool = True

    def alive(self) -> bool:
        return self.up

    def start(self) -> None:
        if not self.up:
            self.up, self.stopped, self.killed = True, False, False

    def kill(self, wait_s: float = 2.0) -> None:
        self.up, self.killed = False, True

    def pause(self) -> None:
        self.stopped = True

    def resume(self) -> None:
        self.stopped = False

    def terminate(self, grace_s: float = 1.0) -> int | None:
        self.up = False
        return 0


class FakeHost:
    """iptables rules (a multiset per namespace), link states and tc commands, with failures on demand."""

    def __init__(self) -> None:
        self.rules: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self.links_down: set[tuple[str, str]] = set()
        self.tc: list[tuple[str, tuple[str, ...]]] = []
        self.fail_add: set[tuple[str, ...]] = set()      # rules whose -A fails
        self.fail_delete: set[tuple[str, ...]] = set()   # rules whose -D fails
        self.fail_tc: set[tuple[str, ...]] = set()

    def iptables(self, netns: NetnsName, args: Sequence[str]) -> None:
        args = tuple(args)
        if "-A" in args:
            if args in self.fail_add:
                raise LabError(f"iptables {' '.join(args)}: failed")
            self.rules[(netns, args)] += 1
        elif "-D" in args:
            added = tuple("-A" if a == "-D" else a for a in args)
            if added in self.fail_delete or not self.rules[(netns, added)]:
                raise LabError(f"iptables {' '.join(args)}: no such rule")
            self.rules[(netns, added)] -= 1
        # -N / -I (the fault chain's hook) are not recorded

    def ip(self, netns: NetnsName, *args: str) -> None:
        if args[:2] == ("link", "set"):
            (self.links_down.add if args[3] == "down" else self.links_down.discard)((netns, args[2]))

    def run_tc(self, netns: NetnsName, args: Sequence[str]) -> None:
        if tuple(args) in self.fail_tc:
            raise LabError(f"tc {' '.join(args)}: failed")
        self.tc.append((netns, tuple(args)))

    def left(self) -> list[tuple[str, tuple[str, ...]]]:
        return [k for k, n in self.rules.items() for _ in range(n)]


@pytest.fixture(scope="module")
def plan() -> LabPlan:
    return plan_lab(*fleet())


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    h = FakeHost()
    monkeypatch.setattr(I, "run_iptables", h.iptables)
    monkeypatch.setattr(I, "run_ip", h.ip)
    monkeypatch.setattr(I, "run_tc", h.run_tc)
    monkeypatch.setattr(I, "ManagedProcess", FakeProcess)           # latency relays
    monkeypatch.setattr(I, "_wait_listening", lambda *a, **k: None)
    return h


@pytest.fixture
def behaviours(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    now: dict[str, str] = {}

    def set_behaviour(pod: PodPlan, behaviour: str) -> tuple[int, str]:
        now[pod.key] = behaviour
        return 200, "ok"

    monkeypatch.setattr(I, "set_behaviour", set_behaviour)
    return now


def injector(plan: LabPlan, tmp_path: Path) -> tuple[I.FaultInjector, ProcessTable]:
    procs = ProcessTable()
    for c in plan.clusters:
        for n in c.nodes:
            procs.put(FakeProcess(f"ztunnel:{c.name}/{n.name}", n.netns, ["ztunnel"], tmp_path / "log"))
        for p in c.pods:
            procs.put(FakeProcess(f"pod:{p.key}", ROOT_NS, ["pod"], tmp_path / "log"))
        if c.gateway is not None:
            procs.put(FakeProcess(f"gateway:{c.name}", c.gateway.netns, ["gw"], tmp_path / "log"))
    procs.put(FakeProcess("controller", ROOT_NS, ["controller"], tmp_path / "log"))
    return I.FaultInjector(plan, procs, tmp_path), procs


def alive(procs: ProcessTable, key: str) -> bool:
    mp = procs.get(key)
    assert mp is not None
    return mp.alive()


POD, ZTUNNEL = "pod:east/shop/checkout-0", "ztunnel:east/node-1"   # checkout-0 runs on east's node-1


@pytest.mark.parametrize("first_healed", ["pod", "node"])
def test_a_pod_killed_by_two_faults_stays_down_until_both_are_healed(
        plan: LabPlan, host: FakeHost, tmp_path: Path, first_healed: str) -> None:
    inj, procs = injector(plan, tmp_path)
    inj.apply(F.FaultRequest("kill", "pod", ("east/shop/checkout-0",)))
    inj.apply(F.FaultRequest("kill", "node", ("east/node-1",)))
    assert not alive(procs, POD) and not alive(procs, ZTUNNEL)

    if first_healed == "pod":
        inj.heal("pod", ("east/shop/checkout-0",))
        assert not alive(procs, POD), "healing the pod fault restarted a pod the node fault still holds down"
        inj.heal("node", ("east/node-1",))
    else:
        inj.heal("node", ("east/node-1",))
        assert alive(procs, ZTUNNEL)                      # the node's own proxy: only the node fault held it
        assert not alive(procs, POD), "healing the node fault restarted a pod the pod fault still holds down"
        assert alive(procs, "pod:east/shop/cart-0")       # the node's other pods: only the node fault held them
        inj.heal("pod", ("east/shop/checkout-0",))
    assert alive(procs, POD) and alive(procs, ZTUNNEL)
    assert not inj.active()


def test_heal_all_restores_every_overlapping_fault(plan: LabPlan, host: FakeHost, tmp_path: Path) -> None:
    inj, procs = injector(plan, tmp_path)
    inj.apply(F.FaultRequest("kill", "pod", ("east/shop/checkout-0",)))
    inj.apply(F.FaultRequest("kill", "node", ("east/node-1",)))
    inj.heal()
    assert alive(procs, POD) and alive(procs, ZTUNNEL)


def test_a_killed_and_stopped_gateway_comes_back_stopped_while_the_stop_lasts(
        plan: LabPlan, host: FakeHost, tmp_path: Path) -> None:
    inj, procs = injector(plan, tmp_path)
    gw = procs.get("gateway:east")
    assert gw is not None
    inj.apply(F.FaultRequest("stop", "gateway", ("east",)))
    inj.apply(F.FaultRequest("kill", "gateway", ("east",)))
    inj.heal("gateway", ("east",), "kill")
    assert gw.alive() and gw.stopped, "the stop fault is still active: the restarted gateway must stay stopped"
    inj.heal("gateway", ("east",), "stop")
    assert gw.alive() and not gw.stopped


def test_healing_a_stop_does_not_restart_a_process_another_fault_killed(
        plan: LabPlan, host: FakeHost, tmp_path: Path) -> None:
    inj, procs = injector(plan, tmp_path)
    inj.apply(F.FaultRequest("kill", "controller", ()))
    inj.apply(F.FaultRequest("stop", "controller", ()))
    inj.heal("controller", (), "stop")
    assert not alive(procs, "controller")
    inj.heal("controller", (), "kill")
    assert alive(procs, "controller")


@pytest.mark.parametrize(("others", "alive_now", "signal", "action"), [
    ((), False, "KILL", "start"),
    ((), True, "STOP", "resume"),
    ((), True, "KILL", "none"),                                     # restarted meanwhile: leave it be
    ((F.Signal("p", "KILL"),), False, "KILL", "none"),
    ((F.Signal("p", "KILL"),), False, "STOP", "none"),
    ((F.Signal("p", "STOP"),), False, "KILL", "start-paused"),
    ((F.Signal("p", "STOP"),), True, "STOP", "none"),
    ((F.Signal("q", "KILL"),), False, "KILL", "start"),             # another process's fault
    ((F.Signal("p", "CONT"),), False, "KILL", "start"),
])
def test_signal_undo(others: tuple[F.FaultStep, ...], alive_now: bool, signal: str, action: str) -> None:
    assert I.signal_undo(F.Signal("p", signal), others, alive=alive_now) == action


def test_a_link_comes_up_with_the_last_fault_that_took_it_down() -> None:
    down = F.LinkDown(ROOT_NS, "c1w")
    assert I.still_held(down, [F.LinkDown(ROOT_NS, "c1w")])
    assert not I.still_held(down, [F.LinkDown(NetnsName("east-gw"), "c1w"), F.LinkDown(ROOT_NS, "c2w")])


def test_a_behaviour_falls_back_to_the_one_another_active_fault_set(
        plan: LabPlan, host: FakeHost, behaviours: dict[str, str], tmp_path: Path) -> None:
    inj, _ = injector(plan, tmp_path)
    inj.apply(F.FaultRequest("behaviour", "pod", ("east/shop/checkout-0",), behaviour="Hang"))
    inj.apply(F.FaultRequest("behaviour", "pod", ("east/shop/checkout-*",), behaviour="Error503"))
    assert behaviours["east/shop/checkout-0"] == "Error503"
    inj.heal("pod", ("east/shop/checkout-*",))
    assert behaviours == {"east/shop/checkout-0": "Hang", "east/shop/checkout-1": "Healthy"}
    inj.heal("pod", ("east/shop/checkout-0",))
    assert behaviours["east/shop/checkout-0"] == "Healthy"


def _wan_latency_rules(plan: LabPlan) -> list[tuple[str, tuple[str, ...]]]:
    steps = F.plan_fault(plan, F.FaultRequest("latency", "wan", ("east", "west"), delay_ms=50))
    assert len(steps) == 2 and all(isinstance(s, F.Latency) for s in steps)
    return [(s.netns, r) for i, s in enumerate(steps) if isinstance(s, F.Latency)
            for r in F.latency_rules(s, I.LATENCY_FIRST_PORT + i)]


def test_a_latency_fault_failing_half_way_leaves_no_rule_and_no_relay(
        plan: LabPlan, host: FakeHost, tmp_path: Path) -> None:
    inj, procs = injector(plan, tmp_path)
    rules = _wan_latency_rules(plan)
    assert len(rules) == 4   # two per gateway: its own traffic and what it forwards
    host.fail_add = {rules[3][1]}   # the second gateway's second rule: one relay and three rules are in by then
    with pytest.raises(LabError, match="nothing of this fault stays applied"):
        inj.apply(F.FaultRequest("latency", "wan", ("east", "west"), delay_ms=50))
    assert host.left() == []
    assert not [mp.key for mp in procs.snapshot() if mp.key.startswith("latency:")]
    assert not inj.active()


def test_a_latency_rollback_removes_every_rule_it_can_and_names_the_one_it_cannot(
        plan: LabPlan, host: FakeHost, tmp_path: Path) -> None:
    inj, procs = injector(plan, tmp_path)
    rules = _wan_latency_rules(plan)
    host.fail_add = {rules[3][1]}
    host.fail_delete = {rules[0][1]}   # the first gateway's first rule will not go
    with pytest.raises(LabError):
        inj.apply(F.FaultRequest("latency", "wan", ("east", "west"), delay_ms=50))
    assert host.left() == [rules[0]]   # only the rule that refused; its sibling went
    assert not [mp.key for mp in procs.snapshot() if mp.key.startswith("latency:")]


def test_a_latency_relay_that_never_listens_leaves_nothing(
        plan: LabPlan, host: FakeHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_: object, **__: object) -> None:
        raise LabError("the latency relay did not listen")

    monkeypatch.setattr(I, "_wait_listening", never)
    inj, procs = injector(plan, tmp_path)
    with pytest.raises(LabError, match="nothing of this fault stays applied"):
        inj.apply(F.FaultRequest("latency", "gateway", ("west",), delay_ms=50))
    assert host.left() == []
    assert not [mp.key for mp in procs.snapshot() if mp.key.startswith("latency:")]


def test_a_shaping_fault_whose_first_command_fails_deletes_no_qdisc(
        plan: LabPlan, host: FakeHost, tmp_path: Path) -> None:
    inj, _ = injector(plan, tmp_path)
    steps = F.plan_fault(plan, F.FaultRequest("bandwidth", "wan", ("east", "west"), rate_kbit=256))
    first = next(s for s in steps if isinstance(s, F.Shape))
    host.fail_tc = {first.commands[0]}   # e.g. another root qdisc is there: not ours to delete
    with pytest.raises(LabError):
        inj.apply(F.FaultRequest("bandwidth", "wan", ("east", "west"), rate_kbit=256))
    assert not [a for _, a in host.tc if a[:2] == ("qdisc", "del")]
    host.fail_tc = set()
    inj.apply(F.FaultRequest("bandwidth", "wan", ("east", "west"), rate_kbit=256))   # nothing stuck as shaped


def test_a_shaping_fault_failing_after_its_qdisc_removes_that_qdisc(
        plan: LabPlan, host: FakeHost, tmp_path: Path) -> None:
    inj, _ = injector(plan, tmp_path)
    steps = F.plan_fault(plan, F.FaultRequest("bandwidth", "wan", ("east", "west"), rate_kbit=256))
    shapes = [s for s in steps if isinstance(s, F.Shape)]
    host.fail_tc = {shapes[1].commands[3]}   # the second gateway's filter (to the first gateway)
    with pytest.raises(LabError):
        inj.apply(F.FaultRequest("bandwidth", "wan", ("east", "west"), rate_kbit=256))
    deleted = [(ns, a) for ns, a in host.tc if a[:2] == ("qdisc", "del")]
    assert sorted(deleted) == sorted((s.netns, ("qdisc", "del", "dev", s.dev, "root")) for s in shapes)


@pytest.fixture
def faketime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lib = tmp_path / "libfaketimeMT.so.1"
    lib.write_bytes(b"")
    monkeypatch.setattr(I, "FAKETIME_LIBRARIES", (str(lib),))


@pytest.mark.parametrize("also_killed", [False, True])
def test_a_process_that_died_under_its_skew_is_started_on_the_real_clock_at_heal(
        plan: LabPlan, host: FakeHost, faketime: None, tmp_path: Path, also_killed: bool) -> None:
    """The lab run that found it: the node proxy crashed at start under libfaketime; heal only reset
    its argv, and east/node-2 stayed without a proxy for the rest of the run."""
    inj, procs = injector(plan, tmp_path)
    key = "ztunnel:east/node-2"
    original = procs.get(key)
    assert original is not None
    real_argv = list(original.argv)
    inj.apply(F.FaultRequest("clock-skew", "node", ("east/node-2",), skew_s=120))
    skewed = procs.get(key)
    assert skewed is not None and skewed.argv[:3] == ["env", f"LD_PRELOAD={tmp_path / 'libfaketimeMT.so.1'}",
                                                       "FAKETIME=+120"]
    assert isinstance(skewed, FakeProcess)
    skewed.up = False                      # it crashed under the skew
    if also_killed:
        inj.apply(F.FaultRequest("kill", "node", ("east/node-2",)))
    inj.heal("node", ("east/node-2",), "clock-skew")
    now = procs.get(key)
    assert now is not None and now.argv == real_argv
    assert now.alive() is (not also_killed)   # a kill still active keeps it down; its heal starts it
    if also_killed:
        inj.heal()
        assert now.alive() and now.argv == real_argv
