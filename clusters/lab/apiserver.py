"""The emulated Kubernetes API server: kmock's KubernetesEmulator behind one small adapter.

The lab and the integration tests need something the *real* `kubernetes` client and kubectl can
list, watch and apply to, so that discovery (`clusters.kube.discovery`) and `meshfed install` are
the same code for lab, kind and real clusters. kmock 0.8 is an in-memory API server over aiohttp;
this module is the only one that imports it, runs it on its own event loop in a daemon thread
(callers are synchronous), and papers over its caveats. Writes go to kmock (it stores, merges
patches, answers 404/409); reads are served from our `Journal` of what the writes produced:

- `resourceVersion`: kmock keeps a placeholder. Every write that kmock accepts is recorded in the
  journal with the next number of one server-wide counter, stamped on the object as Kubernetes
  does; lists carry the counter in `metadata.resourceVersion`;
- watches follow Kubernetes: from `resourceVersion` N they replay the journal's events after N
  (410 Gone as an ERROR event when N is older than the journal keeps, like a compacted etcd), from
  "" or "0" they start with ADDED for every current object; `allowWatchBookmarks` adds a BOOKMARK
  every `bookmark_interval_s`; `timeoutSeconds` ends the stream;
- label selectors (`labelSelector`, kubectl's grammar) are evaluated by the server, on lists and on
  watches, where an object that stops matching is seen as DELETED and one that starts matching as
  ADDED (what a real API server sends); `fieldSelector` supports metadata.name/metadata.namespace;
- an object's namespace is filled in from the URL; `uid` and `creationTimestamp` are set at
  creation and kept across patches;
- patches are plain merges (a strategic merge patch is stored as a merge): `apply()` replaces an
  object by deleting and re-creating it when the caller asks for `replace=True`; PUT is refused
  with a hint (kubectl apply and the client's patch calls never PUT);
- its URL parser cannot read `/api/v1/namespaces[/NAME]` (it takes "namespaces" as the start of
  a namespaced path and fails): `_namespaces_rewrite` maps those writes onto a private
  cluster-scoped resource before kmock parses them;
- its discovery documents (`/api`, `/api/v1`, `/apis`, `/apis/<group>/<version>`) leave out
  `namespaced`, `verbs`, the singular kind and a proper `groupVersion`, and its lists carry no
  `kind`/`apiVersion`: we answer discovery ourselves from `_RESOURCES` (`discovery_document`);
- `kubectl get` asks for `application/json;as=Table;g=meta.k8s.io`: pods, nodes, services and
  endpointslices are answered as a Table with the columns of a real cluster (`clusters.lab.tables`;
  READY, STATUS, IP, NODE for pods), other kinds with the plain list (kubectl shows NAME and AGE);
- kubectl apply validates objects; it skips its client-side validation (which needs OpenAPI v2)
  when the server's OpenAPI v3 says the PATCH of a kind takes `fieldValidation`: `openapi_v3`
  says so for every served kind (the emulator does not validate fields: the unit tests check the
  manifests against the real schemas with kubernetes-validate).

Only kinds in `_RESOURCES` are served (the rest answer 404 with the list of what is); and, as a real
API server does for ServiceAccount tokens, TokenRequest (`POST .../serviceaccounts/<sa>/token`) and
TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`), answered by this server's
`clusters.lab.tokens.TokenAuthority` (its own key) against the Pods and ServiceAccounts it stores,
so proxies bootstrap with projected ServiceAccount tokens in the lab as on Kubernetes.

`write_kubeconfig()` produces a kubeconfig whose context (`lab-<cluster>` by convention) points
at the server, which is how `ClusterApi(kind=LAB, context=...)` reaches it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusters.kube.discovery import LabelSelector
from clusters.lab import tables
from clusters.lab.tokens import TokenAuthority
from gitops.model import AMBIENT_LABEL, AMBIENT_VALUE
from ztunnel.api.secret_files import read_secret, write_secret

# (apiVersion, kind) -> (URL prefix, plural, namespaced)
_RESOURCES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Namespace"): ("/api/v1", "namespaces", False),
    ("v1", "Node"): ("/api/v1", "nodes", False),
    ("v1", "Pod"): ("/api/v1", "pods", True),
    ("v1", "Service"): ("/api/v1", "services", True),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
    ("discovery.k8s.io/v1", "EndpointSlice"): ("/apis/discovery.k8s.io/v1", "endpointslices", True),
    ("apps/v1", "DaemonSet"): ("/apis/apps/v1", "daemonsets", True),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"):
        ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
}

MAX_JOURNAL_EVENTS = 10_000        # events kept for watches to resume from (older: 410 Gone)
DEFAULT_BOOKMARK_INTERVAL_S = 5.0  # a real API server sends one about every minute
MAX_WATCH_TIMEOUT_S = 3600
HTTP_GONE = 410


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
_SHORT_NAMES = {"namespaces": ["ns"], "nodes": ["no"], "pods": ["po"], "services": ["svc"],
                "serviceaccounts": ["sa"], "configmaps": ["cm"], "daemonsets": ["ds"], "deployments": ["deploy"]}
_VERBS = ["create", "delete", "get", "list", "patch", "watch"]  # what we serve
# The Kubernetes version the emulated API server says it is (the version kubectl and kind pin)
VERSION_INFO = {"major": "1", "minor": "33", "gitVersion": "v1.33.1-meshfed-emulated", "platform": "linux/amd64",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "", "compiler": "gc"}


def _group_versions() -> dict[str, list[tuple[str, str, bool, str]]]:
    groups: dict[str, list[tuple[str, str, bool, str]]] = {}
    for (api_version, kind), (prefix, plural, namespaced) in _RESOURCES.items():
        groups.setdefault(api_version, []).append((prefix, plural, namespaced, kind))
    return groups


def discovery_document(path: str) -> dict[str, Any] | None:
    """The discovery answer kubectl and client-go expect for `path`, or None when it is not a
    discovery path. Built from `_RESOURCES`, so only kinds we serve are advertised."""
    p = "/" + path.strip("/")
    if p == "/version":  # what `kubectl version` and discovery heartbeats read
        return dict(VERSION_INFO)
    if p == "/api":
        return {"kind": "APIVersions", "apiVersion": "v1", "versions": ["v1"],
                "serverAddressByClientCIDRs": []}
    groups = _group_versions()
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
        if "/" in gv and p == "/apis/" + gv.split("/")[0]:
            group, version = gv.split("/")
            return {"kind": "APIGroup", "apiVersion": "v1", "name": group,
                    "versions": [{"groupVersion": gv, "version": version}],
                    "preferredVersion": {"groupVersion": gv, "version": version}}
    return None


def openapi_v3(path: str) -> dict[str, Any] | None:
    """`/openapi/v3` (the index) and `/openapi/v3/<group-version>`: just enough for kubectl to know
    that every served kind's PATCH takes `fieldValidation` (so kubectl apply leaves validation to
    the server instead of downloading OpenAPI v2). No schemas: the emulator checks no fields."""
    p = "/" + path.strip("/")
    groups = _group_versions()
    if p == "/openapi/v3":
        return {"paths": {entries[0][0].lstrip("/"): {"serverRelativeURL": f"/openapi/v3{entries[0][0]}?hash=emulated"}
                          for entries in groups.values()}}
    for gv, entries in groups.items():
        if p != "/openapi/v3" + entries[0][0]:
            continue
        group, _, version = gv.rpartition("/")
        paths: dict[str, Any] = {}
        for prefix, plural, namespaced, kind in entries:
            item = f"{prefix}/namespaces/{{namespace}}/{plural}/{{name}}" if namespaced else f"{prefix}/{plural}/{{name}}"
            paths[item] = {"patch": {
                "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                               {"name": "fieldManager", "in": "query", "schema": {"type": "string"}}]}}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes (meshfed emulated)", "version": VERSION_INFO["gitVersion"]},
                "paths": paths, "components": {"schemas": {}}}
    return None


def _namespaces_rewrite(path: str) -> str | None:
    """`/api/v1/namespaces` and `/api/v1/namespaces/NAME` -> the private resource; else None."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return _NS_PRIVATE + ("/" + parts[3] if len(parts) == 4 else "")
    return None


