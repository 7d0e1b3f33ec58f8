"""The Kubernetes objects that make one fleet cluster a meshfed member, and its demo workloads.

Pure functions, fleet + cluster -> list of objects (plain dicts, in apply order); `meshfed
install --context CTX [--print]` prints or applies them (`clusters.kube.apply`), the kind provider
applies them to each kind cluster. The processes are the ones the lab runs: `python -m ztunnel`
with the lab's flags for node proxies (`--capture` programs the node's iptables from the proxy's
enrolled pods, `ztunnel.proxy.capture_rules`) and gateways, the demo server for workloads.

What a member cluster gets (`member_objects`):

  Namespace meshfed-system         never enrolled; Pod Security "privileged" (the node proxy needs
                                   hostNetwork and NET_ADMIN, which "baseline" forbids)
  ServiceAccounts                  ztunnel, eastwest-gateway (their SPIFFE identities), and
                                   meshfed-controller (discovery, for a controller in this cluster or
                                   a kubeconfig minted with `kubectl create token`)
  ClusterRole meshfed-discovery    get/list/watch pods, services, endpointslices, nodes, namespaces;
  + binding                        create tokenreviews (the controller checks proxies' tokens)
  ConfigMap meshfed-controller-roots   the roots of this cluster's trust domain (the controller's
                                   roots/<td>.pem): what its proxies verify the controller with
  DaemonSet ztunnel                the node proxy: hostNetwork (its HBONE port is the node's
                                   InternalIP:15008, what discovery reports), NET_ADMIN + NET_RAW for
                                   iptables, the node's xtables lock shared with kube-proxy; it
                                   captures its enrolled pods' TCP and DNS and answers global names
  Deployment + Service             the east-west gateway, type LoadBalancer on 15008; its address is
    eastwest-gateway               the fleet's eastWestGateway.address (as loadBalancerIP) or, when
                                   omitted, whatever the LB gives (discovery reads the status)
  per fleet Gateway running here   (`l7_gateway_objects`) what Istio's gateway controller deploys: the
                                   Gateway's namespace (enrolled, so discovery sees its pods), the
                                   roots ConfigMap there, ServiceAccount `<name>` (waypoint) or
                                   `<name>-istio` (ingress), a Deployment running the lab's waypoint
                                   or ingress proxy, and a Service: a waypoint's on 15008 (HBONE), an
                                   ingress gateway's LoadBalancer `<name>-istio` with its listeners

No shared secret anywhere: each proxy presents a projected ServiceAccount token (audience
`meshfed-controller`, expiring, rotated by the kubelet) for its first certificate, which the controller
checks with a TokenReview against this cluster, bound to the node the pod runs on.

The controller runs outside the clusters (kubeconfig contexts; the proxies dial
`InstallOptions.controller`), or in one of them (`controller_objects`: a Deployment running
`meshfed controller run --in-cluster CLUSTER`, its own cluster through its service account, the
others through kubeconfigs in the Secret `meshfed-remote-kubeconfigs`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from clusters.kind.plan import (  # LAB_NODE_LABEL: which LabCluster node a kind worker plays
    KIND_POD_SUBNET,
    LAB_NODE_LABEL,
)
from clusters.kube.observation import GATEWAY_SERVICE, MESH_NAMESPACE
from gitops.model import (
    AMBIENT_LABEL,
    AMBIENT_VALUE,
    GATEWAY_NAME_LABEL,
    Cluster,
    ClusterName,
    ConfigSnapshot,
    Gateway,
    LabCluster,
    LabWorkload,
    gateway_pod_labels,
    gateway_service_account,
)
from ztunnel.api.ports import ADMIN_PORT, DNS_CAPTURE_PORT, HBONE_PORT, OUTBOUND_CAPTURE_PORT

VERSION = "0.1.0"
DEFAULT_IMAGE = f"meshfed/meshfed:{VERSION}"   # built by `meshfed image build`, loaded into each kind cluster
NODE_PROXY = "ztunnel"
CONTROLLER = "meshfed-controller"
DISCOVERY_ROLE = "meshfed-discovery"
ROOTS_CONFIGMAP = "meshfed-controller-roots"
REMOTE_KUBECONFIGS_SECRET = "meshfed-remote-kubeconfigs"
TOKEN_AUDIENCE = "meshfed-controller"            # what the controller's TokenReview asks for
TOKEN_EXPIRATION_S = 3600                      # the kubelet rotates it at 80 % of its life
TOKEN_DIR = "/var/run/secrets/meshfed"
TOKEN_PATH = f"{TOKEN_DIR}/token"
ROOTS_PATH = f"{TOKEN_DIR}/controller-roots.pem"
CONTROLLER_GRPC_PORT, CONTROLLER_BOOTSTRAP_PORT, CONTROLLER_HTTP_PORT = 15012, 15013, 15014
DEFAULT_CONTROLLER = f"{CONTROLLER}.{MESH_NAMESPACE}.svc:{CONTROLLER_GRPC_PORT}"
DEFAULT_BOOTSTRAP = f"{CONTROLLER}.{MESH_NAMESPACE}.svc:{CONTROLLER_BOOTSTRAP_PORT}"
PROXY_PROTOCOL_LABEL = "networking.meshfed.dev/inbound-proxy-protocol"  # clusters.lab.demo_server.PROXY_LABEL
NONROOT_UID = 65532
PART_OF = {"app.kubernetes.io/part-of": "meshfed"}

# The proxy's flag for its pod's projected ServiceAccount token, re-read at every bootstrap (the
# kubelet rotates it); the controller reviews it with this cluster's TokenReview.
TOKEN_FILE_FLAG = "--sa-token-file"


class ManifestError(ValueError):
    """The fleet cannot be rendered for this cluster; the message says what to change."""


@dataclass(frozen=True, slots=True)
class InstallOptions:
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"   # kind-loaded images are not in any registry
    controller: str = DEFAULT_CONTROLLER      # HOST:PORT of the controller's gRPC services, as proxies reach it
    bootstrap: str = DEFAULT_BOOTSTRAP        # HOST:PORT of its certificate service for first certificates
    controller_roots_pem: str = ""            # the cluster's trust domain's roots ("" = fill in later)
    token_audience: str = TOKEN_AUDIENCE
    token_expiration_s: int = TOKEN_EXPIRATION_S


def cluster_for_context(snapshot: ConfigSnapshot, context: str) -> Cluster:
    """The Cluster whose spec.api.context is `context` (or whose name it is)."""
    for c in snapshot.clusters.values():
        if c.api.context == context:
            return c
    if context in snapshot.clusters:
        return snapshot.clusters[context]
    known = ", ".join(f"{c.api.context} ({n})" for n, c in sorted(snapshot.clusters.items()))
    raise ManifestError(f"no Cluster in the fleet has spec.api.context {context!r}; contexts: {known}")


def _meta(name: str, namespace: str | None = MESH_NAMESPACE, labels: Mapping[str, str] | None = None,
          annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {**PART_OF, "app.kubernetes.io/name": name, **(labels or {})}}
    if namespace is not None:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _host_port(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ManifestError(f"{what} {value!r} is not HOST:PORT")
    return value


def _projected_credentials(opts: InstallOptions) -> dict[str, Any]:
    """The proxy's token (audience-bound, expiring) and the controller's roots, in one directory."""
    return {"name": "meshfed-credentials", "projected": {"sources": [
        {"serviceAccountToken": {"audience": opts.token_audience, "expirationSeconds": opts.token_expiration_s,
                                 "path": "token"}},
        {"configMap": {"name": ROOTS_CONFIGMAP, "items": [{"key": "roots.pem", "path": "controller-roots.pem"}]}},
    ]}}


def _proxy_args(proxy_id: str, cluster: Cluster, opts: InstallOptions, node: bool) -> list[str]:
    """The argv after `python -m ztunnel`: the lab's flags (clusters.lab.commands.proxy_argv) with
    in-pod paths; a node proxy captures (`--capture`), a gateway has no local clients."""
    args = ["--proxy-id", proxy_id, "--trust-domain", str(cluster.trust_domain),
            "--cert-dir", "/var/lib/meshfed/certs", "--state-dir", "/var/lib/meshfed/state",
            "--hbone", f"0.0.0.0:{HBONE_PORT}", "--admin", f"127.0.0.1:{ADMIN_PORT}",
            "--controller", _host_port(opts.controller, "--controller"),
            "--bootstrap", _host_port(opts.bootstrap, "--bootstrap"),
            TOKEN_FILE_FLAG, TOKEN_PATH, "--controller-roots", ROOTS_PATH]
    if node:
        # DNS: the enrolled pods' udp/tcp 53 is redirected (REDIRECT: to the address of the interface
        # it came in on, the pod's veth) to the responder on every address; names the mesh does not
        # know go to the cluster's DNS (the container's resolv.conf, dnsPolicy ClusterFirstWithHostNet).
        # Listening on every address of the node, it answers only its captured pods and this cluster's
        # pod network (`ztunnel.dns.clients`): never the node network or the LAN (an open resolver)
        pod_cidrs = list(cluster.pod_cidrs) or [KIND_POD_SUBNET]
        return [*args, "--socks", "", "--transparent", f"0.0.0.0:{OUTBOUND_CAPTURE_PORT}", "--capture",
                "--dns", f"0.0.0.0:{DNS_CAPTURE_PORT}", "--dns-upstream", "resolv.conf",
                *(a for cidr in pod_cidrs for a in ("--dns-allow-from", str(cidr)))]
    return [*args, "--socks", ""]


def _container(name: str, opts: InstallOptions, args: Sequence[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": opts.image, "imagePullPolicy": opts.image_pull_policy,
            "command": ["python", "-m", "ztunnel"], "args": list(args), **extra}


def node_proxy_daemonset(cluster: Cluster, opts: InstallOptions) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": NODE_PROXY}
    container = _container(
        NODE_PROXY, opts, _proxy_args(f"ztunnel/{cluster.name}/$(NODE_NAME)", cluster, opts, node=True),
        env=[{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        ports=[{"name": "tls-hbone", "containerPort": HBONE_PORT, "protocol": "TCP"}],
        # iptables needs root in the node's namespace; nothing else: no privileged, no escalation
        securityContext={"privileged": False, "allowPrivilegeEscalation": False, "runAsUser": 0,
                         "runAsNonRoot": False, "readOnlyRootFilesystem": True,
                         "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}},
        # hostNetwork: the kubelet probes from the node, so the proxy's loopback admin port is reachable
        readinessProbe={"httpGet": {"host": "127.0.0.1", "path": "/ready", "port": ADMIN_PORT},
                        "periodSeconds": 2, "failureThreshold": 3},
        resources={"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        volumeMounts=[{"name": "meshfed-credentials", "mountPath": TOKEN_DIR, "readOnly": True},
                      {"name": "certs", "mountPath": "/var/lib/meshfed/certs"},
                      {"name": "state", "mountPath": "/var/lib/meshfed/state"},
                      {"name": "xtables-lock", "mountPath": "/run/xtables.lock"},
                      {"name": "tmp", "mountPath": "/tmp"}])
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta(NODE_PROXY),
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {**PART_OF, **labels}},
                "spec": {
                    "serviceAccountName": NODE_PROXY, "automountServiceAccountToken": False,
                    "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],  # every node, control plane included
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [
                        _projected_credentials(opts),
                        {"name": "certs", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                        {"name": "state", "hostPath": {"path": "/var/lib/meshfed/ztunnel", "type": "DirectoryOrCreate"}},
                        {"name": "xtables-lock", "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }


def gateway_objects(cluster: Cluster, opts: InstallOptions) -> list[dict[str, Any]]:
    gw = cluster.east_west_gateway
    if gw is None:
        return []
    labels = {"app.kubernetes.io/name": GATEWAY_SERVICE}
    container = _container(
        "gateway", opts, _proxy_args(f"gateway/{cluster.name}", cluster, opts, node=False),
        ports=[{"name": "tls-hbone", "containerPort": HBONE_PORT, "protocol": "TCP"}],
        securityContext={"privileged": False, "allowPrivilegeEscalation": False, "runAsNonRoot": True,
                         "runAsUser": NONROOT_UID, "runAsGroup": NONROOT_UID, "readOnlyRootFilesystem": True,
                         "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        readinessProbe={"tcpSocket": {"port": HBONE_PORT}, "periodSeconds": 2, "failureThreshold": 3},
        resources={"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        volumeMounts=[{"name": "meshfed-credentials", "mountPath": TOKEN_DIR, "readOnly": True},
                      {"name": "certs", "mountPath": "/var/lib/meshfed/certs"},
                      {"name": "state", "mountPath": "/var/lib/meshfed/state"},
                      {"name": "tmp", "mountPath": "/tmp"}])
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(GATEWAY_SERVICE),
        "spec": {
            "replicas": 1, "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": {**PART_OF, **labels}},
                "spec": {
                    "serviceAccountName": GATEWAY_SERVICE, "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "fsGroup": NONROOT_UID},
                    "containers": [container],
                    "volumes": [_projected_credentials(opts),
                                {"name": "certs", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                                {"name": "state", "emptyDir": {"sizeLimit": "16Mi"}},
                                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            },
        },
    }
    spec: dict[str, Any] = {"type": "LoadBalancer", "selector": labels,
                            "ports": [{"name": "tls-hbone", "port": gw.port, "targetPort": HBONE_PORT,
                                       "protocol": "TCP"}]}
    if gw.address is not None:
        spec["loadBalancerIP"] = gw.address  # honoured by MetalLB and cloud-provider-kind
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(GATEWAY_SERVICE), "spec": spec}
    return [deployment, service]


def discovery_rbac() -> list[dict[str, Any]]:
    """What discovery reads (and nothing it does not), plus the TokenReview the controller makes."""
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": _meta(DISCOVERY_ROLE, None),
         "rules": [
             {"apiGroups": [""], "resources": ["pods", "services", "nodes", "namespaces"],
              "verbs": ["get", "list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": _meta(DISCOVERY_ROLE, None),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": DISCOVERY_ROLE},
         "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": MESH_NAMESPACE}]},
    ]


def member_objects(snapshot: ConfigSnapshot, cluster_name: str, opts: InstallOptions = InstallOptions()
                   ) -> list[dict[str, Any]]:
    """Everything `meshfed install` puts into one member cluster, in apply order."""
    if cluster_name not in snapshot.clusters:
        raise ManifestError(f"no Cluster {cluster_name!r} in the fleet; clusters: {', '.join(sorted(snapshot.clusters))}")
    cluster = snapshot.clusters[cluster_name]
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(MESH_NAMESPACE, None, {
        "pod-security.kubernetes.io/enforce": "privileged", "pod-security.kubernetes.io/warn": "privileged"})}
    accounts = [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name),
                 "automountServiceAccountToken": False}
                for name in (NODE_PROXY, GATEWAY_SERVICE, CONTROLLER)]
    roots = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(ROOTS_CONFIGMAP),
             "data": {"roots.pem": opts.controller_roots_pem}}
    return [namespace, *accounts, *discovery_rbac(), roots, node_proxy_daemonset(cluster, opts),
            *gateway_objects(cluster, opts), *l7_gateway_objects(snapshot, cluster_name, opts)]


# --- the fleet's Gateways: waypoints and ingress gateways -------------------------------------------

# Where a waypoint or ingress proxy writes that it serves (`--ready-file`: it has its first config
# and its listeners are bound); the exec probe reads it, the admin port stays on loopback.
GATEWAY_READY_FILE = "/tmp/meshfed-ready"


def _enrolled_namespace(name: str) -> dict[str, Any]:
    """An application namespace, enrolled in ambient. One definition for the workloads' and the
    Gateways' namespaces: `meshfed` applies both with one field manager, so two renderings of the
    same namespace with different labels would take the label away at every other apply."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {AMBIENT_LABEL: AMBIENT_VALUE}}}


