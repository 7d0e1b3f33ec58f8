"""Discovery against realistic objects on the emulated API server, and the server's watch semantics.

What a real API server does and discovery relies on: resourceVersions on every object and list,
watches that resume from a version (410 Gone when it is too old), bookmarks on quiet watches,
label selectors evaluated by the server (an object that stops matching leaves the watch as
DELETED). The objects look like what kube-controller-manager writes: EndpointSlices with zone
hints and serving/terminating conditions, an IPv6 slice next to the IPv4 one, a LoadBalancer
Service with its ingress status.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clusters.kube.discovery import KubeDiscovery
from clusters.kube.observation import ClusterObservation
from clusters.lab.apiserver import EmulatedApiServer
from tests.integration.controller import kobjects as k

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
SELECTOR = "istio.io/dataplane-mode=ambient"


@pytest.fixture()
def apiserver() -> Iterator[EmulatedApiServer]:
    with EmulatedApiServer(bookmark_interval_s=0.2, max_journal_events=50) as srv:
        yield srv


def realistic_slice(ns: str, svc: str) -> dict[str, Any]:
    """As the EndpointSlice controller writes it, with topology hints and all three conditions."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-x7k2p", "namespace": ns, "generateName": f"{svc}-",
                         "labels": {"kubernetes.io/service-name": svc,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": {"ready": True, "serving": True, "terminating": False},
                 "nodeName": "n1", "zone": "za", "hints": {"forZones": [{"name": "za"}]},
                 "targetRef": {"kind": "Pod", "name": "checkout-1", "namespace": ns, "uid": "u1"}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": False, "serving": True, "terminating": True},
                 "nodeName": "n2", "zone": "zb", "hints": {"forZones": [{"name": "zb"}]},
                 "targetRef": {"kind": "Pod", "name": "checkout-2", "namespace": ns, "uid": "u2"}},
                {"addresses": ["10.1.0.3"], "conditions": {},  # unknown: ready (the API's rule for nil)
                 "nodeName": "n1", "zone": "za",
                 "targetRef": {"kind": "Pod", "name": "checkout-3", "namespace": ns, "uid": "u3"}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]}


