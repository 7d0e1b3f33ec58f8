"""What `meshfed install` renders: valid against the Kubernetes schemas of the node image the kind
provider pins (kubernetes-validate, strict: no unknown field), least privilege, no shared secret,
and the processes the lab runs with flags their own parsers accept."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import gitops
from clusters.kind.manifests import (
    DEFAULT_IMAGE,
    GATEWAY_READY_FILE,
    TOKEN_PATH,
    InstallOptions,
    ManifestError,
    cluster_for_context,
    controller_objects,
    l7_gateway_objects,
    member_objects,
    to_yaml,
    workload_objects,
)
from clusters.kind.plan import KUBERNETES_VERSION, metallb_objects
from federation.cli.main import cli
from gitops.model import GATEWAY_NAME_LABEL

REPO = Path(__file__).resolve().parents[3]
FLEETS = {name: gitops.load_worktree(REPO / "examples" / name) for name in ("fleet", "fleet-kind", "l7")}
ROOTS = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def rendered() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for fleet_name, snap in FLEETS.items():
        for cluster in sorted(snap.clusters):
            objs = [*member_objects(snap, cluster, InstallOptions(controller_roots_pem=ROOTS)),
                    *controller_objects(snap, cluster, "https://git.example/fleet.git"),
                    *workload_objects(snap, cluster)]
            out += [(f"{fleet_name}/{cluster}/{o['kind']}/{o['metadata']['name']}", o) for o in objs]
    return out


RENDERED = rendered()


def test_every_rendered_object_validates_against_the_pinned_kubernetes_schemas() -> None:
    """Both example fleets, every cluster: meshfed itself, an in-cluster controller, the workloads.
    kubernetes-validate re-reads its 2 MB definitions file on every call; the loader is memoized
    for this test only (the validation itself is the library's, unchanged)."""
    import functools
    from unittest import mock

    import kubernetes_validate

    cached = functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents)
    problems, versions = [], set()
    with mock.patch.object(kubernetes_validate.utils, "schema_contents", cached):
        for where, obj in RENDERED:
            try:
                versions.add(kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True))
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{where}: {'.'.join(str(p) for p in e.path)}: {e.message}")
    assert not problems, "\n".join(problems)
    assert versions == {"1.36"}  # the schema of the node image's minor, not an older one
    assert len(RENDERED) > 100


