"""The config protocol end to end on loopback: ConfigServer + real XdsClients (simulated proxies)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from benchmarks.simproxy import MemorySink, SimProxy, make_config
from federation.controller.distributor import ConfigDistributor, SyncState
from federation.server.grpc_services import ConfigServer, wait_until
from ztunnel.api.config import Stamp


@pytest.fixture()
async def server() -> AsyncIterator[ConfigServer]:
    srv = ConfigServer(ConfigDistributor(epoch=3), insecure=True, write_timeout_s=1.0)
    await srv.start("127.0.0.1:0")
    yield srv
    await srv.stop(0)


def target(srv: ConfigServer) -> str:
    return f"127.0.0.1:{srv.port}"


async def test_push_reaches_every_proxy_and_acks(server: ConfigServer) -> None:
    ids = [f"ztunnel/a/n{i}" for i in range(5)]
    proxies = [SimProxy(p, target(server)).start() for p in ids]
    try:
        server.dist.set_desired({p: make_config(p, "rev1") for p in ids})
        assert await wait_until(lambda: all(x.revision == "rev1" for x in proxies), 5)
        assert await wait_until(lambda: server.dist.counts()["SYNCED"] == 5, 2)
        # a one-service change travels as a delta and bumps the version by one
        server.dist.set_desired({p: make_config(p, "rev2", services=2) for p in ids})
        assert await wait_until(lambda: all(x.revision == "rev2" for x in proxies), 5)
        st = proxies[0].sub.current
        assert st is not None and st.stamp == Stamp(3, "rev2", 2) and len(st.services) == 2
    finally:
        for x in proxies:
            await x.stop()


async def test_nack_keeps_previous_version_and_is_reported(server: ConfigServer) -> None:
    bad = MemorySink(reject=lambda c: ["service svc1 uses an unknown port"] if len(c.services) > 1 else [])
    good = SimProxy("ztunnel/a/good", target(server)).start()
    nacker = SimProxy("ztunnel/a/bad", target(server), sink=bad).start()
    try:
        server.dist.set_desired({p: make_config(p, "rev1") for p in ("ztunnel/a/good", "ztunnel/a/bad")})
        assert await wait_until(lambda: good.revision == nacker.revision == "rev1", 5)
        server.dist.set_desired({p: make_config(p, "rev2", services=2) for p in ("ztunnel/a/good", "ztunnel/a/bad")})
        assert await wait_until(lambda: server.dist.sessions["ztunnel/a/bad"].nacks == 1, 5)
        assert good.revision == "rev2" and nacker.revision == "rev1"
        # the good proxy runs rev2 before its ACK reaches the controller: SYNCED follows the ACK
        assert await wait_until(lambda: server.dist.sessions["ztunnel/a/good"].sync == SyncState.SYNCED, 5)
        st = {s["proxy"]: s for s in server.dist.status()}
        assert st["ztunnel/a/bad"]["sync"] == SyncState.STALE.value
        assert "unknown port" in st["ztunnel/a/bad"]["last_nack"]
        assert st["ztunnel/a/good"]["sync"] == "SYNCED"
        # the same content is not re-sent in a loop
        await asyncio.sleep(0.2)
        assert server.dist.sessions["ztunnel/a/bad"].pushes == 2
    finally:
        await good.stop()
        await nacker.stop()


class FailsOnce(MemorySink):
    """A data plane that cannot apply its first config (e.g. its certificates were not ready)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = 0

    async def apply(self, config: Any) -> None:
        if not self.failed:
            self.failed += 1
            raise OSError("certificate service unavailable")
        await super().apply(config)


async def test_a_transient_nack_is_retried_until_the_proxy_acks(server: ConfigServer) -> None:
    """Issue 11 item 7: before, a NACKed content was never re-sent until the desired config
    changed; a proxy that failed for a moment stayed STALE for good."""
    sink = FailsOnce()
    proxy = SimProxy("ztunnel/a/n1", target(server), sink=sink).start()
    try:
        server.dist.set_desired({"ztunnel/a/n1": make_config("ztunnel/a/n1", "rev1")})
        assert await wait_until(lambda: server.dist.sessions["ztunnel/a/n1"].nacks == 1, 5)
        assert server.dist.status()[0]["sync"] == "STALE" and server.dist.status()[0]["retry_in_s"] is not None
        # no new desired config: the controller's own retry (after ~0.5-1 s of backoff) gets it through
        assert await wait_until(lambda: proxy.revision == "rev1", 5)
        assert await wait_until(lambda: server.dist.status()[0]["sync"] == "SYNCED", 2)
        st = server.dist.status()[0]
        assert st["retries"] == 1 and st["failures"] == 0 and sink.failed == 1
    finally:
        await proxy.stop()


