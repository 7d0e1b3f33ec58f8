"""A proxy's link to the controller, on loopback, against the real config service and an emulated
Kubernetes API server per cluster (no Ray): how a proxy gets, keeps and gets back its credentials.

- it bootstraps with its pod's projected ServiceAccount token, which the controller has the
  proxy's own cluster review (TokenRequest and TokenReview on the emulated API server);
- it verifies the controller by its SPIFFE ID against its own trust domain's roots, not by a DNS
  name an organisation's PKI could issue to anyone;
- an expired certificate, a rotated root and a restart during an outage each recover on their
  own: the clocks of the controller and the proxy are injected and moved, never slept through
  (certificates live 120 s here so that a moved clock stays within real-time validity, which the
  TLS layers still check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import gitops
from benchmarks.simproxy import make_config
from clusters.lab.apiserver import EmulatedApiServer
from federation.controller.config_service import TRUST_ANCHORS_DIR, ConfigService
from federation.server.grpc_services import ConfigServer, config_server_for, serve, wait_until
from gitops.model import CaRoot, ConfigSnapshot
from ztunnel.api.codec import CERT_METHOD, CONFIG_METHOD
from ztunnel.api.config import ProxyConfig
from ztunnel.api.identity import controller_spiffe_id, controller_tls_name
from ztunnel.api.logsetup import fields_of
from ztunnel.api.proto import meshfed_pb2 as pb
from ztunnel.proxy.base import Credentials
from ztunnel.xds.controlplane import ControllerLink, HealthReporter, LinkOptions, join_controller
from ztunnel.xds.state import ProxyState

pytestmark = pytest.mark.timeout(120)

EXAMPLE_FLEET = Path(__file__).resolve().parents[3] / "examples" / "fleet"
EAST_TD = "east.mesh.local"
NODE1 = "ztunnel/east/node-1"
CHECKOUT = "spiffe://east.mesh.local/ns/shop/sa/checkout"
TTL_S = 120.0


class Clock:
    """The time of the controller and the proxy, moved by the test."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


def proxy_pods(api: EmulatedApiServer) -> None:
    """What the DaemonSet and the gateway Deployment would have created (see clusters.lab.kubelet)."""
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "meshfed-system"}})
    api.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ztunnel", "namespace": "meshfed-system"}})
    for node in ("node-1", "node-2"):
        api.apply({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"ztunnel-{node}", "namespace": "meshfed-system", "uid": f"uid-{node}"},
                   "spec": {"nodeName": node, "hostNetwork": True, "serviceAccountName": "ztunnel", "containers": []}})


@dataclass
class World:
    tmp: Path
    clock: Clock
    apis: dict[str, EmulatedApiServer]
    service: ConfigService
    server: ConfigServer
    snap: ConfigSnapshot

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.server.bootstrap_port}"

    def sa_token(self, pod: str = "ztunnel-node-1", cluster: str = "east") -> Path:
        """The pod's projected token file, as the kubelet writes it."""
        token, _ = self.apis[cluster].request_token("meshfed-system", "ztunnel", pod, ["meshfed-controller"])
        path = self.tmp / f"sa-token-{cluster}-{pod}"
        path.write_text(token)
        return path

    def anchor(self, name: str = "anchor.pem") -> Path:
        """A copy of east's roots as they are now (a mounted ConfigMap that nobody updates)."""
        path = self.tmp / name
        path.write_bytes((self.tmp / "state" / TRUST_ANCHORS_DIR / f"{EAST_TD}.pem").read_bytes())
        return path

    def options(self, proxy_id: str = NODE1, sa_token: Path | None = None, anchor: Path | None = None,
                state: str = "proxy") -> LinkOptions:
        return LinkOptions(self.target, self.bootstrap, proxy_id, EAST_TD, None, anchor or self.anchor(),
                           sa_token_file=sa_token, credentials_file=self.tmp / state / "credentials.json",
                           roots_wait_s=5.0, health_interval_s=0.2)

    def desire(self, revision: str, seed: int = 0, identities: tuple[str, ...] = (CHECKOUT,)) -> ProxyConfig:
        cfg = replace(make_config(NODE1, revision, cluster="east", seed=seed), trust_domain=EAST_TD,
                      local_identities=identities,
                      bundles=(self.service.signing.cas[EAST_TD].trust_bundle(),))
        self.service.dist.set_desired({NODE1: cfg})
        return cfg

    async def restart_server(self) -> None:
        """The controller process restarts on the same ports and state: every stream is dropped."""
        port, bport = self.server.port, self.server.bootstrap_port
        await self.server.stop(0)
        self.server = config_server_for(self.service)
        await serve(self.service, self.server, f"127.0.0.1:{port}", f"127.0.0.1:{bport}")

    def synced(self, revision: str) -> bool:
        st = {p["proxy"]: p for p in self.service.dist.status()}.get(NODE1, {})
        return st.get("sync") == "SYNCED" and st.get("acked_revision") == revision