# --- requests of served kinds ---------------------------------------------------------------------


ResourceKey = tuple[str, str]  # (apiVersion, kind)
ObjKey = tuple[str, str]       # (namespace or "", name)


@dataclass(frozen=True, slots=True)
class Target:
    """What a request path names: a served kind, in a namespace (or all), maybe one object."""

    resource: ResourceKey
    namespaced: bool
    namespace: str | None
    name: str | None
    subresource: str | None = None


def parse_target(path: str) -> Target | None:
    """`/api/v1/namespaces/shop/pods/x` -> Target(("v1","Pod"), True, "shop", "x"); None when the
    path names no served kind."""
    p = "/" + path.strip("/")
    for key, (prefix, plural, namespaced) in _RESOURCES.items():
        if not p.startswith(prefix + "/"):
            continue
        rest = p[len(prefix) + 1:].split("/")
        ns: str | None = None
        if namespaced and len(rest) >= 3 and rest[0] == "namespaces" and rest[2] == plural:
            ns, rest = rest[1], rest[2:]
        if not rest or rest[0] != plural or len(rest) > 3:
            continue
        if plural == "namespaces" and ns is None and len(rest) >= 3:
            continue  # /api/v1/namespaces/<ns>/<plural>: a namespaced kind, not a Namespace
        return Target(key, namespaced, ns, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None)
    return None


