"""Convergence of the config push path: trigger -> every affected proxy has ACKed.

`python -m benchmarks.convergence [--proxies 100,1000] [--rounds 10] [--renderer core|synthetic]
[--workers 0,1,2,4] [--ray-nodes 1|2]` prints progress lines and, as its last line, one JSON object: per proxy count (`runs`),
`commit_to_all_acked_ms_p50/p99`, `endpoint_change_to_all_acked_ms_p50/p99`,
`controller_rss_mib`, and (`resync`) a full resync of 100k endpoints to one proxy. p50 is the
median over `--rounds` rounds; the top-level keys repeat the first size's figures. Next to each
size, its floor (`benchmarks.grpc_floor`, `--no-grpc-floor` skips it): the same round — one
message to every proxy's stream, every ACK back — on a gRPC server that does nothing else, with
the same worker processes; `commit_p99_over_grpc_floor_p99` is the controller's figure over it.
`proxies_cpu_ms_per_round` is what the simulated proxies spent, on the same cores.

What runs: the controller side in this process — `Reconciler` (debounce 100 ms / 10 s, as istiod)
with the real core renderer (`federation.controller.reconciler.CoreRender`: graph, failover engine, render)
pushing into the `ConfigDistributor` of a real gRPC `ConfigServer` on loopback. This process
takes the controller's collector settings (`federation.controller.gc_tuning`, as the actors do;
`--gc default` keeps CPython's, to compare), except for the full resync, whose proxy runs here
too and is measured under CPython's settings, as proxies run.

The fleet (`--renderer core`, the default): `benchmarks.graph.synthetic` with `--clusters`
clusters of N nodes, one ztunnel per node and one east-west gateway per cluster, so that
clusters × (nodes + 1) = proxies (100 = 10 × (9 + 1), 1,000 = 10 × (99 + 1)); `--services`
global services with `--endpoints-per-service` endpoints spread over 3 exporting clusters; every
cluster its own trust domain, federated with the others. A "commit" is a new revision that
exports one more service (the service's endpoints were already discovered): the core rebuilds
and re-renders everything, and every proxy gets the new service. An "endpoint change" is one
endpoint of `svc0` flipping readiness (a partial observation): the core re-renders the views it
touches, and every proxy that sees the service gets a delta. `--renderer synthetic` keeps the
older stand-in: every proxy sees every service of one cluster, rendered without the core.

The proxies: by default `benchmarks.simproxy.LiteProxy`s (the protocol's rules over resources
kept as bytes, one connection each, all on one event loop) in `--proxy-workers` separate
processes, so that the figures are the controller's rather than the simulated data planes' (they
share the 2 cores); `--client xds` runs real `ztunnel.xds.client.XdsClient`s instead.

The clock starts when the trigger arrives at the reconciler (a new snapshot for a "commit", a
new observation for an "endpoint change") and stops at the last ACK of a proxy whose desired
content changed; the 100 ms debounce is included. Git (~4 ms per diff) is measured elsewhere.

Sharded (`--workers N`, N >= 1): the reconciler still renders every proxy here, in one place,
but the proxies' sessions, deltas, encoding, streams and ACKs are split over N config shards
(`federation.controller.shard`, `ConfigShardActor`s on Ray, placed round-robin over the Ray
nodes), each with its own gRPC server; each proxy connects to the shard `shard_of` gives it. The
reconciler hands each shard its part (`ShardedOutbox`: per-proxy deltas, resources shared between
proxies encoded once per blob and interned on decode); the clock stops at the last ACK of any
shard (the shards run on this machine: one monotonic clock). `--workers 0` is the single-process
controller. `--ray-nodes 2` runs a two-node Ray cluster on this machine (two raylets,
`ray.cluster_utils.Cluster`, one CPU each), the shards dealt over both. A comma list of workers
runs each size once per value, in one run (ratios from one run).

The full resync: one real `XdsClient` proxy goes from nothing to a config of 100 services with
100k endpoints; `full_resync_ms` is the trigger to its ACK (the proxy parses every endpoint),
`full_resync_encode_ms` the controller's share (diff and encode of the push).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from benchmarks.graph import synthetic
from benchmarks.grpc_floor import measure as measure_grpc_floor
from benchmarks.measure import cpu_s, pct, proc_cpu_s
from benchmarks.simproxy import SimProxy, header, run_lite_fleet
from clusters.kube.observation import ClusterObservation, EndpointInfo
from federation.controller.distributor import AckEvent, ConfigDistributor, SyncState
from federation.controller.gc_tuning import tune_collector
from federation.controller.reconciler import (
    CoreRender,
    Debouncer,
    Reconciler,
    RenderFn,
    RenderInput,
    RenderOutput,
)
from federation.server.grpc_services import ConfigServer, wait_until
from gitops.model import ConfigSnapshot, Federation, Revision
from ztunnel.api.config import Endpoint, ProxyConfig, Service, ServicePortMap, Stamp

CLUSTER = "a"
EXPORTS_PER_SERVICE = 3


# --- the synthetic stand-in renderer ------------------------------------------------------------


def snapshot(sha: str, services: int) -> ConfigSnapshot:
    # the number of services travels in the subject: the synthetic renderer reads it
    return ConfigSnapshot(Revision(sha, f"services={services}"), Federation("bench", "bench"), {}, {}, {}, {}, {}, (), ())


class SyntheticRender:
    """Every proxy gets every service; endpoints come from the observation of cluster "a"."""

    def __init__(self, proxies: list[str]) -> None:
        self.proxies = proxies

    def __call__(self, inp: RenderInput) -> RenderOutput:
        n = int(inp.snapshot.revision.subject.split("=")[1])
        obs = inp.observations.get(CLUSTER)
        eps_by_svc: dict[str, list[Endpoint]] = {}
        for e in obs.endpoints if obs else ():
            eps_by_svc.setdefault(e.service, []).append(Endpoint(
                f"{CLUSTER}/{e.namespace}/{e.pod}", CLUSTER, "net-a", e.address, 8080, f"{e.address}:15008"))
        services = tuple(Service(f"svc{i}.ns.svc.clusterset.local", "ns", f"svc{i}", "", (ServicePortMap(80, 8080),),
                                 tuple(eps_by_svc.get(f"svc{i}", ()))) for i in range(n))
        configs = {p: replace(header(p, CLUSTER), stamp=Stamp(0, inp.snapshot.revision.sha, 0), services=services)
                   for p in self.proxies}
        return RenderOutput(configs)


def observation(svc_endpoints: dict[str, int], now_s: float) -> ClusterObservation:
    eps = [EndpointInfo("ns", svc, f"{svc}-{i}", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "n1", "sa")
           for svc, n in svc_endpoints.items() for i in range(n)]
    return ClusterObservation(CLUSTER, now_s, True, endpoints=tuple(eps))


# --- scenarios: what a commit and an endpoint change are -----------------------------------------


class Scenario:
    """A fleet, its renderer, and the inputs of each round."""

    ids: list[str]
    render: RenderFn

    def initial(self, rec: Reconciler, now_s: float) -> None:
        raise NotImplementedError

    def commit(self, rec: Reconciler, r: int, now_s: float) -> None:
        raise NotImplementedError

    def endpoint_change(self, rec: Reconciler, r: int, now_s: float) -> None:
        raise NotImplementedError


class CoreScenario(Scenario):
    """`benchmarks.graph.synthetic` sized to `proxies`, rendered by the core (see the docstring)."""

    def __init__(self, proxies: int, clusters: int, services: int, endpoints_per_service: int, rounds: int) -> None:
        clusters = max(1, min(clusters, proxies // 2))
        nodes = proxies // clusters - 1
        if nodes < 1 or clusters * (nodes + 1) != proxies:
            raise SystemExit(f"--proxies {proxies} is not --clusters {clusters} x (nodes + 1 gateway); "
                             f"pick a multiple of {clusters}")
        total = services + rounds
        self.services = services
        self.full, obs = synthetic(clusters, total, total * endpoints_per_service, nodes,
                                   min(EXPORTS_PER_SERVICE, clusters))
        self.observations = obs
        self.keys = list(self.full.services)
        self.ids = [f"ztunnel/{o.cluster}/{n.name}" for o in obs for n in o.nodes] + \
                   [f"gateway/{c}" for c in self.full.clusters]
        self.render = CoreRender()
        # the endpoint that flips: svc0's first endpoint in the first cluster that has one
        svc0 = self.keys[0]
        self.flip_obs, self.flip_ep = next((o, e) for o in obs for e in o.endpoints
                                           if (e.namespace, e.service) == (svc0.namespace, svc0.name))

    def _snapshot(self, r: int) -> ConfigSnapshot:
        svcs = {k: self.full.services[k] for k in self.keys[:self.services + r]}
        return replace(self.full, revision=Revision(f"{r:040d}", f"export {self.keys[self.services + r - 1]}"
                                                    if r else "initial"), services=MappingProxyType(svcs))

    def initial(self, rec: Reconciler, now_s: float) -> None:
        # observed now, on the reconciler's clock (monotonic here): observations stamped with the
        # wall clock made every cluster's lease look 11 hours old, and the core froze them all
        for o in self.observations:
            rec.on_observation(replace(o, observed_at_s=now_s), now_s)
        rec.on_snapshot(self._snapshot(0), now_s)

    def _heartbeats(self, rec: Reconciler, now_s: float) -> None:
        """What the cluster agents' lease heartbeats do: a 10,000-proxy run outlasts the 30 s
        lease, and expired clusters are frozen (and logged) by every render."""
        for cluster in self.full.clusters:
            rec.on_lease(cluster, now_s)

    def commit(self, rec: Reconciler, r: int, now_s: float) -> None:
        self._heartbeats(rec, now_s)
        rec.on_snapshot(self._snapshot(r), now_s)

    def endpoint_change(self, rec: Reconciler, r: int, now_s: float) -> None:
        self._heartbeats(rec, now_s)
        e = replace(self.flip_ep, ready=r % 2 == 0)  # odd rounds: not ready; even: ready again
        rec.on_observation(ClusterObservation(self.flip_obs.cluster, now_s, False, endpoints=(e,)), now_s)


class SyntheticScenario(Scenario):
    def __init__(self, proxies: int, services: int) -> None:
        self.ids = [f"ztunnel/{CLUSTER}/node-{i}" for i in range(proxies)]
        self.render = SyntheticRender(self.ids)
        self.services = services
        self.eps = {f"svc{i}": 3 for i in range(services)}

    def initial(self, rec: Reconciler, now_s: float) -> None:
        rec.on_observation(observation(self.eps, time.time()), now_s)
        rec.on_snapshot(snapshot("rev-0", self.services), now_s)

    def commit(self, rec: Reconciler, r: int, now_s: float) -> None:
        self.last = r
        rec.on_snapshot(snapshot(f"rev-{r}", self.services + r), now_s)

    def endpoint_change(self, rec: Reconciler, r: int, now_s: float) -> None:
        self.eps["svc0"] = 3 + r  # an endpoint appears in one service
        rec.on_observation(observation(self.eps, time.time()), now_s)


# --- the controller side ------------------------------------------------------------------------


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def reconcile_until(rec: Reconciler, stop: asyncio.Event) -> None:
    """The reconcile loop of the controller side: reconcile whenever the debouncer is due."""
    while not stop.is_set():
        d = rec.debounce.deadline_s()
        await asyncio.sleep(0.002 if d is None else max(0.0, d - time.monotonic()))
        if rec.due(time.monotonic()):
            rec.reconcile(time.monotonic())


class Bench:
    """Counts, per trigger, the proxies whose desired content changed, and stops the clock when
    the last of them has ACKed it (event-driven: no polling over all sessions)."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.dist = ConfigDistributor(epoch=1, clock=time.monotonic)
        self.server = ConfigServer(self.dist, insecure=True, write_timeout_s=10)
        self.dist.listeners.append(self._on_ack)
        self.rec = Reconciler(scenario.render, self._push, None, Debouncer(0.1, 10.0), clock=time.monotonic)
        self.pending: set[str] = set()
        self.affected = 0
        self.pushed = False
        self.done = asyncio.Event()
        self.done_at_s = 0.0

    def _push(self, changed: Mapping[str, ProxyConfig]) -> None:
        before = {pid: s.desired_content if (s := self.dist.sessions.get(pid)) else None for pid in changed}
        self.dist.set_desired(changed)
        moved = {pid for pid in changed if self.dist.sessions[pid].desired_content is not before[pid]}
        self.pending |= moved
        self.affected += len(moved)
        self.pushed = True
        self._check()

    def _on_ack(self, ev: AckEvent) -> None:
        if not ev.nack and ev.proxy_id in self.pending and self.dist.sessions[ev.proxy_id].sync is SyncState.SYNCED:
            self.pending.discard(ev.proxy_id)
            self._check()

    def _check(self) -> None:
        if self.pushed and not self.pending and not self.done.is_set():
            self.done_at_s = time.monotonic()
            self.done.set()

    async def converge(self, trigger: Callable[[float], None], timeout_s: float = 60) -> tuple[float, int]:
        """(ms from trigger to the last ACK, proxies affected)."""
        self.pending.clear()
        self.pushed, self.affected = False, 0
        self.done.clear()
        t0 = time.monotonic()
        trigger(t0)
        try:
            await asyncio.wait_for(self.done.wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"{len(self.pending)} proxies did not ACK within {timeout_s} s: "
                                 f"{sorted(self.pending)[:5]} ... counts {self.dist.counts()}") from None
        return (self.done_at_s - t0) * 1000, self.affected

    async def reconcile_loop(self, stop: asyncio.Event) -> None:
        await reconcile_until(self.rec, stop)


