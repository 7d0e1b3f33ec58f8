"""Issue 11 item 10, end to end over mTLS on loopback: the controller's state directory is lost.

Two proxies run against controller A (real `XdsClient`s over mTLS with SVIDs from A's CA, verifying
A with their trust domain's roots). A's state directory is then deleted and A stops; traffic keeps
flowing on the proxies' last good config. Then:

- **rebuilt from a backup** (`meshfed controller backup` taken while A ran): the controller on the
  restored directory has the same CA keys, so the proxies verify it and it verifies them; its epoch
  is newer than the one they persisted, so they take its configs: every proxy is SYNCED again
  without hand work;
- **rebuilt from nothing**: new CA roots, the proxies cannot verify it and keep serving their last
  good config; the controller says so in its log at start and, once the grace is over, in
  `meshfed check`, with the way out (restore a backup, or re-provision the proxies).

The config service is the plain class with its gRPC adapter (no Ray); "the reconciler" is the test
setting the desired configs, as the reconciler re-sends them after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import gitops
from benchmarks.simproxy import SimProxy, make_config
from federation.controller.backup import create_backup, restore_backup
from federation.controller.checks import ORPHAN_GRACE_S, build_checks
from federation.controller.config_service import TRUST_ANCHORS_DIR, ConfigService
from federation.controller.statelock import StateDirLock
from federation.server.grpc_services import ConfigServer, config_server_for, serve, wait_until
from tests.integration.controller.conftest import free_port
from ztunnel.api.identity import controller_tls_name, proxy_spiffe_id
from ztunnel.xds.client import Svid

EXAMPLE_FLEET = Path(__file__).resolve().parents[3] / "examples" / "fleet"
EAST_TD = "east.mesh.local"
PROXIES = ("ztunnel/east/node-1", "gateway/east")


@dataclass
class Running:
    service: ConfigService
    server: ConfigServer
    lock: StateDirLock

    async def stop(self) -> None:
        await self.server.stop(0)
        await self.service.stop()
        self.lock.release()


async def start(state: Path, port: int) -> Running:
    lock = StateDirLock(state)
    lock.acquire(wait=False)
    service = ConfigService(state, insecure=False, lock=lock)
    service.ensure_cas(gitops.load_worktree(EXAMPLE_FLEET))
    server = config_server_for(service)
    await serve(service, server, f"127.0.0.1:{port}")
    return Running(service, server, lock)


def render(ctl: Running, revision: str, services: int = 1) -> None:
    """What the reconciler sends a (re)started config service: every rendered config in full."""
    ctl.service.dist.set_desired({p: make_config(p, revision, services=services, cluster="east") for p in PROXIES})


def synced(ctl: Running) -> bool:
    st = {p["proxy"]: p for p in ctl.service.dist.status()}
    return all(st.get(p, {}).get("sync") == "SYNCED" for p in PROXIES)


@dataclass
class Fleet:
    state: Path
    port: int
    proxies: list[SimProxy]
    epoch_a: int
    archive: Path


@pytest.fixture()
async def lost_state(tmp_path: Path) -> AsyncIterator[Fleet]:
    """Controller A with two synced proxies and a backup; then A's state directory is lost."""
    state, port = tmp_path / "state", free_port()
    a = await start(state, port)
    roots = (state / TRUST_ANCHORS_DIR / f"{EAST_TD}.pem").read_bytes()   # what a proxy of east is given
    proxies = []
    for pid in PROXIES:   # SVIDs A's CA issued (as the bootstrap path would have)
        issued = a.service.signing.cas[EAST_TD].issue_svid(proxy_spiffe_id(EAST_TD, pid))
        svid = Svid(str(issued.identity), issued.key_pem, issued.chain_pem, roots, issued.not_after_s)
        proxies.append(SimProxy(pid, f"127.0.0.1:{port}", cluster="east",
                                channel_factory=svid.channel_factory(f"127.0.0.1:{port}", controller_tls_name(EAST_TD))).start())
    try:
        render(a, "rev1")
        assert await wait_until(lambda: synced(a), 10), a.service.dist.status()
        archive = tmp_path / "backup.tar.gz"
        create_backup(state, archive)                        # taken while A runs
        epoch_a = a.service.epoch
        await a.stop()
        shutil.rmtree(state)                                  # the state directory is lost
        await asyncio.sleep(0.3)
        assert all(p.revision == "rev1" and p.sub.current.stamp.epoch == epoch_a for p in proxies)  # type: ignore[union-attr]
        yield Fleet(state, port, proxies, epoch_a, archive)
    finally:
        for p in proxies:
            await p.stop()


async def test_a_controller_rebuilt_from_a_backup_is_accepted_and_its_proxies_resync(lost_state: Fleet) -> None:
    f = lost_state
    restore_backup(f.archive, f.state)
    b = await start(f.state, f.port)
    try:
        assert b.service.epoch > f.epoch_a
        render(b, "rev1")
        t0 = time.monotonic()
        assert await wait_until(lambda: synced(b), 20), ([p.client.last_error for p in f.proxies],
                                                         b.service.dist.status())
        print(f"restored controller: every proxy SYNCED {time.monotonic() - t0:.2f}s after it started serving")
        assert all(p.sub.current is not None and p.sub.current.stamp.epoch == b.service.epoch for p in f.proxies)
        state = b.service.state_status()
        assert state["origin"] == "restored" and state["ever_acked"] and state["foreign_epoch_proxies"] == 0
        checks = build_checks({"controller": {"state": state}, "reconciler": {"proxies_rendered": 2}},
                              time.time() + ORPHAN_GRACE_S * 10)
        assert all(c["ok"] for c in checks if c["group"] == "state"), checks
        # and it goes on: a new revision reaches them
        render(b, "rev2", services=2)
        assert await wait_until(lambda: all(p.revision == "rev2" for p in f.proxies), 10)
    finally:
        await b.stop()


async def test_a_controller_rebuilt_from_nothing_says_what_to_do_and_proxies_keep_serving(
        lost_state: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    f = lost_state
    with caplog.at_level(logging.WARNING, logger="federation"):
        c = await start(f.state, f.port)
    try:
        logged = [r.getMessage() for r in caplog.records if "was empty" in r.getMessage()]
        assert logged and "meshfed controller restore" in logged[0] and f"{TRUST_ANCHORS_DIR}/<trust-domain>.pem" in logged[0]
        assert c.service.epoch > f.epoch_a
        render(c, "rev-new")
        await asyncio.sleep(3.0)                               # several reconnect attempts (backoff <= 0.5 s)
        # the proxies cannot verify the new CA: they keep serving their last good config
        assert all(p.revision == "rev1" and p.sub.current.stamp.epoch == f.epoch_a for p in f.proxies)  # type: ignore[union-attr]
        assert all(p.client.connects >= 1 for p in f.proxies)
        assert not any(s.connected for s in c.service.dist.sessions.values())
        st = {"controller": {"state": c.service.state_status(), "state_dir": str(f.state)},
              "reconciler": {"proxies_rendered": len(PROXIES)}}
        checks = {x["check"]: x for x in build_checks(st, time.time() + ORPHAN_GRACE_S + 1)}
        orphan = checks["proxies have connected to this controller's state"]
        assert not orphan["ok"] and "created new CA roots" in orphan["cause"]
        assert f"meshfed controller restore --state-dir {f.state}" in orphan["hint"]
        assert f"{f.state}/{TRUST_ANCHORS_DIR}/<trust-domain>.pem" in orphan["hint"]
    finally:
        await c.stop()