@pytest.fixture()
def apis(tmp_path: Path) -> Iterator[tuple[dict[str, EmulatedApiServer], Path]]:
    kubeconfig = tmp_path / "kubeconfig"
    servers: dict[str, EmulatedApiServer] = {}
    try:
        for c in ("east", "west"):
            servers[c] = EmulatedApiServer().start()
            servers[c].write_kubeconfig(kubeconfig, f"lab-{c}")
            proxy_pods(servers[c])
        yield servers, kubeconfig
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture()
async def world(tmp_path: Path, apis: tuple[dict[str, EmulatedApiServer], Path]) -> AsyncIterator[World]:
    clock = Clock()
    service = ConfigService(tmp_path / "state", clock=clock, kubeconfig=str(apis[1]))
    snap = gitops.load_worktree(EXAMPLE_FLEET)
    service.ensure_cas(snap)
    for ca in service.signing.cas.values():
        ca.workload_ttl_s = TTL_S
    server = config_server_for(service)
    await serve(service, server, "127.0.0.1:0")
    w = World(tmp_path, clock, apis[0], service, server, snap)
    try:
        yield w
    finally:
        await w.server.stop(0)
        await service.stop()


async def joined(w: World, opts: LinkOptions, state: ProxyState | None = None,
                 creds: Credentials | None = None) -> tuple[ControllerLink, list[asyncio.Task[Any]], Credentials]:
    creds = creds or Credentials({})
    link, tasks = await asyncio.wait_for(
        join_controller(opts, state or ProxyState(opts.credentials_file.parent / "last-good.json")  # type: ignore[union-attr]
                        , creds, lambda **_kw: None, w.clock), 20)
    return link, tasks, creds


