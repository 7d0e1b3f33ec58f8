"""Installs are reproducible: `make venv` installs requirements.lock, every file checked by hash.

The lock pins every dependency pyproject.toml declares (and theirs), each with at least one
sha256; the Makefile installs it with --require-hashes; and the environment the tests run in is
exactly what the lock says (so CI tests what users get).
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes)"""
    out: dict[str, tuple[str, list[str]]] = {}
    current = ""
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^ \\;]+)", line)
        if m:
            current = canonical(m.group(1))
            out[current] = (m.group(3), [])
        for h in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            out[current][1].append(h)
    return out


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonical(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in reqs}


def test_every_locked_requirement_is_pinned_with_hashes() -> None:
    lock = locked()
    assert len(lock) > 50
    unhashed = sorted(n for n, (_v, hashes) in lock.items() if not hashes)
    assert unhashed == []


def test_everything_pyproject_declares_is_locked() -> None:
    missing = sorted(declared() - set(locked()))
    assert missing == [], f"run `make lock`: {missing} are declared in pyproject.toml but not in requirements.lock"


def test_make_venv_installs_the_lock_with_hashes_required() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r $(LOCK)" in makefile and "LOCK := requirements.lock" in makefile
    assert "--no-build-isolation" in makefile  # the build backend comes from the lock too
    assert re.search(r"^lock:", makefile, re.M)


def test_the_environment_is_what_the_lock_pins() -> None:
    differ = {}
    for name, (version, _hashes) in locked().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            differ[name] = (version, None)
            continue
        if have != version:
            differ[name] = (version, have)
    assert differ == {}, f"the virtualenv differs from requirements.lock (locked, installed): {differ}; run `make venv`"


def test_the_readme_says_how_to_refresh_the_lock() -> None:
    """The refresh command is documented where installation is (not only in the Makefile)."""
    readme = (ROOT / "README.md").read_text()
    install = readme[: readme.index("\n## ")]   # the opening section: set-up and dependencies
    assert "`make lock`" in install and "requirements.lock" in install
