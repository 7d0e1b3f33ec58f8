"""The actor-boundary codecs: framing, snapshots, config deltas and health reports round-trip."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest

from benchmarks.simproxy import make_config
from federation.controller.reconciler import EndpointReport
from federation.controller.wire import (
    decode_config_deltas,
    decode_health_report,
    decode_json,
    decode_snapshot,
    encode_config_deltas,
    encode_json,
    encode_snapshot,
    pack,
    unpack,
)
from tests.unit.core.factory import fleet
from ztunnel.api.config import Stamp, apply_delta
from ztunnel.api.proto import meshfed_pb2 as pb


@pytest.mark.parametrize("messages", [[], [b""], [b"a", b"", b"x" * 70_000]])
def test_framing_round_trips(messages: list[bytes]) -> None:
    assert unpack(pack(messages)) == messages


@pytest.mark.parametrize("blob", [b"\x00\x00", b"\x00\x00\x00\x05abc"])
def test_a_truncated_frame_is_refused(blob: bytes) -> None:
    with pytest.raises(ValueError, match=r"truncated|claims"):
        unpack(blob)


def test_snapshots_keep_their_read_only_maps() -> None:
    snap = fleet()
    back = decode_snapshot(encode_snapshot(snap))
    assert back == snap and isinstance(back.clusters, MappingProxyType)
    with pytest.raises(TypeError):
        back.clusters["x"] = back.clusters["east"]  # type: ignore[index]


def test_config_deltas_rebuild_the_config_on_the_other_side() -> None:
    v1 = replace(make_config("ztunnel/a/n1", "rev1", services=3), stamp=Stamp(1, "rev1", 1))
    v2 = replace(make_config("ztunnel/a/n1", "rev2", services=2, seed=1), stamp=Stamp(1, "rev2", 2))
    g1 = replace(make_config("gateway/a", "rev1"), stamp=Stamp(1, "rev1", 1))
    (first, gw) = decode_config_deltas(encode_config_deltas([(None, v1), (None, g1)]))
    assert (first.proxy_id, gw.proxy_id) == ("ztunnel/a/n1", "gateway/a") and not first.remove
    got1 = apply_delta(None, first.delta, first.template)
    (second,) = decode_config_deltas(encode_config_deltas([(v1, v2)]))
    assert second.delta.base_version == 1
    got2 = apply_delta(got1, second.delta, second.template)
    assert {s.hostname: s for s in got2.services} == {s.hostname: s for s in v2.services}
    assert got2.stamp == v2.stamp


def test_health_reports_decode_into_endpoint_reports() -> None:
    report = pb.HealthReport(proxy_id="ztunnel/a/n1")
    report.outcomes.add(service="checkout.shop", workload_uid="b/shop/p1", cluster="b", ok=3, failed=7, ejected=True)
    assert decode_health_report(report.SerializeToString()) == [
        EndpointReport("checkout.shop", "b/shop/p1", "b", 3, 7, True)]


def test_documents_are_json() -> None:
    assert decode_json(encode_json({"a": [1, 2.5, "x"], "b": None})) == {"a": [1, 2.5, "x"], "b": None}


def test_proxies_that_share_a_view_share_its_objects_after_decoding() -> None:
    """The distributor encodes a shared view once for all the proxies that have it (by object
    identity): decoding each proxy's copy on its own would give every proxy its own objects."""
    shared = make_config("ztunnel/a/n1", "rev1", services=3)
    configs = [replace(shared, proxy_id=f"ztunnel/a/n{i}", stamp=Stamp(1, "rev1", 1)) for i in range(4)]
    decoded = decode_config_deltas(encode_config_deltas([(None, c) for c in configs]))
    got = [apply_delta(None, d.delta, d.template) for d in decoded]
    assert [g.services for g in got] == [shared.services] * 4
    assert all(a is b for g in got[1:] for a, b in zip(g.services, got[0].services, strict=True))
    # and across blobs: the next push of the same resources decodes to the same objects
    (again,) = decode_config_deltas(encode_config_deltas([(None, configs[0])]))
    assert all(a is b for a, b in zip(again.delta.upserts["services"], got[0].services, strict=True))


def test_a_resource_that_does_not_parse_is_refused_with_its_key() -> None:
    msg = pb.ConfigResponse(proxy=pb.ProxyHeader(proxy_id="ztunnel/a/n1"))
    msg.upserts.add(type="services", key="x.ns", body=b'{"hostname": 3}')
    with pytest.raises(ValueError, match="does not parse"):
        decode_config_deltas(pack([msg.SerializeToString()]))
    bad_kind = pb.ConfigResponse(proxy=pb.ProxyHeader(proxy_id="ztunnel/a/n1"))
    bad_kind.upserts.add(type="gadgets", key="g", body=b"{}")
    with pytest.raises(ValueError, match="unknown resource type 'gadgets'"):
        decode_config_deltas(pack([bad_kind.SerializeToString()]))


def test_config_deltas_say_what_diff_configs_says() -> None:
    """The blob is encoded like a push (shared per-kind segments): decoded, each proxy's delta is
    the codec's `diff_configs` of its pair — upserts, removals, base, identities."""
    from ztunnel.api.config import diff_configs

    v1 = replace(make_config("ztunnel/a/n1", "rev1", services=4), stamp=Stamp(1, "rev1", 1),
                 local_identities=("spiffe://a.example/ns/x/sa/y",))
    v2 = replace(make_config("ztunnel/a/n1", "rev2", services=2, seed=1), stamp=Stamp(1, "rev2", 2))
    v3 = replace(v2, stamp=Stamp(1, "rev3", 3))
    for old, new in [(None, v1), (v1, v2), (v2, v3), (v1, v1)]:
        (got,) = decode_config_deltas(encode_config_deltas([(old, new)]))
        assert got.delta == diff_configs(old, new)