def _field_selector(text: str) -> list[tuple[str, str, bool]]:
    """`metadata.name=x,metadata.namespace!=y` -> [(field, value, equal)]; other fields refused."""
    out = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        equal = "!=" not in term
        field_name, _, value = term.replace("!=", "=").replace("==", "=").partition("=")
        if field_name not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"field selector {field_name!r} is not supported here (metadata.name, metadata.namespace)")
        out.append((field_name, value, equal))
    return out


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _selected(obj: Mapping[str, Any] | None, labels: LabelSelector, fields: list[tuple[str, str, bool]]) -> bool:
    if obj is None:
        return False
    meta = _meta(obj)
    if not labels.matches({str(k): str(v) for k, v in (meta.get("labels") or {}).items()}):
        return False
    return all((str(meta.get(f.split(".")[1]) or "") == v) == eq for f, v, eq in fields)


class Gone(Exception):
    """A watch asked for a resourceVersion older than the journal keeps."""


@dataclass(frozen=True, slots=True)
class JournalEvent:
    rv: int
    resource: ResourceKey
    key: ObjKey
    type: str                            # ADDED | MODIFIED | DELETED
    obj: Mapping[str, Any]               # after (for DELETED: the last state)
    prev: Mapping[str, Any] | None       # before (None for ADDED)


