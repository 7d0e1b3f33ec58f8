"""The floor under the convergence figures: gRPC alone, with nothing of the controller.

A push wave is, per proxy, one message out on its config stream and one ACK back. This measures
that and nothing else on the same machine and in the same shape as `benchmarks.convergence`: a
`grpc.aio` server in this process with one bidirectional stream per simulated proxy, the clients
in `workers` separate processes (one channel and TCP connection each), and per round one
`message_bytes` message written to every stream and the clock stopped at the last ACK. The
handlers do nothing else (identity serializers, no decode): a controller built as ours is (one
`grpc.aio` event loop, `grpc.aio` proxies on the same cores) cannot push a round faster than this
here; `benchmarks.convergence` reports it next to its own figures (`grpc_floor_ms_p50/p99`, p99
being the slowest of few rounds), measured just before them (not interleaved). What it does not
bound: a server split over processes, or proxies on other machines (the server's and the
clients' CPU per round are reported apart for that).

`python -m benchmarks.grpc_floor [--streams 1000] [--rounds 10] [--workers 2]` prints one JSON
object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

from benchmarks.measure import cpu_s, pct, proc_cpu_s

SERVICE, METHOD = "meshfed.bench.Floor", "Stream"


def _same(b: bytes) -> bytes:
    return b


async def _client(port: int, stop: asyncio.Event) -> None:
    """One simulated proxy: a channel of its own (a connection per channel, as a proxy has) and
    one stream, ACKing every message, until `stop`. A stream that fails is opened again after
    0.05-0.15 s (jittered, so they do not come back in step), as the simulated proxies of
    `benchmarks.convergence` reconnect: thousands of simultaneous connects overflow the server's
    accept queue, and a channel left to gRPC's reconnect backoff comes back minutes later (10,000
    streams: 3,963 had connected after 260 s)."""
    import grpc.aio

    opts = [("grpc.use_local_subchannel_pool", 1)]
    while not stop.is_set():
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as channel:
                call = channel.stream_stream(f"/{SERVICE}/{METHOD}", request_serializer=_same,
                                             response_deserializer=_same)()
                await call.write(b"hello")
                async for _ in call:
                    await call.write(b"ack")
        except Exception:   # whatever ended the stream, a proxy would dial again
            pass
        await asyncio.sleep(random.uniform(0.05, 0.15))   # not all in step: they overflowed the queue once


async def _clients(port: int, streams: int, stop_fd: int) -> None:
    """A worker process: `streams` simulated proxies, until `stop_fd` closes."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(stop_fd, stop.set)
    tasks = [asyncio.ensure_future(_client(port, stop)) for _ in range(streams)]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _spawn_clients(port: int, streams: int, workers: int, stop_fd: int) -> list[subprocess.Popen[bytes]]:
    shares = [streams // workers + (1 if w < streams % workers else 0) for w in range(workers)]
    return [subprocess.Popen([sys.executable, "-m", "benchmarks.grpc_floor", "--clients", str(port), str(n),
                              str(stop_fd)], pass_fds=(stop_fd,), env={**os.environ, "PYTHONPATH": os.getcwd()})
            for n in shares if n]


async def serve(handler: Any) -> tuple[Any, int]:
    """A started `grpc.aio` server on a free loopback port whose one method is the bidirectional
    stream `handler` (bytes in, bytes out): (server, port)."""
    import grpc
    import grpc.aio

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.stream_stream_rpc_method_handler(handler, request_deserializer=_same,
                                                      response_serializer=_same)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def measure(streams: int, rounds: int = 10, workers: int = 2, message_bytes: int = 1024) -> dict[str, Any]:
    """Per round: one message to each of `streams` streams, until every ACK is back."""
    wakes: set[asyncio.Event] = set()    # one per live stream
    # a round: the streams woken and not yet answered; a stream that fails during the round is
    # taken off (counted in `failed`), so the round ends without it instead of waiting for ever
    outstanding: set[asyncio.Event] = set()
    answered = asyncio.Event()
    failed = 0
    message = b"\x00" * message_bytes

    def settle(wake: asyncio.Event) -> None:
        outstanding.discard(wake)
        if not outstanding:
            answered.set()

    async def handler(requests: Any, context: Any) -> None:
        nonlocal failed
        wake = asyncio.Event()
        await requests.__anext__()                      # the hello
        wakes.add(wake)

        async def read_acks() -> None:
            async for _ in requests:
                if wake in outstanding:
                    settle(wake)

        reader = asyncio.ensure_future(read_acks())
        try:
            while True:
                await wake.wait()
                wake.clear()
                await context.write(message)
        finally:
            wakes.discard(wake)   # a stream that failed (its client reconnects with a new one)
            if wake in outstanding:
                failed += 1
                settle(wake)
            reader.cancel()

    async def all_connected(deadline_s: float) -> None:
        while len(wakes) < streams:
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"only {len(wakes)} of {streams} streams connected")
            await asyncio.sleep(0.05)

    server, port = await serve(handler)
    stop_r, stop_w = os.pipe()
    procs = _spawn_clients(port, streams, workers, stop_r)
    try:
        await all_connected(time.monotonic() + 60 + streams / 50)
        times_ms = []
        cpu0, clients_cpu0 = cpu_s(), proc_cpu_s([p.pid for p in procs])
        for _ in range(rounds):
            await all_connected(time.monotonic() + 60)   # streams that failed are back
            outstanding.update(wakes)
            answered.clear()
            started = time.perf_counter()
            for wake in list(outstanding):
                wake.set()
            await asyncio.wait_for(answered.wait(), 60)
            times_ms.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.05)
        cpu_ms = (cpu_s() - cpu0) * 1000 / rounds
        clients_cpu_ms = (proc_cpu_s([p.pid for p in procs]) - clients_cpu0) * 1000 / rounds
    finally:
        os.close(stop_w)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        os.close(stop_r)
        await server.stop(0)
    return {"streams": streams, "rounds": rounds, "message_bytes": message_bytes,
            "grpc_floor_ms_p50": round(pct(times_ms, 0.5), 1),
            "grpc_floor_ms_p99": round(pct(times_ms, 0.99), 1),
            "grpc_floor_server_cpu_ms_per_round": round(cpu_ms, 1),
            # the clients run on the same cores: (server + clients) / cores bounds a round from below
            "grpc_floor_clients_cpu_ms_per_round": round(clients_cpu_ms, 1),
            # streams that failed during a round (their round ended without their ACK)
            "grpc_floor_streams_failed": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2, help="processes running the clients")
    ap.add_argument("--message-bytes", type=int, default=1024)
    ap.add_argument("--clients", nargs=3, type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.clients:
        port, streams, stop_fd = args.clients
        asyncio.run(_clients(port, streams, stop_fd))
        return
    print(json.dumps(asyncio.run(measure(args.streams, args.rounds, args.workers, args.message_bytes))))


if __name__ == "__main__":
    main()
