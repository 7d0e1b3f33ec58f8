"""The convergence benchmark's floor (`benchmarks.grpc_floor`) measures real round trips."""

from __future__ import annotations

import asyncio

from benchmarks.grpc_floor import measure, pct


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
