"""Events of the federation core: every decision the failover engine takes, in the past tense.

Each event carries its `Provenance`: what triggered it (an ejection, a lease expiry, an
observation), the policy object that made the decision (e.g. `DestinationRule shop/checkout`), the
file and line it lives in, and the commit SHA of the fleet revision in force. That is what
`meshfed explain`, the status store and the failover history show; nothing else is needed to
answer "why did traffic move?".

Plain frozen data; `as_dict` gives the JSON form for logs and the status store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


@dataclass(frozen=True, slots=True)
class Provenance:
    trigger: str          # "EndpointEjected east/shop/checkout-0 (ConsecutiveGatewayErrors)", …
    policy: str = ""      # "DestinationRule shop/checkout", "Federation shop-fleet", …
    file: str = ""        # "policies/shop/checkout.yaml:4:3"
    commit: str = ""      # 40-hex SHA (or "WORKTREE")


@dataclass(frozen=True, slots=True)
class EndpointEjected:
    """The failover engine ejected a backend of a service: a quorum of the proxies' health reports
    ejects it (reason `HealthReportQuorum`; the trigger is the vote). It counts as unhealthy in
    every view until `EndpointUnejected`."""

    service: str          # hostname
    endpoint: str         # workload uid (a pod, or `<cluster>/<ns>/<svc>@gateway`)
    reason: str
    ejection_count: int   # times this endpoint was ejected, this one included
    until_s: float        # 0: no fixed end (the vote lifts it)
    enforced: bool        # routing obeys it (the proxies apply maxEjectionPercent locally)
    at_s: float
    provenance: Provenance = field(default_factory=lambda: Provenance(""))


@dataclass(frozen=True, slots=True)
class EndpointUnejected:
    """The health verdict no longer ejects the endpoint: it is healthy again if it is ready."""

    service: str
    endpoint: str
    at_s: float
    ejected_for_s: float
    provenance: Provenance = field(default_factory=lambda: Provenance(""))


@dataclass(frozen=True, slots=True)
class FailedOver:
    """Clients in `source` (cluster, zone) started sending part of their traffic for `service`
    beyond the most preferred tier: tier 0's share dropped below 100 %."""

    service: str
    source: str                         # "east" or "east/us-east-1a" when zones differ
    shares: tuple[float, ...]           # per tier, after
    previous_shares: tuple[float, ...]
    to_clusters: tuple[str, ...]        # clusters now receiving traffic outside tier 0
    at_s: float
    provenance: Provenance = field(default_factory=lambda: Provenance(""))


@dataclass(frozen=True, slots=True)
class FailedBack:
    """Tier 0 takes 100 % of `source`'s traffic for `service` again."""

    service: str
    source: str
    shares: tuple[float, ...]
    previous_shares: tuple[float, ...]
    at_s: float
    provenance: Provenance = field(default_factory=lambda: Provenance(""))


@dataclass(frozen=True, slots=True)
class ClusterLeaseExpired:
    """No observation from `cluster` for the lease TTL: its endpoints are frozen or withdrawn."""

    cluster: str
    mode: str             # "Freeze" | "Withdraw"
    last_seen_s: float
    at_s: float
    endpoints: int        # how many endpoints the decision affects
    provenance: Provenance = field(default_factory=lambda: Provenance(""))


@dataclass(frozen=True, slots=True)
class ClusterFenced:
    """A partitioned cluster spoke again, but only partially: its endpoints stay fenced until a
    fresh complete observation arrives."""

    cluster: str
    at_s: float
    provenance: Provenance = field(default_factory=lambda: Provenance(""))


@dataclass(frozen=True, slots=True)
class ClusterRecovered:
    """A complete observation lifted the fence: the cluster's endpoints are routable again."""

    cluster: str
    at_s: float
    endpoints: int
    provenance: Provenance = field(default_factory=lambda: Provenance(""))


CoreEvent = (EndpointEjected | EndpointUnejected | FailedOver | FailedBack | ClusterLeaseExpired
             | ClusterFenced | ClusterRecovered)


def event_to_dict(event: CoreEvent) -> dict[str, Any]:
    data = asdict(event)
    for k, v in list(data.items()):
        if isinstance(v, Enum):
            data[k] = v.value
        elif isinstance(v, tuple):
            data[k] = list(v)
    return {"type": type(event).__name__, **data}