class ShardBench:
    """`Bench` for a sharded controller: the reconciler here pushes through a `ShardedOutbox` to
    the shard actors; a round is over when every shard whose proxies' content moved has seen the
    last of them ACK (`ConfigShardHost.wait_settled`)."""

    def __init__(self, scenario: Scenario, handles: list[Any]) -> None:
        from federation.controller.reconcile_service import ShardedOutbox
        from federation.ray.remote import RemoteShards

        self.scenario = scenario
        self.handles = handles
        self.outbox = ShardedOutbox(RemoteShards(handles).send_all, len(handles))
        self.rec = Reconciler(scenario.render, self._push, None, Debouncer(0.1, 10.0), clock=time.monotonic)
        self.waits: list[Any] = []
        self.pushed_at_s = 0.0
        self.pushed = asyncio.Event()
        self.timeout_s = 60.0

    def _push(self, changed: Mapping[str, ProxyConfig]) -> None:
        self.outbox.push(changed)
        self.pushed_at_s = time.monotonic()
        self.waits = [h.wait_settled.remote(self.timeout_s) for h in self.handles]
        self.pushed.set()

    async def converge(self, trigger: Callable[[float], None], timeout_s: float = 60) -> tuple[float, int]:
        self.pushed.clear()
        self.timeout_s = timeout_s
        t0 = time.monotonic()
        trigger(t0)
        await asyncio.wait_for(self.pushed.wait(), timeout_s)
        results = await asyncio.gather(*self.waits)
        waiting = sum(w for _at, _moved, w in results)
        if waiting:
            raise AssertionError(f"{waiting} proxies did not ACK within {timeout_s} s")
        moved = sum(m for _at, m, _w in results)
        done_s = max([at for at, m, _w in results if m], default=self.pushed_at_s)
        return (done_s - t0) * 1000, moved

    async def reconcile_loop(self, stop: asyncio.Event) -> None:
        await reconcile_until(self.rec, stop)


