"""Kubernetes objects for tests: a Node, a Service, and Pods + one EndpointSlice per service."""

from __future__ import annotations

from typing import Any


def node(name: str, address: str, zone: str = "z1", region: str = "r1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone,
                                                  "topology.kubernetes.io/region": region}},
            "status": {"addresses": [{"type": "InternalIP", "address": address}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def service(ns: str, name: str, port: int = 80, target_port: int = 8080,
            labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": port, "targetPort": target_port}]}}


def pod(ns: str, name: str, node_name: str, ip: str, sa: str = "default", app: str = "") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app or name}},
            "spec": {"nodeName": node_name, "serviceAccountName": sa, "containers": [{"name": "c", "image": "x"}]},
            "status": {"podIP": ip, "phase": "Running"}}


def endpoint_slice(ns: str, svc: str, pods: list[tuple[str, str, str]], port: int = 8080,
                   ready: bool = True) -> dict[str, Any]:
    """`pods` are (pod name, ip, node name)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-abc", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}, "nodeName": node_name,
                           "targetRef": {"kind": "Pod", "name": name, "namespace": ns}}
                          for name, ip, node_name in pods],
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}
