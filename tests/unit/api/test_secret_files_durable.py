"""A secret file survives a crash once `write_secret` returns (issue 11, item 9): the data is
fsynced before the rename, and the directory after it. Without the directory's fsync a power loss
can forget the rename: the old file, or no file at all, comes back, though the writer went on as
if the new one were there (a CA key a proxy's certificate was signed with, lost).

`DiskLog` records, in order, what reaches the disk: every `os.fsync` (of which file or directory,
by inode) and every rename or link. The real calls still happen.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ztunnel.api.secret_files import secret_writer, write_secret


@dataclass
class DiskLog:
    """("fsync", inode) for a file or directory made durable; ("rename"|"link", path) for a name
    put in place."""

    events: list[tuple[str, Any]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> DiskLog:
        real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            self.events.append(("fsync", (st.st_dev, st.st_ino, stat.S_ISDIR(st.st_mode))))
            real_fsync(fd)

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            real_replace(src, dst, **kw)
            self.events.append(("rename", Path(dst)))

        def link(src: Any, dst: Any, **kw: Any) -> None:
            real_link(src, dst, **kw)
            self.events.append(("link", Path(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "link", link)
        return self

    def index(self, event: tuple[str, Any], after: int = -1) -> int:
        """Where `event` first happened after position `after` (-1 when it never did)."""
        for i in range(after + 1, len(self.events)):
            if self.events[i] == event:
                return i
        return -1

    @staticmethod
    def fsync_of(path: Path) -> tuple[str, Any]:
        st = os.stat(path)
        return ("fsync", (st.st_dev, st.st_ino, stat.S_ISDIR(st.st_mode)))

    def durable_after_naming(self, target: Path, how: str = "rename") -> bool:
        """`target` was named (renamed or linked into place) and then its directory was fsynced."""
        named = self.index((how, target))
        return named >= 0 and self.index(self.fsync_of(target.parent), after=named) > named


@pytest.fixture()
def disk(monkeypatch: pytest.MonkeyPatch) -> DiskLog:
    return DiskLog().install(monkeypatch)


def test_a_replaced_secret_is_fsynced_then_renamed_then_its_directory_fsynced(tmp_path: Path, disk: DiskLog) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    write_secret(target, b"new")
    renamed = disk.index(("rename", target))
    assert renamed > 0, disk.events
    assert disk.index(disk.fsync_of(target)) < renamed          # the data before the name
    assert disk.durable_after_naming(target), disk.events       # the name after it: the directory


def test_a_secret_created_once_is_linked_then_its_directory_fsynced(tmp_path: Path, disk: DiskLog) -> None:
    target = tmp_path / "root.keypair.pem"
    write_secret(target, b"key and certificate", exclusive=True)
    assert disk.durable_after_naming(target, how="link"), disk.events


def test_a_streamed_secret_is_durable_too(tmp_path: Path, disk: DiskLog) -> None:
    target = tmp_path / "config.json"
    with secret_writer(target) as f:
        f.write(b"{")
        f.write(b"}")
    assert target.read_bytes() == b"{}"
    assert disk.durable_after_naming(target), disk.events
