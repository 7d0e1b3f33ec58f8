"""What an unauthenticated caller of the bootstrap port may cost (`federation.controller.bootstrap_gate`,
review finding 6): checks per source and in flight, refusals logged escaped and at a bounded rate."""

from __future__ import annotations

import io

import pytest

from federation.controller.bootstrap_gate import BootstrapAdmission


def test_a_source_gets_its_burst_then_its_rate_and_another_source_is_not_slowed() -> None:
    gate = BootstrapAdmission(rate_per_s=2.0, burst=3, max_in_flight=100)
    assert [gate.admit("10.0.0.1", 0.0) for _ in range(3)] == ["", "", ""]
    why = gate.admit("10.0.0.1", 0.0)
    assert "too many bootstrap requests from 10.0.0.1" in why and "retry in 0.5 s" in why
    assert gate.admit("10.0.0.2", 0.0) == ""          # another address has its own bucket
    assert gate.admit("10.0.0.1", 0.5) == ""          # refilled at 2 a second
    assert gate.admit("10.0.0.1", 0.5) != ""
    assert gate.refused == 2 and gate.in_flight == 5


def test_checks_in_flight_are_capped_across_sources_and_released() -> None:
    gate = BootstrapAdmission(rate_per_s=100.0, burst=100, max_in_flight=2)
    assert gate.admit("a", 0.0) == "" and gate.admit("b", 0.0) == ""
    assert "checking 2 bootstrap credentials already" in gate.admit("c", 0.0)
    gate.release()
    assert gate.admit("c", 0.0) == ""
    for _ in range(5):
        gate.release()
    assert gate.in_flight == 0


def test_the_map_of_sources_is_bounded_least_recently_seen_first() -> None:
    gate = BootstrapAdmission(rate_per_s=0.001, burst=1, max_in_flight=10_000, max_sources=3)
    for i in range(10):
        gate.admit(f"10.0.0.{i}", float(i))
        gate.release()
    assert gate.sources == 3
    assert gate.admit("10.0.0.9", 10.0) != ""          # still remembered: its bucket is empty
    assert gate.admit("10.0.0.0", 10.0) == ""          # forgotten (evicted): a full bucket again


def test_a_refused_proxy_id_cannot_forge_a_log_line_and_refusals_are_rate_limited(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewer's grpc_log.py: a proxy id carrying a newline and a fake record."""
    from federation.server import grpc_services
    from ztunnel.api import logsetup

    buf = io.StringIO()
    logsetup.configure("info", "text", buf)
    monkeypatch.setattr(grpc_services, "_refusals", grpc_services._RefusalLog(rate_per_s=0.001, burst=2))
    try:
        forged = ("ztunnel/east/node-1\n2026-12-03T00:00:00.000Z INFO    federation.controller.signing: "
                  "certificate issued to gateway/east")
        grpc_services._denied(forged, "bootstrap token: not a valid bootstrap token for " + forged)
        (line,) = [ln for ln in buf.getvalue().splitlines() if ln]
        assert "node-1\\n2026-12-03" in line and "certificate issued" in line   # on the one line, escaped
        for _ in range(5):
            grpc_services._denied("ztunnel/east/node-2", "no")
        lines = [ln for ln in buf.getvalue().splitlines() if ln]
        assert len(lines) == 2 and grpc_services._refusals.suppressed == 4
    finally:
        logsetup.reset()


def test_the_source_of_a_grpc_peer_is_its_address_without_the_port() -> None:
    from federation.server.grpc_services import peer_address

    assert peer_address("ipv4:10.1.2.3:40000") == "10.1.2.3"
    assert peer_address("ipv6:[fd00::1]:40000") == "fd00::1"
    assert peer_address("unix:/run/x.sock") == "unix:/run/x.sock"
