"""A cluster agent resends a complete view after the reconciler lost sight of the cluster.

Found by the API-outage chaos experiment (examples/chaos/api-outage-withdraw.yaml): after east's
emulated API server stopped answering for longer than the lease TTL and came back, the failover
engine kept east Expired — under Withdraw, east's endpoints stayed withdrawn and east's clients
stayed failed over — until something in east happened to change. Recovering an Expired lease takes
a complete observation, and the agent decided whether to send one from its own lease at one
instant, which a status read (it renewed the lease as a side effect) or a probe that blocked across
the outage could hide. The agent now decides from what the reconciler was told.

Pure: the agent's discovery is a fake and the clock is a variable; no thread, no socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from clusters.kube.discovery import DiscoveryError
from clusters.kube.observation import ClusterObservation
from federation.controller.sources import ClusterAgent

TTL_S = 6.0


@dataclass
class FakeDiscovery:
    """What the agent reads of `KubeDiscovery`: successes, probes, observations."""

    clock: list[float]
    up: bool = True
    last_success_s: float | None = None
    last_error: str = ""
    context: str = "lab-east"
    probes: int = 0
    probe_takes_s: float = 0.0
    listed: list[float] = field(default_factory=list)

    def probe(self) -> float:
        self.probes += 1
        self.clock[0] += self.probe_takes_s   # a probe can block (TCP retransmits across an outage)
        if not self.up:
            raise DiscoveryError("cluster east: the API server does not answer")
        self.last_success_s = self.clock[0]
        return self.clock[0]

    def observation(self) -> ClusterObservation:
        return ClusterObservation(cluster="east", observed_at_s=self.clock[0], complete=True, nodes=(), services=(),
                                  endpoints=())

    def list_all(self) -> ClusterObservation:
        """A fresh LIST of every kind (what recovering a lapsed lease takes)."""
        if not self.up:
            raise DiscoveryError("cluster east: the API server does not answer")
        self.listed.append(self.clock[0])
        self.last_success_s = self.clock[0]
        return self.observation()

    def failing_kinds(self) -> list[str]:
        return []


@pytest.fixture()
def agent() -> tuple[ClusterAgent, FakeDiscovery, list[float], list[float]]:
    clock = [1000.0]
    a = ClusterAgent("east", None, "lab-east", lease_ttl_s=TTL_S, clock=lambda: clock[0])
    d = FakeDiscovery(clock)
    a.discovery = d  # type: ignore[assignment]
    leases: list[float] = []
    a._send_lease = lambda _cluster, age_s: leases.append(age_s)
    # the start: the first LIST went out as an observation
    d.last_success_s = clock[0]
    a.lease.renew(clock[0])
    a.told_s = clock[0]
    return a, d, clock, leases


def _queued(a: ClusterAgent) -> bool:
    return a._latest is not None


def test_a_quiet_healthy_cluster_only_heartbeats(agent: tuple[ClusterAgent, FakeDiscovery, list[float], list[float]]) -> None:
    a, _, clock, leases = agent
    for _ in range(10):
        clock[0] += a.heartbeat_interval_s
        a.heartbeat_once()
    assert len(leases) == 10 and not _queued(a)


def test_after_an_outage_longer_than_the_ttl_a_complete_view_is_resent(
        agent: tuple[ClusterAgent, FakeDiscovery, list[float], list[float]]) -> None:
    a, d, clock, leases = agent
    d.up = False
    for _ in range(6):                       # 6 × ttl/3 = 2 TTLs without an answer
        clock[0] += a.heartbeat_interval_s
        a.heartbeat_once()
    assert not leases
    d.up = True
    d.last_success_s = clock[0] + 0.5        # the watches relisted (nothing had changed: no observation)
    clock[0] += 1.0
    a.status()                               # someone reads the status before the next heartbeat
    a.heartbeat_once()
    assert _queued(a), "the reconciler would stay Expired: no complete view was resent"
    assert a._latest is not None and a._latest.complete and d.listed, "a fresh LIST, not the cache"


def test_a_probe_that_blocks_across_the_outage_does_not_hide_it(
        agent: tuple[ClusterAgent, FakeDiscovery, list[float], list[float]]) -> None:
    """The heartbeat starts while the lease is still valid; its probe hangs for longer than a TTL
    (the API server came back meanwhile) and succeeds: the reconciler heard nothing for that long."""
    a, d, clock, _ = agent
    clock[0] += a.heartbeat_interval_s
    d.probe_takes_s = TTL_S + 2.0
    a.heartbeat_once()
    assert _queued(a)


def test_status_reads_do_not_renew_the_lease(agent: tuple[ClusterAgent, FakeDiscovery, list[float], list[float]]) -> None:
    a, d, clock, _ = agent
    renewed = a.lease.renewed_at_s
    d.last_success_s = clock[0] + 5.0
    clock[0] += 5.0
    st = a.status()
    assert st["up"] and st["lease_renewed_at_s"] == d.last_success_s   # what a renewal would say ...
    assert a.lease.renewed_at_s == renewed                             # ... without renewing
