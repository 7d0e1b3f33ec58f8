"""Render for L7: waypoint and ingress proxies, waypoint references in node views, L7 resources,
and incremental deltas that still equal a full render when waypoint or model-server pods move."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gitops
from clusters.kube.observation import ClusterObservation, EndpointInfo
from federation.core.failover import FailoverEngine, build_engine
from federation.core.offline import offline_observations
from federation.core.render import Renderer, render_configs
from gitops.model import GATEWAY_NAME_LABEL, ConfigSnapshot
from ztunnel.api.config import (
    ProxyConfig,
    ProxyMode,
    apply_delta,
    canonical,
    diff_configs,
    proxy_config_from_dict,
    proxy_config_to_dict,
)

L7_FLEET = Path(__file__).resolve().parents[3] / "examples" / "l7"
CHECKOUT = "checkout.shop.svc.clusterset.local"


@pytest.fixture(scope="module")
def snap() -> ConfigSnapshot:
    return gitops.load_worktree(L7_FLEET)


def engine(snap: ConfigSnapshot) -> FailoverEngine:
    return build_engine(snap, offline_observations(snap))


def svc(cfg: ProxyConfig, host: str) -> object:
    return next(s for s in cfg.services if s.hostname == host)


def test_one_l7_proxy_per_gateway_and_cluster_it_runs_in(snap: ConfigSnapshot) -> None:
    configs = render_configs(engine(snap))
    l7 = sorted(p for p in configs if p.startswith(("waypoint/", "ingress/")))
    # waypoints everywhere; ai-gateway carries meshfed.dev/clusters: east
    assert l7 == ["ingress/east/ai-serving/ai-gateway", "waypoint/east/my-app/waypoint", "waypoint/east/shop/waypoint",
                  "waypoint/west/my-app/waypoint", "waypoint/west/shop/waypoint"]
    wp = configs["waypoint/west/shop/waypoint"]
    assert wp.mode is ProxyMode.WAYPOINT and wp.cluster == "west" and wp.workloads == ()
    assert wp.local_identities == ("spiffe://west.mesh.local/ns/shop/sa/waypoint",)
    ing = configs["ingress/east/ai-serving/ai-gateway"]
    assert ing.mode is ProxyMode.INGRESS
    assert ing.local_identities == ("spiffe://east.mesh.local/ns/ai-serving/sa/ai-gateway-istio",)
    assert [(x.name, x.port, x.protocol) for x in ing.listeners] == [("http", 80, "HTTP")]


def test_node_views_name_the_waypoint_of_their_own_cluster(snap: ConfigSnapshot) -> None:
    e = engine(snap)
    configs = render_configs(e)
    east = svc(configs["ztunnel/east/node-2"], CHECKOUT)
    west = svc(configs["ztunnel/west/node-1"], CHECKOUT)
    east_pod = e.graph.gateway_pods("east", "shop", "waypoint")
    assert east.waypoint is not None and west.waypoint is not None  # type: ignore[attr-defined]
    assert east.waypoint.addresses == tuple(f"{p.address}:15008" for p in east_pod.values())  # type: ignore[attr-defined]
    assert east.waypoint.addresses != west.waypoint.addresses  # type: ignore[attr-defined]
    assert east.waypoint.identity == "spiffe://east.mesh.local/ns/shop/sa/waypoint"  # type: ignore[attr-defined]
    # a destination ztunnel takes a forwarded caller identity from the waypoint of either cluster
    assert east.waypoint.identities == west.waypoint.identities == (  # type: ignore[attr-defined]
        "spiffe://east.mesh.local/ns/shop/sa/waypoint", "spiffe://west.mesh.local/ns/shop/sa/waypoint")
    # services outside an enrolled namespace have none
    assert svc(configs["ztunnel/east/node-1"], "llm-model-v1.ai-serving.svc.clusterset.local").waypoint is None  # type: ignore[attr-defined]


def test_waypoint_pods_are_proxies_not_workloads_of_their_node(snap: ConfigSnapshot) -> None:
    configs = render_configs(engine(snap))
    for pid, cfg in configs.items():
        if pid.startswith("ztunnel/"):
            assert not any(GATEWAY_NAME_LABEL in w.labels for w in cfg.workloads), pid
            assert not any("/sa/waypoint" in i or i.endswith("-istio") for i in cfg.local_identities), pid


def test_targeted_policies_go_to_the_l7_proxy_only(snap: ConfigSnapshot) -> None:
    configs = render_configs(engine(snap))
    wp = configs["waypoint/east/shop/waypoint"]
    assert [a.key for a in wp.authorizations] == ["shop/checkout-deny-delete"]
    deny = wp.authorizations[0]
    assert deny.targets == ("Service/shop/checkout",) and deny.rules[0].methods == ("DELETE",)
    for pid, cfg in configs.items():
        if pid.startswith("ztunnel/"):
            assert "shop/checkout-deny-delete" not in {a.key for a in cfg.authorizations}
    assert configs["waypoint/east/my-app/waypoint"].authorizations == ()


def test_routes_with_istio_retry_defaults_and_the_guides_backends(snap: ConfigSnapshot) -> None:
    configs = render_configs(engine(snap))
    wp = configs["waypoint/east/shop/waypoint"]
    [route] = wp.http_routes
    assert route.parents == (f"Service/{CHECKOUT}:80",)
    pinned, split = route.rules
    assert pinned.matches[0].headers[0].name == "x-canary"
    assert [(b.target, b.weight) for b in split.backends] == [(CHECKOUT, 80), ("checkout-v2.shop.svc.clusterset.local", 20)]
    assert split.timeout_s == 10.0 and split.retry is not None and split.retry.attempts == 2
    assert split.retry.codes == (503,)
    ing = configs["ingress/east/ai-serving/ai-gateway"]
    guide = next(r for r in ing.http_routes if r.name == "inference-route")
    assert guide.parents == ("Gateway/ai-serving/ai-gateway/",)
    # the guide writes no port: the Service's port (80) is used
    assert [(b.target, b.port, b.weight) for b in guide.rules[0].backends] == [
        ("llm-model-v2.ai-serving.svc.clusterset.local", 80, 20), ("llm-model-v1.ai-serving.svc.clusterset.local", 80, 80)]
    assert configs["waypoint/east/my-app/waypoint"].http_routes == ()


def test_inference_pool_is_the_selected_pods_of_the_proxys_cluster(snap: ConfigSnapshot) -> None:
    e = engine(snap)
    ing = render_configs(e)["ingress/east/ai-serving/ai-gateway"]
    [pool] = ing.inference_pools
    assert pool.key == "ai-serving/llm-pool" and pool.failure_mode == "FailOpen" and pool.picker == "meshfed-epp"
    uids = sorted(ep.workload_uid for ep in pool.endpoints)
    assert uids == ["east/ai-serving/llm-model-v1-0", "east/ai-serving/llm-model-v1-1", "east/ai-serving/llm-model-v2-0"]
    assert all(ep.port == 8000 and ep.hbone_address.endswith(":15008") for ep in pool.endpoints)


def test_connection_pool_reaches_the_service(snap: ConfigSnapshot) -> None:
    configs = render_configs(engine(snap))
    guide = svc(configs["waypoint/east/my-app/waypoint"], "my-service.my-app.svc.clusterset.local")
    assert guide.connection_pool is not None and guide.connection_pool.max_connections == 100  # type: ignore[attr-defined]
    assert guide.outlier is not None and guide.outlier.consecutive_5xx_errors == 3  # type: ignore[attr-defined]
    checkout = svc(configs["ztunnel/east/node-1"], CHECKOUT)
    assert checkout.connection_pool.http1_max_pending_requests == 256  # type: ignore[attr-defined]


def test_l7_config_json_round_trip(snap: ConfigSnapshot) -> None:
    for cfg in render_configs(engine(snap)).values():
        back, errors = proxy_config_from_dict(proxy_config_to_dict(cfg))
        assert errors == [] and canonical(back) == canonical(cfg)


def test_a_node_proxys_json_has_no_l7_kinds(snap: ConfigSnapshot) -> None:
    data = proxy_config_to_dict(render_configs(engine(snap))["ztunnel/east/node-1"])
    assert not {"http_routes", "listeners", "inference_pools"} & set(data)


def _strip(cfg: ProxyConfig) -> ProxyConfig:
    return replace(canonical(cfg), stamp=replace(cfg.stamp, version=0))


step = st.tuples(st.sampled_from(["flip", "remove", "add"]), st.sampled_from(["waypoint", "llm", "my-service"]),
                 st.integers(0, 1000))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(step, min_size=1, max_size=6))
def test_deltas_follow_waypoint_and_model_pods(snap: ConfigSnapshot, steps: list[tuple[str, str, int]]) -> None:
    e = engine(snap)
    r = Renderer(e)
    current = dict(r.render_all())
    now = 0.0
    for kind, which, n in steps:
        now += 1.0
        cluster = sorted(e.graph.clusters)[n % 2]
        eps = sorted((x for x in e.graph.cluster_state(cluster).endpoints.values() if which in x.pod),
                     key=lambda x: x.uid)
        if not eps:
            continue
        ep = eps[n % len(eps)]
        info = EndpointInfo(ep.namespace, ep.service, ep.pod, ep.address, ep.node, ep.service_account,
                            ready=not ep.ready, labels=dict(ep.labels))
        if kind == "flip":
            change, _ = e.observe(ClusterObservation(cluster, now, False, (), (), (info,)))
        elif kind == "remove":
            change, _ = e.observe(ClusterObservation(cluster, now, False, (), (), (),
                                                     removed_endpoints=((ep.namespace, ep.service, ep.pod),)))
        else:
            new = replace(info, pod=f"{ep.pod}-x{n}", address=f"{ep.address.rsplit('.', 1)[0]}.{200 + n % 50}",
                          ready=True)
            change, _ = e.observe(ClusterObservation(cluster, now, False, (), (), (new,)))
        update = r.update(change)
        for pid, delta in update.deltas.items():
            old = current[pid]
            new_cfg = r.config(pid)
            assert apply_delta(old, delta) == new_cfg
            reference = diff_configs(old, new_cfg)
            assert delta.upserts == reference.upserts and delta.removals == reference.removals
            current[pid] = new_cfg
        fresh = Renderer(e).render_all()
        for pid, cfg in fresh.items():
            assert _strip(cfg) == _strip(current[pid]), f"{pid} drifted from a full render after {kind} {which}"


def test_waypoint_readiness_flip_updates_the_node_views_of_its_cluster_only(snap: ConfigSnapshot) -> None:
    e = engine(snap)
    r = Renderer(e)
    r.render_all()
    [pod] = e.graph.gateway_pods("west", "shop", "waypoint").values()
    info = EndpointInfo(pod.namespace, pod.service, pod.pod, pod.address, pod.node, pod.service_account, ready=False,
                        labels=dict(pod.labels))
    change, _ = e.observe(ClusterObservation("west", 1.0, False, (), (), (info,)))
    assert change.gateways == {("west", "shop", "waypoint")}
    update = r.update(change)
    touched = sorted(update.deltas)
    assert touched and all("/west/" in p or p == "gateway/west" for p in touched)
    node = r.config("ztunnel/west/node-1")
    assert svc(node, CHECKOUT).waypoint.addresses == ()  # type: ignore[attr-defined]
    assert svc(r.config("ztunnel/east/node-1"), CHECKOUT).waypoint.addresses != ()  # type: ignore[attr-defined]
