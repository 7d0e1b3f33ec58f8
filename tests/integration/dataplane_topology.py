"""Test topology for the data plane on loopback: trust domains, workloads, services, configs.

Addresses live in 127.55.0.0/16 (all loopback): nodes 127.55.<cluster>.1x, pods 127.55.<cluster>.1xx,
gateways 127.55.<cluster>.250. Certificates come from federation.controller.ca (tests may import it)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from federation.controller.ca import TrustDomainCA
from ztunnel.api.config import (
    Authorization,
    Endpoint,
    OutlierPolicy,
    ProxyConfig,
    ProxyMode,
    Service,
    ServicePortMap,
    Stamp,
    TrustBundle,
    Workload,
    proxy_config_to_dict,
)

_CAS: dict[str, TrustDomainCA] = {}


def ca(td: str) -> TrustDomainCA:
    if td not in _CAS:
        _CAS[td] = TrustDomainCA.create(td)
    return _CAS[td]


def svid(identity: str, td: str | None = None) -> tuple[bytes, bytes]:
    """(chain pem, key pem) for identity, issued by the CA of `td` (default: the identity's own).
    A `td` other than the identity's own is a forgery (the CA's public API refuses; we sign directly)."""
    own = identity.split("/")[2]
    if td is None or td == own:
        issued = ca(own).issue_svid(identity)
        return issued.chain_pem, issued.key_pem
    import time

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ztunnel.api.identity import SpiffeId
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca(td)._sign_leaf(SpiffeId.parse(identity), key.public_key(), time.time(), None)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return chain, key_pem


def bundle(td: str) -> TrustBundle:
    return ca(td).trust_bundle()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ident(td: str, ns: str, sa: str) -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{sa}"


@dataclass
class Pod:
    cluster: str
    node: str
    name: str
    address: str
    identity: str
    namespace: str = "default"
    network: str = ""
    node_address: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def workload(self) -> Workload:
        return Workload(uid=f"{self.cluster}/{self.namespace}/{self.name}", name=self.name,
                        namespace=self.namespace, cluster=self.cluster, network=self.network or self.cluster,
                        node=self.node, address=self.address, identity=self.identity,
                        service_account=self.identity.rsplit("/", 1)[-1], node_address=self.node_address,
                        labels=dict(self.labels))


def endpoint(p: Pod, port: int, hbone_port: int, *, via_gateway: str = "", tier: int = 0,
             gateway_identity: str = "") -> Endpoint:
    """`via_gateway`: reached through that gateway, whose outer tunnel must present `gateway_identity`."""
    if via_gateway:
        return Endpoint(workload_uid=p.workload().uid, cluster=p.cluster, network=p.network or p.cluster,
                        address="", port=port, hbone_address="", gateway=via_gateway, identity="", tier=tier,
                        gateway_identity=gateway_identity)
    return Endpoint(workload_uid=p.workload().uid, cluster=p.cluster, network=p.network or p.cluster,
                    address=p.address, port=port, hbone_address=f"{p.node_address}:{hbone_port}",
                    identity=p.identity, tier=tier)


def service(hostname: str, vip: str, port: int, target_port: int, endpoints: Iterable[Endpoint],
            sans: Iterable[str] = (), outlier: OutlierPolicy | None = None, connect_timeout_s: float = 0.5) -> Service:
    name, ns = hostname.split(".")[:2]
    return Service(hostname=hostname, namespace=ns, name=name, vip=vip,
                   ports=(ServicePortMap(port, target_port),), endpoints=tuple(endpoints),
                   subject_alt_names=tuple(sans), outlier=outlier, connect_timeout_s=connect_timeout_s)


def proxy_config(proxy_id: str, cluster: str, td: str, *, mode: ProxyMode = ProxyMode.NODE,
                 workloads: Iterable[Workload] = (), services: Iterable[Service] = (),
                 authorizations: Iterable[Authorization] = (), bundles: Iterable[str] = (),
                 local_identities: Iterable[str] = (), version: int = 1, network: str = "") -> ProxyConfig:
    return ProxyConfig(proxy_id=proxy_id, mode=mode, cluster=cluster, network=network or cluster,
                       trust_domain=td, stamp=Stamp(1, "test", version), workloads=tuple(workloads),
                       services=tuple(services), authorizations=tuple(authorizations),
                       bundles=tuple(bundle(b) for b in bundles), local_identities=tuple(local_identities))


def write_cert_dir(d: Path, svids: dict[str, tuple[bytes, bytes]]) -> Path:
    from ztunnel.__main__ import cert_file_names
    d.mkdir(parents=True, exist_ok=True)
    for identity, (chain, key) in svids.items():
        crt, k = cert_file_names(identity)
        (d / crt).write_bytes(chain)
        (d / k).write_bytes(key)
        (d / k).chmod(0o600)
    return d


def write_config(path: Path, cfg: ProxyConfig | dict[str, Any]) -> Path:
    data = cfg if isinstance(cfg, dict) else proxy_config_to_dict(cfg)
    path.write_text(json.dumps(data))
    return path


def with_version(cfg: ProxyConfig, version: int) -> ProxyConfig:
    return replace(cfg, stamp=Stamp(cfg.stamp.epoch, cfg.stamp.revision, version))


# --- plain endpoints --------------------------------------------------------------------------


class EchoServer:
    """TCP echo on host:port; `prefix` is prepended to every reply (tells which backend answered)."""

    def __init__(self, host: str, port: int = 0, prefix: bytes = b"") -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.accepted = 0

    async def start(self) -> EchoServer:
        self.server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(w)
        try:
            while data := await r.read(65536):
                w.write(self.prefix + data)
                await w.drain()
            w.write_eof()
            await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    def kill_connections(self) -> None:
        """Abort every accepted connection with RST (a crashed backend)."""
        import struct
        for w in self.writers:
            if w.transport.is_closing():
                continue
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.kill_connections()
            await self.server.wait_closed()


async def socks_connect(socks: tuple[str, int], dest_host: str, dest_port: int, source_ip: str,
                        timeout_s: float = 3.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection through the SOCKS5 listener from `source_ip`; raises ConnectionRefusedError
    with the SOCKS reply code when the proxy refuses."""
    r, w = await asyncio.wait_for(asyncio.open_connection(*socks, local_addr=(source_ip, 0)), timeout_s)
    try:
        is_ip = all(p.isdigit() for p in dest_host.split("."))
        if is_ip:
            addr = b"\x01" + socket.inet_aton(dest_host)
        else:
            addr = b"\x03" + bytes([len(dest_host)]) + dest_host.encode()
        w.write(b"\x05\x01\x00" + b"\x05\x01\x00" + addr + dest_port.to_bytes(2, "big"))
        greet = await asyncio.wait_for(r.readexactly(2), timeout_s)
        assert greet == b"\x05\x00"
        rep = await asyncio.wait_for(r.readexactly(10), timeout_s)
    except BaseException:
        w.close()
        raise
    if rep[1] != 0:
        w.close()
        raise ConnectionRefusedError(rep[1], f"SOCKS reply {rep[1]}")
    return r, w
