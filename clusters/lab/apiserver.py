"""The emulated Kubernetes API server: kmock's KubernetesEmulator behind one small adapter.

The lab and the integration tests need something the *real* `kubernetes` client can list and
watch, so that discovery (`clusters.kube.discovery`) is the same code for lab, kind and real clusters.
kmock 0.8 is an in-memory API server over aiohttp; this module is the only one that imports it,
runs it on its own event loop in a daemon thread (callers are synchronous), and papers over its
caveats:

- an object's namespace is not filled in from the URL: `apply()` writes `metadata.namespace`;
- `resourceVersion` is a placeholder: we stamp `metadata.resourceVersion` with our own counter so
  logs can tell versions apart (discovery never relies on it);
- label selectors are ignored: filtering happens in `clusters.kube.discovery`;
- patches are plain merges: `apply()` replaces an object by deleting and re-creating it when
  the caller asks for `replace=True` (lists inside an object cannot shrink through a merge);
- its URL parser cannot read `/api/v1/namespaces[/NAME]` (it takes "namespaces" as the start of
  a namespaced path and fails): `_namespaces_rewrite` maps those paths onto a private
  cluster-scoped resource before kmock parses them, so Namespaces list and watch like the rest;
- its discovery documents (`/api`, `/api/v1`, `/apis`, `/apis/<group>/<version>`) leave out
  `namespaced`, `verbs`, the singular kind and a proper `groupVersion`, and its lists carry no
  `kind`/`apiVersion`, so kubectl says "the server doesn't have a resource type": we answer
  discovery ourselves from `_RESOURCES` (`discovery_document`) and stamp `<Kind>List` on lists,
  so `kubectl get pods|services|nodes|namespaces|endpointslices` works against the emulator;
- it has no authentication API: TokenRequest (`POST .../serviceaccounts/<sa>/token`) and
  TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`) are answered here by a
  `clusters.lab.tokens.TokenAuthority` with a key of this server's own, against the Pods it stores,
  so proxies bootstrap with projected ServiceAccount tokens in the lab as on Kubernetes.

`write_kubeconfig()` produces a kubeconfig whose context (`lab-<cluster>` by convention) points
at the server, which is how `ClusterApi(kind=LAB, context=...)` reaches it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from clusters.lab.tokens import TokenAuthority
from ztunnel.api.secret_files import read_secret, write_secret

# (apiVersion, kind) -> (URL prefix, plural, namespaced)
_RESOURCES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Namespace"): ("/api/v1", "namespaces", False),
    ("v1", "Node"): ("/api/v1", "nodes", False),
    ("v1", "Pod"): ("/api/v1", "pods", True),
    ("v1", "Service"): ("/api/v1", "services", True),
    ("discovery.k8s.io/v1", "EndpointSlice"): ("/apis/discovery.k8s.io/v1", "endpointslices", True),
}


class ApiServerError(RuntimeError):
    """The emulated API server refused a request or is not running."""


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    try:
        prefix, plural, namespaced = _RESOURCES[(api_version, kind)]
    except KeyError:
        known = ", ".join(f"{k}({v})" for v, k in _RESOURCES)
        raise ApiServerError(f"kind {kind} ({api_version}) is not served here; known: {known}") from None
    if namespaced and not namespace:
        raise ApiServerError(f"{kind} {name} is namespaced: set metadata.namespace")
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced else f"{prefix}/{plural}"
    return f"{path}/{name}" if name else path


_NS_PRIVATE = "/apis/emulated.meshfed.dev/v1/namespaceobjects"
_SHORT_NAMES = {"namespaces": ["ns"], "nodes": ["no"], "pods": ["po"], "services": ["svc"]}
_VERBS = ["create", "delete", "get", "list", "patch", "watch"]  # what kmock serves
# The Kubernetes version the emulated API server says it is (the version kubectl and kind pin)
VERSION_INFO = {"major": "1", "minor": "33", "gitVersion": "v1.33.1-meshfed-emulated", "platform": "linux/amd64",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "", "compiler": "gc"}


def discovery_document(path: str) -> dict[str, Any] | None:
    """The discovery answer kubectl and client-go expect for `path`, or None when it is not a
    discovery path. Built from `_RESOURCES`, so only kinds we serve are advertised."""
    p = "/" + path.strip("/")
    if p == "/version":  # what `kubectl version` and discovery heartbeats read
        return dict(VERSION_INFO)
    if p == "/api":
        return {"kind": "APIVersions", "apiVersion": "v1", "versions": ["v1"],
                "serverAddressByClientCIDRs": []}
    groups: dict[str, list[tuple[str, str, bool, str]]] = {}
    for (api_version, kind), (prefix, plural, namespaced) in _RESOURCES.items():
        groups.setdefault(api_version, []).append((prefix, plural, namespaced, kind))
    if p == "/apis":
        named = sorted(gv for gv in groups if "/" in gv)
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
             "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}} for gv in named]}
    for gv, entries in groups.items():
        if p == entries[0][0]:
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": [
                {"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                 "verbs": _VERBS, "shortNames": _SHORT_NAMES.get(plural, [])}
                for _prefix, plural, namespaced, kind in sorted(entries)]}
    return None


def _list_kind(path: str) -> tuple[str, str] | None:
    """(apiVersion, "<Kind>List") when `path` is a collection of a served kind, else None."""
    parts = "/" + path.strip("/")
    for (api_version, kind), (prefix, plural, namespaced) in _RESOURCES.items():
        if not parts.startswith(prefix + "/"):
            continue
        rest = parts[len(prefix) + 1:].split("/")
        if rest == [plural] or (namespaced and len(rest) == 3 and rest[0] == "namespaces" and rest[2] == plural):
            return api_version, f"{kind}List"
    return None


def _namespaces_rewrite(path: str) -> str | None:
    """`/api/v1/namespaces` and `/api/v1/namespaces/NAME` -> the private resource; else None."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return _NS_PRIVATE + ("/" + parts[3] if len(parts) == 4 else "")
    return None


