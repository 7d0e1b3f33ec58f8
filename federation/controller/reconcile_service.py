"""The reconciler's process as a plain class: the loop that drives `reconciler.Reconciler`, the
outbox that sends only what changed to the config service, and the queries answered from the
live state.

`ReconcileService` owns one thread (`start`/`stop`) that calls `step(now_s)`:

- when the debouncer is due, reconcile;
- otherwise, once every `tick_interval_s` while a snapshot is applied, reconcile anyway: leases
  and ejections expire with time, not with input, so the core must be ticked.

Inputs (`on_snapshot`, `on_fleet_error`, `on_observation`, `on_health`, ...) only mark the
reconciler dirty and wake the thread. Everything the reconciler touches goes through one lock:
inputs, `step` and queries.

The thread never dies of a step: one that raises is counted, logged (rate-limited) and the loop
goes on after `LOOP_FAILURE_BACKOFF_S`. `last_step_at_s` moves only when a step completes (the
loop completes one at least every `IDLE_WAIT_S`), so a loop that is stuck or failing every turn
shows in status as an old `last_step_at_s`, which `meshfed check` reports (`checks.LOOP_STALL_S`).

`ShardedOutbox` (one config service: `DeltaOutbox`, its one-shard case; several:
`federation.controller.shard`) keeps, per proxy, the config its service accepted and sends only
differences (`wire.encode_config_deltas`), and a removal for a proxy no longer rendered (the
service forgets it). A send that raises changes nothing of that record (the reconciler retries
with backoff); when the service answers "resync" (it restarted and holds nothing, or our idea of
its base is wrong) the outbox sends every config in full.

The store, the push, the rollout facts, the cluster operations and the CAs' roots are injected:
`federation.ray` passes adapters that reach the state owner over Ray; tests pass plain objects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from federation.controller import queries
from federation.controller.reconciler import (
    ClusterOps,
    CoreRender,
    Debouncer,
    EndpointReport,
    Reconciler,
    RenderFn,
    RolloutFn,
)
from federation.controller.shard import shard_of
from federation.controller.wire import encode_config_deltas, encode_removals, encode_shard_configs
from gitops.model import ConfigSnapshot
from ztunnel.api.clock import calendar_now, steady_wall_clock
from ztunnel.api.config import ProxyConfig

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 1.0
IDLE_WAIT_S = 0.5
LOOP_FAILURE_BACKOFF_S = 1.0     # after a step raised: do not spin on a failure that repeats
LOOP_LOG_EVERY_S = 30.0          # a failure that repeats is logged at most this often


PushDeltas = Callable[[bytes], str]                                  # blob -> "ok" | "resync"
BundleRoots = Callable[[ConfigSnapshot], Mapping[str, tuple[str, ...]]]


SendAll = Callable[[Mapping[int, bytes]], Mapping[int, "str | BaseException"]]   # shard -> blob => answer


class ShardDeliveryError(RuntimeError):
    """Some shards did not take their deltas (the others did: only the failed ones are retried)."""


class ShardedOutbox:
    """The outbox over `shards` config services, each serving a partition of the proxies
    (`federation.controller.shard.shard_of`, the one partition decision).

    Invariant: `sent[k][p]` is what shard k accepted for proxy p (it holds that config unless it
    restarted since, which its "resync" answer reveals), and p belongs to shard k. One push sends
    every shard its part at once (`send_all`: the Ray adapter issues the calls together and waits
    for all), then settles each shard on its own answer: "ok" records what it took; "resync" (it
    restarted and holds nothing) sends it everything in full, as the first send to a shard is
    (`in_sync`); a failure (an exception as its answer) records nothing for that shard,
    and the push raises after the others were recorded, so the reconciler's retry (with backoff)
    sends the failed shard the same deltas and the others nothing (their proxies' configs are the
    ones recorded: skipped by identity). A failed shard never loses a push, and never holds up
    the others' proxies."""

    def __init__(self, send_all: SendAll, shards: int = 1) -> None:
        if shards < 1:
            raise ValueError(f"an outbox needs at least one shard, not {shards}")
        self.send_all = send_all
        self.shards = shards
        self.sent: list[dict[str, ProxyConfig]] = [{} for _ in range(shards)]
        self.in_sync: set[int] = set()    # shards that took a complete set (the first send to one is)
        self.resyncs = 0

    @property
    def last_sent(self) -> dict[str, ProxyConfig]:
        return {pid: cfg for part in self.sent for pid, cfg in part.items()}

    def _groups(self, configs: Mapping[str, ProxyConfig], skip_sent: bool) -> dict[int, dict[str, ProxyConfig]]:
        groups: dict[int, dict[str, ProxyConfig]] = {}
        for pid, cfg in configs.items():
            k = shard_of(pid, self.shards)
            if skip_sent and self.sent[k].get(pid) is cfg:
                continue   # this shard already took exactly this (a retry after another shard failed)
            groups.setdefault(k, {})[pid] = cfg
        return groups

    def _encode(self, k: int, configs: Mapping[str, ProxyConfig], full: bool) -> bytes:
        """A shard takes its proxies' configs whole, shared objects written once
        (`wire.encode_shard_configs`: no per-proxy copies of a shared view)."""
        return encode_shard_configs(configs, full=full)

    def _encode_removals(self, k: int, proxy_ids: Sequence[str]) -> bytes:
        return encode_shard_configs({}, proxy_ids)

    def _exchange(self, blobs: Mapping[int, bytes]) -> dict[int, str | BaseException]:
        if not blobs:
            return {}
        try:
            answers = dict(self.send_all(blobs))
        except Exception as e:   # the adapter itself failed: every shard of this exchange failed
            return {k: e for k in blobs}
        return {k: answers.get(k, RuntimeError(f"shard {k} gave no answer")) for k in blobs}

    @staticmethod
    def _raise(failed: Mapping[int, BaseException]) -> None:
        if not failed:
            return
        if len(failed) == 1:
            raise next(iter(failed.values()))
        first = next(iter(failed.values()))
        raise ShardDeliveryError(f"{len(failed)} config shards did not take their configs: "
                                 + "; ".join(f"shard {k}: {type(e).__name__}: {e}" for k, e in sorted(failed.items()))
                                 ) from first

    def push(self, changed: Mapping[str, ProxyConfig]) -> None:
        """Send `changed` as deltas from what each shard was last sent. Raises if a shard did not
        take its part (nothing recorded for that shard); a shard answering "resync" gets everything."""
        groups = self._groups(changed, skip_sent=True)
        first = {k: {**self.sent[k], **g} for k, g in groups.items() if k not in self.in_sync}
        answers = self._exchange({k: self._encode(k, g, full=False) for k, g in groups.items() if k in self.in_sync})
        failed: dict[int, BaseException] = {}
        full: dict[int, dict[str, ProxyConfig]] = {}
        for k, answer in answers.items():
            if isinstance(answer, BaseException):
                failed[k] = answer
            elif answer == "resync":
                full[k] = {**self.sent[k], **groups[k]}
            else:
                self.sent[k].update(groups[k])
        if full:
            self.resyncs += 1
        failed.update(self._send_full({**first, **full}))
        self._raise(failed)

    def _send_full(self, current: Mapping[int, Mapping[str, ProxyConfig]]) -> dict[int, BaseException]:
        if not current:
            return {}
        log.info("sending %d proxy configs in full to %d config service(s) (resyncs so far: %d)",
                 sum(len(c) for c in current.values()), len(current), self.resyncs)
        answers = self._exchange({k: self._encode(k, c, full=True) for k, c in current.items()})
        failed: dict[int, BaseException] = {}
        for k, answer in answers.items():
            if isinstance(answer, BaseException):
                failed[k] = answer
            else:
                self.sent[k] = dict(current[k])
                self.in_sync.add(k)
        return failed

    def remove(self, proxy_ids: Collection[str]) -> None:
        """The proxies are no longer rendered: their shards forget them."""
        groups: dict[int, list[str]] = {}
        for pid in proxy_ids:
            groups.setdefault(shard_of(pid, self.shards), []).append(pid)
        answers = self._exchange({k: self._encode_removals(k, ids) for k, ids in groups.items()})
        failed = {k: a for k, a in answers.items() if isinstance(a, BaseException)}
        for k, ids in groups.items():
            if k not in failed:
                for pid in ids:
                    self.sent[k].pop(pid, None)
        self._raise(failed)

    def resync(self, current: Mapping[str, ProxyConfig]) -> None:
        """Send every config of `current` in full (config services that restarted)."""
        groups = self._groups(current, skip_sent=False)
        for k in range(self.shards):
            groups.setdefault(k, {})   # a shard with no proxy left: it holds nothing either
        self.resyncs += 1
        self._raise(self._send_full(groups))


