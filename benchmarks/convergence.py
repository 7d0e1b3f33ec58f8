"""Convergence of the config push path: trigger -> every simulated proxy has ACKed.

`python -m benchmarks.convergence [--proxies 100,1000] [--rounds 10]` prints progress lines and,
as its last line, one JSON object: per proxy count, `commit_to_all_acked_ms_p50/p99`,
`endpoint_change_to_all_acked_ms_p50/p99`, `controller_rss_mib`, and a full resync of 100k
endpoints to one proxy.

What runs: the controller side in this process — `Reconciler` (debounce 100 ms / 10 s, as istiod)
pushing into the `ConfigDistributor` of a real gRPC `ConfigServer` on loopback; the proxies are
real `ztunnel.xds.XdsClient`s (protobuf decode, delta apply, ACK) in a separate process, so the
controller's figures are not shared with the clients' CPU time on the same event loop.
The clock starts when the trigger arrives at the reconciler (a new snapshot for a "commit", a
new observation for an "endpoint change") and stops at the last ACK; the 100 ms debounce is
included. Rendering is a synthetic renderer (every proxy sees every service), because the
point here is distribution; Git (~4 ms per diff) and the core's render are measured elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

from benchmarks.simproxy import SimProxy, header
from clusters.observation import ClusterObservation, EndpointInfo
from federation.grpc_server import AckEvent, ConfigDistributor, ConfigServer, wait_until
from federation.reconciler import Debouncer, Reconciler, RenderInput, RenderOutput
from gitops.model import ConfigSnapshot, Federation, Revision
from ztunnel.config import Endpoint, Service, ServicePortMap, Stamp

CLUSTER = "a"


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


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def run_proxies(target: str, ids: list[str]) -> None:
    proxies = [SimProxy(p, target).start() for p in ids]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # parent closes stdin to stop us
    await stop.wait()
    for p in proxies:
        p.client.stop()
    await asyncio.gather(*(p.task for p in proxies if p.task), return_exceptions=True)


class Bench:
    def __init__(self, n: int) -> None:
        self.n = n
        self.ids = [f"ztunnel/{CLUSTER}/node-{i}" for i in range(n)]
        self.dist = ConfigDistributor(epoch=1, clock=time.monotonic)
        self.server = ConfigServer(self.dist, insecure=True, write_timeout_s=10)
        self.acked: dict[str, set[str]] = {}
        self.done_at: dict[str, float] = {}
        self.dist.listeners.append(self._on_ack)
        self.rec = Reconciler(SyntheticRender(self.ids), self.dist.set_desired, None, Debouncer(0.1, 10.0),
                              clock=time.monotonic)

    def _on_ack(self, ev: AckEvent) -> None:
        if ev.nack:
            return
        s = self.acked.setdefault(ev.stamp.revision, set())
        s.add(ev.proxy_id)
        if len(s) == self.n:
            self.done_at[ev.stamp.revision] = time.monotonic()

    async def reconcile_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            d = self.rec.debounce.deadline_s()
            await asyncio.sleep(0.002 if d is None else max(0.0, d - time.monotonic()))
            if self.rec.due(time.monotonic()):
                self.rec.reconcile(time.monotonic())

    async def wait_all(self, rev: str, timeout_s: float = 30) -> bool:
        return await wait_until(lambda: rev in self.done_at, timeout_s, 0.001)


def spawn_proxy_workers(port: int, chunks: list[list[str]]) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(
        [sys.executable, "-m", "benchmarks.convergence", "--serve-proxies", f"127.0.0.1:{port}", *chunk],
        stdin=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()}) for chunk in chunks]


async def bench(n: int, rounds: int, services: int) -> dict[str, Any]:
    b = Bench(n)
    port = await b.server.start("127.0.0.1:0")
    workers = max(1, min(4, n // 250))
    procs = spawn_proxy_workers(port, [b.ids[w::workers] for w in range(workers)])
    stop = asyncio.Event()
    loop_task = asyncio.ensure_future(b.reconcile_loop(stop))
    try:
        eps = {f"svc{i}": 3 for i in range(services)}
        b.rec.on_observation(observation(eps, time.time()), time.monotonic())
        b.rec.on_snapshot(snapshot("rev-0", services), time.monotonic())
        assert await wait_until(lambda: b.dist.counts()["SYNCED"] == n, 120, 0.05), b.dist.counts()
        print(f"# {n} proxies connected and synced", file=sys.stderr, flush=True)
        commit_ms, change_ms = [], []
        for r in range(1, rounds + 1):
            rev = f"rev-{r}"  # a one-service commit: the service list grows by one
            t0 = time.monotonic()
            b.rec.on_snapshot(snapshot(rev, services + r), t0)
            assert await b.wait_all(rev), f"{rev}: {len(b.acked.get(rev, ()))}/{n} acked"
            commit_ms.append((b.done_at[rev] - t0) * 1000)
            await asyncio.sleep(0.05)
        for r in range(1, rounds + 1):
            eps["svc0"] = 3 + r  # an endpoint appears in one service
            t0 = time.monotonic()
            b.rec.on_observation(observation(eps, time.time()), t0)
            rev = f"rev-{rounds}"
            before = len(b.done_at)
            # same revision, new content: wait for every proxy's ACK of the new version
            target = {p: b.dist.sessions[p].version + 1 for p in b.ids}
            ok = await wait_until(lambda: all(b.dist.sessions[p].acked_stamp is not None and
                                              b.dist.sessions[p].acked_stamp.version >= target[p]  # type: ignore[union-attr]  # noqa: B023
                                              for p in b.ids), 30, 0.001)
            assert ok and before == len(b.done_at)
            change_ms.append((time.monotonic() - t0) * 1000)
            await asyncio.sleep(0.05)
        return {
            "proxies": n, "rounds": rounds, "services": services + rounds,
            "commit_to_all_acked_ms_p50": round(pct(commit_ms, 0.5), 1),
            "commit_to_all_acked_ms_p99": round(pct(commit_ms, 0.99), 1),
            "endpoint_change_to_all_acked_ms_p50": round(pct(change_ms, 0.5), 1),
            "endpoint_change_to_all_acked_ms_p99": round(pct(change_ms, 0.99), 1),
            "debounce_ms": 100,
            "controller_rss_mib": round(rss_mib(), 1),
        }
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
        await b.server.stop(0)


async def full_resync(endpoints: int = 100_000) -> dict[str, Any]:
    """One proxy, from nothing to a config of `endpoints` endpoints (100 services)."""
    dist = ConfigDistributor(epoch=1, clock=time.monotonic)
    server = ConfigServer(dist, insecure=True, write_timeout_s=30)
    port = await server.start("127.0.0.1:0")
    proxy = SimProxy("ztunnel/a/big", f"127.0.0.1:{port}").start()
    try:
        await wait_until(lambda: "ztunnel/a/big" in dist.sessions and dist.sessions["ztunnel/a/big"].connected, 10)
        per = endpoints // 100
        render = SyntheticRender(["ztunnel/a/big"])
        obs = observation({f"svc{i}": per for i in range(100)}, time.time())
        t_render = time.perf_counter()
        cfg = render(RenderInput(snapshot("big", 100), {CLUSTER: obs}, {}, frozenset(), 0.0)).configs["ztunnel/a/big"]
        render_ms = (time.perf_counter() - t_render) * 1000
        t0 = time.monotonic()
        dist.set_desired({"ztunnel/a/big": cfg})
        ok = await wait_until(lambda: proxy.revision == "big" and dist.sessions["ztunnel/a/big"].acks == 1, 120, 0.005)
        assert ok
        ms = (time.monotonic() - t0) * 1000
        return {"full_resync_endpoints": endpoints, "full_resync_ms": round(ms, 1),
                "full_resync_render_ms": round(render_ms, 1),
                "controller_plus_proxy_rss_mib": round(rss_mib(), 1)}
    finally:
        await proxy.stop()
        await server.stop(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proxies", default="100,1000")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--services", type=int, default=20)
    ap.add_argument("--resync-endpoints", type=int, default=100_000)
    ap.add_argument("--serve-proxies", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_proxies:
        asyncio.run(run_proxies(args.serve_proxies[0], args.serve_proxies[1:]))
        return
    results: dict[str, Any] = {"benchmark": "convergence", "runs": []}
    for n in [int(x) for x in args.proxies.split(",")]:
        r = asyncio.run(bench(n, args.rounds, args.services))
        print(json.dumps(r), file=sys.stderr, flush=True)
        results["runs"].append(r)
    if args.resync_endpoints:
        results["resync"] = asyncio.run(full_resync(args.resync_endpoints))
    first = results["runs"][0] if results["runs"] else {}
    results.update({k: first.get(k) for k in ("proxies", "commit_to_all_acked_ms_p50", "commit_to_all_acked_ms_p99",
                                              "endpoint_change_to_all_acked_ms_p50", "controller_rss_mib")})
    results["median_of"] = args.rounds
    print(json.dumps(results))


if __name__ == "__main__":
    main()
