"""The proxy's reconnect backoff (`ztunnel.xds.client.Backoff`): a stream the controller ended on
purpose after a working session (its certificate expired) is reconnected at once, not after the
delay that earlier failures in the proxy's life had climbed to."""

from __future__ import annotations

import random

from ztunnel.xds.client import Backoff


def test_a_working_session_that_ended_restarts_the_reconnect_backoff() -> None:
    backoff = Backoff(initial_s=0.1, max_s=5.0, rng=random.Random(1))
    for _ in range(10):                                           # earlier failures in the proxy's life
        backoff.next_delay_s()
    backoff.session_ended(lasted_s=2.0)                           # a dial that failed soon: keep climbing
    assert backoff.next_delay_s() >= 2.5
    backoff.session_ended(lasted_s=12 * 3600.0)                   # a stream cut at its certificate's expiry
    assert backoff.next_delay_s() <= 0.1
