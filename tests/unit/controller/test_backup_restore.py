"""Issue 11 item 10: recovery from a lost state directory is a designed path.

- epochs stay monotonic without local state (time-based), so a rebuilt controller is newer than
  the one its proxies followed;
- `meshfed controller backup` / `restore` bring the CA keys, the store and the credentials back
  (0600, verified, never over a live state directory);
- a controller rebuilt from nothing says, in `meshfed check`, what the operator has to do.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from federation.cli.main import cli
from federation.controller.backup import BackupError, create_backup, restore_backup
from federation.controller.bootstrap import BOOTSTRAP_TOKENS_FILE
from federation.controller.checks import ORPHAN_GRACE_S, build_checks
from federation.controller.config_service import ConfigService
from federation.controller.statelock import StateDirLock
from federation.controller.store import Store
from tests.unit.core.factory import fleet

NOW_S = 1_800_000_000.0


def test_epochs_are_time_based_and_grow_without_local_state(tmp_path: Path) -> None:
    old = Store.in_state_dir(tmp_path / "old")
    e1 = old.bump_epoch(NOW_S)
    e2 = old.bump_epoch(NOW_S)                  # two starts in the same millisecond: still greater
    assert e1 == int(NOW_S * 1000) and e2 == e1 + 1
    assert old.bump_epoch(NOW_S - 3600) == e2 + 1   # the clock went back: still greater
    # the state directory is lost; a controller rebuilt from nothing a second later is newer
    rebuilt = Store.in_state_dir(tmp_path / "rebuilt")
    assert rebuilt.bump_epoch(NOW_S + 1) > e2 + 1
    assert rebuilt.origin()["first_epoch"] == int((NOW_S + 1) * 1000)


def state_with_history(tmp_path: Path) -> tuple[Path, ConfigService]:
    state = tmp_path / "state"
    svc = ConfigService(state)
    svc.ensure_cas(fleet())
    svc.store.record_attempt("a" * 40, "first", ok=True, at_s=NOW_S)
    svc.store.record_acks([("ztunnel/east/node-1", svc.epoch, 3, "a" * 40)])
    svc.store.record_failover("checkout.shop.svc.clusterset.local", "FailedOver", from_cluster="east")
    svc.bootstrap.create("ztunnel/east/node-7")   # a hand-provisioned proxy's bootstrap token, not used yet
    return state, svc


def files_of(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.parts[-1].endswith(".pem")}


def test_a_backup_restores_the_ca_keys_store_and_credentials(tmp_path: Path) -> None:
    state, svc = state_with_history(tmp_path)
    token = svc.bootstrap.create("gateway/east")
    archive = tmp_path / "out" / "b.tar.gz"
    summary = create_backup(state, archive, now_s=NOW_S)
    assert stat.S_IMODE(os.lstat(archive).st_mode) == 0o600
    assert summary.epoch == svc.epoch and set(summary.trust_domains) == set(svc.signing.cas)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert "controller.lock" not in names and "controller.sqlite" in names and "manifest.json" in names
    restored = tmp_path / "restored"
    done = restore_backup(archive, restored, now_s=NOW_S + 60)
    assert done["files"] == summary.files and done["moved_aside"] == ""
    assert files_of(restored) == files_of(state)            # every CA key and certificate, bytes for bytes
    assert json.loads((restored / BOOTSTRAP_TOKENS_FILE).read_text()) == \
        json.loads((state / BOOTSTRAP_TOKENS_FILE).read_text())
    for p in restored.rglob("*"):
        assert stat.S_IMODE(os.lstat(p).st_mode) == (0o700 if p.is_dir() else 0o600), p
    store = Store.in_state_dir(restored)
    assert store.last_applied().sha == "a" * 40             # type: ignore[union-attr]
    assert store.failover_count() == 1 and "ztunnel/east/node-1" in store.proxy_acks()
    origin = store.origin()
    assert origin["origin"] == "restored" and origin["restored_at_s"] == NOW_S + 60
    # the restored controller loads the same CAs and starts above the old epoch
    again = ConfigService(restored)
    again.ensure_cas(fleet())
    assert again.signing.roots_pem() == svc.signing.roots_pem() and again.epoch > svc.epoch
    assert not again.state_status()["fresh"]
    assert again.bootstrap.check(token, "gateway/east") == ""   # an unused bootstrap token still works


def test_restore_refuses_a_live_state_directory_and_names_its_holder(tmp_path: Path) -> None:
    state, _svc = state_with_history(tmp_path)
    archive = tmp_path / "b.tar.gz"
    create_backup(state, archive)
    lock = StateDirLock(state)
    me = lock.acquire(wait=False)
    with pytest.raises(BackupError, match=f"in use by controller pid {me.pid} on host {me.host}"):
        restore_backup(archive, state, force=True)
    lock.release()
    with pytest.raises(BackupError, match="is not empty"):
        restore_backup(archive, state)
    done = restore_backup(archive, state, force=True, now_s=NOW_S)
    assert done["moved_aside"] and Path(done["moved_aside"]).is_dir()   # kept, never deleted
    assert (state / "controller.sqlite").exists()


@pytest.mark.parametrize("attack", ["traversal", "tampered", "unlisted", "link"])
def test_restore_refuses_an_archive_that_backup_did_not_write(tmp_path: Path, attack: str) -> None:
    state, _svc = state_with_history(tmp_path)
    good = tmp_path / "good.tar.gz"
    create_backup(state, good)
    with tarfile.open(good) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for name, data in members.items():
            if attack == "tampered" and name == "bootstrap-tokens.json":
                data = b'{"east": "attacker"}'
            add(name, data)
        if attack == "traversal":
            add("../escape", b"x")
        if attack == "unlisted":
            add("ca/extra.keypair.pem", b"x")
        if attack == "link":
            link = tarfile.TarInfo("ca/link")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
    with pytest.raises(BackupError):
        restore_backup(bad, tmp_path / "target")
    assert not (tmp_path / "target").exists() and not (tmp_path / "escape").exists()
    assert not [p for p in tmp_path.iterdir() if ".restore-" in p.name]   # the staging dir is cleaned up


def test_the_cli_backs_up_and_restores(tmp_path: Path) -> None:
    state, _svc = state_with_history(tmp_path)
    out = CliRunner().invoke(cli, ["controller", "backup", "--state-dir", str(state), "--out", str(tmp_path / "b.tgz")])
    assert out.exit_code == 0 and "holds the CA private keys" in out.output, out.output
    out = CliRunner().invoke(cli, ["controller", "restore", str(tmp_path / "b.tgz"), "--state-dir",
                                   str(tmp_path / "new"), "-o", "json"])
    assert out.exit_code == 0 and json.loads(out.output)["files"] > 3, out.output
    out = CliRunner().invoke(cli, ["controller", "backup", "--state-dir", str(tmp_path / "nothing")])
    assert out.exit_code == 2 and "holds no controller state" in out.output


def test_a_controller_rebuilt_from_nothing_says_what_the_operator_has_to_do(tmp_path: Path) -> None:
    svc = ConfigService(tmp_path / "state", clock=lambda: NOW_S, history_clock=lambda: NOW_S)
    state = svc.state_status()
    assert state["fresh"] and not state["ever_acked"]
    st = {"controller": {"state": state, "state_dir": str(tmp_path / "state")}, "reconciler": {"proxies_rendered": 9}}
    early = {c["check"]: c for c in build_checks(st, NOW_S + 10)}
    assert early["proxies have connected to this controller's state"]["ok"]      # a new fleet gets its grace
    late = {c["check"]: c for c in build_checks(st, NOW_S + ORPHAN_GRACE_S + 1)}
    check = late["proxies have connected to this controller's state"]
    assert not check["ok"] and "created new CA roots" in check["cause"]
    assert "meshfed controller restore --state-dir" in check["hint"] and "roots/<trust-domain>.pem" in check["hint"]
    # once a proxy acknowledged a config, the state is in use: no alarm
    svc.store.record_acks([("ztunnel/east/node-1", svc.epoch, 1, "r")])
    st["controller"]["state"] = svc.state_status()
    assert {c["check"]: c for c in build_checks(st, NOW_S + 999)}["proxies have connected to this controller's state"]["ok"]


def test_proxies_that_followed_a_lost_controller_are_reported(tmp_path: Path) -> None:
    from ztunnel.api.config import Stamp

    svc = ConfigService(tmp_path / "state", clock=lambda: NOW_S, history_clock=lambda: NOW_S)
    svc.dist.attach("ztunnel/east/node-1", Stamp(int((NOW_S - 86400) * 1000), "r", 4))   # yesterday's controller
    svc.dist.attach("ztunnel/east/node-2", Stamp(svc.epoch, "r", 1))                    # ours
    state = svc.state_status()
    assert state["foreign_epoch_proxies"] == 1 and state["foreign_epoch_examples"] == ["ztunnel/east/node-1"]
    checks = {c["check"]: c for c in build_checks({"controller": {"state": state}}, NOW_S)}
    assert not checks["proxies follow this controller's state"]["ok"]
    assert "meshfed controller restore" in checks["proxies follow this controller's state"]["hint"]


def test_a_fresh_state_directory_is_logged_with_what_to_do(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="federation.controller.config_service"):
        ConfigService(tmp_path / "state")
        ConfigService(tmp_path / "state")          # the same directory again: no longer fresh, not logged
    msgs = [r.getMessage() for r in caplog.records if "was empty" in r.getMessage()]
    assert len(msgs) == 1 and "meshfed controller restore" in msgs[0]