async def leave(link: ControllerLink, tasks: list[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await link.close()


# --- bootstrap with the pod's ServiceAccount token ------------------------------------------------


async def test_a_proxy_bootstraps_with_its_service_account_token_and_pins_the_controller(world: World) -> None:
    world.desire("rev1")
    link, tasks, creds = await joined(world, world.options(sa_token=world.sa_token()))
    try:
        assert link.bootstraps == 1 and creds.has(CHECKOUT)
        assert await wait_until(lambda: world.synced("rev1"), 10)
        # both ports were reached through the verifying bridge, which saw the pinned identity
        assert link.main.last_peer == link.boot.last_peer == controller_spiffe_id(EAST_TD)
        assert link.main.verification_failures == link.boot.verification_failures == 0
        st = {p["proxy"]: p for p in world.service.dist.status()}[NODE1]
        assert st["identity"] == "spiffe://east.mesh.local/ns/meshfed-system/sa/ztunnel.east.node-1"
    finally:
        await leave(link, tasks)


@pytest.mark.parametrize(("proxy_id", "pod", "cluster", "why"), [
    ("ztunnel/east/node-2", "ztunnel-node-1", "east", "node-1"),          # node-1's pod as node-2's proxy
    (NODE1, "ztunnel-node-1", "west", "not accepted"),                    # west's API server minted it
])
async def test_a_service_account_token_buys_only_its_own_nodes_proxy(world: World, proxy_id: str, pod: str,
                                                                    cluster: str, why: str) -> None:
    from ztunnel.xds.client import bootstrap_svid

    roots = world.anchor().read_bytes()
    token = world.sa_token(pod, cluster).read_text()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await bootstrap_svid(world.bootstrap, proxy_id, EAST_TD, roots, service_account_token=token)
    assert err.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
    assert why in (err.value.details() or "")


async def test_an_expired_or_deleted_pods_token_is_refused(world: World) -> None:
    from ztunnel.xds.client import bootstrap_svid

    roots = world.anchor().read_bytes()
    token = world.sa_token().read_text()
    world.apis["east"].tokens.clock = lambda: time.time() + 3601   # the API server's clock: past its expiry
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await bootstrap_svid(world.bootstrap, NODE1, EAST_TD, roots, service_account_token=token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in (err.value.details() or "")
    world.apis["east"].tokens.clock = time.time
    world.apis["east"].delete("v1", "Pod", "meshfed-system", "ztunnel-node-1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await bootstrap_svid(world.bootstrap, NODE1, EAST_TD, roots, service_account_token=token)
    assert "no longer exists" in (err.value.details() or "")


# --- the controller's identity is pinned ------------------------------------------------------------


class Impostor:
    """A gRPC server at some address answering CSRs with whatever certificate it was given."""

    def __init__(self, key_pem: bytes, chain_pem: bytes) -> None:
        self.key_pem, self.chain_pem = key_pem, chain_pem
        self.calls = 0
        self.server: Any = None
        self.port = 0

    async def start(self) -> Impostor:
        async def sign(req: Any, _ctx: Any) -> Any:
            self.calls += 1
            return pb.CertificateResponse()

        self.server = grpc.aio.server()
        service, method = CERT_METHOD.strip("/").split("/")
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {
            method: grpc.unary_unary_rpc_method_handler(sign, request_deserializer=pb.CertificateRequest.FromString,
                                                        response_serializer=pb.CertificateResponse.SerializeToString)}),))
        self.port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(self.key_pem, self.chain_pem)]))
        await self.server.start()
        return self


def _org_pki_certificate(dns_name: str, uri: str = "") -> tuple[bytes, bytes, bytes]:
    """(key, chain, org root) of an organisation's PKI: a server certificate for `dns_name`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from federation.controller.ca import generate_root

    org = generate_root("org.example", "org-root")
    assert org.key is not None
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(dns_name)] + ([x509.UniformResourceIdentifier(uri)] if uri else [])
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(org.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(org.cert.not_valid_before_utc).not_valid_after(org.cert.not_valid_after_utc)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(org.key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            leaf.public_bytes(pem), org.cert.public_bytes(pem))


@pytest.mark.parametrize("uri", ["", "spiffe://east.mesh.local/ns/shop/sa/checkout"])
async def test_a_certificate_with_the_controllers_dns_name_from_another_pki_is_not_the_controller(
        world: World, uri: str) -> None:
    """With a plug-in CA, the roots a proxy trusts include an organisation's root, which may have
    issued the controller's DNS name to anyone. gRPC's own check (a DNS name against the pool)
    accepts such an impostor; the proxy's pinned SPIFFE ID does not."""
    from ztunnel.xds.client import request_certificate, secure_channel

    name = controller_tls_name(EAST_TD)
    key, chain, org_root = _org_pki_certificate(name, uri)
    impostor = await Impostor(key, chain).start()
    anchor = world.tmp / "anchor-with-org-root.pem"
    anchor.write_bytes(world.anchor().read_bytes() + org_root)
    try:
        # the old way: gRPC verifies the DNS name against the pooled roots, and talks to the impostor
        async with secure_channel(f"127.0.0.1:{impostor.port}", anchor.read_bytes(), target_name=name) as ch:
            await request_certificate(ch, NODE1, b"csr")
        assert impostor.calls == 1
        # the proxy's link: verification fails after the handshake, before a byte of gRPC is sent
        opts = replace(world.options(sa_token=world.sa_token(), anchor=anchor),
                       bootstrap=f"127.0.0.1:{impostor.port}", controller=f"127.0.0.1:{impostor.port}")
        link = ControllerLink(opts, ProxyState(), Credentials({}), HealthReporter(), lambda **_kw: None, world.clock)
        await link.start()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(link.bootstrap(), 3.0)
            assert impostor.calls == 1 and link.boot.verification_failures >= 1
            assert "failed verification" in link.boot.last_error
        finally:
            await link.close()
    finally:
        await impostor.server.stop(0)


