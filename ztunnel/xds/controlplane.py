"""A proxy connected to the controller: certificates by CSR, config by subscription, health upward.

`python -m ztunnel --controller HOST:PORT --proxy-id ID --trust-domain TD --bootstrap-token-file F
--controller-roots PEM` runs a node ztunnel or an east-west gateway without any file from an
operator but the bootstrap token and the controller's roots (like a kubelet joining with a kubeadm
token and the cluster CA). The order of things, decided here, acted on by `ControllerLink`:

1. Bootstrap: a fresh key and a CSR for the proxy's own identity (`ztunnel.api.identity.proxy_spiffe_id`),
   signed by the controller's certificate service on its bootstrap port, over TLS that
   authenticates the *controller* (its roots; its serving certificate names
   `ztunnel.api.identity.CONTROLLER_TLS_NAME`) and the proxy by its cluster's bootstrap token. The token
   buys only that identity; renewals of it go over mTLS like every other CSR.
2. Subscribe on an mTLS channel with that certificate (`ztunnel.xds.client.XdsClient`). Each config the
   controller pushes is applied through `ControllerSink`: first the certificates of its
   `local_identities` (CSR each, entitled because the controller just rendered them for this
   proxy), then `ProxyState.apply` (validates per resource, persists the last good config), then
   the proxy re-reads it. A failure NACKs and the proxy keeps what it runs.
3. Health: `HealthReporter` is both the proxy's `HealthSink` (ejections, pushed by the outlier
   detectors) and the client's `HealthSource` (outcome counters since the previous report, read from
   the proxy's own `meshfed_endpoint_outcomes` counter, plus the current ejection flags).
4. Rotation: `CertManager` renews at half-life; renewed certificates replace the proxy's.

Private keys live only in this process's memory (no key file): a restarted proxy asks again.
A lost controller changes nothing for traffic: the proxy keeps its last applied config and its
certificates until they expire, and `XdsClient` reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ztunnel.api.config import ProxyConfig, ProxyMode, Stamp
from ztunnel.api.identity import IdentityError, check_trust_domain, parse_proxy_id, proxy_spiffe_id
from ztunnel.api.outlier import EndpointEjected, EndpointUnejected
from ztunnel.api.proto import meshfed_pb2 as pb
from ztunnel.identity.certmanager import CertManager
from ztunnel.xds.client import Subscription, XdsClient, describe_error, request_certificate, secure_channel
from ztunnel.xds.state import ProxyState

OK_OUTCOMES = frozenset({"Success", "ConnectSuccess"})


class ControllerUnavailable(RuntimeError):
    """The controller could not be reached or refused us; the message says which and what to check."""


def header_for(proxy_id: str, trust_domain: str, network: str = "") -> ProxyConfig:
    """The hello's header: mode and cluster follow from the proxy id (`ztunnel/<c>/<node>`, `gateway/<c>`)."""
    kind, cluster = parse_proxy_id(proxy_id)
    mode = {"gateway": ProxyMode.GATEWAY, "waypoint": ProxyMode.WAYPOINT,
            "ingress": ProxyMode.INGRESS}.get(kind, ProxyMode.NODE)
    return ProxyConfig(proxy_id=proxy_id, mode=mode, cluster=cluster, network=network,
                       trust_domain=trust_domain, stamp=Stamp(0, "", 0))


class CredentialTarget(Protocol):
    """Where certificates go (the proxy's `Credentials`)."""

    def put(self, identity: str, chain_pem: bytes, key_pem: bytes) -> None: ...


class ConfigTarget(Protocol):
    def on_config_applied(self) -> None: ...


# --- health -------------------------------------------------------------------------------------


