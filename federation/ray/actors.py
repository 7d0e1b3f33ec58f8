"""The controller's actors: thin hosts around `federation.controller` classes, and the one place
`ray.remote` is applied.

  ConfigServerActor  ConfigService + the gRPC ConfigServer   the state owner: store, CA keys, distributor
  ReconcilerActor    ReconcileService                       debounce, render (core), deltas out
  GitSourceActor     GitFeed (GitSource)                    follows the branch, snapshots in
  ClusterAgentActor  ClusterAgent                           one per cluster: discovery + lease
  ConfigShardActor   ConfigShard + a gRPC ConfigServer       a partition of the proxies: deltas, pushes, ACKs

A host decodes what arrives (`federation.controller.wire`), calls its plain object, and encodes
the answer; calls to other actors go through `federation.ray.remote`. Only the config server
opens the state directory: the others get the store as a `RemoteStore` on it, so they may run on
any node (`federation.ray.placement`).

Data between actors is bytes: snapshots and observations encoded once by their producer, configs
as per-proxy deltas in the protocol's own protobuf encoding, health reports as serialized
protobuf, status documents as JSON. Actors restart on failure (`max_restarts=-1`) and rebuild
from durable state: the config server bumps the epoch in the store and starts with no desired
configs (its first delta comes back as "resync", and the reconciler re-sends everything in full);
a restarted reconciler asks the driver for its inputs again (`missing_inputs`), which re-sends
the snapshot and makes every agent re-LIST its cluster — that is also what prunes endpoints
removed while we were down.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import ray

from federation.controller.config_service import ConfigService
from federation.controller.gc_tuning import tune_collector
from federation.controller.git_feed import GitFeed
from federation.controller.reconcile_service import ReconcileService
from federation.controller.shard import ConfigShard
from federation.controller.sources import ClusterAgent, GitPolicy
from federation.controller.statelock import StateDirLock
from federation.controller.wire import (
    decode_health_report,
    decode_json,
    decode_observation,
    decode_snapshot,
    encode_json,
    encode_snapshot,
)
from federation.ray import placement
from federation.ray.remote import RemoteConfigServer, RemoteReconciler, RemoteStore, call_store
from federation.server.grpc_services import ConfigServer, config_server_for, serve


class ConfigServerHost:
    """The state owner. The CA refuses to be pickled: keys stay in this process. It takes the state
    directory's lock before anything else (waiting while another process holds it: the driver
    already refused or waited as a standby, so this waits only out a restarting predecessor).

    An async actor: Ray runs every method, sync ones included, on the one event loop that also
    serves the proxies' gRPC streams. So whatever may block on the disk — sqlite (another writer
    holds the database for up to the store's busy timeout), CA keys and certificates, credential
    files — is an `async` method that runs that part on a worker thread (`asyncio.to_thread`);
    those touching CA and credential files one at a time (`_files`). What stays synchronous touches
    memory only, and the distributor (which is the loop's, unlocked) is only ever touched on the
    loop. The store is safe on any thread (it serializes on its own lock)."""

    def __init__(self, state_dir: str, insecure: bool, history_retention_s: float | None = None,
                 kubeconfig: str | None = None) -> None:
        lock = StateDirLock(state_dir)
        lock.acquire(wait=True)
        # kubeconfig: for the TokenReviews of proxies' ServiceAccount tokens (each in its own cluster)
        self.service = ConfigService(state_dir, insecure, lock=lock, history_retention_s=history_retention_s,
                                     kubeconfig=kubeconfig)
        self.server = config_server_for(self.service, on_health=self._forward_health)
        self.reconciler: Any = None
        self._files = asyncio.Lock()
        tune_collector()

    async def start(self, listen: str, reconciler: Any, bootstrap_listen: str | None = None) -> tuple[int, int]:
        """(config port, bootstrap port); see `federation.server.grpc_services.serve`."""
        self.reconciler = reconciler
        return await serve(self.service, self.server, listen, bootstrap_listen)

    def _forward_health(self, proxy_id: str, report: Any) -> None:
        if self.reconciler is not None:
            self.reconciler.on_health.remote(proxy_id, report.SerializeToString())

    async def ensure_cas(self, blob: bytes) -> dict[str, tuple[str, ...]]:
        snap = decode_snapshot(blob)
        async with self._files:   # CA keys, certificates, tokens, controller-roots.pem; the store
            return await asyncio.to_thread(self.service.ensure_cas, snap)

    async def status_api_token(self) -> str:
        async with self._files:   # the token file (written once, 0600)
            return await asyncio.to_thread(self.service.status_api_token)

    def apply_deltas(self, blob: bytes) -> str:
        return self.service.apply_deltas(blob)          # memory (the distributor): on the loop

    def rollout(self, revision: str, proxy_ids: list[str]) -> list[dict[str, Any]]:
        return self.service.rollout(revision, proxy_ids)  # memory (the distributor): on the loop

    async def set_draining(self, clusters: dict[str, str]) -> None:
        async with self._files:   # bootstrap credential files
            await asyncio.to_thread(self.service.set_draining, clusters)

    async def remove_cluster(self, cluster: str, why: str) -> list[str]:
        forgotten = self.service.forget_cluster_sessions(cluster, why)   # the distributor: on the loop
        async with self._files:   # the store's records and the bootstrap credentials
            return await asyncio.to_thread(self.service.forget_cluster_records, cluster, forgotten, why)

    async def status(self) -> bytes:
        disk = await asyncio.to_thread(self.service.disk_facts)
        return encode_json(self.service.status(self.server.counters(), disk))

    def trigger_to_ack(self, clear: bool = False) -> list[float]:
        return self.service.trigger_to_ack(clear)

    def trust_view(self) -> bytes:
        return encode_json(self.service.trust_view())

    async def store_call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return await asyncio.to_thread(call_store, self.service.store, method, args, kwargs)

    def where(self) -> dict[str, Any]:
        return placement.here()


class ReconcilerHost:
    def __init__(self, debounce_after_s: float, debounce_max_s: float, config_server: Any) -> None:
        out = RemoteConfigServer(config_server)
        self.service = ReconcileService(RemoteStore(config_server), out.push_deltas, out.bundle_roots,
                                        debounce_after_s, debounce_max_s, rollout=out.rollout,
                                        cluster_ops=out)
        tune_collector()      # before its thread starts: nothing of the thread's work is frozen
        self.service.start()

    def on_snapshot(self, blob: bytes) -> None:
        self.service.on_snapshot(decode_snapshot(blob))

    def on_fallback_snapshot(self, blob: bytes) -> None:
        self.service.on_fallback_snapshot(decode_snapshot(blob))

    def on_fleet_error(self, sha: str, subject: str, problems_json: bytes) -> None:
        self.service.on_fleet_error(sha, subject, decode_json(problems_json))

    def on_observation(self, blob: bytes) -> None:
        self.service.on_observation(decode_observation(blob))

    def on_health(self, proxy_id: str, blob: bytes) -> None:
        self.service.on_health(proxy_id, decode_health_report(blob))

    def on_lease(self, cluster: str, age_s: float) -> None:
        self.service.on_lease(cluster, age_s)

    def missing_inputs(self) -> bool:
        return self.service.missing_inputs()

    def snapshot_blob(self) -> bytes:
        snap = self.service.snapshot()
        return encode_snapshot(snap) if snap is not None else b""

    def resync(self) -> None:
        self.service.resync()

    def status(self) -> bytes:
        return encode_json(self.service.status())

    def services(self) -> bytes:
        return encode_json(self.service.services())

    def endpoints(self, service: str, from_cluster: str | None) -> bytes:
        return encode_json(self.service.endpoints(service, from_cluster))

    def explain(self, service: str, from_cluster: str, zone: str | None) -> bytes:
        return encode_json(self.service.explain(service, from_cluster, zone))

    def graph(self) -> bytes:
        return encode_json(self.service.graph())

    def where(self) -> dict[str, Any]:
        return placement.here()

    def stop(self) -> None:
        self.service.stop()


class GitSourceHost:
    def __init__(self, repo: str, branch: str, reconciler: Any, config_server: Any,
                 poll_interval_s: float | None, policy: GitPolicy | None = None) -> None:
        self.feed = GitFeed.following(repo, branch, RemoteStore(config_server),
                                      RemoteReconciler(reconciler), poll_interval_s, policy).start()

    def trigger(self) -> None:
        self.feed.trigger()

    def resend(self) -> None:
        self.feed.resend()

    def status(self) -> dict[str, Any]:
        return self.feed.status()

    def where(self) -> dict[str, Any]:
        return placement.here()

    def stop(self) -> None:
        self.feed.stop()


class ClusterAgentHost:
    def __init__(self, cluster: str, kubeconfig: str | None, context: str, api_kind: str, lease_ttl_s: float,
                 watch_timeout_s: int, namespace_selector: str, reconciler: Any) -> None:
        self.agent = ClusterAgent(cluster, kubeconfig, context, api_kind, lease_ttl_s,
                                  namespace_selector=namespace_selector, watch_timeout_s=watch_timeout_s)
        remote = RemoteReconciler(reconciler)
        self.agent.start(remote.on_observation, remote.on_lease)

    def resend(self) -> None:
        """Re-LIST everything (a restarted reconciler needs a complete observation)."""
        self.agent.relist()

    def status(self) -> dict[str, Any]:
        return self.agent.status()

    def where(self) -> dict[str, Any]:
        return placement.here()

    def stop(self) -> None:
        self.agent.stop()


class ConfigShardHost:
    """One config shard (`federation.controller.shard`): its proxies' sessions and gRPC streams,
    on this actor's event loop. Holds no credential: the CA keys and the store stay with the
    state owner. Plaintext only for now (`insecure`, loopback benchmarks and tests): serving mTLS
    from a shard needs a serving certificate issued to it by the state owner, which is not built."""

    def __init__(self, index: int, shards: int, epoch: int, insecure: bool, write_timeout_s: float = 10.0) -> None:
        if not insecure:
            raise ValueError("config shards serve plaintext only (insecure=True, loopback): mTLS for shards "
                             "needs serving certificates from the state owner, not built yet")
        self.shard = ConfigShard(index, shards, epoch)
        self.server = ConfigServer(self.shard.dist, insecure=True, write_timeout_s=write_timeout_s)
        self._settled: asyncio.Event | None = None
        self.shard.dist.listeners.append(lambda _ev: self._wake_waiters())
        tune_collector()

    def _wake_waiters(self) -> None:
        if self._settled is not None and self.shard.settled():
            self._settled.set()

    async def start(self, listen: str) -> int:
        self._settled = asyncio.Event()
        return await self.server.start(listen)

    def apply(self, blob: bytes) -> str:
        answer = self.shard.apply(blob)            # the distributor is the loop's: on the loop
        self._wake_waiters()
        return answer

    async def wait_settled(self, timeout_s: float) -> tuple[float, int, int]:
        """Wait until every proxy whose content moved has ACKed it: (when the last did, on the
        machine's monotonic clock; proxies moved since the last call; proxies still waiting)."""
        assert self._settled is not None, "start() first"
        if not self.shard.settled():
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), timeout_s)
        at_s, moved = self.shard.take_settled()
        return at_s, moved, len(self.shard.waiting)

    def rollout(self, revision: str, proxy_ids: list[str]) -> list[dict[str, Any]]:
        return self.shard.rollout(revision, proxy_ids)

    def counts(self) -> dict[str, int]:
        return self.shard.counts()

    def where(self) -> dict[str, Any]:
        return placement.here()

    async def stop(self) -> None:
        await self.server.stop(0)


_RESTART = {"max_restarts": -1, "max_task_retries": 0}
ConfigServerActor = ray.remote(num_cpus=0, **_RESTART)(ConfigServerHost)
ReconcilerActor = ray.remote(num_cpus=0, max_concurrency=16, **_RESTART)(ReconcilerHost)
GitSourceActor = ray.remote(num_cpus=0, max_concurrency=4, **_RESTART)(GitSourceHost)
ClusterAgentActor = ray.remote(num_cpus=0, max_concurrency=4, **_RESTART)(ClusterAgentHost)
ConfigShardActor = ray.remote(num_cpus=0, **_RESTART)(ConfigShardHost)
