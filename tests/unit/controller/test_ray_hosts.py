"""The Ray doorway's habits that a hang or a slow disk would expose (without starting Ray): the
driver never waits on an actor without a timeout, and the state owner's host keeps blocking work
off the event loop that serves the proxies' gRPC streams."""

from __future__ import annotations

import ast
from pathlib import Path

import federation.ray.driver as driver


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