class Journal:
    """Every accepted write, versioned: the read side of the emulator (pure; one event loop uses it).

    Invariants: `rv` is the version of the newest event and what a list reports; `objects` is the
    state after applying every event; `events` holds the newest `max_events` events in order, so
    a watch from version N can be served iff N >= `oldest_rv - 1`.
    """

    def __init__(self, max_events: int = MAX_JOURNAL_EVENTS) -> None:
        self.rv = 0
        self.objects: dict[ResourceKey, dict[ObjKey, dict[str, Any]]] = {}
        self.events: collections.deque[JournalEvent] = collections.deque(maxlen=max_events)

    @property
    def oldest_rv(self) -> int:
        return self.events[0].rv if self.events else self.rv + 1

    def record(self, resource: ResourceKey, type_: str, obj: Mapping[str, Any], namespace: str | None) -> dict[str, Any]:
        """Journal what a write produced; returns the object as readers will see it."""
        meta = dict(_meta(obj))
        if namespace and not meta.get("namespace"):
            meta["namespace"] = namespace
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        bucket = self.objects.setdefault(resource, {})
        prev = bucket.get(key)
        if type_ == "ADDED" or prev is None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        else:  # kmock's patched object lacks what only we added
            for k in ("uid", "creationTimestamp"):
                meta.setdefault(k, _meta(prev).get(k))
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        api_version, kind = resource
        stored = {**obj, "apiVersion": api_version, "kind": kind, "metadata": meta}
        if type_ == "DELETED":
            bucket.pop(key, None)
        else:
            bucket[key] = stored
        self.events.append(JournalEvent(self.rv, resource, key, type_, stored, prev))
        return stored

    def get(self, resource: ResourceKey, key: ObjKey) -> dict[str, Any] | None:
        return self.objects.get(resource, {}).get(key)

    def select(self, resource: ResourceKey, namespace: str | None, labels: LabelSelector,
               fields: list[tuple[str, str, bool]]) -> list[dict[str, Any]]:
        """The current objects a list (or a watch from "now") returns."""
        return [o for k, o in sorted(self.objects.get(resource, {}).items())
                if (namespace is None or k[0] == namespace) and _selected(o, labels, fields)]

    def since(self, resource: ResourceKey, rv: int, namespace: str | None, labels: LabelSelector,
              fields: list[tuple[str, str, bool]]) -> list[tuple[int, str, dict[str, Any]]]:
        """The watch events after version `rv` as a selecting watcher sees them. Raises Gone."""
        if rv < self.oldest_rv - 1:
            raise Gone(f"too old resource version: {rv} ({self.oldest_rv - 1})")
        newer: list[JournalEvent] = []
        for ev in reversed(self.events):  # newest first, stopping at the watcher's version: O(new events)
            if ev.rv <= rv:
                break
            newer.append(ev)
        out: list[tuple[int, str, dict[str, Any]]] = []
        for ev in reversed(newer):
            if ev.resource != resource or (namespace is not None and ev.key[0] != namespace):
                continue
            was, now = _selected(ev.prev, labels, fields), _selected(ev.obj, labels, fields)
            if ev.type == "DELETED":
                if was or now:
                    out.append((ev.rv, "DELETED", dict(ev.obj)))
            elif now:
                out.append((ev.rv, "MODIFIED" if was else "ADDED", dict(ev.obj)))
            elif was:  # stopped matching: gone for this watcher
                out.append((ev.rv, "DELETED", dict(ev.obj)))
        return out


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


async def _answer_tokens(raw_request: Any, journal: Journal, tokens: TokenAuthority) -> Any:
    """TokenRequest and TokenReview (see `clusters.lab.tokens`), or None for any other request.
    Pods and ServiceAccounts are read from the journal, like every other read."""
    from aiohttp import web

    from clusters.lab.tokens import TOKEN_REQUEST_PATH, TOKEN_REVIEW_PATH, TokenRequestError

    path = "/" + raw_request.path.strip("/")
    request_match = TOKEN_REQUEST_PATH.fullmatch(path)
    if raw_request.method != "POST" or (request_match is None and path != TOKEN_REVIEW_PATH):
        return None
    try:
        body = json.loads(await raw_request.read() or b"{}")
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except ValueError:
        return web.json_response(_status(400, "BadRequest", "the body is not a JSON object"), status=400)

    def find_pod(ns: str, name: str) -> Any:
        return journal.get(("v1", "Pod"), (ns, name))

    if request_match is None:
        return web.json_response(tokens.token_review(body, find_pod), status=201)
    ns, sa = request_match.group(1), request_match.group(2)
    if journal.get(("v1", "ServiceAccount"), (ns, sa)) is None:
        return web.json_response(_status(404, "NotFound", f'serviceaccounts "{sa}" not found'), status=404)
    try:
        return web.json_response(tokens.token_request(ns, sa, body, find_pod), status=201)
    except TokenRequestError as e:
        return web.json_response(_status(e.status, "Invalid" if e.status == 422 else "BadRequest", str(e)),
                                 status=e.status)