# --- recovering on its own ---------------------------------------------------------------------------


async def test_an_expired_certificate_falls_back_to_the_bootstrap_path(world: World) -> None:
    """Before: a proxy whose certificate expired (a partition longer than its TTL) retried mTLS
    with it forever. Now it asks again with its (refreshed) ServiceAccount token."""
    world.desire("rev1")
    sa = world.sa_token()
    link, tasks, _creds = await joined(world, world.options(sa_token=sa))
    try:
        assert await wait_until(lambda: world.synced("rev1"), 10)
        own = link.certs.find_certificate(link.own)
        assert own is not None and link.bootstraps == 1
        world.clock.offset_s = own.not_after_s - time.time() + 1.0     # both clocks: past its not-after
        sa.write_text(world.sa_token().read_text())                    # the kubelet refreshed the token
        await world.restart_server()                                   # the stream reconnects ...
        world.desire("rev2", seed=1)
        # ... is refused (expired), and the proxy bootstraps again instead of retrying mTLS
        assert await wait_until(lambda: world.synced("rev2"), 30), link.xds.last_error if link.xds else ""
        assert link.bootstraps >= 2   # (a restart's dropped connection may look like a refusal: one more)
        renewed = link.certs.find_certificate(link.own)
        assert renewed is not None and renewed.not_after_s > own.not_after_s
    finally:
        await leave(link, tasks)


def _with_east_roots(snap: ConfigSnapshot, *roots: CaRoot) -> ConfigSnapshot:
    td = snap.trust_domains[EAST_TD]
    return replace(snap, trust_domains={**snap.trust_domains, EAST_TD: replace(td, ca=replace(td.ca, roots=roots))})


async def test_a_staged_root_rotation_does_not_cut_the_proxy_off(world: World) -> None:
    """Before: a proxy read the controller's roots once; after the switch to a new root it could
    not verify the controller any more, and after the retirement the controller no longer knew
    the proxy's certificate. Now it learns roots from certificate responses and configs, and
    bootstraps again when its certificate is refused. The anchor file is never updated here."""
    world.desire("rev1")
    link, tasks, _creds = await joined(world, world.options(sa_token=world.sa_token()))
    try:
        assert await wait_until(lambda: world.synced("rev1"), 10)
        # publish root-2: the controller's bundle (pushed in the config) carries it
        world.service.ensure_cas(_with_east_roots(world.snap, CaRoot("root-1", True), CaRoot("root-2", False)))
        world.desire("rev2", seed=1)
        assert await wait_until(lambda: world.synced("rev2"), 10)
        assert link.trust.updates >= 2   # learnt from the first certificate, then from the config
        # switch: the controller's certificate now chains to root-2, which the anchor does not have
        world.service.ensure_cas(_with_east_roots(world.snap, CaRoot("root-1", False), CaRoot("root-2", True)))
        await world.restart_server()
        world.desire("rev3", seed=2)
        assert await wait_until(lambda: world.synced("rev3"), 20), link.main.last_error
        # retire root-1: the proxy's own certificate, if still from root-1 (a slow run may have renewed
        # it at half-life meanwhile), is refused; it bootstraps again
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature

        root1 = next(r.cert for r in world.service.signing.cas[EAST_TD].roots if r.name == "root-1")
        root2 = next(r.cert for r in world.service.signing.cas[EAST_TD].roots if r.name == "root-2")
        own = link.certs.find_certificate(link.own)
        assert own is not None
        try:
            x509.load_pem_x509_certificate(own.chain_pem).verify_directly_issued_by(root1)
            own_from_root1, bootstraps = True, link.bootstraps
        except (InvalidSignature, ValueError):   # ValueError: issued by a root of another subject (root-2)
            own_from_root1, bootstraps = False, link.bootstraps
        world.service.ensure_cas(_with_east_roots(world.snap, CaRoot("root-2", True)))
        await world.restart_server()
        world.desire("rev4", seed=3)
        assert await wait_until(lambda: world.synced("rev4"), 30), link.main.last_error
        assert link.bootstraps > bootstraps or not own_from_root1
        # and the workload's certificate, from the retired root, was replaced with the new config,
        # not left to serve (unverifiable) until its half-life
        for identity in (link.own, CHECKOUT):
            held = link.certs.find_certificate(identity)
            assert held is not None
            x509.load_pem_x509_certificate(held.chain_pem).verify_directly_issued_by(root2)
    finally:
        await leave(link, tasks)


