"""The benchmarks' measuring tools: the convergence floor (`benchmarks.grpc_floor`) measures real round
trips; quantiles and CPU readings (`benchmarks.measure`)."""

from __future__ import annotations

import asyncio

from benchmarks.grpc_floor import measure
from benchmarks.measure import pct


def test_every_stream_gets_its_message_and_acks_it_in_each_round() -> None:
    out = asyncio.run(measure(streams=30, rounds=3, workers=2, message_bytes=64))
    assert out["streams"] == 30 and out["rounds"] == 3
    # a round ends at the 30th ACK: a positive, finite time, no faster at p99 than at p50
    assert 0 < out["grpc_floor_ms_p50"] <= out["grpc_floor_ms_p99"] < 60_000
    assert out["grpc_floor_server_cpu_ms_per_round"] > 0 and out["grpc_floor_clients_cpu_ms_per_round"] > 0


def test_quantiles_are_nearest_rank() -> None:
    assert pct([5.0, 1.0, 3.0], 0.5) == 3.0
    assert pct([float(x) for x in range(1, 11)], 0.99) == 10.0
    assert pct([], 0.5) != pct([], 0.5)     # NaN


def test_a_processs_cpu_is_read_to_the_nanosecond_and_counts_only_running() -> None:
    """`proc_run_s` (the data-plane benchmark's CPU per request and per connection) follows what
    the process ran, not the wall clock: a busy spell shows, a sleep does not."""
    import os
    import subprocess
    import sys
    import time

    from benchmarks.measure import proc_cpu_s, proc_run_s

    assert proc_run_s(2**22 + 12345) == 0.0            # no such process: nothing, not an error
    child = subprocess.Popen([sys.executable, "-c",
                              "import time, sys\nt = time.time()\nwhile time.time() - t < 0.3: pass\n"
                              "sys.stdout.write('busy\\n'); sys.stdout.flush(); time.sleep(30)"],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"busy\n"
        ran = proc_run_s(child.pid)
        assert 0.25 < ran < 1.5                          # the busy spell (and the interpreter's start)
        assert abs(ran - proc_cpu_s([child.pid])) < 0.05  # the clock-tick reading agrees
        time.sleep(0.3)
        assert proc_run_s(child.pid) - ran < 0.02        # asleep: no CPU
        assert proc_run_s(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()


def test_a_client_whose_stream_fails_opens_another() -> None:
    """The floor's clients come back when their stream fails (at 10,000 streams the accept queue
    overflows and gRPC's own reconnect backoff left 6,037 of them out for minutes)."""
    import grpc

    from benchmarks.grpc_floor import _client, serve

    async def run() -> int:
        hellos = 0
        second = asyncio.Event()

        async def handler(requests, context):  # type: ignore[no-untyped-def]
            nonlocal hellos
            await requests.__anext__()
            hellos += 1
            if hellos == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the first stream fails")
            second.set()
            yield b"message"
            async for _ in requests:
                await asyncio.sleep(10)

        server, port = await serve(handler)
        stop = asyncio.Event()
        client = asyncio.ensure_future(_client(port, stop))
        try:
            await asyncio.wait_for(second.wait(), 10)
        finally:
            stop.set()
            client.cancel()
            await asyncio.gather(client, return_exceptions=True)
            await server.stop(0)
        return hellos

    assert asyncio.run(run()) == 2
