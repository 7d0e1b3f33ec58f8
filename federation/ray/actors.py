"""The controller on Ray: the only module that imports `ray` and applies `ray.remote`.

`start_controller(opts)` joins a Ray cluster (`--ray-address`) or starts a local one (the embedded
default; dashboard off, few CPUs) and creates the actors, each a thin host around a plain class:

  GitSourceActor     federation.controller.sources.GitSource     follows the branch, sends snapshots (bytes)
  ClusterAgentActor  federation.controller.sources.ClusterAgent  one per cluster: discovery + lease (bytes)
  ReconcilerActor    federation.controller.reconciler           debounce, render (core), store, deltas out
  ConfigServerActor  federation.server.grpc_services + CA     gRPC config/certificate/health services

Data between actors is bytes: snapshots and observations pickled once by their producer,
configs as per-proxy *deltas* in the protocol's own protobuf encoding (the reconciler keeps what
it last sent to the config server and sends only differences), health reports as serialized
protobuf. Actors restart on failure (`max_restarts=-1`) and rebuild from durable state: the
config server bumps the epoch in the store and starts with no desired configs (its first delta
comes back as "resync", and the reconciler re-sends everything in full); a restarted reconciler
asks the driver for its inputs again (`missing_inputs`), which re-sends the snapshot and makes
every agent re-LIST its cluster — that is also what prunes endpoints removed while we were down.

The driver (`Controller`, the `meshfed controller run` process) supervises: it creates an agent
per cluster of the applied revision, aggregates status from all actors every `status_interval_s`
and serves the status API and /metrics (federation.server.status_api) from that cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from federation.controller.bootstrap import BootstrapTokens
from federation.controller.reconciler import CoreRender, Debouncer, EndpointReport, Reconciler
from federation.controller.sources import (
    ClusterAgent,
    FleetFailure,
    GitSource,
    decode_observation,
    decode_snapshot,
    encode_snapshot,
)
from federation.controller.store import Store
from gitops.model import ConfigSnapshot
from ztunnel.api.codec import decode_delta, encode_delta, template_from_header
from ztunnel.api.config import ProxyConfig, apply_delta, diff_configs
from ztunnel.api.proto import meshfed_pb2 as pb

UNLIMITED_BYTES = 1 << 40
PROXY_NAMESPACE = "meshfed-system"
CONTROLLER_ROOTS_FILE = "controller-roots.pem"    # public: what proxies verify the controller with


# --- bytes framing ------------------------------------------------------------------------------


def pack(messages: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(m)) + m for m in messages)


def unpack(blob: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(blob):
        (n,) = struct.unpack_from(">I", blob, i)
        out.append(blob[i + 4:i + 4 + n])
        i += 4 + n
    return out


# --- options --------------------------------------------------------------------------------------


@dataclass
class ControllerOptions:
    repo: str
    branch: str = "main"
    state_dir: str = ".meshfed"
    listen: str = "127.0.0.1:15010"
    status_listen: str = "127.0.0.1:15014"
    bootstrap_listen: str | None = None    # certificate service without client auth; None: listen host, any port
    ray_address: str | None = None
    kubeconfig: str | None = None
    insecure: bool = False                 # plaintext gRPC, proxy ids trusted: loopback tests only
    git_poll_interval_s: float | None = None
    debounce_after_s: float = 0.1
    debounce_max_s: float = 10.0
    watch_timeout_s: int | None = None
    status_interval_s: float = 0.5
    num_cpus: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


# --- actors (plain hosts; ray.remote is applied below) ---------------------------------------------


class ConfigServerHost:
    """Config distribution + CA in one process (the CA refuses to be pickled: keys stay here)."""

    def __init__(self, state_dir: str, insecure: bool) -> None:
        from federation.server.grpc_services import ConfigDistributor, ConfigServer

        self.state_dir = state_dir
        self.store = Store.in_state_dir(state_dir)
        self.epoch = self.store.bump_epoch()
        self.dist = ConfigDistributor(self.epoch)
        self.dist.listeners.append(self._on_ack)
        self.insecure = insecure
        self.bootstrap = BootstrapTokens(state_dir)
        self.server = ConfigServer(self.dist, signer=self, on_health=self._on_health, insecure=insecure,
                                   bootstrap_cluster=self.bootstrap.cluster_for,
                                   authorize=self._authorize, verify_peer=self._verify_client)
        self.reconciler: Any = None
        self.cas: dict[str, Any] = {}
        self.cluster_tds: dict[str, str] = {}
        self.trust_domains: dict[str, Any] = {}
        self._acks: list[tuple[str, int, int, str]] = []
        self._nacks: list[tuple[str, str]] = []
        self.recent_latencies_s: list[float] = []
        self.trigger_to_ack_s: list[float] = []
        self._flusher: asyncio.Task[None] | None = None

    async def start(self, listen: str, reconciler: Any, bootstrap_listen: str | None = None) -> tuple[int, int]:
        """(config port, bootstrap port); the bootstrap port is 0 without TLS. Idempotent: a second
        call (two supervisors racing after a restart) returns the ports of the running server."""
        if self.server.port:
            return self.server.port, self.server.bootstrap_port
        self.reconciler = reconciler
        tls = None if self.insecure else self._server_tls()
        if tls is not None and bootstrap_listen is None:
            bootstrap_listen = listen.rsplit(":", 1)[0] + ":0"
        port = await self.server.start(listen, tls, bootstrap_listen if tls is not None else None)
        self._flusher = asyncio.ensure_future(self._flush_loop())
        return port, self.server.bootstrap_port

    def _server_tls(self) -> tuple[bytes, bytes, bytes] | None:
        from ztunnel.api.identity import CONTROLLER_TLS_NAME

        if not self.cas:
            raise RuntimeError("TLS needs a CA: call ensure_cas first (no trust domain in the fleet repo?)")
        td = sorted(self.cas)[0]
        svid = self.cas[td].issue_svid(f"spiffe://{td}/ns/{PROXY_NAMESPACE}/sa/meshfed-controller",
                                       dns_names=[CONTROLLER_TLS_NAME])
        self._record_leaf(td, self.cas[td], svid.not_after_s)  # proxies verify it: a live leaf of its root
        return svid.key_pem, svid.chain_pem, self._roots_pem()

    def _verify_client(self, leaf_pem: bytes) -> str:
        """Trust-domain-bound verification of a proxy's client certificate against our own CAs."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        from ztunnel.api.verify import PeerVerificationError, TrustStore

        store = TrustStore.from_bundles(*(ca.trust_bundle() for ca in self.cas.values()))
        der = x509.load_pem_x509_certificate(leaf_pem).public_bytes(Encoding.DER)
        try:
            return str(store.verify_peer(der, time.time()))
        except PeerVerificationError as e:
            raise PermissionError(e.reason) from e

    def _roots_pem(self) -> bytes:
        return b"".join(self.cas[td].roots_pem() for td in sorted(self.cas))

    def _ensure_bootstrap(self, clusters: list[str]) -> None:
        """Bootstrap tokens for the fleet's clusters (kept across restarts), and the roots proxies
        verify the controller with in `controller-roots.pem`."""
        self.bootstrap.ensure(clusters)
        (Path(self.state_dir) / CONTROLLER_ROOTS_FILE).write_bytes(self._roots_pem())

    # -- CA -----------------------------------------------------------------------------------

    def ensure_cas(self, blob: bytes) -> dict[str, tuple[str, ...]]:
        """Load or create the CA of every trust domain of a snapshot; returns PEM roots per domain."""
        from cryptography.hazmat.primitives.hashes import SHA256

        from federation.controller.ca import CaStateDir

        snap = decode_snapshot(blob)
        cadir = CaStateDir(self.state_dir)
        self.cluster_tds = {name: str(c.trust_domain) for name, c in snap.clusters.items()}
        self.trust_domains = dict(snap.trust_domains)
        out: dict[str, tuple[str, ...]] = {}
        for name, td in sorted(snap.trust_domains.items()):
            ca = cadir.load_or_create(td)
            if ca is None:
                continue
            self.cas[name] = ca
            out[name] = tuple(c for c in ca.trust_bundle().roots_pem)
            for cert in ca.authorities:
                self.store.record_ca_root(name, cert.subject.rfc4514_string(), cert.fingerprint(SHA256()).hex(),
                                          cert.not_valid_after_utc.timestamp())
        self._ensure_bootstrap(sorted(self.cluster_tds))
        return out

    def _authorize(self, proxy_id: str, identity: str) -> str:
        from federation.server.grpc_services import ProxyAuthorizer

        return ProxyAuthorizer(self.cluster_tds, PROXY_NAMESPACE)(proxy_id, identity)

    def sign(self, who: Any, csr_pem: bytes, ttl_s: float) -> tuple[list[bytes], list[bytes], float]:
        from cryptography import x509

        from federation.controller.ca import CsrDenied, Entitlement
        from ztunnel.api.identity import proxy_spiffe_id

        td = self.cluster_tds.get(who.cluster)
        ca = self.cas.get(td or "")
        if ca is None:
            raise PermissionError(f"proxy {who.proxy_id}: cluster {who.cluster!r} has no CA here "
                                  f"(unknown cluster or external CA)")
        own = proxy_spiffe_id(str(td), who.proxy_id)
        desired = self.dist.sessions.get(who.proxy_id)
        allowed = set(desired.desired.local_identities) if desired and desired.desired else set()
        allowed.add(own)
        if who.bootstrap:  # a bootstrap token buys the proxy's own identity only
            allowed = {own}
        try:
            chain = ca.issue_from_csr(csr_pem, entitlement=Entitlement.of(who.proxy_id, allowed),
                                      ttl_s=ttl_s or None)
        except CsrDenied as e:
            raise PermissionError(str(e)) from e
        leaf = x509.load_pem_x509_certificate(chain)
        not_after_s = leaf.not_valid_after_utc.timestamp()
        # before the chain leaves: a leaf we could not record could later be broken by retiring its root
        self._record_leaf(str(td), ca, not_after_s)
        return [chain], [ca.roots_pem()], not_after_s

    def _record_leaf(self, td: str, ca: Any, not_after_s: float) -> None:
        """Staged rotation's input: the latest not-after per (trust domain, signing root name). A
        plug-in CA has no named signing root; its leaves count against its (only) root, which is
        what a switch between Managed and External checks."""
        root = ca.signing_root or (ca.roots[0].name if ca.roots else "")
        self.store.record_leaf_issued(td, root, not_after_s)

    # -- config ---------------------------------------------------------------------------------

    def apply_deltas(self, blob: bytes) -> str:
        """Per-proxy deltas from the reconciler. Returns "resync" when one does not apply."""
        changed: dict[str, ProxyConfig] = {}
        for raw in unpack(blob):
            msg = pb.ConfigResponse.FromString(raw)
            dec = decode_delta([msg])
            pid = dec.delta.proxy_id
            if dec.delta.base_version == 0 and not dec.delta.upserts and msg.nonce == "remove":
                self.dist.forget([pid])
                continue
            sess = self.dist.sessions.get(pid)
            base = sess.desired if sess is not None else None
            try:
                cfg = apply_delta(base, dec.delta, template_from_header(dec.header))
            except ValueError:
                return "resync"
            changed[pid] = cfg
        self.dist.set_desired(changed)
        return "ok"

    def _on_ack(self, ev: Any) -> None:
        if ev.nack:
            self._nacks.append((ev.proxy_id, ev.error))
        else:
            self._acks.append((ev.proxy_id, ev.stamp.epoch, ev.stamp.version, ev.stamp.revision))
        self.recent_latencies_s = [*self.recent_latencies_s[-499:], ev.latency_s]
        self.trigger_to_ack_s = [*self.trigger_to_ack_s[-4999:], ev.trigger_to_ack_s]

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            acks, self._acks = self._acks, []
            nacks, self._nacks = self._nacks, []
            if acks:
                self.store.record_acks(acks)
            for pid, err in nacks:
                self.store.record_nack(pid, err)

    def _on_health(self, proxy_id: str, report: Any) -> None:
        if self.reconciler is not None:
            self.reconciler.on_health.remote(proxy_id, report.SerializeToString())

    def status(self) -> bytes:
        st = self.dist.status()
        return json.dumps({
            "epoch": self.epoch, "port": self.server.port, "bootstrap_port": self.server.bootstrap_port,
            "counts": self.dist.counts(), "proxies": st,
            "pushes": sum(p["pushes"] for p in st), "acks": sum(p["acks"] for p in st),
            "nacks": sum(p["nacks"] for p in st), "stale_epoch_refusals": self.dist.stale_epoch_refusals,
            "health_reports": self.server.health_reports, "slow_disconnects": self.server.slow_disconnects,
            "recent_ack_latencies_s": self.recent_latencies_s[-200:],
        }).encode()

    def trigger_to_ack(self, clear: bool = False) -> list[float]:
        out = list(self.trigger_to_ack_s)
        if clear:
            self.trigger_to_ack_s = []
        return out

    def trust(self) -> list[dict[str, Any]]:
        return self.store.ca_roots()

    def trust_view(self) -> bytes:
        """`meshfed trust --controller`: the offline view's data, fed with the live CAs' material."""
        from federation.core.trust_view import TrustMaterial, build_trust_view

        materials = {td: TrustMaterial(bundle=ca.bundle(), named_roots={r.name: r.cert for r in ca.roots},
                                       source="controller")
                     for td, ca in self.cas.items()}
        for td in set(self.trust_domains) - set(materials):
            materials[td] = TrustMaterial(source="controller (external CA: its bundle is read from the repo; "
                                                 "run `meshfed trust PATH` for it)")
        return json.dumps(build_trust_view(self.trust_domains, materials, time.time())).encode()


