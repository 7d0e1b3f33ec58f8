"""`meshfed controller backup` / `restore`: the state directory as one archive, and back.

A lost state directory orphans the fleet: proxies persisted the old controller's epoch, trust the
old CA roots and present certificates those roots signed. Time-based epochs
(`federation.controller.store`) make a rebuilt controller's epoch newer anyway; the CA keys can only
come back from a copy. So:

- `create_backup(state_dir, out)` writes a gzip'd tar (0600, atomically, through
  `ztunnel.api.secret_files`) with the CA keys and certificates (`ca/`), a consistent copy of the
  store (sqlite's online backup API, so it can run next to a live controller), the bootstrap
  credentials, the controller roots, and any other regular file of the state directory except
  what is recreated or belongs to a live process (the lock, sqlite's WAL/SHM, temporary files,
  the Git mirror). `manifest.json` lists every file with its SHA-256.
- `restore_backup(archive, state_dir)` refuses a live state directory (its lock is held: it names
  the holder) and a non-empty one unless `force` (which moves the old one aside, never deletes
  it). It checks every member against the manifest (regular files, relative paths, sizes and
  hashes), writes them into a fresh directory next to the target (0700 directories, 0600 files),
  checks that every CA key belongs to its certificate and that the store opens, marks the store
  `restored`, and only then renames the directory into place.

A controller started on the restored directory has the old CA keys (proxies verify it and it
verifies them), the old bootstrap credentials and records, and an epoch above every earlier one:
the proxies re-sync without hand work.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from federation.controller.statelock import LOCK_FILE, read_holder
from ztunnel.api.secret_files import fsync_dir, make_private_dir, secret_writer, write_secret

FORMAT = "meshfed-controller-backup/1"
MANIFEST = "manifest.json"
STORE_FILE = "controller.sqlite"
MAX_MEMBER_BYTES = 1 << 30
MAX_MEMBERS = 100_000
# recreated on start or owned by a live process: never archived
SKIP_NAMES = frozenset({LOCK_FILE, "bootstrap-tokens.lock", f"{STORE_FILE}-wal", f"{STORE_FILE}-shm",
                        f"{STORE_FILE}-journal"})
SKIP_DIRS = frozenset({"git"})


class BackupError(RuntimeError):
    """The backup cannot be written or restored; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class BackupSummary:
    path: str
    files: int
    bytes: int
    trust_domains: tuple[str, ...]
    epoch: int
    created_at_s: float

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "files": self.files, "bytes": self.bytes, "trust_domains": list(self.trust_domains),
                "epoch": self.epoch, "created_at_s": self.created_at_s}


def _state_files(state_dir: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(state_dir, followlinks=False):
        rel_root = Path(root).relative_to(state_dir)
        dirs[:] = sorted(d for d in dirs if not (rel_root == Path(".") and d in SKIP_DIRS))
        for name in sorted(files):
            p = Path(root) / name
            if name in SKIP_NAMES or name.endswith(".tmp") or p.is_symlink() or not p.is_file():
                continue
            if rel_root == Path(".") and name == STORE_FILE:
                continue  # added from a consistent copy
            yield p


def _copy_store(src: Path, dst: Path) -> None:
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=10.0)
    try:
        target = sqlite3.connect(str(dst))
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()


