"""Workload certificate manager: cache, half-life rotation with jitter, CA outage, fail closed."""

from __future__ import annotations

import asyncio
import random

import pytest

from federation.controller.ca import Entitlement, TrustDomainCA
from tests.unit.identity.forge import NOW_S
from ztunnel.api.identity import SpiffeId
from ztunnel.identity.certmanager import (
    CertificateUnavailableError,
    CertManager,
    CertState,
    generate_key_and_csr,
)

API = "spiffe://east.mesh/ns/shop/sa/api"
WEB = "spiffe://east.mesh/ns/shop/sa/web"
TTL_S = 3600.0


class Clock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class FakeCA:
    """Signs with a real TrustDomainCA; can be switched off to simulate an unreachable controller."""

    def __init__(self, clock: Clock, entitled: tuple[str, ...] = (API, WEB)) -> None:
        self.ca = TrustDomainCA.create("east.mesh", now_s=NOW_S - 86400, workload_ttl_s=TTL_S)
        self.clock = clock
        self.entitlement = Entitlement.of("ztunnel/east/node-1", entitled)
        self.up = True
        self.calls = 0
        self.csrs: list[bytes] = []

    async def sign(self, csr_pem: bytes) -> bytes:
        self.calls += 1
        self.csrs.append(csr_pem)
        await asyncio.sleep(0)
        if not self.up:
            raise ConnectionError("controller unreachable")
        return self.ca.issue_from_csr(csr_pem, entitlement=self.entitlement, now_s=self.clock())


@pytest.fixture
def env() -> tuple[Clock, FakeCA, CertManager]:
    clock = Clock(NOW_S)
    ca = FakeCA(clock)
    return clock, ca, CertManager(ca.sign, clock=clock, rng=random.Random(7))


async def test_fetch_caches_per_identity(env: tuple[Clock, FakeCA, CertManager]) -> None:
    _, ca, mgr = env
    a = await mgr.fetch_certificate(API)
    assert a.identity == SpiffeId.parse(API) and a.not_after_s == pytest.approx(NOW_S + TTL_S)
    assert await mgr.fetch_certificate(API) is a and ca.calls == 1
    w = await mgr.fetch_certificate(SpiffeId.parse(WEB))
    assert w.identity != a.identity and ca.calls == 2
    assert mgr.find_certificate(API) is a and mgr.state(API) is CertState.VALID


async def test_concurrent_fetches_send_one_csr(env: tuple[Clock, FakeCA, CertManager]) -> None:
    _, ca, mgr = env
    results = await asyncio.gather(*(mgr.fetch_certificate(API) for _ in range(5)))
    assert ca.calls == 1 and all(r is results[0] for r in results)


async def test_refresh_at_half_life_with_jitter() -> None:
    clock = Clock(NOW_S)
    refresh_points = []
    for seed in range(20):
        ca = FakeCA(clock)
        mgr = CertManager(ca.sign, clock=clock, rng=random.Random(seed))
        cert = await mgr.fetch_certificate(API)
        life = cert.not_after_s - NOW_S   # from its arrival: not-before is backdated for clock skew
        refresh_points.append((cert.refresh_at_s - NOW_S) / life)
    assert all(0.4 <= f <= 0.6 for f in refresh_points)
    assert len({round(f, 4) for f in refresh_points}) > 10  # actually jittered


async def test_renewal_is_planned_from_arrival_not_from_a_backdated_not_before() -> None:
    """Under a simulated calendar the CA starts certificates at the real clock, days before the
    calendar's now (so OpenSSL accepts them): half of not-after − not-before would lie in the past,
    and the proxy would renew on every tick. Half-life counts from when the certificate arrived."""
    clock = Clock(NOW_S)
    ca = FakeCA(clock)
    ca.ca.backdate_s = 10 * 86400.0
    mgr = CertManager(ca.sign, clock=clock, rng=random.Random(3))
    cert = await mgr.fetch_certificate(API)
    assert cert.not_before_s == pytest.approx(NOW_S - 10 * 86400.0)
    assert NOW_S + 0.4 * TTL_S <= cert.refresh_at_s <= NOW_S + 0.6 * TTL_S
    assert await mgr.renew_due(NOW_S + 1.0) == [] and ca.calls == 1


async def test_rotation_renews_with_a_fresh_key(env: tuple[Clock, FakeCA, CertManager]) -> None:
    clock, ca, mgr = env
    first = await mgr.fetch_certificate(API)
    clock.now_s = first.refresh_at_s - 1
    assert await mgr.renew_due(clock()) == [] and ca.calls == 1
    clock.now_s = first.refresh_at_s + 1
    assert mgr.state(API) is CertState.RENEWING
    assert await mgr.renew_due(clock()) == [(SpiffeId.parse(API), None)]
    second = mgr.find_certificate(API)
    assert second is not None and second is not first and second.key_pem != first.key_pem
    assert second.not_after_s == pytest.approx(clock() + TTL_S)
    assert mgr.next_due_s() == pytest.approx(second.refresh_at_s)


