"""The config service: the controller's state owner, as a plain class.

It holds everything that must live in one process on one node: the sqlite store
(`controller.sqlite`), the CA keys (`signing.SigningPolicy`, which never lets a CA be pickled),
the bootstrap tokens, the status API's token, and the `distributor.ConfigDistributor` with every proxy's desired and
acknowledged config. `federation.ray` pins the actor hosting it to the driver's node and gives
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
  reports (ports, health reports, slow disconnects).
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

from federation.controller.api_token import ensure_api_token
from federation.controller.bootstrap import BootstrapTokens
from federation.controller.distributor import AckEvent, ConfigDistributor
from federation.controller.signing import SigningPolicy
from federation.controller.store import Store
from federation.controller.wire import decode_config_deltas
from gitops.model import ConfigSnapshot
from ztunnel.api.config import ProxyConfig, apply_delta

CONTROLLER_ROOTS_FILE = "controller-roots.pem"    # public: what proxies verify the controller with
FLUSH_INTERVAL_S = 0.2
RECENT_ACK_LATENCIES = 500
TRIGGER_TO_ACK_SAMPLES = 5000


class ConfigService:
    """Invariants: `epoch` is greater than that of any earlier service on this state directory;
    `dist` holds this epoch's sessions only; the pending ACK/NACK maps hold at most one entry per
    proxy; a CA's keys never leave `signing`."""

    def __init__(self, state_dir: str | Path, insecure: bool = False, store: Store | None = None,
                 clock: Callable[[], float] = time.time, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.state_dir = str(state_dir)
        self.insecure = insecure
        self.clock = clock
        self.flush_interval_s = flush_interval_s
        self.store = store if store is not None else Store.in_state_dir(self.state_dir)
        self.epoch = self.store.bump_epoch()
        self.dist = ConfigDistributor(self.epoch)
        self.dist.listeners.append(self.on_ack)
        self.bootstrap = BootstrapTokens(self.state_dir)
        self.signing = SigningPolicy(self.state_dir, self.store, self._rendered_identities, clock)
        self._seq = itertools.count(1)
        self._acks: dict[str, tuple[int, tuple[str, int, int, str]]] = {}   # proxy -> (seq, ack record)
        self._nacks: dict[str, tuple[int, str]] = {}                        # proxy -> (seq, error)
        self.flush_failures = 0
        self.last_flush_error = ""
        self.recent_latencies_s: deque[float] = deque(maxlen=RECENT_ACK_LATENCIES)
        self.trigger_to_ack_s: deque[float] = deque(maxlen=TRIGGER_TO_ACK_SAMPLES)
        self._flusher: asyncio.Task[None] | None = None

    # --- CAs and credentials --------------------------------------------------------------------

    def status_api_token(self) -> str:
        """The status API's bearer token (`api_token`): created 0600 in the state directory on
        first use, the same across restarts."""
        return ensure_api_token(self.state_dir)

    def ensure_cas(self, snap: ConfigSnapshot) -> dict[str, tuple[str, ...]]:
        """Load or create the CA of every trust domain of a snapshot; the bootstrap tokens of its
        clusters (kept across restarts) and the roots proxies verify the controller with
        (`controller-roots.pem`). Returns PEM roots per trust domain."""
        out = self.signing.load_cas(snap)
        self.bootstrap.ensure(sorted(self.signing.cluster_tds))
        (Path(self.state_dir) / CONTROLLER_ROOTS_FILE).write_bytes(self.signing.roots_pem())
        return out

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
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        self.flush()

    # --- queries ------------------------------------------------------------------------------

    def status(self, transport: Mapping[str, Any]) -> dict[str, Any]:
        """The service's status; `transport` adds what the gRPC server knows (port, bootstrap_port,
        health_reports, health_reports_dropped, slow_disconnects)."""
        st = self.dist.status()
        return {
            "epoch": self.epoch, "port": transport.get("port", 0), "bootstrap_port": transport.get("bootstrap_port", 0),
            "counts": self.dist.counts(), "proxies": st,
            "pushes": sum(p["pushes"] for p in st), "acks": sum(p["acks"] for p in st),
            "nacks": sum(p["nacks"] for p in st), "stale_epoch_refusals": self.dist.stale_epoch_refusals,
            "health_reports": transport.get("health_reports", 0),
            "health_reports_dropped": transport.get("health_reports_dropped", 0),
            "slow_disconnects": transport.get("slow_disconnects", 0),
            "ack_flush_failures": self.flush_failures, "last_ack_flush_error": self.last_flush_error,
            "recent_ack_latencies_s": list(self.recent_latencies_s)[-200:],
        }

    def trigger_to_ack(self, clear: bool = False) -> list[float]:
        out = list(self.trigger_to_ack_s)
        if clear:
            self.trigger_to_ack_s.clear()
        return out

    def trust_view(self, now_s: float | None = None) -> dict[str, Any]:
        """`meshfed trust --controller`: the offline view's data, fed with the live CAs' material."""
        from federation.controller.queries import trust_view

        return trust_view(self.signing.trust_domains, self.signing.cas, self.clock() if now_s is None else now_s)
