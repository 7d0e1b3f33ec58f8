"""The proxy side of the meshfed config protocol (gRPC, delta-xDS style): subscribe, apply, ACK/NACK.

Three layers, decide-then-act:

1. The codec (`encode_delta` / `decode_delta`): a `ConfigDelta` <-> protobuf `ConfigResponse`
   chunks. Each resource travels as its JSON form (`ztunnel.api.config.resource_to_dict`), the same
   form as standalone config files, but for endpoints, which come as tables because the hello
   announces `ENDPOINT_TABLES` (the decoder reads both forms). A delta larger than `max_message_bytes` is split into chunks
   that share one nonce; a single resource larger than the limit is refused with `OversizeError`
   naming it. The controller (`federation.server.grpc_services`) uses the same codec.
2. `Subscription`, a sans-IO state machine: responses in, (request to send, config to apply) out.
   Rules: a response older than or equal to what the proxy runs is NACKed and never applied;
   a response from an older controller epoch is refused (`StaleControllerError`: split brain);
   a delta whose base is not our version is NACKed with "resync" so the controller sends full
   state; a resource that fails to parse, or that the data plane rejects, NACKs the whole
   response and the proxy stays on its previous version (last known good).
3. `XdsClient`, the asyncio adapter: connects, sends the hello with what it runs, pumps responses
   through the subscription into a `ConfigSink` (the data plane's apply hook), reconnects with
   exponential backoff and jitter, and streams health reports from a `HealthSource`.
4. Identity: a proxy's own SPIFFE ID names it (`proxy_spiffe_id`). Proxies reach the controller
   through `ztunnel.xds.channel` (TLS made by the proxy, the controller's SPIFFE ID pinned against
   the proxy's own trust domain's roots). `secure_channel` is gRPC's own TLS, which checks only a
   DNS name against a root pool: kept for tests and tools that play a client, never for proxies.
5. Liveness: channels ping the controller every `KEEPALIVE_TIME_MS` (also with no call open) and
   give up on a ping unanswered for `KEEPALIVE_TIMEOUT_MS`, so a link that silently stopped
   forwarding fails the config stream within ~20 s and the client reconnects (with backoff),
   instead of waiting on a dead TCP connection for as long as the kernel keeps it. The controller
   accepts pings at this rate (`federation.server.grpc_services.MIN_CLIENT_PING_INTERVAL_MS`).

Invariants of `Subscription`: `current` only ever moves to a strictly newer (epoch, version);
`current` is never replaced by a config that failed to parse or that the sink rejected; it moves
only on `commit()`, after the data plane has applied the config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ztunnel.api.codec import (
    CERT_METHOD,
    CONFIG_METHOD,
    DEFAULT_MAX_MESSAGE_BYTES,
    HEALTH_METHOD,
    PLANNED_STREAM_ENDS,
    STREAM_END_METADATA,
    decode_delta,
    header_to_pb,
    stamp_to_pb,
    template_from_header,
)
from ztunnel.api.config import (
    ENDPOINT_TABLES,
    ProxyConfig,
    Stamp,
    apply_delta,
)
from ztunnel.api.identity import CONTROLLER_TLS_NAME, proxy_spiffe_id
from ztunnel.api.proto import meshfed_pb2 as pb

log = logging.getLogger(__name__)


class StaleControllerError(RuntimeError):
    """The controller's epoch is older than the one this proxy follows (another controller is newer)."""


# --- the sans-IO subscription -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseDecision:
    """What handling one response decided: the request to send back, and the config to run."""

    reply: Any | None                    # ConfigRequest (ACK/NACK), None while chunks are pending
    apply: ProxyConfig | None = None     # a new config to hand to the data plane
    error: str = ""                      # NACK reason
    stale_controller: bool = False


