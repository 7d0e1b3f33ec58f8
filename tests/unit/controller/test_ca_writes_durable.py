"""A CA root (key and certificate, one file) survives a crash once it is saved (issue 11, item 9):
the pair file is linked into its trust domain's directory and that directory is fsynced after; a
trust domain's directory created for it is made durable in its parent too. Otherwise a power loss
could forget a root whose certificates are already out in the fleet. (`DiskLog`: see
tests/unit/api/test_secret_files_durable.py.)
"""

from __future__ import annotations

from pathlib import Path

from federation.controller.ca import CERT_SUFFIX, PAIR_SUFFIX, CaStateDir, generate_root
from tests.unit.api.test_secret_files_durable import DiskLog, disk  # noqa: F401  (the fixture)

TD = "east.mesh.local"


def test_a_new_root_is_durable_with_the_directories_made_for_it(tmp_path: Path, disk: DiskLog) -> None:  # noqa: F811
    store = CaStateDir(tmp_path / "state")
    root = generate_root(TD, "r1", now_s=1_800_000_000.0)
    disk.events.clear()
    store.save_root(TD, root)
    td_dir = store.ca_dir / TD
    pair, cert = td_dir / f"r1{PAIR_SUFFIX}", td_dir / f"r1{CERT_SUFFIX}"
    assert disk.durable_after_naming(pair, how="link"), disk.events      # key + certificate, one unit
    assert disk.durable_after_naming(cert), disk.events                  # the public copy
    # the trust domain's directory was created by this save: its entry in ca/ is made durable
    # before the root is written into it
    assert 0 <= disk.index(disk.fsync_of(store.ca_dir)) < disk.index(("link", pair)), disk.events
    assert store.load_roots(TD)["r1"].cert == root.cert


def test_the_state_directorys_ca_directory_is_made_durable_when_created(tmp_path: Path, disk: DiskLog) -> None:  # noqa: F811
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    CaStateDir(state)
    assert disk.index(disk.fsync_of(state)) >= 0, disk.events
