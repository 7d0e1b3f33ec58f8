"""The proxy's config state: per-resource rejection, never going back in (epoch, version), and the
persisted last good config a restart serves from."""

from __future__ import annotations

import json
import re
import stat
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from federation.controller.ca import TrustDomainCA
from ztunnel.api.config import (
    Authorization,
    AuthzMatch,
    Endpoint,
    ProxyConfig,
    ProxyMode,
    Service,
    ServicePortMap,
    Stamp,
    TrustBundle,
    Workload,
    proxy_config_to_dict,
)
from ztunnel.xds.state import ProxyState, build_indexes, parse_host_port, validate_config

TD = "east.mesh"
ID = f"spiffe://{TD}/ns/shop/sa/cart"


@cache
def good_bundle() -> TrustBundle:
    return TrustDomainCA.create(TD).trust_bundle()


def workload(name: str = "cart-1", address: str = "10.1.0.5", node: str = "n1", **kw: Any) -> Workload:
    return Workload(uid=f"east/shop/{name}", name=name, namespace="shop", cluster="east", network="east",
                    node=node, address=address, identity=ID, service_account="cart", node_address="10.0.0.1",
                    **kw)


def endpoint(uid: str = "east/shop/cart-1", **kw: Any) -> Endpoint:
    base: dict[str, Any] = dict(workload_uid=uid, cluster="east", network="east", address="10.1.0.5", port=8080,
                                hbone_address="10.0.0.1:15008", identity=ID)
    base.update(kw)
    return Endpoint(**base)


def service(hostname: str = "cart.shop.svc.clusterset.local", **kw: Any) -> Service:
    base: dict[str, Any] = dict(hostname=hostname, namespace="shop", name=hostname.split(".")[0], vip="10.96.0.5",
                                ports=(ServicePortMap(80, 8080),), endpoints=(endpoint(),))
    base.update(kw)
    return Service(**base)


def config(version: int = 1, epoch: int = 1, **kw: Any) -> ProxyConfig:
    base: dict[str, Any] = dict(proxy_id="ztunnel/east/n1", mode=ProxyMode.NODE, cluster="east", network="east",
                                trust_domain=TD, stamp=Stamp(epoch, "sha", version), workloads=(workload(),),
                                services=(service(),), bundles=(good_bundle(),))
    base.update(kw)
    return ProxyConfig(**base)


# --- per-resource rejection -------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "bad", "fragment"), [
    ("workloads", workload("bad", address="not-an-ip"), "not an IP"),
    ("workloads", replace(workload("bad2", address="10.1.0.9"), identity="spiffe://east.mesh/oops"), ""),
    ("services", service("nop.shop.svc.clusterset.local", ports=()), "no ports"),
    ("services", service("badep.shop.svc.clusterset.local", endpoints=(endpoint(port=0),)), "outside 1..65535"),
    ("services", service("nowhere.shop.svc.clusterset.local",
                         endpoints=(endpoint(hbone_address="", gateway=""),)), "needs hbone_address"),
    ("services", service("slow.shop.svc.clusterset.local", connect_timeout_s=0), "must be > 0"),
    ("services", service("vip.shop.svc.clusterset.local", vip="10.96.0.999"), "not an IP"),
    ("authorizations", Authorization("audit", "shop", "AUDIT", (AuthzMatch(),)), "not ALLOW or DENY"),
    ("authorizations", Authorization("port", "shop", "DENY", (AuthzMatch(ports=(70000,)),)), "outside"),
    ("bundles", TrustBundle("west.mesh", ()), "no roots"),
    ("bundles", TrustBundle("West.Mesh", good_bundle().roots_pem), ""),
    ("bundles", TrustBundle("west.mesh", ("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",)), ""),
])
def test_a_bad_resource_rejects_itself_and_the_rest_applies(kind: str, bad: Any, fragment: str) -> None:
    cfg = config()
    changes: dict[str, Any] = {kind: (*getattr(cfg, kind), bad)}
    mixed = replace(cfg, **changes)
    st = ProxyState()
    result = st.apply(mixed)
    assert result.applied
    assert [(e.kind, e.key) for e in result.rejected] == [(kind, bad.key)]
    assert fragment in result.rejected[0].reason
    assert st.config is not None
    assert getattr(st.config, kind) == getattr(cfg, kind)      # the good ones are all there
    for other in ("workloads", "services", "authorizations", "bundles"):
        if other != kind:
            assert getattr(st.config, other) == getattr(cfg, other)


