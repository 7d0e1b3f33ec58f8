"""Kubernetes discovery: Namespaces, Nodes, Pods, Services and EndpointSlices into ClusterObservation.

The only module that reads clusters through `kubernetes` (`clusters.kube.apply` writes them,
`clusters.kube.auth` asks for TokenReviews). Split in two halves, decide-then-act:

- `ClusterCache` is pure: it holds the raw JSON objects of one cluster by kind, applies watch
  events (`apply_event`) or whole listings (`replace_kind`), and turns them into a
  `ClusterObservation` (`observation(now_s)`). Label selectors are evaluated here too: the
  namespace selector is also sent to the server (Namespaces are listed and watched with it), but
  which Pods, Services and EndpointSlices belong to an enrolled namespace is a join only we can do.
- `KubeDiscovery` does the I/O with the real client from a kubeconfig context (or the pod's own
  service account, `IN_CLUSTER_CONTEXT`): LIST each kind into the cache, then WATCH it from the
  list's resourceVersion with bookmarks, as client-go's reflector does. When a watch ends (server
  timeout) it resumes from the last resourceVersion it saw (an event's or a bookmark's) without
  re-listing; when the server answers 410 Gone (the version was compacted away), or the watch
  failed, it re-LISTs: that is what makes deletions that happened while we were not watching
  visible. Each successful LIST makes the next observation `complete`.

Enrollment (ambient): only namespaces the Cluster's namespaceSelector matches (default
`istio.io/dataplane-mode=ambient`) contribute services and workloads. meshfed's own namespace is
never enrolled, but its east-west gateway Service is read for the gateway's load-balancer address
(`ClusterObservation.gateway_address`; a Cluster without eastWestGateway.address is reached there).

Endpoints are joined here (EndpointSlice endpoint -> its Pod -> its Node) so the core never joins
Pods itself (see `clusters.kube.observation`). Only IPv4 slices are read (the graph is IPv4; a
dual-stack Service's IPv6 slice names the same pods again).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clusters.kube.observation import (
    GATEWAY_SERVICE,
    MESH_NAMESPACE,
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
IN_CLUSTER_CONTEXT = "@in-cluster"  # the context name for "this pod's own cluster" (service account)
HTTP_GONE = 410

log = logging.getLogger(__name__)


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
    gateway_address = load_balancer_address(objects.get("services", {}).get((MESH_NAMESPACE, GATEWAY_SERVICE)))
    services: dict[ObjKey, ServiceInfo] = {}
    for key, raw in sorted(objects.get("services", {}).items()):
        if ns_ok(key[0]) and service_selector.matches(_labels(raw)):
            services[key] = _service_info(raw)
    pods = objects.get("pods", {})
    endpoints: dict[tuple[str, str, str], EndpointInfo] = {}
    for (ns, _slice), raw in sorted(objects.get("endpointslices", {}).items()):
        svc_name = _labels(raw).get(SERVICE_NAME_LABEL)
        if svc_name is None or (ns, svc_name) not in services or raw.get("addressType", "IPv4") != "IPv4":
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
        resource_version=resource_version, gateway_address=gateway_address,
    )


def load_balancer_address(raw: Mapping[str, Any] | None) -> str:
    """The first `status.loadBalancer.ingress` entry's ip (or hostname) of a LoadBalancer Service."""
    if not raw or (raw.get("spec") or {}).get("type") != "LoadBalancer":
        return ""
    for ingress in ((raw.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
        address = str(ingress.get("ip") or ingress.get("hostname") or "")
        if address:
            return address
    return ""


# --- the I/O half -------------------------------------------------------------------------------


def api_client(kubeconfig: str | None, context: str) -> Any:
    from kubernetes import client, config  # the only import of kubernetes for reading

    try:
        if context == IN_CLUSTER_CONTEXT:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except Exception as e:  # the client raises ConfigException, FileNotFoundError, ...
        if context == IN_CLUSTER_CONTEXT:
            raise DiscoveryError(
                f"cannot use the pod's service account ({e}): `--in-cluster` works only inside a pod "
                f"with a mounted service account token; outside, give the cluster a kubeconfig context") from e
        where = kubeconfig or "$KUBECONFIG / ~/.kube/config"
        raise DiscoveryError(
            f"cannot load kubeconfig context {context!r} from {where}: {e}; "
            f"check the cluster's spec.api.context in the fleet repo (for the lab: is its API server running?)"
        ) from e


class KubeDiscovery:
    """List and watch one cluster's API into a `ClusterCache`.

    `on_change(observation)` is called from watch threads after every effective change (callers
    debounce; see `federation.controller.reconciler`). `last_success_s` is the wall clock of the last
    successful LIST, watch event or bookmark, the basis of the cluster's lease.

    Invariant: `_rv[kind]` is the resourceVersion the cache holds `kind` at (from its LIST and every
    event or bookmark since), or None when the next watch must start with a LIST.
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
        self._rv: dict[str, str | None] = {k: None for k in KINDS}
        self.last_success_s: float | None = None
        self.last_error: str = ""
        self.lists = 0        # LIST requests that succeeded (a resumed watch does not list)
        self.resumes = 0      # watches started from a resourceVersion without a LIST
        self.expired = 0      # 410 Gone answers (resourceVersion too old): each costs a re-LIST
        self.bookmarks = 0
        # kind -> why its last LIST/WATCH failed; cleared by a LIST (a failed watch always re-lists)
        self.failing: dict[str, str] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def _client(self) -> Any:
        if self._api is None:
            self._api = api_client(self.kubeconfig, self.context)
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

    def _call(self, kind: str, **kw: Any) -> Any:
        """LIST or WATCH `kind`; Namespaces with the enrollment selector, evaluated by the server.
        Raises ApiException for an answer that is not 2xx (the raw response the client hands back
        with _preload_content=False is not checked: a 403 Status body would read as "no items")."""
        from kubernetes.client.exceptions import ApiException

        if kind == "namespaces" and self.cache.namespace_selector.text:
            kw["label_selector"] = self.cache.namespace_selector.text
        resp = self._list_fn(kind)(_preload_content=False, **kw)
        status = getattr(resp, "status", 200)
        if isinstance(status, int) and not 200 <= status < 300:
            try:
                raise ApiException(http_resp=resp)
            finally:
                resp.close()
        return resp

    def list_kind(self, kind: str) -> bool:
        try:
            resp = self._call(kind, _request_timeout=self.request_timeout_s)
            body = json.loads(resp.data)
        except DiscoveryError:
            raise
        except Exception as e:
            self.last_error = f"LIST {kind} failed: {e}"
            raise DiscoveryError(f"cluster {self.cluster}: cannot list {kind} through context {self.context!r}: {e}; "
                                 f"is the API server reachable?") from e
        with self._lock:
            changed = self.cache.replace_kind(kind, body.get("items") or [])
            self._rv[kind] = str((body.get("metadata") or {}).get("resourceVersion") or "") or None
            self.last_success_s = self._clock()
            self.lists += 1
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

    def resource_version(self, kind: str) -> str | None:
        with self._lock:
            return self._rv[kind]

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
        """WATCH `kind` from where the cache is (LIST first when it has no resourceVersion) until the
        server ends the watch, answers 410 Gone, or `stop()` is called."""
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        rv = self.resource_version(kind)
        if rv is None:
            if self.list_kind(kind):
                on_change()
            rv = self.resource_version(kind)
        else:
            self.resumes += 1
        try:
            resp = self._call(kind, watch=True, resource_version=rv or None, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout_s, _request_timeout=self.watch_timeout_s + 5)
        except ApiException as e:
            if e.status == HTTP_GONE:
                self._expire(kind)
                return
            with self._lock:  # refused (403, 5xx…): see it again from a LIST once it answers
                self._rv[kind] = None
            raise
        except BaseException:
            with self._lock:
                self._rv[kind] = None
            raise
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    break
                if not line.strip():
                    continue
                ev = json.loads(line)
                kind_of_event = str(ev.get("type"))
                raw = ev.get("object")
                if not isinstance(raw, Mapping):
                    continue
                if kind_of_event == "ERROR":
                    if raw.get("code") == HTTP_GONE:
                        self._expire(kind)
                        return
                    raise DiscoveryError(f"cluster {self.cluster}: watch of {kind} failed: {raw.get('message')}")
                new_rv = str((raw.get("metadata") or {}).get("resourceVersion") or "") or None
                with self._lock:
                    self.last_success_s = self._clock()
                    if new_rv is not None:
                        self._rv[kind] = new_rv
                    if kind_of_event == "BOOKMARK":  # the server's "still here, now at version X"
                        self.bookmarks += 1
                        continue
                    changed = self.cache.apply_event(kind, kind_of_event, raw)
                if changed:
                    on_change()
        except BaseException:
            with self._lock:  # where the stream broke is unknown: start over with a LIST
                self._rv[kind] = None
            raise
        finally:
            resp.close()
            resp.release_conn()

    def _expire(self, kind: str) -> None:
        log.debug("cluster %s: watch of %s expired (410 Gone): listing again", self.cluster, kind)
        with self._lock:
            self._rv[kind] = None
            self.expired += 1

    def start(self, on_change: Callable[[ClusterObservation], None], retry_s: float = 1.0) -> None:
        """One daemon thread per kind: LIST+WATCH forever, resuming each watch where the last ended."""

        def loop(kind: str) -> None:
            while not self._stop.is_set():
                try:
                    self.watch_kind_once(kind, lambda: on_change(self.observation()))
                except Exception as e:  # keep watching: the lease (in the agent) tells the rest
                    self.last_error = str(e)
                    with self._lock:
                        first = self.failing.get(kind) != str(e)
                        self.failing[kind] = str(e)
                    # once per distinct error, not once per retry (the agent logs the lease's side)
                    log.log(logging.INFO if first else logging.DEBUG, "cluster %s: watch of %s failed, retrying "
                            "every %.0f s: %s", self.cluster, kind, retry_s, e)
                    self._stop.wait(retry_s)

        for kind in KINDS:
            t = threading.Thread(target=loop, args=(kind,), name=f"watch-{self.cluster}-{kind}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
