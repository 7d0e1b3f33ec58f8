"""Writing objects into a cluster: `meshfed install` (without --print) and the kind provider.

The other half of the one doorway to `kubernetes` (discovery reads, this writes). Each object is
sent as a server-side apply (`PATCH` with `application/apply-patch+yaml`, field manager `meshfed`,
forced: meshfed owns what it renders), which creates or updates it in one request on a real API
server. A server without server-side apply (the lab's emulated one) answers the PATCH of a missing
object with 404: then the object is created with POST, and an existing one is merged.

Paths come from the object's apiVersion and kind through `RESOURCES` (the kinds meshfed renders);
any other kind is refused with the list, rather than guessed at.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from clusters.kube.discovery import DiscoveryError, api_client

FIELD_MANAGER = "meshfed"

# (apiVersion, kind) -> (URL prefix, plural, namespaced): what `clusters.kind.manifests` renders
RESOURCES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Namespace"): ("/api/v1", "namespaces", False),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
    ("v1", "Secret"): ("/api/v1", "secrets", True),
    ("v1", "Service"): ("/api/v1", "services", True),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims", True),
    ("apps/v1", "DaemonSet"): ("/apis/apps/v1", "daemonsets", True),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"):
        ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    ("metallb.io/v1beta1", "IPAddressPool"): ("/apis/metallb.io/v1beta1", "ipaddresspools", True),
    ("metallb.io/v1beta1", "L2Advertisement"): ("/apis/metallb.io/v1beta1", "l2advertisements", True),
}


class ApplyError(RuntimeError):
    """An object could not be applied; the message names it and what the server said."""


@dataclass(frozen=True, slots=True)
class Applied:
    kind: str
    namespace: str
    name: str
    action: str  # "applied" (server-side apply) | "created" | "merged"

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind.lower()}/{where}{self.name} {self.action}"


def object_url(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(collection URL, object URL) of `obj`."""
    api_version, kind = str(obj.get("apiVersion")), str(obj.get("kind"))
    meta = obj.get("metadata") or {}
    name, namespace = meta.get("name"), meta.get("namespace")
    try:
        prefix, plural, namespaced = RESOURCES[(api_version, kind)]
    except KeyError:
        known = ", ".join(f"{k} ({v})" for v, k in sorted(RESOURCES))
        raise ApplyError(f"{kind} ({api_version}) is not a kind meshfed applies; known: {known}") from None
    if not name:
        raise ApplyError(f"{kind} without metadata.name")
    if namespaced and not namespace:
        raise ApplyError(f"{kind} {name} is namespaced: set metadata.namespace")
    collection = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced else f"{prefix}/{plural}"
    return collection, f"{collection}/{name}"


def apply_objects(kubeconfig: str | None, context: str, objects: Iterable[Mapping[str, Any]],
                  timeout_s: float = 30.0) -> list[Applied]:
    """Apply `objects` in order to the cluster behind `context`; stops at the first failure."""
    from kubernetes.client.exceptions import ApiException

    api = api_client(kubeconfig, context)
    done: list[Applied] = []

    def call(method: str, path: str, body: Any, content_type: str, query: list[tuple[str, str]] | None = None) -> None:
        # the generated client's three steps (serialize with auth, send, check), for any path
        m, url, headers, data, _post = api.param_serialize(
            method=method, resource_path=path, query_params=query or [], body=body,
            header_params={"Content-Type": content_type, "Accept": "application/json"}, auth_settings=["BearerToken"])
        resp = api.call_api(m, url, header_params=headers, body=data, _request_timeout=timeout_s)
        resp.read()
        if not 200 <= resp.status < 300:
            raise ApiException(http_resp=resp)

    for obj in objects:
        collection, url = object_url(obj)
        meta = obj.get("metadata") or {}
        ident = (str(obj.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))
        try:
            try:
                call("PATCH", url, json.dumps(obj), "application/apply-patch+yaml",  # JSON is YAML
                     [("fieldManager", FIELD_MANAGER), ("force", "true")])
                done.append(Applied(*ident, "applied"))
                continue
            except ApiException as e:
                if e.status not in (404, 415):  # 404: no server-side apply here; 415: not this patch type
                    raise
            try:
                call("POST", collection, dict(obj), "application/json")
                done.append(Applied(*ident, "created"))
            except ApiException as e:
                if e.status != 409:
                    raise
                call("PATCH", url, dict(obj), "application/merge-patch+json")
                done.append(Applied(*ident, "merged"))
        except ApiException as e:
            raise ApplyError(f"{ident[0]} {'/'.join(p for p in ident[1:] if p)} through context {context!r}: "
                             f"HTTP {e.status} {e.reason}: {str(e.body or '')[:300]}") from e
        except DiscoveryError:
            raise
        except Exception as e:  # connection refused, TLS, timeouts
            raise ApplyError(f"cannot reach the API server behind context {context!r} ({e}); is the cluster up?") from e
    return done