async def test_a_proxy_no_longer_rendered_is_forgotten_and_its_stream_closed(server: ConfigServer) -> None:
    """The config service kept the sessions and status of proxies the reconciler stopped rendering
    forever; now a removal closes a connected proxy's stream, its status goes, and it gets no new
    session until it is rendered again."""
    import grpc

    gone = SimProxy("ztunnel/a/gone", target(server)).start()
    try:
        server.dist.set_desired({"ztunnel/a/gone": make_config("ztunnel/a/gone", "rev1")})
        assert await wait_until(lambda: gone.revision == "rev1", 5)
        assert server.dist.forget(["ztunnel/a/gone"], "node n2 left cluster a") == ["ztunnel/a/gone"]
        assert await wait_until(lambda: "ztunnel/a/gone" not in server.dist.sessions, 5)
        assert await wait_until(lambda: "NOT_FOUND" in gone.client.last_error, 5), gone.client.last_error
        assert "removed from the mesh (node n2 left cluster a)" in gone.client.last_error
        assert "ztunnel/a/gone" not in server.dist.sessions and gone.revision == "rev1"  # keeps what it ran
        assert grpc.StatusCode.NOT_FOUND.name in gone.client.last_error
        server.dist.set_desired({"ztunnel/a/gone": make_config("ztunnel/a/gone", "rev2", services=2)})
        assert await wait_until(lambda: gone.revision == "rev2", 10)   # rendered again: served again
    finally:
        await gone.stop()


async def test_stale_epoch_controller_is_refused() -> None:
    old = ConfigServer(ConfigDistributor(epoch=2), insecure=True)
    await old.start("127.0.0.1:0")
    newer = make_config("ztunnel/a/n1", "rev9")
    newer = replace(newer, stamp=Stamp(5, "rev9", 7))
    proxy = SimProxy("ztunnel/a/n1", f"127.0.0.1:{old.port}", current=newer).start()
    try:
        old.dist.set_desired({"ztunnel/a/n1": make_config("ztunnel/a/n1", "rev-old")})
        assert await wait_until(lambda: old.dist.stale_epoch_refusals >= 1, 5)
        assert await wait_until(lambda: "split brain" in proxy.client.last_error, 2), proxy.client.last_error
        assert proxy.client.stale_controller
        assert proxy.revision == "rev9"  # kept what it runs
    finally:
        await proxy.stop()
        await old.stop(0)


async def test_slow_proxy_does_not_delay_others(server: ConfigServer) -> None:
    slow = SimProxy("ztunnel/a/slow", target(server), sink=MemorySink(apply_delay_s=1.5)).start()
    fast = [SimProxy(f"ztunnel/a/f{i}", target(server)).start() for i in range(10)]
    try:
        ids = ["ztunnel/a/slow"] + [f.proxy_id for f in fast]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        server.dist.set_desired({p: make_config(p, "rev1") for p in ids})
        assert await wait_until(lambda: all(f.revision == "rev1" for f in fast), 3)
        assert loop.time() - t0 < 1.0
        assert slow.sink.current is None and slow.revision == ""
        assert await wait_until(lambda: slow.revision == "rev1", 5)
    finally:
        for x in [slow, *fast]:
            await x.stop()


async def test_partitioned_proxy_keeps_config_and_converges_after_return() -> None:
    srv = ConfigServer(ConfigDistributor(epoch=1), insecure=True)
    port = await srv.start("127.0.0.1:0")
    proxy = SimProxy("ztunnel/a/n1", f"127.0.0.1:{port}").start()
    try:
        srv.dist.set_desired({"ztunnel/a/n1": make_config("ztunnel/a/n1", "rev1")})
        assert await wait_until(lambda: proxy.revision == "rev1", 5)
        await srv.stop(0)  # the controller goes away
        await asyncio.sleep(0.3)
        assert proxy.revision == "rev1" and proxy.sink.current is not None  # keeps serving its config
        srv2 = ConfigServer(ConfigDistributor(epoch=2), insecure=True)
        await srv2.start(f"127.0.0.1:{port}")
        srv2.dist.set_desired({"ztunnel/a/n1": make_config("ztunnel/a/n1", "rev2", services=3)})
        assert await wait_until(lambda: proxy.revision == "rev2", 10)
        cur = proxy.sub.current
        assert cur is not None and cur.stamp.epoch == 2 and len(cur.services) == 3
        await srv2.stop(0)
    finally:
        await proxy.stop()