def l7_proxy_id(gw: Gateway, cluster: str) -> str:
    """How the proxy joins the controller: the prefix tells it (and the render) waypoint or ingress."""
    return f"{'waypoint' if gw.is_waypoint else 'ingress'}/{cluster}/{gw.namespace}/{gw.name}"


def _l7_gateway(gw: Gateway, cluster: Cluster, opts: InstallOptions) -> list[dict[str, Any]]:
    sa = gateway_service_account(gw)
    pod_labels = gateway_pod_labels(gw)   # gateway-name (discovery finds its pods) + dataplane-mode none
    ports = ([{"name": "tls-hbone", "containerPort": HBONE_PORT, "protocol": "TCP"}] if gw.is_waypoint else
             [{"name": x.name, "containerPort": x.port, "protocol": "TCP"} for x in gw.listeners])
    container = _container(
        "proxy", opts,
        [*_proxy_args(l7_proxy_id(gw, cluster.name), cluster, opts, node=False), "--ready-file", GATEWAY_READY_FILE],
        ports=ports,
        securityContext={"privileged": False, "allowPrivilegeEscalation": False, "runAsNonRoot": True,
                         "runAsUser": NONROOT_UID, "runAsGroup": NONROOT_UID, "readOnlyRootFilesystem": True,
                         "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        readinessProbe={"exec": {"command": ["test", "-f", GATEWAY_READY_FILE]}, "periodSeconds": 2,
                        "failureThreshold": 3},
        resources={"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        volumeMounts=[{"name": "meshfed-credentials", "mountPath": TOKEN_DIR, "readOnly": True},
                      {"name": "certs", "mountPath": "/var/lib/meshfed/certs"},
                      {"name": "state", "mountPath": "/var/lib/meshfed/state"},
                      {"name": "tmp", "mountPath": "/tmp"}])
    pod_security: dict[str, Any] = {"runAsNonRoot": True, "fsGroup": NONROOT_UID}
    if any(x.port < 1024 for x in gw.listeners) and not gw.is_waypoint:
        # an ingress listener on :80 as a non-root user without NET_BIND_SERVICE: a namespaced,
        # "safe" sysctl (Kubernetes >= 1.22), what Istio's gateway deployments set
        pod_security["sysctls"] = [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    meta_labels = {"app.kubernetes.io/name": gw.name, GATEWAY_NAME_LABEL: gw.name}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(gw.name, gw.namespace, meta_labels),
        "spec": {
            "replicas": 1, "selector": {"matchLabels": {GATEWAY_NAME_LABEL: gw.name}},
            "template": {
                "metadata": {"labels": {**PART_OF, **pod_labels}},
                "spec": {
                    "serviceAccountName": sa, "automountServiceAccountToken": False,
                    "securityContext": pod_security,
                    "containers": [container],
                    "volumes": [_projected_credentials(opts),
                                {"name": "certs", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                                {"name": "state", "emptyDir": {"sizeLimit": "16Mi"}},
                                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            },
        },
    }
    if gw.is_waypoint:  # what `istioctl waypoint apply` creates: node ztunnels dial it on 15008
        service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(gw.name, gw.namespace, meta_labels),
                   "spec": {"type": "ClusterIP", "selector": {GATEWAY_NAME_LABEL: gw.name},
                            "ports": [{"name": "tls-hbone", "port": HBONE_PORT, "targetPort": HBONE_PORT,
                                       "protocol": "TCP"}]}}
    else:               # Istio's ingress deployment: `<name>-istio`, a LoadBalancer with the listeners
        service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(sa, gw.namespace, meta_labels),
                   "spec": {"type": "LoadBalancer", "selector": {GATEWAY_NAME_LABEL: gw.name},
                            "ports": [{"name": x.name, "port": x.port, "targetPort": x.port, "protocol": "TCP"}
                                      for x in gw.listeners]}}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(sa, gw.namespace),
               "automountServiceAccountToken": False}
    return [account, deployment, service]


