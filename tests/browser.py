"""A real browser for the console's tests: Debian's `chromium` driven by Playwright.

Playwright's own browser download is not reachable from here (nor wanted): it drives the system
Chromium through `executable_path` (`$MESHFED_CHROMIUM`, else `chromium`/`chromium-browser` on
PATH; `make system` installs it). Tests skip with the reason when either is missing.

Each browser gets a new empty profile under the test's tmp path and the flags a root, offline
machine needs (no sandbox as root, no GPU, nothing phoning home). Screenshots go to
`<tmp_path>/screenshots/` and, when `$MESHFED_ARTIFACTS` is set (CI keeps that directory), to
`$MESHFED_ARTIFACTS/screenshots/` as well.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
ENV_CHROMIUM = "MESHFED_CHROMIUM"
ENV_ARTIFACTS = "MESHFED_ARTIFACTS"


def chromium_path() -> str | None:
    explicit = os.environ.get(ENV_CHROMIUM)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser() -> str:
    """The Chromium executable, or skip the test saying what is missing and how to get it."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("browser tests need Playwright: `make venv` installs it (dev extra in pyproject.toml)")
    path = chromium_path()
    if path is None:
        pytest.skip(f"browser tests need Chromium: `make system` installs Debian's chromium "
                    f"(or set ${ENV_CHROMIUM} to a Chromium executable)")
    return path


@contextmanager
def browser_page(tmp_path: Path, width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A fresh page in a fresh profile; every console message and page error is recorded in
    `page.meshfed_messages` (a CSP violation shows up there as an error)."""
    executable = require_browser()
    from playwright.sync_api import sync_playwright

    profile = tmp_path / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": height})
        try:
            page = context.new_page()
            messages: list[str] = []
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            page.meshfed_messages = messages
            yield page
        finally:
            context.close()


def screenshot(page: Any, tmp_path: Path, name: str) -> list[Path]:
    """Save a full-page PNG as a test artifact; the paths written."""
    dirs = [tmp_path / "screenshots"]
    if os.environ.get(ENV_ARTIFACTS):
        dirs.append(Path(os.environ[ENV_ARTIFACTS]) / "screenshots")
    out = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        out.append(path)
    return out
