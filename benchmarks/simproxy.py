"""Simulated proxies: real `ztunnel.xds.client.XdsClient`s with an in-memory data plane, and lite ones.

Used by the controller integration tests and the convergence benchmark. A `MemorySink` keeps the
applied config, can be told to reject (NACK) or to be slow, and records when each revision was
applied; a `SimProxy` bundles a subscription, a sink and a client on a loopback channel.

`LiteProxy` is for measuring the controller with a thousand proxies on a 2-core machine, where
the simulated clients share the CPU with the controller: it speaks the same protocol with the same
rules (chunks joined by nonce, older or stale-epoch versions NACKed, a delta on the wrong base
NACKed with "resync", ACK carrying the applied stamp), and keeps each resource as its wire bytes
instead of parsing it into the data plane's objects. Many of them share one event loop
(`run_lite_fleet`), each on its own channel (its own connection, as real proxies), reading with
`async for` (no task per message). Measured at 1,000 proxies: the XdsClient fleet used about as
much CPU as the controller did; the lite fleet a fraction of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ztunnel.api.codec import CONFIG_METHOD, PROXY_ID_METADATA, header_to_pb, stamp_from_pb, stamp_to_pb
from ztunnel.api.config import (
    ENDPOINT_TABLES,
    Endpoint,
    ProxyConfig,
    ProxyMode,
    Service,
    ServicePortMap,
    Stamp,
)
from ztunnel.api.proto import meshfed_pb2 as pb
from ztunnel.xds.client import Backoff, Subscription, XdsClient, keepalive_options


@dataclass
class MemorySink:
    reject: Callable[[ProxyConfig], list[str]] = lambda _c: []
    apply_delay_s: float = 0.0
    applied: list[ProxyConfig] = field(default_factory=list)
    applied_at_s: dict[str, float] = field(default_factory=dict)  # revision -> monotonic time

    def validate(self, config: ProxyConfig) -> list[str]:
        return self.reject(config)

    async def apply(self, config: ProxyConfig) -> None:
        if self.apply_delay_s:
            await asyncio.sleep(self.apply_delay_s)
        self.applied.append(config)
        self.applied_at_s.setdefault(config.stamp.revision, time.monotonic())

    @property
    def current(self) -> ProxyConfig | None:
        return self.applied[-1] if self.applied else None


def header(proxy_id: str, cluster: str = "a") -> ProxyConfig:
    mode = ProxyMode.GATEWAY if proxy_id.startswith("gateway/") else ProxyMode.NODE
    return ProxyConfig(proxy_id=proxy_id, mode=mode, cluster=cluster, network=f"net-{cluster}",
                       trust_domain=f"{cluster}.example", stamp=Stamp(0, "", 0))


def make_config(proxy_id: str, revision: str, services: int = 1, endpoints_per_service: int = 2,
                cluster: str = "a", seed: int = 0) -> ProxyConfig:
    """A ProxyConfig with `services` services of `endpoints_per_service` endpoints each."""
    svcs = []
    for s in range(services):
        eps = tuple(
            Endpoint(workload_uid=f"{cluster}/ns{s}/pod-{e}", cluster=cluster, network=f"net-{cluster}",
                     address=f"10.{(e >> 16) & 255}.{(e >> 8) & 255}.{e & 255}", port=8080 + seed,
                     hbone_address="127.0.0.1:15008")
            for e in range(endpoints_per_service))
        svcs.append(Service(hostname=f"svc{s}.ns{s}.svc.clusterset.local", namespace=f"ns{s}", name=f"svc{s}",
                            vip="", ports=(ServicePortMap(80, 8080),), endpoints=eps))
    base = header(proxy_id, cluster)
    from dataclasses import replace

    return replace(base, stamp=Stamp(0, revision, 0), services=tuple(svcs))


class SimProxy:
    def __init__(self, proxy_id: str, target: str, cluster: str = "a", current: ProxyConfig | None = None,
                 sink: MemorySink | None = None, channel_factory: Callable[[], Any] | None = None,
                 max_message_bytes: int = 4 * 1024 * 1024) -> None:
        import grpc.aio

        self.proxy_id = proxy_id
        self.sink = sink or MemorySink()
        self.sub = Subscription(header(proxy_id, cluster), current)
        opts = [("grpc.max_receive_message_length", max_message_bytes + 65536), *keepalive_options()]
        self.client = XdsClient(self.sub, self.sink,
                                channel_factory or (lambda: grpc.aio.insecure_channel(target, options=opts)),
                                metadata=[(PROXY_ID_METADATA, proxy_id)],
                                backoff=Backoff(initial_s=0.05, max_s=0.5))
        self.task: asyncio.Task[None] | None = None

    def start(self) -> SimProxy:
        self.task = asyncio.ensure_future(self.client.run())
        return self

    async def stop(self) -> None:
        self.client.stop()
        if self.task is not None:
            await asyncio.wait_for(self.task, 5)

    @property
    def revision(self) -> str:
        return self.sub.current.stamp.revision if self.sub.current else ""


class LiteProxy:
    """The protocol rules of `ztunnel.xds.client.Subscription` over resources kept as wire bytes.

    Invariants: `stamp` only moves to a strictly newer (epoch, version); a delta applies only on
    the version it names as its base (0 = full state); a refused response changes nothing."""

    def __init__(self, proxy_id: str, cluster: str = "a") -> None:
        self.proxy_id = proxy_id
        # announces what a current proxy announces (`ztunnel.xds.client.Subscription.hello`)
        self.hello = pb.ConfigRequest(proxy=header_to_pb(header(proxy_id, cluster)), features=[ENDPOINT_TABLES])
        self.stamp: Stamp | None = None
        self.resources: dict[tuple[str, str], bytes] = {}
        self.acks = self.nacks = 0
        self._pending: list[Any] = []

    def on_response(self, resp: Any) -> Any | None:
        """The ACK/NACK to send for a response chunk (None while chunks of its nonce are missing)."""
        if self._pending and self._pending[0].nonce != resp.nonce:
            self._pending = []
        self._pending.append(resp)
        if len(self._pending) < max(1, resp.chunks):
            return None
        chunks, self._pending = self._pending, []
        stamp, have = stamp_from_pb(resp.stamp) or Stamp(0, "", 0), self.stamp
        if have is not None and (stamp.epoch, stamp.version) <= (have.epoch, have.version):
            return self._nack(resp.nonce, f"version {stamp.epoch}.{stamp.version} is not newer than "
                                          f"{have.epoch}.{have.version} (have)")
        base = int(chunks[0].base_version)
        if base != 0 and (have is None or have.version != base):
            return self._nack(resp.nonce, f"resync: delta is based on version {base}, proxy has "
                                          f"{have.version if have else None}")
        if base == 0:
            self.resources = {}
        for c in chunks:
            for rm in c.removals:
                self.resources.pop((rm.type, rm.key), None)
            for r in c.upserts:
                self.resources[(r.type, r.key)] = r.body
        self.stamp = stamp
        self.acks += 1
        return pb.ConfigRequest(response_nonce=resp.nonce, applied=resp.stamp)

    def _nack(self, nonce: str, error: str) -> Any:
        self.nacks += 1
        return pb.ConfigRequest(response_nonce=nonce, nack=True, error_detail=error, applied=stamp_to_pb(self.stamp))

    async def run(self, channel: Any) -> None:
        """One subscription on `channel` until cancelled or the stream ends; ACKs inline."""
        call = channel.stream_stream(CONFIG_METHOD, request_serializer=pb.ConfigRequest.SerializeToString,
                                     response_deserializer=pb.ConfigResponse.FromString)(
            metadata=((PROXY_ID_METADATA, self.proxy_id),))
        hello = pb.ConfigRequest()
        hello.CopyFrom(self.hello)
        if self.stamp is not None:
            hello.have.CopyFrom(stamp_to_pb(self.stamp))
        await call.write(hello)
        async for resp in call:
            reply = self.on_response(resp)
            if reply is not None:
                await call.write(reply)


async def run_lite_fleet(target: str, proxy_ids: list[str], stop: asyncio.Event,
                         max_message_bytes: int = 4 * 1024 * 1024,
                         targets: dict[str, str] | None = None) -> list[LiteProxy]:
    """Run one LiteProxy per id on this event loop, each on its own channel (to `targets[id]`, else
    `target`), reconnecting after 0.1 s when a stream ends, until `stop` is set."""
    import grpc.aio

    # a local subchannel pool per channel: its own TCP connection, as a real proxy has. With the
    # global pool every channel of this process shared one connection, and the controller's limit
    # of 16 streams per connection left all but 16 of them waiting for ever
    opts = [("grpc.max_receive_message_length", max_message_bytes + 65536), ("grpc.use_local_subchannel_pool", 1)]
    proxies = [LiteProxy(pid, pid.split("/")[1] if pid.count("/") >= 1 else "a") for pid in proxy_ids]

    async def keep(p: LiteProxy) -> None:
        while not stop.is_set():
            channel = grpc.aio.insecure_channel((targets or {}).get(p.proxy_id, target), options=opts)
            try:
                await p.run(channel)
            except Exception:  # a lost stream: reconnect, as a proxy would
                pass
            finally:
                await channel.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(keep(p)) for p in proxies]
        await stop.wait()
        for t in tasks:
            t.cancel()
    return proxies
