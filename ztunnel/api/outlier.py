"""Outlier detection with Envoy's semantics, as a sans-IO state machine per endpoint.

Shared by the data plane (each ztunnel ejects the backends *it* sees failing, inline) and by the
controller's failover engine (which aggregates what proxies report). Time is always an argument
(`now_s`, seconds on any monotonic clock); nothing here reads a clock or does I/O.

Semantics (envoy.config.cluster.v3.OutlierDetection, "consecutive" detectors):

- Outcomes are classified the way Envoy's outlier detector does it. With
  `split_external_local_origin_errors=False` (the default) locally originated errors (connect
  failure, reset before a response, timeout, any other local-origin failure) are mapped to gateway
  errors (503/504), so they count towards *both* `consecutive_gateway_errors` and
  `consecutive_5xx_errors`; an upstream HTTP 5xx counts towards 5xx only (and resets the gateway
  counter); an upstream 502/503/504 counts towards both. With the split on, local-origin errors count
  only towards `consecutive_local_origin_failures`, and upstream responses only towards the others.
- A success resets the consecutive counters (Envoy: a non-5xx code resets both external counters;
  in split mode a connection success resets the local-origin counter). `CONNECT_SUCCESS` (the
  connection came up, the request outcome is not known yet) is ignored unless the split is on.
- Reaching a threshold ejects *inline* (not at the next interval). The counter of that detector is
  reset on detection, so a further bout of errors is detected again.
- Ejection duration = base_ejection_time × multiplier, capped at max(max_ejection_time, base). The
  multiplier goes up by one on each ejection while the uncapped duration is below the cap, and goes
  down by one for every full `interval_s` the host spends healthy (Envoy decrements
  `ejectTimeBackoff` on every interval tick that finds the host not ejected). A host ejected once and
  then healthy for a while is therefore ejected for `base` again, not `2 × base`.
- maxEjectionPercent: an ejection is enforced only if `(active ejections + 1) / pool size` stays
  within the percentage (Envoy's check, not per priority). Otherwise it is *detected* but not
  enforced: an `EndpointEjected(enforced=False)` event is returned, the host stays HEALTHY, and the
  overflow is counted separately (`OutlierStats.overflow`). Note the trap: with 10 % a pool of fewer
  than 10 hosts can never eject anything.
- Un-ejection happens when the ejection expires. Envoy does it at the next interval tick after the
  expiry; here `is_ejected`/`ejected_keys` answer exactly at `until_s` and `tick`/`record` return
  the `EndpointUnejected` events, so callers need not tick on a fixed cadence.
- Errors reported for an endpoint that is already ejected (requests that were in flight) are
  ignored: they neither extend the ejection nor pile up in the counters.

Invariants:
- every key in `_hosts` is in the pool; a key recorded before `set_pool` joins the pool;
- a host is EJECTED only through `_transition`, whose table allows HEALTHY→EJECTED and
  EJECTED→HEALTHY; anything else raises `InvalidTransition`;
- `enforced_active` (the number of EJECTED hosts) never exceeds the maxEjectionPercent bound
  computed at the moment each ejection happened.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from ztunnel.api.config import OutlierPolicy


class HostState(str, Enum):
    HEALTHY = "Healthy"
    EJECTED = "Ejected"


class Transition(str, Enum):
    EJECT = "eject"
    UNEJECT = "uneject"


_TRANSITIONS: dict[tuple[HostState, Transition], HostState] = {
    (HostState.HEALTHY, Transition.EJECT): HostState.EJECTED,
    (HostState.EJECTED, Transition.UNEJECT): HostState.HEALTHY,
}


class InvalidTransition(RuntimeError):
    """A transition the table does not allow: a bug in the caller, never a runtime condition."""

    def __init__(self, key: str, state: HostState, transition: Transition) -> None:
        super().__init__(f"endpoint {key}: cannot {transition.value} from state {state.value}")
        self.key, self.state, self.transition = key, state, transition


def next_state(key: str, state: HostState, transition: Transition) -> HostState:
    try:
        return _TRANSITIONS[(state, transition)]
    except KeyError:
        raise InvalidTransition(key, state, transition) from None


class Outcome(str, Enum):
    """What one attempt to use an endpoint produced."""

    SUCCESS = "Success"                              # request/connection completed fine
    CONNECT_SUCCESS = "ConnectSuccess"               # connection established; request outcome pending
    CONNECT_FAILURE = "ConnectFailure"               # local origin: refused, unreachable, TLS failure
    RESET_BEFORE_RESPONSE = "ResetBeforeResponse"    # local origin: reset before any response byte
    TIMEOUT = "Timeout"                              # local origin: connect or response timeout
    LOCAL_ORIGIN_FAILURE = "LocalOriginFailure"      # any other locally originated failure
    HTTP_5XX = "Http5xx"                             # upstream answered 500, 501, 505, …
    HTTP_GATEWAY_ERROR = "HttpGatewayError"          # upstream answered 502, 503 or 504


LOCAL_ORIGIN_FAILURES = frozenset({
    Outcome.CONNECT_FAILURE, Outcome.RESET_BEFORE_RESPONSE, Outcome.TIMEOUT, Outcome.LOCAL_ORIGIN_FAILURE,
})


class EjectReason(str, Enum):
    CONSECUTIVE_GATEWAY_ERRORS = "ConsecutiveGatewayErrors"
    CONSECUTIVE_5XX_ERRORS = "Consecutive5xxErrors"
    CONSECUTIVE_LOCAL_ORIGIN_FAILURES = "ConsecutiveLocalOriginFailures"


@dataclass(frozen=True, slots=True)
class EndpointEjected:
    """An outlier was detected. `enforced=False`: maxEjectionPercent kept it in rotation."""

    key: str
    reason: EjectReason
    ejection_count: int     # times this endpoint has been ejected (enforced), including this one
    until_s: float          # when the ejection expires (== at_s when not enforced)
    enforced: bool
    at_s: float = 0.0
    multiplier: int = 0     # the backoff multiplier used: duration = base × multiplier (capped)
    consecutive: int = 0    # the error count that triggered it


@dataclass(frozen=True, slots=True)
class EndpointUnejected:
    key: str
    at_s: float
    ejected_for_s: float
    ejection_count: int


OutlierEvent = EndpointEjected | EndpointUnejected


@dataclass(slots=True)
class OutlierStats:
    """Envoy's `outlier_detection.*` counters, by reason where Envoy has them."""

    detected: dict[EjectReason, int] = field(default_factory=lambda: dict.fromkeys(EjectReason, 0))
    enforced: dict[EjectReason, int] = field(default_factory=lambda: dict.fromkeys(EjectReason, 0))
    overflow: int = 0
    unejected: int = 0

    @property
    def enforced_total(self) -> int:
        return sum(self.enforced.values())

    @property
    def detected_total(self) -> int:
        return sum(self.detected.values())


