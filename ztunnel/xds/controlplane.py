"""A proxy connected to the controller: certificates by CSR, config by subscription, health upward.

`python -m ztunnel --controller HOST:PORT --bootstrap HOST:PORT --proxy-id ID --trust-domain TD
--controller-roots PEM (--sa-token-file F | --bootstrap-token-file F)` runs a node ztunnel or an
east-west gateway with nothing from an operator but a bootstrap credential and its trust domain's
roots (like a kubelet joining with a token and the cluster CA). The order of things, decided here,
acted on by `ControllerLink`:

1. Bootstrap: a fresh key and a CSR for the proxy's own identity (`proxy_spiffe_id`), signed by
   the controller's certificate service on its bootstrap port. The channel authenticates the
   *controller* (`ztunnel.xds.channel`: its SPIFFE ID `controller_spiffe_id(td)`, pinned, against
   this trust domain's roots only); the proxy authenticates with a bootstrap credential bound to
   it: its pod's projected ServiceAccount token (`--sa-token-file`, re-read every time: the kubelet
   refreshes it; the controller checks it with a TokenReview against this proxy's cluster and its
   node claim against the proxy id), or a hand-provisioned single-use token (`--bootstrap-token-file`,
   `meshfed controller bootstrap-token`). Either buys only that identity.
2. Subscribe over mTLS with that certificate (`ztunnel.xds.client.XdsClient`). Each pushed config
   is applied through `ControllerSink`: first the certificates of its `local_identities` (CSR
   each, entitled because the controller just rendered them for this proxy), then
   `ProxyState.apply` (validates per resource, persists the last good config), then the proxy
   re-reads it. A failure NACKs and the proxy keeps what it runs.
3. Health: `HealthReporter` is both the proxy's `HealthSink` (ejections, pushed by the outlier
   detectors) and the client's `HealthSource` (outcome counters since the previous report, read from
   the proxy's own `meshfed_endpoint_outcomes` counter, plus the current ejection flags).
4. Rotation: `CertManager` renews at half-life; renewed certificates replace the proxy's.

Recovering on its own (no hand work):
- the proxy's own certificate expired (a long partition), or the controller's TLS layer refuses it
  (its root was retired, the controller was rebuilt): the own identity is requested again on the
  bootstrap path with a fresh bootstrap credential, instead of retrying mTLS forever;
- the controller's roots rotated: they are learnt from every certificate response and every
  applied config (`ControllerTrust`), so a staged rotation never cuts the proxy off.

Restarts (`PersistedCredentials`): the proxy's keys and certificates (its own and its workloads')
and the learnt roots are kept in one 0600 file in its state directory, written atomically and
never through a link (`ztunnel.api.secret_files`), the way a kubelet keeps its client certificate
under /var/lib/kubelet/pki. A proxy restarted while the controller is unreachable reloads them with
its last good config and serves its pods at once, instead of failing closed until the controller
returns. Why this and not only "ask again": a node reboot must not become an outage of its pods
whenever the controller (or the management network) is down; the exposure is bounded — the file is
as protected as the process memory holding the same keys (root on the node can read either), only
identities entitled to this node are in it, each until its own not-after (the trust domain's
workloadCertTTL), and expired ones are dropped when read. A standby controller taking over the CA
would help only when a controller is reachable at all.

A lost controller changes nothing for traffic: the proxy keeps its last applied config and its
certificates until they expire, and `XdsClient` reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ztunnel.api.clock import calendar_now, calendar_wait_s
from ztunnel.api.config import ProxyConfig, ProxyMode, Stamp
from ztunnel.api.identity import IdentityError, ProxyId, check_trust_domain, proxy_spiffe_id
from ztunnel.api.outlier import EndpointEjected, EndpointUnejected
from ztunnel.api.proto import meshfed_pb2 as pb
from ztunnel.api.secret_files import SecretFileError, make_private_dir, read_secret, write_secret
from ztunnel.identity.certmanager import CertificateResponseError, CertManager
from ztunnel.xds.channel import ControllerBridge, ControllerTrust
from ztunnel.xds.client import Subscription, XdsClient, describe_error, request_certificate
from ztunnel.xds.state import ProxyState

OK_OUTCOMES = frozenset({"Success", "ConnectSuccess"})

logger = logging.getLogger(__name__)   # `log` is the name of the event callable below


def _level(fields: Mapping[str, Any]) -> int:
    return logging.WARNING if str(fields.get("event", "")).endswith(("failed", "pending")) else logging.INFO


class ControllerUnavailable(RuntimeError):
    """The controller could not be reached or refused us; the message says which and what to check."""


def header_for(proxy_id: str, trust_domain: str, network: str = "") -> ProxyConfig:
    """The hello's header: mode and cluster follow from the proxy id (`ztunnel/<c>/<node>`, `gateway/<c>`)."""
    pid = ProxyId.parse(proxy_id)   # IdentityError (a ValueError) names the shapes
    mode = {"gateway": ProxyMode.GATEWAY, "waypoint": ProxyMode.WAYPOINT,
            "ingress": ProxyMode.INGRESS}.get(pid.kind, ProxyMode.NODE)
    return ProxyConfig(proxy_id=str(pid), mode=mode, cluster=pid.cluster, network=network,
                       trust_domain=trust_domain, stamp=Stamp(0, "", 0))