async def _answer_tokens(raw_request: Any, tokens: TokenAuthority) -> Any:
    """TokenRequest and TokenReview (see `clusters.lab.tokens`), or None for any other request.
    Pods are looked up with a GET to this very server, like every other read (a request whose body
    was read cannot be handed on to kmock)."""
    import aiohttp
    from aiohttp import web

    from clusters.lab.tokens import TOKEN_REQUEST_PATH, TOKEN_REVIEW_PATH, TokenRequestError

    path = "/" + raw_request.path.strip("/")
    request_match = TOKEN_REQUEST_PATH.fullmatch(path)
    if raw_request.method != "POST" or (request_match is None and path != TOKEN_REVIEW_PATH):
        return None
    try:
        body = json.loads(await raw_request.read() or b"{}")
    except ValueError:
        return web.json_response({"kind": "Status", "status": "Failure", "message": "body is not JSON",
                                  "code": 400}, status=400)
    pods: dict[tuple[str, str], Any] = {}
    wanted = _pods_named(body, request_match)
    if wanted:
        origin = str(raw_request.url.origin())
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for ns, name in wanted:
                async with http.get(f"{origin}/api/v1/namespaces/{ns}/pods/{name}") as got:
                    if got.status == 200:
                        pods[(ns, name)] = await got.json(content_type=None)

    def find_pod(ns: str, name: str) -> Any:
        return pods.get((ns, name))

    if request_match is not None:
        try:
            answer = tokens.token_request(request_match.group(1), request_match.group(2), body, find_pod)
        except TokenRequestError as e:
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": str(e),
                                      "code": e.status}, status=e.status)
        return web.json_response(answer, status=201)
    return web.json_response(tokens.token_review(body, find_pod), status=201)


