"""Kubernetes discovery: Namespaces, Nodes, Pods, Services and EndpointSlices into ClusterObservation.

With `clusters.kube.auth` (TokenReview), the only modules that import `kubernetes`. Split in two
halves, decide-then-act:

- `ClusterCache` is pure: it holds the raw JSON objects of one cluster by kind, applies watch
  events (`apply_event`) or whole listings (`replace_kind`), and turns them into a
  `ClusterObservation` (`observation(now_s)`). Label selectors are evaluated here, on our side,
  because the emulated API server ignores them (and because one selector language for lab and
  kind keeps behaviour identical).
- `KubeDiscovery` does the I/O with the real client from a kubeconfig context: LIST each kind
  into the cache, then WATCH it; when a watch ends (server timeout, network error), it re-LISTs
  before watching again. Re-listing is what makes deletions that happened while we were not
  watching visible (the emulator has no resourceVersion to resume from, and a real server may
  answer 410 Gone) — each successful LIST makes the next observation `complete`.

Endpoints are joined here (EndpointSlice endpoint -> its Pod -> its Node) so the core never joins
Pods itself (see `clusters.kube.observation`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clusters.kube.observation import (
    ClusterObservation,
    EndpointInfo,
    NodeInfo,
    ServiceInfo,
    ServicePortInfo,
)

KINDS = ("namespaces", "nodes", "pods", "services", "endpointslices")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"

ObjKey = tuple[str, str]  # (namespace or "", name)


class DiscoveryError(RuntimeError):
    """Discovery could not talk to a cluster's API; the message names the likely cause."""


# --- label selectors (evaluated on our side) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """`a=b,c!=d,e,!f,g in (x,y),h notin (z)` — the kubectl selector grammar (set-based subset)."""

    text: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(_term_matches(term, labels) for term in _split_terms(self.text))


def _split_terms(text: str) -> list[str]:
    terms, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        terms.append(cur.strip())
    return [t for t in terms if t]


def _term_matches(term: str, labels: Mapping[str, str]) -> bool:
    for op in (" notin ", " in "):
        if op in term:
            key, values = term.split(op, 1)
            allowed = {v.strip() for v in values.strip().strip("()").split(",")}
            present = labels.get(key.strip())
            return (present in allowed) if op == " in " else (present not in allowed)
    if "!=" in term:
        key, value = term.split("!=", 1)
        return labels.get(key.strip()) != value.strip()
    if "==" in term or "=" in term:
        key, value = term.replace("==", "=").split("=", 1)
        return labels.get(key.strip()) == value.strip()
    if term.startswith("!"):
        return term[1:].strip() not in labels
    return term in labels


# --- the pure cache --------------------------------------------------------------------------


@dataclass
class ClusterCache:
    """Raw objects of one cluster, by kind. Not thread-safe by itself: `KubeDiscovery` locks it.

    Invariant: `listed` holds the kinds that had a successful LIST since the cache was made; an
    observation is `complete` only when every kind has been listed.
    """

    cluster: str
    namespace_selector: LabelSelector = LabelSelector()
    service_selector: LabelSelector = LabelSelector()
    objects: dict[str, dict[ObjKey, dict[str, Any]]] = field(default_factory=lambda: {k: {} for k in KINDS})
    listed: set[str] = field(default_factory=set)
    generation: int = 0  # bumped on every effective change

    @staticmethod
    def key_of(raw: Mapping[str, Any]) -> ObjKey:
        meta = raw.get("metadata") or {}
        return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))

    def replace_kind(self, kind: str, items: Iterable[Mapping[str, Any]]) -> bool:
        new = {self.key_of(o): dict(o) for o in items}
        changed = new != self.objects[kind]
        self.objects[kind] = new
        self.listed.add(kind)
        if changed:
            self.generation += 1
        return changed

    def apply_event(self, kind: str, event_type: str, raw: Mapping[str, Any]) -> bool:
        key = self.key_of(raw)
        bucket = self.objects[kind]
        if event_type == "DELETED":
            changed = bucket.pop(key, None) is not None
        elif event_type in ("ADDED", "MODIFIED"):
            changed = bucket.get(key) != raw
            bucket[key] = dict(raw)
        else:  # BOOKMARK / ERROR carry no object change
            return False
        if changed:
            self.generation += 1
        return changed

    @property
    def complete(self) -> bool:
        return self.listed >= set(KINDS)

    def observation(self, now_s: float, resource_version: str = "") -> ClusterObservation:
        return build_observation(self.cluster, self.objects, now_s, self.complete,
                                 self.namespace_selector, self.service_selector, resource_version)


