"""`meshfed failover history SERVICE` takes the service the way the rest of the CLI does."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.controller.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.in_state_dir(tmp_path / "state")
    for at_s, host in enumerate(("checkout.shop.svc.clusterset.local", "checkout-v2.shop.svc.clusterset.local",
                                 "checkout.other.svc.clusterset.local", "cart.shop.svc.clusterset.local")):
        s.record_failover(host, "FailedOver", from_cluster="east", to_cluster="south", at_s=float(at_s))
    return s


@pytest.mark.parametrize("query, expected", [
    ("checkout", ["checkout.shop.svc.clusterset.local", "checkout.other.svc.clusterset.local"]),
    ("shop/checkout", ["checkout.shop.svc.clusterset.local"]),
    ("checkout.shop.svc.clusterset.local", ["checkout.shop.svc.clusterset.local"]),
    ("checkout-v2", ["checkout-v2.shop.svc.clusterset.local"]),
    ("check%", []),      # LIKE wildcards in the query are literal
    ("checkou_", []),
    ("shop/cart", ["cart.shop.svc.clusterset.local"]),
])
def test_history_filter_by_name_namespace_name_or_hostname(store: Store, query: str, expected: list[str]) -> None:
    assert [r.service for r in store.failover_history(query)] == expected


def test_history_since(store: Store) -> None:
    assert [r.service for r in store.failover_history(since_s=3.0)] == ["cart.shop.svc.clusterset.local"]


def test_active_failovers_are_the_ones_not_yet_failed_back(tmp_path: Path) -> None:
    s = Store.in_state_dir(tmp_path / "state")
    host = "checkout.shop.svc.clusterset.local"
    s.record_failover(host, "FailedOver", from_cluster="east", to_cluster="south", at_s=1.0)
    s.record_failover(host, "FailedOver", from_cluster="west", to_cluster="east", at_s=2.0)
    s.record_failover(host, "EndpointEjected", from_cluster="east", at_s=2.5)  # not a failover transition
    s.record_failover(host, "FailedBack", from_cluster="east", at_s=3.0)
    assert [(r.from_cluster, r.to_cluster) for r in s.active_failovers()] == [("west", "east")]
    s.record_failover(host, "FailedOver", from_cluster="east", to_cluster="west", at_s=4.0)
    assert [(r.from_cluster, r.to_cluster) for r in s.active_failovers()] == [("west", "east"), ("east", "west")]


def test_history_keeps_the_newest_when_limited(tmp_path: Path) -> None:
    s = Store.in_state_dir(tmp_path / "state")
    for i in range(10):
        s.record_failover(f"s{i}.ns.svc.clusterset.local", "FailedOver", at_s=float(i))
    assert [r.at_s for r in s.failover_history(limit=3)] == [7.0, 8.0, 9.0]


def test_revisions_by_sha_for_the_console_click_through(tmp_path: Path) -> None:
    s = Store.in_state_dir(tmp_path / "state")
    good, bad = "a1" * 20, "b2" * 20
    s.record_attempt(good, "canary 50%", ok=True, at_s=1.0)
    s.record_attempt(bad, "break cart", ok=False, problems=[{"code": "MF0101", "message": "unknown field"}], at_s=2.0)
    s.record_attempt(good, "canary 50%", ok=True, at_s=3.0)      # attempted again after a restart
    assert [(r.sha, r.attempted_at_s) for r in s.revisions()] == [(good, 3.0), (bad, 2.0), (good, 1.0)]
    assert [r.attempted_at_s for r in s.revisions(sha=good)] == [3.0, 1.0]
    [rejected] = s.revisions(sha=bad[:8].upper())                   # a short SHA, any case
    assert rejected.outcome == "failed" and rejected.problems == ({"code": "MF0101", "message": "unknown field"},)
    assert s.revisions(sha="c0ffee") == []
    for not_a_sha in ("a1%", "a1_", "zz" * 4, "abc", "a" * 41):
        with pytest.raises(ValueError, match="not a commit SHA"):
            s.revisions(sha=not_a_sha)