class CredentialTarget(Protocol):
    """Where certificates go (the proxy's `Credentials`)."""

    def put(self, identity: str, chain_pem: bytes, key_pem: bytes) -> None: ...

    def has(self, identity: str) -> bool: ...


def issued_by_bundle(chain_pem: bytes, cfg: ProxyConfig, trust_domain: str) -> bool:
    """Whether the leaf of `chain_pem` is signed directly by an authority of `trust_domain`'s bundle
    in `cfg` (True when the config carries no bundle for it: nothing to judge by)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    from ztunnel.api.bundle import load_pem_certificates

    authorities = [c for b in cfg.bundles if b.trust_domain == trust_domain for pem in b.roots_pem
                   for c in load_pem_certificates(pem)]
    if not authorities:
        return True
    leaf = x509.load_pem_x509_certificate(chain_pem)
    for ca in authorities:
        try:
            leaf.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


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
                                                    if w.node == ProxyId.parse(cfg.proxy_id).node}))
        return ids or (self.own,)  # a node with no workloads still serves HBONE as itself

    def validate(self, config: ProxyConfig) -> list[str]:
        try:
            check_trust_domain(config.trust_domain)
        except IdentityError as e:
            return [f"trust domain: {e}"]
        return []

    async def ensure_certificates(self, cfg: ProxyConfig) -> None:
        wanted = self.identities_for(cfg)
        for identity in wanted:
            # a certificate whose issuer the trust domain no longer publishes (a retired root, a
            # controller rebuilt with new CAs) verifies nowhere: get a new one now, not at half-life
            held = self.certs.find_certificate(identity)
            if held is not None and not issued_by_bundle(held.chain_pem, cfg, cfg.trust_domain):
                self.certs.forget(identity)
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


# --- persisted credentials ------------------------------------------------------------------------

MAX_TOKEN_BYTES = 16 * 1024
CREDENTIALS_FORMAT = 1


class PersistedCredentials:
    """The proxy's keys, certificates and learnt controller roots in one file (see the module
    docstring for why). Written whole and atomically, 0600 from creation, never through a link;
    read only if it is a regular file of ours with no group/other access. A file that cannot be
    read is ignored (the proxy asks the controller again), never trusted in part."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._written = b""
        self.last_error = ""

    def load(self) -> tuple[dict[str, tuple[bytes, bytes]], bytes]:
        """(identity -> (chain PEM, key PEM), learnt roots PEM); empty when there is nothing usable."""
        try:
            raw = read_secret(self.path)
            data = json.loads(raw)
            if data.get("format") != CREDENTIALS_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {CREDENTIALS_FORMAT}")
            svids = {str(i): (str(v["chain_pem"]).encode(), str(v["key_pem"]).encode())
                     for i, v in dict(data.get("svids") or {}).items()}
            roots = str(data.get("controller_roots_pem") or "").encode()
        except FileNotFoundError:
            return {}, b""
        except (SecretFileError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.last_error = f"{self.path}: {e}; not used (the proxy asks the controller again)"
            return {}, b""
        self._written = raw
        return svids, roots

    def save(self, svids: dict[str, tuple[bytes, bytes]], roots_pem: bytes) -> None:
        data = json.dumps({"format": CREDENTIALS_FORMAT, "controller_roots_pem": roots_pem.decode("ascii"),
                           "svids": {i: {"chain_pem": c.decode("ascii"), "key_pem": k.decode("ascii")}
                                     for i, (c, k) in sorted(svids.items())}}, indent=1).encode()
        if data == self._written:
            return
        make_private_dir(self.path.parent)
        write_secret(self.path, data)
        self._written = data


# --- the link -------------------------------------------------------------------------------------


@dataclass
class LinkOptions:
    controller: str               # host:port of the controller's gRPC services (mTLS)
    bootstrap: str                # host:port of its bootstrap port (first certificate, bootstrap credential)
    proxy_id: str
    trust_domain: str
    bootstrap_token_file: Path | None   # hand-provisioned, single-use (`meshfed controller bootstrap-token`)
    controller_roots: Path | None       # the trust domain's roots: the first trust anchor (re-read each dial)
    network: str = ""
    sa_token_file: Path | None = None   # the pod's projected ServiceAccount token (preferred)
    credentials_file: Path | None = None  # PersistedCredentials (None: keys live in memory only)
    roots_wait_s: float = 120.0   # how long to wait for any root to verify the controller with
    health_interval_s: float = 0.5


class ControllerLink:
    """Owns the channels, the cert manager and the xDS client of one proxy.

    Invariants: the controller is only ever reached through the two bridges (each connection
    verified against `trust`); the own identity's certificate is served to the controller only
    while valid by `clock`; a bootstrap credential is presented only on the bootstrap port and only
    for the own identity."""

    def __init__(self, opts: LinkOptions, state: ProxyState, creds: CredentialTarget,
                 health: HealthReporter, log: Callable[..., None] | None = None,
                 clock: Callable[[], float] = calendar_now) -> None:
        from ztunnel.api.logsetup import event_log

        self.opts = opts
        self.state = state
        self.creds = creds
        self.health = health
        self.log = log if log is not None else event_log(logger, _level)
        self.clock = clock
        self.own = proxy_spiffe_id(opts.trust_domain, opts.proxy_id)
        self.trust = ControllerTrust(opts.trust_domain, opts.controller_roots)
        self.main = ControllerBridge(opts.controller, self.trust, self._own_svid, clock=clock,
                                     on_rejected=self._rejected)
        self.boot = ControllerBridge(opts.bootstrap, self.trust, clock=clock)
        self.certs = CertManager(self._sign, clock=clock)
        self.sink = ControllerSink(state, self.certs, creds, self.own, self._applied)
        self.persisted = PersistedCredentials(opts.credentials_file) if opts.credentials_file else None
        self.xds: XdsClient | None = None
        self._kick = asyncio.Event()
        self._own_refused = False     # the controller refused our own certificate: bootstrap it again
        self.bootstraps = 0           # own certificates obtained with a bootstrap credential
        self.restored: tuple[str, ...] = ()

    # -- credentials ---------------------------------------------------------------------------

    def _own_svid(self) -> tuple[bytes, bytes] | None:
        c = self.certs.find_certificate(self.own)
        return (c.chain_pem, c.key_pem) if c is not None else None

    def _rejected(self, why: str) -> None:
        """The controller refused our certificate (its TLS layer, or UNAUTHENTICATED): get the own
        identity again with the bootstrap credential rather than retrying the same one."""
        if not self._own_refused:
            self.log(kind="controller", event="certificate_refused", error=why)
        self._own_refused = True
        self.certs.request_renewal(self.own)
        self._kick.set()

    def _on_session_error(self, e: BaseException) -> None:
        if "UNAUTHENTICATED" in describe_error(e):
            self._rejected(describe_error(e))

    def bootstrap_credential(self) -> tuple[str, str]:
        """(service account token, bootstrap token): the projected token when its file has one
        (re-read every time: the kubelet replaces it before it expires), else the hand-made token."""
        for path, kind in ((self.opts.sa_token_file, "sa"), (self.opts.bootstrap_token_file, "token")):
            if path is None:
                continue
            try:
                with open(path, "rb") as f:
                    value = f.read(MAX_TOKEN_BYTES).decode("utf-8", "replace").strip()
            except OSError:
                continue
            if value:
                return (value, "") if kind == "sa" else ("", value)
        return "", ""

    def _accept(self, resp: Any) -> bytes:
        if self.trust.learn(b"".join(bytes(r) for r in resp.roots_pem)):
            self.log(kind="controller", event="roots_updated", trust_domain=self.opts.trust_domain)
        return b"".join(bytes(c) for c in resp.cert_chain_pem)

    async def _sign(self, csr_pem: bytes) -> bytes:
        """CertManager's signer. The own identity: over mTLS while our certificate is valid and
        not refused, else (or when that fails) with the bootstrap credential. Any other identity:
        over mTLS only (a bootstrap credential buys the own identity alone), after getting the own
        certificate back if it is missing or expired."""
        from cryptography import x509

        csr = x509.load_pem_x509_csr(csr_pem)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        is_own = [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)] == [self.own]
        if not is_own and self._own_svid() is None:
            await self.certs.fetch_certificate(self.own)
        if not is_own:
            return await self._sign_over_mtls(csr_pem)
        # the own identity: over mTLS with the current certificate first, unless it is expired or
        # was refused; then the bootstrap credential; and if that fails after a refusal (which may
        # have been a hiccup), mTLS after all: a proxy never gives up a path it still has
        mtls_first = self._own_svid() is not None and not self._own_refused
        attempts = ["mtls", "bootstrap"] if mtls_first else ["bootstrap", "mtls"]
        if self._own_svid() is None:
            attempts = ["bootstrap"]
        for i, how in enumerate(attempts):
            try:
                return await (self._sign_over_mtls(csr_pem) if how == "mtls" else self._bootstrap(csr_pem))
            except Exception as e:
                if i + 1 == len(attempts):
                    raise
                self.log(kind="controller", event="own_certificate_attempt_failed", path=how, error=describe_error(e))
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _sign_over_mtls(self, csr_pem: bytes) -> bytes:
        async with self.main.channel() as channel:
            chain = self._accept(await request_certificate(channel, self.opts.proxy_id, csr_pem))
        self._own_refused = False   # the controller knows our certificate after all
        return chain

    async def _bootstrap(self, csr_pem: bytes) -> bytes:
        sa_token, token = self.bootstrap_credential()
        if not (sa_token or token):
            raise ControllerUnavailable(
                f"{self.opts.proxy_id} has no valid certificate and no bootstrap credential: give it "
                f"--sa-token-file (its pod's projected ServiceAccount token) or --bootstrap-token-file "
                f"(`meshfed controller bootstrap-token --proxy-id {self.opts.proxy_id}`)")
        async with self.boot.channel() as channel:
            resp = await request_certificate(channel, self.opts.proxy_id, csr_pem,
                                             bootstrap_token=token, service_account_token=sa_token)
        chain = self._accept(resp)
        self._own_refused = False
        self.bootstraps += 1
        self.log(kind="controller", event="bootstrapped", identity=self.own,
                 credential="service account token" if sa_token else "bootstrap token")
        return chain

    def restore_credentials(self) -> tuple[str, ...]:
        """Adopt what a previous run persisted: certificates still valid (and for our keys) go to
        the cert manager and the proxy; expired ones are dropped. The identities restored."""
        if self.persisted is None:
            return ()
        svids, roots = self.persisted.load()
        if self.persisted.last_error:
            self.log(kind="controller", event="credentials_unreadable", error=self.persisted.last_error)
        if roots:
            self.trust.learn(roots)
        restored = []
        for identity, (chain, key) in sorted(svids.items()):
            try:
                self.certs.put(identity, chain, key)
            except (CertificateResponseError, IdentityError, ValueError) as e:
                self.log(kind="controller", event="credential_dropped", identity=identity, error=str(e))
                continue
            if identity != self.own:
                self.creds.put(identity, chain, key)
            restored.append(identity)
        self.restored = tuple(restored)
        if restored:
            self.log(kind="controller", event="credentials_restored", identities=len(restored))
        return self.restored

    def persist(self) -> None:
        """Write the current certificates and learnt roots (only when they changed)."""
        if self.persisted is None:
            return
        svids = {}
        for sid in self.certs.identities:
            c = self.certs.find_certificate(sid)
            if c is not None:
                svids[str(sid)] = (c.chain_pem, c.key_pem)
        try:
            self.persisted.save(svids, self.trust.learned_pem)
        except OSError as e:  # keep serving; a restart will ask the controller again
            self.log(kind="controller", event="credentials_not_persisted", error=str(e))

    def serves(self, identities: Iterable[str]) -> bool:
        """Whether every one of `identities` has a valid certificate right now."""
        return all(self.certs.find_certificate(i) is not None for i in identities)

    # -- steps ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.main.start()
        await self.boot.start()

    async def close(self) -> None:
        if self.xds is not None:
            self.xds.stop()
        await self.main.close()
        await self.boot.close()

    async def _wait_roots(self) -> None:
        deadline = time.monotonic() + self.opts.roots_wait_s
        while not self.trust.has_roots():
            if time.monotonic() > deadline:
                raise ControllerUnavailable(
                    f"{self.opts.controller_roots} did not appear within {self.opts.roots_wait_s:.0f} s: it holds the "
                    f"roots of {self.opts.trust_domain} to verify the controller with (the controller writes "
                    "roots/<trust-domain>.pem in its state directory at start); is `meshfed controller run` running?")
            await asyncio.sleep(0.2)

    async def bootstrap(self) -> None:
        """Roots, then the proxy's own certificate (retrying until the controller answers)."""
        await self._wait_roots()
        delay_s = 0.2
        while True:
            try:
                await self.certs.fetch_certificate(self.own)
                self.persist()
                return
            except Exception as e:
                detail = self.boot.explain(describe_error(e))
                self.log(kind="controller", event="bootstrap_failed", error=detail, retry_s=delay_s)
                self.certs.forget(self.own)   # drop the failure backoff: we pace retries here
                await asyncio.sleep(delay_s)
                delay_s = min(2.0, delay_s * 2)

    def _applied(self, cfg: ProxyConfig) -> None:
        own = [b for b in cfg.bundles if b.trust_domain == self.opts.trust_domain]
        if own and self.trust.learn("".join(own[0].roots_pem).encode()):
            self.log(kind="controller", event="roots_updated", trust_domain=self.opts.trust_domain, source="config")
        self.persist()
        self.log(kind="config", source="controller", applied=True, revision=cfg.stamp.revision[:12],
                 version=cfg.stamp.version, epoch=cfg.stamp.epoch)

    def subscribe(self) -> XdsClient:
        header = header_for(self.opts.proxy_id, self.opts.trust_domain, self.opts.network)
        self.xds = XdsClient(Subscription(header, self.state.config), self.sink, self.main.channel,
                             health=self.health, health_interval_s=self.opts.health_interval_s,
                             on_error=self._on_session_error, explain=self.main.explain)
        return self.xds

    async def run(self) -> None:
        """Bootstrap, then follow the controller until cancelled (the caller owns this task)."""
        await self.bootstrap()
        await self.subscribe().run()

    async def rotate(self) -> None:
        """Renew certificates at half-life (or at once when the controller refused ours); hand
        renewed ones to the proxy and persist them."""
        while True:
            self._kick.clear()
            for sid, err in await self.certs.renew_due(self.clock()):
                if err is not None:
                    self.log(kind="controller", event="renewal_failed", identity=str(sid), error=err)
            for sid in self.certs.identities:
                c = self.certs.find_certificate(sid)
                if c is not None and (str(sid) != self.own or self.creds.has(self.own)):
                    self.creds.put(str(sid), c.chain_pem, c.key_pem)
            self.persist()
            nxt = self.certs.next_due_s()
            # with a simulated calendar the date may jump past `nxt` meanwhile: look again within a second
            delay_s = calendar_wait_s(30.0 if nxt is None else min(30.0, max(0.5, nxt - self.clock())))
            try:
                await asyncio.wait_for(self._kick.wait(), delay_s)
            except TimeoutError:
                pass

    def wake(self) -> None:
        """Re-check the certificates now instead of at the next planned time (a clock that jumped)."""
        self._kick.set()



