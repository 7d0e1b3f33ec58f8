"""kubectl's Table format for the emulated API server: `kubectl get pods` shows READY, STATUS, IP.

kubectl asks every `get` for `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` and prints the
columns the server returns (priority 0; `-o wide` adds priority 1). A server that answers a plain
list leaves kubectl with NAME and AGE only. This module renders the Table for the kinds the lab
serves that kubectl users read: pods, nodes, services and endpointslices, with the columns and
cell texts of Kubernetes' own printers (pkg/printers/internalversion/printers.go), so that a lab
cluster reads like a real one. Pure: the caller passes the objects and `now_s`.

Rows carry the object as kubectl expects (`includeObject`): PartialObjectMetadata by default (kubectl
adds NAMESPACE and labels columns from it), the whole object for `Object`, nothing for `None`.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

TABLE_MEDIA = "as=Table"
MAX_SLICE_ENDPOINTS_SHOWN = 3      # kubectl: "10.1.0.1,10.1.0.2,10.1.0.3 + 2 more..."
NONE = "<none>"

Column = tuple[str, str, str, int]   # (name, type, format, priority)
_NAME: Column = ("Name", "string", "name", 0)
_AGE: Column = ("Age", "string", "", 0)


def wants_table(accept: str) -> bool:
    """Whether an Accept header asks for a meta.k8s.io Table (kubectl get does; clients do not)."""
    return any(TABLE_MEDIA in part and "g=meta.k8s.io" in part for part in accept.split(","))


def human_duration(seconds: float) -> str:
    """Kubernetes' duration.HumanDuration (apimachinery/pkg/util/duration): 45s, 5m3s, 3h10m, 4d…"""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


def _age(obj: Mapping[str, Any], now_s: float) -> str:
    ts = (obj.get("metadata") or {}).get("creationTimestamp")
    if not ts:
        return NONE
    try:
        created = calendar.timegm(time.strptime(str(ts), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return NONE
    return human_duration(now_s - created)


# --- pods ------------------------------------------------------------------------------------------

_POD_COLUMNS: tuple[Column, ...] = (
    _NAME, ("Ready", "string", "", 0), ("Status", "string", "", 0), ("Restarts", "string", "", 0), _AGE,
    ("IP", "string", "", 1), ("Node", "string", "", 1), ("Nominated Node", "string", "", 1),
    ("Readiness Gates", "string", "", 1),
)


def _pod_status(pod: Mapping[str, Any]) -> str:
    """The STATUS kubectl shows: a waiting/terminated container's reason over the phase;
    Terminating once deleted."""
    status = pod.get("status") or {}
    reason = str(status.get("reason") or status.get("phase") or "Unknown")
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
        if waiting.get("reason") and waiting["reason"] != "ContainerCreating":
            reason = str(waiting["reason"])
        elif terminated.get("reason"):
            reason = str(terminated["reason"])
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        reason = "Terminating"
    return reason


def pod_row(pod: Mapping[str, Any], now_s: float) -> list[Any]:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    containers = spec.get("containers") or []
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in statuses)
    gates = spec.get("readinessGates") or []
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    gates_text = f"{sum(1 for g in gates if conds.get(g.get('conditionType')) == 'True')}/{len(gates)}" if gates \
        else NONE
    return [pod["metadata"]["name"], f"{ready}/{len(containers)}", _pod_status(pod), str(restarts), _age(pod, now_s),
            status.get("podIP") or NONE, spec.get("nodeName") or NONE, status.get("nominatedNodeName") or NONE,
            gates_text]


# --- nodes -----------------------------------------------------------------------------------------

_NODE_COLUMNS: tuple[Column, ...] = (
    _NAME, ("Status", "string", "", 0), ("Roles", "string", "", 0), _AGE, ("Version", "string", "", 0),
    ("Internal-IP", "string", "", 1), ("External-IP", "string", "", 1), ("OS-Image", "string", "", 1),
    ("Kernel-Version", "string", "", 1), ("Container-Runtime", "string", "", 1),
)
_ROLE_PREFIX = "node-role.kubernetes.io/"


def node_row(node: Mapping[str, Any], now_s: float) -> list[Any]:
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    ready = next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    state = {"True": "Ready", "False": "NotReady"}.get(str(ready), "Unknown")
    if spec.get("unschedulable"):
        state += ",SchedulingDisabled"
    labels = meta.get("labels") or {}
    roles = sorted({k[len(_ROLE_PREFIX):] for k in labels if k.startswith(_ROLE_PREFIX) and k[len(_ROLE_PREFIX):]}
                   | ({str(labels["kubernetes.io/role"])} if labels.get("kubernetes.io/role") else set()))
    info = status.get("nodeInfo") or {}

    def address(kind: str) -> str:
        return next((str(a["address"]) for a in status.get("addresses") or [] if a.get("type") == kind), NONE)

    return [meta["name"], state, ",".join(roles) or NONE, _age(node, now_s), info.get("kubeletVersion", ""),
            address("InternalIP"), address("ExternalIP"), info.get("osImage") or "<unknown>",
            info.get("kernelVersion") or "<unknown>", info.get("containerRuntimeVersion") or "<unknown>"]


# --- services --------------------------------------------------------------------------------------

_SERVICE_COLUMNS: tuple[Column, ...] = (
    _NAME, ("Type", "string", "", 0), ("Cluster-IP", "string", "", 0), ("External-IP", "string", "", 0),
    ("Port(s)", "string", "", 0), _AGE, ("Selector", "string", "", 1),
)


def _external_ips(svc: Mapping[str, Any]) -> str:
    spec, status = svc.get("spec") or {}, svc.get("status") or {}
    kind = spec.get("type") or "ClusterIP"
    extra = [str(ip) for ip in spec.get("externalIPs") or []]
    if kind == "ExternalName":
        return str(spec.get("externalName") or NONE)
    if kind == "LoadBalancer":
        ingress = [str(i.get("ip") or i.get("hostname")) for i in (status.get("loadBalancer") or {}).get("ingress")
                   or [] if i.get("ip") or i.get("hostname")]
        return ",".join(ingress + extra) or "<pending>"
    return ",".join(extra) or NONE


def service_row(svc: Mapping[str, Any], now_s: float) -> list[Any]:
    spec = svc.get("spec") or {}
    ports = ",".join(f"{p.get('port')}{':' + str(p['nodePort']) if p.get('nodePort') else ''}/{p.get('protocol') or 'TCP'}"
                     for p in spec.get("ports") or []) or NONE
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items())) or NONE
    return [svc["metadata"]["name"], spec.get("type") or "ClusterIP", spec.get("clusterIP") or NONE,
            _external_ips(svc), ports, _age(svc, now_s), selector]


