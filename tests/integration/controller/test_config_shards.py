"""Config shards on Ray: each shard actor serves its partition of the proxies over its own gRPC
port; the reconciler's `ShardedOutbox` delivers each shard its part. Real `XdsClient` proxies get
their configs and ACK them; a shard that dies does not hold up the others' proxies, and its push
is not lost: the retry reaches its replacement (which asks for everything in full)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from benchmarks.simproxy import SimProxy, make_config
from federation.controller.reconcile_service import ShardedOutbox
from federation.controller.shard import partition
from federation.server.grpc_services import wait_until
from ztunnel.api.config import ProxyConfig, Stamp

pytestmark = [pytest.mark.timeout(120)]

IDS = [f"ztunnel/a/node-{i}" for i in range(8)]


def cfg(pid: str, rev: str, version: int, services: int) -> ProxyConfig:
    return replace(make_config(pid, rev, services=services), stamp=Stamp(1, rev, version))


def start_shard(index: int, shards: int) -> tuple[Any, int]:
    import ray

    from federation.ray.actors import ConfigShardActor

    h = ConfigShardActor.remote(index, shards, 5, True)  # type: ignore[attr-defined]
    return h, int(ray.get(h.start.remote("127.0.0.1:0"), timeout=60))


def test_shards_serve_their_proxies_and_a_dead_shard_loses_no_push(ray_session: None) -> None:
    import ray

    from federation.ray.remote import RemoteShards

    started = [start_shard(k, 2) for k in range(2)]
    handles = [h for h, _ in started]
    remote = RemoteShards(handles, timeout_s=30)
    box = ShardedOutbox(remote.send_all, 2)
    parts = partition(IDS, 2)
    assert all(parts), parts

    async def run() -> None:
        proxies = {pid: SimProxy(pid, f"127.0.0.1:{started[k][1]}").start() for k in range(2) for pid in parts[k]}
        try:
            box.push({pid: cfg(pid, "r1", 1, 2) for pid in IDS})
            assert await wait_until(lambda: all(p.revision == "r1" for p in proxies.values()), 30)
            settled = await asyncio.gather(*(h.wait_settled.remote(10) for h in handles))
            assert [w for _at, _moved, w in settled] == [0, 0]
            assert sum(m for _at, m, _w in settled) == len(IDS)
            assert all(p.sub.current is not None and p.sub.current.stamp.epoch == 5 for p in proxies.values())

            ray.kill(handles[1], no_restart=True)          # shard 1 dies (ray.kill returns before it is dead)
            with pytest.raises(ray.exceptions.RayActorError):
                for _ in range(100):
                    ray.get(handles[1].where.remote(), timeout=10)
                    await asyncio.sleep(0.05)
            with pytest.raises(ray.exceptions.RayActorError):
                box.push({pid: cfg(pid, "r2", 2, 3) for pid in IDS})
            # shard 0's proxies got r2 all the same
            assert await wait_until(lambda: all(proxies[p].revision == "r2" for p in parts[0]), 30)
            assert all(proxies[p].revision == "r1" for p in parts[1])

            replacement, _port = start_shard(1, 2)          # (its proxies would be told its new port)
            remote.handles[1] = replacement
            box.push({pid: cfg(pid, "r2", 2, 3) for pid in IDS})   # the reconciler's retry
            assert box.resyncs == 1                                # the new shard holds nothing: in full
            facts = ray.get(replacement.rollout.remote("r2", parts[1]), timeout=30)
            assert [f["state"] for f in facts] == ["pending"] * len(parts[1])   # desired r2, not yet connected
            facts0 = ray.get(handles[0].rollout.remote("r2", parts[0]), timeout=30)
            assert [f["state"] for f in facts0] == ["acked"] * len(parts[0])
        finally:
            await asyncio.gather(*(p.stop() for p in proxies.values()), return_exceptions=True)

    try:
        asyncio.run(run())
    finally:
        for h in remote.handles:
            ray.kill(h, no_restart=True)
