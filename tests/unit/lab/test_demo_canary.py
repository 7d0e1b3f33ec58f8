"""The demo's canary helpers (chaos.demo): which backend served, the split, the failover filter,
and the weight edit of the fleet repo's HTTPRoute."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import gitops
from chaos.demo import (
    CANARY_ROUTE,
    DemoError,
    backend_split,
    failed_back_at,
    set_canary_weights,
    split_summary,
    without_canary,
    workload_of,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "fleet"


@pytest.mark.parametrize("pod, workload", [("checkout-0", "checkout"), ("checkout-v2-0", "checkout-v2"),
                                           ("checkout-12", "checkout"), ("frontend", "frontend"), ("", "")])
def test_workload_of(pod: str, workload: str) -> None:
    assert workload_of(pod) == workload


RECORDS = [
    {"outcome": "ok", "cluster": "east", "pod": "checkout-0"},
    {"outcome": "ok", "cluster": "east", "pod": "checkout-v2-0"},
    {"outcome": "ok", "cluster": "south", "pod": "checkout-1"},
    {"outcome": "fail", "cluster": "", "pod": ""},
    {"outcome": "ok", "cluster": "east", "pod": "checkout-v2-0"},
]


def test_split_counts_ok_requests_by_serving_workload() -> None:
    assert backend_split(RECORDS) == {"checkout": 2, "checkout-v2": 2}
    assert split_summary(RECORDS) == "checkout 2 (50%), checkout-v2 2 (50%)"
    assert split_summary([]) == "no request served"


def test_the_failover_records_leave_out_only_what_the_canary_served() -> None:
    kept = without_canary(RECORDS)
    assert [r["pod"] for r in kept] == ["checkout-0", "checkout-1", ""]


def test_failback_is_the_first_answer_of_the_clusters_own_backends_not_the_canarys() -> None:
    timeline = [
        {"start_s": 10.0, "outcome": "ok", "cluster": "east", "pod": "checkout-v2-0"},   # canary: never left
        {"start_s": 11.0, "outcome": "ok", "cluster": "south", "pod": "checkout-0"},
        {"start_s": 12.0, "outcome": "ok", "cluster": "east", "pod": "checkout-1"},      # failback
    ]
    assert failed_back_at(timeline, "east", 9.0) == 12.0
    assert failed_back_at(timeline, "east", 12.5) is None


def test_set_canary_weights_edits_the_route_and_it_still_validates(tmp_path: Path) -> None:
    wt = tmp_path / "fleet"
    shutil.copytree(EXAMPLE, wt)
    set_canary_weights(wt, 50, 50)
    (route,) = gitops.load_worktree(wt).routes
    assert [(b.name, b.weight) for b in route.backends] == [("checkout", 50), ("checkout-v2", 50)]
    (wt / CANARY_ROUTE).write_text((wt / CANARY_ROUTE).read_text().replace("checkout-v2", "checkout-v3"))
    with pytest.raises(DemoError, match="checkout-v2"):
        set_canary_weights(wt, 90, 10)
