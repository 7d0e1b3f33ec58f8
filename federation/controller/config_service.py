"""The config service: the controller's state owner, as a plain class.

It holds everything that must live in one process on one node: the sqlite store
(`controller.sqlite`), the CA keys (`signing.SigningPolicy`, which never lets a CA be pickled),
the bootstrap tokens, the status API's token, the TokenReview clients of the clusters
(`clusters.kube.auth`, one per cluster of the applied fleet: a proxy's ServiceAccount token is
reviewed by its own cluster only), and the `distributor.ConfigDistributor` with every proxy's
desired and acknowledged config. `federation.ray` pins the actor hosting it to the driver's node and gives
the other actors the store through it; `federation.server.grpc_services.ConfigServer` serves
its distributor and signing policy to proxies.

- **Epoch**: bumped in the store when the service starts, so a restarted service (or a second
  controller) fences the previous one (see the distributor's split-brain rule). A fresh service
  knows no desired configs; its first `apply_deltas` from an unknown base answers "resync" and
  the reconciler sends everything in full.
- **The state directory** is this service's alone: the host takes its lock
  (`federation.controller.statelock`) before constructing it and hands it over; status names the
  holder. A state directory this service found empty (the store's origin `fresh`) is logged as
  such, with what to do if it replaces a lost one (`meshfed controller restore`).
- **ACK/NACK records**: the distributor reports each settled push; the service keeps the latest
  ACK and the latest NACK per proxy (bounded by the number of proxies, however fast they reply)
  and writes them to the store every `flush_interval_s` in one transaction, so a push wave to
  1,000 proxies costs one write, not 1,000. The write runs on a worker thread, never on the event
  loop that serves the proxies' streams (a busy database waits up to the store's busy timeout).
  A failed write ("database is locked", a full disk) is counted, logged (rate-limited) and retried
  with the next batch; the flusher never dies of it.
- **Retention**: every `prune_interval_s` the flusher also prunes the store's history older than
  the retention (the Federation's `historyRetention`, or the `--history-retention` override).
- **Rollout**: `rollout(revision, proxies)` reports, per rendered proxy, whether it runs the
  revision (the facts `federation.core.rollout` decides "applied" from).
- **Cluster removal** (`federation.core.removal`): `set_draining` keeps a removed cluster's
  proxies authorized while it drains (their unused bootstrap tokens stay valid, its API still
  reviews their ServiceAccount tokens); `remove_cluster` forgets its proxies, their records and
  its bootstrap credentials (the unused tokens of its proxies, its TokenReview client).
- **Status**: the distributor's per-proxy sync states and counters plus what the transport
  reports (ports, health reports, slow disconnects), the lock holder, the state's origin, history,
  the serving certificates' expiry, and per proxy the certificate issued to it that expires first
  (`signing.ProxyCertificates`).
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
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from federation.controller.api_token import ensure_api_token
from federation.controller.bootstrap import BootstrapTokens
from federation.controller.distributor import AckEvent, ConfigDistributor
from federation.controller.shard import apply_config_deltas, rollout_facts
from federation.controller.signing import (
    TOKEN_AUDIENCE,
    BootstrapVerdict,
    SigningPolicy,
    check_service_account,
    cluster_named_by,
)
from federation.controller.statelock import StateDirLock
from federation.controller.store import DEFAULT_RETENTION_S, ORIGIN_FRESH, Store
from gitops.model import ConfigSnapshot
from ztunnel.api.clock import calendar_now, calendar_wait_s
from ztunnel.api.logsetup import printable
from ztunnel.api.secret_files import write_secret

CONTROLLER_ROOTS_FILE = "controller-roots.pem"    # public: every CA's authorities, pooled (tools)
TRUST_ANCHORS_DIR = "roots"                       # public: roots/<td>.pem, a proxy's first trust anchor
FLUSH_INTERVAL_S = 0.2
SERVING_CHECK_MAX_S = 60.0
MAX_SA_TOKEN_CHARS = 16 * 1024
PRUNE_INTERVAL_S = 600.0
FLUSH_LOG_EVERY_S = 30.0
RECENT_ACK_LATENCIES = 500
TRIGGER_TO_ACK_SAMPLES = 5000
LOGGED_PROXY_NAMES = 10        # a log line names at most this many proxies, then "and N more"

log = logging.getLogger(__name__)


def _names(proxies: list[str]) -> str:
    shown = ", ".join(proxies[:LOGGED_PROXY_NAMES])
    return shown + (f" and {len(proxies) - LOGGED_PROXY_NAMES} more" if len(proxies) > LOGGED_PROXY_NAMES else "")



def fresh_state_message(state_dir: str) -> str:
    """What a controller that found its state directory empty tells the operator."""
    return (f"the state directory {state_dir} was empty: this controller created new CA roots, a new store and "
            f"new bootstrap credentials. If proxies ran against an earlier controller (its state directory was "
            f"lost), they cannot verify this one and keep serving their last good config: stop this controller "
            f"and run `meshfed controller restore --state-dir {state_dir} BACKUP` with the latest `meshfed "
            f"controller backup`; without a backup, give every proxy its trust domain's new roots ({state_dir}/"
            f"{TRUST_ANCHORS_DIR}/<trust-domain>.pem) and restart it (on Kubernetes it bootstraps with its "
            f"ServiceAccount token; a proxy provisioned by hand needs `meshfed controller bootstrap-token`)")


class ConfigService:
    """Invariants: `epoch` is greater than that of any earlier service on this state directory;
    `dist` holds this epoch's sessions only; the pending ACK/NACK maps hold at most one entry per
    proxy; a CA's keys never leave `signing`."""

    def __init__(self, state_dir: str | Path, insecure: bool = False, store: Store | None = None,
                 clock: Callable[[], float] = calendar_now, flush_interval_s: float = FLUSH_INTERVAL_S,
                 lock: StateDirLock | None = None, history_retention_s: float | None = None,
                 prune_interval_s: float = PRUNE_INTERVAL_S, kubeconfig: str | None = None,
                 token_reviewer: Callable[..., Any] | None = None,
                 history_clock: Callable[[], float] = time.time) -> None:
        """`lock`: the state directory's lock, held (the host takes it first); `history_retention_s`
        overrides the Federation's `historyRetention`; `kubeconfig`: where the clusters' contexts are
        (for the TokenReviews of proxies' ServiceAccount tokens). `clock` is the calendar (certificates,
        bootstrap tokens: `ztunnel.api.clock`); `history_clock` stamps and prunes the history."""
        self.state_dir = str(state_dir)
        self.insecure = insecure
        self.clock = clock   # the calendar: certificates, bootstrap tokens (`ztunnel.api.clock`)
        # the history (ACKs, revisions, failover events) is stamped on the wall clock, and pruned on it
        self.history_clock = history_clock
        # cluster -> (kubeconfig, context) of the applied fleet, and a TokenReview client per cluster
        # (`token_reviewer(cluster, kubeconfig, context)` makes one; tests give a fake)
        self.kubeconfig = kubeconfig
        self._reviewer_factory = token_reviewer
        self._cluster_apis: dict[str, tuple[str | None, str]] = {}
        self._reviewers: dict[str, tuple[tuple[str | None, str], Any]] = {}
        self.flush_interval_s = flush_interval_s
        self.lock = lock
        self.store = store if store is not None else Store.in_state_dir(self.state_dir, clock=clock)
        self.epoch = self.store.bump_epoch(history_clock())   # orders incarnations in real time, not on the calendar
        self.origin = self.store.origin()
        self.dist = ConfigDistributor(self.epoch)
        self.dist.first_epoch = self.origin["first_epoch"] or self.epoch
        self.dist.listeners.append(self.on_ack)
        self.retention_override_s = history_retention_s
        self.retention_s = history_retention_s or DEFAULT_RETENTION_S
        self.prune_interval_s = prune_interval_s
        self.last_prune_s = 0.0
        self.pruned: dict[str, int] = {}
        self.flushes = 0
        self._flush_failing = False
        self._last_flush_log_s = -FLUSH_LOG_EVERY_S
        if self.store.created:
            log.warning("meshfed controller: %s", fresh_state_message(self.state_dir))
        self.bootstrap = BootstrapTokens(self.state_dir, clock)
        self.signing = SigningPolicy(self.state_dir, self.store, self._rendered_identities, clock)
        self._seq = itertools.count(1)
        self._acks: dict[str, tuple[int, tuple[str, int, int, str]]] = {}   # proxy -> (seq, ack record)
        self._nacks: dict[str, tuple[int, str]] = {}                        # proxy -> (seq, error)
        self._acks_to_log: dict[str, str] = {}                              # proxy -> revision (per flush)
        self._synced_revision = ""                                         # all proxies SYNCED at it (logged)
        self.flush_failures = 0
        self.last_flush_error = ""
        self.recent_latencies_s: deque[float] = deque(maxlen=RECENT_ACK_LATENCIES)
        self.trigger_to_ack_s: deque[float] = deque(maxlen=TRIGGER_TO_ACK_SAMPLES)
        self._flusher: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self.last_serving_renewal = ""

    # --- CAs and credentials --------------------------------------------------------------------

    def status_api_token(self) -> str:
        """The status API's bearer token (`api_token`): created 0600 in the state directory on
        first use, the same across restarts."""
        return ensure_api_token(self.state_dir)

    def ensure_cas(self, snap: ConfigSnapshot) -> dict[str, tuple[str, ...]]:
        """Load or create the CA of every trust domain of a snapshot (expired bootstrap tokens are
        pruned); remember each cluster's API for TokenReviews; write the roots proxies verify the
        controller with (`roots/<td>.pem`, and `controller-roots.pem` pooled); re-issue the serving
        certificates if the CA material changed. Returns PEM roots per trust domain."""
        out = self.signing.load_cas(snap)
        self.bootstrap.prune()
        # a draining cluster is no longer in the snapshot, but its proxies may still bootstrap with
        # their ServiceAccount token (reviewed by that cluster) until its drain is over
        self._cluster_apis = {**{c: a for c, a in self._cluster_apis.items() if c in self.signing.draining_tds},
                              **{name: (c.api.kubeconfig or self.kubeconfig, c.api.context)
                                 for name, c in snap.clusters.items()}}
        self._write_trust_anchors()
        self.renew_serving_certificates()  # a rotated root: new handshakes get a chain proxies trust
        if self.retention_override_s is None:
            self.retention_s = snap.federation.history_retention_s
        return out

    # --- cluster removal ------------------------------------------------------------------------

    def set_draining(self, clusters: Mapping[str, str]) -> None:
        """Clusters (-> trust domain) removed from the fleet but still draining: their proxies
        stay authorized, and their unused bootstrap tokens valid (`federation.core.removal`)."""
        self.signing.draining_tds = dict(clusters)

    def remove_cluster(self, cluster: str, why: str) -> list[str]:
        """The drain of `cluster` is over: forget its proxies (sessions, streams, records) and
        revoke its bootstrap credentials (its proxies' unused tokens; its API is no longer asked
        to review ServiceAccount tokens). Returns the proxies forgotten. In two parts for the
        host: `forget_cluster_sessions` on the event loop (the distributor is the loop's),
        `forget_cluster_records` on a worker thread (sqlite and files)."""
        return self.forget_cluster_records(cluster, self.forget_cluster_sessions(cluster, why), why)

    def forget_cluster_sessions(self, cluster: str, why: str) -> list[str]:
        self.signing.draining_tds.pop(cluster, None)
        if cluster not in self.signing.cluster_tds:   # (re-added meanwhile: it is a member again)
            self._cluster_apis.pop(cluster, None)
            self._reviewers.pop(cluster, None)
        return self.dist.forget_cluster(cluster, why)

    def forget_cluster_records(self, cluster: str, forgotten: Iterable[str], why: str) -> list[str]:
        forgotten = list(forgotten)
        gone = [p for p in self.store.proxy_acks() if p.split("/")[1:2] == [cluster]]
        self.store.forget_proxies(sorted(set(gone) | set(forgotten)))
        self.signing.forget_proxies(set(gone) | set(forgotten))
        revoked = self.bootstrap.revoke([cluster])
        log.info("meshfed controller: cluster %s removed: forgot %d proxies, revoked %d unused bootstrap tokens (%s)",
                 cluster, len(forgotten), len(revoked), why)
        return sorted(set(gone) | set(forgotten))

    # --- rollout --------------------------------------------------------------------------------

    def rollout(self, revision: str, proxy_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Per rendered proxy, whether it runs `revision` (`shard.rollout_facts`)."""
        return rollout_facts(self.dist, revision, proxy_ids)

    def _write_trust_anchors(self) -> None:
        """Public, but written atomically like secrets: a proxy never reads a torn roots file."""
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
            # a simulated calendar may jump past the renewal time: look again within a second then
            await asyncio.sleep(calendar_wait_s(min(SERVING_CHECK_MAX_S, max(1.0, left_s))))

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
        on its bounded executor, `bootstrap_gate.BootstrapAdmission` deciding who may), then judged
        by `signing.check_service_account`; a bootstrap token is checked against the tokens file (`consume_bootstrap` uses it up once a certificate was issued)."""
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
        answer, changed = apply_config_deltas(self.dist, blob)
        if answer != "ok":
            return answer
        woken = self.dist.set_desired(changed)
        if woken:
            revs = sorted({c.stamp.revision[:8] for c in changed.values()})
            names = sorted(changed)
            log.info("pushing new config (revision %s) to %d proxies: %s", ", ".join(revs), woken, _names(names),
                     extra={"fields": {"event": "ConfigPushed", "revisions": revs, "proxies": names[:100],
                                       "count": woken}})
        return "ok"

    # --- acknowledgements ------------------------------------------------------------------------

    def on_ack(self, ev: AckEvent) -> None:
        seq = next(self._seq)
        if ev.nack:
            self._nacks[ev.proxy_id] = (seq, ev.error)
            log.warning("proxy %s NACKed version %d.%d of revision %s: %s (it keeps running its previous config)",
                        ev.proxy_id, ev.stamp.epoch, ev.stamp.version, ev.stamp.revision[:8], printable(ev.error, 2048),
                        extra={"fields": {"event": "ConfigNacked", "proxy": ev.proxy_id, "revision": ev.stamp.revision,
                                          "version": f"{ev.stamp.epoch}.{ev.stamp.version}", "error": ev.error}})
        else:
            self._acks[ev.proxy_id] = (seq, (ev.proxy_id, ev.stamp.epoch, ev.stamp.version, ev.stamp.revision))
            self._acks_to_log[ev.proxy_id] = ev.stamp.revision
        self.recent_latencies_s.append(ev.latency_s)
        self.trigger_to_ack_s.append(ev.trigger_to_ack_s)

    def flush(self) -> None:
        """Write the pending ACKs and NACKs: each proxy's latest ACK, then its NACK if that came
        later (so a NACK after an ACK shows, and an ACK after a NACK clears it). Safe on a worker
        thread: the pending maps are swapped, never iterated while the loop adds to them."""
        self._log_acks()
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
            self._flush_failing = True
            self._acks = {**acks, **self._acks}
            self._nacks = {**nacks, **self._nacks}
            now = time.monotonic()
            if now - self._last_flush_log_s >= FLUSH_LOG_EVERY_S:
                self._last_flush_log_s = now
                log.warning("meshfed controller: could not record %d ACK/NACK records in %s (%s); retrying with "
                            "the next batch (%d failures so far)", len(acks) + len(nacks), self.store.path,
                            self.last_flush_error, self.flush_failures)
            return
        if acks or nacks:
            self.flushes += 1
            if self._flush_failing:
                log.warning("meshfed controller: ACK/NACK records written again (%d failures so far, last: %s)",
                            self.flush_failures, self.last_flush_error)
                self._flush_failing = False

    def prune_due(self) -> bool:
        return self.history_clock() - self.last_prune_s >= self.prune_interval_s

    def prune(self) -> None:
        """Delete history older than the retention (see the store); failures are logged and retried
        at the next interval."""
        now = self.history_clock()
        self.last_prune_s = now
        try:
            deleted = self.store.prune(now, self.retention_s)
        except Exception as e:
            log.warning("meshfed controller: pruning the history in %s failed (%s: %s); retrying in %.0f s",
                        self.store.path, type(e).__name__, e, self.prune_interval_s)
            return
        for k, v in deleted.items():
            self.pruned[k] = self.pruned.get(k, 0) + v

    def _log_acks(self) -> None:
        """One line per revision for the ACKs since the last flush (not one per proxy), and one when
        every proxy is SYNCED at the same revision."""
        pending, self._acks_to_log = self._acks_to_log, {}
        by_rev: dict[str, list[str]] = {}
        for pid, rev in pending.items():
            by_rev.setdefault(rev, []).append(pid)
        for rev, pids in sorted(by_rev.items()):
            pids.sort()
            log.info("%d proxies ACKed revision %s: %s", len(pids), rev[:8], _names(pids),
                     extra={"fields": {"event": "ConfigAcked", "revision": rev, "proxies": pids[:100],
                                       "count": len(pids)}})
        if not pending:
            return
        sessions = list(self.dist.sessions.values())
        revs = {s.desired.stamp.revision for s in sessions if s.desired is not None}
        synced = all(s.sync.value == "SYNCED" for s in sessions)
        if synced and len(revs) == 1 and sessions:
            rev = next(iter(revs))
            if rev != self._synced_revision:
                self._synced_revision = rev
                log.info("all %d proxies SYNCED at revision %s", len(sessions), rev[:8],
                         extra={"fields": {"event": "ProxiesSynced", "revision": rev, "count": len(sessions)}})

    def start_flushing(self) -> None:
        """Flush every `flush_interval_s` on the running event loop (idempotent)."""
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())

    async def _flush_loop(self) -> None:
        """Never dies: each round is guarded, the writes run on a worker thread."""
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await asyncio.to_thread(self.flush)
                if self.prune_due():
                    await asyncio.to_thread(self.prune)
            except Exception as e:  # pragma: no cover - flush and prune catch their own; belt and braces
                self.flush_failures += 1
                self.last_flush_error = f"{type(e).__name__}: {e}"

    async def stop(self) -> None:
        for task in (self._flusher, self._renewer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._flusher = self._renewer = None
        self.flush()

    # --- queries ------------------------------------------------------------------------------

    def disk_facts(self) -> dict[str, Any]:
        """What status reads from the state directory (sqlite, the lock file): the host gathers it
        on a worker thread and passes it to `status`, which then touches memory only."""
        return {"ever_acked": self.store.ever_acked(), "lock": self._lock_holder()}

    def status(self, transport: Mapping[str, Any], disk: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The service's status; `transport` adds what the gRPC server knows (port, bootstrap_port,
        health_reports, health_reports_dropped, slow_disconnects, displacements_refused, streams_expired); `disk`: `disk_facts()` (read here when not given)."""
        disk = self.disk_facts() if disk is None else disk
        st = self.dist.status()
        for p in st:   # what `meshfed check` judges each proxy's certificate expiry by
            certs = self.signing.proxy_certificates(p["proxy"])
            p["certificate"] = certs.as_dict() if certs is not None else None
        return {
            "epoch": self.epoch, "port": transport.get("port", 0), "bootstrap_port": transport.get("bootstrap_port", 0),
            "counts": self.dist.counts(), "proxies": st,
            "pushes": sum(p["pushes"] for p in st), "acks": sum(p["acks"] for p in st),
            "nacks": sum(p["nacks"] for p in st), "stale_epoch_refusals": self.dist.stale_epoch_refusals,
            "health_reports": transport.get("health_reports", 0),
            "health_reports_dropped": transport.get("health_reports_dropped", 0),
            "slow_disconnects": transport.get("slow_disconnects", 0),
            "displacements_refused": transport.get("displacements_refused", 0),
            "streams_expired": transport.get("streams_expired", 0),
            "ack_flush_failures": self.flush_failures, "last_ack_flush_error": self.last_flush_error,
            "recent_ack_latencies_s": list(self.recent_latencies_s)[-200:],
            "lock": disk["lock"],
            "state": self.state_status(bool(disk["ever_acked"])),
            "history": {"retention_s": self.retention_s, "last_prune_s": self.last_prune_s, "pruned": dict(self.pruned)},
            "forgotten": [{"proxy": p, "why": why, "at_s": at} for p, (why, at) in list(self.dist.forgotten.items())[-20:]],
            "serving_certificate": self._serving_status(),
        }

    def _serving_status(self) -> dict[str, Any]:
        cur = self.signing.current_serving
        if cur is None:
            return {}
        return {"identities": list(cur.identities), "not_after_s": cur.not_after_s, "renew_at_s": cur.renew_at_s,
                "generation": cur.generation, "renewals": self.signing.serving_renewals,
                "last_renewal": self.last_serving_renewal}

    def _lock_holder(self) -> dict[str, Any] | None:
        holder = self.lock.holder() if self.lock is not None else None
        return holder.as_dict() if holder is not None else None

    def state_status(self, ever_acked_in_store: bool | None = None) -> dict[str, Any]:
        """Where this controller's state came from, and whether the fleet looks orphaned by a lost
        state directory (the inputs of `checks`)."""
        stored = self.store.ever_acked() if ever_acked_in_store is None else ever_acked_in_store
        return {**self.origin, "fresh": self.origin["origin"] == ORIGIN_FRESH, "created_now": self.store.created,
                "ever_acked": stored or any(s.acks for s in self.dist.sessions.values()),
                "foreign_epoch_proxies": len(self.dist.foreign_hellos),
                "foreign_epoch_examples": list(self.dist.foreign_hellos)[-5:],
                "message": fresh_state_message(self.state_dir)}

    def trigger_to_ack(self, clear: bool = False) -> list[float]:
        out = list(self.trigger_to_ack_s)
        if clear:
            self.trigger_to_ack_s.clear()
        return out

    def trust_view(self, now_s: float | None = None) -> dict[str, Any]:
        """`meshfed trust --controller`: the offline view's data, fed with the live CAs' material."""
        from federation.controller.queries import trust_view

        return trust_view(self.signing.trust_domains, self.signing.cas, self.clock() if now_s is None else now_s)