def _server_cls(journal: Journal, state: _ServerState) -> Any:
    from aiohttp import web
    from aiohttp.test_utils import RawTestServer

    def fail(code: int, reason: str, message: str) -> Any:
        return web.json_response(_status(code, reason, message), status=code)

    async def read(raw_request: Any, target: Target) -> Any:
        q = raw_request.query
        try:
            labels, fields = LabelSelector(q.get("labelSelector", "")), _field_selector(q.get("fieldSelector", ""))
        except ValueError as e:
            return fail(400, "BadRequest", str(e))
        watching = q.get("watch") in ("true", "1")
        as_table = not watching and tables.wants_table(raw_request.headers.get("Accept", ""))
        api_version, kind = target.resource
        if target.name is not None and not watching:
            obj = journal.get(target.resource, (target.namespace or "", target.name))
            if obj is None:
                return fail(404, "NotFound", f'{target.resource[1].lower()}s "{target.name}" not found')
            doc = tables.table(kind, [obj], time.time(), str(journal.rv), q.get("includeObject", "Metadata")) \
                if as_table else None
            return web.json_response(doc if doc is not None else obj)
        if target.name is not None:
            fields = [*fields, ("metadata.name", target.name, True)]
        if watching:
            return await watch(raw_request, target, labels, fields)
        items = journal.select(target.resource, target.namespace, labels, fields)
        if as_table:  # kubectl get: the columns a real cluster shows (kinds without a printer: the list)
            doc = tables.table(kind, items, time.time(), str(journal.rv), q.get("includeObject", "Metadata"))
            if doc is not None:
                return web.json_response(doc)
        return web.json_response({"apiVersion": api_version, "kind": f"{kind}List",
                                  "metadata": {"resourceVersion": str(journal.rv)}, "items": items})

    async def watch(raw_request: Any, target: Target, labels: LabelSelector,
                    fields: list[tuple[str, str, bool]]) -> Any:
        q = raw_request.query
        try:
            timeout_s = min(float(q.get("timeoutSeconds") or MAX_WATCH_TIMEOUT_S), MAX_WATCH_TIMEOUT_S)
            start_rv = q.get("resourceVersion") or ""
            rv = int(start_rv) if start_rv not in ("", "0") else None
        except ValueError:
            return fail(400, "BadRequest", f"resourceVersion {q.get('resourceVersion')!r} is not a version")
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(raw_request)
        api_version, kind = target.resource
        deadline = time.monotonic() + timeout_s

        async def send(type_: str, obj: Mapping[str, Any]) -> None:
            await resp.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

        if rv is None:  # start from now, with the current state as ADDED
            for obj in journal.select(target.resource, target.namespace, labels, fields):
                await send("ADDED", obj)
            rv = journal.rv
        next_bookmark = time.monotonic() + state.bookmark_interval_s
        while not state.stopping:
            try:
                events = journal.since(target.resource, rv, target.namespace, labels, fields)
            except Gone as e:
                await send("ERROR", _status(HTTP_GONE, "Expired", str(e)))
                break
            for ev_rv, type_, obj in events:
                await send(type_, obj)
                rv = ev_rv
            rv = max(rv, journal.rv)  # nothing of ours in between: the watcher is at the head
            now = time.monotonic()
            if now >= deadline:
                break
            if bookmarks and now >= next_bookmark:
                await send("BOOKMARK", {"apiVersion": api_version, "kind": kind,
                                        "metadata": {"resourceVersion": str(rv)}})
                next_bookmark = now + state.bookmark_interval_s
            wake = min(deadline, next_bookmark if bookmarks else deadline) - now
            async with state.changed:
                try:
                    await asyncio.wait_for(state.changed.wait(), timeout=max(0.01, wake))
                except TimeoutError:
                    pass
        return resp

    async def record_write(raw_request: Any, target: Target, resp: Any) -> Any:
        if not isinstance(resp, web.Response) or not 200 <= resp.status < 300 or not isinstance(resp.body, bytes):
            return resp
        try:
            obj = json.loads(resp.body)
        except ValueError:
            return resp
        if not isinstance(obj, dict) or not _meta(obj).get("name"):
            return resp
        type_ = {"POST": "ADDED", "PATCH": "MODIFIED", "DELETE": "DELETED"}[raw_request.method]
        if type_ == "MODIFIED" and _meta(obj).get("deletionTimestamp") is None and \
                journal.get(target.resource, (target.namespace or "", str(_meta(obj)["name"]))) is None:
            type_ = "ADDED"
        stored = journal.record(target.resource, type_, obj, target.namespace)
        async with state.changed:
            state.changed.notify_all()
        return web.json_response(stored, status=resp.status)

    def make(handler: Any, **kw: Any) -> Any:
        async def wrapped(raw_request: Any) -> Any:
            path, method = raw_request.path, raw_request.method
            for prefix, status in list(state.refusals.items()):
                if path.startswith(prefix):  # an injected fault: this part of the API refuses
                    return fail(status, "Forbidden" if status == 403 else "Refused", f"{path} refused (fault injected)")
            if state.tokens is not None:
                answered = await _answer_tokens(raw_request, journal, state.tokens)
                if answered is not None:
                    return answered
            if method == "GET":
                doc = discovery_document(path) or openapi_v3(path)
                if doc is not None:
                    return web.json_response(doc)
            target = parse_target(path)
            if target is None:
                if path.startswith(("/api/", "/apis/")):
                    known = ", ".join(sorted(p for _, p, _ in _RESOURCES.values()))
                    return fail(404, "NotFound", f"the emulated API server does not serve {path}; it serves: {known}")
                return await handler(raw_request)
            if target.subresource is not None:
                return fail(404, "NotFound", f"subresource {target.subresource!r} is not served by the emulated API server")
            if method == "GET":
                return await read(raw_request, target)
            if method == "PUT":
                return fail(405, "MethodNotAllowed", "the emulated API server does not take PUT (replace); use "
                            "`kubectl apply` or a patch")
            if method not in ("POST", "PATCH", "DELETE"):
                return fail(405, "MethodNotAllowed", f"{method} is not served")
            new_path = _namespaces_rewrite(path)
            if new_path is not None:
                query = raw_request.query_string
                raw_request = raw_request.clone(rel_url=new_path + (f"?{query}" if query else ""))
            async with state.write_lock:  # one write at a time: journal order = kmock's order
                return await record_write(raw_request, target, await handler(raw_request))

        return RawTestServer(wrapped, **kw)

    return make