def test_parse_errors_from_the_wire_form_reject_only_their_resource() -> None:
    data = proxy_config_to_dict(config())
    data["services"].append({"hostname": "typo.shop.svc.clusterset.local", "namspace": "shop"})
    data["workloads"].append("not an object")
    st = ProxyState()
    result = st.apply_dict(data)
    assert result.applied
    assert sorted(e.kind for e in result.rejected) == ["services", "workloads"]
    assert any("namspace" in e.reason for e in result.rejected)
    assert st.config is not None and len(st.config.services) == 1 and len(st.config.workloads) == 1


def test_an_endpoint_from_the_wire_is_the_same_on_the_fast_path_and_odd_values_take_the_general_one() -> None:
    """Flat resources whose values are all scalars skip the per-field conversion (100k endpoints in
    a full state); the result is the same object, with its repeated strings interned. A list or an
    object where a scalar belongs takes the general path and is converted as it always was, and an
    unknown field is still refused by name."""
    from ztunnel.api.config import _build, resource_to_dict

    ep = endpoint()
    wire = json.loads(json.dumps(resource_to_dict(ep)))
    built = _build(Endpoint, wire)
    assert built == ep and built.cluster is ep.cluster == "east"     # interned: the one string
    odd = _build(Endpoint, {**wire, "region": ["a", "b"], "zone": {"z": 1}})
    assert odd.region == ("a", "b") and odd.zone == {"z": 1}
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['zonne'\]"):
        _build(Endpoint, {**wire, "zonne": "z1"})


def test_a_service_whose_endpoints_travel_as_a_table_is_the_same_service() -> None:
    """The table form (`ENDPOINT_TABLES`, for proxies that announce it) builds exactly the service
    the object form builds, in about half the bytes, with repeated strings interned; a writer with
    other columns (an older controller: fewer fields, another order) still builds."""
    from ztunnel.api.config import parse_resources, resource_to_dict

    svc = service(endpoints=tuple(endpoint(f"east/shop/cart-{i}", address=f"10.1.0.{i}", zone="z1")
                                  for i in range(50)))
    objects = json.dumps(resource_to_dict(svc))
    table = json.dumps(resource_to_dict(svc, tables=True))
    assert len(table) < 0.6 * len(objects)
    good, bad = parse_resources("services", [json.loads(table)])
    assert not bad and good == [svc] == parse_resources("services", [json.loads(objects)])[0]
    assert all(e.cluster is good[0].endpoints[0].cluster for e in good[0].endpoints)
    older = {"columns": ["port", "address", "workload_uid", "cluster", "network", "hbone_address"],
             "rows": [[8080, "10.1.0.9", "east/shop/cart-9", "east", "east", "10.0.0.1:15008"]]}
    good, bad = parse_resources("services", [{**json.loads(objects), "endpoints": older}])
    assert not bad and good[0].endpoints == (endpoint("east/shop/cart-9", address="10.1.0.9", identity=""),)
    empty = json.loads(json.dumps(resource_to_dict(service(endpoints=()), tables=True)))
    assert parse_resources("services", [empty])[0][0].endpoints == ()


@pytest.mark.parametrize(("endpoints", "reason"), [
    ({"columns": ["workload_uid"], "rows": [], "extra": 1}, "exactly 'columns' and 'rows'"),
    ({"columns": "workload_uid", "rows": [["x"]]}, "distinct field names"),
    ({"columns": ["port", "port"], "rows": [[1, 2]]}, "distinct field names"),
    ({"columns": ["workload_uid"], "rows": {"0": ["x"]}}, "rows are a list"),
    ({"columns": ["workload_uid", "cluster", "network", "address", "port", "hbone_address", "zonne"],
      "rows": [["u", "c", "n", "a", 1, "h", "z"]]}, r"unknown field\(s\) \['zonne'\]"),
    ({"columns": ["workload_uid", "cluster"], "rows": [["u", "c"]]}, r"missing field\(s\)"),
    ({"columns": ["workload_uid", "cluster", "network", "address", "port", "hbone_address"],
      "rows": [["u", "c", "n", "a", 1]]}, "row 0 is not a list of 6 values"),
    ({"columns": ["workload_uid", "cluster", "network", "address", "port", "hbone_address"],
      "rows": [["u", "c", "n", "a", 1, "h"], ["u", "c", "n", "a", 1, {"h": 1}]]}, "row 1 holds a list or an object"),
])
def test_a_bad_endpoint_table_rejects_its_service_with_the_reason(endpoints: Any, reason: str) -> None:
    from ztunnel.api.config import parse_resources, resource_to_dict

    body = {**resource_to_dict(service()), "endpoints": endpoints}
    good, bad = parse_resources("services", [resource_to_dict(service("b.shop.svc.clusterset.local")), body])
    assert [s.hostname for s in good] == ["b.shop.svc.clusterset.local"]   # the other service applies
    assert len(bad) == 1 and bad[0].key == "cart.shop.svc.clusterset.local"
    assert "endpoints" in bad[0].reason and re.search(reason, bad[0].reason), bad[0].reason


