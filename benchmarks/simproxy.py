"""Simulated proxies: real `ztunnel.xds.XdsClient`s with an in-memory data plane.

Used by the controller integration tests and the convergence benchmark. A `MemorySink` keeps the
applied config, can be told to reject (NACK) or to be slow, and records when each revision was
applied; a `SimProxy` bundles a subscription, a sink and a client on a loopback channel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config import Endpoint, ProxyConfig, ProxyMode, Service, ServicePortMap, Stamp
from ztunnel.xds import PROXY_ID_METADATA, Backoff, Subscription, XdsClient


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
        opts = [("grpc.max_receive_message_length", max_message_bytes + 65536)]
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
