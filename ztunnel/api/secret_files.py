"""Files that hold secrets (keys, tokens, persisted configs): the one writer and the one reader.

Both ends of the mesh keep secrets on disk — the controller its CA keys and credentials, the
proxies their keys and last good config, the lab the credentials it hands to its proxies — and
they must all be written the same careful way:

- atomically: a reader sees the old content or the new, never a torn file (write a temporary
  file in the same directory, fsync it, rename it over the target, fsync the directory so the
  rename survives a crash);
- never through a planted link: the temporary file is created with O_EXCL | O_NOFOLLOW under a
  random name (an attacker who can write the directory cannot pre-create or redirect it), and
  `rename` replaces a symlink at the target instead of following it;
- with the final mode from the first byte (`0600` unless said otherwise), whatever the umask;
- optionally create-once (`exclusive=True`): the file is linked into place only if nothing is
  there yet (`FileExistsError` otherwise), so two writers racing to create the same secret (a CA
  key) cannot replace each other's: the loser reads the winner's.

`read_secret` refuses what a careful writer would never have produced: a symlink, a non-regular
file, a file readable by group/other, or one owned by someone else — with a message naming the
fix. Secrets are bounded in size so a huge file cannot exhaust memory.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

MAX_SECRET_BYTES = 16 * 1024 * 1024


class SecretFileError(PermissionError):
    """A secret file or its directory is not safe to use; the message names the fix."""


def write_secret(path: str | os.PathLike[str], data: bytes, mode: int = 0o600, exclusive: bool = False) -> None:
    """Replace `path` with `data` atomically, 0600 (or `mode`) from creation, never following links.
    `exclusive`: create it only if it does not exist (FileExistsError otherwise), never replace."""
    with secret_writer(path, mode, exclusive) as f:
        f.write(data)


@contextmanager
def secret_writer(path: str | os.PathLike[str], mode: int = 0o600, exclusive: bool = False) -> Iterator[BinaryIO]:
    """`write_secret` for content produced piece by piece (a large config streamed as JSON): the
    file appears at `path` only when the block ends without an exception."""
    target = Path(path)
    parent = target.parent
    _check_parent(parent)
    tmp = parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have masked the creation mode
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, target, follow_symlinks=False)  # FileExistsError when something is there
            tmp.unlink()
        else:
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(parent)


def read_secret(path: str | os.PathLike[str], max_bytes: int = MAX_SECRET_BYTES) -> bytes:
    """The content of a secret file written by `write_secret` (or an operator, as carefully)."""
    p = Path(path)
    try:
        # O_NONBLOCK: a FIFO planted at the name must not block the reader (regular files ignore it)
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:  # the final component is a symlink
            raise SecretFileError(f"{p} is a symlink; secrets are read from regular files only: "
                                  f"replace the link with the file itself") from None
        raise
    try:
        st = os.fstat(fd)
        check_private(p, st)
        if st.st_size > max_bytes:
            raise SecretFileError(f"{p} is {st.st_size} bytes, more than a secret may be ({max_bytes}); "
                                  f"is this the right file?")
        chunks, left = [], max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)[:max_bytes]
    finally:
        os.close(fd)


def check_private(path: Path, st: os.stat_result) -> None:
    """Refuse a secret file that is not a regular file of ours without group/other access."""
    if not stat.S_ISREG(st.st_mode):
        raise SecretFileError(f"{path} is not a regular file; move it away")
    if st.st_uid != os.geteuid():
        raise SecretFileError(f"{path} is owned by uid {st.st_uid}, not {os.geteuid()}; "
                              f"run: chown {os.geteuid()} {path}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise SecretFileError(f"{path} has mode {mode:04o} (group/other access); run: chmod 600 {path}")


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` (and parents) if missing; the leaf is 0700 and must not be a symlink."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise SecretFileError(f"{p} must be a real directory, not a link or a file; move it away")
    if st.st_uid != os.geteuid():
        # someone else's directory (e.g. pre-created in a shared /tmp): whatever we write or read
        # there, they control — refuse rather than tighten it
        raise SecretFileError(f"{p} is owned by uid {st.st_uid}, not {os.geteuid()}; remove it or choose "
                              f"another directory")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(p, 0o700)
    return p


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or create in `path` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_parent(parent: Path) -> None:
    st = os.lstat(parent)
    if stat.S_ISLNK(st.st_mode):
        # a link here could point the write anywhere; the caller's directory must be real
        raise SecretFileError(f"{parent} is a symlink; secrets are written into real directories only: "
                              f"replace the link with a directory (mode 0700)")
    if not stat.S_ISDIR(st.st_mode):
        raise SecretFileError(f"{parent} is not a directory")
