"""mTLS on the config protocol, on loopback: bootstrap credential -> SVID -> subscription, and refusals.

The controller's config service (`federation.controller.config_service.ConfigService`, a plain
class; no Ray needed here) is served by its gRPC adapter (`federation.server.grpc_services`) with
TLS and the CAs of the example fleet. Simulated proxies are real `XdsClient`s over
`ztunnel.xds.client.secure_channel` (gRPC's own TLS, the SNI/DNS name `controller_tls_name(td)`
picking the controller's certificate of that trust domain): these tests play clients, good and bad;
how a proxy pins the controller's SPIFFE ID is tests/integration/controller/test_proxy_link.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import gitops
from benchmarks.simproxy import SimProxy, make_config
from federation.controller.ca import TrustDomainCA
from federation.controller.config_service import TRUST_ANCHORS_DIR, ConfigService
from federation.server.grpc_services import (
    ConfigServer,
    ConnectionLimits,
    config_server_for,
    serve,
    wait_until,
)
from ztunnel.api.codec import CONFIG_METHOD, HEALTH_METHOD
from ztunnel.api.identity import controller_tls_name, generate_key_and_csr, proxy_spiffe_id
from ztunnel.api.proto import meshfed_pb2 as pb
from ztunnel.xds.client import Svid, bootstrap_svid, request_certificate, secure_channel

EXAMPLE_FLEET = Path(__file__).resolve().parents[3] / "examples" / "fleet"
EAST_TD = "east.mesh.local"
EAST_NAME = controller_tls_name(EAST_TD)


class Clock:
    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


class Ctl:
    def __init__(self, service: ConfigService, server: ConfigServer, state: Path, clock: Clock) -> None:
        self.service, self.server, self.clock = service, server, clock
        self.target = f"127.0.0.1:{server.port}"
        self.bootstrap = f"127.0.0.1:{server.bootstrap_port}"
        self.roots = (state / TRUST_ANCHORS_DIR / f"{EAST_TD}.pem").read_bytes()

    def token(self, proxy_id: str) -> str:
        """What `meshfed controller bootstrap-token --proxy-id` prints (per proxy, single-use)."""
        return self.service.bootstrap.create(proxy_id)

    async def svid(self, proxy_id: str, td: str = EAST_TD) -> Svid:
        return await bootstrap_svid(self.bootstrap, proxy_id, td, self.roots, self.token(proxy_id))

    def channel(self, key: bytes | None = None, chain: bytes | None = None, target: str = "") -> Any:
        return secure_channel(target or self.target, self.roots, key, chain, target_name=EAST_NAME)

    @contextlib.asynccontextmanager
    async def synced_proxy(self, proxy_id: str) -> AsyncIterator[tuple[SimProxy, Svid]]:
        """A proxy of east with its first certificate (from its bootstrap token), subscribed over
        mTLS and holding its config at revision "rev1"; stopped at the end."""
        svid = await self.svid(proxy_id)
        self.service.dist.set_desired({proxy_id: make_config(proxy_id, "rev1", cluster="east")})
        proxy = SimProxy(proxy_id, self.target, cluster="east",
                         channel_factory=svid.channel_factory(self.target, EAST_NAME)).start()
        try:
            assert await wait_until(lambda: proxy.revision == "rev1", 10), proxy.client.last_error
            yield proxy, svid
        finally:
            await proxy.stop()


@contextlib.asynccontextmanager
async def serving_controller(tmp_path: Path, limits: ConnectionLimits = ConnectionLimits()) -> AsyncIterator[Ctl]:
    """The example fleet's config service, served with TLS on loopback (`limits`: per connection)."""
    state = tmp_path / "state"
    clock = Clock()
    service = ConfigService(state, insecure=False, clock=clock)
    service.ensure_cas(gitops.load_worktree(EXAMPLE_FLEET))
    server = config_server_for(service, limits=limits)
    await serve(service, server, "127.0.0.1:0")
    try:
        yield Ctl(service, server, state, clock)
    finally:
        await server.stop(0)
        await service.stop()