class ReconcilerHost:
    def __init__(self, state_dir: str, debounce_after_s: float, debounce_max_s: float, config_server: Any) -> None:
        self.store = Store.in_state_dir(state_dir)
        self.config_server = config_server
        self._lock = threading.RLock()
        self._last_sent: dict[str, ProxyConfig] = {}
        self.render = CoreRender(bundle_roots=self._bundle_roots)
        self.rec = Reconciler(self.render, self._push, self.store, Debouncer(debounce_after_s, debounce_max_s))
        self.ejections_detected = 0
        self.ejections_enforced = 0
        self.tick_interval_s = 1.0
        self._last_run_s = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)
        self._thread.start()

    def _bundle_roots(self, snap: Any) -> Mapping[str, tuple[str, ...]]:
        return dict(ray.get(self.config_server.ensure_cas.remote(encode_snapshot(snap))))

    def _push(self, changed: Mapping[str, ProxyConfig]) -> None:
        msgs: list[bytes] = []
        for pid, cfg in changed.items():
            delta = diff_configs(self._last_sent.get(pid), cfg)
            msgs.extend(m.SerializeToString() for m in encode_delta(delta, cfg, "", UNLIMITED_BYTES))
            self._last_sent[pid] = cfg
        for pid in set(self._last_sent) - set(self.rec.configs):
            del self._last_sent[pid]
        result = ray.get(self.config_server.apply_deltas.remote(pack(msgs)))
        if result == "resync":
            self._resync()

    def _resync(self) -> None:
        msgs: list[bytes] = []
        for cfg in self.rec.configs.values():
            msgs.extend(m.SerializeToString() for m in encode_delta(diff_configs(None, cfg), cfg, "", UNLIMITED_BYTES))
        self._last_sent = dict(self.rec.configs)
        ray.get(self.config_server.apply_deltas.remote(pack(msgs)))

    def _loop(self) -> None:
        while not self._stop.is_set():
            deadline = self.rec.debounce.deadline_s()
            timeout = 0.5 if deadline is None else max(0.0, deadline - time.time())
            self._wake.wait(timeout)
            self._wake.clear()
            with self._lock:
                if self.rec.due(time.time()):
                    self.rec.reconcile(time.time())
                    self._count_events()
                elif (self.rec.snapshot is not None and self.rec.debounce.deadline_s() is None
                      and time.time() - self._last_run_s >= self.tick_interval_s):
                    # leases and ejections expire with time, not with input: tick the core
                    self.rec.reconcile(time.time(), force=True)
                    self._count_events()
                self._last_run_s = time.time() if self.rec.reconciles else self._last_run_s

    def _count_events(self) -> None:
        for ev in self.rec.events[-50:]:
            if type(ev).__name__ == "EndpointEjected":
                self.ejections_detected += 1
                self.ejections_enforced += int(bool(getattr(ev, "enforced", False)))
        self.rec.events.clear()

    # -- inputs --------------------------------------------------------------------------------

    def on_snapshot(self, blob: bytes) -> None:
        with self._lock:
            self.rec.on_snapshot(decode_snapshot(blob), time.time())
        self._wake.set()

    def on_fallback_snapshot(self, blob: bytes) -> None:
        with self._lock:
            self.rec.on_fallback_snapshot(decode_snapshot(blob))
        self._wake.set()

    def on_fleet_error(self, sha: str, subject: str, problems_json: str) -> None:
        with self._lock:
            self.rec.on_fleet_error(sha, subject, json.loads(problems_json), time.time())

    def on_observation(self, blob: bytes) -> None:
        obs = decode_observation(blob)
        with self._lock:
            self.rec.on_observation(obs, time.time())
        self._wake.set()

    def on_health(self, proxy_id: str, blob: bytes) -> None:
        report = pb.HealthReport.FromString(blob)
        outcomes = [EndpointReport(o.service, o.workload_uid, o.cluster, int(o.ok), int(o.failed), bool(o.ejected))
                    for o in report.outcomes]
        with self._lock:
            self.rec.on_health(proxy_id, outcomes, time.time())
        self._wake.set()

    def on_lease(self, cluster: str, last_success_s: float) -> None:
        with self._lock:
            self.rec.on_lease(cluster, last_success_s)

    def missing_inputs(self) -> bool:
        return self.rec.snapshot is None and self.rec.pending_snapshot is None

    def snapshot_blob(self) -> bytes:
        with self._lock:
            return encode_snapshot(self.rec.snapshot) if self.rec.snapshot is not None else b""

    def resync(self) -> None:
        """Send every config in full (the config server restarted and knows none)."""
        with self._lock:
            self._resync()

    # -- queries ------------------------------------------------------------------------------------

    def status(self) -> bytes:
        with self._lock:
            st = self.rec.status()
            st["durations_s"] = self.rec.durations_s[-200:]
            st["step_failures_total"] = len(self.rec.failures)
            st["ejections_detected"], st["ejections_enforced"] = self.ejections_detected, self.ejections_enforced
            snap = self.rec.snapshot
            st["fleet_clusters"] = {
                name: {"api_kind": c.api.kind.value, "context": c.api.context, "kubeconfig": c.api.kubeconfig,
                       "trust_domain": str(c.trust_domain), "network": str(c.network),
                       "lease_ttl_s": snap.federation.partition.lease_ttl_s}
                for name, c in snap.clusters.items()} if snap is not None else {}
            return json.dumps(st, default=str).encode()

    def services(self) -> bytes:
        with self._lock:
            snap = self.rec.snapshot
            out = []
            if snap is not None:
                for key, svc in sorted(snap.services.items(), key=lambda kv: str(kv[0])):
                    per = {}
                    for cname, obs in self.rec.observations.items():
                        eps = [e for e in obs.endpoints if (e.namespace, e.service) == (key.namespace, key.name)]
                        if eps:
                            per[cname] = {"endpoints": len(eps), "ready": sum(1 for e in eps if e.ready)}
                    _policy, pos = snap.traffic_policy_for(key)
                    out.append({"service": str(key), "hostname": svc.hostname, "export_from": list(svc.export_from),
                                "ports": [p.port for p in svc.ports], "clusters": per,
                                "policy_source": str(pos) if pos else ""})
            return json.dumps(out).encode()

    def endpoints(self, service: str, from_cluster: str | None) -> bytes:
        with self._lock:
            cfgs = self.rec.configs
            pids = sorted(p for p in cfgs if p.startswith("ztunnel/") and (from_cluster is None or
                                                                            cfgs[p].cluster == from_cluster))
            if not pids:
                return json.dumps({"error": f"no node proxy rendered for cluster {from_cluster!r}"}).encode()
            cfg = cfgs[pids[0]]
            name = service.split(".")[0] if "/" not in service else service.split("/")[1]
            ns = service.split("/")[0] if "/" in service else (service.split(".")[1] if "." in service else "")
            for svc in cfg.services:
                if svc.hostname == service or (svc.name == name and (not ns or svc.namespace == ns)):
                    return json.dumps({
                        "service": svc.hostname, "from": cfg.cluster, "viewer": cfg.proxy_id,
                        "revision": cfg.stamp.revision, "policy_source": svc.policy_source,
                        "endpoints": [{"workload": e.workload_uid, "cluster": e.cluster, "address": e.address,
                                       "port": e.port, "via": e.gateway or e.hbone_address, "tier": e.tier,
                                       "weight": e.weight, "healthy": e.healthy, "zone": e.zone}
                                      for e in svc.endpoints]}).encode()
            return json.dumps({"error": f"service {service} is not in the config of {cfg.proxy_id}"}).encode()

    def explain(self, service: str, from_cluster: str, zone: str | None) -> bytes:
        """`meshfed explain --controller`: the core's explain on the live engine (observations,
        leases, local ejections), plus the endpoints the health-report quorum ejected for everyone."""
        from federation.core.explain import ExplainError, explain_service

        with self._lock:
            engine = self.render.engine
            if engine is None:
                return json.dumps({"error": "the controller has not rendered a revision yet; see `meshfed status`",
                                   "usage": False}).encode()
            try:
                data = explain_service(engine, service, from_cluster, zone)
            except ExplainError as e:
                return json.dumps({"error": str(e), "usage": True}).encode()
            quorum = sorted(uid for host, uid in self.rec.unhealthy if host == data["service"])
        for tier in data["tiers"]:
            for group in tier["groups"]:
                for ep in group["endpoints"]:
                    ep["globally_ejected"] = ep["uid"] in quorum
                    ep["healthy"] = ep["healthy"] and not ep["globally_ejected"]
        data["globally_ejected"] = quorum
        data["live"] = True
        return json.dumps(data, default=str).encode()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


