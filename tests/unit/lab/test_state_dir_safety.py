"""A lab state directory in a shared /tmp: another user must not be able to plant a lab there.

Review finding: `meshfed lab` (run as root) trusted whatever `sandbox.json` said — any pid, without
its start time — then signalled that pid and entered its namespaces, and accepted a directory
another user had pre-created with mode 0777.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clusters.lab import sandbox
from clusters.lab.layout import LabError
from clusters.lab.runner import LabOptions, LabRunner
from ztunnel.api.secret_files import SecretFileError, make_private_dir

NOBODY = 65534


@pytest.fixture()
def foreign_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a directory owned by another user")
    d = tmp_path / "meshfed-lab"
    d.mkdir()
    os.chmod(d, 0o777)
    os.chown(d, NOBODY, NOBODY)
    return d


def test_a_directory_owned_by_someone_else_is_refused(foreign_dir: Path) -> None:
    with pytest.raises(SecretFileError, match="owned by uid 65534"):
        make_private_dir(foreign_dir)
    with pytest.raises(sandbox.SandboxUnavailable, match="belongs to uid 65534"):
        sandbox.check_state_dir(foreign_dir)
    with pytest.raises(LabError, match="belongs to uid 65534"):
        LabRunner(LabOptions(foreign_dir))


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "lab"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(sandbox.SandboxUnavailable, match="chmod 700"):
        sandbox.check_state_dir(d)
    os.chmod(d, 0o700)
    sandbox.check_state_dir(d)


def test_a_pid_without_its_start_time_is_never_ours() -> None:
    me = os.getpid()
    assert sandbox.is_same_process(me, None) is False
    assert sandbox.is_same_process(me, sandbox.process_start_ticks(me)) is True
    assert sandbox.is_same_process(me, (sandbox.process_start_ticks(me) or 0) + 1) is False
