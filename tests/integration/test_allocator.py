"""`ztunnel.allocator` on this machine's glibc, in a process of its own: after `tune_allocator`, a
buffer of the bulk path's size comes from the heap, not from an mmap of its own (the kernel maps
and zeroes a fresh one for every read otherwise)."""

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
result = allocator.tune_allocator(os.environ) if sys.argv[1] == "tuned" else "defaults"
before = libc.mallinfo2().hblks
held = [bytearray(256 * 1024) for _ in range(4)]   # four reads' worth, alive at once
after = libc.mallinfo2().hblks
print(json.dumps({"result": result, "mmapped_blocks_added": after - before}))
"""


def probe(mode: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_after_tuning_a_reads_worth_of_buffer_comes_from_the_heap() -> None:
    tuned, default = probe("tuned"), probe("defaults")
    assert tuned["result"] == {"mmap_threshold_bytes": 1 << 20, "trim_threshold_bytes": 4 << 20}
    assert tuned["mmapped_blocks_added"] == 0
    assert default["mmapped_blocks_added"] == 4    # glibc's defaults: an mmap per buffer
