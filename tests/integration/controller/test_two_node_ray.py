"""The controller on a two-node Ray cluster: the state stays on one node.

A head and a worker node on this machine (`two_node.py`, in a child process with its own Ray;
see there why), the controller against three emulated clusters, the reconciler and the Git source
placed on the worker node, the cluster agents spread over both. Then:

(a) every process holding a file of the state directory open (the sqlite store and its WAL, CA
    keys: /proc/*/fd) is the config server actor, on the driver's node — the reconciler and the
    Git source on the other node reach the store through it;
(b) the agents ran on both nodes and every cluster's lease is up;
(c) simulated proxies get their configs and ACK them (SYNCED), and the ACKs reach the store.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.simproxy import SimProxy
from clusters.lab.apiserver import EmulatedApiServer
from federation.server.grpc_services import wait_until
from tests.integration.controller.conftest import REPO_ROOT, free_port, git
from tests.integration.controller.two_node import HEAD_RESOURCE, WORKER_RESOURCE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class Child:
    """The child process and its line protocol."""

    def __init__(self, cfg: dict[str, Any], log: Path) -> None:
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               "RAY_USE_UVLOOP": "0"}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.controller.two_node", json.dumps(cfg)],
                                     cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log.open("w"), text=True, start_new_session=True)

    def read(self, event: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue  # Ray's own chatter
            if doc.get("event") == event:
                return dict(doc)
        err = self.log.read_text()
        raise AssertionError(f"the two-node driver exited before {event!r} (rc {self.proc.wait()}):\n{err[-4000:]}")

    def ask(self, cmd: str, event: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read(event)

    def stop(self, timeout_s: float = 90.0) -> None:
        """Ask it to stop its controller and cluster; kill its process group if it does not."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
                self.proc.wait(timeout_s)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def processes_mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def state_fd_holders(state_dir: Path) -> dict[int, set[str]]:
    """pid -> the files under `state_dir` it has open."""
    prefix = str(state_dir.resolve()) + os.sep
    holders: dict[int, set[str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fds = list((d / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(prefix):
                holders.setdefault(int(d.name), set()).add(target[len(prefix):])
    return holders


@pytest.fixture()
def ray_temp_dir() -> Iterator[str]:
    """A private Ray temp dir (short: Ray's socket paths must fit 107 bytes); whatever still runs
    from it afterwards is ours and is killed."""
    d = tempfile.mkdtemp(prefix="mfr", dir="/tmp")
    try:
        yield d
    finally:
        for pid in processes_mentioning(d):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(d, ignore_errors=True)


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


async def test_state_owner_pinned_to_the_driver_node_while_the_rest_spreads(
        fleet_repo: Path, tmp_path: Path, ray_temp_dir: str,
        emulated_clusters: tuple[dict[str, EmulatedApiServer], Path]) -> None:
    _servers, kubeconfig = emulated_clusters
    state = tmp_path / "state"
    port = free_port()
    child = Child({"repo": str(fleet_repo), "state_dir": str(state), "port": port, "kubeconfig": str(kubeconfig),
                   "temp_dir": ray_temp_dir}, tmp_path / "two-node-driver.log")
    proxies: list[SimProxy] = []
    try:
        started = child.read("started")
        head_node, worker_node = started["nodes"][HEAD_RESOURCE], started["nodes"][WORKER_RESOURCE]
        assert head_node != worker_node
        assert started["state_node"] == head_node  # the driver runs on the head; the state owner with it
        url = started["status_url"]

        def status() -> dict[str, Any]:
            return dict(http_json(f"{url}/api/v1/status"))

        # generous: two raylets, seven actors and a full LIST of every cluster on a busy 2-core machine
        assert await wait_until(lambda: len(status().get("proxies", [])) >= 9, 150, 0.5), status()
        head = git(fleet_repo, "rev-parse", "HEAD")
        assert status()["applied"]["revision"] == head  # recorded by the reconciler on the worker node
        ids = [p["proxy"] for p in status()["proxies"]]
        proxies = [SimProxy(pid, f"127.0.0.1:{port}", cluster=pid.split("/")[1]).start() for pid in ids]

        # (c) convergence: every proxy runs the head revision and has ACKed it
        assert await wait_until(lambda: all(p.revision == head for p in proxies), 60), \
            [(p.proxy_id, p.revision, p.client.last_error) for p in proxies]
        assert await wait_until(lambda: {p["sync"] for p in status()["proxies"]} == {"SYNCED"}, 30), \
            status()["proxies"]

        placement = child.ask("placement", "placement")["placement"]
        owner = placement["config_server"]
        assert owner["node_id"] == head_node
        assert placement["reconciler"]["node_id"] == worker_node and placement["git"]["node_id"] == worker_node

        # (b) the agents ran on both nodes, and every cluster's lease is up
        agents = {role: p for role, p in placement.items() if role.startswith("agent/")}
        assert set(agents) == {"agent/east", "agent/west", "agent/south"}
        assert {p["node_id"] for p in agents.values()} == {head_node, worker_node}, agents
        st = status()
        assert all(c["up"] and c["complete"] for c in st["clusters"].values()), st["clusters"]

        # (a) who holds the state directory's files: sampled while the controller runs
        holders: dict[int, set[str]] = {}
        for _ in range(6):
            for pid, files in state_fd_holders(state).items():
                holders.setdefault(pid, set()).update(files)
            await asyncio.sleep(0.25)
        on_worker = {p["pid"] for p in placement.values() if p["node_id"] == worker_node}
        assert not set(holders) & on_worker, {pid: holders[pid] for pid in set(holders) & on_worker}
        assert set(holders) == {owner["pid"]}, (holders, placement, started["driver_pid"])
        assert "controller.sqlite" in holders[owner["pid"]]
        assert (state / "ca").is_dir()  # the CA keys are there too (opened only while loading)

        # the ACKs went through the owner into the store (read only now: this opens the file too)
        from federation.controller.store import Store

        epoch, store = st["controller"]["epoch"], Store(state / "controller.sqlite")
        assert await wait_until(lambda: all(store.proxy_acks().get(p.proxy_id, {}).get("epoch") == epoch
                                            for p in proxies), 10)
        store.close()
    finally:
        for p in proxies:
            await p.stop()
        child.stop()
