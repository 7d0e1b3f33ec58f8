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


def test_only_a_known_reason_in_the_trailers_makes_a_stream_end_planned() -> None:
    """A stream the controller ends on purpose is logged at INFO; anything else stays a warning."""
    from ztunnel.api.codec import STREAM_END_CERTIFICATE_EXPIRED, STREAM_END_METADATA
    from ztunnel.xds.client import planned_stream_end

    class Ended(Exception):
        def __init__(self, trailers: tuple[tuple[str, str], ...]) -> None:
            super().__init__("UNAVAILABLE")
            self._trailers = trailers

        def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
            return self._trailers

    assert planned_stream_end(Ended(((STREAM_END_METADATA, STREAM_END_CERTIFICATE_EXPIRED),))) == "certificate-expired"
    assert planned_stream_end(ExceptionGroup("g", [Ended(((STREAM_END_METADATA, "certificate-expired"),))]))
    assert planned_stream_end(Ended(((STREAM_END_METADATA, "anything\nelse"),))) == ""
    assert planned_stream_end(Ended((("other", "certificate-expired"),))) == ""
    assert planned_stream_end(ValueError("no trailers")) == ""