class _ServerState:
    """Shared by the server's handlers, on its event loop."""

    def __init__(self, bookmark_interval_s: float, refusals: dict[str, int] | None = None,
                 tokens: TokenAuthority | None = None) -> None:
        self.bookmark_interval_s = bookmark_interval_s
        self.tokens = tokens  # ServiceAccount tokens: TokenRequest, TokenReview
        self.refusals = refusals if refusals is not None else {}  # path prefix -> status (injected faults)
        self.changed = asyncio.Condition()
        self.write_lock = asyncio.Lock()
        self.stopping = False


class EmulatedApiServer:
    """One emulated API server on 127.0.0.1 (or `host`), started and stopped explicitly.

    Invariants: `url` is valid between `start()` and `stop()`; all mutations go through HTTP so
    that watchers see ADDED/MODIFIED/DELETED events exactly as a real client's writes would cause.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, *,
                 bookmark_interval_s: float = DEFAULT_BOOKMARK_INTERVAL_S,
                 max_journal_events: int = MAX_JOURNAL_EVENTS,
                 clock: Callable[[], float] = time.time) -> None:
        self._host, self._port = host, port
        # this server's ServiceAccount token signer (its own key: other servers' tokens do not verify)
        self.tokens = TokenAuthority(f"https://kubernetes.default.svc/emulated/{secrets.token_hex(6)}", clock=clock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._state: _ServerState | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._url = ""
        self.bookmark_interval_s = bookmark_interval_s
        self.journal = Journal(max_journal_events)  # read it only through HTTP while running
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
            self._state = _ServerState(self.bookmark_interval_s, self._refusals, self.tokens)
            kwargs["server_cls"] = _server_cls(self.journal, self._state)
            async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator, **kwargs) as srv:
                self._url = f"http://{self._host}:{srv.port}"
                self._ready.set()
                await self._stop.wait()
                self._state.stopping = True  # open watches end instead of holding the server
                async with self._state.changed:
                    self._state.changed.notify_all()

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
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop already ended (the server failed)
                pass
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
        meta.pop("resourceVersion", None)  # the server's to set
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

    def list(self, api_version: str, kind: str, label_selector: str = "") -> list[dict[str, Any]]:
        prefix, plural, _ = _RESOURCES[(api_version, kind)]
        query = f"?labelSelector={urllib.parse.quote(label_selector)}" if label_selector else ""
        return list(self._request("GET", f"{prefix}/{plural}{query}").get("items", []))

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        return self._request("GET", object_path(api_version, kind, namespace, name))


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
    # Enrolled in the mesh (a Cluster's default namespaceSelector), as the lab's namespaces are.
    out.extend({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {AMBIENT_LABEL: AMBIENT_VALUE}}} for ns in namespaces)
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