@dataclass
class HealthReporter:
    """HealthSink (ejection events in) and HealthSource (EndpointOutcome messages out).

    Outcome counts are deltas of the proxy's `meshfed_endpoint_outcomes` counter between two
    drains, so the data path pays nothing extra; `counter` is that prometheus Counter (or None).
    An endpoint whose ejection state changed is reported even without new outcomes."""

    counter: Any = None
    ejected_until_mono_s: dict[str, float] = field(default_factory=dict)   # endpoint -> until (monotonic)
    _last: dict[tuple[str, str, str], float] = field(default_factory=dict)
    _service_of: dict[str, str] = field(default_factory=dict)
    _changed: set[str] = field(default_factory=set)

    def report(self, proxy_id: str, event: EndpointEjected | EndpointUnejected | dict[str, Any]) -> None:
        if isinstance(event, EndpointEjected) and event.enforced:
            self.ejected_until_mono_s[event.key] = event.until_s
            self._changed.add(event.key)
        elif isinstance(event, EndpointUnejected):
            self.ejected_until_mono_s.pop(event.key, None)
            self._changed.add(event.key)

    def retain_endpoints(self, live: set[tuple[str, str]]) -> None:
        """The config no longer routes to the endpoints outside `live`: forget them (their metric
        series go too, `Telemetry.retain_endpoints`, so `_last` follows at the next drain)."""
        uids = {ep for _svc, ep in live}
        for ep in [e for e in self.ejected_until_mono_s if e not in uids]:
            del self.ejected_until_mono_s[ep]
        for ep in [e for e in self._service_of if e not in uids]:
            del self._service_of[ep]
        self._changed &= uids
        self._last = {k: v for k, v in self._last.items() if (k[0], k[1]) in live}

    def _totals(self) -> dict[tuple[str, str, str], float]:
        out: dict[tuple[str, str, str], float] = {}
        if self.counter is None:
            return out
        for metric in self.counter.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    lb = s.labels
                    out[(lb.get("destination_service", ""), lb.get("endpoint", ""), lb.get("outcome", ""))] = s.value
        return out

    def drain_outcomes(self) -> list[Any]:
        totals = self._totals()
        per: dict[tuple[str, str], list[int]] = {}
        for (svc, ep, outcome), v in totals.items():
            self._service_of[ep] = svc
            d = int(v - self._last.get((svc, ep, outcome), 0.0))
            if d > 0:
                slot = per.setdefault((svc, ep), [0, 0])
                slot[0 if outcome in OK_OUTCOMES else 1] += d
        self._last = totals
        for ep in self._changed:
            per.setdefault((self._service_of.get(ep, ""), ep), [0, 0])
        self._changed.clear()
        now_mono, now = time.monotonic(), time.time()
        out = []
        for (svc, ep), (ok, failed) in sorted(per.items()):
            until = self.ejected_until_mono_s.get(ep)
            ejected = until is not None and until > now_mono
            out.append(pb.EndpointOutcome(
                service=svc, workload_uid=ep, cluster=ep.split("/", 1)[0], ok=ok, failed=failed, ejected=ejected,
                ejected_until_s=now + (until - now_mono) if ejected and until is not None else 0.0))
        return out


# --- config sink --------------------------------------------------------------------------------


class ControllerSink:
    """Applies pushed configs: certificates of the config's identities first, then the state."""

    def __init__(self, state: ProxyState, certs: CertManager, creds: CredentialTarget,
                 own: str, on_applied: Callable[[ProxyConfig], None] | None = None) -> None:
        self.state, self.certs, self.creds, self.own = state, certs, creds, own
        self.target: ConfigTarget | None = None
        self.on_applied = on_applied
        self.first_applied = asyncio.Event()

    def identities_for(self, cfg: ProxyConfig) -> tuple[str, ...]:
        ids = cfg.local_identities or tuple(sorted({w.identity for w in cfg.workloads
                                                    if w.node == cfg.proxy_id.rsplit("/", 1)[-1]}))
        return ids or (self.own,)  # a node with no workloads still serves HBONE as itself

    def validate(self, config: ProxyConfig) -> list[str]:
        try:
            check_trust_domain(config.trust_domain)
        except IdentityError as e:
            return [f"trust domain: {e}"]
        return []

    async def ensure_certificates(self, cfg: ProxyConfig) -> None:
        wanted = self.identities_for(cfg)
        certs = await asyncio.gather(*(self.certs.fetch_certificate(i) for i in wanted))
        for c in certs:
            self.creds.put(str(c.identity), c.chain_pem, c.key_pem)
        for sid in self.certs.identities:
            if str(sid) not in wanted and str(sid) != self.own:
                self.certs.forget(sid)

    async def apply(self, config: ProxyConfig) -> None:
        await self.ensure_certificates(config)
        result = self.state.apply(config)
        if not result.applied:
            raise ValueError(result.reason)
        if self.target is not None:
            self.target.on_config_applied()
        if self.on_applied is not None:
            self.on_applied(config)
        self.first_applied.set()


# --- the link -------------------------------------------------------------------------------------


@dataclass
class LinkOptions:
    controller: str               # host:port of the controller's gRPC services (mTLS)
    bootstrap: str                # host:port of its bootstrap port (first certificate, with the token)
    proxy_id: str
    trust_domain: str
    bootstrap_token_file: Path | None
    controller_roots: Path        # PEM roots that issued the controller's serving certificate
    network: str = ""
    roots_wait_s: float = 120.0   # how long to wait for the roots file (the controller writes it)
    health_interval_s: float = 0.5


