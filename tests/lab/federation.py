"""The lab tier's one bring-up: a `chaos.demo.LabFederation` of a fleet directory, up and converged
(every proxy SYNCED), torn down afterwards — but never someone else's lab in the same state
directory. Module-scoped fixtures wrap `converged_federation`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from chaos.demo import LabFederation


@contextmanager
def converged_federation(fleet_dir: Path, state_dir: Path, *, state_dir_env: str, converge_timeout_s: float,
                         say: Callable[[str], None]) -> Iterator[LabFederation]:
    """`state_dir_env` names the variable that picks another state directory (said when the lab
    there is someone else's)."""
    from clusters.lab.layout import LabError

    f = LabFederation(fleet_dir, state_dir)
    try:
        lab = f.up()
    except LabError as e:
        if "already running" in str(e):  # someone else's lab: never tear it down
            pytest.fail(f"{e} (or set {state_dir_env} to run beside it)")
        f.down()
        raise
    except BaseException:
        f.down()
        raise
    try:
        _, took_s = f.wait_converged(timeout_s=converge_timeout_s)
        say(f"lab up in {lab.get('up_wall_s')} s, converged {took_s:.1f} s later")
        yield f
    finally:
        f.down()