def _pods_named(body: Any, request_match: Any) -> list[tuple[str, str]]:
    """The pods a token request binds to, or the pod a reviewed token claims (read unverified
    here only to know which pod to fetch; the review verifies the token before trusting it)."""
    from clusters.lab.tokens import claims_unverified

    spec = body.get("spec") or {} if isinstance(body, dict) else {}
    if request_match is not None:
        ref = spec.get("boundObjectRef") or {}
        return [(request_match.group(1), str(ref.get("name")))] if ref.get("kind") == "Pod" and ref.get("name") else []
    k8s = claims_unverified(str(spec.get("token") or "")).get("kubernetes.io") or {}
    pod = k8s.get("pod") or {}
    ns, name = str(k8s.get("namespace") or ""), str(pod.get("name") or "")
    return [(ns, name)] if _is_name(ns) and _is_name(name) else []


_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


def _is_name(text: str) -> bool:
    return bool(_NAME.fullmatch(text))


def _server_cls_with_namespaces(refusals: dict[str, int] | None = None,
                                tokens: TokenAuthority | None = None) -> Any:
    from aiohttp import web
    from aiohttp.test_utils import RawTestServer

    refused = refusals if refusals is not None else {}

    def make(handler: Any, **kw: Any) -> Any:
        async def wrapped(raw_request: Any) -> Any:
            path = raw_request.path
            for prefix, status in list(refused.items()):
                if path.startswith(prefix):  # an injected fault: this part of the API refuses
                    return web.json_response({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                                              "code": status, "reason": "Forbidden" if status == 403 else "Refused",
                                              "message": f"{path} refused (fault injected)"}, status=status)
            if tokens is not None:
                answered = await _answer_tokens(raw_request, tokens)
                if answered is not None:
                    return answered
            if raw_request.method == "GET":
                doc = discovery_document(path)
                if doc is not None:
                    return web.json_response(doc)
            list_kind = _list_kind(path) if raw_request.method == "GET" and \
                raw_request.query.get("watch") not in ("true", "1") else None
            new_path = _namespaces_rewrite(path)
            if new_path is not None:
                query = raw_request.query_string
                raw_request = raw_request.clone(rel_url=new_path + (f"?{query}" if query else ""))
            resp = await handler(raw_request)
            if list_kind is not None and isinstance(resp, web.Response) and isinstance(resp.body, bytes):
                try:
                    body = json.loads(resp.body)
                except ValueError:
                    return resp
                if isinstance(body, dict) and "items" in body and not body.get("kind"):
                    body["apiVersion"], body["kind"] = list_kind
                    return web.json_response(body, status=resp.status)
            return resp

        return RawTestServer(wrapped, **kw)

    return make