def l7_gateway_objects(snapshot: ConfigSnapshot, cluster_name: str, opts: InstallOptions = InstallOptions()
                       ) -> list[dict[str, Any]]:
    """Every fleet Gateway (waypoint or ingress) that runs in `cluster_name` (`meshfed.dev/clusters`,
    default every cluster), in apply order: each Gateway namespace once (enrolled: discovery only
    reads enrolled namespaces, and a waypoint's pods are found there by their gateway-name label;
    the pods themselves opt out of capture), the controller's roots in it (a projected volume reads
    ConfigMaps of its own namespace only), then the Gateways' objects."""
    if cluster_name not in snapshot.clusters:
        raise ManifestError(f"no Cluster {cluster_name!r} in the fleet; clusters: {', '.join(sorted(snapshot.clusters))}")
    cluster = snapshot.clusters[cluster_name]
    gateways = sorted((g for g in snapshot.gateways.values() if g.runs_in(cluster_name)),
                      key=lambda g: (g.namespace, g.name))
    out: list[dict[str, Any]] = []
    for ns in sorted({g.namespace for g in gateways}):
        out += [_enrolled_namespace(ns),
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(ROOTS_CONFIGMAP, ns),
                 "data": {"roots.pem": opts.controller_roots_pem}}]
    for g in gateways:
        out += _l7_gateway(g, cluster, opts)
    return out


