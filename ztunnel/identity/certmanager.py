"""Workload certificate manager: local keys, CSRs, a cache per identity, rotation, fail-closed expiry.

A node ztunnel holds one certificate per identity it serves (the workloads scheduled on its node);
a gateway holds its own. Private keys are generated here and never leave the process: the CA sees
only CSRs. The signer is injected (`sign(csr_pem) -> chain_pem`, async), so the same manager works
with the controller's gRPC CSR endpoint, a local CA in the lab, or a fake in tests.

Lifecycle of one identity (explicit states, `CertState`):

    MISSING --fetch--> VALID --refresh_at--> RENEWING --ok--> VALID
                         ^                      | CA unreachable: keep serving, retry with backoff
                         |                      v
                         +------ok------- (still VALID until not_after) --not_after--> EXPIRED

- `refresh_at` = issued + lifetime × (0.5 ± jitter), lifetime = not_after − issued: half-life
  rotation like Istio/SPIRE, jittered so a node's certificates (and a fleet of nodes) do not all
  renew in the same second. *Issued* is when the certificate arrived here, not its not-before: a
  CA backdates not-before for clock skew, and under a simulated calendar by the whole simulated
  offset (`ztunnel.api.clock`), which would put "half-life" in the past at once. A certificate
  adopted from disk (`put`) has no arrival time: its not-before stands in (renewing early is safe).
- While the CA is unreachable the current certificate keeps being served until its not-after;
  after that `fetch_certificate` raises `CertificateUnavailableError` (fail closed: the proxy
  refuses the connection — it never falls back to plaintext).
- Every renewal uses a fresh key. A response is checked before use: it must be a certificate for
  the requested identity, for *our* key, and valid now — a confused or malicious CA cannot make us
  serve someone else's identity.

The clock is injected; `renew_due(now_s)` is the whole rotation decision+action for one
tick, `run()` just loops it, so tests drive time explicitly.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ztunnel.api.clock import calendar_now, calendar_wait_s
from ztunnel.api.identity import SpiffeId, generate_key_and_csr
from ztunnel.api.verify import peer_spiffe_ids

Signer = Callable[[bytes], Awaitable[bytes]]

DEFAULT_ROTATE_FRACTION = 0.5
DEFAULT_JITTER_FRACTION = 0.1
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 60.0
SIGN_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


class CertState(str, enum.Enum):
    MISSING = "Missing"
    VALID = "Valid"          # serving; not yet due for renewal
    RENEWING = "Renewing"    # serving; renewal due (retrying while the CA is unreachable)
    EXPIRED = "Expired"      # nothing valid to serve: connections fail closed


class CertificateUnavailableError(Exception):
    """No valid certificate for an identity: the proxy must refuse the connection (fail closed)."""


class CertificateResponseError(ValueError):
    """The signer returned something we must not serve."""


@dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    identity: SpiffeId
    chain_pem: bytes                          # leaf first, then any intermediates
    key_pem: bytes = field(repr=False)
    not_before_s: float
    not_after_s: float
    refresh_at_s: float

    def valid_at(self, now_s: float) -> bool:
        return self.not_before_s <= now_s < self.not_after_s


def _check_response(identity: SpiffeId, key_pem: bytes, chain_pem: bytes, now_s: float) -> tuple[float, float]:
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise CertificateResponseError(f"CA returned no PEM certificate chain ({e})") from e
    leaf = chain[0]
    sans = peer_spiffe_ids(leaf)
    if sans != [str(identity)]:
        raise CertificateResponseError(f"CA returned a certificate for {sans or 'no identity'}, not {identity}")
    key = serialization.load_pem_private_key(key_pem, None)
    ours = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise CertificateResponseError(f"CA returned a certificate for {identity} with a different public key "
                                       "than our CSR's")
    nb = leaf.not_valid_before_utc.timestamp()
    na = leaf.not_valid_after_utc.timestamp()
    if na <= now_s:
        raise CertificateResponseError(f"CA returned a certificate for {identity} that is already expired "
                                       f"(not after {datetime.fromtimestamp(na, UTC):%Y-%m-%dT%H:%M:%SZ})")
    return nb, na


@dataclass(slots=True)
class _Entry:
    identity: SpiffeId
    cert: WorkloadCertificate | None = None
    next_attempt_s: float = 0.0         # earliest renewal attempt (backoff after failures)
    failures: int = 0
    last_error: str = ""
    failing_since_s: float | None = None
    inflight: asyncio.Future[WorkloadCertificate] | None = None
    forced: bool = False                # renew at the next tick even though the certificate is fresh


class CertManager:
    """Certificates per identity. Invariants: at most one CSR in flight per identity; a cached
    certificate is served until its not-after, never after; keys are created here and only here."""

    def __init__(self, sign: Signer, *, clock: Callable[[], float] = calendar_now,
                 rng: random.Random | None = None,
                 rotate_fraction: float = DEFAULT_ROTATE_FRACTION,
                 jitter_fraction: float = DEFAULT_JITTER_FRACTION,
                 sign_timeout_s: float = SIGN_TIMEOUT_S) -> None:
        if not (rotate_fraction - jitter_fraction > 0.0 and rotate_fraction + jitter_fraction < 1.0):
            raise ValueError("rotate_fraction ± jitter_fraction must stay inside (0, 1)")
        self._sign = sign
        self._clock = clock
        self._rng = rng or random.Random()
        self._rotate_fraction = rotate_fraction
        self._jitter_fraction = jitter_fraction
        self._sign_timeout_s = sign_timeout_s
        self._entries: dict[SpiffeId, _Entry] = {}
        self._wake = asyncio.Event()

    # --- queries (local, never wait) ----------------------------------------------------------

    def state(self, identity: SpiffeId | str, now_s: float | None = None) -> CertState:
        e = self._entries.get(_sid(identity))
        now = self._clock() if now_s is None else now_s
        if e is None or e.cert is None:
            return CertState.MISSING
        if now >= e.cert.not_after_s:
            return CertState.EXPIRED
        return CertState.RENEWING if now >= e.cert.refresh_at_s else CertState.VALID

    def find_certificate(self, identity: SpiffeId | str, now_s: float | None = None) -> WorkloadCertificate | None:
        """The cached certificate if it is still within its validity, else None."""
        e = self._entries.get(_sid(identity))
        now = self._clock() if now_s is None else now_s
        if e is None or e.cert is None or now >= e.cert.not_after_s:
            return None
        return e.cert

    @property
    def identities(self) -> tuple[SpiffeId, ...]:
        return tuple(sorted(self._entries))

    def request_renewal(self, identity: SpiffeId | str) -> None:
        """Renew `identity` at the next `renew_due` although its certificate is still within its
        validity: the relying party refused it (a rotated root, a controller rebuilt from nothing).
        The cached certificate keeps being served until the new one arrives."""
        e = self._entries.get(_sid(identity))
        if e is None:
            return
        e.forced = True
        e.next_attempt_s = min(e.next_attempt_s, self._clock())
        self._wake.set()

    def put(self, identity: SpiffeId | str, chain_pem: bytes, key_pem: bytes) -> WorkloadCertificate:
        """Adopt a certificate obtained earlier (persisted across a restart) as if just fetched,
        after the same checks a CA response gets (our identity, this key, valid now); raises
        `CertificateResponseError` otherwise. Its refresh time follows from its validity."""
        sid = _sid(identity)
        nb, na = _check_response(sid, key_pem, chain_pem, self._clock())
        cert = WorkloadCertificate(sid, chain_pem, key_pem, nb, na, self._refresh_at(nb, na))
        entry = self._entries.setdefault(sid, _Entry(sid))
        entry.cert, entry.next_attempt_s = cert, cert.refresh_at_s
        self._wake.set()
        return cert

    def forget(self, identity: SpiffeId | str) -> None:
        """Stop managing an identity (its workload left the node). The key is dropped with the entry."""
        self._entries.pop(_sid(identity), None)

    # --- fetch (may wait for the CA) -----------------------------------------------------------

    async def fetch_certificate(self, identity: SpiffeId | str) -> WorkloadCertificate:
        """A valid certificate for `identity`, from cache or from the CA; fail closed if none."""
        sid = _sid(identity)
        entry = self._entries.setdefault(sid, _Entry(sid))
        now = self._clock()
        if entry.cert is not None and now < entry.cert.not_after_s:
            return entry.cert
        self._wake.set()  # a new identity: let the rotation loop recompute its schedule
        try:
            return await self._renew(entry)
        except Exception as e:
            raise CertificateUnavailableError(self._unavailable_message(entry, now, e)) from e

    def _unavailable_message(self, entry: _Entry, now_s: float, err: BaseException) -> str:
        if entry.cert is not None:
            exp = datetime.fromtimestamp(entry.cert.not_after_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            since = ""
            if entry.failing_since_s is not None:
                since = f" since {now_s - entry.failing_since_s:.0f} s"
            return (f"no valid certificate for {entry.identity}: the cached one expired at {exp} and the CA has "
                    f"been unreachable{since} (last error: {err}). Refusing connections for this identity "
                    "(fail closed); check that the controller's CSR endpoint is reachable from this node")
        return (f"no certificate for {entry.identity}: the CA did not sign our CSR ({err}). Refusing connections "
                "for this identity (fail closed); check the controller's CSR endpoint and that this proxy is "
                "entitled to the identity (it must run a workload with that service account)")

    async def _renew(self, entry: _Entry) -> WorkloadCertificate:
        if entry.inflight is not None:
            return await asyncio.shield(entry.inflight)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[WorkloadCertificate] = loop.create_future()
        entry.inflight = fut
        try:
            key_pem, csr_pem = generate_key_and_csr(entry.identity)
            chain_pem = await asyncio.wait_for(self._sign(csr_pem), self._sign_timeout_s)
            now = self._clock()
            nb, na = _check_response(entry.identity, key_pem, chain_pem, now)
            cert = WorkloadCertificate(entry.identity, chain_pem, key_pem, nb, na,
                                       self._refresh_at(max(nb, min(now, na)), na))
        except Exception as e:
            now = self._clock()
            entry.failures += 1
            entry.last_error = f"{type(e).__name__}: {e}"
            if entry.failing_since_s is None:
                entry.failing_since_s = now
            log.log(logging.WARNING if entry.failures == 1 or entry.cert is not None else logging.DEBUG,
                    "certificate for %s not signed (attempt %d): %s", entry.identity, entry.failures, entry.last_error)
            backoff = min(RETRY_MAX_S, RETRY_INITIAL_S * 2 ** (entry.failures - 1))
            entry.next_attempt_s = now + backoff * self._rng.uniform(0.5, 1.0)
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-raise it, nobody is left with a warning
            raise
        else:
            rotated = entry.cert is not None
            log.info("certificate %s for %s: valid until %s, renewal at %s", "rotated" if rotated else "issued",
                     entry.identity, _iso(na), _iso(cert.refresh_at_s),
                     extra={"fields": {"event": "CertificateRotated" if rotated else "CertificateIssued",
                                       "identity": str(entry.identity), "not_after_s": round(na, 3)}})
            if self._entries.get(entry.identity) is entry:  # not forgotten meanwhile
                entry.cert = cert
            entry.failures, entry.last_error, entry.failing_since_s = 0, "", None
            entry.next_attempt_s = cert.refresh_at_s
            entry.forced = False
            fut.set_result(cert)
            return cert
        finally:
            entry.inflight = None
            if not fut.done():  # cancelled while signing: release the waiters too
                fut.cancel()

    def _refresh_at(self, issued_s: float, not_after_s: float) -> float:
        jitter = self._rng.uniform(-self._jitter_fraction, self._jitter_fraction)
        return issued_s + (not_after_s - issued_s) * (self._rotate_fraction + jitter)

    # --- rotation loop ------------------------------------------------------------------------

    def next_due_s(self) -> float | None:
        """When the next renewal attempt is due (absolute, seconds), or None if nothing is managed."""
        times = [max(e.next_attempt_s, e.cert.refresh_at_s if e.cert and not e.forced else 0.0)
                 for e in self._entries.values()]
        return min(times) if times else None

    async def renew_due(self, now_s: float) -> list[tuple[SpiffeId, str | None]]:
        """Renew every identity whose refresh time (or retry time) has come; returns (identity, error)."""
        due = [e for e in self._entries.values()
               if e.inflight is None and now_s >= e.next_attempt_s
               and (e.forced or e.cert is None or now_s >= e.cert.refresh_at_s)]
        results: list[tuple[SpiffeId, str | None]] = []

        async def one(e: _Entry) -> None:
            try:
                await self._renew(e)
                results.append((e.identity, None))
            except Exception as err:
                results.append((e.identity, f"{type(err).__name__}: {err}"))

        async with asyncio.TaskGroup() as tg:
            for e in due:
                tg.create_task(one(e))
        return sorted(results, key=lambda r: r[0])

    async def run(self, idle_s: float = 60.0) -> None:
        """Rotate forever; the owner runs this in its TaskGroup and cancels it to stop."""
        while True:
            now = self._clock()
            await self.renew_due(now)
            nxt = self.next_due_s()
            delay = calendar_wait_s(idle_s if nxt is None else min(idle_s, max(0.05, nxt - self._clock())))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass


def _iso(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sid(identity: SpiffeId | str) -> SpiffeId:
    return identity if isinstance(identity, SpiffeId) else SpiffeId.parse(identity)
