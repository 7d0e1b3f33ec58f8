"""The Dockerfile (no Docker engine here to build it: the kind tier does): multi-stage, installs
exactly the hash-pinned lock, ships every package the manifests run, runs as non-root by default."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from clusters.kind.manifests import controller_objects, member_objects, workload_objects
from tests.unit.provider.test_manifests import FLEETS

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTRUCTIONS = [line.strip() for line in DOCKERFILE.splitlines() if line.strip() and not line.startswith("#")]


def test_two_stages_from_a_slim_python_311() -> None:
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in INSTRUCTIONS
    assert [i for i in INSTRUCTIONS if i.startswith("FROM ")] == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"]


def test_dependencies_come_from_the_lock_checked_by_hash() -> None:
    assert "COPY requirements.lock /src/requirements.lock" in INSTRUCTIONS
    assert any("pip install --require-hashes -r /src/requirements.lock" in i for i in INSTRUCTIONS)
    assert any("--no-deps --no-build-isolation /src" in i for i in INSTRUCTIONS)  # nothing unpinned on top


def test_every_package_setuptools_ships_is_copied() -> None:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {m.group(1) for i in INSTRUCTIONS if (m := re.match(r"COPY (\w+) /src/\1$", i))}
    assert copied == {p.rstrip("*") for p in include}


def test_the_commands_the_manifests_run_are_in_the_image() -> None:
    snap = FLEETS["fleet-kind"]
    commands = set()
    for objs in (member_objects(snap, "east"), controller_objects(snap, "east", "https://g/f.git"),
                 workload_objects(snap, "east")):
        for o in objs:
            if o["kind"] in ("Deployment", "DaemonSet"):
                commands |= {tuple(c["command"]) for c in o["spec"]["template"]["spec"]["containers"]}
    assert commands == {("python", "-m", "ztunnel"), ("meshfed",), ("python", "-m", "clusters.lab.demo_server")}
    # `python` and `meshfed` are the virtualenv's; the node proxy's capture needs iptables
    assert "ENV PATH=/opt/meshfed/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RAY_USE_UVLOOP=0" in INSTRUCTIONS
    assert "&& apt-get install -y --no-install-recommends iptables iproute2 \\" in INSTRUCTIONS


def test_non_root_by_default() -> None:
    assert INSTRUCTIONS[-3:-1] == ["USER 65532:65532", "WORKDIR /tmp"]