class GitSourceHost:
    def __init__(self, repo: str, branch: str, state_dir: str, reconciler: Any, poll_interval_s: float | None) -> None:
        self.store = Store.in_state_dir(state_dir)
        applied = self.store.last_applied()
        self.source = GitSource(repo, branch, state_dir, fallback_sha=applied.sha if applied else None)
        self._first_snapshot = True
        if poll_interval_s is not None:
            self.source.follower.watch.poll_interval_s = poll_interval_s
        self.poll_override_s = poll_interval_s
        self.reconciler = reconciler
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="git", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # keep following; the status shows the error
                self.source.last_error = f"{type(e).__name__}: {e}"
            self._wake.wait(0.2)
            self._wake.clear()

    def poll_once(self) -> None:
        results = []
        got = self.source.poll(time.time())
        while got is not None:
            results.append(got)
            got = self.source.poll(time.time()) if self.source.snapshot is None else None
        # a fallback snapshot (last applied, after a restart on a bad head) goes first, so that
        # the bad head stays the "desired" revision in status
        for r in sorted(results, key=lambda r: isinstance(r, FleetFailure)):
            self._deliver(r)

    def _deliver(self, got: ConfigSnapshot | FleetFailure) -> None:
        if self.poll_override_s is not None:
            self.source.follower.watch.poll_interval_s = self.poll_override_s
        if isinstance(got, FleetFailure):
            ray.get(self.reconciler.on_fleet_error.remote(got.sha, got.subject, json.dumps(list(got.problems))))
        elif got is not None:
            if self._first_snapshot:
                self._first_snapshot = False
                self._send_fallback_if_gated(got)
            ray.get(self.reconciler.on_snapshot.remote(encode_snapshot(got)))

    def _send_fallback_if_gated(self, head: ConfigSnapshot) -> None:
        """A (re)started reconciler has no applied snapshot: if the head is an unsafe rotation, give
        it the last applied revision first (see `last_applied_if_gated`)."""
        fallback = last_applied_if_gated(self.source, self.store, head, time.time())
        if fallback is not None:
            ray.get(self.reconciler.on_fallback_snapshot.remote(encode_snapshot(fallback)))

    def trigger(self) -> None:
        self.source.trigger()
        self._wake.set()

    def resend(self) -> None:
        if self.source.snapshot is not None:
            self._send_fallback_if_gated(self.source.snapshot)
            ray.get(self.reconciler.on_snapshot.remote(encode_snapshot(self.source.snapshot)))

    def status(self) -> dict[str, Any]:
        return self.source.status()


