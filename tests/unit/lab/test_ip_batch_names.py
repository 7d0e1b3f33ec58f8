"""A name can never split a line of the lab's `ip -batch` input (issue 11, item 18): `ip -batch`
reads one command per line, so a name ending in a newline would run a command of its own
(`netns add x` + `netns del victim`), and a blank, a quote or a `#` would change the arguments.
Fleet validation refuses such names (tests/unit/gitops/test_validation_matrix.py); the lab's
command builder refuses them as well, whatever built the plan, before any `ip` runs.
"""

from __future__ import annotations

from typing import Any

import pytest

from clusters.lab import topology
from clusters.lab.topology import (
    Action,
    AddAddress,
    AddBridge,
    AddNetns,
    AddRoute,
    AddVeth,
    LinkUp,
    NetnsName,
    PlanError,
    SetMaster,
    execute,
    ip_batch_line,
    plan_lab,
)
from tests.unit.lab.fleet_fixture import fleet

NS = NetnsName("east-node-1")
INJECTED = "victim\nnetns del east-gw"


def with_bad_word(bad: str) -> list[Action]:
    """One action of each `ip` kind, each carrying `bad` in one of its names."""
    return [
        AddNetns(NetnsName(f"east-{bad}")),
        AddBridge(NS, f"br-{bad}"),
        AddVeth(topology.ROOT_NS, f"v-{bad}", NS, "eth0"),
        AddVeth(topology.ROOT_NS, "v-east", NetnsName(bad), "eth0"),
        SetMaster(NS, "veth1", bad),
        AddAddress(NS, "eth0", f"10.10.0.11/24 {bad}"),
        LinkUp(NetnsName(bad), "eth0"),
        AddRoute(NS, "default", via=bad),
        AddRoute(NS, "10.10.1.0/24", dev=bad),
    ]


class NoCommands:
    """Stands in for every way `execute` reaches the system; nothing may get that far."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ran: list[tuple[Any, ...]] = []
        monkeypatch.setattr(topology, "_run", lambda *a, **k: self.ran.append(a))
        monkeypatch.setattr(topology, "set_sysctl", lambda *a: self.ran.append(a))
        monkeypatch.setattr(topology, "run_iptables", lambda *a: self.ran.append(a))


@pytest.mark.parametrize("bad", [INJECTED, "x\n", "x\r", "two words", "x#comment", 'x"', "x'", "x\\", "x\t"],
                         ids=["newline-command", "trailing-newline", "carriage-return", "blank", "hash", "dquote",
                              "squote", "backslash", "tab"])
@pytest.mark.parametrize("index", range(len(with_bad_word("x"))))
def test_a_name_that_would_not_stay_one_word_on_one_line_is_refused_before_ip_runs(
        bad: str, index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    action = with_bad_word(bad)[index]
    with pytest.raises(PlanError, match="cannot be written to `ip -batch`") as err:
        ip_batch_line(action)
    assert repr(bad)[1:-1] in str(err.value)     # the message shows the offending name, escaped
    ran = NoCommands(monkeypatch)
    good_first: list[Action] = [AddNetns(NetnsName("east-gw")), AddBridge(topology.ROOT_NS, "br-east")]
    with pytest.raises(PlanError):
        execute([*good_first, action])
    assert ran.ran == []                         # not even the good actions before it ran


def test_the_lab_plans_own_names_all_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal does not refuse what the lab really builds: every batch line of the test fleet's
    plan is built, one line each, and reaches `ip` as it did."""
    plan = plan_lab(*fleet())
    ran = NoCommands(monkeypatch)
    execute(plan.actions)
    batches = [(cmd, stdin) for cmd, stdin, *_ in ran.ran if isinstance(cmd, list) and "-batch" in cmd]
    lines = [line for _cmd, stdin in batches for line in stdin.splitlines()]
    built = [line for line in map(ip_batch_line, plan.actions) if line is not None]
    assert len(lines) == len(built) > 50
    assert sorted(lines) == sorted(text for _ns, text in built)