@dataclass(slots=True)
class _Host:
    state: HostState = HostState.HEALTHY
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    consecutive_local: int = 0
    multiplier: int = 0          # Envoy's ejectTimeBackoff
    decay_anchor_s: float = 0.0  # healthy intervals are counted from here
    ejections: int = 0
    ejected_at_s: float = 0.0
    until_s: float = 0.0


def _enabled(threshold: int | None) -> int:
    """None or 0 disables a detector (Istio: 0 turns consecutive5xxErrors off)."""
    return threshold if threshold is not None and threshold > 0 else 0


class OutlierDetector:
    """Per-endpoint outlier state for one load-balancing pool (one service as seen by one proxy)."""

    def __init__(self, policy: OutlierPolicy) -> None:
        self.policy = policy
        self.stats = OutlierStats()
        self._hosts: dict[str, _Host] = {}
        self._t_5xx = _enabled(policy.consecutive_5xx_errors)
        self._t_gateway = _enabled(policy.consecutive_gateway_errors)
        self._t_local = _enabled(policy.consecutive_local_origin_failures)
        self._split = policy.split_external_local_origin_errors
        self._base_s = policy.base_ejection_time_s
        self._cap_s = max(policy.max_ejection_time_s, policy.base_ejection_time_s)

    # --- pool -------------------------------------------------------------------------------

    def set_pool(self, keys: Iterable[str]) -> None:
        """The hosts of the pool (the denominator of maxEjectionPercent). Hosts that left the pool
        forget their state, as Envoy drops a removed host's monitor."""
        wanted = set(keys)
        for k in [k for k in self._hosts if k not in wanted]:
            del self._hosts[k]
        for k in wanted:
            self._hosts.setdefault(k, _Host())

    @property
    def pool_size(self) -> int:
        return len(self._hosts)

    def state_of(self, key: str) -> HostState:
        host = self._hosts.get(key)
        return host.state if host is not None else HostState.HEALTHY

    def multiplier_of(self, key: str, now_s: float) -> int:
        host = self._hosts.get(key)
        if host is None:
            return 0
        self._decay(host, now_s)
        return host.multiplier

    # --- queries ----------------------------------------------------------------------------

    def is_ejected(self, key: str, now_s: float) -> bool:
        host = self._hosts.get(key)
        return host is not None and host.state is HostState.EJECTED and now_s < host.until_s

    def ejected_keys(self, now_s: float) -> frozenset[str]:
        return frozenset(k for k, h in self._hosts.items()
                         if h.state is HostState.EJECTED and now_s < h.until_s)

    def next_expiry_s(self) -> float | None:
        """When `tick` next has something to do (a timer for the caller), or None."""
        times = [h.until_s for h in self._hosts.values() if h.state is HostState.EJECTED]
        return min(times) if times else None

    # --- inputs -----------------------------------------------------------------------------

    def tick(self, now_s: float) -> list[OutlierEvent]:
        """Un-eject every host whose ejection has expired at `now_s`."""
        events: list[OutlierEvent] = []
        for key in sorted(self._hosts):
            host = self._hosts[key]
            if host.state is HostState.EJECTED and host.until_s <= now_s:
                events.append(self._uneject(key, host, now_s))
        return events

    def record(self, endpoint_key: str, outcome: Outcome, now_s: float) -> list[OutlierEvent]:
        """Account one outcome; returns the ejections/un-ejections it caused (expiries first)."""
        events = self.tick(now_s)
        host = self._hosts.get(endpoint_key)
        if host is None:
            host = self._hosts[endpoint_key] = _Host(decay_anchor_s=now_s)
        if host.state is HostState.EJECTED:
            return events  # late results from in-flight requests
        reason = self._classify(host, outcome)
        if reason is not None:
            events.append(self._detect(endpoint_key, host, reason, now_s))
        return events

    # --- internals --------------------------------------------------------------------------

    def _classify(self, host: _Host, outcome: Outcome) -> EjectReason | None:
        """Update the counters for one outcome; return the detector that fired, if any."""
        local = outcome in LOCAL_ORIGIN_FAILURES
        if self._split:
            if local:
                host.consecutive_local += 1
                if self._t_local and host.consecutive_local >= self._t_local:
                    host.consecutive_local = 0
                    return EjectReason.CONSECUTIVE_LOCAL_ORIGIN_FAILURES
                return None
            if outcome is Outcome.CONNECT_SUCCESS:
                host.consecutive_local = 0
                return None
            if outcome is Outcome.SUCCESS:
                host.consecutive_local = 0
                host.consecutive_5xx = host.consecutive_gateway = 0
                return None
            return self._external_error(host, gateway=outcome is Outcome.HTTP_GATEWAY_ERROR)
        if outcome is Outcome.CONNECT_SUCCESS:
            return None  # not mapped to an HTTP code in Envoy: the request outcome will follow
        if outcome is Outcome.SUCCESS:
            host.consecutive_5xx = host.consecutive_gateway = 0
            return None
        return self._external_error(host, gateway=local or outcome is Outcome.HTTP_GATEWAY_ERROR)

    def _external_error(self, host: _Host, *, gateway: bool) -> EjectReason | None:
        if gateway:
            host.consecutive_gateway += 1
        else:
            host.consecutive_gateway = 0
        host.consecutive_5xx += 1
        # Envoy checks the gateway detector first; one ejection per outcome.
        if gateway and self._t_gateway and host.consecutive_gateway >= self._t_gateway:
            host.consecutive_gateway = 0
            return EjectReason.CONSECUTIVE_GATEWAY_ERRORS
        if self._t_5xx and host.consecutive_5xx >= self._t_5xx:
            host.consecutive_5xx = 0
            return EjectReason.CONSECUTIVE_5XX_ERRORS
        return None

    def _decay(self, host: _Host, now_s: float) -> None:
        if host.state is HostState.EJECTED:
            return
        if host.multiplier == 0:
            host.decay_anchor_s = now_s  # nothing to decay; healthy time before an ejection is moot
            return
        interval_s = self.policy.interval_s
        if interval_s <= 0:
            return
        steps = int((now_s - host.decay_anchor_s) // interval_s)
        if steps > 0:
            host.multiplier = max(0, host.multiplier - steps)
            host.decay_anchor_s += steps * interval_s

    def _active_ejections(self) -> int:
        return sum(1 for h in self._hosts.values() if h.state is HostState.EJECTED)

    def _detect(self, key: str, host: _Host, reason: EjectReason, now_s: float) -> EndpointEjected:
        self.stats.detected[reason] += 1
        consecutive = {
            EjectReason.CONSECUTIVE_GATEWAY_ERRORS: self._t_gateway,
            EjectReason.CONSECUTIVE_5XX_ERRORS: self._t_5xx,
            EjectReason.CONSECUTIVE_LOCAL_ORIGIN_FAILURES: self._t_local,
        }[reason]
        self._decay(host, now_s)
        ejected_pct = 100.0 * (self._active_ejections() + 1) / max(1, len(self._hosts))
        if ejected_pct > min(100, self.policy.max_ejection_percent):
            self.stats.overflow += 1
            return EndpointEjected(key, reason, host.ejections, now_s, False, now_s, host.multiplier, consecutive)
        if host.multiplier * self._base_s < self._cap_s:
            host.multiplier += 1
        duration_s = min(host.multiplier * self._base_s, self._cap_s)
        host.state = next_state(key, host.state, Transition.EJECT)
        host.ejections += 1
        host.ejected_at_s = now_s
        host.until_s = now_s + duration_s
        self.stats.enforced[reason] += 1
        return EndpointEjected(key, reason, host.ejections, host.until_s, True, now_s, host.multiplier, consecutive)

    def _uneject(self, key: str, host: _Host, now_s: float) -> EndpointUnejected:
        host.state = next_state(key, host.state, Transition.UNEJECT)
        host.consecutive_5xx = host.consecutive_gateway = host.consecutive_local = 0
        # Healthy intervals count from the expiry, not from whenever the caller ticked.
        host.decay_anchor_s = host.until_s
        self.stats.unejected += 1
        return EndpointUnejected(key, now_s, now_s - host.ejected_at_s, host.ejections)
