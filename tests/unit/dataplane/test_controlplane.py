"""ztunnel.xds.controlplane: the pure parts of a proxy's link to the controller (no sockets here; the
lab tier runs the whole thing in tests/lab/test_e2e.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, Counter

from ztunnel.api.config import ProxyConfig, ProxyMode, Stamp, Workload
from ztunnel.api.outlier import EjectReason, EndpointEjected, EndpointUnejected
from ztunnel.xds.controlplane import ControllerSink, HealthReporter, header_for
from ztunnel.xds.state import ProxyState

EP = "east/shop/checkout-0"
SVC = "checkout.shop.svc.clusterset.local"


def _counter() -> Counter:
    return Counter("meshfed_endpoint_outcomes", "x", ("destination_service", "endpoint", "outcome"),
                   registry=CollectorRegistry())


@pytest.mark.parametrize(("proxy_id", "mode", "cluster"), [
    ("ztunnel/east/node-1", ProxyMode.NODE, "east"), ("gateway/west", ProxyMode.GATEWAY, "west")])
def test_header_follows_from_the_proxy_id(proxy_id: str, mode: ProxyMode, cluster: str) -> None:
    h = header_for(proxy_id, "east.mesh.local")
    assert (h.mode, h.cluster, h.trust_domain) == (mode, cluster, "east.mesh.local")


def test_a_malformed_proxy_id_is_refused_with_the_expected_form() -> None:
    with pytest.raises(ValueError, match="ztunnel/<cluster>/<node>"):
        header_for("node-1", "east.mesh.local")


def test_health_reports_carry_outcome_deltas_between_drains() -> None:
    c = _counter()
    rep = HealthReporter(counter=c)
    c.labels(SVC, EP, "Success").inc(3)
    c.labels(SVC, EP, "ConnectFailure").inc(2)
    first = rep.drain_outcomes()
    assert [(o.service, o.workload_uid, o.cluster, o.ok, o.failed) for o in first] == [(SVC, EP, "east", 3, 2)]
    assert rep.drain_outcomes() == []  # nothing new, nothing sent
    c.labels(SVC, EP, "Timeout").inc()
    (second,) = rep.drain_outcomes()
    assert (second.ok, second.failed) == (0, 1)


def test_an_ejection_is_reported_even_without_new_outcomes_and_its_end_too() -> None:
    c = _counter()
    rep = HealthReporter(counter=c)
    c.labels(SVC, EP, "ConnectFailure").inc()
    rep.drain_outcomes()
    rep.report("p", EndpointEjected(EP, EjectReason.CONSECUTIVE_GATEWAY_ERRORS, 1, time.monotonic() + 30, True))
    (o,) = rep.drain_outcomes()
    assert o.ejected and o.service == SVC and o.ejected_until_s > time.time()
    rep.report("p", EndpointUnejected(EP, time.monotonic(), 30.0, 1))
    (o,) = rep.drain_outcomes()
    assert not o.ejected


def test_an_unenforced_ejection_is_not_reported_as_ejected() -> None:
    rep = HealthReporter(counter=_counter())
    rep.report("p", EndpointEjected(EP, EjectReason.CONSECUTIVE_GATEWAY_ERRORS, 1, time.monotonic() + 30, False))
    assert rep.drain_outcomes() == []


class _Certs:
    """A CertManager stand-in: issues a fake certificate per identity, records forgets."""

    def __init__(self) -> None:
        self.forgotten: list[str] = []
        self.managed: list[str] = []

    async def fetch_certificate(self, identity: str) -> object:
        self.managed.append(str(identity))

        class C:
            pass
        c = C()
        c.identity, c.chain_pem, c.key_pem = identity, b"chain", b"key"  # type: ignore[attr-defined]
        return c

    @property
    def identities(self) -> tuple[str, ...]:
        return tuple(self.managed)

    def find_certificate(self, identity: str) -> None:
        return None   # nothing held yet: the sink fetches (its stale-issuer check has nothing to judge)

    def forget(self, identity: str) -> None:
        self.forgotten.append(identity)
        self.managed.remove(identity)


class _Creds:
    def __init__(self) -> None:
        self.svids: dict[str, bytes] = {}

    def put(self, identity: str, chain_pem: bytes, key_pem: bytes) -> None:
        self.svids[identity] = chain_pem


def _cfg(version: int, identities: tuple[str, ...]) -> ProxyConfig:
    wl = tuple(Workload(uid=f"east/shop/p{i}", name=f"p{i}", namespace="shop", cluster="east", network="n",
                        node="node-1", address=f"10.10.1.{10 + i}", identity=ident, service_account="sa")
               for i, ident in enumerate(identities))
    return ProxyConfig("ztunnel/east/node-1", ProxyMode.NODE, "east", "n", "east.mesh.local",
                       Stamp(1, "abc", version), workloads=wl, local_identities=identities)


def test_the_sink_gets_certificates_before_it_applies_and_drops_those_no_longer_needed() -> None:
    own = "spiffe://east.mesh.local/ns/meshfed-system/sa/ztunnel.east.node-1"
    a, b = "spiffe://east.mesh.local/ns/shop/sa/a", "spiffe://east.mesh.local/ns/shop/sa/b"
    certs, creds, state = _Certs(), _Creds(), ProxyState()
    sink = ControllerSink(state, certs, creds, own)  # type: ignore[arg-type]
    asyncio.run(sink.apply(_cfg(1, (a, b))))
    assert set(creds.svids) == {a, b} and state.config is not None and sink.first_applied.is_set()
    asyncio.run(sink.apply(_cfg(2, (b,))))
    assert certs.forgotten == [a]
    assert sink.identities_for(_cfg(3, ())) == (own,)  # a node with no workloads serves as itself
    assert sink.validate(_cfg(3, (b,))) == []