def test_an_empty_table_with_a_column_this_version_does_not_know_is_refused() -> None:
    from ztunnel.api.config import parse_resources, resource_to_dict

    body = {**resource_to_dict(service()), "endpoints": {"columns": ["bogus"], "rows": []}}
    good, bad = parse_resources("services", [body])
    assert not good and "unknown field(s) ['bogus']" in bad[0].reason


def test_the_wire_body_cache_is_bounded_by_bytes() -> None:
    from ztunnel.api.codec import _BodyCache

    cache = _BodyCache(max_bytes=64 * 1024, tables=True)
    services = [service(f"s{i}.shop.svc.clusterset.local",
                        endpoints=tuple(endpoint(f"east/shop/p{i}-{j}") for j in range(50))) for i in range(40)]
    for svc in services:
        cache.body(svc)
    assert cache._bytes <= 64 * 1024 and len(cache._d) < len(services)
    assert cache.body(services[-1]) is cache.body(services[-1])   # the latest is still cached


def test_validate_config_is_pure() -> None:
    cfg = config(services=(service(), service("x.shop.svc.clusterset.local", ports=())))
    clean, errors = validate_config(cfg)
    assert len(clean.services) == 1 and len(errors) == 1
    assert len(cfg.services) == 2  # input untouched


# --- never go back ----------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second", "applied"), [
    ((1, 5), (1, 6), True),
    ((1, 5), (1, 5), False),   # same version: not newer
    ((1, 5), (1, 4), False),   # older version
    ((2, 1), (1, 9), False),   # older epoch wins over a higher version
    ((1, 9), (2, 1), True),    # a new controller epoch restarts versions
])
def test_never_apply_an_older_epoch_version(first: tuple[int, int], second: tuple[int, int], applied: bool) -> None:
    st = ProxyState()
    assert st.apply(config(epoch=first[0], version=first[1])).applied
    newer = config(epoch=second[0], version=second[1], services=())
    result = st.apply(newer)
    assert result.applied is applied
    assert st.config is not None
    assert st.config.stamp == (newer.stamp if applied else Stamp(first[0], "sha", first[1]))
    assert st.last_attempted_version == second[1]  # attempted is tracked apart from applied


@pytest.mark.parametrize("header", [
    {"trust_domain": "Not A Domain"},
    {"federated_trust_domains": ("ok.mesh", "UPPER.mesh")},
])
def test_an_unusable_header_keeps_the_previous_config(header: dict[str, Any]) -> None:
    st = ProxyState()
    st.apply(config(version=1))
    result = st.apply(replace(config(version=2), **header))
    assert not result.applied and "kept the previous config" in result.reason
    assert st.config is not None and st.config.stamp.version == 1


def test_a_wire_config_without_header_fields_is_refused_whole() -> None:
    st = ProxyState()
    st.apply(config(version=1))
    result = st.apply_dict({"services": []})
    assert not result.applied and st.config is not None and st.config.stamp.version == 1


# --- persistence --------------------------------------------------------------------------------