class Subscription:
    """One proxy's view of the protocol. Feed it responses; it says what to ACK and what to apply."""

    def __init__(self, header: ProxyConfig, current: ProxyConfig | None = None) -> None:
        self.header = header        # proxy_id, mode, cluster, network, trust domain
        self.current = current      # last good config (e.g. loaded from disk at start)
        self._pending: list[Any] = []
        self.acks = 0
        self.nacks = 0
        self.last_error = ""

    @property
    def have(self) -> Stamp | None:
        return self.current.stamp if self.current is not None else None

    def hello(self) -> Any:
        return pb.ConfigRequest(proxy=header_to_pb(self.header), have=stamp_to_pb(self.have),
                                features=[ENDPOINT_TABLES])

    def _reply(self, nonce: str, error: str, rejected: Sequence[str] = ()) -> Any:
        req = pb.ConfigRequest(response_nonce=nonce, nack=True, error_detail=error, applied=stamp_to_pb(self.have))
        req.rejected_keys.extend(r.split(":", 1)[0] for r in rejected)
        self.nacks += 1
        self.last_error = error
        return req

    def on_response(self, resp: Any, validate: Callable[[ProxyConfig], list[str]] | None = None) -> ResponseDecision:
        """Handle one response (chunk). `validate(config)` lets the data plane reject resources
        before the config becomes current (returns error strings; empty = accept)."""
        if self._pending and self._pending[0].nonce != resp.nonce:
            self._pending = []  # a new nonce supersedes an unfinished one
        self._pending.append(resp)
        if len(self._pending) < max(1, resp.chunks):
            return ResponseDecision(None)
        chunks, self._pending = sorted(self._pending, key=lambda c: c.chunk), []
        decoded = decode_delta(chunks)
        stamp, have = decoded.delta.stamp, self.have
        if have is not None and stamp.epoch < have.epoch:
            err = (f"controller epoch {stamp.epoch} is older than epoch {have.epoch} this proxy follows: "
                   f"another controller is newer (split brain); refusing its config")
            return ResponseDecision(self._reply(resp.nonce, err), error=err, stale_controller=True)
        if not stamp.newer_than(have):
            err = f"version {stamp.epoch}.{stamp.version} is not newer than {have.epoch}.{have.version} (have)" if have else "empty stamp"
            return ResponseDecision(self._reply(resp.nonce, err), error=err)
        if decoded.rejected:
            err = "rejected resources: " + "; ".join(decoded.rejected[:20])
            return ResponseDecision(self._reply(resp.nonce, err, decoded.rejected), error=err)
        try:
            cfg = apply_delta(self.current, decoded.delta, template_from_header(decoded.header))
        except ValueError as e:
            err = f"resync: {e}"
            return ResponseDecision(self._reply(resp.nonce, err), error=err)
        problems = validate(cfg) if validate is not None else []
        if problems:
            err = "data plane rejected: " + "; ".join(problems[:20])
            return ResponseDecision(self._reply(resp.nonce, err, problems), error=err)
        self.acks += 1
        ack = pb.ConfigRequest(response_nonce=resp.nonce, applied=stamp_to_pb(cfg.stamp))
        return ResponseDecision(ack, apply=cfg)

    def commit(self, cfg: ProxyConfig) -> None:
        """The data plane runs `cfg` now: it becomes the base of the next delta."""
        self.current = cfg

    def fail_apply(self, nonce: str, error: str) -> Any:
        """The data plane could not run a config it had accepted: NACK instead of the ACK."""
        self.acks -= 1
        return self._reply(nonce, f"data plane failed to apply: {error}")


# --- the asyncio adapter ----------------------------------------------------------------------


class ConfigSink(Protocol):
    """The data plane's side: validate a config (errors = reject, keep the old one), then run it."""

    def validate(self, config: ProxyConfig) -> list[str]: ...

    async def apply(self, config: ProxyConfig) -> None: ...


class HealthSource(Protocol):
    """The data plane's local outlier detection, drained into reports every `health_interval_s`."""

    def drain_outcomes(self) -> list[Any]: ...  # list of pb.EndpointOutcome


