"""`ztunnel.allocator` on this machine's glibc, in a process of its own: after `tune_allocator`, a
buffer of the bulk path's size comes from the heap, not from an mmap of its own (the kernel maps
and zeroes a fresh one for every read otherwise), free heap at the top is kept for the next reads,
and `release_free_heap` gives back what a burst left below live blocks."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import ctypes, json, os, sys
from ztunnel import allocator

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2

def rss_kib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

result = allocator.tune_allocator(os.environ) if sys.argv[1] == "tuned" else "defaults"
# 900 KiB: above glibc's default threshold and any block start-up may have freed (which would have
# raised its dynamic threshold), below ours
before = libc.mallinfo2().hblks
held = [bytearray(900 * 1024) for _ in range(4)]
mmapped = libc.mallinfo2().hblks - before
del held
kept_at_top = libc.mallinfo2().keepcost          # the trim threshold: kept for the next reads, or not
# a burst's buffers under small blocks that stay: freed, but below a live block
burst = []
for _ in range(400):
    burst.append((bytearray(256 * 1024), bytearray(600)))
for i in range(len(burst)):
    burst[i] = burst[i][1]
held_kib = rss_kib()
allocator.release_free_heap()
print(json.dumps({"result": result, "mmapped_blocks_added": mmapped, "kept_at_top": kept_at_top,
                  "burst_rss_kib": held_kib, "after_release_rss_kib": rss_kib()}))
"""


def probe(mode: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_after_tuning_a_reads_worth_of_buffer_comes_from_the_heap_and_stays_for_the_next() -> None:
    tuned, default = probe("tuned"), probe("defaults")
    assert tuned["result"] == {"mmap_threshold_bytes": 1 << 20, "trim_threshold_bytes": 4 << 20}
    assert tuned["mmapped_blocks_added"] == 0
    assert default["mmapped_blocks_added"] == 4    # glibc's defaults: an mmap per buffer
    # 3.6 MiB freed at the top of the heap: kept under the 4 MiB trim threshold, not given back
    assert int(tuned["kept_at_top"]) >= 3 * 1024 * 1024   # type: ignore[call-overload]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_the_periodic_release_gives_back_a_bursts_buffers_freed_under_live_blocks() -> None:
    """What the trim threshold does not bound (free space below a live block) the periodic
    `release_free_heap` gives back: 400 freed 256 KiB buffers held ~100 MiB."""
    tuned = probe("tuned")
    held = int(tuned["burst_rss_kib"]) - int(tuned["after_release_rss_kib"])   # type: ignore[call-overload]
    assert held > 80 * 1024, tuned
