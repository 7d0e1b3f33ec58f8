"""`meshfed lab exec` from the host: the nsenter command line and how stdio is connected (pure)."""

from __future__ import annotations

import pytest

from clusters.lab.layout import LabError
from clusters.lab.nsexec import NO_TTY_WARNING, SandboxRef, Stdio, StdioPlan, enter_argv, stdio_plan
from clusters.lab.topology import ROOT_NS, NetnsName

BOX = SandboxRef(pid=4242, user_namespace=False)


def test_a_pod_command_enters_the_sandbox_then_the_pod_namespace() -> None:
    argv = enter_argv(BOX, NetnsName("east.shop.frontend-0"), ["curl", "-s", "x"])
    assert argv == ["nsenter", "--target=4242", "--mount", "--net", "--pid=/proc/4242/ns/pid_for_children", "--",
                    "setpriv", "--pdeathsig", "TERM", "--",
                    "ip", "netns", "exec", "east.shop.frontend-0", "curl", "-s", "x"]


def test_root_runs_in_the_sandbox_namespace_itself() -> None:
    argv = enter_argv(BOX, ROOT_NS, ["ip", "link"])
    assert "netns" not in argv and argv[-2:] == ["ip", "link"]


def test_a_non_root_lab_is_entered_through_its_user_namespace_first() -> None:
    argv = enter_argv(SandboxRef(7, user_namespace=True), ROOT_NS, ["true"])
    assert argv.index("--user") < argv.index("--mount")


def test_a_tty_command_leads_its_own_session_on_its_pty() -> None:
    argv = enter_argv(BOX, NetnsName("n"), ["sh"], new_session=True)
    assert argv[argv.index("setsid"):] == ["setsid", "--ctty", "--wait", "ip", "netns", "exec", "n", "sh"]


def test_no_command_is_a_usage_error() -> None:
    with pytest.raises(LabError, match="name a command"):
        enter_argv(BOX, ROOT_NS, [])


# (stdin?, tty?, isatty(stdin, stdout, stderr)) -> plan
@pytest.mark.parametrize(("stdin", "tty", "isatty", "plan"), [
    # scripts and tests: nothing is a terminal -> exec straight through
    (False, False, (False, False, False), StdioPlan(Stdio.DIRECT, False)),
    (True, False, (False, False, False), StdioPlan(Stdio.DIRECT, True)),
    # -it on a terminal: a pty of its own
    (True, True, (True, True, True), StdioPlan(Stdio.PTY, True)),
    (False, True, (True, True, True), StdioPlan(Stdio.PTY, False)),
    # no -t but a terminal attached: the command must not see it -> pipes
    (False, False, (True, True, True), StdioPlan(Stdio.PIPES, False)),
    (True, False, (True, False, False), StdioPlan(Stdio.PIPES, True)),
    (False, False, (True, False, False), StdioPlan(Stdio.DIRECT, False)),  # stdin unused
    (False, False, (False, False, True), StdioPlan(Stdio.PIPES, False)),
    # -t without a terminal on stdin: kubectl's warning, then as without -t
    (True, True, (False, False, False), StdioPlan(Stdio.DIRECT, True, NO_TTY_WARNING)),
    (True, True, (False, True, False), StdioPlan(Stdio.PIPES, True, NO_TTY_WARNING)),
])
def test_stdio_plan(stdin: bool, tty: bool, isatty: tuple[bool, bool, bool], plan: StdioPlan) -> None:
    assert stdio_plan(stdin=stdin, tty=tty, isatty=isatty) == plan