async def test_a_restart_while_the_controller_is_down_serves_from_persisted_credentials(world: World) -> None:
    """Before: a proxy restarted during a controller outage had its last good config on disk but
    no certificate (keys lived in memory only), so every connection of its pods failed until the
    controller came back. Now its keys and certificates are kept (0600) and reused while valid."""
    cfg = world.desire("rev1")
    opts = world.options(sa_token=world.sa_token())
    state = ProxyState(world.tmp / "proxy" / "last-good.json")
    link, tasks, _creds = await joined(world, opts, state)
    assert await wait_until(lambda: world.synced("rev1"), 10)
    await leave(link, tasks)
    stored = opts.credentials_file
    assert stored is not None
    st = os.lstat(stored)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    await world.server.stop(0)                                 # the controller is down ...
    restarted = ProxyState(world.tmp / "proxy" / "last-good.json")
    assert restarted.load_persisted() is not None and restarted.config is not None
    assert restarted.config.stamp.revision == cfg.stamp.revision and restarted.config.local_identities == (CHECKOUT,)
    t0 = time.monotonic()
    link2, tasks2, creds2 = await joined(world, opts, restarted)  # ... and the proxy restarts
    try:
        assert time.monotonic() - t0 < 5.0                     # served at once, not after the controller
        assert creds2.has(CHECKOUT) and set(link2.restored) == {link2.own, CHECKOUT}
        assert link2.bootstraps == 0
    finally:
        await leave(link2, tasks2)


async def test_a_restart_five_minutes_into_a_controller_outage_serves_from_persisted_credentials(
        world: World) -> None:
    """Issue 11 item 21's 5-minute outage, in injected time: the certificates live an hour here (the
    fleet's default is a day; this fixture's two minutes would expire inside the outage), the
    proxy's and controller's clock jumps 5 minutes while the controller is down, and the restarted
    proxy serves its pod's identity at once from what it persisted, without bootstrapping (it could
    not: no controller)."""
    for ca in world.service.signing.cas.values():
        ca.workload_ttl_s = 3600.0
    world.desire("rev1")
    opts = world.options(sa_token=world.sa_token())
    link, tasks, _creds = await joined(world, opts)
    assert await wait_until(lambda: world.synced("rev1"), 10)
    await leave(link, tasks)
    await world.server.stop(0)                                   # the controller goes down ...
    world.clock.offset_s = 5 * 60.0                              # ... for five minutes ...
    assert opts.credentials_file is not None
    restarted = ProxyState(opts.credentials_file.parent / "last-good.json")
    assert restarted.load_persisted() is not None               # its last good config, from disk
    t0 = time.monotonic()
    link2, tasks2, creds2 = await joined(world, opts, restarted)  # ... and the node restarts in it
    try:
        assert time.monotonic() - t0 < 5.0
        assert creds2.has(CHECKOUT) and set(link2.restored) == {link2.own, CHECKOUT}
        assert link2.bootstraps == 0
    finally:
        await leave(link2, tasks2)


async def test_persisted_credentials_past_their_expiry_are_not_used(world: World) -> None:
    world.desire("rev1")
    opts = world.options(sa_token=world.sa_token())
    link, tasks, _creds = await joined(world, opts)
    await leave(link, tasks)
    world.clock.offset_s = TTL_S + 1
    later = ControllerLink(opts, ProxyState(), Credentials({}), HealthReporter(), lambda **_kw: None, world.clock)
    assert later.restore_credentials() == ()