def _labels(raw: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in ((raw.get("metadata") or {}).get("labels") or {}).items()}


def _node_info(raw: Mapping[str, Any]) -> NodeInfo:
    labels = _labels(raw)
    status = raw.get("status") or {}
    address = next((a.get("address", "") for a in status.get("addresses") or [] if a.get("type") == "InternalIP"), "")
    conditions = status.get("conditions") or []
    ready_cond = next((c for c in conditions if c.get("type") == "Ready"), None)
    ready = ready_cond is None or str(ready_cond.get("status")) == "True"
    return NodeInfo(name=str(raw["metadata"]["name"]), address=str(address), region=labels.get(REGION_LABEL, ""),
                    zone=labels.get(ZONE_LABEL, ""), ready=ready, labels=labels)


def _service_info(raw: Mapping[str, Any]) -> ServiceInfo:
    spec = raw.get("spec") or {}
    ports = tuple(
        ServicePortInfo(name=str(p.get("name") or ""), port=int(p.get("port", 0)),
                        target_port=_int_port(p.get("targetPort"), int(p.get("port", 0))),
                        protocol=str(p.get("protocol") or "TCP"), app_protocol=str(p.get("appProtocol") or ""))
        for p in spec.get("ports") or [])
    ns, name = ClusterCache.key_of(raw)
    return ServiceInfo(namespace=ns, name=name, cluster_ip=str(spec.get("clusterIP") or ""), ports=ports,
                       labels=_labels(raw))


