"""The lab plays kubelet (and the endpoint-slice controller) for each lab cluster's emulated API.

Discovery reads Nodes, Pods, Services and EndpointSlices from the lab exactly as from kind, so
these objects must follow the real processes: a pod process that dies makes its Pod not ready
(phase Failed) and its endpoint `ready: false`; one that starts answering its readiness probe
makes them ready; a node that is down (its ztunnel killed, its uplink down) is `Ready=False`.

Split as everywhere here: `desired_objects()` is pure (plan + observed states → the exact API
objects), `Kubelet.sync()` compares them with what it last wrote and writes only the changes.
Lists are never shrunk through a merge (the emulator's patches are plain merges): the set of pods
per cluster is fixed by the plan, only their conditions change.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from clusters.kube.observation import GATEWAY_SERVICE, MESH_NAMESPACE
from clusters.lab.topology import ClusterPlan, GatewayPlan, NodePlan, PodPlan, ServiceVip
from gitops.model import AMBIENT_LABEL, AMBIENT_VALUE

ZONE_LABEL = "topology.kubernetes.io/zone"
LAB_KUBELET_VERSION = "v1.31.0-meshfed-lab"   # the Kubernetes API version the emulated server models
log = logging.getLogger(__name__)
MAX_TRANSITIONS = 1000  # kept for `lab status` (the last 20 are shown): bounded, the lab may run for days
REGION_LABEL = "topology.kubernetes.io/region"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY = "endpointslice.meshfed.dev/lab"
PROXY_PROTOCOL_LABEL = "networking.meshfed.dev/inbound-proxy-protocol"


class PodPhase(str, Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    FAILED = "Failed"


@dataclass(frozen=True, slots=True)
class PodState:
    phase: PodPhase
    ready: bool
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class NodeState:
    ready: bool


class ObjectWriter(Protocol):
    def apply(self, obj: Mapping[str, Any], replace: bool = False) -> dict[str, Any]: ...


def node_object(node: NodePlan, state: NodeState, cluster: ClusterPlan) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node.name, "labels": {
            ZONE_LABEL: node.zone, REGION_LABEL: node.region, "kubernetes.io/hostname": node.name,
            "topology.istio.io/network": cluster.network,
        }},
        "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": node.address},
                          {"type": "Hostname", "address": node.name}],
            "conditions": [{"type": "Ready", "status": "True" if state.ready else "False",
                            "reason": "KubeletReady" if state.ready else "NodeDown"}],
            # what `kubectl get nodes -o wide` shows (VERSION, OS-IMAGE, ...): say what the node is
            "nodeInfo": {"kubeletVersion": LAB_KUBELET_VERSION, "osImage": "meshfed lab (network namespace)",
                         "kernelVersion": platform.release(), "containerRuntimeVersion": "meshfed-lab://process",
                         "operatingSystem": "linux", "architecture": platform.machine()},
        },
    }


def pod_object(pod: PodPlan, node: NodePlan, state: PodState) -> dict[str, Any]:
    labels = dict(pod.labels)
    if pod.role == "server":
        labels[PROXY_PROTOCOL_LABEL] = "v2"
    ready = "True" if state.ready else "False"
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": labels,
                     "uid": f"lab-{pod.cluster}-{pod.namespace}-{pod.name}"},
        "spec": {"nodeName": pod.node, "serviceAccountName": pod.service_account,
                 "containers": [{"name": pod.workload, "image": f"meshfed.dev/lab/{pod.role}",
                                 "ports": [{"containerPort": pod.port, "protocol": "TCP"}]}]},
        "status": {
            "phase": state.phase.value, "podIP": pod.address, "podIPs": [{"ip": pod.address}],
            "hostIP": node.address,
            "conditions": [{"type": "Ready", "status": ready}, {"type": "ContainersReady", "status": ready}],
            "containerStatuses": [{"name": pod.workload, "ready": state.ready, "image": f"meshfed.dev/lab/{pod.role}",
                                   "imageID": f"meshfed.dev/lab/{pod.role}@sha256:lab",
                                   "restartCount": 0, "started": state.phase is PodPhase.RUNNING}],
        },
    }


def service_object(vip: ServiceVip, cluster: ClusterPlan) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": vip.name, "namespace": vip.namespace,
                     "labels": {"meshfed.dev/global-service": "true"},
                     "annotations": {"meshfed.dev/clusterset-hostname": vip.hostname}},
        "spec": {"type": "ClusterIP", "clusterIP": vip.cluster_ip, "clusterIPs": [vip.cluster_ip],
                 "selector": {"service": vip.name},
                 "ports": [{"name": n, "port": p, "targetPort": t, "protocol": "TCP"} for n, p, t in vip.ports]},
    }


def endpoint_slice_object(vip: ServiceVip, cluster: ClusterPlan, states: Mapping[str, PodState]) -> dict[str, Any]:
    backends = [p for p in cluster.pods if p.service == vip.name and p.namespace == vip.namespace]
    endpoints = []
    for p in backends:
        st = states.get(p.key, PodState(PodPhase.PENDING, False))
        node = cluster.node(p.node)
        endpoints.append({
            "addresses": [p.address],
            "conditions": {"ready": st.ready, "serving": st.ready, "terminating": False},
            "nodeName": p.node, "zone": node.zone,
            "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace},
        })
    target_ports = {t for _, _, t in vip.ports} or {p.port for p in backends}
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{vip.name}-lab", "namespace": vip.namespace,
                     "labels": {SERVICE_NAME_LABEL: vip.name, "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": n, "port": t, "protocol": "TCP"} for n, _, t in vip.ports]
        or [{"name": "", "port": port, "protocol": "TCP"} for port in sorted(target_ports)],
    }


def gateway_service_object(gw: GatewayPlan) -> dict[str, Any]:
    """The east-west gateway's Service as a cloud (or MetalLB) leaves it: type LoadBalancer on the
    HBONE port, its address in status.loadBalancer.ingress (the lab's WAN leg plays the LB)."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": GATEWAY_SERVICE, "namespace": MESH_NAMESPACE,
                     "labels": {"app.kubernetes.io/name": GATEWAY_SERVICE, "app.kubernetes.io/part-of": "meshfed"}},
        "spec": {"type": "LoadBalancer", "selector": {"app.kubernetes.io/name": GATEWAY_SERVICE},
                 "ports": [{"name": "tls-hbone", "port": gw.port, "targetPort": gw.port, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": gw.wan_address, "ipMode": "VIP"}]}},
    }


def desired_objects(cluster: ClusterPlan, pod_states: Mapping[str, PodState],
                    node_states: Mapping[str, NodeState]) -> dict[str, dict[str, Any]]:
    """Every API object of a lab cluster, keyed "Kind/namespace/name" (pure).

    The workloads' namespaces are written enrolled (`istio.io/dataplane-mode=ambient`) once; a
    label changed later (`kubectl label ns shop istio.io/dataplane-mode-`) stays: the kubelet
    rewrites an object only when what it wants changes, and it never wants a namespace's labels
    to change."""
    objs: dict[str, dict[str, Any]] = {}
    namespaces = sorted({p.namespace for p in cluster.pods} | {v.namespace for v in cluster.services})
    for ns in namespaces:
        objs[f"Namespace//{ns}"] = {"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": ns, "labels": {AMBIENT_LABEL: AMBIENT_VALUE}}}
    if cluster.gateway is not None:
        objs[f"Namespace//{MESH_NAMESPACE}"] = {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": MESH_NAMESPACE}}
        objs[f"Service/{MESH_NAMESPACE}/{GATEWAY_SERVICE}"] = gateway_service_object(cluster.gateway)
    for n in cluster.nodes:
        objs[f"Node//{n.name}"] = node_object(n, node_states.get(n.name, NodeState(True)), cluster)
    for v in cluster.services:
        objs[f"Service/{v.namespace}/{v.name}"] = service_object(v, cluster)
    for p in cluster.pods:
        st = pod_states.get(p.key, PodState(PodPhase.PENDING, False))
        objs[f"Pod/{p.namespace}/{p.name}"] = pod_object(p, cluster.node(p.node), st)
    for v in cluster.services:
        objs[f"EndpointSlice/{v.namespace}/{v.name}-lab"] = endpoint_slice_object(v, cluster, pod_states)
    return objs


class Kubelet:
    """Keeps one cluster's emulated API in line with its processes.

    Invariants: `_written` holds the JSON of each object as last written successfully; an object
    whose write failed is retried at the next sync; objects are written in dependency order
    (namespaces first) because `desired_objects` returns them in that order.
    """

    def __init__(self, cluster: ClusterPlan, api: ObjectWriter,
                 probe_pods: Callable[[], Mapping[str, PodState]],
                 probe_nodes: Callable[[], Mapping[str, NodeState]]) -> None:
        self.cluster = cluster
        self.api = api
        self._probe_pods, self._probe_nodes = probe_pods, probe_nodes
        self._written: dict[str, str] = {}
        self.writes = 0
        self.passes = 0
        self.failed_passes = 0  # passes that raised (see `run`)
        self.last_error = ""
        self.transitions: list[tuple[float, str, str]] = []  # (time, object key, summary)

    def sync(self) -> int:
        """One pass: probe, compute, write what changed. Returns the number of writes."""
        objs = desired_objects(self.cluster, self._probe_pods(), self._probe_nodes())
        n = 0
        for key, obj in objs.items():
            text = json.dumps(obj, sort_keys=True)
            if self._written.get(key) == text:
                continue
            try:
                self.api.apply(obj)
            except Exception as e:  # the API server may be restarting: retry next pass
                self.last_error = f"{key}: {e}"
                continue
            if key in self._written:
                self.transitions.append((time.time(), key, _summary(obj)))
                del self.transitions[:-MAX_TRANSITIONS]
                log.info("cluster %s: %s now %s", self.cluster.name, key, _summary(obj))
            self._written[key] = text
            n += 1
        self.writes += n
        self.passes += 1
        return n

    def run(self, stop: threading.Event, interval_s: float = 0.1) -> None:
        """Sync every `interval_s` until `stop`. A pass that raises (a probe or an object that
        breaks) is counted in `failed_passes` and `last_error` and the loop goes on: a dead
        kubelet thread would freeze its cluster's API at whatever it said last (a killed pod
        never Ready again, for every later experiment in that lab) with nothing saying so."""
        while not stop.is_set():
            try:
                self.sync()
            except Exception as e:
                self.failed_passes += 1
                self.last_error = f"sync pass failed: {type(e).__name__}: {e}"
            stop.wait(interval_s)


def _summary(obj: Mapping[str, Any]) -> str:
    if obj["kind"] == "Pod":
        st = obj["status"]
        return f"phase={st['phase']} ready={st['conditions'][0]['status']}"
    if obj["kind"] == "EndpointSlice":
        return " ".join(f"{e['targetRef']['name']}={'ready' if e['conditions']['ready'] else 'notready'}"
                        for e in obj["endpoints"])
    if obj["kind"] == "Node":
        return f"Ready={obj['status']['conditions'][0]['status']}"
    return "changed"