async def test_oversize_config_is_split_or_refused() -> None:
    srv = ConfigServer(ConfigDistributor(epoch=1, max_message_bytes=64 * 1024), insecure=True)
    await srv.start("127.0.0.1:0")
    proxy = SimProxy("ztunnel/a/n1", f"127.0.0.1:{srv.port}").start()
    try:
        # 40 services x 20 endpoints ~ 200 KB: split into several chunks of one nonce
        srv.dist.set_desired({"ztunnel/a/n1": make_config("ztunnel/a/n1", "big", services=40, endpoints_per_service=20)})
        assert await wait_until(lambda: proxy.revision == "big", 5)
        assert proxy.sub.current is not None and len(proxy.sub.current.services) == 40
        # one service bigger than a whole message cannot be split: refused with a clear error
        srv.dist.set_desired({"ztunnel/a/n1": make_config("ztunnel/a/n1", "huge", services=1, endpoints_per_service=2000)})
        assert await wait_until(lambda: "message limit" in srv.dist.sessions["ztunnel/a/n1"].oversize_error, 3)
        assert proxy.revision == "big"
        assert srv.dist.status()[0]["sync"] == "STALE"
    finally:
        await proxy.stop()
        await srv.stop(0)


async def test_endpoints_travel_as_tables_only_to_a_proxy_that_announced_them(server: ConfigServer) -> None:
    """A proxy of an earlier version announces no features and reads endpoints as objects; one
    that announces `ENDPOINT_TABLES` gets tables; both build the same services."""
    import grpc.aio

    from ztunnel.api.codec import CONFIG_METHOD, PROXY_ID_METADATA, decode_delta, header_to_pb
    from ztunnel.api.config import ENDPOINT_TABLES
    from ztunnel.api.proto import meshfed_pb2 as pb

    ids = {"ztunnel/a/old": [], "ztunnel/a/new": [ENDPOINT_TABLES]}
    server.dist.set_desired({p: make_config(p, "rev1", services=2) for p in ids})
    got: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(target(server)) as ch:
        for pid, features in ids.items():
            call = ch.stream_stream(CONFIG_METHOD, request_serializer=pb.ConfigRequest.SerializeToString,
                                    response_deserializer=pb.ConfigResponse.FromString)(
                metadata=[(PROXY_ID_METADATA, pid)], timeout=5)
            await call.write(pb.ConfigRequest(proxy=header_to_pb(make_config(pid, "")), features=features))
            got[pid] = await call.read()
            call.cancel()
    forms = {pid: {type(json.loads(r.body)["endpoints"]) for r in m.upserts if r.type == "services"}
             for pid, m in got.items()}
    assert forms == {"ztunnel/a/old": {list}, "ztunnel/a/new": {dict}}
    services = {pid: decode_delta([m]).delta.upserts["services"] for pid, m in got.items()}
    assert services["ztunnel/a/old"] == services["ztunnel/a/new"] and len(services["ztunnel/a/new"]) == 2
    assert all(s.endpoints for s in services["ztunnel/a/new"])
    assert server.dist.sessions["ztunnel/a/new"].tables and not server.dist.sessions["ztunnel/a/old"].tables


async def test_a_proxy_that_reconnects_leaves_no_reader_or_writer_of_its_old_stream(server: ConfigServer) -> None:
    """The same proxy (the same certificate) opening a second stream cancels the first; its reader
    and writer tasks must go with it. Before, the old writer stayed for ever, waiting on a wake-up
    no one set again (one task per reconnect, for the life of the controller)."""
    import grpc.aio

    from benchmarks.simproxy import LiteProxy

    def live_writers() -> int:
        return sum(1 for t in asyncio.all_tasks() if not t.done()
                   and t.get_coro().__qualname__.endswith("_follow.<locals>.writer"))  # type: ignore[union-attr]

    pid = "ztunnel/a/again"
    server.dist.set_desired({pid: make_config(pid, "rev1")})
    channels, tasks = [], []
    try:
        for _ in range(3):
            channel = grpc.aio.insecure_channel(target(server), options=[("grpc.use_local_subchannel_pool", 1)])
            channels.append(channel)
            proxy = LiteProxy(pid, "a")
            tasks.append(asyncio.ensure_future(proxy.run(channel)))
            assert await wait_until(lambda proxy=proxy: proxy.acks >= 1, 5)   # type: ignore[misc]
        assert await wait_until(lambda: live_writers() == 1, 5), live_writers()
        # and the newest stream is the one served
        server.dist.set_desired({pid: make_config(pid, "rev2", services=2)})
        assert await wait_until(lambda: server.dist.sessions[pid].sync is SyncState.SYNCED
                                and server.dist.sessions[pid].acked_stamp.revision == "rev2", 5)  # type: ignore[union-attr]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