class DeltaOutbox(ShardedOutbox):
    """The outbox to one config service (the state owner): `send(blob) -> "ok" | "resync"`."""

    def __init__(self, send: PushDeltas) -> None:
        super().__init__(self._send_one, 1)
        self.send = send
        self.in_sync = {0}   # a delta from nothing is a full state: the service answers "resync" if it needs one

    def _send_one(self, blobs: Mapping[int, bytes]) -> dict[int, str | BaseException]:
        return {k: self.send(blob) for k, blob in blobs.items()}

    def _encode(self, k: int, configs: Mapping[str, ProxyConfig], full: bool) -> bytes:
        """The state owner takes per-proxy deltas from what it was last sent (or everything in full)."""
        return encode_config_deltas((None if full else self.sent[k].get(pid), cfg) for pid, cfg in configs.items())

    def _encode_removals(self, k: int, proxy_ids: Sequence[str]) -> bytes:
        return encode_removals(proxy_ids, self.sent[k])


class ReconcileService:
    def __init__(self, store: Any, push_deltas: PushDeltas, bundle_roots: BundleRoots | None = None,
                 debounce_after_s: float = 0.1, debounce_max_s: float = 10.0,
                 clock: Callable[[], float] | None = None, tick_interval_s: float = TICK_INTERVAL_S,
                 render: RenderFn | None = None, rollout: RolloutFn | None = None,
                 cluster_ops: ClusterOps | None = None, calendar: Callable[[], float] = calendar_now) -> None:
        """`render` defaults to the core (`CoreRender`, which loads the CAs through `bundle_roots`).
        `clock` is the elapsed clock (leases, debounce, ejections, backoff; default
        `steady_wall_clock()`: a wall-clock step must not expire every lease), `calendar` the
        dates (the root rotation gate compares leaves' not-after with it)."""
        self.clock = clock = clock if clock is not None else steady_wall_clock()
        self.tick_interval_s = tick_interval_s
        self._lock = threading.RLock()
        self.outbox = DeltaOutbox(push_deltas)
        self.render: RenderFn = render if render is not None else CoreRender(bundle_roots=bundle_roots)
        self.rec = Reconciler(self.render, self._push, store, Debouncer(debounce_after_s, debounce_max_s),
                              clock=clock, forget=self.outbox.remove, rollout=rollout, cluster_ops=cluster_ops,
                              calendar=calendar)
        self.ejections_detected = 0
        self.ejections_enforced = 0
        self._last_run_s = 0.0
        self.started_at_s: float | None = None
        self.last_step_at_s: float | None = None   # the end of the last step that completed
        self.loop_failures = 0
        self.last_loop_error = ""
        self._last_loop_log_s = -LOOP_LOG_EVERY_S
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def _push(self, changed: Mapping[str, ProxyConfig]) -> None:
        self.outbox.push(changed)

    # --- the loop ---------------------------------------------------------------------------

    def start(self) -> ReconcileService:
        if self._thread is None:
            self.started_at_s = self.clock()
            self._thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wait_s(self, now_s: float) -> float:
        """How long the loop may sleep before the next `step` (inputs wake it earlier)."""
        deadline = self.rec.deadline_s()
        return IDLE_WAIT_S if deadline is None else min(IDLE_WAIT_S, max(0.0, deadline - now_s))

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.turn():
                self._stop.wait(LOOP_FAILURE_BACKOFF_S)

    def turn(self) -> bool:
        """One turn of the loop: wait for an input or the next deadline, then `step`. False when
        it raised: the failure is counted and logged, never propagated (the loop must not die)."""
        try:
            self._wake.wait(self.wait_s(self.clock()))
            self._wake.clear()
            self.step(self.clock())
        except Exception as e:
            self.loop_failures += 1
            self.last_loop_error = f"{type(e).__name__}: {e}"
            now = time.monotonic()
            if now - self._last_loop_log_s >= LOOP_LOG_EVERY_S:
                self._last_loop_log_s = now
                log.exception("meshfed controller: a reconcile step failed (%d failures so far); the loop goes on",
                              self.loop_failures)
            return False
        self.last_step_at_s = self.clock()
        return True

    def loop_status(self) -> dict[str, Any]:
        """Whether the loop runs, and when it last completed a step (`checks`: a stalled loop)."""
        alive = self._thread is not None and self._thread.is_alive() and not self._stop.is_set()
        return {"alive": alive, "started_at_s": self.started_at_s, "last_step_at_s": self.last_step_at_s,
                "failures_total": self.loop_failures, "last_error": self.last_loop_error}

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
        self._wake.set()   # like every input: the loop re-evaluates now, not at its next timeout

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
        """True after a (re)start until a snapshot arrived: the driver then re-sends the inputs.
        Read under the lock: `step` moves the pending snapshot to the applied one."""
        with self._lock:
            return self.rec.snapshot is None and self.rec.pending_snapshot is None

    def snapshot(self) -> ConfigSnapshot | None:
        with self._lock:
            return self.rec.snapshot

    def resync(self) -> None:
        """Send every config in full, and the clusters still draining (the config service
        restarted and knows none of them)."""
        with self._lock:
            self.outbox.resync(self.rec.delivered)
            self.rec.restore_cluster_ops(self.clock())

    # --- queries -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            st = self.rec.status()
            st["durations_s"] = self.rec.durations_s[-200:]
            st["step_failures_total"] = len(self.rec.failures)
            st["ejections_detected"], st["ejections_enforced"] = self.ejections_detected, self.ejections_enforced
            st["fleet_clusters"] = self.rec.fleet_clusters()
            st["loop"] = self.loop_status()
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

    def graph(self) -> dict[str, Any]:
        with self._lock:
            return queries.graph(getattr(self.render, "engine", None))