@dataclass
class Backoff:
    """Exponential backoff with full jitter (decide here; the client sleeps).

    A session that lasted `stable_s` or more was a working connection, not a failing dial: its
    end starts the backoff over (`session_ended`), so a stream the controller ends on purpose
    (its certificate expired, a restart) is reconnected at once, not after the longest delay that
    earlier, unrelated failures in the proxy's life had climbed to."""

    initial_s: float = 0.1
    max_s: float = 5.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)
    stable_s: float = 10.0

    def next_delay_s(self) -> float:
        cap = min(self.max_s, self.initial_s * (2 ** self.attempt))
        self.attempt += 1
        return self.rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        self.attempt = 0

    def session_ended(self, lasted_s: float) -> None:
        if lasted_s >= self.stable_s:
            self.reset()


class XdsClient:
    """Keeps one proxy subscribed to a controller. `run()` until `stop()`; never raises on I/O.

    `channel_factory()` returns a fresh `grpc.aio.Channel` (secure with the proxy's SVID, or
    insecure for loopback tests); `metadata` is sent on every call (insecure mode: the proxy id).
    `explain` adds what the layer under the channel knows to gRPC's description of a lost stream
    (`ControllerBridge.explain`: why it refused the controller's certificate).
    """

    def __init__(self, subscription: Subscription, sink: ConfigSink,
                 channel_factory: Callable[[], Any], metadata: Sequence[tuple[str, str]] = (),
                 health: HealthSource | None = None, health_interval_s: float = 1.0,
                 backoff: Backoff | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 on_error: Callable[[BaseException], None] | None = None,
                 explain: Callable[[str], str] = lambda detail: detail) -> None:
        self.sub, self.sink, self.channel_factory = subscription, sink, channel_factory
        self.explain = explain
        self.on_error = on_error  # told of every session that ended in an error (e.g. UNAUTHENTICATED)
        self.metadata = tuple(metadata)
        self.health, self.health_interval_s = health, health_interval_s
        self.backoff = backoff or Backoff()
        self.max_message_bytes = max_message_bytes
        self.connected = asyncio.Event()
        self.applied = asyncio.Event()  # set after every applied config
        self.last_error = ""
        self.stale_controller = False
        self._stop = asyncio.Event()
        self.connects = 0

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        lost = ""   # what the log last said about the stream ("" = connected or never tried)
        while not self._stop.is_set():
            started_s = time.monotonic()
            try:
                await self._session()
                self.backoff.reset()
            except Exception as e:  # any transport error: back off and reconnect
                detail = describe_error(e)
                self.last_error = self.explain(detail)
                if "split brain" in detail:
                    self.stale_controller = True
                planned = planned_stream_end(e)
                if planned:   # the controller ended it on purpose (a rotated certificate): routine
                    lost = ""
                    log.info("config stream ended by the controller (%s); reconnecting", self.last_error,
                             extra={"fields": {"event": "ControllerStreamEnded", "reason": planned}})
                # once per distinct error, not once per retry (the explanation's "N s ago" changes
                # every time: gRPC's part decides)
                elif detail != lost:
                    lost = detail
                    log.warning("config stream to the controller lost (%s); serving the last applied config, "
                                "reconnecting with backoff", self.last_error,
                                extra={"fields": {"event": "ControllerLost", "error": self.last_error}})
                if self.on_error is not None:
                    self.on_error(e)
                self.backoff.session_ended(time.monotonic() - started_s)
            self.connected.clear()
            if self._stop.is_set():
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.backoff.next_delay_s())

    async def _session(self) -> None:
        channel = self.channel_factory()
        try:
            call = channel.stream_stream(CONFIG_METHOD, request_serializer=pb.ConfigRequest.SerializeToString,
                                         response_deserializer=pb.ConfigResponse.FromString)(
                metadata=self.metadata)
            await call.write(self.sub.hello())
            self.connects += 1
            self.connected.set()
            have = self.sub.have
            log.log(logging.INFO if self.connects == 1 or self.last_error else logging.DEBUG,
                    "config stream to the controller open (connection %d, running %s)", self.connects,
                    f"{have.epoch}.{have.version} of revision {have.revision[:8]}" if have is not None else "nothing yet",
                    extra={"fields": {"event": "ControllerConnected"}})
            async with asyncio.TaskGroup() as tg:
                stopper = tg.create_task(self._stop.wait())
                health = tg.create_task(self._health_loop(channel)) if self.health is not None else None
                try:
                    while True:
                        read = asyncio.ensure_future(call.read())
                        done, _ = await asyncio.wait({read, stopper}, return_when=asyncio.FIRST_COMPLETED)
                        if stopper in done:
                            read.cancel()
                            call.cancel()
                            return
                        resp = read.result()
                        if resp is None or resp is _eof():
                            raise ConnectionError("controller closed the config stream")
                        await self._handle(call, resp)
                finally:
                    stopper.cancel()
                    if health is not None:
                        health.cancel()
        finally:
            await channel.close()

    async def _handle(self, call: Any, resp: Any) -> None:
        outcome = self.sub.on_response(resp, self.sink.validate)
        reply = outcome.reply
        if outcome.apply is not None:
            try:
                await self.sink.apply(outcome.apply)
                self.sub.commit(outcome.apply)
            except Exception as e:  # the data plane keeps its previous config
                reply = self.sub.fail_apply(resp.nonce, describe_error(e))
                outcome = ResponseDecision(reply, error=reply.error_detail)
        if reply is not None:
            await call.write(reply)
            if reply.nack:
                log.warning("NACK sent for the controller's push: %s (keeping %s)", reply.error_detail,
                            "the previous config" if self.sub.current is not None else "no config",
                            extra={"fields": {"event": "ConfigNacked", "error": reply.error_detail}})
        if outcome.apply is not None:
            self.applied.set()
        if outcome.error:
            self.last_error = outcome.error
        if outcome.stale_controller:
            self.stale_controller = True
            call.cancel()
            raise StaleControllerError(outcome.error)

    async def _health_loop(self, channel: Any) -> None:
        assert self.health is not None
        call = channel.stream_unary(HEALTH_METHOD, request_serializer=pb.HealthReport.SerializeToString,
                                    response_deserializer=pb.HealthSummary.FromString)(metadata=self.metadata)
        try:
            while True:
                await asyncio.sleep(self.health_interval_s)
                outcomes = self.health.drain_outcomes()
                if outcomes:
                    report = pb.HealthReport(proxy_id=self.sub.header.proxy_id, sent_at_s=time.time())
                    report.outcomes.extend(outcomes)
                    await call.write(report)
        finally:
            call.cancel()