def ipv6_slice(ns: str, svc: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-v6abc", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["fd00::1"], "conditions": {"ready": True}, "nodeName": "n1",
                           "targetRef": {"kind": "Pod", "name": "checkout-1", "namespace": ns}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def gateway_service(ingress: list[dict[str, str]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "eastwest-gateway", "namespace": "meshfed-system"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20",
                     "ports": [{"name": "tls-hbone", "port": 15008, "targetPort": 15008, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": ingress}}}


def seed(srv: EmulatedApiServer) -> None:
    srv.seed([k.namespace("shop", AMBIENT), k.namespace("legacy"), k.namespace("meshfed-system"),
              k.node("n1", "192.0.2.1", zone="za"), k.node("n2", "192.0.2.2", zone="zb"),
              k.service("shop", "checkout"), k.service("legacy", "old"),
              k.pod("shop", "checkout-1", "n1", "10.1.0.1", sa="checkout"),
              k.pod("shop", "checkout-2", "n2", "10.1.0.2", sa="checkout"),
              k.pod("shop", "checkout-3", "n1", "10.1.0.3", sa="checkout"),
              k.pod("legacy", "old-1", "n1", "10.1.0.9"),
              realistic_slice("shop", "checkout"), ipv6_slice("shop", "checkout"),
              k.endpoint_slice("legacy", "old", [("old-1", "10.1.0.9", "n1")]),
              gateway_service([{"hostname": ""}, {"ip": "172.18.255.201", "ipMode": "VIP"}])])


def discovery(srv: EmulatedApiServer, tmp_path: Path, **kw: Any) -> KubeDiscovery:
    kc = srv.write_kubeconfig(tmp_path / "kubeconfig", "lab-a")
    return KubeDiscovery("a", str(kc), "lab-a", namespace_selector=SELECTOR, **kw)


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_realistic_objects_join_into_the_observation(apiserver: EmulatedApiServer, tmp_path: Path) -> None:
    seed(apiserver)
    obs = discovery(apiserver, tmp_path).list_all()
    eps = {e.pod: e for e in obs.endpoints}
    # legacy is not enrolled; the IPv6 slice names checkout-1 again and is not read
    assert set(eps) == {"checkout-1", "checkout-2", "checkout-3"}
    assert (eps["checkout-1"].ready, eps["checkout-1"].zone, eps["checkout-1"].address) == (True, "za", "10.1.0.1")
    assert (eps["checkout-2"].ready, eps["checkout-2"].serving, eps["checkout-2"].terminating) == (False, True, True)
    assert eps["checkout-3"].ready and eps["checkout-3"].serving
    assert eps["checkout-1"].ports[0].app_protocol == "http"
    assert [(s.namespace, s.name) for s in obs.services] == [("shop", "checkout")]  # not meshfed-system's
    assert obs.gateway_address == "172.18.255.201"  # first ingress entry with an address


def test_the_namespace_selector_is_evaluated_by_the_server(apiserver: EmulatedApiServer) -> None:
    seed(apiserver)
    names = {n["metadata"]["name"] for n in apiserver.list("v1", "Namespace", label_selector=SELECTOR)}
    assert names == {"shop"}
    assert {n["metadata"]["name"] for n in apiserver.list("v1", "Namespace")} == {"shop", "legacy", "meshfed-system"}


def test_lists_and_objects_carry_resource_versions(apiserver: EmulatedApiServer) -> None:
    seed(apiserver)
    with urllib.request.urlopen(apiserver.url + "/api/v1/namespaces") as r:
        body = json.loads(r.read())
    head = int(body["metadata"]["resourceVersion"])
    versions = [int(i["metadata"]["resourceVersion"]) for i in body["items"]]
    assert body["kind"] == "NamespaceList" and max(versions) <= head and len(set(versions)) == len(versions)
    before = apiserver.get("v1", "Namespace", None, "shop")
    apiserver.apply(k.namespace("shop", {**AMBIENT, "team": "payments"}))
    after = apiserver.get("v1", "Namespace", None, "shop")
    assert int(after["metadata"]["resourceVersion"]) > head
    assert after["metadata"]["uid"] == before["metadata"]["uid"]


def watch_lines(url: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return [json.loads(line) for line in r.read().splitlines() if line.strip()]


def test_watch_resumes_from_a_version_with_bookmarks_and_ends_on_timeout(apiserver: EmulatedApiServer) -> None:
    seed(apiserver)
    rv = apiserver.get("v1", "Namespace", None, "meshfed-system")["metadata"]["resourceVersion"]
    apiserver.apply(k.namespace("late", AMBIENT))
    t0 = time.monotonic()
    events = watch_lines(f"{apiserver.url}/api/v1/namespaces?watch=true&resourceVersion={rv}"
                         f"&allowWatchBookmarks=true&timeoutSeconds=1")
    assert 0.9 < time.monotonic() - t0 < 4
    changes = [(e["type"], e["object"]["metadata"]["name"]) for e in events if e["type"] != "BOOKMARK"]
    assert changes == [("ADDED", "late")]  # nothing from before the version
    marks = [e for e in events if e["type"] == "BOOKMARK"]
    assert marks and int(marks[-1]["object"]["metadata"]["resourceVersion"]) >= int(rv) + 1


def test_a_too_old_version_is_gone_as_a_watch_error(apiserver: EmulatedApiServer) -> None:
    for i in range(60):  # more than the journal keeps (50)
        apiserver.apply(k.namespace(f"ns-{i}"))
    events = watch_lines(f"{apiserver.url}/api/v1/namespaces?watch=true&resourceVersion=1&timeoutSeconds=1")
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


def test_unserved_kinds_and_put_say_what_is_served(apiserver: EmulatedApiServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(apiserver.url + "/apis/batch/v1/jobs")
    assert e.value.code == 404 and b"daemonsets" in e.value.read()
    req = urllib.request.Request(apiserver.url + "/api/v1/namespaces/x", data=b"{}", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 405 and b"kubectl apply" in e.value.read()


def test_discovery_resumes_watches_and_relists_only_after_gone(apiserver: EmulatedApiServer, tmp_path: Path) -> None:
    seed(apiserver)
    disc = discovery(apiserver, tmp_path, watch_timeout_s=1)
    seen: list[ClusterObservation] = []
    disc.start(seen.append)
    try:
        wait_for(lambda: bool(seen) and seen[-1].complete)
        wait_for(lambda: disc.resumes >= 5 and disc.bookmarks >= 1)  # each kind's watch ended and resumed
        lists = disc.lists
        assert lists == 5  # one LIST per kind; resumed watches do not list
        apiserver.apply(k.pod("shop", "checkout-4", "n2", "10.1.0.4"))
        wait_for(lambda: any(e.pod == "checkout-4" for e in disc.observation().endpoints))
        assert disc.lists == lists
    finally:
        disc.stop()


def test_discovery_relists_when_its_version_is_compacted_away(tmp_path: Path) -> None:
    with EmulatedApiServer(bookmark_interval_s=60, max_journal_events=3) as srv:
        seed(srv)
        disc = discovery(srv, tmp_path, watch_timeout_s=1)
        disc.list_all()
        for i in range(5):  # pods churn past the journal while nobody watches nodes
            srv.apply(k.pod("shop", f"churn-{i}", "n1", f"10.1.1.{i}"))
        disc.watch_kind_once("nodes", lambda: None)
        assert disc.expired == 1 and disc.resource_version("nodes") is None
        disc.watch_kind_once("nodes", lambda: None)  # lists again, then watches
        assert disc.lists == 6 and disc.resource_version("nodes") is not None


def test_unlabelling_a_namespace_removes_it_from_discovery_and_relabelling_brings_it_back(
        apiserver: EmulatedApiServer, tmp_path: Path) -> None:
    seed(apiserver)
    disc = discovery(apiserver, tmp_path, watch_timeout_s=5)
    changed = threading.Event()
    disc.start(lambda _obs: changed.set())
    try:
        wait_for(lambda: {e.namespace for e in disc.observation().endpoints} == {"shop"})
        apiserver.apply({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": None}}})
        wait_for(lambda: not disc.observation().endpoints and not disc.observation().services)
        apiserver.apply(k.namespace("shop", AMBIENT))
        wait_for(lambda: len(disc.observation().endpoints) == 3)
        assert disc.lists == 5  # all of it through the watch (DELETED, then ADDED), no re-LIST
    finally:
        disc.stop()


def test_a_refused_kind_is_an_error_never_an_empty_list(apiserver: EmulatedApiServer, tmp_path: Path) -> None:
    """With the raw responses discovery reads (no client-side decoding), a 403 Status body must not
    read as "no EndpointSlices" (that would withdraw every endpoint of a cluster that merely lost
    RBAC), and a watch refused after a resume starts over with a LIST once it answers again."""
    from clusters.kube.discovery import DiscoveryError

    seed(apiserver)
    disc = discovery(apiserver, tmp_path, watch_timeout_s=1)
    disc.list_all()
    apiserver.refuse("/apis/discovery.k8s.io")
    with pytest.raises(DiscoveryError, match="403"):
        disc.list_kind("endpointslices")
    assert len(disc.observation().endpoints) == 3   # the cache kept what it saw
    with pytest.raises(Exception, match="403"):
        disc.watch_kind_once("endpointslices", lambda: None)
    assert disc.resource_version("endpointslices") is None
    apiserver.allow()
    lists = disc.lists
    disc.watch_kind_once("endpointslices", lambda: None)
    assert disc.lists == lists + 1 and disc.resource_version("endpointslices") is not None