class ClusterAgentHost:
    def __init__(self, cluster: str, kubeconfig: str | None, context: str, api_kind: str, lease_ttl_s: float,
                 watch_timeout_s: int, reconciler: Any) -> None:
        self.reconciler = reconciler
        self.args = (cluster, kubeconfig, context, api_kind, lease_ttl_s, watch_timeout_s)
        self.agent = ClusterAgent(cluster, kubeconfig, context, api_kind, lease_ttl_s, watch_timeout_s=watch_timeout_s)
        self.agent.start(self._send, self._send_lease)

    def _send(self, blob: bytes) -> None:
        ray.get(self.reconciler.on_observation.remote(blob))

    def _send_lease(self, cluster: str, last_success_s: float) -> None:
        ray.get(self.reconciler.on_lease.remote(cluster, last_success_s))

    def resend(self) -> None:
        """Re-LIST everything (a restarted reconciler needs a complete observation)."""
        from federation.controller.sources import encode_observation

        self._send(encode_observation(self.agent.discovery.list_all()))

    def status(self) -> dict[str, Any]:
        return self.agent.status()

    def stop(self) -> None:
        self.agent.stop()


def last_applied_if_gated(source: GitSource, store: Store, head: ConfigSnapshot, now_s: float) -> ConfigSnapshot | None:
    """After a (re)start: the last applied revision, reloaded from Git, when the reconciler's commit
    gate will reject the branch head (an unsafe CA root rotation). Without it a restarted controller
    would have nothing to serve (the head is rejected, and unlike an invalid commit the Git source
    sees nothing wrong with it) and would load the head's CAs at start, switching the signer."""
    from federation.core.rotation_gate import ca_spec_from_dict, gate_commit
    from gitops import FleetError, RepoAccessError, load_revision

    specs, applied = store.applied_ca_specs(), store.last_applied()
    if not specs or applied is None or source.worktree or applied.sha in (head.revision.sha, "WORKTREE"):
        return None
    previous = {td: ca_spec_from_dict(d) for td, d in specs.items()}
    if not gate_commit(previous, head, store.leaf_not_after, now_s):
        return None
    try:
        return load_revision(source.follower.local_repo(), applied.sha)
    except (FleetError, RepoAccessError):
        return None


