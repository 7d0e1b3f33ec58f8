"""Retries and outcomes of one upstream attempt, with Istio's semantics. Pure.

Istio programs every route (VirtualService or HTTPRoute) with a retry policy unless told
otherwise: 2 retries, `retryOn: connect-failure,refused-stream,unavailable,cancelled,
retriable-status-codes` with retriable status 503, a host predicate that skips the hosts already
tried, and Envoy's backoff (25 ms base, fully jittered exponential, capped at 10 × base). An
HTTPRoute's `retry` (Gateway API) replaces the count (`attempts`), the retriable statuses
(`codes`) and the base (`backoff`); `attempts: 0` turns retries off. What that means here:

- retried: a connect failure (the tunnel to the endpoint could not be opened, or its node refused
  it: the pod is not there) and a response whose status is in the retriable set;
- not retried: a reset after the request was sent, a per-try timeout, any other status (Envoy
  would need `reset`, `5xx` or `gateway-error` in retryOn, which Istio's default leaves out);
- the method does not matter, as in Envoy's `retriable-status-codes`: a POST answered 503 is sent
  again (a 503 normally means "not processed"; a backend that fails after a side effect needs
  `attempts: 0` on its route). A connect failure is always safe: nothing was sent;
- each retry goes to a host not tried yet while the pool has one (`previous_hosts`), and waits
  `backoff_s(...)` first; the whole request, retries included, stays within the route's
  `timeouts.request`, each try within `timeouts.backendRequest`;
- every attempt's outcome feeds outlier detection (`outlier_outcome`) with Envoy's definitions:
  502/503/504 are gateway errors (and 5xx), other 5xx are 5xx only, a connect failure, a reset
  before the response or a timeout are local-origin failures; a request the proxy refused for lack
  of connections (connectionPool overflow), or one the destination's ztunnel refused by policy (403),
  says nothing about the host's health and is not counted.
"""

from __future__ import annotations

from enum import Enum

from ztunnel.api.config import RetryPolicy
from ztunnel.api.outlier import Outcome

MAX_BACKOFF_FACTOR = 10.0


class Failure(str, Enum):
    """How an attempt failed before a response arrived."""

    CONNECT = "connect_failure"      # no tunnel: refused, unreachable, TLS failure, node answered 503
    RESET = "reset"                  # the tunnel or the upstream connection broke before the response
    TIMEOUT = "timeout"              # per-try (backendRequest) or overall timeout
    OVERFLOW = "overflow"            # connectionPool limits: the proxy did not try at all
    DENIED = "denied"                # the destination's ztunnel refused the tunnel (L4 policy)


def outlier_outcome(status: int | None, failure: Failure | None) -> Outcome | None:
    if failure is Failure.CONNECT:
        return Outcome.CONNECT_FAILURE
    if failure is Failure.RESET:
        return Outcome.RESET_BEFORE_RESPONSE
    if failure is Failure.TIMEOUT:
        return Outcome.TIMEOUT
    if failure in (Failure.OVERFLOW, Failure.DENIED) or status is None:
        return None
    if status in (502, 503, 504):
        return Outcome.HTTP_GATEWAY_ERROR
    if status >= 500:
        return Outcome.HTTP_5XX
    return Outcome.SUCCESS


def retriable(policy: RetryPolicy, retries_done: int, status: int | None, failure: Failure | None) -> bool:
    """May the request be tried again after this attempt?"""
    if retries_done >= policy.attempts:
        return False
    if failure is Failure.CONNECT:
        return True
    return failure is None and status is not None and status in policy.codes


def backoff_s(policy: RetryPolicy, retry_number: int, rand: float) -> float:
    """Envoy's fully jittered exponential backoff before retry `retry_number` (1, 2, ...)."""
    base = max(0.0, policy.backoff_s)
    ceiling: float = min(float(2 ** retry_number - 1) * base, MAX_BACKOFF_FACTOR * base)
    return min(max(rand, 0.0), 1.0) * ceiling