class EmulatedApiServer:
    """One emulated API server on 127.0.0.1 (or `host`), started and stopped explicitly.

    Invariants: `url` is valid between `start()` and `stop()`; all mutations go through HTTP so
    that watchers see ADDED/MODIFIED/DELETED events exactly as a real client's writes would cause.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._host, self._port = host, port
        # this server's ServiceAccount token signer (its own key: other servers' tokens do not verify)
        self.tokens = TokenAuthority(f"https://kubernetes.default.svc/emulated/{secrets.token_hex(6)}", clock=clock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._url = ""
        self._rv = itertools.count(1)
        self._refusals: dict[str, int] = {}   # path prefix -> HTTP status (faults; read by the request wrapper)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> EmulatedApiServer:
        if self._thread is not None:
            raise ApiServerError("the emulated API server is already started")
        self._thread = threading.Thread(target=self._run, name="kmock-apiserver", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise ApiServerError(f"the emulated API server did not start within {timeout_s:.0f} s")
        if self._error is not None:
            raise ApiServerError(f"the emulated API server failed to start: {self._error}") from self._error
        return self

    def _run(self) -> None:
        import kmock  # the only import of kmock in the code base

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            kwargs: dict[str, Any] = {"host": self._host}
            if self._port is not None:
                kwargs["port"] = self._port
            kwargs["server_cls"] = _server_cls_with_namespaces(self._refusals, self.tokens)
            async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator, **kwargs) as srv:
                self._url = f"http://{self._host}:{srv.port}"
                self._ready.set()
                await self._stop.wait()

        try:
            asyncio.run(serve())
        except BaseException as e:  # reported to start(); the thread ends either way
            self._error = e
            self._ready.set()

    def stop(self, timeout_s: float = 1.0) -> None:
        # Open watch streams make aiohttp linger on shutdown; the thread is a daemon, so we wait
        # briefly and let the process reap it rather than block callers for seconds.
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        self._thread = None

    def refuse(self, path_prefix: str, status: int = 403) -> None:
        """Answer every request under `path_prefix` with `status` (e.g. RBAC taking away
        EndpointSlices: `refuse("/apis/discovery.k8s.io")`) until `allow`."""
        self._refusals[path_prefix] = status

    def allow(self, path_prefix: str | None = None) -> None:
        if path_prefix is None:
            self._refusals.clear()
        else:
            self._refusals.pop(path_prefix, None)

    def __enter__(self) -> EmulatedApiServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if not self._url:
            raise ApiServerError("the emulated API server is not running; call start() first")
        return self._url

    # --- kubeconfig -------------------------------------------------------------------------------

    def kubeconfig(self, context: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": {"token": "emulated"}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
            "current-context": context,
        }

    def write_kubeconfig(self, path: str | os.PathLike[str], context: str) -> Path:
        """Write (or merge into) a kubeconfig file so that `context` points at this server.

        A kubeconfig carries credentials: it is read and written as a secret (0600, atomic, never
        through a link; `ztunnel.api.secret_files`)."""
        p = Path(path)
        existing: dict[str, Any] = {}
        if p.exists() or p.is_symlink():
            # kubeconfig is YAML, and JSON is YAML: we only ever write JSON here.
            existing = json.loads(read_secret(p) or b"{}")
        write_secret(p, json.dumps(merge_kubeconfig(existing, self.kubeconfig(context)), indent=1).encode())
        return p

    # --- objects ----------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/merge-patch+json" if method == "PATCH" else "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"{}")  # type: ignore[no-any-return]
        except urllib.error.HTTPError as e:
            raise ApiServerError(f"{method} {path}: HTTP {e.code}: {e.read()[:300]!r}") from e

    def apply(self, obj: Mapping[str, Any], replace: bool = False) -> dict[str, Any]:
        """Create `obj`, or merge it into the existing object (or replace it with `replace=True`)."""
        meta = dict(obj.get("metadata", {}))
        name, namespace = meta.get("name"), meta.get("namespace")
        if not name:
            raise ApiServerError(f"{obj.get('kind')} without metadata.name")
        meta["resourceVersion"] = str(next(self._rv))
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        body = {**obj, "metadata": meta}
        api_version, kind = str(obj.get("apiVersion", "v1")), str(obj.get("kind"))
        path = object_path(api_version, kind, namespace, name)
        exists = True
        try:
            self._request("GET", path)
        except ApiServerError:
            exists = False
        if exists and replace:
            self._request("DELETE", path)
            exists = False
        if exists:
            return self._request("PATCH", path, body)
        return self._request("POST", object_path(api_version, kind, namespace), body)

    def request_token(self, namespace: str, service_account: str, pod: str, audiences: list[str],
                      expiration_s: int = 3600) -> tuple[str, float]:
        """TokenRequest, as a kubelet makes it for a pod's projected token: (token, expires at, epoch s).
        Goes through HTTP like every write, so what it exercises is what a client would."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": audiences, "expirationSeconds": expiration_s,
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod}}}
        answer = self._request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token", body)
        status = answer.get("status") or {}
        token = str(status.get("token") or "")
        if not token:
            raise ApiServerError(f"TokenRequest for {namespace}/{service_account} (pod {pod}) returned no token")
        return token, self.tokens.expiry_of(token)

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        self._request("DELETE", object_path(api_version, kind, namespace, name))

    def seed(self, objects: list[dict[str, Any]]) -> None:
        for obj in objects:
            self.apply(obj, replace=True)

    def list(self, api_version: str, kind: str) -> list[dict[str, Any]]:
        prefix, plural, _ = _RESOURCES[(api_version, kind)]
        return list(self._request("GET", f"{prefix}/{plural}").get("items", []))


