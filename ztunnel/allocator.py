"""The proxy process's C allocator (glibc malloc): the two settings the data plane depends on.

Bulk traffic allocates buffers of up to 256 KiB per read: the bytes uvloop hands `data_received`,
the TLS adapter's plaintext of one read, the HBONE framer's DATA run. glibc serves those above its
mmap threshold (128 KiB, raised dynamically only as far as the largest block freed) with an
mmap/munmap each, and frees that leave more than its trim threshold free at the top of the heap
with a `brk` shrink, so the next read grows the heap again — either way the kernel maps and zeroes
the pages again for every buffer. Measured (`python -m benchmarks.dataplane --rounds 3 --sweep ''`,
two runs each way, alternated): node B's CPU per MiB of a single stream 2,382 / 2,460 µs ->
1,250 / 1,210 µs, the pair's throughput 2.76 / 2.72 -> 4.12 / 4.36 Gbit/s and the gateway path's
1.48 / 1.53 -> 2.25 / 2.07 Gbit/s, idle RSS 41.5 -> 41.8 MB.

So `tune_allocator` raises both thresholds: blocks up to `MMAP_THRESHOLD_BYTES` come from the heap,
and up to `TRIM_THRESHOLD_BYTES` of free heap top is kept for the next reads (that much more RSS at
most, after a burst; an idle proxy still gives its start-up heap back, `release_startup_heap`).
An operator who set their own (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, or a
`glibc.malloc` tunable in `GLIBC_TUNABLES`) keeps theirs. Not glibc (musl, whose `mallopt` does
nothing): nothing is changed.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Mapping
from typing import Any

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 1 << 20      # above the largest buffer of the bulk path (256 KiB reads)
TRIM_THRESHOLD_BYTES = 4 << 20      # a few reads' worth of free heap kept between them

OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _libc() -> Any | None:
    """glibc's handle, or None (another C library, or none that ctypes can load)."""
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
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
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
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        return "glibc refused the thresholds: its defaults are kept"
    return {"mmap_threshold_bytes": MMAP_THRESHOLD_BYTES, "trim_threshold_bytes": TRIM_THRESHOLD_BYTES}


def release_startup_heap() -> None:
    """Hand the heap that start-up used transiently (config parsing, imports) back to the OS:
    glibc keeps freed pages otherwise, and a node proxy's idle RSS is a budget (issue 5: <= 40 MB)."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
