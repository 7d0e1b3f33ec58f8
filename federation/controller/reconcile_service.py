"""The reconciler's process as a plain class: the loop that drives `reconciler.Reconciler`, the
outbox that sends only what changed to the config service, and the queries answered from the
live state.

`ReconcileService` owns one thread (`start`/`stop`) that calls `step(now_s)`:

- when the debouncer is due, reconcile;
- otherwise, once every `tick_interval_s` while a snapshot is applied, reconcile anyway: leases
  and ejections expire with time, not with input, so the core must be ticked.

Inputs (`on_snapshot`, `on_observation`, `on_health`, ...) only mark the reconciler dirty and wake
the thread. Everything the reconciler touches goes through one lock: inputs, `step` and queries.

`DeltaOutbox` keeps, per proxy, the config it last sent to the config service and sends only
differences (`wire.encode_config_deltas`). When the service answers "resync" (it restarted and
holds nothing, or our idea of its base is wrong) the outbox sends every config in full.

The store, the push and the CAs' roots are injected: `federation.ray` passes adapters that reach
the state owner over Ray; tests pass plain objects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from federation.controller import queries
from federation.controller.reconciler import CoreRender, Debouncer, EndpointReport, Reconciler, RenderFn
from federation.controller.wire import encode_config_deltas
from gitops.model import ConfigSnapshot
from ztunnel.api.config import ProxyConfig

TICK_INTERVAL_S = 1.0
IDLE_WAIT_S = 0.5

PushDeltas = Callable[[bytes], str]                                  # blob -> "ok" | "resync"
BundleRoots = Callable[[ConfigSnapshot], Mapping[str, tuple[str, ...]]]


class DeltaOutbox:
    """Invariant: `last_sent[p]` is what the config service was last sent for proxy p (it holds
    that config unless it answered "resync")."""

    def __init__(self, send: PushDeltas) -> None:
        self.send = send
        self.last_sent: dict[str, ProxyConfig] = {}
        self.resyncs = 0

    def push(self, changed: Mapping[str, ProxyConfig], current: Mapping[str, ProxyConfig]) -> None:
        """Send `changed` as deltas from what was last sent; `current` is every rendered config
        (proxies no longer in it are dropped from the outbox; a resync sends all of it)."""
        blob = encode_config_deltas((self.last_sent.get(pid), cfg) for pid, cfg in changed.items())
        self.last_sent.update(changed)
        for pid in set(self.last_sent) - set(current):
            del self.last_sent[pid]
        if self.send(blob) == "resync":
            self.resync(current)

    def resync(self, current: Mapping[str, ProxyConfig]) -> None:
        self.resyncs += 1
        blob = encode_config_deltas((None, cfg) for cfg in current.values())
        self.last_sent = dict(current)
        self.send(blob)


class ReconcileService:
    def __init__(self, store: Any, push_deltas: PushDeltas, bundle_roots: BundleRoots | None = None,
                 debounce_after_s: float = 0.1, debounce_max_s: float = 10.0,
                 clock: Callable[[], float] = time.time, tick_interval_s: float = TICK_INTERVAL_S,
                 render: RenderFn | None = None) -> None:
        """`render` defaults to the core (`CoreRender`, which loads the CAs through `bundle_roots`)."""
        self.clock = clock
        self.tick_interval_s = tick_interval_s
        self._lock = threading.RLock()
        self.outbox = DeltaOutbox(push_deltas)
        self.render: RenderFn = render if render is not None else CoreRender(bundle_roots=bundle_roots)
        self.rec = Reconciler(self.render, self._push, store, Debouncer(debounce_after_s, debounce_max_s),
                              clock=clock)
        self.ejections_detected = 0
        self.ejections_enforced = 0
        self._last_run_s = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def _push(self, changed: Mapping[str, ProxyConfig]) -> None:
        self.outbox.push(changed, self.rec.configs)

    # --- the loop ---------------------------------------------------------------------------

    def start(self) -> ReconcileService:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wait_s(self, now_s: float) -> float:
        """How long the loop may sleep before the next `step` (inputs wake it earlier)."""
        deadline = self.rec.debounce.deadline_s()
        return IDLE_WAIT_S if deadline is None else max(0.0, deadline - now_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.wait_s(self.clock()))
            self._wake.clear()
            self.step(self.clock())

    def step(self, now_s: float) -> bool:
        """Reconcile if due, or tick the core if idle for `tick_interval_s`. True when it ran."""
        with self._lock:
            ran = False
            if self.rec.due(now_s):
                ran = self.rec.reconcile(now_s)
            elif (self.rec.snapshot is not None and self.rec.debounce.deadline_s() is None
                  and now_s - self._last_run_s >= self.tick_interval_s):
                # leases and ejections expire with time, not with input: tick the core
                ran = self.rec.reconcile(now_s, force=True)
            if ran:
                self._count_events()
                self._last_run_s = now_s  # only a run restarts the idle clock: waking is not running
            return ran

    def _count_events(self) -> None:
        for ev in self.rec.events[-50:]:
            if type(ev).__name__ == "EndpointEjected":
                self.ejections_detected += 1
                self.ejections_enforced += int(bool(getattr(ev, "enforced", False)))
        self.rec.events.clear()

    # --- inputs ------------------------------------------------------------------------------

    def on_snapshot(self, snap: ConfigSnapshot) -> None:
        with self._lock:
            self.rec.on_snapshot(snap, self.clock())
        self._wake.set()

    def on_fallback_snapshot(self, snap: ConfigSnapshot) -> None:
        with self._lock:
            self.rec.on_fallback_snapshot(snap)
        self._wake.set()

    def on_fleet_error(self, sha: str, subject: str, problems: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            self.rec.on_fleet_error(sha, subject, problems, self.clock())

    def on_observation(self, obs: Any) -> None:
        with self._lock:
            # leases are judged on this clock: stamp the observation on receipt, not with the
            # agent's node clock (an agent sends as soon as it sees a change)
            now = self.clock()
            self.rec.on_observation(replace(obs, observed_at_s=now), now)
        self._wake.set()

    def on_health(self, proxy_id: str, outcomes: Sequence[EndpointReport]) -> None:
        with self._lock:
            self.rec.on_health(proxy_id, outcomes, self.clock())
        self._wake.set()

    def on_lease(self, cluster: str, age_s: float) -> None:
        """A cluster agent's heartbeat, "the API answered `age_s` ago", stamped with this clock (agents
        run on other nodes with other clocks); applied by the next tick (no render on its own)."""
        with self._lock:
            self.rec.on_lease(cluster, self.clock() - max(0.0, age_s))

    def missing_inputs(self) -> bool:
        """True after a (re)start until a snapshot arrived: the driver then re-sends the inputs."""
        return self.rec.snapshot is None and self.rec.pending_snapshot is None

    def snapshot(self) -> ConfigSnapshot | None:
        with self._lock:
            return self.rec.snapshot

    def resync(self) -> None:
        """Send every config in full (the config service restarted and knows none)."""
        with self._lock:
            self.outbox.resync(self.rec.configs)

    # --- queries -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            st = self.rec.status()
            st["durations_s"] = self.rec.durations_s[-200:]
            st["step_failures_total"] = len(self.rec.failures)
            st["ejections_detected"], st["ejections_enforced"] = self.ejections_detected, self.ejections_enforced
            st["fleet_clusters"] = queries.fleet_clusters(self.rec.snapshot)
            return st

    def services(self) -> list[dict[str, Any]]:
        with self._lock:
            return queries.services(self.rec.snapshot, self.rec.observations)

    def endpoints(self, service: str, from_cluster: str | None) -> dict[str, Any]:
        with self._lock:
            return queries.endpoints(self.rec.configs, service, from_cluster)

    def explain(self, service: str, from_cluster: str, zone: str | None) -> dict[str, Any]:
        with self._lock:
            engine = getattr(self.render, "engine", None)  # the live FailoverEngine of CoreRender
            return queries.explain(engine, service, from_cluster, zone)
