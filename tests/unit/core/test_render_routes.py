"""Render of Gateway API route weights: every proxy that can dial a routed service also gets its
backend services with their endpoints (a client cannot send the canary share anywhere otherwise),
and the gateway of the backend's cluster can forward to it."""

from __future__ import annotations

from dataclasses import replace

from federation.core.failover import build_engine
from federation.core.offline import offline_observations
from federation.core.render import render_configs
from gitops.model import BackendRef
from tests.unit.core import factory as f
from ztunnel.api.config import ProxyMode, WeightedBackend

CHECKOUT = "checkout.shop.svc.clusterset.local"
CHECKOUT_V2 = "checkout-v2.shop.svc.clusterset.local"


def test_every_node_proxy_gets_the_routes_and_the_backend_services_with_endpoints() -> None:
    snap = f.fleet()
    configs = render_configs(build_engine(snap, offline_observations(snap)))
    nodes = [c for c in configs.values() if c.mode is ProxyMode.NODE]
    assert len(nodes) == 6
    for cfg in nodes:
        by_host = {s.hostname: s for s in cfg.services}
        assert by_host[CHECKOUT].routes == (WeightedBackend(CHECKOUT, 90), WeightedBackend(CHECKOUT_V2, 10))
        v2 = by_host[CHECKOUT_V2]
        assert v2.endpoints, cfg.proxy_id
        assert {e.cluster for e in v2.endpoints} == {"east"}
        for e in v2.endpoints:   # same network: direct HBONE to the pod's node; else east's gateway
            assert (e.hbone_address != "") == (cfg.cluster == "east") and (e.gateway != "") == (cfg.cluster != "east")
        assert v2.subject_alt_names == ("spiffe://east.mesh.local/ns/shop/sa/checkout",)
    gw = {s.hostname for s in configs["gateway/east"].services}
    assert CHECKOUT_V2 in gw   # inner tunnels for checkout-v2 from other networks end there


def test_a_new_split_reaches_every_node_proxy() -> None:
    snap = f.fleet()
    (route,) = snap.routes
    fifty = replace(route, backends=(BackendRef("checkout", "shop", 80, 50), BackendRef("checkout-v2", "shop", 80, 50)))
    configs = render_configs(build_engine(replace(snap, routes=(fifty,)), offline_observations(snap)))
    for cfg in configs.values():
        if cfg.mode is ProxyMode.NODE:
            svc = next(s for s in cfg.services if s.hostname == CHECKOUT)
            assert [(b.hostname, b.weight) for b in svc.routes] == [(CHECKOUT, 50), (CHECKOUT_V2, 50)]