@pytest.mark.parametrize("with_certificate", [True, False])
async def test_a_controller_that_hangs_up_right_after_the_handshake_refused_our_certificate(
        world: World, with_certificate: bool) -> None:
    """With TLS 1.3 a server refuses a client certificate after the client's handshake is done, and
    its alert is often lost in the close: the bridge reads "silence, then hang-up" from a gRPC server
    (which always speaks first) as a refusal of the certificate it presented, and only then."""
    import ssl

    from ztunnel.identity.tls import _pem_path
    from ztunnel.xds.channel import ControllerBridge, ControllerTrust
    from ztunnel.xds.client import request_certificate

    tls = world.service.signing.serving()
    east = tls.identities.index(controller_spiffe_id(EAST_TD))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _pem_path(tls.pairs[east][1], "c") as c, _pem_path(tls.pairs[east][0], "k") as k:
        ctx.load_cert_chain(c, k)
    ctx.set_alpn_protocols(["h2"])

    async def hang_up(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    svid = world.service.signing.cas[EAST_TD].issue_svid(
        "spiffe://east.mesh.local/ns/meshfed-system/sa/ztunnel.east.node-1")
    refused: list[str] = []
    bridge = ControllerBridge(f"127.0.0.1:{port}", ControllerTrust(EAST_TD, world.anchor()),
                              (lambda: (svid.chain_pem, svid.key_pem)) if with_certificate else (lambda: None),
                              on_rejected=refused.append)
    await bridge.start()
    try:
        async with bridge.channel() as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await request_certificate(ch, NODE1, b"csr", timeout_s=3.0)
            assert bridge.last_peer == controller_spiffe_id(EAST_TD)   # the handshake and the pin were fine
            assert await wait_until(lambda: bool(refused), 2.0) is with_certificate, bridge.last_error
        assert bridge.rejections == len(refused)
    finally:
        await bridge.close()
        server.close()


async def test_a_closed_channel_closes_its_connection_to_the_controller(world: World) -> None:
    """A gRPC channel closed (each session and each certificate request closes its own) ends the
    bridge's TLS connection to the controller at once: TLS cannot carry a half-close, and the
    controller's side once stayed open until a keepalive ping found it, so connections piled up on
    both sides at every stream cut and renewal (the soak: +32 on the controller's config port)."""
    from ztunnel.xds.channel import ControllerBridge, ControllerTrust
    from ztunnel.xds.client import request_certificate

    bridge = ControllerBridge(world.bootstrap, ControllerTrust(EAST_TD, world.anchor()))
    await bridge.start()
    try:
        for _ in range(3):
            async with bridge.channel() as ch:
                with pytest.raises(grpc.aio.AioRpcError):   # no token: refused, but answered
                    await request_certificate(ch, NODE1, b"csr", timeout_s=5.0)
                assert len(bridge._tasks) == 1
            assert await wait_until(lambda: not bridge._tasks, 3.0), "the bridged connection is still open"
        assert bridge.connections == 3 and bridge.rejections == 0
    finally:
        await bridge.close()


async def test_a_closed_channel_ends_its_connection_while_a_call_of_it_is_still_referenced(world: World) -> None:
    """gRPC keeps a closed channel's connection for as long as one of the channel's call objects
    lives, and a stream the controller ended is often held by a reference cycle (the exception's
    traceback, its frame, the call) until the cycle collector runs: the soak found about 30 such
    connections at rest on the controller's config port, one per stream cut at a certificate's
    expiry. The channel owns its connections: closing it aborts them whatever Python still holds."""
    from ztunnel.xds.channel import ControllerBridge, ControllerTrust

    bridge = ControllerBridge(world.bootstrap, ControllerTrust(EAST_TD, world.anchor()))
    await bridge.start()
    try:
        channel = bridge.channel()
        call = channel.stream_stream(CONFIG_METHOD)()      # the bootstrap port ends it at once
        await call.code()
        assert len(bridge._tasks) == 1
        await channel.close()
        assert await wait_until(lambda: not bridge._tasks, 3.0), "the connection outlived its channel"
        assert call is not None                               # still referenced, on purpose
    finally:
        await bridge.close()


async def test_a_local_process_that_binds_names_next_to_the_bridge_cannot_stop_its_channels(world: World) -> None:
    """Each channel listens on an abstract name of its own, and every process of the network
    namespace can read bound names (/proc/net/unix). Names it could predict it could bind first,
    and the proxy could open no channel again: they are random, so squatting the obvious
    neighbours of a name in use changes nothing. A channel dropped without `close()` gives its
    listener up when it is collected."""
    import gc
    import socket as socket_mod

    from ztunnel.xds.channel import ControllerBridge, ControllerTrust
    from ztunnel.xds.client import request_certificate

    bridge = ControllerBridge(world.bootstrap, ControllerTrust(EAST_TD, world.anchor()))
    await bridge.start()
    squatters: list[socket_mod.socket] = []
    try:
        first = bridge.channel()
        name = next(iter(bridge._routes)).name
        assert name.startswith(bridge.name + "-") and len(name) >= len(bridge.name) + 33
        for guess in [f"{bridge.name}-{i}" for i in range(1, 9)] + [f"{name[:-1]}{c}" for c in "0123456789abcdef"]:
            sq = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
            squatters.append(sq)
            with contextlib.suppress(OSError):
                sq.bind("\0" + guess)
        async with bridge.channel() as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:   # no token: refused, but answered
                await request_certificate(ch, NODE1, b"csr", timeout_s=5.0)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(bridge._routes) == 1
        del first
        gc.collect()
        assert not bridge._routes
        probe = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
        squatters.append(probe)
        with pytest.raises(ConnectionRefusedError):            # nobody listens there any more
            probe.connect("\0" + name)
    finally:
        for sq in squatters:
            sq.close()
        await bridge.close()


async def test_a_hand_provisioned_proxy_joins_with_its_single_use_token_then_renews_over_mtls(world: World) -> None:
    world.desire("rev1")
    token_file = world.tmp / "bootstrap-token"
    token_file.write_text(world.service.bootstrap.create(NODE1) + "\n")
    opts = replace(world.options(), bootstrap_token_file=token_file)
    link, tasks, creds = await joined(world, opts)
    try:
        assert link.bootstraps == 1 and creds.has(CHECKOUT)
        assert world.service.bootstrap.pending() == {}            # used up by that first certificate
        first = link.certs.find_certificate(link.own)
        link.certs.request_renewal(link.own)                      # renewing needs no token: mTLS
        link.wake()
        assert await wait_until(lambda: link.certs.find_certificate(link.own) is not first, 10)
        assert link.bootstraps == 1
    finally:
        await leave(link, tasks)


async def test_a_calendar_days_ahead_of_the_real_clock_keeps_the_proxy_renewing(
        tmp_path: Path, apis: tuple[dict[str, EmulatedApiServer], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The soak's time travel on loopback (`ztunnel.api.clock`): the controller and the proxy read
    one calendar that runs days ahead of the real clock through an offset file, and moves in
    4-hour steps a second apart. The certificates are valid on the calendar and on the TLS layers'
    real clock (they start at the real clock); each identity renews at half its life *after it
    arrived* (not from its backdated not-before, which would renew on every tick); the controller's
    serving certificates renew the same way; the proxy stays SYNCED throughout."""
    from ztunnel.api import clock as calendar_mod

    offset = tmp_path / "calendar-offset"
    calendar = calendar_mod.CalendarClock(offset)
    monkeypatch.setattr(calendar_mod, "_calendar", calendar)
    ahead_s = 3 * 86400.0
    calendar_mod.write_offset(offset, ahead_s)
    service = ConfigService(tmp_path / "state", clock=calendar.now, kubeconfig=str(apis[1]))
    snap = gitops.load_worktree(EXAMPLE_FLEET)
    service.ensure_cas(snap)
    server = config_server_for(service)
    await serve(service, server, "127.0.0.1:0")
    w = World(tmp_path, Clock(), apis[0], service, server, snap)
    w.desire("rev1")
    creds = Credentials({})
    link, tasks = await asyncio.wait_for(join_controller(
        w.options(sa_token=w.sa_token()), ProxyState(tmp_path / "proxy" / "last-good.json"), creds,
        lambda **_kw: None, calendar.now), 20)
    try:
        assert await wait_until(lambda: w.synced("rev1"), 10)
        first = link.certs.find_certificate(link.own)
        assert first is not None and first.not_before_s <= time.time() < calendar.now() < first.not_after_s
        serving_before = service.signing.serving().generation
        seen: dict[str, set[float]] = {link.own: set(), CHECKOUT: set()}
        for step in range(1, 13):                   # two simulated days
            calendar_mod.write_offset(offset, ahead_s + step * 4 * 3600.0)
            await asyncio.sleep(1.0)
            for sid, not_afters in seen.items():
                c = link.certs.find_certificate(sid)
                assert c is not None, f"{sid} has no valid certificate at step {step}"
                not_afters.add(c.not_after_s)
        assert all(3 <= len(v) <= 6 for v in seen.values()), {k: len(v) for k, v in seen.items()}
        assert service.signing.serving().generation - serving_before >= 3
        assert w.synced("rev1") and link.bootstraps == 1
    finally:
        await leave(link, tasks)
        await server.stop(0)
        await service.stop()


async def test_a_stream_is_cut_at_its_certificates_expiry_and_the_renewed_certificate_keeps_config_flowing(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Before: the config stream, authenticated once in the TLS handshake, stayed authorised for
    as long as its connection lived, whatever happened to the certificate that opened it. Now it is
    ended when the calendar passes that certificate's not-after. A proxy renews at half-life, so
    it holds a valid certificate when its old stream is cut: it reconnects at once with the renewed
    one (a new handshake), is not mistaken for a refused certificate (no bootstrap), resumes from
    the version it ACKed (no push, no full state), and the next config reaches it with no failed
    delivery (no NACK, retry or ACK timeout)."""
    from federation.server.grpc_services import not_after_from_pem

    caplog.set_level(logging.INFO, logger="ztunnel.xds.client")
    world.desire("rev1")
    link, tasks, _creds = await joined(world, world.options(sa_token=world.sa_token()))
    try:
        assert await wait_until(lambda: world.synced("rev1"), 10)
        assert link.xds is not None
        first = link.certs.find_certificate(link.own)
        assert first is not None and link.bootstraps == 1
        session = world.service.dist.sessions[NODE1]
        connects = link.xds.connects
        # past half-life, before expiry: the proxy renews; its stream goes on on the old connection
        world.clock.offset_s = first.not_after_s - time.time() - 30.0
        link.wake()
        assert await wait_until(lambda: (c := link.certs.find_certificate(link.own)) is not None
                                and c.not_after_s > first.not_after_s, 10)
        renewed = link.certs.find_certificate(link.own)
        assert renewed is not None
        world.desire("rev2", seed=1)
        assert await wait_until(lambda: world.synced("rev2"), 10)
        assert link.xds.connects == connects and world.server.counters()["streams_expired"] == 0
        pushes = session.pushes
        # the calendar passes the first certificate's not-after: its stream is cut ...
        world.clock.offset_s = first.not_after_s - time.time() + 1.0
        assert await wait_until(lambda: world.server.counters()["streams_expired"] >= 1, 5)
        # ... and the proxy is back at once, with the renewed certificate, on the version it runs
        assert await wait_until(lambda: link.xds is not None and link.xds.connects > connects
                                and session.connected, 5), link.xds.last_error
        assert "certificate that authenticated this config stream expired" in link.xds.last_error
        # routine, not an outage: the proxy logs it at INFO, naming the reason the controller gave
        events = [(r.levelname, fields_of(r)) for r in caplog.records]
        assert ("INFO", {"event": "ControllerStreamEnded", "reason": "certificate-expired"}) in events, events
        assert not [f for _, f in events if f.get("event") == "ControllerLost"]
        import hashlib

        assert not_after_from_pem(renewed.chain_pem) == renewed.not_after_s
        leaf = renewed.chain_pem[:renewed.chain_pem.index(b"-----END CERTIFICATE-----") + 26]
        assert world.server._stream_certs[NODE1] == hashlib.sha256(leaf).hexdigest()
        await asyncio.sleep(0.5)
        assert session.pushes == pushes and world.synced("rev2")        # resumed: nothing resent
        assert link.bootstraps == 1                                     # not taken for a refusal
        world.desire("rev3", seed=2)
        assert await wait_until(lambda: world.synced("rev3"), 10)
        assert session.pushes == pushes + 1
        assert (session.nacks, session.retries, session.ack_timeouts, session.failures) == (0, 0, 0, 0)
        assert world.server.counters()["streams_expired"] <= 2          # config and health, once
    finally:
        await leave(link, tasks)
