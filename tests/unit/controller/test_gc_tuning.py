"""The controller's collector settings (`federation.controller.gc_tuning`), in a fresh interpreter:
they are process-wide, and this test process must keep its own."""

from __future__ import annotations

import json
import subprocess
import sys

from federation.controller.gc_tuning import CONTROLLER_GC_THRESHOLDS


def test_the_controller_collects_young_objects_less_often_and_freezes_what_it_started_with() -> None:
    code = ("import gc, json; from federation.controller.gc_tuning import tune_collector; "
            "before = gc.get_threshold(); replaced = tune_collector(); "
            "print(json.dumps([before, replaced, gc.get_threshold(), gc.get_freeze_count()]))")
    before, replaced, after, frozen = json.loads(subprocess.run([sys.executable, "-c", code], check=True,
                                                                capture_output=True, text=True).stdout)
    assert replaced == before != after and tuple(after) == CONTROLLER_GC_THRESHOLDS
    assert frozen > 1000     # the imported modules' objects are out of every later pass