# --- endpointslices --------------------------------------------------------------------------------

_SLICE_COLUMNS: tuple[Column, ...] = (
    _NAME, ("AddressType", "string", "", 0), ("Ports", "string", "", 0), ("Endpoints", "string", "", 0), _AGE,
)


def slice_row(es: Mapping[str, Any], now_s: float) -> list[Any]:
    ports = ",".join("<unset>" if p.get("port") is None else str(p["port"]) for p in es.get("ports") or []) or NONE
    addrs = [str(a) for e in es.get("endpoints") or [] for a in e.get("addresses") or []]
    shown = ",".join(addrs[:MAX_SLICE_ENDPOINTS_SHOWN])
    if len(addrs) > MAX_SLICE_ENDPOINTS_SHOWN:
        shown += f" + {len(addrs) - MAX_SLICE_ENDPOINTS_SHOWN} more..."
    return [es["metadata"]["name"], es.get("addressType") or "", ports, shown or "<unset>", _age(es, now_s)]


PRINTERS: dict[str, tuple[tuple[Column, ...], Callable[[Mapping[str, Any], float], list[Any]]]] = {
    "Pod": (_POD_COLUMNS, pod_row),
    "Node": (_NODE_COLUMNS, node_row),
    "Service": (_SERVICE_COLUMNS, service_row),
    "EndpointSlice": (_SLICE_COLUMNS, slice_row),
}


def _row_object(obj: Mapping[str, Any], include: str) -> dict[str, Any] | None:
    if include == "None":
        return None
    if include == "Object":
        return dict(obj)
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": dict(obj.get("metadata") or {})}


def table(kind: str, objects: Sequence[Mapping[str, Any]], now_s: float, resource_version: str = "",
          include_object: str = "Metadata") -> dict[str, Any] | None:
    """The meta.k8s.io/v1 Table of `objects` of `kind`; None for a kind without a printer here
    (the server then answers the plain list, which kubectl prints as NAME and AGE)."""
    printer = PRINTERS.get(kind)
    if printer is None:
        return None
    columns, row_of = printer
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": row_of(obj, now_s)}
        o = _row_object(obj, include_object)
        if o is not None:
            row["object"] = o
        rows.append(row)
    return {
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [{"name": n, "type": t, "format": f, "description": "", "priority": p}
                              for n, t, f, p in columns],
        "rows": rows,
    }
