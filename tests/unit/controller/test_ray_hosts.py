"""The Ray doorway's habits that a hang or a slow disk would expose (without starting Ray): the
driver never waits on an actor without a timeout, and the state owner's host keeps blocking work
off the event loop that serves the proxies' gRPC streams."""

from __future__ import annotations

import ast
import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import federation.ray.actors as actors
import federation.ray.driver as driver
from federation.ray.actors import ConfigServerHost


def _ray_gets(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "get" and isinstance(n.func.value, ast.Name) and n.func.value.id == "ray"]


def test_every_ray_get_in_the_driver_has_a_timeout() -> None:
    """Review note (b): `ray.get` without a timeout in the driver hangs its supervisor (and with it
    status and `meshfed check`) on one actor that does not answer."""
    calls = _ray_gets(Path(driver.__file__))
    assert len(calls) >= 10
    untimed = [c.lineno for c in calls if not any(k.arg == "timeout" for k in c.keywords)]
    assert untimed == [], f"ray.get without timeout= at driver.py lines {untimed}"


# --- the state owner's event loop -----------------------------------------------------------------


async def as_ray_calls_it(method: Callable[..., Any], *args: Any) -> Any:
    """How Ray runs an async actor's method: a coroutine is awaited on the actor's event loop, a
    plain method is called right there, on that loop (ray._private.async_compat.sync_to_async)."""
    if inspect.iscoroutinefunction(method):
        return await method(*args)
    return method(*args)


BLOCKED_S = 2.0


@pytest.mark.parametrize(("call", "blocking"), [
    (("store_call", "failover_count", (), {}), ("store", "failover_count")),
    (("status",), ("store", "ever_acked")),
    (("ensure_cas", b""), ("service", "ensure_cas")),
    (("set_draining", {"east": "east.mesh.local"}), ("service", "set_draining")),
    (("remove_cluster", "east", "removed by abc"), ("store", "proxy_acks")),
])
async def test_the_state_owner_keeps_the_proxies_event_loop_free_while_the_disk_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: tuple[Any, ...], blocking: tuple[str, str]) -> None:
    """Review note (a): the state owner's synchronous methods ran on the event loop that serves the
    proxies' gRPC streams, so a sqlite call waiting out a locked database (or a slow disk) stalled
    every stream and every ACK."""
    monkeypatch.setattr(actors, "tune_collector", lambda: None)   # process-wide: not this test process's
    host = ConfigServerHost(str(tmp_path / "state"), insecure=True)
    release = threading.Event()
    target = host.service.store if blocking[0] == "store" else host.service
    real = getattr(target, blocking[1])

    def slow(*args: Any, **kwargs: Any) -> Any:   # another writer holds the database
        release.wait(BLOCKED_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, blocking[1], slow)
    if call[0] == "ensure_cas":
        monkeypatch.setattr(actors, "decode_snapshot", lambda _blob: "snapshot")
        monkeypatch.setattr(host.service, "ensure_cas", lambda _snap: (release.wait(BLOCKED_S), {})[1])
    try:
        started = time.monotonic()
        pending = asyncio.ensure_future(as_ray_calls_it(getattr(host, call[0]), *call[1:]))
        for _ in range(5):                 # the loop keeps turning: a proxy's stream would be served
            await asyncio.sleep(0.01)
        assert time.monotonic() - started < BLOCKED_S / 2 and not pending.done()
        release.set()
        await asyncio.wait_for(pending, 10.0)
    finally:
        release.set()
        host.service.store.close()
        assert host.service.lock is not None
        host.service.lock.release()
