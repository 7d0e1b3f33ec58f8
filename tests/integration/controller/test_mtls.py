"""mTLS on the config protocol, on loopback: bootstrap token -> SVID -> subscription, and refusals.

The controller's config service (`federation.controller.config_service.ConfigService`, a plain
class; no Ray needed here) is served by its gRPC adapter (`federation.server.grpc_services`) with
TLS and the CAs of the example fleet. Simulated proxies are real
`XdsClient`s over `ztunnel.xds.client.secure_channel` (target-name override: the controller's
certificate carries the DNS name `CONTROLLER_TLS_NAME`, the proxies' SVIDs none).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import gitops
from benchmarks.simproxy import SimProxy, make_config
from federation.controller.bootstrap import BOOTSTRAP_TOKENS_FILE
from federation.controller.ca import TrustDomainCA
from federation.controller.config_service import CONTROLLER_ROOTS_FILE, ConfigService
from federation.server.grpc_services import ConfigServer, config_server_for, serve
from ztunnel.api.codec import CONFIG_METHOD, HEALTH_METHOD
from ztunnel.api.identity import generate_key_and_csr, proxy_spiffe_id
from ztunnel.api.proto import meshfed_pb2 as pb
from ztunnel.xds.client import Svid, bootstrap_svid, request_certificate, secure_channel

EXAMPLE_FLEET = Path(__file__).resolve().parents[3] / "examples" / "fleet"
EAST_TD = "east.mesh.local"


class Ctl:
    def __init__(self, service: ConfigService, server: ConfigServer, state: Path) -> None:
        self.service, self.server = service, server
        self.target = f"127.0.0.1:{server.port}"
        self.bootstrap = f"127.0.0.1:{server.bootstrap_port}"
        self.tokens: dict[str, str] = json.loads((state / BOOTSTRAP_TOKENS_FILE).read_text())
        self.roots = (state / CONTROLLER_ROOTS_FILE).read_bytes()
        assert (state / BOOTSTRAP_TOKENS_FILE).stat().st_mode & 0o077 == 0

    async def svid(self, proxy_id: str, cluster: str = "east", td: str = EAST_TD) -> Svid:
        return await bootstrap_svid(self.bootstrap, proxy_id, td, self.roots, self.tokens[cluster])


@pytest.fixture()
async def ctl(tmp_path: Path) -> AsyncIterator[Ctl]:
    state = tmp_path / "state"
    service = ConfigService(state, insecure=False)
    service.ensure_cas(gitops.load_worktree(EXAMPLE_FLEET))
    server = config_server_for(service)
    await serve(service, server, "127.0.0.1:0")
    try:
        yield Ctl(service, server, state)
    finally:
        await server.stop(0)
        await service.stop()


async def first_response(channel: Any, proxy_id: str, timeout_s: float = 5.0) -> Any:
    """Open a config stream as `proxy_id` and read one response (raises AioRpcError on refusal)."""
    call = channel.stream_stream(CONFIG_METHOD, request_serializer=pb.ConfigRequest.SerializeToString,
                                 response_deserializer=pb.ConfigResponse.FromString)(timeout=timeout_s)
    await call.write(pb.ConfigRequest(proxy=pb.ProxyHeader(proxy_id=proxy_id, cluster="east")))
    try:
        return await call.read()
    finally:
        call.cancel()


async def refused(coro: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value


async def test_bootstrap_then_subscribe_over_mtls(ctl: Ctl) -> None:
    pid = "ztunnel/east/node-1"
    svid = await ctl.svid(pid)
    assert svid.identity == proxy_spiffe_id(EAST_TD, pid) == \
        "spiffe://east.mesh.local/ns/meshfed-system/sa/ztunnel.east.node-1"
    assert svid.chain_pem.startswith(b"-----BEGIN CERTIFICATE") and svid.roots_pem
    ctl.service.dist.set_desired({pid: make_config(pid, "rev1", cluster="east")})
    proxy = SimProxy(pid, ctl.target, cluster="east", channel_factory=svid.channel_factory(ctl.target)).start()
    try:
        from federation.server.grpc_services import wait_until

        assert await wait_until(lambda: proxy.revision == "rev1", 10), proxy.client.last_error
        st = {s["proxy"]: s for s in ctl.service.dist.status()}[pid]
        assert st["sync"] == "SYNCED" and st["identity"] == svid.identity
        # renewal over mTLS: the proxy's own identity, no token needed
        kc = generate_key_and_csr(svid.identity)
        async with svid.channel_factory(ctl.target)() as ch:
            resp = await request_certificate(ch, pid, kc.csr_pem)
        assert resp.cert_chain_pem
    finally:
        await proxy.stop()


async def test_another_proxys_identity_is_refused(ctl: Ctl) -> None:
    node2 = await ctl.svid("ztunnel/east/node-2")
    ctl.service.dist.set_desired({"ztunnel/east/node-2": make_config("ztunnel/east/node-2", "rev1", cluster="east")})
    async with node2.channel_factory(ctl.target)() as ch:
        own = await first_response(ch, "ztunnel/east/node-2")  # its own id: served
        assert own.stamp.revision == "rev1"
        err = await refused(first_response(ch, "ztunnel/east/node-1"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "ztunnel.east.node-1" in (err.details() or "")
        # nor may it report health in another proxy's name
        call = ch.stream_unary(HEALTH_METHOD, request_serializer=pb.HealthReport.SerializeToString,
                               response_deserializer=pb.HealthSummary.FromString)(timeout=5)
        await call.write(pb.HealthReport(proxy_id="ztunnel/east/node-1"))
        await call.done_writing()
        err = await refused(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ctl.server.health_reports == 0


async def test_identity_minted_by_another_federated_domain_is_refused(ctl: Ctl) -> None:
    # west's CA (trusted at the TLS layer: west is in the fleet) mints a look-alike of east's proxy
    fake = ctl.service.signing.cas["west.mesh.local"].issue_svid(
        "spiffe://west.mesh.local/ns/meshfed-system/sa/ztunnel.east.node-1")
    async with secure_channel(ctl.target, ctl.roots, fake.key_pem, fake.chain_pem) as ch:
        err = await refused(first_response(ch, "ztunnel/east/node-1"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "east.mesh.local" in (err.details() or "")


async def test_pooled_ca_forgery_of_another_trust_domains_proxy_is_refused(ctl: Ctl) -> None:
    """West's CA mints east's proxy identity. The TLS layer accepts it (gRPC checks the chain
    against the pooled roots of every fleet CA); the trust-domain-bound check must not."""
    import time

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ztunnel.api.identity import SpiffeId

    key = ec.generate_private_key(ec.SECP256R1())
    forged_id = SpiffeId.parse("spiffe://east.mesh.local/ns/meshfed-system/sa/ztunnel.east.node-1")
    leaf = ctl.service.signing.cas["west.mesh.local"]._sign_leaf(forged_id, key.public_key(), time.time(), None)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    ctl.service.dist.set_desired({"ztunnel/east/node-1": make_config("ztunnel/east/node-1", "rev1", cluster="east")})
    async with secure_channel(ctl.target, ctl.roots, key_pem, leaf) as ch:
        err = await refused(first_response(ch, "ztunnel/east/node-1"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "forgery" in (err.details() or "") or "east.mesh.local" in (err.details() or "")
        # nor can it renew "its" certificate with the forged identity
        kc = generate_key_and_csr(str(forged_id))
        err = await refused(request_certificate(ch, "ztunnel/east/node-1", kc.csr_pem))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_identity_of_an_unfederated_trust_domain_is_refused(ctl: Ctl) -> None:
    evil = TrustDomainCA.create("evil.example")
    fake = evil.issue_svid("spiffe://evil.example/ns/meshfed-system/sa/ztunnel.east.node-1")
    async with secure_channel(ctl.target, ctl.roots, fake.key_pem, fake.chain_pem) as ch:
        err = await refused(first_response(ch, "ztunnel/east/node-1"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no fleet root signed it


async def test_no_certificate_is_refused(ctl: Ctl) -> None:
    async with secure_channel(ctl.target, ctl.roots) as ch:  # main port: client certificate required
        err = await refused(first_response(ch, "ztunnel/east/node-1"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    async with secure_channel(ctl.bootstrap, ctl.roots) as ch:  # bootstrap port: certificates only
        err = await refused(first_response(ch, "ztunnel/east/node-1"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bootstrap token" in (err.details() or "")


async def test_bootstrap_token_rules(ctl: Ctl) -> None:
    pid = "ztunnel/east/node-1"
    err = await refused(bootstrap_svid(ctl.bootstrap, pid, EAST_TD, ctl.roots, "not-the-token"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    # west's token cannot buy certificates for east's proxies
    err = await refused(bootstrap_svid(ctl.bootstrap, pid, EAST_TD, ctl.roots, ctl.tokens["west"]))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # a token buys the proxy's own identity only, not a workload's or another proxy's
    for identity in ("spiffe://east.mesh.local/ns/shop/sa/checkout",
                     proxy_spiffe_id(EAST_TD, "ztunnel/east/node-2")):
        kc = generate_key_and_csr(identity)
        async with secure_channel(ctl.bootstrap, ctl.roots) as ch:
            err = await refused(request_certificate(ch, pid, kc.csr_pem, bootstrap_token=ctl.tokens["east"]))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, identity
        assert "not entitled" in (err.details() or "")


async def test_ports_are_published_only_once_every_listener_bound(tmp_path: Path) -> None:
    """Review note (c): the config port was published before the bootstrap listener bound, so a
    failed bootstrap bind left a port that status, the driver and `serve` took for "listening"
    (a later `serve` returned it without ever starting the server)."""
    import asyncio
    import socket

    service = ConfigService(tmp_path / "state", insecure=False)
    service.ensure_cas(gitops.load_worktree(EXAMPLE_FLEET))
    server = config_server_for(service)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises((OSError, RuntimeError)):
            await serve(service, server, "127.0.0.1:0", f"127.0.0.1:{busy}")
    assert (server.port, server.bootstrap_port) == (0, 0) and server.counters()["port"] == 0
    try:
        # a retry serves both; a racing second call waits for it and returns the same ports
        first, second = await asyncio.gather(serve(service, server, "127.0.0.1:0", "127.0.0.1:0"),
                                             serve(service, server, "127.0.0.1:0", "127.0.0.1:0"))
        assert first == second == (server.port, server.bootstrap_port) and all(first)
        tokens = json.loads((tmp_path / "state" / BOOTSTRAP_TOKENS_FILE).read_text())
        roots = (tmp_path / "state" / CONTROLLER_ROOTS_FILE).read_bytes()
        svid = await bootstrap_svid(f"127.0.0.1:{server.bootstrap_port}", "ztunnel/east/node-1", EAST_TD, roots,
                                    tokens["east"])
        assert svid.identity == proxy_spiffe_id(EAST_TD, "ztunnel/east/node-1")
    finally:
        await server.stop(0)
        await service.stop()