_RESTART = {"max_restarts": -1, "max_task_retries": 0}
ConfigServerActor = ray.remote(num_cpus=0, **_RESTART)(ConfigServerHost)
ReconcilerActor = ray.remote(num_cpus=0, max_concurrency=16, **_RESTART)(ReconcilerHost)
GitSourceActor = ray.remote(num_cpus=0, max_concurrency=4, **_RESTART)(GitSourceHost)
ClusterAgentActor = ray.remote(num_cpus=0, max_concurrency=4, **_RESTART)(ClusterAgentHost)


# --- the driver -----------------------------------------------------------------------------------


def init_ray(address: str | None, num_cpus: int = 2) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USE_UVLOOP", "0")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


class Controller:
    """The `meshfed controller run` process: creates and supervises the actors, serves status."""

    def __init__(self, opts: ControllerOptions) -> None:
        self.opts = opts
        self.state_dir = str(Path(opts.state_dir).resolve())
        self.kubeconfig = opts.kubeconfig or os.environ.get("KUBECONFIG")
        self.agents: dict[str, Any] = {}
        self.agent_specs: dict[str, tuple[Any, ...]] = {}
        self._cache: dict[str, Any] = {}
        self._cache_lock = threading.Lock()
        self._stop = threading.Event()
        self.status_server: Any = None
        self.port = 0
        self.bootstrap_port = 0
        self.config_server_restarts = 0
        self._revive_lock = threading.Lock()
        self._store: Store | None = None

    def start(self) -> Controller:
        init_ray(self.opts.ray_address, self.opts.num_cpus)
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        self._store = Store.in_state_dir(self.state_dir)
        self.config_server = ConfigServerActor.remote(self.state_dir, self.opts.insecure)
        self.reconciler = ReconcilerActor.remote(self.state_dir, self.opts.debounce_after_s, self.opts.debounce_max_s,
                                                 self.config_server)
        if not self.opts.insecure:
            # TLS needs the CAs before the server starts: load the fleet once here, synchronously.
            # Never the CAs of a head the commit gate will reject: that would switch the signer.
            source = GitSource(str(self.opts.repo), self.opts.branch, self.state_dir)
            snap = source.poll(time.time())
            if not isinstance(snap, FleetFailure) and snap is not None:
                snap = last_applied_if_gated(source, self._store, snap, time.time()) or snap
                ray.get(self.config_server.ensure_cas.remote(encode_snapshot(snap)))
        self.port, self.bootstrap_port = (int(p) for p in ray.get(self.config_server.start.remote(
            self.opts.listen, self.reconciler, self.opts.bootstrap_listen)))
        self.git = GitSourceActor.remote(str(self.opts.repo), self.opts.branch, self.state_dir, self.reconciler,
                                         self.opts.git_poll_interval_s)
        from federation.server.status_api import StatusServer

        self.status_server = StatusServer(self, self.opts.status_listen).start()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()
        return self

    # -- supervision -------------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as e:  # actors restarting: try again next round
                with self._cache_lock:
                    self._cache["supervisor_error"] = f"{type(e).__name__}: {e}"
            self._stop.wait(self.opts.status_interval_s)

    def refresh(self) -> dict[str, Any]:
        rec = json.loads(ray.get(self.reconciler.status.remote(), timeout=10))
        cs = json.loads(ray.get(self.config_server.status.remote(), timeout=10))
        if not cs.get("port") and self.port:
            with self._revive_lock:
                cs = self._revive_config_server()
        self._ensure_agents(rec.get("fleet_clusters", {}))
        if ray.get(self.reconciler.missing_inputs.remote()):
            self.git.resend.remote()
            for a in self.agents.values():
                a.resend.remote()
        agent_st = {}
        for name, a in list(self.agents.items()):
            try:
                agent_st[name] = ray.get(a.status.remote(), timeout=5)
            except Exception as e:
                agent_st[name] = {"cluster": name, "up": False, "last_error": str(e)}
        git = ray.get(self.git.status.remote(), timeout=10)
        st = self._assemble(rec, cs, agent_st, git)
        with self._cache_lock:
            self._cache = st
        return st

    def _revive_config_server(self) -> dict[str, Any]:
        """Ray restarted the config server actor (its __init__ ran again: a new epoch from the
        store, no CAs loaded, not listening). Give it the CAs of the applied revision (keys come
        back from the state directory), the same ports, and the reconciler's configs in full."""
        cs = dict(json.loads(ray.get(self.config_server.status.remote(), timeout=10)))
        if cs.get("port"):
            return cs  # revived by the other caller while we waited for the lock
        blob = ray.get(self.reconciler.snapshot_blob.remote(), timeout=30)
        if blob:
            ray.get(self.config_server.ensure_cas.remote(blob), timeout=30)
        host = self.opts.listen.rsplit(":", 1)[0]
        boot = f"{host}:{self.bootstrap_port}" if self.bootstrap_port else self.opts.bootstrap_listen
        ray.get(self.config_server.start.remote(f"{host}:{self.port}", self.reconciler, boot), timeout=30)
        ray.get(self.reconciler.resync.remote(), timeout=30)
        self.config_server_restarts += 1
        return dict(json.loads(ray.get(self.config_server.status.remote(), timeout=10)))

    def _ensure_agents(self, fleet_clusters: dict[str, Any]) -> None:
        for name, c in fleet_clusters.items():
            wt = self.opts.watch_timeout_s or max(2, int(float(c["lease_ttl_s"]) / 3))
            spec = (name, c.get("kubeconfig") or self.kubeconfig, c["context"], c["api_kind"],
                    float(c["lease_ttl_s"]), wt)
            if self.agent_specs.get(name) != spec:
                old = self.agents.pop(name, None)
                if old is not None:
                    old.stop.remote()
                    ray.kill(old)
                self.agents[name] = ClusterAgentActor.remote(*spec, self.reconciler)
                self.agent_specs[name] = spec
        for name in set(self.agents) - set(fleet_clusters):
            a = self.agents.pop(name)
            self.agent_specs.pop(name, None)
            a.stop.remote()
            ray.kill(a)

    def _assemble(self, rec: dict[str, Any], cs: dict[str, Any], agents: dict[str, Any],
                  git: dict[str, Any]) -> dict[str, Any]:
        clusters = {}
        for name in sorted(set(rec.get("fleet_clusters", {})) | set(agents)):
            a, r = agents.get(name, {}), rec.get("clusters", {}).get(name, {})
            clusters[name] = {**r, **{k: a.get(k) for k in ("up", "lease_remaining_s", "last_error", "api", "context")},
                              "applied_revision": rec.get("applied", {}).get("revision", "")}
        return {
            "controller": {"epoch": cs.get("epoch"), "config_port": cs.get("port"),
                           "bootstrap_port": cs.get("bootstrap_port"), "state_dir": self.state_dir},
            "git": git,
            "desired": rec.get("desired"), "applied": rec.get("applied"),
            "problems": rec.get("problems", []), "render_problems": rec.get("render_problems", []),
            "clusters": clusters,
            "proxies": cs.get("proxies", []),
            "config_server": {k: v for k, v in cs.items() if k != "proxies"},
            "reconciler": rec,
            "unhealthy_endpoints": rec.get("unhealthy_endpoints", []),
            "failover_events": len(self._store.failover_history(limit=100000)) if self._store else 0,
            "trust": self._store.ca_roots() if self._store else [],
            "at_s": time.time(),
        }

    # -- StatusSource ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._cache_lock:
            if self._cache:
                return dict(self._cache)
        return self.refresh()

    def services(self) -> list[dict[str, Any]]:
        return list(json.loads(ray.get(self.reconciler.services.remote(), timeout=10)))

    def endpoints(self, service: str, from_cluster: str | None) -> dict[str, Any]:
        return dict(json.loads(ray.get(self.reconciler.endpoints.remote(service, from_cluster), timeout=10)))

    def failover_history(self, service: str | None, since_s: float | None) -> list[dict[str, Any]]:
        assert self._store is not None
        return [r.as_dict() for r in self._store.failover_history(service, since_s)]

    def trust(self) -> list[dict[str, Any]]:
        assert self._store is not None
        return self._store.ca_roots()

    def trust_view(self) -> dict[str, Any]:
        return dict(json.loads(ray.get(self.config_server.trust_view.remote(), timeout=10)))

    def explain(self, service: str, from_cluster: str, zone: str | None) -> dict[str, Any]:
        return dict(json.loads(ray.get(self.reconciler.explain.remote(service, from_cluster, zone), timeout=10)))

    def checks(self) -> list[dict[str, Any]]:
        return build_checks(self.status())

    # -- control -------------------------------------------------------------------------------------

    def trigger_git(self) -> None:
        ray.get(self.git.trigger.remote())

    def trigger_to_ack(self, clear: bool = False) -> list[float]:
        return list(ray.get(self.config_server.trigger_to_ack.remote(clear)))

    def stop(self) -> None:
        self._stop.set()
        if self.status_server is not None:
            self.status_server.stop()
        for a in self.agents.values():
            try:
                ray.get(a.stop.remote(), timeout=2)
            except Exception:
                pass
            ray.kill(a)
        for h in (self.git, self.reconciler, self.config_server):
            ray.kill(h)
        self.agents.clear()


