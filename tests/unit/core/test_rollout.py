"""Issue 11 item 8: when a revision counts as applied (the quorum of proxy ACKs), as a table."""

from __future__ import annotations

import pytest

from federation.core.rollout import ProxyRollout, decide_rollout


def facts(spec: str) -> list[ProxyRollout]:
    """'a:c+ a:c- a:d+' -> cluster a: an ACKed connected proxy, a NACKed one, a disconnected one.
    States: + acked, - nacked, ? pending, o other revision; c connected, d disconnected."""
    out = []
    for i, item in enumerate(spec.split()):
        cluster, rest = item.split(":")
        state = {"+": "acked", "-": "nacked", "?": "pending", "o": "other"}[rest[1]]
        out.append(ProxyRollout(f"ztunnel/{cluster}/n{i}", cluster, rest[0] == "c", state))
    return out


@pytest.mark.parametrize(("spec", "applied", "why"), [
    ("", True, "no connected proxy anywhere: nothing to wait for"),
    ("a:d? a:d? b:do", True, "disconnected proxies do not count (they get the latest in full on reconnect)"),
    ("a:c+ a:c+ b:c+", True, "every connected proxy ACKed"),
    ("a:c+ a:c+ a:c-", True, "settled, and a majority of cluster a ACKed"),
    ("a:c+ a:c-", False, "half is not a majority"),
    ("a:c+ a:c+ a:c?", False, "one connected proxy has not answered yet"),
    ("a:c+ a:c+ a:co", False, "one connected proxy still has another revision (not delivered yet)"),
    ("a:c+ b:c-", False, "cluster b refused it"),
    ("a:c+ b:d- b:d-", True, "b's proxies are away"),
])
def test_quorum(spec: str, applied: bool, why: str) -> None:
    d = decide_rollout("r" * 40, facts(spec), since_s=0.0, now_s=1.0)
    assert d.applied is applied, why
    assert not d.overdue


def test_it_never_times_out_into_applied_but_says_it_is_overdue() -> None:
    pending = facts("a:c+ a:c?")
    assert not decide_rollout("r", pending, since_s=0.0, now_s=119.0, timeout_s=120.0).overdue
    late = decide_rollout("r", pending, since_s=0.0, now_s=121.0, timeout_s=120.0)
    assert late.overdue and not late.applied and late.pending == ("ztunnel/a/n1",)
    assert late.as_dict()["clusters"] == {"a": {"connected": 2, "acked": 1, "nacked": 0, "pending": 1}}
