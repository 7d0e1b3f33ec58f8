"""Issue 11 item 19 (the core): the removal guard (MF0516) and the drain state machine, as tables."""

from __future__ import annotations

from dataclasses import replace

import pytest

from federation.core.offline import offline_observations
from federation.core.removal import (
    ClusterDrainCancelled,
    ClusterDraining,
    assess_removal,
    global_endpoints,
    guard_removal,
    mark_withdrawn,
    removed_event,
    start_drains,
    step_drains,
)
from gitops.model import RemovalPolicy
from tests.unit.core.factory import CLUSTERS, fleet

OLD = fleet(sha="a" * 40)
ALL_OBS = offline_observations(OLD)


def without(*gone: str, sha: str = "b" * 40, **policy: object) -> object:
    snap = fleet(clusters=[c for c in CLUSTERS if c[0] not in gone], sha=sha)
    return replace(snap, federation=replace(snap.federation, removal=replace(RemovalPolicy(), **policy)))


def test_global_endpoints_are_the_exported_backends_of_global_services() -> None:
    eps = global_endpoints(OLD, ALL_OBS)
    assert len(eps) == 11                                  # checkout 2+2+2, cart 2+2, checkout-v2 1
    assert {e[1] for e in eps} == {"east", "west", "south"} and all(e[0].startswith("shop/") for e in eps)


@pytest.mark.parametrize(("gone", "policy", "codes"), [
    ((), {}, []),
    (("south",), {}, []),                                               # 1 of 3 clusters, 2 of 11 endpoints
    (("south", "west"), {}, ["clusters", "endpoints"]),                 # 2 of 3, 6 of 11
    (("south", "west"), {"max_cluster_percent": 70}, ["endpoints"]),
    (("south", "west"), {"max_cluster_percent": 70, "max_endpoint_percent": 60}, []),
    (("south", "west"), {"intended_clusters": ("south", "west")}, []),  # stated intent: nothing counts
    (("south", "west"), {"intended_clusters": ("west",)}, []),          # 1 unintended of 3 (33 %), 2 of 11
    (("south",), {"max_cluster_percent": 10}, ["clusters"]),
    (("south",), {"max_cluster_percent": 10, "intended_clusters": ("south",)}, []),
])
def test_the_guard(gone: tuple[str, ...], policy: dict[str, object], codes: list[str]) -> None:
    new = without(*gone, **policy)
    problems = guard_removal(OLD, new, ALL_OBS)  # type: ignore[arg-type]
    assert [p.code for p in problems] == ["MF0516"] * len(codes)
    for p, what in zip(problems, codes, strict=True):
        assert what in p.message and "spec.removal" in p.hint and p.obj is not None
        assert p.obj.kind == "Federation"
    if "clusters" in codes:
        assert "clusters/south.yaml" in problems[0].message     # names what goes, and where it was


def test_removing_a_service_counts_its_endpoints_unless_named() -> None:
    old = OLD
    svcs = {k: v for k, v in old.services.items() if k.name != "checkout"}   # 6 of 11 endpoints
    new = replace(old, services=svcs, revision=replace(old.revision, sha="c" * 40))
    a = assess_removal(old, new, ALL_OBS)
    assert (a.removed_endpoints, a.unintended_endpoints, a.endpoints_before) == (6, 6, 11)
    assert [p.code for p in guard_removal(old, new, ALL_OBS)] == ["MF0516"]
    named = replace(new, federation=replace(new.federation, removal=RemovalPolicy(intended_services=("shop/checkout",))))
    assert guard_removal(old, named, ALL_OBS) == []


def test_the_drain_of_a_cluster() -> None:
    new = without("south")
    agents = {"south": {"api_kind": "Lab", "context": "lab-south", "lease_ttl_s": 30.0}}
    drains, events = start_drains(OLD, new, {}, 100.0, agents)  # type: ignore[arg-type]
    (d,) = drains.values()
    (ev,) = events
    assert isinstance(ev, ClusterDraining) and ev.cluster == "south" and ev.grace_s == 60.0
    assert ev.provenance.commit == "b" * 40 and ev.provenance.file == "clusters/south.yaml:3:1"
    assert "removed clusters/south.yaml" in ev.provenance.trigger and d.agent == agents["south"]
    # the same commit again does not start it twice
    assert start_drains(OLD, new, drains, 101.0, agents) == (drains, [])  # type: ignore[arg-type]
    # not withdrawn before a revision without it is applied: no grace runs
    assert step_drains(drains, 10_000.0) == (drains, [])
    assert mark_withdrawn(drains, OLD, 150.0) == drains                   # an applied revision that has it
    withdrawn = mark_withdrawn(drains, new, 150.0)  # type: ignore[arg-type]
    assert withdrawn["south"].withdrawn_at_s == 150.0
    assert mark_withdrawn(withdrawn, new, 170.0) == withdrawn            # set once  # type: ignore[arg-type]
    assert step_drains(withdrawn, 209.0) == (withdrawn, [])
    left, done = step_drains(withdrawn, 210.0)
    assert left == {} and [x.cluster for x in done] == ["south"]
    removed = removed_event(done[0], 210.0, ["gateway/south", "ztunnel/south/node-1"])
    assert removed.drained_for_s == 110.0 and removed.proxies_forgotten == ("gateway/south", "ztunnel/south/node-1")
    assert removed.provenance.commit == "b" * 40


def test_a_cluster_added_back_while_draining_is_a_member_again() -> None:
    drains, _ = start_drains(OLD, without("south"), {}, 100.0, {})  # type: ignore[arg-type]
    back = fleet(sha="c" * 40)
    left, events = start_drains(without("south"), back, drains, 120.0, {})  # type: ignore[arg-type]
    assert left == {} and isinstance(events[0], ClusterDrainCancelled) and events[0].provenance.commit == "c" * 40


def test_drains_survive_a_restart_as_data() -> None:
    from federation.core.removal import Drain

    drains, _ = start_drains(OLD, without("south"), {}, 100.0, {"south": {"context": "lab-south"}})  # type: ignore[arg-type]
    d = mark_withdrawn(drains, without("south"), 130.0)["south"]  # type: ignore[arg-type]
    assert Drain.from_dict(d.as_dict()) == d