def _int_port(value: Any, default: int) -> int:
    # A named targetPort ("http") resolves through the pod's container ports; the EndpointSlice
    # carries the resolved number, so the Service-level default is only a fallback.
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def build_observation(
    cluster: str,
    objects: Mapping[str, Mapping[ObjKey, Mapping[str, Any]]],
    now_s: float,
    complete: bool,
    namespace_selector: LabelSelector = LabelSelector(),
    service_selector: LabelSelector = LabelSelector(),
    resource_version: str = "",
) -> ClusterObservation:
    """Join raw objects into a ClusterObservation. Pure; deterministic order (sorted keys)."""
    namespaces = objects.get("namespaces", {})

    def ns_ok(ns: str) -> bool:
        if not namespace_selector.text:
            return True
        raw = namespaces.get(("", ns))
        return raw is not None and namespace_selector.matches(_labels(raw))

    nodes = {k[1]: _node_info(v) for k, v in sorted(objects.get("nodes", {}).items())}
    services: dict[ObjKey, ServiceInfo] = {}
    for key, raw in sorted(objects.get("services", {}).items()):
        if ns_ok(key[0]) and service_selector.matches(_labels(raw)):
            services[key] = _service_info(raw)
    pods = objects.get("pods", {})
    endpoints: dict[tuple[str, str, str], EndpointInfo] = {}
    for (ns, _slice), raw in sorted(objects.get("endpointslices", {}).items()):
        svc_name = _labels(raw).get(SERVICE_NAME_LABEL)
        if svc_name is None or (ns, svc_name) not in services:
            continue
        svc = services[(ns, svc_name)]
        by_name = {p.name: p for p in svc.ports}
        ports = tuple(
            ServicePortInfo(name=str(p.get("name") or ""),
                            port=by_name[str(p.get("name") or "")].port if str(p.get("name") or "") in by_name else int(p.get("port", 0)),
                            target_port=int(p.get("port", 0)), protocol=str(p.get("protocol") or "TCP"),
                            app_protocol=str(p.get("appProtocol") or ""))
            for p in raw.get("ports") or [])
        for ep in raw.get("endpoints") or []:
            ref = ep.get("targetRef") or {}
            addresses = ep.get("addresses") or []
            if ref.get("kind", "Pod") != "Pod" or not addresses:
                continue
            pod_name = str(ref.get("name") or "")
            pod = pods.get((str(ref.get("namespace") or ns), pod_name)) or {}
            pod_spec = pod.get("spec") or {}
            node_name = str(ep.get("nodeName") or pod_spec.get("nodeName") or "")
            node = nodes.get(node_name)
            cond = ep.get("conditions") or {}
            ready = cond.get("ready")
            info = EndpointInfo(
                namespace=ns, service=svc_name, pod=pod_name, address=str(addresses[0]), node=node_name,
                service_account=str(pod_spec.get("serviceAccountName") or pod_spec.get("serviceAccount") or "default"),
                ports=ports,
                ready=True if ready is None else bool(ready),
                serving=bool(cond.get("serving", True if ready is None else ready)),
                terminating=bool(cond.get("terminating", False)),
                zone=str(ep.get("zone") or (node.zone if node else "")),
                labels=_labels(pod),
            )
            endpoints.setdefault(info.key, info)
    # Pods that back no Service are workloads too (clients such as a frontend): their node's
    # ztunnel must know them to give their outbound connections an identity (Istio's ambient
    # Workload resources cover every pod). They join the graph with service "".
    served = {(i.namespace, i.pod) for i in endpoints.values()}
    for (ns, pod_name), pod in sorted(pods.items()):
        status, pod_spec = pod.get("status") or {}, pod.get("spec") or {}
        address = str(status.get("podIP") or "")
        if ((ns, pod_name) in served or not ns_ok(ns) or not address or pod_spec.get("hostNetwork")
                or status.get("phase", "Running") != "Running"):
            continue
        node_name = str(pod_spec.get("nodeName") or "")
        node = nodes.get(node_name)
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        info = EndpointInfo(
            namespace=ns, service="", pod=pod_name, address=address, node=node_name,
            service_account=str(pod_spec.get("serviceAccountName") or pod_spec.get("serviceAccount") or "default"),
            ready=ready, serving=ready, zone=node.zone if node else "", labels=_labels(pod),
        )
        endpoints.setdefault(info.key, info)
    return ClusterObservation(
        cluster=cluster, observed_at_s=now_s, complete=complete, nodes=tuple(nodes.values()),
        services=tuple(services.values()), endpoints=tuple(endpoints[k] for k in sorted(endpoints)),
        resource_version=resource_version,
    )


# --- the I/O half -------------------------------------------------------------------------------


def _api_client(kubeconfig: str | None, context: str) -> Any:
    from kubernetes import config  # kubernetes is imported in clusters.kube only (discovery, auth)

    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except Exception as e:  # the client raises ConfigException, FileNotFoundError, ...
        where = kubeconfig or "$KUBECONFIG / ~/.kube/config"
        raise DiscoveryError(
            f"cannot load kubeconfig context {context!r} from {where}: {e}; "
            f"check the cluster's spec.api.context in the fleet repo (for the lab: is its API server running?)"
        ) from e


