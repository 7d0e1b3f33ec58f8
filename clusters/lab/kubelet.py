"""The lab plays kubelet (and the endpoint-slice controller) for each lab cluster's emulated API.

Discovery reads Nodes, Pods, Services and EndpointSlices from the lab exactly as from kind, so
these objects must follow the real processes: a pod process that dies makes its Pod not ready
(phase Failed) and its endpoint `ready: false`; one that starts answering its readiness probe
makes them ready; a node that is down (its ztunnel killed, its uplink down) is `Ready=False`.

Split as everywhere here: `desired_objects()` is pure (plan + observed states → the exact API
objects), `Kubelet.sync()` compares them with what it last wrote and writes only the changes.
Lists are never shrunk through a merge (the emulator's patches are plain merges): the set of pods
per cluster is fixed by the plan, only their conditions change.

The proxies are pods too, as the DaemonSet and the gateway Deployment run them on Kubernetes
(`proxy_pod_objects`: `meshfed-system/ztunnel-<node>`, host network, on its node, as service
account `ztunnel`; `meshfed-system/eastwest-gateway` as `eastwest-gateway`, the pod the gateway
Service selects), and like a kubelet the lab keeps each one's projected ServiceAccount token in the
proxy's directory (`TokenProjector`): requested from the cluster's API server (TokenRequest,
audience `meshfed-controller`, bound to the pod), refreshed when older than 80 % of its life (the
kubelet's rule), written 0600 and atomically. That token is how a lab proxy bootstraps with the
controller: no shared secret.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from clusters.kube.observation import GATEWAY_SERVICE, MESH_NAMESPACE
from clusters.lab.layout import proxy_pod_name
from clusters.lab.topology import ClusterPlan, GatewayPlan, NodePlan, PodPlan, ServiceVip
from gitops.model import AMBIENT_LABEL, AMBIENT_VALUE
from ztunnel.api.identity import CONTROLLER_TOKEN_AUDIENCE, ProxyId
from ztunnel.api.secret_files import make_private_dir, write_secret

ZONE_LABEL = "topology.kubernetes.io/zone"
LAB_KUBELET_VERSION = "v1.31.0-meshfed-lab"   # the Kubernetes API version the emulated server models
log = logging.getLogger(__name__)
MAX_TRANSITIONS = 1000  # kept for `lab status` (the last 20 are shown): bounded, the lab may run for days
REGION_LABEL = "topology.kubernetes.io/region"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY = "endpointslice.meshfed.dev/lab"
PROXY_PROTOCOL_LABEL = "networking.meshfed.dev/inbound-proxy-protocol"
PROJECTED_TOKEN_EXPIRATION_S = 3600   # the kubelet's default for projected tokens
TOKEN_REFRESH_FRACTION = 0.8          # ... refreshed when older than 80 % of that (or 24 h)
TOKEN_REFRESH_MAX_AGE_S = 86400.0
TOKEN_RETRY_S = 2.0


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


def proxy_ids(cluster: ClusterPlan) -> list[str]:
    """The proxies of a lab cluster: a node proxy per node, and its gateway if it has one."""
    return [str(ProxyId.node_proxy(cluster.name, n.name)) for n in cluster.nodes] + (
        [str(ProxyId.gateway(cluster.name))] if cluster.gateway is not None else [])


def proxy_pod_objects(cluster: ClusterPlan) -> list[dict[str, Any]]:
    """The ServiceAccounts and Pods the proxies run as (see the module docstring). Discovery leaves
    the pods out: node proxies use the host network, the gateway pod has no mesh pod address."""
    ids = proxy_ids(cluster)
    accounts = sorted({ProxyId.parse(p).service_account for p in ids})
    out: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "ServiceAccount",
                                  "metadata": {"name": sa, "namespace": MESH_NAMESPACE}} for sa in accounts]
    for pid in ids:
        name = proxy_pod_name(pid)
        parsed = ProxyId.parse(pid)
        node = parsed.node
        spec: dict[str, Any] = {
            "serviceAccountName": parsed.service_account,
            "containers": [{"name": "ztunnel" if node else GATEWAY_SERVICE, "image": "meshfed.dev/lab/ztunnel"}]}
        if node:
            spec.update(nodeName=node, hostNetwork=True)
        out.append({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": MESH_NAMESPACE,
                                 "labels": {"app.kubernetes.io/name": "ztunnel" if node else GATEWAY_SERVICE},
                                 "uid": f"lab-{cluster.name}-{MESH_NAMESPACE}-{name}"},
                    "spec": spec, "status": {"phase": "Running"}})
    return out


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
    proxies = proxy_pod_objects(cluster)
    if cluster.gateway is not None or proxies:
        objs[f"Namespace//{MESH_NAMESPACE}"] = {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": MESH_NAMESPACE}}
    if cluster.gateway is not None:
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
    for obj in proxies:  # service accounts first, then the pods that run as them
        objs[f"{obj['kind']}/{MESH_NAMESPACE}/{obj['metadata']['name']}"] = obj
    return objs


# --- projected ServiceAccount tokens --------------------------------------------------------------


class TokenRequester(Protocol):
    def request_token(self, namespace: str, service_account: str, pod: str, audiences: list[str],
                      expiration_s: int = PROJECTED_TOKEN_EXPIRATION_S) -> tuple[str, float]: ...


@dataclass(frozen=True, slots=True)
class ProjectedVolume:
    """One pod's projected serviceAccountToken volume: where the token goes and whose it is."""

    pod: str
    service_account: str
    path: Path
    namespace: str = MESH_NAMESPACE
    audience: str = CONTROLLER_TOKEN_AUDIENCE


