"""What a failed connect attempt says about its endpoint (`ztunnel.proxy.plan.judge_failed_attempt`):
a saturated proxy's refusal is not an endpoint failure (no outlier outcome, no failover)."""

from __future__ import annotations

import pytest

from ztunnel.api.outlier import Outcome
from ztunnel.proxy.plan import FailedAttempt, judge_failed_attempt


@pytest.mark.parametrize(("kind", "status", "overloaded", "outcome", "try_next"), [
    # saturation: shed by a proxy on the path — never counted, never failed over
    (FailedAttempt.REFUSED, 503, True, None, False),
    # decisions: final, and not the endpoint's failure either
    (FailedAttempt.REFUSED, 403, False, None, False),
    (FailedAttempt.REFUSED, 404, False, None, False),
    (FailedAttempt.REFUSED, 400, False, None, False),
    # the endpoint (or the path to it) failed: counted, next endpoint tried
    (FailedAttempt.REFUSED, 503, False, Outcome.CONNECT_FAILURE, True),
    (FailedAttempt.REFUSED, 502, False, Outcome.CONNECT_FAILURE, True),
    (FailedAttempt.TIMEOUT, 0, False, Outcome.TIMEOUT, True),
    (FailedAttempt.CONNECT_ERROR, 0, False, Outcome.CONNECT_FAILURE, True),
    (FailedAttempt.INTERNAL_ERROR, 0, False, Outcome.LOCAL_ORIGIN_FAILURE, True),
])
def test_verdict(kind: FailedAttempt, status: int, overloaded: bool, outcome: Outcome | None, try_next: bool) -> None:
    v = judge_failed_attempt(kind, status, overloaded)
    assert (v.outcome, v.try_next) == (outcome, try_next)


def test_saturation_refusal_is_not_an_endpoint_failure() -> None:
    shed = judge_failed_attempt(FailedAttempt.REFUSED, 503, overloaded=True)
    failed = judge_failed_attempt(FailedAttempt.REFUSED, 503, overloaded=False)
    assert shed.why == "overloaded" and shed.outcome is None and not shed.try_next
    assert failed.why == "endpoint_failure" and failed.outcome is Outcome.CONNECT_FAILURE and failed.try_next


def test_a_timeout_while_this_proxy_was_saturated_is_not_the_endpoints() -> None:
    own = judge_failed_attempt(FailedAttempt.TIMEOUT, self_saturated=True)
    theirs = judge_failed_attempt(FailedAttempt.TIMEOUT, self_saturated=False)
    assert (own.outcome, own.try_next, own.why) == (None, False, "self_saturated")
    assert (theirs.outcome, theirs.try_next) == (Outcome.TIMEOUT, True)
    # only a timeout can be ours: a refused or reset connection was answered by the far side
    assert judge_failed_attempt(FailedAttempt.CONNECT_ERROR, self_saturated=True).outcome is Outcome.CONNECT_FAILURE