class ControllerLink:
    """Owns the channels, the cert manager and the xDS client of one proxy."""

    def __init__(self, opts: LinkOptions, state: ProxyState, creds: CredentialTarget,
                 health: HealthReporter, log: Callable[..., None]) -> None:
        self.opts = opts
        self.state = state
        self.creds = creds
        self.health = health
        self.log = log
        self.own = proxy_spiffe_id(opts.trust_domain, opts.proxy_id)
        self._roots = b""
        self._own_cert: tuple[bytes, bytes] | None = None   # (chain, key) of the proxy's own SVID
        self.certs = CertManager(self._sign)
        self.sink = ControllerSink(state, self.certs, creds, self.own, self._applied)
        self.xds: XdsClient | None = None

    # -- channels ------------------------------------------------------------------------------

    def _channel(self, with_client_cert: bool) -> Any:
        if with_client_cert and self._own_cert is not None:
            chain, key = self._own_cert
            return secure_channel(self.opts.controller, self._roots, key, chain)
        return secure_channel(self.opts.bootstrap, self._roots)

    async def _sign(self, csr_pem: bytes) -> bytes:
        """CertManager's signer: bootstrap token for the proxy's own identity, mTLS after that."""
        bootstrap = self._own_cert is None
        token = ""
        if bootstrap and self.opts.bootstrap_token_file is not None:
            token = self.opts.bootstrap_token_file.read_text().strip()
        channel = self._channel(with_client_cert=not bootstrap)
        try:
            resp = await request_certificate(channel, self.opts.proxy_id, csr_pem, bootstrap_token=token)
        finally:
            await channel.close()
        return b"".join(bytes(c) for c in resp.cert_chain_pem)

    # -- steps ---------------------------------------------------------------------------------

    async def _wait_roots(self) -> None:
        deadline = time.monotonic() + self.opts.roots_wait_s
        path = self.opts.controller_roots
        while not path.exists() or not path.read_bytes().strip():
            if time.monotonic() > deadline:
                raise ControllerUnavailable(f"{path} did not appear within {self.opts.roots_wait_s:.0f} s: it holds "
                                            "the controller's CA roots (the controller writes it at start); is "
                                            "`meshfed controller run` running with this state directory?")
            await asyncio.sleep(0.2)
        self._roots = path.read_bytes()

    async def bootstrap(self) -> None:
        """Roots, then the proxy's own certificate (retrying until the controller answers)."""
        await self._wait_roots()
        delay_s = 0.2
        while True:
            try:
                cert = await self.certs.fetch_certificate(self.own)
                self._own_cert = (cert.chain_pem, cert.key_pem)
                self.log(kind="controller", event="bootstrapped", identity=self.own, controller=self.opts.controller)
                return
            except Exception as e:
                self.log(kind="controller", event="bootstrap_failed", error=describe_error(e), retry_s=delay_s)
                self.certs.forget(self.own)   # drop the failure backoff: we pace retries here
                self._roots = self.opts.controller_roots.read_bytes()  # the controller may have rotated
                await asyncio.sleep(delay_s)
                delay_s = min(2.0, delay_s * 2)

    def _applied(self, cfg: ProxyConfig) -> None:
        self.log(kind="config", source="controller", applied=True, revision=cfg.stamp.revision[:12],
                 version=cfg.stamp.version, epoch=cfg.stamp.epoch)

    def subscribe(self) -> XdsClient:
        header = header_for(self.opts.proxy_id, self.opts.trust_domain, self.opts.network)
        self.xds = XdsClient(Subscription(header, self.state.config), self.sink,
                             lambda: self._channel(with_client_cert=True),
                             health=self.health, health_interval_s=self.opts.health_interval_s)
        return self.xds

    async def rotate(self) -> None:
        """Renew certificates at half-life; hand renewed ones to the proxy."""
        while True:
            await self.certs.renew_due(time.time())
            for sid in self.certs.identities:
                c = self.certs.find_certificate(sid)
                if c is None:
                    continue
                if str(sid) == self.own:
                    self._own_cert = (c.chain_pem, c.key_pem)
                else:
                    self.creds.put(str(sid), c.chain_pem, c.key_pem)
            nxt = self.certs.next_due_s()
            await asyncio.sleep(30.0 if nxt is None else min(30.0, max(0.5, nxt - time.time())))


async def join_controller(opts: LinkOptions, state: ProxyState, creds: CredentialTarget,
                          log: Callable[..., None]) -> tuple[ControllerLink, list[asyncio.Task[Any]]]:
    """Bootstrap, subscribe, and return once the proxy has a config and its certificates.

    With a persisted last good config the proxy needs only its certificates (the controller may
    have nothing new to push); without one it waits for the first push. The returned tasks (xDS
    client, rotation) belong to the caller, which cancels them at shutdown."""
    link = ControllerLink(opts, state, creds, HealthReporter(), log)
    await link.bootstrap()
    client = link.subscribe()
    tasks = [asyncio.ensure_future(client.run()), asyncio.ensure_future(link.rotate())]
    delay_s = 0.2
    while True:
        if link.sink.first_applied.is_set():
            return link, tasks
        if state.config is not None:
            try:
                await link.sink.ensure_certificates(state.config)
                return link, tasks
            except Exception as e:  # not entitled yet (the controller has not rendered us): retry
                log(kind="controller", event="certificates_pending", error=describe_error(e))
        try:
            await asyncio.wait_for(link.sink.first_applied.wait(), delay_s)
        except TimeoutError:
            delay_s = min(2.0, delay_s * 2)
