"""kubectl's Table format from the emulated API server (clusters.lab.tables): the columns and
cell texts of Kubernetes' printers, so `kubectl get` against a lab reads like a real cluster."""

from __future__ import annotations

import calendar
import time
from typing import Any

import pytest

from clusters.lab import tables

NOW = calendar.timegm(time.strptime("2026-12-02T12:00:00Z", "%Y-%m-%dT%H:%M:%SZ"))


def _meta(name: str, age_s: int, **extra: Any) -> dict[str, Any]:
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - age_s))
    return {"name": name, "creationTimestamp": ts, **extra}


def _cols(doc: dict[str, Any], priority: int | None = None) -> list[str]:
    return [c["name"] for c in doc["columnDefinitions"] if priority is None or c["priority"] == priority]


@pytest.mark.parametrize(("seconds", "text"), [
    (-5, "<invalid>"), (0, "0s"), (119, "119s"), (120, "2m"), (303, "5m3s"), (600, "10m"), (179 * 60, "179m"),
    (3 * 3600 + 600, "3h10m"), (8 * 3600, "8h"), (47 * 3600, "47h"), (4 * 86400 + 3600, "4d1h"), (30 * 86400, "30d"),
    (3 * 365 * 86400 + 86400, "3y1d"), (9 * 365 * 86400, "9y"),
])
def test_ages_read_like_kubectl(seconds: int, text: str) -> None:
    assert tables.human_duration(seconds) == text


def test_kubectl_accept_header_asks_for_a_table() -> None:
    kubectl = ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,"
               "application/json")
    assert tables.wants_table(kubectl)
    assert not tables.wants_table("application/json") and not tables.wants_table("")


def test_pods_show_ready_status_restarts_and_wide_ip_node() -> None:
    running = {"metadata": _meta("checkout-0", 303, namespace="shop"),
               "spec": {"nodeName": "node-1", "containers": [{"name": "a"}, {"name": "b"}]},
               "status": {"phase": "Running", "podIP": "10.1.0.5",
                          "containerStatuses": [{"ready": True, "restartCount": 1}, {"ready": False, "restartCount": 2}]}}
    crashing = {"metadata": _meta("cart-1", 30, namespace="shop"), "spec": {"containers": [{"name": "a"}]},
                "status": {"phase": "Running", "containerStatuses": [
                    {"ready": False, "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}}
    leaving = {"metadata": _meta("old", 30, deletionTimestamp="2026-12-02T11:59:59Z"),
               "spec": {"containers": [{"name": "a"}]}, "status": {"phase": "Running"}}
    doc = tables.table("Pod", [running, crashing, leaving], NOW, "42")
    assert doc is not None and doc["kind"] == "Table" and doc["apiVersion"] == "meta.k8s.io/v1"
    assert _cols(doc, 0) == ["Name", "Ready", "Status", "Restarts", "Age"]
    assert _cols(doc, 1) == ["IP", "Node", "Nominated Node", "Readiness Gates"]
    assert doc["rows"][0]["cells"] == ["checkout-0", "1/2", "Running", "3", "5m3s", "10.1.0.5", "node-1", "<none>",
                                       "<none>"]
    assert doc["rows"][1]["cells"][:4] == ["cart-1", "0/1", "CrashLoopBackOff", "4"]
    assert doc["rows"][1]["cells"][5:7] == ["<none>", "<none>"]
    assert doc["rows"][2]["cells"][2] == "Terminating"
    # kubectl adds NAMESPACE (-A) from the row's object: metadata by default
    assert doc["rows"][0]["object"] == {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                        "metadata": running["metadata"]}
    assert doc["metadata"]["resourceVersion"] == "42"


def test_nodes_show_status_roles_version() -> None:
    node = {"metadata": _meta("node-1", 3 * 86400, labels={"node-role.kubernetes.io/control-plane": ""}),
            "spec": {"unschedulable": True},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                       "nodeInfo": {"kubeletVersion": "v1.31.0", "osImage": "lab", "kernelVersion": "6.1",
                                    "containerRuntimeVersion": "x://1"}}}
    down = {"metadata": _meta("node-2", 60), "status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    doc = tables.table("Node", [node, down], NOW)
    assert doc is not None and _cols(doc, 0) == ["Name", "Status", "Roles", "Age", "Version"]
    assert doc["rows"][0]["cells"] == ["node-1", "Ready,SchedulingDisabled", "control-plane", "3d", "v1.31.0",
                                       "10.0.0.1", "<none>", "lab", "6.1", "x://1"]
    assert doc["rows"][1]["cells"][:3] == ["node-2", "NotReady", "<none>"]


def test_services_show_type_cluster_ip_external_ip_ports() -> None:
    lb = {"metadata": _meta("eastwest", 60), "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20",
                                                      "ports": [{"port": 15008, "nodePort": 31008, "protocol": "TCP"}],
                                                      "selector": {"app": "gw"}},
          "status": {"loadBalancer": {"ingress": [{"ip": "172.18.0.200"}]}}}
    pending = {"metadata": _meta("p", 60), "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.21",
                                                    "ports": [{"port": 80}]}}
    plain = {"metadata": _meta("cart", 60), "spec": {"clusterIP": "10.96.0.10",
                                                     "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}}
    doc = tables.table("Service", [lb, pending, plain], NOW)
    assert doc is not None and _cols(doc, 0) == ["Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age"]
    assert doc["rows"][0]["cells"] == ["eastwest", "LoadBalancer", "10.96.0.20", "172.18.0.200", "15008:31008/TCP",
                                       "60s", "app=gw"]
    assert doc["rows"][1]["cells"][3] == "<pending>"
    assert doc["rows"][2]["cells"][1:5] == ["ClusterIP", "10.96.0.10", "<none>", "80/TCP,53/UDP"]


def test_endpointslices_show_type_ports_and_a_few_endpoints() -> None:
    es = {"metadata": _meta("cart-abc", 60), "addressType": "IPv4", "ports": [{"port": 8080}, {"port": None}],
          "endpoints": [{"addresses": [f"10.1.0.{i}"]} for i in range(1, 6)]}
    empty = {"metadata": _meta("none", 60), "addressType": "IPv4"}
    doc = tables.table("EndpointSlice", [es, empty], NOW, include_object="Object")
    assert doc is not None and _cols(doc) == ["Name", "AddressType", "Ports", "Endpoints", "Age"]
    assert doc["rows"][0]["cells"] == ["cart-abc", "IPv4", "8080,<unset>", "10.1.0.1,10.1.0.2,10.1.0.3 + 2 more...",
                                       "60s"]
    assert doc["rows"][1]["cells"][2:4] == ["<none>", "<unset>"]
    assert doc["rows"][0]["object"] == es


def test_kinds_without_a_printer_get_the_plain_list() -> None:
    assert tables.table("Namespace", [{"metadata": _meta("shop", 1)}], NOW) is None
    doc = tables.table("Pod", [{"metadata": _meta("x", 1), "spec": {}, "status": {}}], NOW, include_object="None")
    assert doc is not None and "object" not in doc["rows"][0]