def test_last_good_config_is_persisted_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "state" / "last-good-config.json"
    st = ProxyState(path)
    cfg = config(version=3, federated_trust_domains=("west.mesh",),
                 authorizations=(Authorization("a", "shop", "ALLOW", (AuthzMatch(ports=(80,)),)),))
    assert st.apply(cfg).applied
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not path.with_suffix(".tmp").exists()
    # a bad config afterwards (refused whole) does not overwrite the last good one
    st.apply(replace(config(version=4), trust_domain="BAD"))
    restarted = ProxyState(path)
    result = restarted.load_persisted()
    assert result is not None and result.applied
    assert restarted.config == st.config == cfg


def test_persisted_config_holds_only_the_accepted_resources(tmp_path: Path) -> None:
    path = tmp_path / "last-good-config.json"
    st = ProxyState(path)
    st.apply(config(services=(service(), service("x.shop.svc.clusterset.local", ports=()))))
    data = json.loads(path.read_text())
    assert [s["hostname"] for s in data["services"]] == ["cart.shop.svc.clusterset.local"]


def test_no_persisted_config_or_unreadable_one(tmp_path: Path) -> None:
    assert ProxyState(tmp_path / "absent.json").load_persisted() is None
    assert ProxyState(None).load_persisted() is None
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = ProxyState(broken).load_persisted()
    assert result is not None and not result.applied and "unreadable" in result.reason


# --- indexes ------------------------------------------------------------------------------------


def test_indexes_find_services_workloads_and_local_pods() -> None:
    remote = workload("cart-2", address="10.1.1.5", node="n2")
    ix = build_indexes(config(workloads=(workload(), remote)))
    assert ix.services_by_vip[("10.96.0.5", 80)].hostname == "cart.shop.svc.clusterset.local"
    assert set(ix.local_workloads_by_address) == {"10.1.0.5"}      # only pods on node n1
    assert ix.workloads_by_identity[ID].name == "cart-1"
    assert ix.service_of_local_workload == {"east/shop/cart-1": "cart.shop.svc.clusterset.local"}
    found = ix.find_endpoint_by_address("10.1.0.5")
    assert found is not None and found.hbone_address == "10.0.0.1:15008"
    assert ix.find_endpoint_by_address("10.9.9.9") is None


def test_an_address_names_a_workload_only_within_its_network() -> None:
    """Clusters on different networks may share pod CIDRs (kind's defaults): a pod of another
    network with the same IP as a local pod is neither that pod nor reachable by its IP here."""
    twin = "10.1.0.5"  # the local cart-1's address, reused by a pod of west (network west)
    west_pod = Workload(uid="west/shop/cart-0", name="cart-0", namespace="shop", cluster="west", network="west",
                        node="n1", address=twin, identity="spiffe://west.mesh/ns/shop/sa/cart",
                        service_account="cart")
    west_ep = endpoint("west/shop/cart-0", cluster="west", network="west", address=twin,
                       hbone_address="10.0.0.1:15008", identity="spiffe://west.mesh/ns/shop/sa/cart")
    other = service("other.shop.svc.clusterset.local", vip="10.96.0.6", endpoints=(west_ep,))
    cfg = config(workloads=(workload(), west_pod), services=(other, service()))
    ix = build_indexes(cfg)
    assert ix.workloads_by_address[twin].uid == "east/shop/cart-1"
    assert ix.local_workloads_by_uid.keys() == {"east/shop/cart-1"}
    # the local pod backs cart only: west's endpoint of `other` is not it, though its address is equal
    assert ix.service_of_local_workload == {"east/shop/cart-1": "cart.shop.svc.clusterset.local"}
    assert ix.local_endpoints(other) == []
    found = ix.find_endpoint_by_address(twin)
    assert found is not None and found.workload_uid == "east/shop/cart-1"
    # an inbound tunnel for `other` finds no local endpoint (before: the local cart-1 by its address)
    from ztunnel.proxy.plan import plan_inbound
    plan = plan_inbound(cfg, ix, "other.shop.svc.clusterset.local:80", ID, ())
    assert plan.status == 503 and plan.target is None
    ok = plan_inbound(cfg, ix, "cart.shop.svc.clusterset.local:80", ID, ())
    assert ok.target == (twin, 8080)


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.5:15008", ("10.0.0.5", 15008)), ("[fd00::1]:80", ("fd00::1", 80)),
    ("svc.ns.svc.clusterset.local:8080", ("svc.ns.svc.clusterset.local", 8080)),
])
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.5", ":80", "host:http", "host:0", "host:70000"])
def test_parse_host_port_refuses_with_the_fix(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)
