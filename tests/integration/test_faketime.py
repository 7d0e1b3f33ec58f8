"""A process run under `skewed_argv` (libfaketime) works: its wall clock is moved, and the calls the
node proxy makes at start still work — time.sleep and subprocess with a timeout. Under
FAKETIME_DONT_FAKE_MONOTONIC both failed with EINVAL, and a skewed node proxy crashed at start (its
capture set-up runs iptables with a timeout), which the chaos catalogue's clock-skew runs found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from clusters.lab.commands import FAKETIME_LIBRARIES, skewed_argv

LIBRARY = next((p for p in FAKETIME_LIBRARIES if os.path.exists(p)), None)

PROBE = """
import json, subprocess, time
t, m = time.time(), time.monotonic()
time.sleep(0.1)
subprocess.run(["true"], timeout=5, check=True)
print(json.dumps({"wall_s": t, "slept_s": time.monotonic() - m}))
"""


@pytest.mark.skipif(LIBRARY is None, reason="libfaketime is not installed (make system)")
@pytest.mark.parametrize("skew_s", [120.0, -600.0, 90_000.0])
def test_a_skewed_python_sleeps_runs_subprocesses_and_sees_its_moved_clock(skew_s: float) -> None:
    if skew_s < 0 and time.monotonic() + skew_s < 60:
        pytest.skip("this host has not been up long enough for a negative skew (faults.check_skew)")
    assert LIBRARY is not None
    r = subprocess.run(skewed_argv([sys.executable, "-c", PROBE], skew_s, LIBRARY), capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert abs(out["wall_s"] - time.time() - skew_s) < 30
    assert 0.09 <= out["slept_s"] < 5
