"""`python -m ztunnel` as real processes: config file, cert dir, admin endpoints, SIGTERM drain,
and a restart with no config source serving from the persisted last good config."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration import dataplane_topology as topo
from tests.integration.test_dataplane_node import CLIENT, SERVER, VIP, configs

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


def spawn(cfg: Path | None, certs: Path, state: Path, ip: str, hbone_port: int, admin_port: int,
          socks_port: int, *extra: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "ztunnel", "--cert-dir", str(certs), "--state-dir", str(state),
            "--hbone", f"{ip}:{hbone_port}", "--socks", f"{ip}:{socks_port}" if socks_port else "", "--admin", f"127.0.0.1:{admin_port}",
            "--drain-timeout-s", "1", "--access-log", "off", *extra]
    if cfg is not None:
        args += ["--config", str(cfg)]
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_ready(proc: subprocess.Popen[bytes], admin_port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if get(admin_port, "/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("proxy never became ready")


async def roundtrip(socks: tuple[str, int]) -> bytes:
    r, w = await topo.socks_connect(socks, VIP, 80, CLIENT.address)
    w.write(b"over processes")
    w.write_eof()
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data


async def test_processes_serve_drain_and_restart_from_persisted_config(tmp_path: Path) -> None:
    echo = await topo.EchoServer(SERVER.address).start()
    hbone = topo.free_port(CLIENT.node_address)
    ca, cb = configs(echo.port, hbone)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    topo.write_cert_dir(a_dir / "certs", {CLIENT.identity: topo.svid(CLIENT.identity)})
    topo.write_cert_dir(b_dir / "certs", {SERVER.identity: topo.svid(SERVER.identity)})
    a_cfg = topo.write_config(tmp_path / "a.json", ca)
    b_cfg = topo.write_config(tmp_path / "b.json", cb)
    ports = [topo.free_port("127.0.0.1") for _ in range(2)]
    socks_port = topo.free_port(CLIENT.node_address)
    a = spawn(a_cfg, a_dir / "certs", a_dir / "state", CLIENT.node_address, hbone, ports[0], socks_port)
    b = spawn(b_cfg, b_dir / "certs", b_dir / "state", SERVER.node_address, hbone, ports[1], 0)
    try:
        wait_ready(a, ports[0])
        wait_ready(b, ports[1])
        socks = (CLIENT.node_address, socks_port)
        assert await roundtrip(socks) == b"over processes"
        status, metrics = get(ports[1], "/metrics")
        assert status == 200 and "istio_tcp_connections_opened_total" in metrics and "_created" not in metrics
        status, dump = get(ports[0], "/config_dump")
        assert status == 200 and '"proxy_id": "ztunnel/east/a"' in dump
        # SIGTERM: drain and exit 0
        b.send_signal(signal.SIGTERM)
        assert b.wait(10) == 0
        # it started with the bulk path's allocator settings (ztunnel.allocator), and said so
        assert b.stderr is not None
        started = b.stderr.read().decode()
        assert any(said in started for said in (
            "allocator: {'mmap_threshold_bytes': 1048576, 'trim_threshold_bytes': 4194304}",
            "allocator: kept the operator's", "allocator: not glibc")), started
        # restart B with no config source: it serves from the persisted last good config
        assert (b_dir / "state" / "last-good-config.json").exists()
        b_cfg.unlink()
        b = spawn(None, b_dir / "certs", b_dir / "state", SERVER.node_address, hbone, ports[1], 0,
                  "--allocator", "default")
        wait_ready(b, ports[1])
        assert await roundtrip(socks) == b"over processes"
        b.send_signal(signal.SIGTERM)
        assert b.wait(10) == 0 and b.stderr is not None
        assert "allocator: glibc's own behaviour (--allocator default)" in b.stderr.read().decode()
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        await echo.close()