@pytest.fixture()
async def ctl(tmp_path: Path) -> AsyncIterator[Ctl]:
    async with serving_controller(tmp_path) as c:
        yield c


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
    proxy = SimProxy(pid, ctl.target, cluster="east", channel_factory=svid.channel_factory(ctl.target, EAST_NAME)).start()
    try:
        assert await wait_until(lambda: proxy.revision == "rev1", 10), proxy.client.last_error

        def status() -> dict[str, Any]:
            return {s["proxy"]: s for s in ctl.service.dist.status()}[pid]
        # the proxy runs rev1 before its ACK reaches the controller: SYNCED follows the ACK
        assert await wait_until(lambda: status()["sync"] == "SYNCED", 5), status()
        assert status()["identity"] == svid.identity
        # renewal over mTLS: the proxy's own identity, no token needed
        kc = generate_key_and_csr(svid.identity)
        async with svid.channel_factory(ctl.target, EAST_NAME)() as ch:
            resp = await request_certificate(ch, pid, kc.csr_pem)
        assert resp.cert_chain_pem
    finally:
        await proxy.stop()


async def test_another_proxys_identity_is_refused(ctl: Ctl) -> None:
    node2 = await ctl.svid("ztunnel/east/node-2")
    ctl.service.dist.set_desired({"ztunnel/east/node-2": make_config("ztunnel/east/node-2", "rev1", cluster="east")})
    async with node2.channel_factory(ctl.target, EAST_NAME)() as ch:
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
    async with ctl.channel(fake.key_pem, fake.chain_pem) as ch:
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
    async with ctl.channel(key_pem, leaf) as ch:
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
    async with ctl.channel(fake.key_pem, fake.chain_pem) as ch:
        err = await refused(first_response(ch, "ztunnel/east/node-1"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no fleet root signed it


async def test_no_certificate_is_refused(ctl: Ctl) -> None:
    async with ctl.channel() as ch:  # main port: client certificate required
        err = await refused(first_response(ch, "ztunnel/east/node-1"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    async with ctl.channel(target=ctl.bootstrap) as ch:  # bootstrap port: certificates only
        err = await refused(first_response(ch, "ztunnel/east/node-1"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bootstrap credential" in (err.details() or "")


async def test_bootstrap_token_rules(ctl: Ctl) -> None:
    pid = "ztunnel/east/node-1"
    err = await refused(bootstrap_svid(ctl.bootstrap, pid, EAST_TD, ctl.roots, "not-the-token"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    # another proxy's token (same cluster, even) cannot buy certificates for this one
    err = await refused(bootstrap_svid(ctl.bootstrap, pid, EAST_TD, ctl.roots, ctl.token("ztunnel/east/node-2")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not a valid bootstrap token for ztunnel/east/node-1" in (err.details() or "")
    # a token buys the proxy's own identity only, not a workload's or another proxy's
    token = ctl.token(pid)
    for identity in ("spiffe://east.mesh.local/ns/shop/sa/checkout",
                     proxy_spiffe_id(EAST_TD, "ztunnel/east/node-2")):
        kc = generate_key_and_csr(identity)
        async with ctl.channel(target=ctl.bootstrap) as ch:
            err = await refused(request_certificate(ch, pid, kc.csr_pem, bootstrap_token=token))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, identity
        assert "not entitled" in (err.details() or "")
    # ... which those refusals did not use up; the first certificate does
    first = await bootstrap_svid(ctl.bootstrap, pid, EAST_TD, ctl.roots, token)
    assert first.identity == proxy_spiffe_id(EAST_TD, pid)
    err = await refused(bootstrap_svid(ctl.bootstrap, pid, EAST_TD, ctl.roots, token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # single-use


async def test_a_bootstrap_token_expires(ctl: Ctl) -> None:
    pid = "gateway/east"
    token = ctl.service.bootstrap.create(pid, ttl_s=600)
    ctl.clock.offset_s = 601
    err = await refused(bootstrap_svid(ctl.bootstrap, pid, EAST_TD, ctl.roots, token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in (err.details() or "")


async def test_concurrent_uses_of_one_token_get_one_certificate(ctl: Ctl) -> None:
    pid = "ztunnel/east/node-1"
    token = ctl.token(pid)
    results = await asyncio.gather(*(bootstrap_svid(ctl.bootstrap, pid, EAST_TD, ctl.roots, token) for _ in range(5)),
                                   return_exceptions=True)
    assert sum(isinstance(r, Svid) for r in results) == 1, results


async def test_a_second_subscriber_with_another_certificate_cannot_displace_a_connected_proxy(ctl: Ctl) -> None:
    """Before: the newest stream of a proxy id won, whoever opened it. Now a subscriber with another
    certificate (even for the same identity, say bought with a leaked token) is refused while the
    proxy's stream is open; the proxy itself reconnecting with its certificate is not."""
    pid = "ztunnel/east/node-1"
    mine, other = await ctl.svid(pid), await ctl.svid(pid)
    assert mine.identity == other.identity and mine.chain_pem != other.chain_pem
    ctl.service.dist.set_desired({pid: make_config(pid, "rev1", cluster="east")})
    proxy = SimProxy(pid, ctl.target, cluster="east", channel_factory=mine.channel_factory(ctl.target, EAST_NAME)).start()
    try:
        assert await wait_until(lambda: proxy.revision == "rev1", 10), proxy.client.last_error
        async with ctl.channel(other.key_pem, other.chain_pem) as ch:
            err = await refused(first_response(ch, pid))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "another certificate" in (err.details() or "")
        assert ctl.server.counters()["displacements_refused"] == 1
        # the connected proxy kept its stream: the next revision reaches it on the same connection
        connects = proxy.client.connects
        ctl.service.dist.set_desired({pid: make_config(pid, "rev2", cluster="east", seed=1)})
        assert await wait_until(lambda: proxy.revision == "rev2", 10), proxy.client.last_error
        assert proxy.client.connects == connects
        # the same certificate reconnecting (its old connection is dead) takes the stream over
        async with ctl.channel(mine.key_pem, mine.chain_pem) as ch:
            resp = await first_response(ch, pid)
        assert resp.stamp.revision == "rev2"
    finally:
        await proxy.stop()


def _served_certificate(target: str, roots: bytes, server_name: str) -> bytes:
    """The leaf a fresh TLS handshake gets from the controller (DER)."""
    import socket

    ctx = ssl.create_default_context(cadata=roots.decode())
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der
    return der


async def test_the_serving_certificate_is_renewed_at_half_life_without_dropping_streams(ctl: Ctl) -> None:
    """Before: one certificate minted at start with the workload TTL, never renewed: after a day
    no proxy could connect. Now the controller renews at half-life (the injected clock moved past
    it here) and swaps the certificate for new handshakes; open config streams go on."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    for ca in ctl.service.signing.cas.values():  # a short TTL keeps the re-issued one valid in real time
        ca.workload_ttl_s = 120.0
    ctl.service.signing._serving = None
    first = ctl.service.signing.serving()
    pid = "ztunnel/east/node-1"
    async with ctl.synced_proxy(pid) as (proxy, svid):
        connects = proxy.client.connects
        old_leaf = _served_certificate(ctl.target, ctl.roots, EAST_NAME)
        ctl.clock.offset_s = 61.0                       # past half of 120 s
        assert "half of its life" in ctl.service.renew_serving_certificates()
        second = ctl.service.signing.serving()
        assert second.generation == first.generation + 1
        new_leaf = _served_certificate(ctl.target, ctl.roots, EAST_NAME)   # a new handshake: the new one
        assert new_leaf != old_leaf
        east = second.identities.index("spiffe://east.mesh.local/ns/meshfed-system/sa/meshfed-controller")
        assert new_leaf == x509.load_pem_x509_certificate(second.pairs[east][1]).public_bytes(Encoding.DER)
        # the open stream was not dropped: the next push arrives on the same connection
        ctl.service.dist.set_desired({pid: make_config(pid, "rev2", cluster="east", seed=1)})
        assert await wait_until(lambda: proxy.revision == "rev2", 10), proxy.client.last_error
        assert proxy.client.connects == connects
        # and a new connection works with the swapped certificate
        async with svid.channel_factory(ctl.target, EAST_NAME)() as ch:
            kc = generate_key_and_csr(svid.identity)
            assert (await request_certificate(ch, pid, kc.csr_pem)).cert_chain_pem


async def test_each_trust_domain_gets_its_own_controller_certificate_by_sni(ctl: Ctl, tmp_path: Path) -> None:
    from cryptography import x509

    from ztunnel.api.verify import peer_spiffe_ids

    state = tmp_path / "state"
    for td in ("east.mesh.local", "west.mesh.local", "south.mesh.local"):
        roots = (state / TRUST_ANCHORS_DIR / f"{td}.pem").read_bytes()
        leaf = x509.load_der_x509_certificate(_served_certificate(ctl.target, roots, controller_tls_name(td)))
        assert peer_spiffe_ids(leaf) == [f"spiffe://{td}/ns/meshfed-system/sa/meshfed-controller"]


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
        token = service.bootstrap.create("ztunnel/east/node-1")
        roots = (tmp_path / "state" / TRUST_ANCHORS_DIR / f"{EAST_TD}.pem").read_bytes()
        svid = await bootstrap_svid(f"127.0.0.1:{server.bootstrap_port}", "ztunnel/east/node-1", EAST_TD, roots,
                                    token)
        assert svid.identity == proxy_spiffe_id(EAST_TD, "ztunnel/east/node-1")
    finally:
        await server.stop(0)
        await service.stop()


class SlowReviewer:
    """A cluster's API server that takes its time: counts the reviews asked and how many ran at once."""

    lock = __import__("threading").Lock()
    running = peak = calls = 0

    def __init__(self, cluster: str, kubeconfig: str | None, context: str) -> None:
        self.cluster = cluster

    def review(self, token: str, audiences: list[str]) -> Any:
        from clusters.kube.auth import TokenReviewResult

        cls = SlowReviewer
        with cls.lock:
            cls.calls += 1
            cls.running += 1
            cls.peak = max(cls.peak, cls.running)
        time.sleep(0.5)
        with cls.lock:
            cls.running -= 1
        return TokenReviewResult(False, error="invalid signature")


async def test_token_reviews_are_bounded_per_source_and_in_flight_and_junk_ids_never_reach_them(
        tmp_path: Path) -> None:
    """Review finding 6: anyone who reaches the bootstrap port can make the controller ask an API
    server for a TokenReview. A flood of distinct JWT-shaped tokens from one address gets at most
    `burst` reviews, never more than `max_in_flight` at once (the excess is refused at once with
    RESOURCE_EXHAUSTED, not queued), and a request whose proxy id is not a proxy id is refused before
    any review or log line quotes it."""
    from federation.controller.bootstrap_gate import BootstrapAdmission

    service = ConfigService(tmp_path / "state", insecure=False, kubeconfig="/kc", token_reviewer=SlowReviewer)
    service.ensure_cas(gitops.load_worktree(EXAMPLE_FLEET))
    server = ConfigServer(service.dist, signer=service.signing, authenticate_bootstrap=service.authenticate_bootstrap,
                          consume_bootstrap=service.consume_bootstrap, authorize=service.signing.authorize,
                          verify_peer=service.signing.verify_client,
                          bootstrap_admission=BootstrapAdmission(rate_per_s=0.01, burst=6, max_in_flight=3))
    await serve(service, server, "127.0.0.1:0")
    roots = (tmp_path / "state" / TRUST_ANCHORS_DIR / f"{EAST_TD}.pem").read_bytes()
    boot = f"127.0.0.1:{server.bootstrap_port}"
    try:
        async def attempt(i: int, proxy_id: str = "ztunnel/east/node-1") -> grpc.StatusCode:
            err = await refused(bootstrap_svid(boot, proxy_id, EAST_TD, roots, service_account_token=f"h.junk{i}.s"))
            return err.code()

        codes = await asyncio.gather(*(attempt(i) for i in range(10)))
        assert SlowReviewer.peak <= 3, SlowReviewer.peak
        assert SlowReviewer.calls <= 6, SlowReviewer.calls
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 4, codes
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED}, codes
        calls = SlowReviewer.calls
        forged = "ztunnel/east/node-1\n2026-12-03T00:00:00.000Z INFO    federation.controller.signing: issued"
        kc = generate_key_and_csr(proxy_spiffe_id(EAST_TD, "ztunnel/east/node-1"))
        async with secure_channel(boot, roots, target_name=EAST_NAME) as ch:
            err = await refused(request_certificate(ch, forged, kc.csr_pem, service_account_token="h.junk99.s"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a proxy id" in (err.details() or "")
        assert SlowReviewer.calls == calls
    finally:
        await server.stop(0)
        await service.stop()


async def test_a_stream_ends_when_the_certificate_that_opened_it_expires(ctl: Ctl) -> None:
    """Before: TLS checked the client certificate only in the handshake, so config and health
    streams opened with a certificate stayed authorised after it expired (a stolen proxy key with
    a stream open received config for as long as the connection lived). Now each stream is bound
    to its certificate's not-after on the calendar and ended there, with UNAVAILABLE ("reconnect");
    a reconnect with the same, expired, certificate is refused."""
    from federation.server.grpc_services import not_after_from_pem

    pid = "ztunnel/east/node-1"
    stolen = await ctl.svid(pid)          # never renewed: what a thief with the key holds
    not_after_s = not_after_from_pem(stolen.chain_pem)
    ctl.service.dist.set_desired({pid: make_config(pid, "rev1", cluster="east")})
    proxy = SimProxy(pid, ctl.target, cluster="east",
                     channel_factory=stolen.channel_factory(ctl.target, EAST_NAME)).start()
    health_channel = stolen.channel_factory(ctl.target, EAST_NAME)()
    health = health_channel.stream_unary(HEALTH_METHOD, request_serializer=pb.HealthReport.SerializeToString,
                                         response_deserializer=pb.HealthSummary.FromString)()
    try:
        await health.write(pb.HealthReport(proxy_id=pid))
        assert await wait_until(lambda: proxy.revision == "rev1", 10), proxy.client.last_error
        assert await wait_until(lambda: ctl.server.health_reports == 1, 5)
        ctl.clock.offset_s = not_after_s - time.time() - 30.0          # 30 s to go: the streams go on
        ctl.service.dist.set_desired({pid: make_config(pid, "rev2", cluster="east", seed=1)})
        assert await wait_until(lambda: proxy.revision == "rev2", 10), proxy.client.last_error
        assert ctl.server.counters()["streams_expired"] == 0
        connects = proxy.client.connects
        ctl.clock.offset_s = not_after_s - time.time() + 1.0           # the calendar passes its not-after
        assert await wait_until(lambda: ctl.server.counters()["streams_expired"] == 2, 5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "certificate that authenticated this health stream expired" in (err.value.details() or "")
        # the holder of the expired certificate reconnects, and is refused: no more config
        assert await wait_until(lambda: "UNAUTHENTICATED" in proxy.client.last_error, 10), proxy.client.last_error
        assert "expired" in proxy.client.last_error and proxy.client.connects > connects
        ctl.service.dist.set_desired({pid: make_config(pid, "rev3", cluster="east", seed=2)})
        await asyncio.sleep(1.0)
        assert proxy.revision == "rev2"
        st = {s["proxy"]: s for s in ctl.service.dist.status()}[pid]
        assert not st["connected"] and st["sync"] == "STALE"
    finally:
        await proxy.stop()
        await health_channel.close()