def create_backup(state_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                  now_s: float | None = None) -> BackupSummary:
    """Archive `state_dir` into `out` (see the module docstring). Safe while a controller runs."""
    d = Path(state_dir)
    if not (d / "ca").is_dir() and not (d / STORE_FILE).exists():
        raise BackupError(f"{d} holds no controller state (no ca/ directory, no {STORE_FILE}); is --state-dir the "
                          "directory `meshfed controller run` uses?")
    now = time.time() if now_s is None else now_s
    members: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory(prefix="meshfed-backup-") as tmp:
        os.chmod(tmp, 0o700)
        epoch = 0
        if (d / STORE_FILE).exists():
            copy = Path(tmp) / STORE_FILE
            _copy_store(d / STORE_FILE, copy)
            members.append((STORE_FILE, copy.read_bytes()))
            with sqlite3.connect(str(copy)) as db:
                row = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
                epoch = int(row[0]) if row else 0
        for p in _state_files(d):
            members.append((p.relative_to(d).as_posix(), p.read_bytes()))
    tds = tuple(sorted(p.name for p in (d / "ca").iterdir() if p.is_dir())) if (d / "ca").is_dir() else ()
    manifest = {"format": FORMAT, "created_at_s": now, "host": socket.gethostname(), "source": str(d.resolve()),
                "epoch": epoch, "trust_domains": list(tds),
                "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                          for name, data in members}}
    out_path = Path(out)
    if not out_path.parent.exists():
        make_private_dir(out_path.parent)
    with secret_writer(out_path) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        for name, data in [(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode()), *members]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, int(now)
            tar.addfile(info, io.BytesIO(data))
    return BackupSummary(str(out_path), len(members), sum(len(b) for _, b in members), tds, epoch, now)


def _read_members(archive: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    try:
        tar = tarfile.open(archive, mode="r:gz")  # noqa: SIM115 - closed by the `with` below, after the check
    except (OSError, tarfile.TarError) as e:
        raise BackupError(f"{archive} is not a meshfed backup (a gzip'd tar from `meshfed controller backup`): "
                          f"{e}") from None
    files: dict[str, bytes] = {}
    with tar:
        for i, info in enumerate(tar):
            if i >= MAX_MEMBERS:
                raise BackupError(f"{archive} holds more than {MAX_MEMBERS} files: not a controller backup")
            path = PurePosixPath(info.name)
            if not info.isfile() or path.is_absolute() or ".." in path.parts or not info.name or info.name in files:
                raise BackupError(f"{archive}: member {info.name!r} is not a plain relative file; refusing to restore "
                                  "an archive that was not written by `meshfed controller backup`")
            if info.size > MAX_MEMBER_BYTES:
                raise BackupError(f"{archive}: member {info.name} is {info.size} bytes, more than a state file may be")
            fobj = tar.extractfile(info)
            assert fobj is not None
            files[info.name] = fobj.read()
    raw = files.pop(MANIFEST, None)
    if raw is None:
        raise BackupError(f"{archive} has no {MANIFEST}: not a meshfed controller backup")
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise BackupError(f"{archive}: {MANIFEST} is not JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{archive} has format {manifest.get('format')!r}; this meshfed restores {FORMAT}")
    listed = dict(manifest.get("files") or {})
    if set(listed) != set(files):
        raise BackupError(f"{archive}: the files do not match its manifest (missing: "
                          f"{sorted(set(listed) - set(files))[:5]}, unlisted: {sorted(set(files) - set(listed))[:5]})")
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != listed[name].get("sha256"):
            raise BackupError(f"{archive}: {name} does not match its SHA-256 in the manifest (corrupted or edited)")
    return manifest, files


def _verify_restored(d: Path) -> None:
    from federation.controller.ca import CaError, CaStateDir
    from federation.controller.store import Store

    try:
        cadir = CaStateDir(d)
        for td in cadir.trust_domains():
            cadir.load_roots(td)
    except CaError as e:
        raise BackupError(f"the backup's CA material does not load: {e}") from None
    if (d / STORE_FILE).exists():
        try:
            store = Store(d / STORE_FILE)
            try:
                ok = store._query("PRAGMA integrity_check")[0][0]
                if ok != "ok":
                    raise BackupError(f"the backup's store fails sqlite's integrity check: {ok}")
            finally:
                store.close()
        except sqlite3.DatabaseError as e:
            raise BackupError(f"the backup's store does not open: {e}") from None


def restore_backup(archive: str | os.PathLike[str], state_dir: str | os.PathLike[str], *, force: bool = False,
                   now_s: float | None = None) -> dict[str, Any]:
    """Restore `archive` into `state_dir` (see the module docstring). Returns what was done."""
    target = Path(state_dir).absolute()
    now = time.time() if now_s is None else now_s
    holder = read_holder(target) if target.exists() else None
    if holder is not None:
        raise BackupError(f"{target} is in use by controller {holder.describe()}: restoring over a live state "
                          "directory would pull the CA keys from under it. Stop that controller, then restore")
    moved_aside = ""
    if target.exists() and any(target.iterdir()) and not force:
        raise BackupError(f"{target} is not empty: restoring would replace its CA keys and records. Stop the "
                          "controller that uses it and pass --force (the current directory is kept next to it "
                          "as <dir>.replaced-<time>), or restore into an empty --state-dir")
    manifest, files = _read_members(Path(archive))
    parent = target.parent
    if not parent.exists():
        make_private_dir(parent)
    staging = parent / f".{target.name}.restore-{secrets.token_hex(4)}"
    make_private_dir(staging)
    try:
        for name, data in sorted(files.items()):
            dest = staging / name
            for p in reversed(dest.relative_to(staging).parents[:-1]):
                make_private_dir(staging / p)
            write_secret(dest, data)
        _verify_restored(staging)
        from federation.controller.store import Store

        if (staging / STORE_FILE).exists():
            store = Store(staging / STORE_FILE)
            store.mark_restored(now, f"{archive} (backup of {manifest.get('source', '?')} taken "
                                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(manifest.get('created_at_s', 0)))})")
            store.close()
        if target.exists() and any(target.iterdir()):
            moved_aside = f"{target}.replaced-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
            os.rename(target, moved_aside)
        elif target.exists():
            target.rmdir()
        os.rename(staging, target)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"state_dir": str(target), "files": len(files), "trust_domains": manifest.get("trust_domains", []),
            "epoch": manifest.get("epoch", 0), "backup_created_at_s": manifest.get("created_at_s", 0),
            "moved_aside": moved_aside}
