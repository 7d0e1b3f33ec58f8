"""Two controller instances (split brain) and Ray actor restarts, on the session-shared Ray.

- Two controllers on one state directory: the second gets a newer epoch; a proxy that follows it
  and then reaches the first (older) one is refused with FAILED_PRECONDITION, keeps its config,
  and the old controller's `meshfed check` says so.
- `ray.kill(actor, no_restart=False)` of the reconciler and of the config server: Ray restarts
  them, they rebuild from the state directory (applied revision, epoch, CA keys, acknowledged
  versions, failover history) and the proxies stay on / converge to the same revision.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import ray
from click.testing import CliRunner

from benchmarks.simproxy import SimProxy
from clusters.lab.apiserver import EmulatedApiServer
from federation.cli.main import cli
from federation.controller.backup import create_backup, restore_backup
from federation.controller.statelock import StateDirLocked, read_holder
from federation.controller.store import Store
from federation.ray.driver import Controller, ControllerOptions
from federation.server.grpc_services import wait_until
from tests.integration.controller.conftest import free_port, git
from tests.integration.controller.test_controller import rendered_proxies, start_controller
from ztunnel.api.identity import generate_key_and_csr, proxy_spiffe_id
from ztunnel.xds.client import request_certificate

pytestmark = pytest.mark.usefixtures("ray_session")


def sim(pid: str, port: int, current: Any = None) -> SimProxy:
    return SimProxy(pid, f"127.0.0.1:{port}", cluster=pid.split("/")[1], current=current).start()


async def test_second_controller_with_older_epoch_is_refused(
        fleet_repo: Path, tmp_path: Path, emulated_clusters: tuple[dict[str, EmulatedApiServer], Path]) -> None:
    _servers, kubeconfig = emulated_clusters
    state = tmp_path / "state"
    p_old, p_new = free_port(), free_port()
    old = start_controller(fleet_repo, state, kubeconfig, p_old)
    new = None
    proxies: list[SimProxy] = []
    try:
        await rendered_proxies(old)
        # a second controller started later on a copy of the state dir (a newer epoch): the split
        # brain an operator causes by restoring a backup elsewhere while the old one still runs. (On
        # the same state dir the second one is refused: test_a_second_controller_on_one_state_dir...)
        create_backup(state, tmp_path / "copy.tar.gz")
        restore_backup(tmp_path / "copy.tar.gz", tmp_path / "state-copy")
        new = start_controller(fleet_repo, tmp_path / "state-copy", kubeconfig, p_new)
        await rendered_proxies(new)
        e_old, e_new = old.status()["controller"]["epoch"], new.status()["controller"]["epoch"]
        assert e_new > e_old
        head = git(fleet_repo, "rev-parse", "HEAD")
        follower = sim("ztunnel/east/node-1", p_new)
        proxies.append(follower)
        assert await wait_until(lambda: follower.revision == head, 20)
        have = follower.sub.current
        assert have is not None and have.stamp.epoch == e_new
        await follower.stop()

        # the same proxy (what it runs, with its stamp) reaches the older controller
        stray = sim("ztunnel/east/node-1", p_old, current=have)
        proxies.append(stray)
        assert await wait_until(lambda: (old.refresh()["config_server"]["stale_epoch_refusals"] or 0) >= 1, 10)
        assert await wait_until(lambda: stray.client.stale_controller, 5), stray.client.last_error
        assert "split brain" in stray.client.last_error and "FAILED_PRECONDITION" in stray.client.last_error
        assert stray.sub.current is have and not stray.sink.applied  # kept what it ran; applied nothing
        check = CliRunner().invoke(cli, ["check", "--controller", old.status_server.url])
        assert check.exit_code == 1 and "FAIL  no split brain" in check.output
        assert "stop this one" in check.output

        # a proxy of the old controller moving to the newer one is accepted (epochs only grow)
        mover = sim("ztunnel/west/node-1", p_old)
        proxies.append(mover)
        assert await wait_until(lambda: mover.revision == head, 20)
        on_old = mover.sub.current
        await mover.stop()
        moved = sim("ztunnel/west/node-1", p_new, current=on_old)
        proxies.append(moved)
        assert await wait_until(lambda: moved.sub.current is not None and moved.sub.current.stamp.epoch == e_new, 20)
    finally:
        for p in proxies:
            await p.stop()
        old.stop()
        if new is not None:
            new.stop()


async def test_a_second_controller_on_one_state_dir_is_refused_or_stands_by(
        fleet_repo: Path, tmp_path: Path, emulated_clusters: tuple[dict[str, EmulatedApiServer], Path]) -> None:
    """Issue 11 item 9: a second controller on the same state directory is refused with the holder's
    pid and host; as a standby it waits and takes over when the holder exits; `meshfed check`
    names the lock holder."""
    import threading

    _servers, kubeconfig = emulated_clusters
    state = tmp_path / "state"
    first = start_controller(fleet_repo, state, kubeconfig, free_port())
    second: Controller | None = None
    try:
        await rendered_proxies(first)
        owner_pid = first.placement()["config_server"]["pid"]
        holder = read_holder(state)
        assert holder is not None and holder.pid == owner_pid
        with pytest.raises(StateDirLocked) as refused:
            start_controller(fleet_repo, state, kubeconfig, free_port())
        assert f"pid {owner_pid} on host {holder.host}" in str(refused.value) and "--standby" in str(refused.value)
        check = CliRunner().invoke(cli, ["check", "--controller", first.status_server.url])
        assert f"locked by this controller (pid {owner_pid} on host {holder.host})" in check.output
        epoch = first.status()["controller"]["epoch"]

        standby = Controller(ControllerOptions(
            repo=str(fleet_repo), state_dir=str(state), listen=f"127.0.0.1:{free_port()}",
            status_listen="127.0.0.1:0", kubeconfig=str(kubeconfig), insecure=True, git_poll_interval_s=3600,
            status_interval_s=0.2, watch_timeout_s=5, standby=True))
        started = threading.Event()
        thread = threading.Thread(target=lambda: (standby.start(), started.set()), daemon=True)
        thread.start()
        await asyncio.sleep(2.0)
        assert not started.is_set()                         # waits while the first one holds the state
        first.stop()
        assert await wait_until(started.is_set, 60, 0.1)    # and takes over when it exits
        second = standby
        await rendered_proxies(second)
        new_holder = read_holder(state)
        assert new_holder is not None and new_holder.pid == second.placement()["config_server"]["pid"] != owner_pid
        assert second.status()["controller"]["epoch"] > epoch
        assert second.status()["controller"]["lock"]["pid"] == new_holder.pid
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_actor_restarts_keep_state(
        fleet_repo: Path, tmp_path: Path, emulated_clusters: tuple[dict[str, EmulatedApiServer], Path]) -> None:
    _servers, kubeconfig = emulated_clusters
    state = tmp_path / "state"
    port = free_port()
    ctl = start_controller(fleet_repo, state, kubeconfig, port)
    proxies: list[SimProxy] = []
    try:
        ids = await rendered_proxies(ctl, timeout_s=60)
        head = git(fleet_repo, "rev-parse", "HEAD")
        proxies = [sim(pid, port) for pid in ids[:4]]
        assert await wait_until(lambda: all(p.revision == head for p in proxies), 20)
        assert await wait_until(lambda: all(p["sync"] == "SYNCED" for p in ctl.refresh()["proxies"]
                                            if p["connected"]), 10)
        before = ctl.refresh()
        epoch = before["controller"]["epoch"]
        roots = {(r["trust_domain"], r["fingerprint"]) for r in ctl.trust()}
        Store.in_state_dir(state).record_failover("checkout.shop.svc.clusterset.local", "FailedOver",
                                                  from_cluster="east", to_cluster="west", trigger="test",
                                                  revision=head)
        stamps = {p.proxy_id: p.sub.current.stamp for p in proxies}  # type: ignore[union-attr]

        # 1. the reconciler dies; Ray restarts it; it knows the applied revision from the store at once
        ray.kill(ctl.reconciler, no_restart=False)
        t0 = time.monotonic()

        def reconciler_back() -> bool:
            try:
                st = json.loads(ray.get(ctl.reconciler.status.remote(), timeout=2))
            except Exception:
                return False
            return bool(st["applied"].get("revision") == head)

        assert await wait_until(reconciler_back, 30, 0.1)
        # and re-renders from a fresh LIST of every cluster (the driver re-sends its inputs)
        def rerendered() -> bool:
            try:
                return bool(ctl.refresh()["reconciler"]["proxies_rendered"] == len(ids))
            except ray.exceptions.RayError:  # calls in flight while it restarted
                return False

        assert await wait_until(rerendered, 60, 0.2)
        print(f"reconciler restart to re-rendered: {time.monotonic() - t0:.2f}s")
        # no push at all: the restarted reconciler waited for every cluster's LIST (no transient
        # withdrawal of the clusters listed last) and rendered the same content
        assert {p.proxy_id: p.sub.current.stamp for p in proxies} == stamps  # type: ignore[union-attr]
        assert all(p["sync"] == "SYNCED" for p in ctl.refresh()["proxies"] if p["connected"])

        # 2. the config server dies: a newer epoch (time-based, above the store's), the same CA keys and ports
        ray.kill(ctl.config_server, no_restart=False)
        def new_epoch() -> bool:
            try:
                return bool(ctl.refresh()["controller"]["epoch"] > epoch)
            except ray.exceptions.RayError:
                return False

        t0 = time.monotonic()
        assert await wait_until(new_epoch, 30, 0.2)
        assert ctl.config_server_restarts == 1 and ctl.refresh()["controller"]["config_port"] == port
        epoch2 = ctl.refresh()["controller"]["epoch"]
        assert await wait_until(lambda: all(p.sub.current is not None and p.sub.current.stamp.epoch == epoch2
                                            and p.revision == head for p in proxies), 30), (
            [(p.proxy_id, p.sub.current.stamp if p.sub.current else None, p.client.last_error) for p in proxies],
            {k: v for k, v in ctl.refresh()["config_server"].items() if k != "recent_ack_latencies_s"},
            ctl.refresh()["proxies"], ctl.config_server_restarts)
        print(f"config server restart to proxies resynced: {time.monotonic() - t0:.2f}s")
        assert {(r["trust_domain"], r["fingerprint"]) for r in ctl.trust()} == roots
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:  # the CA signs again, same root
            kc = generate_key_and_csr(proxy_spiffe_id("east.mesh.local", "ztunnel/east/node-1"))
            resp = await request_certificate(ch, "ztunnel/east/node-1", kc.csr_pem)
        assert resp.cert_chain_pem
        acked = Store.in_state_dir(state).proxy_acks()
        assert await wait_until(lambda: all(Store.in_state_dir(state).proxy_acks().get(p.proxy_id, {})
                                            .get("epoch") == epoch2 for p in proxies), 5)
        assert set(acked) >= {p.proxy_id for p in proxies}
        hist = ctl.failover_history(None, None)
        assert any(e["trigger"] == "test" for e in hist)
    finally:
        for p in proxies:
            await p.stop()
        ctl.stop()
