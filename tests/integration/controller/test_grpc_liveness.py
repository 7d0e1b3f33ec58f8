"""The config protocol's liveness and limits, on loopback (no Ray):

- a link that silently stops forwarding (a user-space TCP relay we freeze: both kernels keep
  ACKing, nothing reaches the other side — a black-holing middlebox, a frozen VM) is noticed by
  both ends within 30 s: the proxy's config stream fails and it reconnects, the controller detaches
  the proxy (status: not connected). HTTP/2 keepalive pings, both ways;
- the bootstrap port (no client certificate) refuses a health stream at once, sent or not;
- a health stream reports for one proxy, and a flood of reports is rate-limited;
- the server caps RPCs in flight (RESOURCE_EXHAUSTED beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from benchmarks.simproxy import SimProxy, make_config
from federation.controller.distributor import ConfigDistributor
from federation.server.grpc_services import ConfigServer, wait_until
from tests.integration.controller.test_mtls import EAST_NAME, Ctl, ctl  # noqa: F401  (the mTLS controller fixture)
from ztunnel.api.codec import HEALTH_METHOD, PROXY_ID_METADATA
from ztunnel.api.proto import meshfed_pb2 as pb
from ztunnel.xds.client import secure_channel

pytestmark = pytest.mark.timeout(120)


class FreezableRelay:
    """TCP relay 127.0.0.1:<port> -> target. `freeze()` stops forwarding both ways without closing
    anything: the sockets stay open and the kernels keep acknowledging what fits their buffers."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FreezableRelay:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.pairs.append((w, uw))
        for src, dst in ((r, uw), (ur, w)):
            t = asyncio.ensure_future(self._pump(src, dst))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await self.flowing.wait()      # frozen: read nothing, forward nothing
                data = await r.read(65536)
                if not data:
                    break
                await self.flowing.wait()      # what was read when the freeze came is never sent
                w.write(data)
                await w.drain()
        w.close()

    def freeze(self) -> None:
        self.flowing.clear()

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        for a, b in self.pairs:
            a.close()
            b.close()
        if self.server is not None:
            self.server.close()


async def test_a_silently_dead_link_is_noticed_by_both_ends_within_30_s(ctl: Ctl) -> None:  # noqa: F811
    pid = "ztunnel/east/node-1"
    svid = await ctl.svid(pid)
    ctl.service.dist.set_desired({pid: make_config(pid, "rev1", cluster="east")})
    relay = await FreezableRelay(ctl.server.port).start()
    target = f"127.0.0.1:{relay.port}"
    proxy = SimProxy(pid, target, cluster="east", channel_factory=svid.channel_factory(target, EAST_NAME)).start()
    try:
        assert await wait_until(lambda: proxy.revision == "rev1", 10), proxy.client.last_error

        def connected_at_controller() -> bool:
            return bool({s["proxy"]: s for s in ctl.service.dist.status()}[pid]["connected"])

        assert connected_at_controller()
        connects = proxy.client.connects
        relay.freeze()
        frozen_at = time.monotonic()
        proxy_noticed: list[float] = []
        controller_noticed: list[float] = []
        while time.monotonic() - frozen_at < 35 and not (proxy_noticed and controller_noticed):
            now = time.monotonic() - frozen_at
            if not proxy_noticed and (not proxy.client.connected.is_set() or proxy.client.connects > connects):
                proxy_noticed.append(now)
            if not controller_noticed and not connected_at_controller():
                controller_noticed.append(now)
            await asyncio.sleep(0.1)
        assert proxy_noticed and proxy_noticed[0] <= 30.0, f"proxy still on the dead link after 35 s: {proxy_noticed}"
        assert controller_noticed and controller_noticed[0] <= 30.0, \
            f"controller still counts the proxy connected after 35 s: {controller_noticed}"
        print(f"dead link noticed: proxy {proxy_noticed[0]:.1f} s, controller {controller_noticed[0]:.1f} s")
    finally:
        await relay.close()
        await proxy.stop()


async def test_the_bootstrap_port_refuses_health_streams_at_once(ctl: Ctl) -> None:  # noqa: F811
    async with secure_channel(ctl.bootstrap, ctl.roots, target_name=EAST_NAME) as ch:   # no client certificate
        for send in (False, True):
            call = ch.stream_unary(HEALTH_METHOD, request_serializer=pb.HealthReport.SerializeToString,
                                   response_deserializer=pb.HealthSummary.FromString)(timeout=10)
            if send:   # a report naming no proxy used to be skipped, keeping the stream open for ever
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call.write(pb.HealthReport(proxy_id=""))
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
            assert "client certificate" in (err.value.details() or "")
            assert time.monotonic() - started < 3.0
    assert ctl.server.health_reports == 0


@pytest.fixture()
async def plain_server() -> AsyncIterator[ConfigServer]:
    got: list[tuple[str, Any]] = []
    srv = ConfigServer(ConfigDistributor(epoch=1), insecure=True, on_health=lambda p, r: got.append((p, r)),
                       max_concurrent_rpcs=3)
    await srv.start("127.0.0.1:0")
    srv.got = got  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        await srv.stop(0)


def health_call(ch: Any, proxy_id: str) -> Any:
    return ch.stream_unary(HEALTH_METHOD, request_serializer=pb.HealthReport.SerializeToString,
                           response_deserializer=pb.HealthSummary.FromString)(
        metadata=((PROXY_ID_METADATA, proxy_id),), timeout=10)


async def test_a_flood_of_health_reports_is_rate_limited(plain_server: ConfigServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plain_server.port}") as ch:
        call = health_call(ch, "ztunnel/a/n1")
        for _ in range(200):
            await call.write(pb.HealthReport(proxy_id="ztunnel/a/n1"))
        await call.done_writing()
        summary = await call
    assert summary.reports <= 15 and plain_server.health_reports == summary.reports
    assert plain_server.health_reports_dropped == 200 - summary.reports
    assert len(plain_server.got) == summary.reports  # type: ignore[attr-defined]


async def test_a_health_stream_reports_for_one_proxy(plain_server: ConfigServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plain_server.port}") as ch:
        call = health_call(ch, "ztunnel/a/n1")
        await call.write(pb.HealthReport(proxy_id="ztunnel/a/n1"))
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.write(pb.HealthReport(proxy_id="ztunnel/a/n2"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ztunnel/a/n2" in (err.value.details() or "")


async def test_rpcs_in_flight_are_capped(plain_server: ConfigServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plain_server.port}") as ch:
        open_calls = [health_call(ch, f"ztunnel/a/n{i}") for i in range(3)]
        for i, c in enumerate(open_calls):
            await c.write(pb.HealthReport(proxy_id=f"ztunnel/a/n{i}"))
        assert await wait_until(lambda: plain_server.health_reports == 3, 5)
        extra = health_call(ch, "ztunnel/a/n9")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await extra
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for c in open_calls:
            c.cancel()
