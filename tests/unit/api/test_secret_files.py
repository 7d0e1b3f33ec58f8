"""The one secret-file writer/reader: atomic, 0600 from creation, never through a planted link."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ztunnel.api.secret_files import (
    SecretFileError,
    make_private_dir,
    read_secret,
    secret_writer,
    write_secret,
)


def mode_of(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_written_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_secret(tmp_path / "token", b"s3cret")
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "token") == 0o600
    assert read_secret(tmp_path / "token") == b"s3cret"


def test_a_planted_symlink_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not touch")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "token").symlink_to(victim)
    write_secret(tmp_path / "d" / "token", b"new")
    assert victim.read_bytes() == b"do not touch"
    assert not (tmp_path / "d" / "token").is_symlink()
    assert read_secret(tmp_path / "d" / "token") == b"new"


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SecretFileError, match="symlink"):
        write_secret(tmp_path / "link" / "token", b"x")
    assert list((tmp_path / "real").iterdir()) == []


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path: Path) -> None:
    write_secret(tmp_path / "config.json", b"old")
    with pytest.raises(RuntimeError), secret_writer(tmp_path / "config.json") as f:
        f.write(b"half of the new")
        raise RuntimeError("disk full")
    assert read_secret(tmp_path / "config.json") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_reader_refuses_links_loose_modes_and_oversize(tmp_path: Path) -> None:
    write_secret(tmp_path / "key", b"k")
    (tmp_path / "link").symlink_to(tmp_path / "key")
    with pytest.raises(SecretFileError, match="symlink"):
        read_secret(tmp_path / "link")
    os.chmod(tmp_path / "key", 0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        read_secret(tmp_path / "key")
    os.chmod(tmp_path / "key", 0o600)
    write_secret(tmp_path / "big", b"x" * 100)
    with pytest.raises(SecretFileError, match="more than a secret may be"):
        read_secret(tmp_path / "big", max_bytes=10)


def test_private_dir_is_0700_and_not_a_link(tmp_path: Path) -> None:
    d = make_private_dir(tmp_path / "a" / "state")
    assert mode_of(d) == 0o700
    (tmp_path / "l").symlink_to(d)
    with pytest.raises(SecretFileError):
        make_private_dir(tmp_path / "l")