def _root_cause(e: BaseException) -> BaseException:
    """The first leaf of nested exception groups (a task group's failure wraps the call's error)."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def planned_stream_end(e: BaseException) -> str:
    """Why the controller ended a stream on purpose (`STREAM_END_METADATA` in its trailers, one of
    the reasons we know), or ""."""
    e = _root_cause(e)
    trailers = getattr(e, "trailing_metadata", None)
    if not callable(trailers):
        return ""
    for key, value in trailers() or ():
        if key == STREAM_END_METADATA and value in PLANNED_STREAM_ENDS:
            return str(value)
    return ""


def describe_error(e: BaseException) -> str:
    """One line for status: the root cause out of exception groups, gRPC code and details."""
    e = _root_cause(e)
    code, details = getattr(e, "code", None), getattr(e, "details", None)
    if callable(code) and callable(details):
        c = code()
        return f"{getattr(c, 'name', c)}: {details()}"
    return f"{type(e).__name__}: {e}"


def _eof() -> Any:
    import grpc.aio

    return grpc.aio.EOF


KEEPALIVE_TIME_MS = 10_000      # ping the controller this often ...
KEEPALIVE_TIMEOUT_MS = 10_000   # ... and treat the link as dead when a ping is not answered in time


def keepalive_options() -> list[tuple[str, Any]]:
    """HTTP/2 keepalive for a channel to the controller (see the module docstring, point 5). The
    ack deadline of a keepalive ping is `grpc.http2.ping_timeout_ms` in grpcio 1.85 (measured: with
    `keepalive_timeout_ms` alone a frozen link went unnoticed for over a minute), so both are set."""
    return [("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    target_name: str = CONTROLLER_TLS_NAME) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes + 65536),
            ("grpc.max_send_message_length", max_message_bytes + 65536),
            ("grpc.ssl_target_name_override", target_name), *keepalive_options()]


def secure_channel(target: str, roots_pem: bytes, key_pem: bytes | None = None, chain_pem: bytes | None = None,
                   target_name: str = CONTROLLER_TLS_NAME,
                   max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Any:
    """gRPC's own TLS channel to the controller at `target` ("host:port"), verified against
    `roots_pem` under the DNS name `target_name` (use `controller_tls_name(td)`: the controller
    serves one certificate per trust domain by SNI); with `key_pem`/`chain_pem` it is mTLS. Tests
    and tools only: it cannot pin the controller's SPIFFE ID (proxies use `ztunnel.xds.channel`)."""
    import grpc
    import grpc.aio

    creds = grpc.ssl_channel_credentials(root_certificates=roots_pem, private_key=key_pem,
                                         certificate_chain=chain_pem)
    return grpc.aio.secure_channel(target, creds, options=channel_options(max_message_bytes, target_name))


