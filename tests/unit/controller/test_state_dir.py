"""Issue 11 item 9: one controller per state directory, CA roots written as one unit and checked on
load, every secret file through the one writer.

The lock is an flock held by the state owner's process: a second controller is refused with the
holder's pid and host, or waits as a standby and takes over when the holder's process exits
(here a child process that holds it and is killed, as a crashed controller would be).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from federation.controller.ca import CaError, CaStateDir, generate_root
from federation.controller.config_service import CONTROLLER_ROOTS_FILE, ConfigService
from federation.controller.statelock import LOCK_FILE, StateDirLock, StateDirLocked, read_holder
from gitops.model import CaMode, CaRoot, CaSpec, TrustDomain, TrustDomainName
from tests.unit.core.factory import fleet
from ztunnel.api.secret_files import write_secret

TD = "east.mesh.local"
HOLD = """
import sys, time
from federation.controller.statelock import StateDirLock
StateDirLock(sys.argv[1]).acquire(wait=False)
print("held", flush=True)
time.sleep(600)
"""


def hold_in_child(state: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(state)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_second_controller_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = StateDirLock(tmp_path)
    me = first.acquire(wait=False)
    assert me.pid == os.getpid() and stat.S_IMODE(os.lstat(tmp_path / LOCK_FILE).st_mode) == 0o600
    with pytest.raises(StateDirLocked) as err:
        StateDirLock(tmp_path).acquire(wait=False, refuse_after_s=0.1)
    msg = str(err.value)
    assert f"pid {os.getpid()} on host {me.host}" in msg and "--standby" in msg and "Stop that controller" in msg
    assert read_holder(tmp_path) == me
    first.release()
    assert read_holder(tmp_path) is None
    assert StateDirLock(tmp_path).acquire(wait=False).pid == os.getpid()


def test_a_standby_takes_over_when_the_holder_dies(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    try:
        holder = read_holder(tmp_path)
        assert holder is not None and holder.pid == child.pid
        seen: list[int] = []
        standby = StateDirLock(tmp_path)
        got: list[int] = []
        t = threading.Thread(target=lambda: got.append(standby.acquire(
            wait=True, poll_s=0.02, on_wait=lambda h: seen.append(h.pid if h else 0)).pid))
        t.start()
        time.sleep(0.3)
        assert not got and seen == [child.pid]          # waits, and says for whom (once)
    finally:
        child.kill()
        child.wait()
    t.join(5)
    assert got == [os.getpid()] and read_holder(tmp_path) == standby.me


def test_a_stale_holder_record_without_the_lock_names_nobody(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    child.kill()
    child.wait()
    assert (tmp_path / LOCK_FILE).read_text()          # the record of a dead holder is still there
    assert read_holder(tmp_path) is None               # but nobody holds the lock
    assert StateDirLock(tmp_path).acquire(wait=False).pid == os.getpid()


def test_the_config_service_reports_the_lock_holder(tmp_path: Path) -> None:
    lock = StateDirLock(tmp_path)
    lock.acquire(wait=False)
    st = ConfigService(tmp_path, lock=lock).status({})
    assert st["lock"]["pid"] == os.getpid() and st["lock"]["host"]


# --- CA roots: one unit, create-once, checked on load -----------------------------------------------


def _td(*roots: str) -> TrustDomain:
    return TrustDomain(TrustDomainName(TD), ca=CaSpec(CaMode.MANAGED, tuple(CaRoot(r, i == 0)
                                                                                  for i, r in enumerate(roots))))


def test_a_root_is_one_file_with_key_and_certificate(tmp_path: Path) -> None:
    ca = CaStateDir(tmp_path).load_or_create(_td("root-1"))
    assert ca is not None
    d = tmp_path / "ca" / TD
    pair = (d / "root-1.keypair.pem").read_bytes()
    assert b"PRIVATE KEY" in pair and b"CERTIFICATE" in pair
    assert stat.S_IMODE(os.lstat(d / "root-1.keypair.pem").st_mode) == 0o600
    assert not (d / "root-1.key.pem").exists()
    assert (d / "root-1.cert.pem").read_bytes() in pair           # the public copy `meshfed trust` reads
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_a_key_that_does_not_belong_to_its_certificate_is_refused_on_load(tmp_path: Path) -> None:
    CaStateDir(tmp_path).load_or_create(_td("root-1"))
    d = tmp_path / "ca" / TD
    other = generate_root(TD, "root-1")
    assert other.key is not None
    key_pem = other.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    pair = (d / "root-1.keypair.pem").read_bytes()
    cert_pem = pair[pair.index(b"-----BEGIN CERTIFICATE"):]
    write_secret(d / "root-1.keypair.pem", key_pem + cert_pem)     # a torn write or two racing creators
    with pytest.raises(CaError, match="does not belong to the root certificate") as err:
        CaStateDir(tmp_path).load_or_create(_td("root-1"))
    assert "meshfed controller restore" in str(err.value)


def test_a_state_dir_with_separate_key_and_certificate_files_is_checked_and_converted(tmp_path: Path) -> None:
    d = tmp_path / "ca" / TD
    CaStateDir(tmp_path)
    d.mkdir(mode=0o700)
    root = generate_root(TD, "root-1")
    assert root.key is not None
    key_pem = root.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    write_secret(d / "root-1.key.pem", key_pem)
    write_secret(d / "root-1.cert.pem", root.cert.public_bytes(serialization.Encoding.PEM))
    ca = CaStateDir(tmp_path).load_or_create(_td("root-1"))
    assert ca is not None and ca.roots[0].cert == root.cert
    assert (d / "root-1.keypair.pem").exists()
    # and a mismatched legacy pair is refused the same way
    write_secret(d / "root-2.key.pem", key_pem)
    write_secret(d / "root-2.cert.pem", generate_root(TD, "root-2").cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CaError, match="does not belong"):
        CaStateDir(tmp_path).load_roots(TD)


def test_two_writers_racing_to_create_a_root_end_up_with_the_same_one(tmp_path: Path) -> None:
    a, b = CaStateDir(tmp_path), CaStateDir(tmp_path)
    first = a.save_root(TD, generate_root(TD, "root-1"))
    second = b.save_root(TD, generate_root(TD, "root-1"))   # lost the race: gets the winner's root
    assert second.cert == first.cert and second.key is not None
    assert CaStateDir(tmp_path).load_roots(TD)["root-1"].cert == first.cert


def test_exclusive_secret_writes_never_replace(tmp_path: Path) -> None:
    write_secret(tmp_path / "s", b"one", exclusive=True)
    with pytest.raises(FileExistsError):
        write_secret(tmp_path / "s", b"two", exclusive=True)
    assert (tmp_path / "s").read_bytes() == b"one" and [p.name for p in tmp_path.iterdir()] == ["s"]


def test_the_controller_roots_file_is_replaced_atomically(tmp_path: Path) -> None:
    svc = ConfigService(tmp_path)
    svc.ensure_cas(fleet())
    roots = tmp_path / CONTROLLER_ROOTS_FILE
    assert roots.read_bytes() == svc.signing.roots_pem()
    assert stat.S_IMODE(os.lstat(roots).st_mode) == 0o644
    # written through the one writer: a link planted at the path is replaced, not followed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    roots.unlink()
    roots.symlink_to(elsewhere)
    svc.ensure_cas(fleet())
    assert elsewhere.read_bytes() == b"untouched" and not roots.is_symlink()


def test_meshfed_controller_run_refuses_a_state_dir_in_use_before_starting_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI path: refused with the holder's pid and host, exit 2, and Ray never started (the
    unit tier's guard would fail the test if `ray.init` were called)."""
    from click.testing import CliRunner

    import federation.ray.driver as driver
    from federation.cli.main import cli

    monkeypatch.setattr(driver, "CLAIM_GRACE_S", 0.2)
    me = StateDirLock(tmp_path).acquire(wait=False)
    out = CliRunner().invoke(cli, ["controller", "run", "--repo", str(tmp_path / "fleet"), "--state-dir", str(tmp_path),
                                   "--insecure"])
    assert out.exit_code == 2, out.output
    assert f"is in use by controller pid {me.pid} on host {me.host}" in out.output and "--standby" in out.output
