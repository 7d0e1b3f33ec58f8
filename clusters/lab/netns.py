"""Entering a named network namespace from Python, for the calling thread only.

`setns(2)` on a network namespace changes only the calling thread, so `in_netns()` is safe to use
from a helper thread while others keep running in the sandbox root. Sockets keep the namespace
they were created in: a socket made inside `in_netns()` stays there after the block ends, which is
how one process can listen in one namespace and dial in another (the host portal does this).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def setns_fd(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns failed: {os.strerror(err)} (needs CAP_SYS_ADMIN over the namespace)")


def netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


@contextmanager
def in_fd_netns(fd: int) -> Iterator[None]:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns_fd(fd)
        try:
            yield
        finally:
            setns_fd(own)
    finally:
        os.close(own)


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block in the named namespace ("" = stay where we are)."""
    if not name:
        yield
        return
    fd = os.open(netns_path(name), os.O_RDONLY)
    try:
        with in_fd_netns(fd):
            yield
    finally:
        os.close(fd)
