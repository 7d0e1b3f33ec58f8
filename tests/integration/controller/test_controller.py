"""The controller on Ray against three emulated clusters, with simulated proxies over gRPC."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from benchmarks.simproxy import MemorySink, SimProxy
from clusters.lab.apiserver import EmulatedApiServer
from federation.ray.driver import Controller, ControllerOptions
from federation.server.grpc_services import wait_until
from tests.integration.controller.conftest import free_port, git

pytestmark = pytest.mark.usefixtures("ray_session")


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def http_post(url: str, token: str | None = None) -> int:
    import urllib.error

    req = urllib.request.Request(url, data=b"{}", method="POST",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def start_controller(repo: Path, state: Path, kubeconfig: Path, port: int) -> Controller:
    return Controller(ControllerOptions(
        repo=str(repo), state_dir=str(state), listen=f"127.0.0.1:{port}", status_listen="127.0.0.1:0",
        kubeconfig=str(kubeconfig), insecure=True, git_poll_interval_s=3600, status_interval_s=0.2,
        watch_timeout_s=5)).start()


async def rendered_proxies(ctl: Controller, want: int = 9, timeout_s: float = 90) -> list[str]:
    # generous: Ray start-up plus the reconciler's warm-up (a full LIST from every cluster) on a busy 2-core CI
    ok = await wait_until(lambda: len(ctl.refresh().get("proxies", [])) >= want, timeout_s, 0.2)
    assert ok, ctl.refresh()
    return [p["proxy"] for p in ctl.status()["proxies"]]


async def test_commit_bad_commit_nack_and_restart_pruning(
        fleet_repo: Path, tmp_path: Path, emulated_clusters: tuple[dict[str, EmulatedApiServer], Path]) -> None:
    servers, kubeconfig = emulated_clusters
    port = free_port()
    ctl = start_controller(fleet_repo, tmp_path / "state", kubeconfig, port)
    proxies: list[SimProxy] = []
    try:
        ids = await rendered_proxies(ctl)
        assert "gateway/east" in ids and "ztunnel/west/node-1" in ids
        first = git(fleet_repo, "rev-parse", "HEAD")
        nacker_id = "ztunnel/south/node-1"
        for pid in ids:
            sink = MemorySink(reject=lambda c: ["checkout-v3 uses an unsupported appProtocol"]
                              if any(s.name == "checkout-v3" for s in c.services) else [])
            proxies.append(SimProxy(pid, f"127.0.0.1:{port}", cluster=pid.split("/")[1],
                                    sink=sink if pid == nacker_id else None).start())
        assert await wait_until(lambda: all(p.revision == first for p in proxies), 20), [p.revision for p in proxies]
        st = ctl.refresh()
        assert {p["sync"] for p in st["proxies"]} == {"SYNCED"}
        assert st["applied"]["revision"] == first

        # 1. a commit is pushed: every proxy ACKs the new revision; one NACKs and is reported
        svc = (fleet_repo / "services/shop/checkout-v2.yaml").read_text()
        (fleet_repo / "services/shop/checkout-v3.yaml").write_text(svc.replace("checkout-v2", "checkout-v3"))
        git(fleet_repo, "add", "-A")
        git(fleet_repo, "commit", "-q", "-m", "add checkout-v3")
        second = git(fleet_repo, "rev-parse", "HEAD")
        t0 = time.monotonic()
        ctl.trigger_git()
        others = [p for p in proxies if p.proxy_id != nacker_id]
        nacker = next(p for p in proxies if p.proxy_id == nacker_id)
        assert await wait_until(lambda: all(p.revision == second for p in others), 20)
        commit_to_acked_s = time.monotonic() - t0
        assert nacker.revision == first                       # the NACK kept it on its previous version
        assert await wait_until(lambda: any(p["proxy"] == nacker_id and "unsupported appProtocol" in p["last_nack"]
                                            for p in ctl.refresh()["proxies"]), 5)
        st = ctl.refresh()
        assert next(p for p in st["proxies"] if p["proxy"] == nacker_id)["sync"] == "STALE"
        checks = http_json(f"{ctl.status_server.url}/api/v1/check")
        assert any(c["check"] == "all proxies synced" and not c["ok"] and nacker_id in c["cause"] for c in checks)

        # 2. a bad commit: every proxy stays on the last good revision, status shows the error
        (fleet_repo / "services/shop/cart.yaml").write_text("apiVersion: meshfed.dev/v1alpha1\nkind: GlobalService\n"
                                                           "metadata: {name: cart, namespace: shop}\nspec: {bogus: 1}\n")
        git(fleet_repo, "commit", "-q", "-am", "break cart")
        bad = git(fleet_repo, "rev-parse", "HEAD")
        # ... announced as a Git hook would: POST /api/v1/reconcile, which needs the controller's
        # token (the file its state owner wrote, 0600)
        assert http_post(f"{ctl.status_server.url}/api/v1/reconcile") == 401
        token_file = tmp_path / "state" / "status-api-token"
        assert token_file.stat().st_mode & 0o077 == 0
        assert http_post(f"{ctl.status_server.url}/api/v1/reconcile", token_file.read_text().strip()) == 202
        assert await wait_until(lambda: (ctl.refresh().get("desired") or {}).get("revision") == bad, 20)
        st = http_json(f"{ctl.status_server.url}/api/v1/status")
        assert st["desired"]["ok"] is False and st["applied"]["revision"] == second
        assert st["problems"] and all(p["code"] for p in st["problems"])
        # the console's reads: the rejected attempt by SHA (through the state owner) and the live graph
        [attempt] = http_json(f"{ctl.status_server.url}/api/v1/revisions?sha={bad[:12]}")
        assert attempt["revision"] == bad and attempt["subject"] == "break cart" and attempt["ok"] is False
        assert attempt["problems"] == st["problems"]
        graph = http_json(f"{ctl.status_server.url}/api/v1/graph")
        assert graph["revision"] == second and sorted(c["name"] for c in graph["clusters"]) == ["east", "south", "west"]
        assert {pc["health"] for s in graph["services"] for pc in s["clusters"]} == {"healthy"}
        await asyncio.sleep(0.3)
        assert all(p.revision == second for p in others)

        metrics = http_text(f"{ctl.status_server.url}/metrics")
        assert "meshfed_proxy_sync{state=\"SYNCED\"}" in metrics and "_created" not in metrics
        assert f'meshfed_revision_info{{kind="applied",ok="true",revision="{second}"}} 1.0' in metrics

        # 3. an endpoint removed while the controller was down is pruned after restart
        ctl.stop()
        east = servers["east"]
        slice_ = next(s for s in east.list("discovery.k8s.io/v1", "EndpointSlice")
                      if s["metadata"]["name"] == "checkout-meshfed")
        removed = slice_["endpoints"][0]["targetRef"]["name"]
        slice_["endpoints"] = slice_["endpoints"][1:]
        east.apply(slice_, replace=True)
        await asyncio.sleep(0.5)
        viewer = next(p for p in others if p.proxy_id == "gateway/east")
        before = {e.workload_uid for s in viewer.sub.current.services for e in s.endpoints}  # type: ignore[union-attr]
        assert f"east/shop/{removed}" in before  # proxies keep serving while the controller is gone
        ctl = start_controller(fleet_repo, tmp_path / "state", kubeconfig, port)

        def pruned() -> bool:
            cur = viewer.sub.current
            return cur is not None and f"east/shop/{removed}" not in {
                e.workload_uid for s in cur.services for e in s.endpoints}

        assert await wait_until(pruned, 30)
        assert viewer.sub.current.stamp.epoch >= 2  # type: ignore[union-attr]
        print(f"commit_to_all_acked_s={commit_to_acked_s:.3f}")
    finally:
        for p in proxies:
            await p.stop()
        ctl.stop()


async def test_ca_refuses_foreign_csr(fleet_repo: Path, tmp_path: Path,
                                      emulated_clusters: tuple[dict[str, EmulatedApiServer], Path]) -> None:
    import grpc.aio

    from ztunnel.api.identity import generate_key_and_csr, proxy_spiffe_id
    from ztunnel.xds.client import request_certificate

    _servers, kubeconfig = emulated_clusters
    port = free_port()
    ctl = start_controller(fleet_repo, tmp_path / "state", kubeconfig, port)
    try:
        await rendered_proxies(ctl)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            own = generate_key_and_csr(proxy_spiffe_id("east.mesh.local", "ztunnel/east/node-1"))
            resp = await request_certificate(ch, "ztunnel/east/node-1", own.csr_pem)
            assert resp.cert_chain_pem and resp.roots_pem
            foreign = generate_key_and_csr("spiffe://west.mesh.local/ns/shop/sa/checkout")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await request_certificate(ch, "ztunnel/east/node-1", foreign.csr_pem)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "west.mesh.local" in (err.value.details() or "")
        trust = http_json(f"{ctl.status_server.url}/api/v1/trust")
        assert {r["trust_domain"] for r in trust} >= {"east.mesh.local", "west.mesh.local"}
        check_cli(ctl.status_server.url)
    finally:
        ctl.stop()


def check_cli(url: str) -> None:
    """The operator commands against the live status API (no proxies connected: NOT SENT)."""
    from click.testing import CliRunner

    from federation.cli.main import cli

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, [*args, "--controller", url], standalone_mode=False, catch_exceptions=False)

    st = run("status", "-o", "json")
    data = json.loads(st.output)
    assert data["applied"]["revision"] and {p["sync"] for p in data["proxies"]} == {"NOT SENT"}
    table = run("status")
    assert "NOT SENT" in table.output and "applied revision" in table.output
    clusters = run("clusters", "-o", "json")
    assert set(json.loads(clusters.output)) == {"east", "west", "south"}
    assert "shop/checkout" in run("services").output
    eps = json.loads(run("endpoints", "checkout", "--from", "east", "-o", "json").output)
    assert eps["from"] == "east" and any(e["cluster"] == "east" and e["tier"] == 0 for e in eps["endpoints"])
    assert json.loads(run("failover", "history", "--since", "1h", "-o", "json").output) == []
    check = run("check")
    assert "FAIL  all proxies synced" in check.output and "hint:" in check.output