async def join_controller(opts: LinkOptions, state: ProxyState, creds: CredentialTarget,
                          log: Callable[..., None] | None = None, clock: Callable[[], float] = calendar_now,
                          ) -> tuple[ControllerLink, list[asyncio.Task[Any]]]:
    """Return once the proxy can serve: it has a config and the certificates of its identities.

    With a persisted last good config the proxy needs only its certificates: persisted ones that are
    still valid (a restart while the controller is unreachable serves at once), else from the
    controller; without one it waits for the first push. Bootstrap and the subscription run in
    the background either way. The returned tasks (link, rotation) belong to the caller, which
    cancels them at shutdown."""
    link = ControllerLink(opts, state, creds, HealthReporter(), log, clock)
    emit = link.log
    await link.start()
    link.restore_credentials()
    tasks = [asyncio.ensure_future(link.run()), asyncio.ensure_future(link.rotate())]

    def stopped(t: asyncio.Task[Any]) -> None:  # after start-up nobody awaits them: say why one ended
        if not t.cancelled() and t.exception() is not None:
            emit(kind="controller", event="link_stopped", error=describe_error(t.exception()))  # type: ignore[arg-type]

    for t in tasks:
        t.add_done_callback(stopped)
    delay_s = 0.2
    while True:
        if link.sink.first_applied.is_set():
            return link, tasks
        if state.config is not None:
            try:
                await link.sink.ensure_certificates(state.config)
                link.persist()
                return link, tasks
            except Exception as e:  # not entitled yet (the controller has not rendered us): retry
                emit(kind="controller", event="certificates_pending", error=describe_error(e))
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise ControllerUnavailable(describe_error(t.exception()))  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(link.sink.first_applied.wait(), delay_s)
        except TimeoutError:
            delay_s = min(2.0, delay_s * 2)