# --- a controller inside a cluster ------------------------------------------------------------------


def status_service_names() -> tuple[str, ...]:
    """The names in-cluster clients reach the controller's status API by (its Service `<CONTROLLER>-status`)."""
    svc = f"{CONTROLLER}-status"
    return (svc, f"{svc}.{MESH_NAMESPACE}", f"{svc}.{MESH_NAMESPACE}.svc", f"{svc}.{MESH_NAMESPACE}.svc.cluster.local")


def controller_objects(snapshot: ConfigSnapshot, cluster_name: str, repo: str, opts: InstallOptions = InstallOptions(),
                       branch: str = "main") -> list[dict[str, Any]]:
    """`meshfed controller run --in-cluster CLUSTER` as a Deployment in `cluster_name`: its own cluster
    through its service account (the discovery ClusterRole), the others through the kubeconfig in
    the Secret `meshfed-remote-kubeconfigs` (key `kubeconfig`, created by the operator); its
    state (CA keys, records) on a PersistentVolumeClaim; proxies reach it through a LoadBalancer."""
    if cluster_name not in snapshot.clusters:
        raise ManifestError(f"no Cluster {cluster_name!r} in the fleet")
    if not repo:
        raise ManifestError("an in-cluster controller needs the fleet repo's Git URL (--repo)")
    labels = {"app.kubernetes.io/name": CONTROLLER}
    args = ["controller", "run", "--repo", repo, "--branch", branch, "--in-cluster", cluster_name,
            "--kubeconfig", "/etc/meshfed/remote/kubeconfig", "--state-dir", "/var/lib/meshfed/controller",
            "--listen", f"0.0.0.0:{CONTROLLER_GRPC_PORT}", "--bootstrap-listen", f"0.0.0.0:{CONTROLLER_BOOTSTRAP_PORT}",
            "--status-listen", f"0.0.0.0:{CONTROLLER_HTTP_PORT}",
            # the status API answers to its Service's names (and to IP literals: the kubelet's probe
            # sends the pod IP); any other Host is refused (DNS rebinding, see federation.server.status_api)
            *(a for name in status_service_names() for a in ("--status-allowed-host", name))]
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(CONTROLLER),
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"},  # one state owner at a time
                 "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": {**PART_OF, **labels}}, "spec": {
                     "serviceAccountName": CONTROLLER,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": NONROOT_UID, "fsGroup": NONROOT_UID},
                     "containers": [{
                         "name": "controller", "image": opts.image, "imagePullPolicy": opts.image_pull_policy,
                         "command": ["meshfed"], "args": args,
                         "ports": [{"name": "grpc", "containerPort": CONTROLLER_GRPC_PORT},
                                   {"name": "bootstrap", "containerPort": CONTROLLER_BOOTSTRAP_PORT},
                                   {"name": "http-status", "containerPort": CONTROLLER_HTTP_PORT}],
                         "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                             "seccompProfile": {"type": "RuntimeDefault"}},
                         # /healthz: the status API off loopback wants its token for everything else
                         "readinessProbe": {"httpGet": {"path": "/healthz", "port": CONTROLLER_HTTP_PORT},
                                            "periodSeconds": 5},
                         "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
                         "volumeMounts": [{"name": "state", "mountPath": "/var/lib/meshfed/controller"},
                                          {"name": "remote", "mountPath": "/etc/meshfed/remote", "readOnly": True}]}],
                     "volumes": [{"name": "state", "persistentVolumeClaim": {"claimName": f"{CONTROLLER}-state"}},
                                 {"name": "remote", "secret": {"secretName": REMOTE_KUBECONFIGS_SECRET,
                                                               "optional": True, "defaultMode": 0o400}}]}}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(f"{CONTROLLER}-state"),
           "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    proxies = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(CONTROLLER),
               "spec": {"type": "LoadBalancer", "selector": labels, "ports": [
                   {"name": "grpc", "port": CONTROLLER_GRPC_PORT, "targetPort": CONTROLLER_GRPC_PORT},
                   {"name": "bootstrap", "port": CONTROLLER_BOOTSTRAP_PORT, "targetPort": CONTROLLER_BOOTSTRAP_PORT}]}}
    status = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(f"{CONTROLLER}-status"),
              "spec": {"type": "ClusterIP", "selector": labels,
                       "ports": [{"name": "http-status", "port": CONTROLLER_HTTP_PORT, "targetPort": CONTROLLER_HTTP_PORT}]}}
    return [pvc, deployment, proxies, status]