@dataclass(frozen=True)
class Svid:
    """A proxy's certificate for the config protocol; the key was generated here and never sent."""

    identity: str
    key_pem: bytes = field(repr=False)
    chain_pem: bytes
    roots_pem: bytes
    expires_at_s: float

    def channel_factory(self, target: str, target_name: str = CONTROLLER_TLS_NAME,
                        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Callable[[], Any]:
        """For `XdsClient(channel_factory=...)`: a fresh mTLS channel per (re)connect."""
        return lambda: secure_channel(target, self.roots_pem, self.key_pem, self.chain_pem, target_name,
                                      max_message_bytes)


async def bootstrap_svid(bootstrap_target: str, proxy_id: str, trust_domain: str, roots_pem: bytes, token: str = "",
                         target_name: str = "", ttl_s: int = 0, timeout_s: float = 5.0,
                         service_account_token: str = "") -> Svid:
    """The first certificate (tests and tools): a CSR for `proxy_spiffe_id(...)` with a bootstrap
    token or a service account token, over server-authenticated TLS to the controller's bootstrap
    port (`target_name` defaults to the trust domain's `controller_tls_name`). Raises grpc's
    AioRpcError (UNAUTHENTICATED for a wrong credential, PERMISSION_DENIED for another proxy's)."""
    from ztunnel.api.identity import controller_tls_name, generate_key_and_csr

    identity = proxy_spiffe_id(trust_domain, proxy_id)
    kc = generate_key_and_csr(identity)
    channel = secure_channel(bootstrap_target, roots_pem, target_name=target_name or controller_tls_name(trust_domain))
    try:
        resp = await request_certificate(channel, proxy_id, kc.csr_pem, bootstrap_token=token, ttl_s=ttl_s,
                                         timeout_s=timeout_s, service_account_token=service_account_token)
    finally:
        await channel.close()
    return Svid(identity, kc.key_pem, b"".join(resp.cert_chain_pem), b"".join(resp.roots_pem),
                float(resp.expires_at_s))


async def request_certificate(channel: Any, proxy_id: str, csr_pem: bytes, bootstrap_token: str = "",
                              ttl_s: int = 0, metadata: Sequence[tuple[str, str]] = (),
                              timeout_s: float = 5.0, service_account_token: str = "") -> Any:
    """CSR in, SVID out (`CertificateResponse`). The private key never leaves the caller."""
    call: Callable[..., Awaitable[Any]] = channel.unary_unary(
        CERT_METHOD, request_serializer=pb.CertificateRequest.SerializeToString,
        response_deserializer=pb.CertificateResponse.FromString)
    return await call(pb.CertificateRequest(proxy_id=proxy_id, csr_pem=csr_pem, bootstrap_token=bootstrap_token,
                                            ttl_s=ttl_s, service_account_token=service_account_token),
                      metadata=tuple(metadata), timeout=timeout_s)