def test_an_unknown_field_would_be_caught() -> None:
    import kubernetes_validate

    [ds] = [o for _, o in RENDERED[:20] if o["kind"] == "DaemonSet"]
    bad = json.loads(json.dumps(ds))
    bad["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_metallb_objects_have_the_fields_metallb_reads() -> None:
    """CRDs have no bundled schema (kubernetes-validate raises SchemaNotFoundError): checked here
    against metallb.io/v1beta1's fields."""
    import kubernetes_validate

    pool, l2 = metallb_objects("172.18.255.16/28")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(pool, KUBERNETES_VERSION, strict=True)
    assert set(pool["spec"]) == {"addresses"} and pool["spec"]["addresses"] == ["172.18.255.16/28"]  # type: ignore[index]
    assert set(l2["spec"]) == {"ipAddressPools"} and l2["spec"]["ipAddressPools"] == ["meshfed"]  # type: ignore[index]
    assert {o["metadata"]["namespace"] for o in (pool, l2)} == {"metallb-system"}  # type: ignore[index]


def by_kind(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_discovery_rbac_is_exactly_what_discovery_and_token_review_need() -> None:
    objs = by_kind(member_objects(FLEETS["fleet-kind"], "east"))
    rules = objs[("ClusterRole", "meshfed-discovery")]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    read = {"get", "list", "watch"}
    assert granted == {*(("", r, v) for r in ("pods", "services", "nodes", "namespaces") for v in read),
                       *(("discovery.k8s.io", "endpointslices", v) for v in read),
                       ("authentication.k8s.io", "tokenreviews", "create")}
    binding = objs[("ClusterRoleBinding", "meshfed-discovery")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "meshfed-controller", "namespace": "meshfed-system"}]
    assert not any(o["kind"] in ("Role", "RoleBinding") for o in objs.values())


def test_no_shared_secret_each_proxy_presents_its_own_projected_token() -> None:
    objs = member_objects(FLEETS["fleet-kind"], "east")
    assert not [o for o in objs if o["kind"] == "Secret"]
    for kind, name in (("DaemonSet", "ztunnel"), ("Deployment", "eastwest-gateway")):
        pod = by_kind(objs)[(kind, name)]["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False   # only the audience-bound token is mounted
        [projected] = [v["projected"] for v in pod["volumes"] if "projected" in v]
        [token] = [s["serviceAccountToken"] for s in projected["sources"] if "serviceAccountToken" in s]
        assert token["audience"] == "meshfed-controller" and token["expirationSeconds"] == 3600
        assert not any("secret" in v for v in pod["volumes"])
        # through the proxy's real argument parser: the flag the manifest passes is the one the
        # proxy reads its projected token from (re-read at every bootstrap, reviewed by this cluster)
        parsed = ztunnel(pod["containers"][0]["args"])
        assert parsed.sa_token_file == Path("/var/run/secrets/meshfed/token") == Path(TOKEN_PATH)
        assert parsed.bootstrap_token_file is None


def ztunnel(args: list[str]) -> Any:
    from ztunnel.__main__ import build_parser

    return build_parser().parse_args([a.replace("$(NODE_NAME)", "east-worker") for a in args])


def test_the_node_proxy_is_the_lab_s_process_with_capture_on_the_host_network() -> None:
    objs = by_kind(member_objects(FLEETS["fleet-kind"], "east", InstallOptions(controller="172.18.0.1:15012",
                                                                               bootstrap="172.18.0.1:15013")))
    pod = objs[("DaemonSet", "ztunnel")]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["tolerations"] == [{"operator": "Exists"}]
    [c] = pod["containers"]
    assert c["command"] == ["python", "-m", "ztunnel"] and c["image"] == DEFAULT_IMAGE
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert c["securityContext"]["privileged"] is False and c["securityContext"]["allowPrivilegeEscalation"] is False
    a = ztunnel(c["args"])
    assert a.capture and a.transparent == "0.0.0.0:15001" and a.hbone == "0.0.0.0:15008"
    assert a.dns == "0.0.0.0:15053" and a.dns_upstream == ["resolv.conf"]   # the lab's DNS path, kube-dns upstream
    assert a.proxy_id == "ztunnel/east/east-worker" and a.trust_domain == "east.mesh.local"
    assert a.controller == "172.18.0.1:15012" and a.bootstrap == "172.18.0.1:15013"
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/run/xtables.lock"}  # kube-proxy's lock, shared
    gw = objs[("Deployment", "eastwest-gateway")]["spec"]["template"]["spec"]
    g = ztunnel(gw["containers"][0]["args"])
    assert g.proxy_id == "gateway/east" and not g.capture and g.socks == ""
    assert gw["containers"][0]["securityContext"]["runAsNonRoot"] is True   # the gateway needs no privilege


def test_the_gateway_service_is_a_load_balancer_on_15008_with_the_fleet_s_address_if_any() -> None:
    kind_svc = by_kind(member_objects(FLEETS["fleet-kind"], "east"))[("Service", "eastwest-gateway")]
    assert kind_svc["spec"]["type"] == "LoadBalancer" and kind_svc["spec"]["ports"][0]["port"] == 15008
    assert "loadBalancerIP" not in kind_svc["spec"]        # the address comes from the cluster
    lab_svc = by_kind(member_objects(FLEETS["fleet"], "east"))[("Service", "eastwest-gateway")]
    assert lab_svc["spec"]["loadBalancerIP"] == "172.30.0.11"


def test_meshfed_system_is_never_enrolled_and_the_workloads_namespaces_are() -> None:
    snap = FLEETS["fleet-kind"]
    ns = by_kind(member_objects(snap, "east"))[("Namespace", "meshfed-system")]
    assert "istio.io/dataplane-mode" not in ns["metadata"]["labels"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    w = by_kind(workload_objects(snap, "east"))
    assert w[("Namespace", "shop")]["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    checkout = w[("Deployment", "checkout")]["spec"]
    assert checkout["replicas"] == 2
    assert checkout["template"]["metadata"]["labels"]["networking.meshfed.dev/inbound-proxy-protocol"] == "v2"
    # every global service has a Service in every cluster (its clusterIP is that cluster's VIP)
    assert {n for k, n in w if k == "Service"} == {"cart", "checkout", "checkout-v2"}


def test_install_print_is_the_rendering_as_a_yaml_stream() -> None:
    from ruamel.yaml import YAML

    r = CliRunner().invoke(cli, ["install", "--context", "lab-east", "--fleet", str(REPO / "examples" / "fleet"),
                                 "--print"])
    assert r.exit_code == 0, r.output
    assert r.output == to_yaml(member_objects(FLEETS["fleet"], "east"))
    docs = [d for d in YAML(typ="safe", pure=True).load_all(r.output) if d]
    assert [d["kind"] for d in docs][:2] == ["Namespace", "ServiceAccount"]
    assert json.loads(json.dumps(docs)) == member_objects(FLEETS["fleet"], "east")


def test_an_unknown_context_lists_the_fleet_s_contexts() -> None:
    with pytest.raises(ManifestError, match=re.escape("lab-east (east)")):
        cluster_for_context(FLEETS["fleet"], "kind-nowhere")
    r = CliRunner().invoke(cli, ["install", "--context", "kind-nowhere", "--fleet", str(REPO / "examples" / "fleet"),
                                 "--print"])
    assert r.exit_code == 1  # an unknown name is a problem found (exit 1), not a usage error (issue 15)


# --- the fleet's Gateways (waypoints, ingress gateways); moved from tests/unit/lab/test_kind_waypoint.py
# when the objects moved into this module (its assertions kept, in-pod paths are main's) ----------------


def test_l7_gateway_objects_per_gateway_and_cluster() -> None:
    from ztunnel.__main__ import build_parser

    snap = FLEETS["l7"]
    east = l7_gateway_objects(snap, "east")
    west = l7_gateway_objects(snap, "west")
    kinds = sorted((o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in east)
    assert ("Deployment", "ai-serving", "ai-gateway") in kinds and ("Service", "ai-serving", "ai-gateway-istio") in kinds
    assert ("Deployment", "shop", "waypoint") in kinds and ("ServiceAccount", "shop", "waypoint") in kinds
    assert ("ServiceAccount", "ai-serving", "ai-gateway-istio") in kinds
    assert not any(o["metadata"].get("namespace") == "ai-serving" for o in west)  # ai-gateway runs in east only
    dep = next(o for o in west if o["kind"] == "Deployment" and o["metadata"]["namespace"] == "shop")
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"][GATEWAY_NAME_LABEL] == "waypoint"
    assert pod["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert pod["spec"]["serviceAccountName"] == "waypoint"
    [c] = pod["spec"]["containers"]
    assert c["command"] == ["python", "-m", "ztunnel"]
    args = build_parser().parse_args(c["args"])
    assert args.proxy_id == "waypoint/west/shop/waypoint" and args.trust_domain == "west.mesh.local"
    assert str(args.ready_file) == GATEWAY_READY_FILE and args.socks == "" and not args.capture
    assert c["readinessProbe"]["exec"]["command"] == ["test", "-f", GATEWAY_READY_FILE]
    wp_svc = next(o for o in west if o["kind"] == "Service" and o["metadata"]["namespace"] == "shop")
    assert wp_svc["spec"]["type"] == "ClusterIP" and [p["port"] for p in wp_svc["spec"]["ports"]] == [15008]
    svc = next(o for o in east if o["kind"] == "Service" and o["metadata"]["name"] == "ai-gateway-istio")
    assert svc["spec"]["type"] == "LoadBalancer" and [p["port"] for p in svc["spec"]["ports"]] == [80]
    ing = next(o for o in east if o["kind"] == "Deployment" and o["metadata"]["name"] == "ai-gateway")
    ing_pod = ing["spec"]["template"]["spec"]
    assert build_parser().parse_args(ing_pod["containers"][0]["args"]).proxy_id == "ingress/east/ai-serving/ai-gateway"
    # :80 as a non-root user: the unprivileged-port sysctl, no capability added
    assert ing_pod["securityContext"]["sysctls"] == [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    assert ing_pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "sysctls" not in pod["spec"]["securityContext"]
    with pytest.raises(ManifestError, match="no Cluster 'north'"):
        l7_gateway_objects(snap, "north")


def test_member_objects_carry_the_gateways_with_their_namespace_roots_and_projected_token() -> None:
    snap = FLEETS["l7"]
    objs = member_objects(snap, "east", InstallOptions(controller_roots_pem=ROOTS))
    assert objs[-len(l7_gateway_objects(snap, "east")):] == l7_gateway_objects(snap, "east",
                                                                               InstallOptions(controller_roots_pem=ROOTS))
    where = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): i for i, o in enumerate(objs)}
    for ns in ("shop", "my-app", "ai-serving"):
        # the namespace and its roots come before the Deployment that mounts them
        assert where[("Namespace", "", ns)] < where[("ConfigMap", ns, "meshfed-controller-roots")]
        assert where[("ConfigMap", ns, "meshfed-controller-roots")] < min(
            i for (k, n, _), i in where.items() if k == "Deployment" and n == ns)
        assert objs[where[("ConfigMap", ns, "meshfed-controller-roots")]]["data"] == {"roots.pem": ROOTS}
    dep = objs[where[("Deployment", "shop", "waypoint")]]["spec"]["template"]["spec"]
    assert dep["automountServiceAccountToken"] is False
    [projected] = [v["projected"] for v in dep["volumes"] if "projected" in v]
    [token] = [x["serviceAccountToken"] for x in projected["sources"] if "serviceAccountToken" in x]
    assert token["audience"] == "meshfed-controller"
    # a fleet without Gateways gets none of this
    assert not l7_gateway_objects(FLEETS["fleet"], "east")


def test_a_gateway_namespace_is_rendered_as_the_workloads_render_it() -> None:
    """One field manager applies both lists: a namespace rendered twice with different labels would
    lose its ambient label (and its pods' discovery) at every other apply."""
    snap = FLEETS["l7"]
    member = {o["metadata"]["name"]: o for o in member_objects(snap, "east") if o["kind"] == "Namespace"}
    workloads = {o["metadata"]["name"]: o for o in workload_objects(snap, "east") if o["kind"] == "Namespace"}
    shared = (member.keys() & workloads.keys())
    assert shared >= {"shop", "ai-serving"}
    for ns in shared:
        assert member[ns] == workloads[ns]
        assert member[ns]["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"


def test_model_server_workloads_run_the_demo_server_in_model_mode_with_the_pool_s_labels() -> None:
    w = by_kind(workload_objects(FLEETS["l7"], "east"))
    dep = w[("Deployment", "llm-model-v1")]["spec"]
    assert dep["template"]["metadata"]["labels"]["pool"] == "llm"     # what the InferencePool selects
    assert "pool" not in dep["selector"]["matchLabels"]
    args = dep["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "llm-model-v1"
    assert args[args.index("--model-latency-ms") + 1] == "20"
    assert args[args.index("--model-concurrency") + 1] == "1"