def build_checks(st: dict[str, Any]) -> list[dict[str, Any]]:
    """Grouped pass/fail checks, each failure with a cause and a hint (`meshfed check`)."""
    checks: list[dict[str, Any]] = []

    def add(group: str, name: str, ok: bool, cause: str = "", hint: str = "") -> None:
        checks.append({"group": group, "check": name, "ok": ok, "cause": "" if ok else cause,
                       "hint": "" if ok else hint})

    desired = st.get("desired") or {}
    add("fleet", "last revision applied", bool(desired) and desired.get("ok", False) is True,
        f"revision {str(desired.get('revision', ''))[:8]} failed: " + "; ".join(
            f"[{p.get('code')}] {p.get('message')}" for p in st.get("problems", [])[:3]),
        "run `meshfed validate` on the fleet repo and push a fix; proxies keep the last applied revision")
    git = st.get("git") or {}
    add("fleet", "repository reachable", not git.get("last_error"), str(git.get("last_error")),
        "check --repo/--branch and credentials")
    for name, c in sorted((st.get("clusters") or {}).items()):
        add("clusters", f"{name} lease", bool(c.get("up")), c.get("last_error") or "no successful watch within the lease",
            f"check that the API server of {name} (context {c.get('context')}) is reachable")
    proxies = st.get("proxies") or []
    stale = [p for p in proxies if p.get("sync") != "SYNCED"]
    add("proxies", "all proxies synced", not stale,
        f"{len(stale)} of {len(proxies)} not synced: " + ", ".join(
            f"{p['proxy']} {p['sync']}{' (' + p['last_nack'] + ')' if p.get('last_nack') else ''}" for p in stale[:5]),
        "a NACK names the rejected resource; NOT SENT means the proxy never connected (check its controller address)")
    cs = st.get("config_server") or {}
    add("controller", "no split brain", not cs.get("stale_epoch_refusals"),
        f"{cs.get('stale_epoch_refusals')} proxies follow a newer controller epoch",
        "another controller with a newer epoch is running: stop this one")
    for r in st.get("trust") or []:
        left_s = float(r["not_after_s"]) - time.time()
        add("trust", f"{r['trust_domain']} root {r['root'][:40]} valid > 30 days", left_s > 30 * 86400,
            f"expires in {left_s / 86400:.1f} days", "publish a new root and rotate (see TrustDomain spec.ca.roots)")
    return checks


def run(opts: ControllerOptions) -> None:  # pragma: no cover - the CLI entry point
    import signal

    ctl = Controller(opts).start()
    print(f"meshfed controller: config gRPC on {opts.listen.rsplit(':', 1)[0]}:{ctl.port} (bootstrap port "
          f"{ctl.bootstrap_port or '-'}), "
          f"status on {ctl.status_server.url}, state in {ctl.state_dir}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    ctl.stop()