# --- the LabCluster's workloads as Deployments (the kind provider's demo) ---------------------------


def _workload_deployment(cluster: Cluster, w: LabWorkload, opts: InstallOptions) -> dict[str, Any]:
    labels = {"app": w.name, **({"service": w.service} if w.service else {})}
    # the workload's own labels (an InferencePool's selector) on its pods, not in the Deployment's
    # selector (immutable once created)
    pod_labels = {**w.labels, **labels, **({PROXY_PROTOCOL_LABEL: "v2"} if w.role == "server" else {})}
    env = [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": p}}}
           for n, p in (("POD_NAME", "metadata.name"), ("NODE_NAME", "spec.nodeName"), ("POD_IP", "status.podIP"))]
    spec: dict[str, Any] = {
        "serviceAccountName": w.service_account,
        "securityContext": {"runAsNonRoot": True, "runAsUser": NONROOT_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": w.name, "image": opts.image, "imagePullPolicy": opts.image_pull_policy,
            "command": ["python", "-m", "clusters.lab.demo_server"],
            "args": ["--cluster", str(cluster.name), "--namespace", w.namespace, "--pod", "$(POD_NAME)",
                     "--node", "$(NODE_NAME)", "--address", "$(POD_IP)", "--port", str(w.port),
                     "--behaviour", w.behaviour.value,
                     # a model server (an InferencePool's pods): the lab's flags (clusters.lab.commands.pod_argv)
                     *(["--model", w.model.name, "--model-latency-ms", f"{w.model.latency_s * 1000:g}",
                        "--model-concurrency", str(w.model.concurrency)] if w.model is not None else [])],
            "env": env,
            "ports": [{"name": "http", "containerPort": w.port, "protocol": "TCP"}],
            "readinessProbe": {"tcpSocket": {"port": w.port}, "periodSeconds": 1, "failureThreshold": 2},
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": True},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
        }],
    }
    if w.nodes:  # the LabCluster's node names: kind workers carry them as a label
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": LAB_NODE_LABEL, "operator": "In", "values": list(w.nodes)}]}]}}}
    spec["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                          "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": labels}}]
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": w.name, "namespace": w.namespace, "labels": labels},
            "spec": {"replicas": w.replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": pod_labels}, "spec": spec}}}


def workload_objects(snapshot: ConfigSnapshot, cluster_name: str, opts: InstallOptions = InstallOptions()
                     ) -> list[dict[str, Any]]:
    """The LabCluster's workloads as Kubernetes objects: enrolled namespaces, service accounts, one
    Deployment per workload, and a Service for every GlobalService in every cluster (its clusterIP
    is the VIP that cluster's apps dial; a cluster without backends has a Service with no endpoints,
    as the lab has)."""
    lab: LabCluster | None = snapshot.lab_clusters.get(ClusterName(cluster_name))
    cluster = snapshot.clusters[cluster_name]
    workloads = lab.workloads if lab is not None else ()
    namespaces = sorted({w.namespace for w in workloads} | {s.namespace for s in snapshot.services.values()})
    out: list[dict[str, Any]] = [_enrolled_namespace(ns) for ns in namespaces]
    accounts = sorted({(w.namespace, w.service_account) for w in workloads})
    out += [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}}
            for ns, sa in accounts]
    out += [_workload_deployment(cluster, w, opts) for w in workloads]
    for key, svc in sorted(snapshot.services.items(), key=lambda kv: (kv[0].namespace, kv[0].name)):
        out.append({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": key.name, "namespace": key.namespace,
                                 "labels": {"meshfed.dev/global-service": "true"},
                                 "annotations": {"meshfed.dev/clusterset-hostname": svc.hostname}},
                    "spec": {"type": "ClusterIP", "selector": {"service": key.name},
                             "ports": [{"name": p.name, "port": p.port, "targetPort": p.target_port, "protocol": "TCP",
                                        "appProtocol": p.app_protocol} for p in svc.ports]}})
    return out


# --- output -----------------------------------------------------------------------------------------


def to_yaml(objects: Iterable[Mapping[str, Any]]) -> str:
    """A multi-document YAML stream (`kubectl apply -f -` reads it). JSON is YAML: each document is
    written as indented JSON, so no YAML library decides how a string like "on" or "0755" reads."""
    return "".join(f"---\n{json.dumps(obj, indent=2)}\n" for obj in objects)
