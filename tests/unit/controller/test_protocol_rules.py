"""The config protocol's rules, sans-IO: codec, proxy-side Subscription, controller-side ProxySession."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.simproxy import make_config
from federation.controller.distributor import ConfigDistributor, ProxySession, StaleEpochError, SyncState
from ztunnel.api.codec import OversizeError, decode_delta, encode_delta
from ztunnel.api.config import Stamp, canonical, diff_configs
from ztunnel.xds.client import Subscription

PID = "ztunnel/a/n1"


def push(sub: Subscription, cfg_old: object, cfg_new: object, nonce: str = "n", max_bytes: int = 4 << 20) -> object:
    delta = diff_configs(cfg_old, cfg_new)  # type: ignore[arg-type]
    out = None
    for msg in encode_delta(delta, cfg_new, nonce, max_bytes):  # type: ignore[arg-type]
        out = sub.on_response(msg)
    assert out is not None
    if out.apply is not None:  # type: ignore[attr-defined]
        sub.commit(out.apply)  # type: ignore[attr-defined]
    return out


def stamped(cfg: object, epoch: int, version: int) -> object:
    return replace(cfg, stamp=Stamp(epoch, cfg.stamp.revision, version))  # type: ignore[attr-defined]


def test_full_state_then_delta_applies() -> None:
    sub = Subscription(make_config(PID, ""))
    c1 = stamped(make_config(PID, "r1", services=2), 1, 1)
    assert not push(sub, None, c1).error  # type: ignore[attr-defined]
    c2 = stamped(make_config(PID, "r2", services=3), 1, 2)
    assert not push(sub, c1, c2).error  # type: ignore[attr-defined]
    assert sub.current is not None and canonical(sub.current) == canonical(c2)  # type: ignore[arg-type]


@pytest.mark.parametrize(("have", "offered", "applies", "why"), [
    ((1, 5), (1, 6), True, ""),
    ((1, 5), (1, 5), False, "not newer"),
    ((1, 5), (1, 4), False, "not newer"),
    ((2, 1), (1, 9), False, "split brain"),
    ((1, 9), (2, 1), True, ""),
])
def test_never_older_and_stale_epoch(have: tuple[int, int], offered: tuple[int, int], applies: bool, why: str) -> None:
    cur = stamped(make_config(PID, "have"), *have)
    sub = Subscription(make_config(PID, ""), cur)  # type: ignore[arg-type]
    out = push(sub, None, stamped(make_config(PID, "new", services=2), *offered))
    assert (out.apply is not None) is applies  # type: ignore[attr-defined]
    assert why in out.error  # type: ignore[attr-defined]
    assert out.stale_controller is (why == "split brain")  # type: ignore[attr-defined]
    assert sub.current.stamp.revision == ("new" if applies else "have")  # type: ignore[union-attr]


def test_delta_on_wrong_base_asks_for_resync() -> None:
    cur = stamped(make_config(PID, "have"), 1, 3)
    sub = Subscription(make_config(PID, ""), cur)  # type: ignore[arg-type]
    other_base = stamped(make_config(PID, "x"), 1, 2)
    out = push(sub, other_base, stamped(make_config(PID, "new", services=2), 1, 4))
    assert out.error.startswith("resync")  # type: ignore[attr-defined]


def test_bad_resource_nacks_whole_response() -> None:
    sub = Subscription(make_config(PID, ""))
    c1 = stamped(make_config(PID, "r1", services=2), 1, 1)
    msgs = encode_delta(diff_configs(None, c1), c1, "n")  # type: ignore[arg-type]
    msgs[0].upserts[0].body = b'{"hostname": "x", "bogus": 1}'
    out = sub.on_response(msgs[0])
    assert out.apply is None and "rejected resources" in out.error and out.reply.nack
    assert list(out.reply.rejected_keys)


@settings(max_examples=25, deadline=None)
@given(services=st.integers(1, 30), eps=st.integers(1, 30), limit_kib=st.integers(8, 64))
def test_chunking_round_trips(services: int, eps: int, limit_kib: int) -> None:
    cfg = stamped(make_config(PID, "r", services=services, endpoints_per_service=eps), 1, 1)
    delta = diff_configs(None, cfg)  # type: ignore[arg-type]
    try:
        msgs = encode_delta(delta, cfg, "n", limit_kib * 1024)  # type: ignore[arg-type]
    except OversizeError as e:
        assert "message limit" in str(e)
        return
    assert all(m.ByteSize() <= limit_kib * 1024 for m in msgs)
    assert len(decode_delta(msgs).delta.upserts["services"]) == services
    sub = Subscription(make_config(PID, ""))
    for m in msgs[:-1]:
        assert sub.on_response(m).reply is None  # waits for the last chunk
    out = sub.on_response(msgs[-1])
    assert out.apply is not None and canonical(out.apply) == canonical(cfg)  # type: ignore[arg-type]


def test_session_one_push_in_flight_latest_wins_and_sync_states() -> None:
    s = ProxySession(PID, epoch=4)
    nonces = itertools.count()
    assert s.sync is SyncState.NOT_SENT
    s.set_desired(make_config(PID, "r1"), 0)
    s.attach(None)
    p1 = s.next_push(0, nonces)
    assert p1 is not None and p1.config.stamp == Stamp(4, "r1", 1)
    s.set_desired(make_config(PID, "r2", services=2), 0)
    s.set_desired(make_config(PID, "r3", services=3), 0)
    assert s.next_push(0, nonces) is None and s.sync is SyncState.STALE   # one in flight
    s.on_reply(p1.nonce, False, "", 0.01)
    p2 = s.next_push(0.01, nonces)
    assert p2 is not None and p2.config.stamp == Stamp(4, "r3", 2)       # r2 coalesced away
    s.on_reply(p2.nonce, False, "", 0.02)
    assert s.sync is SyncState.SYNCED and s.next_push(1, nonces) is None
    # same content, newer revision: nothing to send
    assert not s.set_desired(make_config(PID, "r4", services=3), 2)


def test_distributor_refuses_proxy_from_newer_epoch() -> None:
    d = ConfigDistributor(epoch=2)
    with pytest.raises(StaleEpochError, match="split brain"):
        d.attach(PID, Stamp(3, "r", 1))
    assert d.stale_epoch_refusals == 1
    s = d.attach(PID, Stamp(2, "r", 7))  # same epoch (e.g. reconnect): versions continue above 7
    s.set_desired(make_config(PID, "r9", services=2), 0)
    assert d.build(s) and s.in_flight is not None and s.in_flight.config.stamp.version == 8


@pytest.mark.parametrize(("proxy_id", "identity", "allowed"), [
    ("ztunnel/east/node-1", "spiffe://east.td/ns/meshfed-system/sa/ztunnel.east.node-1", True),
    ("gateway/east", "spiffe://east.td/ns/meshfed-system/sa/gateway.east", True),
    ("ztunnel/east/node-1", "spiffe://east.td/ns/meshfed-system/sa/ztunnel.east.node-2", False),  # another proxy
    ("ztunnel/east/node-1", "spiffe://west.td/ns/meshfed-system/sa/ztunnel.east.node-1", False),  # other domain
    ("ztunnel/east/node-1", "spiffe://east.td/ns/shop/sa/ztunnel.east.node-1", False),            # a workload
    ("ztunnel/east/node-1", "", False),                                                           # no certificate
    ("ztunnel/north/node-1", "spiffe://east.td/ns/meshfed-system/sa/ztunnel.north.node-1", False),  # unknown cluster
    ("ztunnel", "spiffe://east.td/ns/meshfed-system/sa/ztunnel", False),                          # malformed id
])
def test_proxy_may_act_only_as_itself(proxy_id: str, identity: str, allowed: bool) -> None:
    from federation.controller.signing import ProxyAuthorizer

    reason = ProxyAuthorizer({"east": "east.td", "west": "west.td"})(proxy_id, identity)
    assert (reason == "") is allowed, reason
    if not allowed:
        assert proxy_id.split("/")[-1] in reason or "not in the fleet repo" in reason or "kind" in reason


def test_a_body_nested_past_the_parser_is_rejected_not_raised() -> None:
    """json raises RecursionError (not ValueError) on deep nesting: it must reject that resource
    like any other body that is not JSON, never end the proxy's stream without a NACK."""
    c1 = stamped(make_config(PID, "r1", services=2), 1, 1)
    (msg,) = encode_delta(diff_configs(None, c1), c1, "n", tables=True)  # type: ignore[arg-type]
    msg.upserts[0].body = b"[" * 200_000
    dec = decode_delta([msg])
    assert len(dec.rejected) == 1 and "body is not JSON" in dec.rejected[0]
    assert len(dec.delta.upserts["services"]) == 1


def test_a_null_where_a_number_belongs_rejects_that_service_only() -> None:
    from ztunnel.xds.state import validate_config

    c1 = stamped(make_config(PID, "r1", services=2), 1, 1)
    (msg,) = encode_delta(diff_configs(None, c1), c1, "n", tables=True)  # type: ignore[arg-type]
    body = json.loads(msg.upserts[0].body)
    body["endpoints"]["rows"][0][body["endpoints"]["columns"].index("port")] = None
    msg.upserts[0].body = json.dumps(body).encode()
    out = Subscription(make_config(PID, "")).on_response(msg)
    assert out.apply is not None
    clean, errors = validate_config(out.apply)
    assert len(clean.services) == 1 and [e.key for e in errors] == [body["hostname"]]
