"""The emulated API server's read side (pure): resourceVersions, watch replay, selectors, 410 Gone."""

from __future__ import annotations

from typing import Any

import pytest

from clusters.kube.discovery import LabelSelector
from clusters.lab.apiserver import Gone, Journal, discovery_document, openapi_v3, parse_target

NS = ("v1", "Namespace")
POD = ("v1", "Pod")
AMBIENT = LabelSelector("istio.io/dataplane-mode=ambient")


def ns(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": dict(labels)}}


def test_every_write_gets_the_next_version_and_keeps_uid_and_creation() -> None:
    j = Journal()
    a = j.record(NS, "ADDED", ns("shop"), None)
    b = j.record(POD, "ADDED", {"metadata": {"name": "p"}}, "shop")
    c = j.record(NS, "MODIFIED", ns("shop", team="x"), None)  # kmock's patched object lacks uid
    assert [o["metadata"]["resourceVersion"] for o in (a, b, c)] == ["1", "2", "3"]
    assert c["metadata"]["uid"] == a["metadata"]["uid"] and c["metadata"]["creationTimestamp"]
    assert b["metadata"]["namespace"] == "shop"  # filled in from the URL
    assert (a["apiVersion"], a["kind"]) == NS
    assert j.rv == 3 and j.get(POD, ("shop", "p")) == b


def test_list_filters_by_label_selector_and_namespace() -> None:
    j = Journal()
    j.record(NS, "ADDED", ns("shop", **{"istio.io/dataplane-mode": "ambient"}), None)
    j.record(NS, "ADDED", ns("other"), None)
    assert [o["metadata"]["name"] for o in j.select(NS, None, AMBIENT, [])] == ["shop"]
    assert [o["metadata"]["name"] for o in j.select(NS, None, LabelSelector(), [("metadata.name", "other", True)])] \
        == ["other"]
    j.record(POD, "ADDED", {"metadata": {"name": "p"}}, "shop")
    j.record(POD, "ADDED", {"metadata": {"name": "q"}}, "other")
    assert [o["metadata"]["name"] for o in j.select(POD, "other", LabelSelector(), [])] == ["q"]


def test_watch_from_a_version_replays_only_what_came_after() -> None:
    j = Journal()
    j.record(NS, "ADDED", ns("a"), None)
    j.record(NS, "ADDED", ns("b"), None)
    j.record(POD, "ADDED", {"metadata": {"name": "p"}}, "a")
    j.record(NS, "DELETED", ns("a"), None)
    got = [(rv, t, o["metadata"]["name"]) for rv, t, o in j.since(NS, 1, None, LabelSelector(), [])]
    assert got == [(2, "ADDED", "b"), (4, "DELETED", "a")]


@pytest.mark.parametrize(("before", "after", "seen"), [
    ({"istio.io/dataplane-mode": "ambient"}, {}, "DELETED"),           # un-enrolled: gone for the watcher
    ({}, {"istio.io/dataplane-mode": "ambient"}, "ADDED"),             # enrolled: appears
    ({"istio.io/dataplane-mode": "ambient"}, {"istio.io/dataplane-mode": "ambient", "x": "y"}, "MODIFIED"),
    ({}, {"x": "y"}, None),                                            # never matched: nothing
])
def test_a_selecting_watch_sees_objects_enter_and_leave(before: dict[str, str], after: dict[str, str],
                                                        seen: str | None) -> None:
    j = Journal()
    j.record(NS, "ADDED", ns("shop", **before), None)
    j.record(NS, "MODIFIED", ns("shop", **after), None)
    events = j.since(NS, 1, None, AMBIENT, [])
    assert [t for _, t, _ in events] == ([seen] if seen else [])


def test_a_version_older_than_the_journal_is_gone() -> None:
    j = Journal(max_events=2)
    for name in "abc":
        j.record(NS, "ADDED", ns(name), None)
    assert [o["metadata"]["name"] for _, _, o in j.since(NS, 1, None, LabelSelector(), [])] == ["b", "c"]
    with pytest.raises(Gone, match="too old resource version"):
        j.since(NS, 0, None, LabelSelector(), [])


@pytest.mark.parametrize(("path", "resource", "namespace", "name"), [
    ("/api/v1/namespaces", NS, None, None),
    ("/api/v1/namespaces/shop", NS, None, "shop"),
    ("/api/v1/namespaces/shop/pods", POD, "shop", None),
    ("/api/v1/namespaces/shop/pods/p1", POD, "shop", "p1"),
    ("/api/v1/pods", POD, None, None),
    ("/apis/apps/v1/namespaces/meshfed-system/daemonsets/ztunnel", ("apps/v1", "DaemonSet"), "meshfed-system", "ztunnel"),
    ("/apis/rbac.authorization.k8s.io/v1/clusterroles/x", ("rbac.authorization.k8s.io/v1", "ClusterRole"), None, "x"),
])
def test_paths_name_served_kinds(path: str, resource: tuple[str, str], namespace: str | None, name: str | None) -> None:
    t = parse_target(path)
    assert t is not None and (t.resource, t.namespace, t.name) == (resource, namespace, name)


def test_unserved_paths_are_not_targets() -> None:
    assert parse_target("/apis/batch/v1/namespaces/x/jobs") is None
    assert parse_target("/healthz") is None


def test_openapi_v3_tells_kubectl_every_served_patch_takes_field_validation() -> None:
    index = openapi_v3("/openapi/v3")
    assert index is not None and "apis/apps/v1" in index["paths"] and "api/v1" in index["paths"]
    doc = openapi_v3("/openapi/v3/apis/apps/v1")
    assert doc is not None
    ops = {p["patch"]["x-kubernetes-group-version-kind"]["kind"]: p["patch"] for p in doc["paths"].values()}
    assert set(ops) == {"DaemonSet", "Deployment"}
    assert all(any(q["name"] == "fieldValidation" for q in op["parameters"]) for op in ops.values())
    group = discovery_document("/apis/apps")
    assert group is not None and group["preferredVersion"]["groupVersion"] == "apps/v1"
