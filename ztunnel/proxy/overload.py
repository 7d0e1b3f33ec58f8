"""Is this proxy saturated? Event-loop lag as the signal, with hysteresis (sans-IO: lag and `now` in).

A proxy is one asyncio loop. When the work offered exceeds its CPU, every callback runs late: the
lag of a periodic timer (how long after its due time it ran) is the queueing delay each new
connection setup will meet at every step of its handshakes. A count of setups in flight
(`ProxyOptions.max_setups_in_flight`) bounds memory, but cannot tell a saturated proxy from one
waiting on a slow WAN; the lag can. Past `shed_at_lag_s` the proxy sheds new setups (explicit
refusals, see `ztunnel.proxy.plan.judge_failed_attempt`), so the setups it admitted finish fast
instead of all of them queueing into timeouts.

States and transitions (`LagShedder.observe`):

    NORMAL   --lag >= shed_at_lag_s------------------------------------------------> SHEDDING
    SHEDDING --lag < recover_below_lag_s for every sample during recover_s----------> NORMAL

Entering takes one late sample (saturation hurts at once); leaving takes a calm stretch, so a
proxy does not flap between admitting a burst and shedding it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum


class LoadState(Enum):
    NORMAL = "normal"
    SHEDDING = "shedding"


@dataclass(frozen=True, slots=True)
class LoadTransition:
    state: LoadState
    lag_s: float
    at_s: float


class LagShedder:
    def __init__(self, shed_at_lag_s: float, recover_below_lag_s: float | None = None,
                 recover_s: float = 0.2) -> None:
        if shed_at_lag_s <= 0:
            raise ValueError("shed_at_lag_s must be positive (0 means: no lag-based shedding, so no LagShedder)")
        self.shed_at_lag_s = shed_at_lag_s
        self.recover_below_lag_s = shed_at_lag_s / 2 if recover_below_lag_s is None else recover_below_lag_s
        self.recover_s = recover_s
        self.state = LoadState.NORMAL
        self._calm_since_s: float | None = None
        self.max_lag_s = 0.0

    @property
    def shedding(self) -> bool:
        return self.state is LoadState.SHEDDING

    def observe(self, lag_s: float, now_s: float) -> LoadTransition | None:
        """One sample of loop lag; returns the transition it caused, if any."""
        self.max_lag_s = max(self.max_lag_s, lag_s)
        if self.state is LoadState.NORMAL:
            if lag_s >= self.shed_at_lag_s:
                self.state, self._calm_since_s = LoadState.SHEDDING, None
                return LoadTransition(LoadState.SHEDDING, lag_s, now_s)
            return None
        if lag_s >= self.recover_below_lag_s:
            self._calm_since_s = None
            return None
        if self._calm_since_s is None:
            self._calm_since_s = now_s
        if now_s - self._calm_since_s >= self.recover_s:
            self.state, self._calm_since_s = LoadState.NORMAL, None
            return LoadTransition(LoadState.NORMAL, lag_s, now_s)
        return None


class LagHistory:
    """Recent loop-lag samples (bounded), to ask how late the loop ran while something was waiting.

    Why: a connect attempt that times out while *this* proxy's loop ran late timed out in our own
    queue; it says nothing about the endpoint (`ztunnel.proxy.plan.judge_failed_attempt`)."""

    def __init__(self, keep_s: float = 30.0, max_samples: int = 1024, floor_s: float = 0.005) -> None:
        self.keep_s, self.floor_s = keep_s, floor_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (at_s, lag_s), lag >= floor

    def observe(self, lag_s: float, now_s: float) -> None:
        if lag_s >= self.floor_s:
            self._samples.append((now_s, lag_s))
        while self._samples and now_s - self._samples[0][0] > self.keep_s:
            self._samples.popleft()

    def max_since(self, since_s: float) -> float:
        """The largest lag observed at or after `since_s` (0 when none was above the floor)."""
        return max((lag for at, lag in self._samples if at >= since_s), default=0.0)
