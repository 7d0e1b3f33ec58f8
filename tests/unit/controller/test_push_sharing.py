"""The config server's shared fan-out: what `ConfigDistributor.build` puts on the wire must be
exactly what the per-proxy codec (`diff_configs` + `encode_delta`) would send, whether the
bytes were computed for this proxy or reused from another with the same view transition."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest

from benchmarks.simproxy import make_config
from federation.controller.distributor import ConfigDistributor, SyncState
from federation.server.grpc_services import ConfigServer
from ztunnel.api.codec import CHUNK_OVERHEAD_BYTES, decode_delta, encode_delta, resource_body
from ztunnel.api.config import ENDPOINT_TABLES, Stamp, Workload, canonical, diff_configs
from ztunnel.api.proto import meshfed_pb2 as pb
from ztunnel.xds.client import Subscription


def _ack(d: ConfigDistributor, pid: str) -> None:
    s = d.sessions[pid]
    assert s.in_flight is not None
    d.on_reply(s, pb.ConfigRequest(response_nonce=s.in_flight.nonce))


def _with_workload(cfg: object, n: int) -> object:
    w = Workload(f"a/ns/pod-{n}", f"pod-{n}", "ns", "a", "net-a", "n1", f"10.9.0.{n}",
                 f"spiffe://a.example/ns/ns/sa/sa{n}", f"sa{n}")
    return replace(cfg, workloads=(w,), local_identities=(w.identity,))  # type: ignore[type-var]


@pytest.mark.parametrize(("services_before", "services_after", "own_workloads"), [
    (2, 3, False),   # a service added: one upsert shared by every proxy
    (3, 1, False),   # services removed
    (2, 2, True),    # per-proxy workloads, shared services
    (0, 4, True),
])
def test_shared_bytes_equal_the_per_proxy_codec(services_before: int, services_after: int,
                                               own_workloads: bool) -> None:
    d = ConfigDistributor(epoch=5)
    pids = [f"ztunnel/a/n{i}" for i in range(6)]
    subs = {p: Subscription(make_config(p, "")) for p in pids}
    before = make_config(pids[0], "r1", services=services_before)
    after = make_config(pids[0], "r2", services=services_after, seed=1)  # new objects, other ports

    def desired(base: object, i: int, pid: str) -> object:
        cfg = replace(base, proxy_id=pid)  # type: ignore[type-var]
        return _with_workload(cfg, i) if own_workloads else cfg

    for rev_cfg in (before, after):
        d.set_desired({p: desired(rev_cfg, i, p) for i, p in enumerate(pids)})  # type: ignore[misc]
        for p in pids:
            # every other proxy reads endpoint tables (a fleet in the middle of an upgrade)
            features = [ENDPOINT_TABLES] if pids.index(p) % 2 else []
            s = d.attach(p, subs[p].have, features) if not d.sessions[p].connected else d.sessions[p]
            old = s.acked
            wire = d.build(s)
            assert s.in_flight is not None
            expected = encode_delta(diff_configs(old, s.in_flight.config), s.in_flight.config, s.in_flight.nonce,
                                    tables=bool(features))
            got = [pb.ConfigResponse.FromString(b) for b in wire]
            assert got == expected                                  # the same messages, field for field
            services = [json.loads(r.body) for m in got for r in m.upserts if r.type == "services"]
            assert all(isinstance(svc["endpoints"], dict) is bool(features) for svc in services)
            out = None
            for m in got:
                out = subs[p].on_response(m)
            assert out is not None and out.apply is not None, out
            subs[p].commit(out.apply)
            assert canonical(out.apply) == canonical(s.in_flight.config)
            _ack(d, p)
            assert d.sessions[p].sync is SyncState.SYNCED
    assert d.segments.hits > 0  # the services change was encoded once for several proxies


def test_equal_content_in_new_objects_is_not_pushed_again() -> None:
    d = ConfigDistributor(epoch=1)
    pid = "ztunnel/a/n1"
    d.set_desired({pid: make_config(pid, "r1", services=3)})
    s = d.attach(pid, None)
    assert d.build(s)
    _ack(d, pid)
    # a re-render: new objects, same content, newer revision -> nothing to send, still SYNCED
    assert d.set_desired({pid: make_config(pid, "r2", services=3)}) == 0
    assert d.build(s) == [] and s.sync is SyncState.SYNCED
    assert s.desired is not None and s.desired.stamp.revision == "r2"


@pytest.mark.parametrize("features", [[], [ENDPOINT_TABLES]])
def test_oversize_delta_falls_back_to_chunks(features: list[str]) -> None:
    limit = 8 * 1024 if features else 16 * 1024   # tables are about half the bytes
    d = ConfigDistributor(epoch=1, max_message_bytes=limit)
    pid = "ztunnel/a/n1"
    cfg = make_config(pid, "r1", services=20, endpoints_per_service=20)
    d.set_desired({pid: cfg})
    s = d.attach(pid, None, features)
    wire = d.build(s)
    assert len(wire) > 1 and all(len(b) <= limit for b in wire)
    sub = Subscription(make_config(pid, ""))
    outs = [sub.on_response(pb.ConfigResponse.FromString(b)) for b in wire]
    assert outs[-1].apply is not None and canonical(outs[-1].apply) == canonical(replace(cfg, stamp=Stamp(1, "r1", 1)))


def test_write_watchdog_disconnects_a_stuck_stream() -> None:
    async def scenario() -> tuple[bool, int]:
        srv = ConfigServer(ConfigDistributor(epoch=1), insecure=True, write_timeout_s=0.08)
        stuck = asyncio.ensure_future(asyncio.sleep(60))
        fine = asyncio.ensure_future(asyncio.sleep(60))
        srv._writes[stuck] = (time.monotonic() - 1.0, "ztunnel/a/stuck")  # pending for 1 s
        srv._writes[fine] = (time.monotonic() + 0.5, "ztunnel/a/fine")    # well within its deadline
        dog = asyncio.ensure_future(srv._write_watchdog())
        await asyncio.sleep(0.1)
        dog.cancel()
        fine.cancel()
        await asyncio.gather(stuck, fine, dog, return_exceptions=True)
        return stuck.cancelled() and "ztunnel/a/fine" in [v[1] for v in srv._writes.values()], srv.slow_disconnects

    cancelled, disconnects = asyncio.run(scenario())
    assert cancelled and disconnects == 1


def test_nonces_stay_unique_across_shared_pushes() -> None:
    d = ConfigDistributor(epoch=2)
    pids = [f"ztunnel/a/n{i}" for i in range(4)]
    d.set_desired({p: make_config(p, "r1", services=2) for p in pids})
    nonces = set()
    for p in pids:
        s = d.attach(p, None)
        for raw in d.build(s):
            m = pb.ConfigResponse.FromString(raw)
            nonces.add(m.nonce)
            assert m.proxy.proxy_id == p and m.stamp.version == 1 and decode_delta([m]).delta.proxy_id == p
    assert len(nonces) == len(pids)


def test_a_proxy_refused_as_oversize_is_tried_again_when_it_comes_back_reading_tables() -> None:
    """"Does not fit" was said of the object form; the same proxy upgraded (it announces tables,
    about 2.6x denser) gets its config at once, without waiting for new content."""
    pid = "ztunnel/a/n1"
    cfg = make_config(pid, "r1", services=1, endpoints_per_service=400)
    objects, table = len(resource_body(cfg.services[0])), len(resource_body(cfg.services[0], tables=True))
    d = ConfigDistributor(epoch=1, max_message_bytes=(objects + table) // 2 + CHUNK_OVERHEAD_BYTES)
    d.set_desired({pid: cfg})
    s = d.attach(pid, None)                       # an older proxy: objects, which do not fit
    assert d.build(s) == [] and s.oversize_error and s.retry_at_s == float("inf")
    d.detach(s)
    s = d.attach(pid, None, [ENDPOINT_TABLES])    # upgraded, it reconnects
    assert len(d.build(s)) == 1 and not s.oversize_error


def test_kinds_without_endpoints_are_encoded_once_for_both_wire_forms() -> None:
    d = ConfigDistributor(epoch=1)
    base = _with_workload(make_config("ztunnel/a/old", "r1", services=2), 1)
    d.set_desired({"ztunnel/a/old": base, "ztunnel/a/new": replace(base, proxy_id="ztunnel/a/new")})  # type: ignore[type-var]
    d.build(d.attach("ztunnel/a/old", None))
    misses = d.segments.misses
    d.build(d.attach("ztunnel/a/new", None, [ENDPOINT_TABLES]))
    assert d.segments.misses == misses + 1      # the services' table segment; the workloads' is shared