def spawn_proxy_workers(ports: Mapping[str, int], processes: int, client: str) -> list[subprocess.Popen[bytes]]:
    """The simulated proxies in `processes` processes (the same number however many shards: the
    fleet's share of the 2 cores stays the same); each proxy dials its port (its shard's)."""
    ids = list(ports)
    chunks = [ids[w::processes] for w in range(max(1, min(processes, len(ids))))]
    return [subprocess.Popen(
        [sys.executable, "-m", "benchmarks.convergence", "--serve-proxies", client, "127.0.0.1",
         *(f"{ports[pid]}@{pid}" for pid in chunk)],
        stdin=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()}) for chunk in chunks]


async def serve_proxies(client: str, host: str, entries: list[str]) -> None:
    """A worker process: run the proxies of `entries` ("PORT@PROXY_ID") until the parent closes our stdin."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)
    targets = {pid: f"{host}:{port}" for port, _, pid in (e.partition("@") for e in entries)}
    if client == "lite":
        await run_lite_fleet("", list(targets), stop, targets=targets)
        return
    proxies = [SimProxy(p, t, p.split("/")[1]).start() for p, t in targets.items()]
    await stop.wait()
    for p in proxies:
        p.client.stop()
    await asyncio.gather(*(p.task for p in proxies if p.task), return_exceptions=True)


async def bench(scenario: Scenario, rounds: int, client: str = "lite", workers: int = 1,
                shards: int = 0) -> dict[str, Any]:
    """`workers`: processes running the simulated proxies; `shards`: config
    shards on Ray (0: the distributor in this process)."""
    n = len(scenario.ids)
    handles: list[Any] = []
    b: Bench | ShardBench
    if shards:
        from federation.controller.shard import shard_of

        handles, ports, placed = await start_shards(shards)
        b = ShardBench(scenario, handles)
        procs = spawn_proxy_workers({pid: ports[shard_of(pid, shards)] for pid in scenario.ids}, workers, client)
    else:
        b = Bench(scenario)
        port = await b.server.start("127.0.0.1:0")
        procs = spawn_proxy_workers(dict.fromkeys(scenario.ids, port), workers, client)
    stop = asyncio.Event()
    loop_task = asyncio.ensure_future(b.reconcile_loop(stop))
    try:
        t0 = time.monotonic()
        _, synced = await b.converge(lambda now: scenario.initial(b.rec, now), 300)
        print(f"# {n} proxies connected and synced ({synced} configs) in {time.monotonic() - t0:.1f} s"
              f"{f' over {shards} shards' if shards else ''}", file=sys.stderr, flush=True)
        cpu0 = cpu_s(resource.RUSAGE_SELF)
        proxies_cpu0 = proc_cpu_s([p.pid for p in procs])
        load0 = os.getloadavg()[0]
        commit_ms, change_ms, commit_n, change_n, render_ms = [], [], [], [], []
        for r in range(1, rounds + 1):  # a one-service commit
            ms, affected = await b.converge(lambda now: scenario.commit(b.rec, r, now))  # noqa: B023
            commit_ms.append(ms)
            commit_n.append(affected)
            render_ms.append(b.rec.last_duration_s * 1000)
            await asyncio.sleep(0.05)
        for r in range(1, rounds + 1):  # one endpoint flips readiness
            ms, affected = await b.converge(lambda now: scenario.endpoint_change(b.rec, r, now))  # noqa: B023
            change_ms.append(ms)
            change_n.append(affected)
            await asyncio.sleep(0.05)
        cpu = cpu_s(resource.RUSAGE_SELF) - cpu0
        proxies_cpu = proc_cpu_s([p.pid for p in procs]) - proxies_cpu0
        out = {
            "proxies": n, "rounds": rounds, "client": client, "workers": shards,
            "commit_to_all_acked_ms_p50": round(pct(commit_ms, 0.5), 1),
            "commit_to_all_acked_ms_p99": round(pct(commit_ms, 0.99), 1),
            "commit_proxies_acked": int(pct([float(x) for x in commit_n], 0.5)),
            "commit_reconcile_ms_p50": round(pct(render_ms, 0.5), 1),
            "endpoint_change_to_all_acked_ms_p50": round(pct(change_ms, 0.5), 1),
            "endpoint_change_to_all_acked_ms_p99": round(pct(change_ms, 0.99), 1),
            "endpoint_change_proxies_acked": int(pct([float(x) for x in change_n], 0.5)),
            "debounce_ms": 100,
            "controller_cpu_ms_per_round": round(cpu * 1000 / (2 * rounds), 1),
            # the simulated proxies share the machine's cores with the controller: the two per round,
            # summed and divided by the cores, are a floor for a round on an otherwise idle machine
            "proxies_cpu_ms_per_round": round(proxies_cpu * 1000 / (2 * rounds), 1),
            "controller_rss_mib": round(rss_mib(), 1),
            "load_average_1m": round((load0 + os.getloadavg()[0]) / 2, 2),
        }
        if isinstance(b, Bench):
            out["shared_segments"] = {"hits": b.dist.segments.hits, "misses": b.dist.segments.misses}
        else:
            out["shard_nodes"] = placed
        return out
    finally:
        stop.set()
        await loop_task
        for p in procs:
            if p.stdin:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if isinstance(b, Bench):
            await b.server.stop(0)
        else:
            await stop_shards(handles)


async def start_shards(shards: int) -> tuple[list[Any], list[int], list[str]]:
    """`shards` ConfigShardActors dealt over the Ray nodes: (handles, ports, node id per shard)."""
    from federation.ray.actors import ConfigShardActor
    from federation.ray.placement import alive_node_ids, on_node, shard_node

    # a hard affinity here (the controller's is soft): Ray's soft one stacked both shards of a
    # two-node run on one node, and the figure is about the shards being dealt over both
    nodes = alive_node_ids()
    handles = [ConfigShardActor.options(**on_node(str(shard_node(k, nodes)), soft=False))  # type: ignore[attr-defined]
               .remote(k, shards, 1, True) for k in range(shards)]
    ports = [int(p) for p in await asyncio.gather(*(h.start.remote("127.0.0.1:0") for h in handles))]
    placed = [str(w["node_id"])[:8] for w in await asyncio.gather(*(h.where.remote() for h in handles))]
    return handles, ports, placed


async def stop_shards(handles: list[Any]) -> None:
    import ray

    for h in handles:
        with contextlib.suppress(Exception):
            await h.stop.remote()
        ray.kill(h, no_restart=True)


def start_ray(nodes: int) -> tuple[Any, str]:
    """A private local Ray of `nodes` raylets on this machine (one CPU each when 2) for the shards.
    Like `tests/integration/controller/two_node.py`, it never writes /tmp/ray/ray_current_cluster
    (`Cluster` would, and delete it on shutdown: that would hijack or break every other
    `ray.init()` on this shared machine) and keeps its files in its own temp directory."""
    import tempfile

    os.environ.setdefault("RAY_USE_UVLOOP", "0")
    import ray
    import ray._common.utils
    import ray._private.utils

    temp_dir = tempfile.mkdtemp(prefix="meshfed-bench-ray-", dir="/tmp")
    if nodes <= 1:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
        return None, temp_dir
    from ray.cluster_utils import Cluster

    ray._private.utils.write_ray_address = lambda *_a, **_k: None   # type: ignore[assignment]
    ray._common.utils.reset_ray_address = lambda *_a, **_k: None    # type: ignore[assignment]
    node_args = {"num_cpus": 1, "temp_dir": temp_dir, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    for _ in range(nodes - 1):
        cluster.add_node(**node_args)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster, temp_dir


async def full_resync(endpoints: int = 100_000) -> dict[str, Any]:
    """One proxy, from nothing to a config of `endpoints` endpoints (100 services)."""
    pid = "ztunnel/a/big"
    dist = ConfigDistributor(epoch=1, clock=time.monotonic)
    server = ConfigServer(dist, insecure=True, write_timeout_s=30)
    port = await server.start("127.0.0.1:0")
    proxy = SimProxy(pid, f"127.0.0.1:{port}").start()
    try:
        await wait_until(lambda: pid in dist.sessions and dist.sessions[pid].connected, 10)
        per = endpoints // 100
        render = SyntheticRender([pid])
        obs = observation({f"svc{i}": per for i in range(100)}, time.time())
        t_render = time.perf_counter()
        cfg = render(RenderInput(snapshot("big", 100), {CLUSTER: obs}, {}, frozenset(), 0.0)).configs[pid]
        render_ms = (time.perf_counter() - t_render) * 1000
        encode_s: list[float] = []
        build = dist.build

        def timed_build(s: Any) -> list[bytes]:
            t = time.perf_counter()
            try:
                return build(s)
            finally:
                encode_s.append(time.perf_counter() - t)

        dist.build = timed_build  # type: ignore[method-assign]
        t0 = time.monotonic()
        dist.set_desired({pid: cfg})
        ok = await wait_until(lambda: proxy.revision == "big" and dist.sessions[pid].acks == 1, 120, 0.005)
        assert ok
        ms = (time.monotonic() - t0) * 1000
        return {"full_resync_endpoints": endpoints, "full_resync_ms": round(ms, 1),
                "full_resync_encode_ms": round(max(encode_s, default=0.0) * 1000, 1),
                "full_resync_render_ms": round(render_ms, 1),
                "controller_plus_proxy_rss_mib": round(rss_mib(), 1)}
    finally:
        await proxy.stop()
        await server.stop(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proxies", default="100,1000")
    ap.add_argument("--rounds", type=int, default=10, help="rounds per figure (p50 = their median)")
    ap.add_argument("--renderer", choices=("core", "synthetic"), default="core")
    ap.add_argument("--clusters", type=int, default=10, help="core renderer: clusters of the fleet")
    ap.add_argument("--services", type=int, default=20)
    ap.add_argument("--endpoints-per-service", type=int, default=10, help="core renderer")
    ap.add_argument("--client", choices=("lite", "xds"), default="lite", help="simulated proxies (see docstring)")
    ap.add_argument("--proxy-workers", type=int, default=1, help="processes running the simulated proxies")
    ap.add_argument("--workers", default="0", help="config shards on Ray, a comma list (0: in this process)")
    ap.add_argument("--ray-nodes", type=int, default=1, help="raylets on this machine when sharded (1 or 2)")
    ap.add_argument("--resync-endpoints", type=int, default=100_000, help="0: skip the full resync")
    ap.add_argument("--gc", choices=("controller", "default"), default="controller",
                    help="this process's collector: the controller's settings (federation.controller.gc_tuning) "
                         "or CPython's defaults")
    ap.add_argument("--grpc-floor", action=argparse.BooleanOptionalAction, default=True,
                    help="per proxy count, the same round on a gRPC server that does nothing else "
                         "(benchmarks.grpc_floor): the floor under the figures")
    ap.add_argument("--serve-proxies", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_proxies:
        asyncio.run(serve_proxies(args.serve_proxies[0], args.serve_proxies[1], args.serve_proxies[2:]))
        return
    shard_counts = [int(x) for x in args.workers.split(",")]
    results: dict[str, Any] = {"benchmark": "convergence", "renderer": args.renderer, "runs": [],
                               "ray_nodes": args.ray_nodes if any(shard_counts) else 0, "gc": args.gc}
    interpreter_gc = gc.get_threshold()
    if args.gc == "controller":
        interpreter_gc = tune_collector()    # as the controller's actors do
    cluster, temp_dir = start_ray(args.ray_nodes) if any(shard_counts) else (None, "")
    try:
        for n in [int(x) for x in args.proxies.split(",")]:
            floor = (asyncio.run(measure_grpc_floor(n, args.rounds, args.proxy_workers)) if args.grpc_floor
                     else None)
            for shards in shard_counts:
                scenario: Scenario = (CoreScenario(n, args.clusters, args.services, args.endpoints_per_service,
                                                   args.rounds)
                                      if args.renderer == "core" else SyntheticScenario(n, args.services))
                r = asyncio.run(bench(scenario, args.rounds, args.client, args.proxy_workers, shards))
                if floor is not None:
                    r.update({k: v for k, v in floor.items() if k.startswith("grpc_floor")})
                    r["commit_p99_over_grpc_floor_p99"] = round(r["commit_to_all_acked_ms_p99"]
                                                                / floor["grpc_floor_ms_p99"], 2)
                print(json.dumps(r), file=sys.stderr, flush=True)
                results["runs"].append(r)
    finally:
        if any(shard_counts):
            import ray

            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    if args.resync_endpoints:
        # the resync's proxy runs in this process too, and proxies keep CPython's collector
        # settings: measure the resync under those (for its controller side too: conservative)
        gc.set_threshold(*interpreter_gc)
        results["resync"] = asyncio.run(full_resync(args.resync_endpoints))
        print(json.dumps(results["resync"]), file=sys.stderr, flush=True)
    first = results["runs"][0] if results["runs"] else {}
    results.update({k: first.get(k) for k in ("proxies", "commit_to_all_acked_ms_p50", "commit_to_all_acked_ms_p99",
                                              "endpoint_change_to_all_acked_ms_p50",
                                              "endpoint_change_to_all_acked_ms_p99", "controller_rss_mib")})
    results["median_of"] = args.rounds
    print(json.dumps(results))


if __name__ == "__main__":
    main()