class KubeDiscovery:
    """List and watch one cluster's API into a `ClusterCache`.

    `on_change(observation)` is called from watch threads after every effective change (callers
    debounce; see `federation.controller.reconciler`). `last_success_s` is the wall clock of the last
    successful LIST or watch event, the basis of the cluster's lease.
    """

    def __init__(self, cluster: str, kubeconfig: str | None, context: str,
                 namespace_selector: str = "", service_selector: str = "",
                 watch_timeout_s: int = 30, request_timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.cluster, self.kubeconfig, self.context = cluster, kubeconfig, context
        self.cache = ClusterCache(cluster, LabelSelector(namespace_selector), LabelSelector(service_selector))
        self.watch_timeout_s, self.request_timeout_s = watch_timeout_s, request_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._api: Any = None
        self.last_success_s: float | None = None
        self.last_error: str = ""
        self.failing: dict[str, str] = {}   # kind -> why its last LIST/WATCH failed (cleared by a LIST)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def _client(self) -> Any:
        if self._api is None:
            self._api = _api_client(self.kubeconfig, self.context)
        return self._api

    def _list_fn(self, kind: str) -> Callable[..., Any]:
        from kubernetes import client

        api = self._client()
        core, disc = client.CoreV1Api(api), client.DiscoveryV1Api(api)
        fns: dict[str, Callable[..., Any]] = {
            "namespaces": core.list_namespace,
            "nodes": core.list_node,
            "pods": core.list_pod_for_all_namespaces,
            "services": core.list_service_for_all_namespaces,
            "endpointslices": disc.list_endpoint_slice_for_all_namespaces,
        }
        return fns[kind]

    def list_kind(self, kind: str) -> bool:
        try:
            resp = self._list_fn(kind)(_preload_content=False, _request_timeout=self.request_timeout_s)
            body = json.loads(resp.data)
        except DiscoveryError:
            raise
        except Exception as e:
            self.last_error = f"LIST {kind} failed: {e}"
            raise DiscoveryError(f"cluster {self.cluster}: cannot list {kind} through context {self.context!r}: {e}; "
                                 f"is the API server reachable?") from e
        with self._lock:
            changed = self.cache.replace_kind(kind, body.get("items") or [])
            self.last_success_s = self._clock()
            self.failing.pop(kind, None)
        return changed

    def failing_kinds(self) -> dict[str, str]:
        """Kinds whose last LIST or WATCH failed (kind -> error): an API that answers `/version` but
        refuses EndpointSlices is not a cluster we can see, and must not keep its lease."""
        with self._lock:
            return dict(self.failing)

    def list_all(self) -> ClusterObservation:
        """A fresh, complete observation (LIST of every kind)."""
        for kind in KINDS:
            self.list_kind(kind)
        return self.observation()

    def observation(self) -> ClusterObservation:
        with self._lock:
            return self.cache.observation(self._clock(), str(self.cache.generation))

    def probe(self) -> float:
        """A cheap request (`GET /version`) whose success renews a quiet cluster's lease: a lease must
        not depend on watch churn. Returns the time of success; raises DiscoveryError otherwise."""
        from kubernetes import client

        try:
            client.VersionApi(self._client()).get_code(_request_timeout=self.request_timeout_s)
        except DiscoveryError:
            raise
        except Exception as e:
            self.last_error = f"GET /version failed: {e}"
            raise DiscoveryError(f"cluster {self.cluster}: the API server behind context {self.context!r} does not "
                                 f"answer ({e}); is it reachable?") from e
        with self._lock:
            now = self._clock()
            self.last_success_s = now
        return now

    def watch_kind_once(self, kind: str, on_change: Callable[[], None]) -> None:
        """LIST then WATCH `kind` until the server ends the watch or `stop()` is called."""
        from kubernetes import watch

        if self.list_kind(kind):
            on_change()
        w = watch.Watch()
        try:
            for ev in w.stream(self._list_fn(kind), timeout_seconds=self.watch_timeout_s,
                               _request_timeout=self.watch_timeout_s + 5, deserialize=False,
                               allow_watch_bookmarks=True):
                if self._stop.is_set():
                    break
                if ev.get("type") == "BOOKMARK":  # the server's "still here" on a quiet watch
                    with self._lock:
                        self.last_success_s = self._clock()
                    continue
                raw = ev.get("raw_object") or ev.get("object")
                if not isinstance(raw, Mapping):
                    continue
                with self._lock:
                    changed = self.cache.apply_event(kind, str(ev.get("type")), raw)
                    self.last_success_s = self._clock()
                if changed:
                    on_change()
        finally:
            w.stop()

    def start(self, on_change: Callable[[ClusterObservation], None], retry_s: float = 1.0) -> None:
        """One daemon thread per kind: LIST+WATCH forever, re-listing after every watch ends."""

        def loop(kind: str) -> None:
            while not self._stop.is_set():
                try:
                    self.watch_kind_once(kind, lambda: on_change(self.observation()))
                except Exception as e:  # keep watching: the lease (in the agent) tells the rest
                    self.last_error = str(e)
                    with self._lock:
                        self.failing[kind] = str(e)
                    self._stop.wait(retry_s)

        for kind in KINDS:
            t = threading.Thread(target=loop, args=(kind,), name=f"watch-{self.cluster}-{kind}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
