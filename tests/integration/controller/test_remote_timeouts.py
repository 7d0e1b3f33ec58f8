"""A hung actor never holds its callers for ever: every call between the controller's actors has
a deadline (`federation.ray.remote`)."""

from __future__ import annotations

import time

import pytest


def test_a_hung_reconciler_times_its_callers_out_instead_of_holding_their_threads(ray_session: None) -> None:
    """Before: `RemoteReconciler` waited without a deadline, so a reconciler stuck in a call held
    the Git feed's or a cluster agent's thread for good (their loops retry on errors, not on
    silence)."""
    import ray

    from federation.ray.remote import RemoteReconciler

    @ray.remote(num_cpus=0)
    class Hung:
        def on_lease(self, cluster: str, age_s: float) -> None:
            time.sleep(30)

    handle = Hung.remote()  # type: ignore[attr-defined]
    try:
        sink = RemoteReconciler(handle, timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(ray.exceptions.GetTimeoutError):
            sink.on_lease("east", 1.0)
        assert time.monotonic() - started < 10
    finally:
        ray.kill(handle, no_restart=True)