async def test_ca_outage_serves_current_until_expiry_then_fails_closed(
        env: tuple[Clock, FakeCA, CertManager]) -> None:
    clock, ca, mgr = env
    cert = await mgr.fetch_certificate(API)
    ca.up = False
    clock.now_s = cert.refresh_at_s + 1
    (_ident, err), = await mgr.renew_due(clock())
    assert err is not None and "unreachable" in err
    # backoff: no hammering the CA on the next tick
    calls = ca.calls
    assert await mgr.renew_due(clock()) == [] and ca.calls == calls
    # still serving the current certificate until its not-after
    clock.now_s = cert.not_after_s - 1
    assert await mgr.fetch_certificate(API) is cert
    clock.now_s = cert.not_after_s + 1
    assert mgr.find_certificate(API) is None and mgr.state(API) is CertState.EXPIRED
    with pytest.raises(CertificateUnavailableError, match=r"expired at .*fail closed"):
        await mgr.fetch_certificate(API)
    # the CA comes back: the next fetch recovers
    ca.up = True
    fresh = await mgr.fetch_certificate(API)
    assert fresh.not_after_s > clock() and mgr.state(API) is CertState.VALID


async def test_first_fetch_without_ca_fails_closed_with_hint(env: tuple[Clock, FakeCA, CertManager]) -> None:
    _, ca, mgr = env
    ca.up = False
    with pytest.raises(CertificateUnavailableError, match="CSR endpoint"):
        await mgr.fetch_certificate(API)
    assert mgr.state(API) is CertState.MISSING


async def test_not_entitled_identity_fails_closed() -> None:
    clock = Clock(NOW_S)
    ca = FakeCA(clock, entitled=(API,))
    mgr = CertManager(ca.sign, clock=clock)
    with pytest.raises(CertificateUnavailableError, match="not entitled"):
        await mgr.fetch_certificate(WEB)


async def test_response_for_another_identity_is_not_served(env: tuple[Clock, FakeCA, CertManager]) -> None:
    clock, ca, _ = env

    async def confused(csr_pem: bytes) -> bytes:
        return ca.ca.issue_svid(WEB, now_s=clock()).chain_pem

    async def other_key(csr_pem: bytes) -> bytes:
        return ca.ca.issue_svid(API, now_s=clock()).chain_pem  # right identity, someone else's key

    for signer, match in ((confused, "not spiffe"), (other_key, "different public key")):
        mgr = CertManager(signer, clock=clock)
        with pytest.raises(CertificateUnavailableError, match=match):
            await mgr.fetch_certificate(API)


async def test_forget_drops_identity(env: tuple[Clock, FakeCA, CertManager]) -> None:
    _, _, mgr = env
    await mgr.fetch_certificate(API)
    mgr.forget(API)
    assert mgr.find_certificate(API) is None and mgr.identities == ()


async def test_run_loop_rotates_and_stops_on_cancel(env: tuple[Clock, FakeCA, CertManager]) -> None:
    clock, ca, mgr = env
    first = await mgr.fetch_certificate(API)
    clock.now_s = first.refresh_at_s + 1
    task = asyncio.get_running_loop().create_task(mgr.run(idle_s=0.01))
    for _ in range(100):
        await asyncio.sleep(0.005)
        if ca.calls >= 2:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ca.calls >= 2 and mgr.find_certificate(API) is not first


def test_csr_carries_exactly_the_identity() -> None:
    from cryptography import x509

    key_pem, csr_pem = generate_key_and_csr(API)
    csr = x509.load_pem_x509_csr(csr_pem)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)] == [API]
    assert csr.is_signature_valid and b"PRIVATE KEY" in key_pem


async def test_a_refused_certificate_is_renewed_at_the_next_tick_though_still_fresh(
        env: tuple[Clock, FakeCA, CertManager]) -> None:
    """The relying party (the controller) refused it: waiting for half-life would keep a useless
    certificate for hours. The old one is served until the new one arrives."""
    clock, ca, cm = env
    first = await cm.fetch_certificate(API)
    assert await cm.renew_due(clock()) == []               # fresh: nothing due
    ca.up = False
    cm.request_renewal(API)
    assert cm.next_due_s() == pytest.approx(clock())
    assert [e for _, e in await cm.renew_due(clock())] == ["ConnectionError: controller unreachable"]
    assert cm.find_certificate(API) is first                 # still served while the CA is away
    ca.up = True
    clock.now_s += 60                                        # after the failure backoff
    assert await cm.renew_due(clock()) == [(SpiffeId.parse(API), None)]
    renewed = cm.find_certificate(API)
    assert renewed is not None and renewed is not first
    assert await cm.renew_due(clock()) == []                 # and no longer forced


async def test_a_persisted_certificate_is_adopted_only_if_ours_and_valid(env: tuple[Clock, FakeCA, CertManager]) -> None:
    from ztunnel.identity.certmanager import CertificateResponseError

    clock, ca, cm = env
    issued = ca.ca.issue_svid(API, now_s=clock())
    cert = cm.put(API, issued.chain_pem, issued.key_pem)
    assert cm.find_certificate(API) is cert and cm.state(API) is CertState.VALID
    assert cert.refresh_at_s < cert.not_after_s
    other = ca.ca.issue_svid(WEB, now_s=clock())
    with pytest.raises(CertificateResponseError, match="not " + API):
        cm.put(API, other.chain_pem, other.key_pem)          # another identity's certificate
    with pytest.raises(CertificateResponseError, match="different public key"):
        cm.put(WEB, other.chain_pem, issued.key_pem)         # not the key it was issued for
    clock.now_s = cert.not_after_s + 1
    with pytest.raises(CertificateResponseError, match="already expired"):
        cm.put(API, issued.chain_pem, issued.key_pem)
