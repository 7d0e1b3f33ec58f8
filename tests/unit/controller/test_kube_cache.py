"""Pure half of discovery: label selectors on our side, watch events into the cache, the join."""

from __future__ import annotations

import pytest

from clusters.kube.discovery import KINDS, ClusterCache, LabelSelector
from clusters.kube.observation import ClusterObservation, EndpointInfo, NodeInfo, ServiceInfo, ServicePortInfo
from clusters.lab.apiserver import objects_from_observation


@pytest.mark.parametrize(("selector", "labels", "match"), [
    ("", {}, True),
    ("app=x", {"app": "x"}, True),
    ("app=x", {"app": "y"}, False),
    ("app!=x", {}, True),
    ("app", {"app": ""}, True),
    ("!app", {"app": "x"}, False),
    ("env in (a,b),tier notin (db)", {"env": "b", "tier": "web"}, True),
    ("env in (a,b),tier notin (db)", {"env": "b", "tier": "db"}, False),
    ("istio.io/dataplane-mode=ambient", {"istio.io/dataplane-mode": "ambient"}, True),
])
def test_label_selector(selector: str, labels: dict[str, str], match: bool) -> None:
    assert LabelSelector(selector).matches(labels) is match


def _obs() -> ClusterObservation:
    port = ServicePortInfo("http", 80, 8080)
    return ClusterObservation(
        "east", 0.0, True,
        nodes=(NodeInfo("n1", "192.0.2.1", "r", "z1"),),
        services=(ServiceInfo("shop", "checkout", ports=(port,)),),
        endpoints=tuple(EndpointInfo("shop", "checkout", f"p{i}", f"10.0.0.{i}", "n1", "checkout", (port,), zone="z1")
                        for i in range(3)))


def test_round_trip_through_kubernetes_objects() -> None:
    """objects_from_observation (lab seeding) and the discovery join are inverse."""
    cache = ClusterCache("east")
    kinds = {"Node": "nodes", "Namespace": "namespaces", "Service": "services", "Pod": "pods",
             "EndpointSlice": "endpointslices"}
    by_kind: dict[str, list[dict[str, object]]] = {k: [] for k in KINDS}
    for obj in objects_from_observation(_obs()):
        by_kind[kinds[str(obj["kind"])]].append(obj)
    for kind, items in by_kind.items():
        cache.replace_kind(kind, items)
    got = cache.observation(0.0)
    assert got.complete
    assert got.endpoints == _obs().endpoints
    from dataclasses import replace

    assert tuple(replace(n, labels={}) for n in got.nodes) == _obs().nodes  # topology labels added


def test_watch_events_and_completeness() -> None:
    cache = ClusterCache("east")
    assert not cache.complete
    node = {"metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}
    assert cache.apply_event("nodes", "ADDED", node)
    assert not cache.apply_event("nodes", "MODIFIED", node)  # no effective change
    assert not cache.apply_event("nodes", "BOOKMARK", {})
    assert cache.apply_event("nodes", "DELETED", node)
    for kind in KINDS:
        cache.replace_kind(kind, [])
    assert cache.complete and cache.observation(1.0).complete
