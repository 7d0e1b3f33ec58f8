"""The proxy's allocator settings (`ztunnel.allocator`): whose setting wins, and when nothing is set."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from ztunnel import allocator


@pytest.mark.parametrize("env, mine", [
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "GLIBC_TUNABLES"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES"),
    ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, None),   # not an allocator setting: ours apply
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, None),   # another malloc setting: not the thresholds
    ({}, None),
])
def test_the_operators_own_allocator_settings_are_recognised(env: dict[str, str], mine: str | None) -> None:
    assert allocator.operator_settings(env) == mine


def test_an_operators_setting_is_kept_and_glibc_is_not_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc() -> Any:
        raise AssertionError("the C library must not be asked")

    monkeypatch.setattr(allocator, "_libc", no_libc)
    assert allocator.tune_allocator({"MALLOC_TRIM_THRESHOLD_": "0"}) == "kept the operator's MALLOC_TRIM_THRESHOLD_"


def test_another_c_library_keeps_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    allocator._libc.cache_clear()          # looked up once per process: look again
    try:
        assert allocator.tune_allocator({}) == "not glibc: the C library's defaults are kept"
        allocator.release_startup_heap()   # and trimming is skipped, not an error
    finally:
        allocator._libc.cache_clear()


@pytest.mark.parametrize("accepted, said", [
    ((), "glibc refused the thresholds: its defaults are kept"),
    ((allocator.M_MMAP_THRESHOLD,), {"mmap_threshold_bytes": allocator.MMAP_THRESHOLD_BYTES}),
])
def test_a_threshold_glibc_refused_is_not_claimed(monkeypatch: pytest.MonkeyPatch, accepted: tuple[int, ...],
                                                  said: object) -> None:
    def mallopt(param: int, value: int) -> int:   # mallopt(3): 1 accepted, 0 refused
        return 1 if param in accepted else 0

    monkeypatch.setattr(allocator, "_libc", lambda: SimpleNamespace(mallopt=mallopt))
    assert allocator.tune_allocator({}) == said


def test_the_free_heap_goes_back_at_every_interval_until_the_drain_cancels_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import itertools

    passes: list[float] = []

    async def run() -> None:
        third = asyncio.Event()

        def release() -> None:
            passes.append(asyncio.get_running_loop().time())
            if len(passes) == 3:
                third.set()

        monkeypatch.setattr(allocator, "release_free_heap", release)
        task = asyncio.ensure_future(allocator.release_free_heap_periodically(0.01))
        await asyncio.wait_for(third.wait(), 10)   # it repeats
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        n = len(passes)
        await asyncio.sleep(0.05)
        assert len(passes) == n        # cancelled (the drain): no pass after it

    asyncio.run(run())
    assert all(b - a >= 0.009 for a, b in itertools.pairwise(passes))   # an interval apart, not in a spin
