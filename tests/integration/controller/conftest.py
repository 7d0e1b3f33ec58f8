"""Fixtures for controller integration tests: one Ray per session, emulated clusters, a fleet repo."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusters.lab.apiserver import EmulatedApiServer, objects_from_observation

REPO_ROOT = Path(__file__).resolve().parents[3]
EXAMPLE_FLEET = REPO_ROOT / "examples" / "fleet"
CLUSTERS = ("east", "west", "south")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    from federation.ray.driver import init_ray

    os.environ.setdefault("RAY_USE_UVLOOP", "0")
    init_ray(None, num_cpus=2)
    yield
    import ray

    ray.shutdown()


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.fixture()
def fleet_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "fleet"
    shutil.copytree(EXAMPLE_FLEET, repo)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "initial fleet")
    return repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def emulated_clusters(tmp_path: Path, fleet_repo: Path) -> Iterator[tuple[dict[str, EmulatedApiServer], Path]]:
    """One emulated API server per example cluster, seeded from the lab model; a kubeconfig for all."""
    import gitops
    from federation.core.offline import offline_observations

    snap = gitops.load_worktree(fleet_repo)
    kubeconfig = tmp_path / "kubeconfig"
    servers: dict[str, EmulatedApiServer] = {}
    try:
        for obs in offline_observations(snap):
            srv = EmulatedApiServer().start()
            servers[obs.cluster] = srv
            srv.seed(objects_from_observation(obs))
            srv.write_kubeconfig(kubeconfig, f"lab-{obs.cluster}")
        yield servers, kubeconfig
    finally:
        for srv in servers.values():
            srv.stop()