def token_refresh_due(now_s: float, issued_at_s: float | None, expires_at_s: float) -> bool:
    """The kubelet's rule: a projected token is replaced once it is older than 80 % of its
    lifetime or 24 h (pure)."""
    if issued_at_s is None:
        return True
    lifetime_s = max(0.0, expires_at_s - issued_at_s)
    return now_s >= issued_at_s + min(TOKEN_REFRESH_FRACTION * lifetime_s, TOKEN_REFRESH_MAX_AGE_S)


def proxy_volumes(cluster: ClusterPlan, token_path: Callable[[str], Path]) -> list[ProjectedVolume]:
    """The projected token of every proxy of `cluster`; `token_path(proxy id)` says where it goes."""
    return [ProjectedVolume(proxy_pod_name(pid), ProxyId.parse(pid).service_account, token_path(pid))
            for pid in proxy_ids(cluster)]


class TokenProjector:
    """Keeps the projected tokens of some pods fresh on disk.

    Invariants: a token file is only ever replaced whole (write_secret: 0600, atomic, not through
    a link); a failed request leaves the previous token in place and is retried after
    `TOKEN_RETRY_S`; at most one request per volume per `sync`."""

    def __init__(self, api: TokenRequester, volumes: Sequence[ProjectedVolume],
                 clock: Callable[[], float] = time.time,
                 expiration_s: int = PROJECTED_TOKEN_EXPIRATION_S) -> None:
        self.api = api
        self.volumes = tuple(volumes)
        self.clock = clock
        self.expiration_s = expiration_s
        self._issued: dict[Path, tuple[float, float]] = {}     # path -> (issued at, expires at)
        self._retry_at: dict[Path, float] = {}
        self.requests = 0
        self.last_error = ""

    def sync(self) -> int:
        """Request and write every token that is due; how many were written."""
        written = 0
        for v in self.volumes:
            now = self.clock()
            issued = self._issued.get(v.path)
            if not token_refresh_due(now, issued[0] if issued else None, issued[1] if issued else 0.0):
                continue
            if now < self._retry_at.get(v.path, 0.0):
                continue
            try:
                self.requests += 1
                token, expires_at_s = self.api.request_token(v.namespace, v.service_account, v.pod, [v.audience],
                                                             self.expiration_s)
                make_private_dir(v.path.parent)
                write_secret(v.path, (token + "\n").encode())
            except Exception as e:  # the API server may be restarting: keep the old token, retry soon
                self.last_error = f"token for {v.namespace}/{v.pod}: {e}"
                self._retry_at[v.path] = now + TOKEN_RETRY_S
                continue
            self._issued[v.path] = (now, expires_at_s)
            written += 1
        return written


class Kubelet:
    """Keeps one cluster's emulated API in line with its processes.

    Invariants: `_written` holds the JSON of each object as last written successfully; an object
    whose write failed is retried at the next sync; objects are written in dependency order
    (namespaces first) because `desired_objects` returns them in that order.
    """

    def __init__(self, cluster: ClusterPlan, api: ObjectWriter,
                 probe_pods: Callable[[], Mapping[str, PodState]],
                 probe_nodes: Callable[[], Mapping[str, NodeState]],
                 tokens: TokenProjector | None = None) -> None:
        self.cluster = cluster
        self.api = api
        self.tokens = tokens   # the proxies' projected tokens, refreshed after the objects are written
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
        if self.tokens is not None:
            self.tokens.sync()
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
