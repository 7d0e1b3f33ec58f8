"""Unit-tier guards: unit tests are pure. Starting Ray or opening an internet socket here is a bug
in the test (or in the code under test, which should take its I/O through an adapter)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest


class UnitTierViolation(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _forbid_ray_and_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def no_ray(*_a: Any, **_k: Any) -> None:
        raise UnitTierViolation("ray.init called from a unit test; move the test to tests/integration")

    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a declared dependency
        ray = None
    if ray is not None:
        monkeypatch.setattr(ray, "init", no_ray)

    real_connect = socket.socket.connect
    real_bind = socket.socket.bind

    def guarded(real: Any, verb: str) -> Any:
        def call(self: socket.socket, address: Any) -> Any:
            if self.family in (socket.AF_INET, socket.AF_INET6):
                raise UnitTierViolation(f"unit test tried to {verb} {address!r}; use tests/integration")
            return real(self, address)
        return call

    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect, "connect to"))
    monkeypatch.setattr(socket.socket, "bind", guarded(real_bind, "bind"))
    yield
