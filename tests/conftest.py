"""Test tiers for meshfed.

The tier of a test is the directory it lives in (tests/unit, tests/integration, tests/lab,
tests/kind); the matching marker is applied here so `-m unit` and friends work without
decorating every test. Lab tests need root (network namespaces); kind tests are opt-in with
`--with-kind` and need a Docker engine. Both are skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "lab", "kind")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--with-kind", action="store_true", default=False,
                     help="run the kind tier (needs Docker and kind)")


def _tier_of(path: Path) -> str | None:
    parts = path.parts
    for tier in TIERS:
        if tier in parts:
            return tier
    return None


def _docker_engine_missing() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    if shutil.which("kind") is None:
        return "no kind binary on PATH"
    if not Path("/var/run/docker.sock").exists():
        return "no Docker engine (/var/run/docker.sock absent)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    is_root = os.geteuid() == 0
    with_kind = config.getoption("--with-kind")
    for item in items:
        tier = _tier_of(Path(str(item.fspath)))
        if tier is None:
            continue
        item.add_marker(getattr(pytest.mark, tier))
        if tier == "lab" and not is_root:
            item.add_marker(pytest.mark.skip(reason="lab tier needs root for network namespaces"))
        if tier == "kind":
            if not with_kind:
                item.add_marker(pytest.mark.skip(reason="kind tier is opt-in: pass --with-kind"))
            else:
                missing = _docker_engine_missing()
                if missing:
                    item.add_marker(pytest.mark.skip(reason=f"kind tier needs Docker: {missing}"))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that runs a CLI command configures logging (root level, the meshfed handler, and the
    $MESHFED_LOG_FORMAT a command hands to the processes it starts): undo it after each test."""
    import logging

    from ztunnel.api import logsetup

    root = logging.getLogger()
    level = root.level
    env_format = os.environ.get(logsetup.ENV_FORMAT)
    yield
    logsetup.reset()
    root.setLevel(level)
    if env_format is None:
        os.environ.pop(logsetup.ENV_FORMAT, None)
    else:
        os.environ[logsetup.ENV_FORMAT] = env_format
