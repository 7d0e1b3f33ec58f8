"""The proxy process's C allocator (glibc malloc): the settings the data plane depends on.

Bulk traffic allocates buffers of up to 256 KiB per read: the bytes uvloop hands `data_received`,
the TLS adapter's plaintext of one read, the HBONE framer's DATA run. glibc serves those above its
mmap threshold (128 KiB, raised dynamically only as far as the largest block freed) with an
mmap/munmap each, and frees that leave more than its trim threshold free at the top of the heap
with a `brk` shrink, so the next read grows the heap again — either way the kernel maps and zeroes
the pages again for every buffer. Measured (`python -m benchmarks.dataplane --rounds 3 --sweep ''`,
3 runs alternated with the commit before, 4 Dec 2026): node B's CPU per MiB of a single stream
2,148–2,343 -> 1,250–1,289 µs, the pair's throughput 0.68–0.79 -> 0.86–0.91x HAProxy's pair and
the gateway path's 0.43–0.49 -> 0.61–0.62x; idle RSS 41.4–41.6 MB either way.

So `tune_allocator` raises both thresholds: blocks up to `MMAP_THRESHOLD_BYTES` come from the heap,
and up to `TRIM_THRESHOLD_BYTES` of free space at the top of the heap is kept for the next reads.
What it does not bound is free space *below* a block still in use: after a burst, freed buffers
under a live allocation stay mapped (glibc's own dynamic threshold does the same once it has risen,
which it does after the first such buffer is freed). So `release_free_heap` (`malloc_trim(0)`:
free pages anywhere in the heap go back to the kernel) runs every `TRIM_INTERVAL_S` while the
proxy serves, and `release_startup_heap` once after start-up. Measured in a process of its own:
400 freed 256 KiB buffers under small live blocks held ~100 MiB; after `release_free_heap`, ~2 MiB
(`tests/integration/test_allocator.py`).

Who decides: `python -m ztunnel --allocator default` keeps glibc's own behaviour (no thresholds,
no periodic trim); an operator who set the thresholds themselves (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, or `glibc.malloc.mmap_threshold`/`trim_threshold` in `GLIBC_TUNABLES`)
keeps theirs; another C library (musl, whose `mallopt` does nothing) is left alone.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Mapping
from functools import cache
from typing import Any

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 1 << 20      # above the largest buffer of the bulk path (256 KiB reads)
TRIM_THRESHOLD_BYTES = 4 << 20      # a few reads' worth of free heap kept between them
TRIM_INTERVAL_S = 30.0              # free pages below live blocks go back this often

OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OPERATOR_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


@cache
def _libc() -> Any | None:
    """glibc's handle, or None (another C library, or none that ctypes can load). Looked up once
    (16 µs: the periodic trim asks for it)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def operator_settings(environ: Mapping[str, str]) -> str | None:
    """The allocator setting the operator made through the environment, if any (we keep it)."""
    for name in OPERATOR_VARIABLES:
        if name in environ:
            return name
    # GLIBC_TUNABLES=name=value:name=value; other tunables (arena_max, hugetlb, ...) are not ours to judge
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        if item.partition("=")[0].strip() in OPERATOR_TUNABLES:
            return "GLIBC_TUNABLES"
    return None


def tune_allocator(environ: Mapping[str, str]) -> dict[str, int] | str:
    """Raise glibc's mmap and trim thresholds (see the module docstring). Returns what was set, or
    why nothing was. Call once, at start, before the event loop runs."""
    mine = operator_settings(environ)
    if mine is not None:
        return f"kept the operator's {mine}"
    libc = _libc()
    if libc is None:
        return "not glibc: the C library's defaults are kept"
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; setting the mmap threshold also stops glibc moving it
    applied = {name: value for param, name, value in (
        (M_MMAP_THRESHOLD, "mmap_threshold_bytes", MMAP_THRESHOLD_BYTES),
        (M_TRIM_THRESHOLD, "trim_threshold_bytes", TRIM_THRESHOLD_BYTES)) if mallopt(param, value) == 1}
    return applied or "glibc refused the thresholds: its defaults are kept"


def release_free_heap() -> None:
    """Give the heap's free pages back to the kernel, wherever they are (`malloc_trim(0)`: a walk
    of the free lists; measured on a proxy's heap 25-200 µs, 61 µs giving back 100 MiB of a burst).
    Every `TRIM_INTERVAL_S` while the proxy serves."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_startup_heap() -> None:
    """Once start-up is over: what config parsing and imports used transiently goes back to the
    OS (a node proxy's idle RSS is a budget: issue 5, <= 40 MB)."""
    import gc

    gc.collect()
    release_free_heap()


async def release_free_heap_periodically(interval_s: float = TRIM_INTERVAL_S) -> None:
    """`release_free_heap` every `interval_s`, until cancelled (the proxy's drain). No garbage
    collection here: a full pass would cost the loop more than the trim."""
    import asyncio

    while True:
        await asyncio.sleep(interval_s)
        release_free_heap()