def merge_kubeconfig(base: Mapping[str, Any], mine: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with the clusters, users and contexts of `mine` added (same names replaced); the
    current context stays `base`'s if it has one (pure)."""
    out: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", **base}
    for section in ("clusters", "users", "contexts"):
        names = {e.get("name") for e in mine.get(section, [])}
        out[section] = [e for e in base.get(section, []) if e.get("name") not in names] + list(mine.get(section, []))
    if not out.get("current-context"):
        out["current-context"] = mine.get("current-context", "")
    return out


def main() -> None:  # pragma: no cover - exercised by the lab
    """`python -m clusters.lab.apiserver --port 0 --kubeconfig F --context lab-a`: serve until killed."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(description="serve an emulated Kubernetes API (kmock)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--context", required=True)
    args = ap.parse_args()
    srv = EmulatedApiServer(args.host, args.port or None).start()
    srv.write_kubeconfig(args.kubeconfig, args.context)
    print(srv.url, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    srv.stop()


if __name__ == "__main__":  # pragma: no cover
    main()


# --- objects from an observation (the lab model -> Kubernetes objects) ---------------------------


def objects_from_observation(obs: Any) -> list[dict[str, Any]]:
    """Nodes, Namespaces, Services, Pods and one EndpointSlice per Service that, discovered by
    `clusters.kube.discovery`, give back `obs` (a `ClusterObservation`). The lab seeds its API servers so."""
    out: list[dict[str, Any]] = []
    for n in obs.nodes:
        labels = dict(n.labels)
        if n.region:
            labels["topology.kubernetes.io/region"] = n.region
        if n.zone:
            labels["topology.kubernetes.io/zone"] = n.zone
        out.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name, "labels": labels},
                    "status": {"addresses": [{"type": "InternalIP", "address": n.address}],
                               "conditions": [{"type": "Ready", "status": "True" if n.ready else "False"}]}})
    namespaces = sorted({s.namespace for s in obs.services} | {e.namespace for e in obs.endpoints})
    out.extend({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in namespaces)
    for s in obs.services:
        out.append({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": s.name, "namespace": s.namespace, "labels": dict(s.labels)},
                    "spec": {"clusterIP": s.cluster_ip or None,
                             "ports": [{"name": p.name, "port": p.port, "targetPort": p.target_port,
                                        "protocol": p.protocol} for p in s.ports]}})
    by_service: dict[tuple[str, str], list[Any]] = {}
    for e in obs.endpoints:
        out.append({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": e.pod, "namespace": e.namespace, "labels": dict(e.labels)},
                    "spec": {"nodeName": e.node, "serviceAccountName": e.service_account,
                             "containers": [{"name": "app", "image": "meshfed/demo"}]},
                    "status": {"podIP": e.address, "phase": "Running"}})
        if e.service:
            by_service.setdefault((e.namespace, e.service), []).append(e)
    for (ns, svc), eps in sorted(by_service.items()):
        out.append(endpoint_slice(ns, svc, eps))
    return out


def endpoint_slice(ns: str, svc: str, eps: list[Any]) -> dict[str, Any]:
    """The EndpointSlice of a service from its `EndpointInfo`s (name `<svc>-meshfed`)."""
    ports = eps[0].ports if eps else ()
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-meshfed", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [e.address], "nodeName": e.node, "zone": e.zone or None,
                           "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                           "targetRef": {"kind": "Pod", "name": e.pod, "namespace": e.namespace}} for e in eps],
            "ports": [{"name": p.name, "port": p.target_port, "protocol": p.protocol} for p in ports]}
