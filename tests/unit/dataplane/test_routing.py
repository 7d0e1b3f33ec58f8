"""The pure route decision (`ztunnel.proxy.routing`): weighted draw, zero weights, fallback, refusals."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.api.config import Endpoint, Service, ServicePortMap, WeightedBackend
from ztunnel.proxy.routing import decide_route, draw_backend, usable_endpoints

V1 = "checkout.shop.svc.clusterset.local"
V2 = "checkout-v2.shop.svc.clusterset.local"
V3 = "checkout-v3.shop.svc.clusterset.local"


def _ep(uid: str, healthy: bool = True) -> Endpoint:
    return Endpoint(workload_uid=uid, cluster="east", network="net-east", address="10.1.0.5", port=8080,
                    hbone_address="10.1.0.1:15008", healthy=healthy)


def _svc(host: str, *uids: str, routes: tuple[WeightedBackend, ...] = (), port: int = 80) -> Service:
    name, ns = host.split(".")[:2]
    return Service(hostname=host, namespace=ns, name=name, vip="", ports=(ServicePortMap(port, 8080),),
                   endpoints=tuple(_ep(u) for u in uids), routes=routes)


def _world(*weights: tuple[str, int]) -> tuple[Service, dict[str, Service]]:
    parent = _svc(V1, "east/shop/checkout-0", routes=tuple(WeightedBackend(h, w) for h, w in weights))
    by_host = {V1: parent, V2: _svc(V2, "east/shop/checkout-v2-0"), V3: _svc(V3, "east/shop/checkout-v3-0")}
    return parent, by_host


ALL_USABLE = {V1: 1, V2: 1, V3: 1}


@pytest.mark.parametrize("weights", [((V1, 90), (V2, 10)), ((V1, 50), (V2, 50)), ((V1, 1), (V2, 3), (V3, 6))])
def test_weights_are_respected_over_many_draws(weights: tuple[tuple[str, int], ...]) -> None:
    parent, by_host = _world(*weights)
    rng = random.Random(7)
    n = 20_000
    counts = Counter(decide_route(parent, 80, by_host, rng.random(), ALL_USABLE).order[0].service.hostname
                     for _ in range(n))
    total = sum(w for _, w in weights)
    for host, w in weights:
        expected = n * w / total
        # 5 standard deviations of a binomial: fails on a wrong split, never on noise
        sd = (n * (w / total) * (1 - w / total)) ** 0.5
        assert abs(counts[host] - expected) <= 5 * sd + 1, (host, counts)


def test_the_draw_is_deterministic_given_the_random_value() -> None:
    parent, by_host = _world((V1, 90), (V2, 10))
    assert decide_route(parent, 80, by_host, 0.0, ALL_USABLE).drawn == V1
    assert decide_route(parent, 80, by_host, 0.8999, ALL_USABLE).drawn == V1
    assert decide_route(parent, 80, by_host, 0.9, ALL_USABLE).drawn == V2
    assert decide_route(parent, 80, by_host, 0.999999, ALL_USABLE).drawn == V2


@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=6),
       st.floats(min_value=0.0, max_value=1.0))
def test_zero_weight_backends_are_never_chosen_nor_fallen_back_to(weights: list[int], r: float) -> None:
    routes = tuple(WeightedBackend(f"b{i}.shop.svc.clusterset.local", w) for i, w in enumerate(weights))
    drawn = draw_backend(routes, r)
    if sum(weights) == 0:
        assert drawn is None
        return
    assert drawn is not None and drawn.weight > 0
    parent = _svc(V1, routes=routes)
    by_host = {b.hostname: _svc(b.hostname, f"east/shop/{b.hostname}-0") for b in routes}
    usable = {b.hostname: 0 for b in routes}  # nothing usable: every positive backend is still tried
    d = decide_route(parent, 80, by_host, r, usable)
    assert {t.service.hostname for t in d.order} == {b.hostname for b in routes if b.weight > 0}
    assert d.order[0].service.hostname == drawn.hostname  # nothing better: the drawn one first


def test_a_drawn_backend_without_usable_endpoints_falls_back_to_the_others() -> None:
    parent, by_host = _world((V1, 10), (V2, 60), (V3, 30))
    d = decide_route(parent, 80, by_host, 0.5, {V1: 1, V2: 0, V3: 2})   # draws V2, which is all ejected
    assert d.drawn == V2 and d.fallback
    assert [t.service.hostname for t in d.order] == [V3, V1, V2]      # live by weight, then the drawn
    assert "no usable endpoint" in d.why_not(V2)
    ok = decide_route(parent, 80, by_host, 0.5, ALL_USABLE)
    assert not ok.fallback and [t.service.hostname for t in ok.order] == [V2, V3, V1]


def test_a_backend_missing_from_the_config_or_without_the_port_is_skipped_with_the_reason() -> None:
    parent, by_host = _world((V1, 50), (V2, 50))
    del by_host[V2]
    d = decide_route(parent, 80, by_host, 0.9, {V1: 1})
    assert d.drawn == V2 and [t.service.hostname for t in d.order] == [V1] and d.fallback
    assert "not in this proxy's config" in d.why_not(V2)
    two_ports = replace(_svc(V2, "x"), ports=(ServicePortMap(81, 8080), ServicePortMap(82, 8081)))
    d = decide_route(parent, 80, {**by_host, V2: two_ports}, 0.9, {V1: 1, V2: 1})
    assert "has no port 80" in d.why_not(V2)
    single = _svc(V2, "east/shop/checkout-v2-0", port=8000)   # one port: the backendRef means it
    d = decide_route(parent, 80, {**by_host, V2: single}, 0.9, {V1: 1, V2: 1})
    assert (d.order[0].service.hostname, d.order[0].port, d.order[0].target_port) == (V2, 8000, 8080)


def test_the_parent_as_its_own_backend_means_its_own_endpoints() -> None:
    parent, by_host = _world((V1, 90), (V2, 10))
    d = decide_route(parent, 80, {V2: by_host[V2]}, 0.1, ALL_USABLE)  # parent not needed in the lookup
    assert d.order[0].service is parent


@pytest.mark.parametrize("weights, by_host_keys, reason", [
    (((V1, 0), (V2, 0)), (V1, V2), "every backend weight is 0"),
    (((V2, 1), (V3, 1)), (V1,), "no backend of"),
])
def test_refusals_say_why(weights: tuple[tuple[str, int], ...], by_host_keys: tuple[str, ...], reason: str) -> None:
    parent, by_host = _world(*weights)
    d = decide_route(parent, 80, {k: by_host[k] for k in by_host_keys}, 0.3, ALL_USABLE)
    assert d.order == () and reason in d.refused


def test_usable_endpoints_leave_out_unhealthy_and_ejected() -> None:
    svc = replace(_svc(V2, "a", "b", "c"), endpoints=(_ep("a"), _ep("b", healthy=False), _ep("c")))
    assert usable_endpoints(svc, frozenset()) == 2
    assert usable_endpoints(svc, {"a"}) == 1
    assert usable_endpoints(svc, {"a", "c"}) == 0
