"""The config service: the controller's state owner, as a plain class.

It holds everything that must live in one process on one node: the sqlite store
(`controller.sqlite`), the CA keys (`signing.SigningPolicy`, which never lets a CA be pickled),
the bootstrap tokens, the TokenReview clients of the clusters (`clusters.kube.auth`, one per cluster
of the applied fleet: a proxy's ServiceAccount token is reviewed by its own cluster only), and the
`distributor.ConfigDistributor` with every proxy's desired and acknowledged config. `federation.ray` pins the actor hosting it to the driver's node and gives
the other actors the store through it; `federation.server.grpc_services.ConfigServer` serves
its distributor and signing policy to proxies.

- **Epoch**: bumped in the store when the service starts, so a restarted service (or a second
  controller) fences the previous one (see the distributor's split-brain rule). A fresh service
  knows no desired configs; its first `apply_deltas` from an unknown base answers "resync" and
  the reconciler sends everything in full.
- **ACK/NACK records**: the distributor reports each settled push; the service keeps the latest
  ACK and the latest NACK per proxy (bounded by the number of proxies, however fast they reply)
  and writes them to the store every `flush_interval_s` in one transaction, so a push wave to
  1,000 proxies costs one write, not 1,000. A failed write is counted and retried with the next
  batch; the flusher never dies of it.
- **Status**: the distributor's per-proxy sync states and counters plus what the transport
  reports (ports, health reports, slow disconnects), and the serving certificates' expiry.
- **Serving certificates** (`signing.ServingCertificates`): checked every `SERVING_CHECK_MAX_S`
  (sooner when due) and whenever the CAs are (re)loaded; re-issued at half-life or when the CA
  material changed. The gRPC adapter swaps them in for new handshakes; open streams keep theirs.
- **Trust anchors for proxies**: `roots/<trust-domain>.pem`, the authorities a proxy of that trust
  domain verifies the controller with before it has learnt them over the wire (in Kubernetes: the
  ConfigMap a proxy mounts, as Istio's istio-ca-root-cert); `controller-roots.pem` pools every
  CA's, for tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from federation.controller.bootstrap import BootstrapTokens
from federation.controller.distributor import AckEvent, ConfigDistributor
from federation.controller.signing import (
    TOKEN_AUDIENCE,
    BootstrapVerdict,
    SigningPolicy,
    check_service_account,
    cluster_named_by,
)
from federation.controller.store import Store
from federation.controller.wire import decode_config_deltas
from gitops.model import ConfigSnapshot
from ztunnel.api.config import ProxyConfig, apply_delta

CONTROLLER_ROOTS_FILE = "controller-roots.pem"    # public: every CA's authorities, pooled (tools)
TRUST_ANCHORS_DIR = "roots"                       # public: roots/<td>.pem, a proxy's first trust anchor
FLUSH_INTERVAL_S = 0.2
SERVING_CHECK_MAX_S = 60.0
MAX_SA_TOKEN_CHARS = 16 * 1024
RECENT_ACK_LATENCIES = 500
TRIGGER_TO_ACK_SAMPLES = 5000


class ConfigService:
    """Invariants: `epoch` is greater than that of any earlier service on this state directory;
    `dist` holds this epoch's sessions only; the pending ACK/NACK maps hold at most one entry per
    proxy; a CA's keys never leave `signing`."""

    def __init__(self, state_dir: str | Path, insecure: bool = False, store: Store | None = None,
                 clock: Callable[[], float] = time.time, flush_interval_s: float = FLUSH_INTERVAL_S,
                 kubeconfig: str | None = None, token_reviewer: Callable[..., Any] | None = None) -> None:
        self.state_dir = str(state_dir)
        self.insecure = insecure
        self.clock = clock
        # cluster -> (kubeconfig, context) of the applied fleet, and a TokenReview client per cluster
        # (`token_reviewer(cluster, kubeconfig, context)` makes one; tests give a fake)
        self.kubeconfig = kubeconfig
        self._reviewer_factory = token_reviewer
        self._cluster_apis: dict[str, tuple[str | None, str]] = {}
        self._reviewers: dict[str, tuple[tuple[str | None, str], Any]] = {}
        self.flush_interval_s = flush_interval_s
        self.store = store if store is not None else Store.in_state_dir(self.state_dir)
        self.epoch = self.store.bump_epoch()
        self.dist = ConfigDistributor(self.epoch)
        self.dist.listeners.append(self.on_ack)
        self.bootstrap = BootstrapTokens(self.state_dir, clock)
        self.signing = SigningPolicy(self.state_dir, self.store, self._rendered_identities, clock)
        self._seq = itertools.count(1)
        self._acks: dict[str, tuple[int, tuple[str, int, int, str]]] = {}   # proxy -> (seq, ack record)
        self._nacks: dict[str, tuple[int, str]] = {}                        # proxy -> (seq, error)
        self.flush_failures = 0
        self.last_flush_error = ""
        self.recent_latencies_s: deque[float] = deque(maxlen=RECENT_ACK_LATENCIES)
        self.trigger_to_ack_s: deque[float] = deque(maxlen=TRIGGER_TO_ACK_SAMPLES)
        self._flusher: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self.last_serving_renewal = ""

    # --- CAs and credentials --------------------------------------------------------------------

    def ensure_cas(self, snap: ConfigSnapshot) -> dict[str, tuple[str, ...]]:
        """Load or create the CA of every trust domain of a snapshot (expired bootstrap tokens are
        pruned); remember each cluster's API for TokenReviews; write the roots proxies verify the
        controller with (`roots/<td>.pem`, and `controller-roots.pem` pooled); re-issue the serving
        certificates if the CA material changed. Returns PEM roots per trust domain."""
        out = self.signing.load_cas(snap)
        self.bootstrap.prune()
        self._cluster_apis = {name: (c.api.kubeconfig or self.kubeconfig, c.api.context)
                              for name, c in snap.clusters.items()}
        self._write_trust_anchors()
        self.renew_serving_certificates()  # a rotated root: new handshakes get a chain proxies trust
        return out

    def _write_trust_anchors(self) -> None:
        """Public, but written atomically like secrets: a proxy never reads a torn roots file."""
        from ztunnel.api.secret_files import write_secret

        state = Path(self.state_dir)
        write_secret(state / CONTROLLER_ROOTS_FILE, self.signing.roots_pem(), mode=0o644)
        anchors = state / TRUST_ANCHORS_DIR
        anchors.mkdir(mode=0o755, exist_ok=True)  # write_secret refuses it if it is a link
        for td, ca in sorted(self.signing.cas.items()):
            write_secret(anchors / f"{td}.pem", ca.roots_pem(), mode=0o644)

    def renew_serving_certificates(self, now_s: float | None = None) -> str:
        """Re-issue the controller's certificates if due (`signing.ServingCertificates.due`); why."""
        why = self.signing.renew_serving_if_due(self.clock() if now_s is None else now_s)
        if why:
            self.last_serving_renewal = why
        return why

    def start_renewing(self) -> None:
        """Check the serving certificates on the running event loop (idempotent)."""
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew_loop())

    async def _renew_loop(self) -> None:
        while True:
            try:
                self.renew_serving_certificates()
                left_s = self.signing.serving().renew_at_s - self.clock()
            except Exception as e:  # a CA that cannot sign now: say so in status, try again
                self.last_serving_renewal = f"failed: {type(e).__name__}: {e}"
                left_s = SERVING_CHECK_MAX_S
            await asyncio.sleep(min(SERVING_CHECK_MAX_S, max(1.0, left_s)))

    # --- bootstrap credentials ------------------------------------------------------------------

    def _reviewer(self, cluster: str) -> Any:
        spec = self._cluster_apis.get(cluster)
        if spec is None:
            return None
        have = self._reviewers.get(cluster)
        if have is None or have[0] != spec:
            if self._reviewer_factory is not None:
                reviewer = self._reviewer_factory(cluster, *spec)
            else:
                from clusters.kube.auth import TokenReviewer

                reviewer = TokenReviewer(cluster, *spec)
            have = self._reviewers[cluster] = (spec, reviewer)
        return have[1]

    def authenticate_bootstrap(self, proxy_id: str, service_account_token: str, bootstrap_token: str) -> BootstrapVerdict:
        """May these credentials buy `proxy_id` its own certificate? A ServiceAccount token is
        reviewed by the proxy's own cluster (blocking: an HTTP request; the gRPC adapter calls this
        in a thread), then judged by `signing.check_service_account`; a bootstrap token is checked
        against the tokens file (`consume_bootstrap` uses it up once a certificate was issued)."""
        if service_account_token:
            from clusters.kube.discovery import DiscoveryError

            if service_account_token.count(".") != 2 or len(service_account_token) > MAX_SA_TOKEN_CHARS:
                # not even shaped like a ServiceAccount token (a JWT): no reason to bother the API server
                return BootstrapVerdict("unauthenticated", "the ServiceAccount token is not a JWT",
                                        "service account token")
            cluster = cluster_named_by(proxy_id)
            reviewer = self._reviewer(cluster)
            if reviewer is None:
                return BootstrapVerdict("permission_denied", f"proxy {proxy_id} names cluster {cluster!r}, which is "
                                        "not in the applied fleet", "service account token")
            try:
                review = reviewer.review(service_account_token, [TOKEN_AUDIENCE])
            except DiscoveryError as e:
                return BootstrapVerdict("unavailable", str(e), "service account token")
            return check_service_account(proxy_id, review)
        if bootstrap_token:
            why = self.bootstrap.check(bootstrap_token, proxy_id)
            return BootstrapVerdict("unauthenticated" if why else "", why, "bootstrap token")
        return BootstrapVerdict("unauthenticated", "no client certificate and no bootstrap credential: a proxy's first "
                                "certificate needs its pod's ServiceAccount token or a bootstrap token "
                                "(`meshfed controller bootstrap-token`)")

    def consume_bootstrap(self, proxy_id: str, bootstrap_token: str) -> bool:
        """Use up a bootstrap token that just obtained a certificate; False if another request used it first."""
        return self.bootstrap.consume(bootstrap_token, proxy_id)

    def _rendered_identities(self, proxy_id: str) -> tuple[str, ...]:
        s = self.dist.sessions.get(proxy_id)
        return tuple(s.desired.local_identities) if s is not None and s.desired is not None else ()

    # --- configs -----------------------------------------------------------------------------

    def apply_deltas(self, blob: bytes) -> str:
        """Per-proxy deltas from the reconciler (`wire.encode_config_deltas`). "resync" when one
        does not apply to what we hold (then nothing of the blob but removals took effect, and the
        reconciler sends everything in full), else "ok"."""
        changed: dict[str, ProxyConfig] = {}
        for d in decode_config_deltas(blob):
            if d.remove:
                self.dist.forget([d.proxy_id])
                continue
            sess = self.dist.sessions.get(d.proxy_id)
            base = sess.desired if sess is not None else None
            try:
                changed[d.proxy_id] = apply_delta(base, d.delta, d.template)
            except ValueError:
                return "resync"
        self.dist.set_desired(changed)
        return "ok"

    # --- acknowledgements ------------------------------------------------------------------------

    def on_ack(self, ev: AckEvent) -> None:
        seq = next(self._seq)
        if ev.nack:
            self._nacks[ev.proxy_id] = (seq, ev.error)
        else:
            self._acks[ev.proxy_id] = (seq, (ev.proxy_id, ev.stamp.epoch, ev.stamp.version, ev.stamp.revision))
        self.recent_latencies_s.append(ev.latency_s)
        self.trigger_to_ack_s.append(ev.trigger_to_ack_s)

    def flush(self) -> None:
        """Write the pending ACKs and NACKs: each proxy's latest ACK, then its NACK if that came
        later (so a NACK after an ACK shows, and an ACK after a NACK clears it)."""
        acks, self._acks = self._acks, {}
        nacks, self._nacks = self._nacks, {}
        try:
            if acks:
                self.store.record_acks([rec for _seq, rec in acks.values()])
            for pid, (seq, err) in nacks.items():
                if pid not in acks or acks[pid][0] < seq:
                    self.store.record_nack(pid, err)
        except Exception as e:  # keep them for the next round, unless newer replies replaced them
            self.flush_failures += 1
            self.last_flush_error = f"{type(e).__name__}: {e}"
            self._acks = {**acks, **self._acks}
            self._nacks = {**nacks, **self._nacks}

    def start_flushing(self) -> None:
        """Flush every `flush_interval_s` on the running event loop (idempotent)."""
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self.flush()

    async def stop(self) -> None:
        for task in (self._flusher, self._renewer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._flusher = self._renewer = None
        self.flush()

    # --- queries ------------------------------------------------------------------------------

    def status(self, transport: Mapping[str, Any]) -> dict[str, Any]:
        """The service's status; `transport` adds what the gRPC server knows (port, bootstrap_port,
        health_reports, slow_disconnects)."""
        st = self.dist.status()
        return {
            "epoch": self.epoch, "port": transport.get("port", 0), "bootstrap_port": transport.get("bootstrap_port", 0),
            "counts": self.dist.counts(), "proxies": st,
            "pushes": sum(p["pushes"] for p in st), "acks": sum(p["acks"] for p in st),
            "nacks": sum(p["nacks"] for p in st), "stale_epoch_refusals": self.dist.stale_epoch_refusals,
            "health_reports": transport.get("health_reports", 0),
            "slow_disconnects": transport.get("slow_disconnects", 0),
            "displacements_refused": transport.get("displacements_refused", 0),
            "ack_flush_failures": self.flush_failures, "last_ack_flush_error": self.last_flush_error,
            "recent_ack_latencies_s": list(self.recent_latencies_s)[-200:],
            "serving_certificate": self._serving_status(),
        }

    def _serving_status(self) -> dict[str, Any]:
        cur = self.signing.current_serving
        if cur is None:
            return {}
        return {"identities": list(cur.identities), "not_after_s": cur.not_after_s, "renew_at_s": cur.renew_at_s,
                "generation": cur.generation, "renewals": self.signing.serving_renewals,
                "last_renewal": self.last_serving_renewal}

    def trigger_to_ack(self, clear: bool = False) -> list[float]:
        out = list(self.trigger_to_ack_s)
        if clear:
            self.trigger_to_ack_s.clear()
        return out

    def trust_view(self, now_s: float | None = None) -> dict[str, Any]:
        """`meshfed trust --controller`: the offline view's data, fed with the live CAs' material."""
        from federation.controller.queries import trust_view

        return trust_view(self.signing.trust_domains, self.signing.cas, self.clock() if now_s is None else now_s)
