"""Kubernetes objects for the fleet's Gateways in one cluster: waypoints and ingress gateways.

    waypoint_objects(snapshot, cluster) -> [ServiceAccount, Deployment, Service] per Gateway that
    runs in the cluster (`meshfed.dev/clusters`, default every cluster)

Pure, plain dicts in apply order. The processes are the lab's: `python -m ztunnel` joining the
controller as `waypoint/<cluster>/<ns>/<name>` (or `ingress/...`), which tells it the mode. What
Istio's gateway controller deploys for a Gateway, in the same shape:

- ServiceAccount `<name>` (waypoint) / `<name>-istio` (ingress gateway): the SPIFFE identity
  the controller renders for it (`federation.core.render_l7.gateway_identity_of`);
- Deployment `<name>`: pods labelled `gateway.networking.k8s.io/gateway-name: <name>` (how
  discovery finds their addresses) and `istio.io/dataplane-mode: none` (never captured: they are
  proxies); ready once the proxy serves (its `--ready-file`, an exec probe: the admin port stays on
  loopback); the controller's roots from the ConfigMap `meshfed-controller-roots` of the Gateway's
  namespace, the proxy's first certificate bought with a projected ServiceAccount token
  (audience `meshfed-controller`);
- Service: a waypoint's `<name>` on 15008 (HBONE, what `istioctl waypoint apply` creates); an ingress
  gateway's `<name>-istio`, type LoadBalancer, one port per listener.

The kind manifests module (`clusters.kind.manifests`, on its own branch when this was written) is
meant to append these to each member cluster's objects; the ConfigMap of roots must then be copied
into each namespace that runs a Gateway.
"""

from __future__ import annotations

from typing import Any

from gitops.model import (
    GATEWAY_NAME_LABEL,
    ConfigSnapshot,
    Gateway,
    gateway_pod_labels,
    gateway_service_account,
)
from ztunnel.api.ports import ADMIN_PORT, HBONE_PORT

DEFAULT_IMAGE = "meshfed/meshfed:0.1.0"
DEFAULT_CONTROLLER = "meshfed-controller.meshfed-system.svc.cluster.local"
CONTROLLER_GRPC_PORT = 15012
CONTROLLER_BOOTSTRAP_PORT = 15013
ROOTS_CONFIGMAP = "meshfed-controller-roots"
TOKEN_AUDIENCE = "meshfed-controller"
READY_FILE = "/run/meshfed/ready"


def proxy_id_of(gw: Gateway, cluster: str) -> str:
    return f"{'waypoint' if gw.is_waypoint else 'ingress'}/{cluster}/{gw.namespace}/{gw.name}"


def _meta(name: str, namespace: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "meshfed", **(labels or {})}}


def gateway_args(gw: Gateway, cluster: str, trust_domain: str, controller: str = DEFAULT_CONTROLLER) -> list[str]:
    """The proxy's command line (`python -m ztunnel ...`), the lab's flags for a proxy pod."""
    return ["python", "-m", "ztunnel", "--cert-dir", "/run/meshfed/certs", "--state-dir", "/run/meshfed/state",
            "--hbone", f"0.0.0.0:{HBONE_PORT}", "--admin", f"127.0.0.1:{ADMIN_PORT}", "--socks", "",
            "--proxy-id", proxy_id_of(gw, cluster), "--trust-domain", trust_domain,
            "--controller", f"{controller}:{CONTROLLER_GRPC_PORT}",
            "--bootstrap", f"{controller}:{CONTROLLER_BOOTSTRAP_PORT}",
            "--bootstrap-token-file", "/var/run/secrets/meshfed/token",
            "--controller-roots", f"/etc/meshfed/roots/{ROOTS_CONFIGMAP}.pem", "--ready-file", READY_FILE]


def gateway_objects(gw: Gateway, cluster: str, trust_domain: str, image: str = DEFAULT_IMAGE,
                    controller: str = DEFAULT_CONTROLLER) -> list[dict[str, Any]]:
    sa = gateway_service_account(gw)
    labels = gateway_pod_labels(gw)
    ports = [{"name": "hbone", "containerPort": HBONE_PORT}] if gw.is_waypoint else [
        {"name": x.name, "containerPort": x.port} for x in gw.listeners]
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(gw.name, gw.namespace, labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: gw.name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": sa,
                    "containers": [{
                        "name": "proxy", "image": image, "args": gateway_args(gw, cluster, trust_domain, controller),
                        "ports": ports,
                        "readinessProbe": {"exec": {"command": ["test", "-f", READY_FILE]}, "periodSeconds": 2},
                        "volumeMounts": [
                            {"name": "run", "mountPath": "/run/meshfed"},
                            {"name": "roots", "mountPath": "/etc/meshfed/roots", "readOnly": True},
                            {"name": "token", "mountPath": "/var/run/secrets/meshfed", "readOnly": True},
                        ],
                    }],
                    "volumes": [
                        {"name": "run", "emptyDir": {}},
                        {"name": "roots", "configMap": {"name": ROOTS_CONFIGMAP,
                                                        "items": [{"key": "roots.pem",
                                                                   "path": f"{ROOTS_CONFIGMAP}.pem"}]}},
                        {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}},
                    ],
                },
            },
        },
    }
    if gw.is_waypoint:
        service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(gw.name, gw.namespace, labels),
                   "spec": {"selector": {GATEWAY_NAME_LABEL: gw.name},
                            "ports": [{"name": "mesh", "port": HBONE_PORT, "targetPort": HBONE_PORT,
                                       "protocol": "TCP"}]}}
    else:
        service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(sa, gw.namespace, labels),
                   "spec": {"type": "LoadBalancer", "selector": {GATEWAY_NAME_LABEL: gw.name},
                            "ports": [{"name": x.name, "port": x.port, "targetPort": x.port, "protocol": "TCP"}
                                      for x in gw.listeners]}}
    return [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(sa, gw.namespace)}, deployment, service]


def waypoint_objects(snapshot: ConfigSnapshot, cluster: str, image: str = DEFAULT_IMAGE,
                     controller: str = DEFAULT_CONTROLLER) -> list[dict[str, Any]]:
    """Every Gateway of the fleet that runs in `cluster`, as Kubernetes objects (apply order)."""
    c = snapshot.clusters.get(cluster)
    if c is None:
        raise KeyError(f"no cluster {cluster!r} in the fleet repo (clusters: {', '.join(snapshot.clusters)})")
    out: list[dict[str, Any]] = []
    for gw in snapshot.gateways.values():
        if gw.runs_in(cluster):
            out += gateway_objects(gw, cluster, c.trust_domain, image, controller)
    return out
