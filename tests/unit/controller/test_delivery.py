"""Issue 11 item 7: a push that fails is retried, and SYNCED means "ACKed the latest desired".

Two places can fail: the reconciler's hand-over to the config service (a Ray call to a state
owner that is restarting), and the config service's push to a proxy (a NACK, or no answer). Both
are retried with backoff, driven here with explicit `now_s`; status never shows SYNCED for a
proxy whose newest config has not reached it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest

from benchmarks.simproxy import make_config
from federation.controller import queries
from federation.controller.distributor import (
    ACK_TIMEOUT_S,
    RETRY_MAX_S,
    AckEvent,
    ConfigDistributor,
    ProxySession,
    SyncState,
    retry_delay_s,
)
from federation.controller.reconciler import Reconciler, RenderInput, RenderOutput
from gitops.model import ConfigSnapshot, Federation, Revision
from ztunnel.api.config import ProxyConfig, Stamp

PID = "ztunnel/a/n1"


def snap(sha: str) -> ConfigSnapshot:
    return ConfigSnapshot(revision=Revision(sha, "msg"), federation=Federation("f", "mesh"), clusters={},
                          trust_domains={}, services={}, lab_clusters={}, destination_rules={},
                          authorization_policies=(), routes=())


def render(inp: RenderInput) -> RenderOutput:
    services = 1 + ord(inp.snapshot.revision.sha[0]) - ord("a")   # a: 1 service, b: 2, ...
    cfg = make_config(PID, inp.snapshot.revision.sha, services=services)
    return RenderOutput({PID: cfg})


class FlakyPush:
    """The config service as the reconciler reaches it: fails while `down`, records what it took."""

    def __init__(self) -> None:
        self.down = False
        self.taken: list[dict[str, ProxyConfig]] = []
        self.attempts = 0

    def __call__(self, configs: Mapping[str, ProxyConfig]) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("the config server actor is restarting")
        self.taken.append(dict(configs))


def test_a_push_that_fails_is_retried_with_backoff_until_it_is_delivered() -> None:
    push = FlakyPush()
    clock = [2.1]
    r = Reconciler(render, push, warmup_max_s=0.0, clock=lambda: clock[0])
    r.on_snapshot(snap("a" * 40), now_s=0.0)
    assert r.reconcile(now_s=1.0, force=True)
    assert [c[PID].stamp.revision for c in push.taken] == ["a" * 40]

    push.down = True
    r.on_snapshot(snap("b" * 40), now_s=2.0)
    assert r.reconcile(now_s=2.1)
    st = r.status()
    assert st["undelivered_proxies"] == [PID] and st["delivery"]["failures"] == 1
    assert "restarting" in st["delivery"]["last_error"] and st["delivery"]["retry_in_s"] == pytest.approx(0.2)
    # before the backoff is over nothing is attempted, however often the loop runs
    attempts = push.attempts
    assert not r.due(2.2) and r.reconcile(now_s=2.2, force=True) and push.attempts == attempts
    # due again after the backoff: the retry fails and the backoff doubles
    assert r.due(2.31) and r.reconcile(now_s=2.31)
    clock[0] = 2.31
    assert push.attempts == attempts + 1 and r.status()["delivery"]["retry_in_s"] == pytest.approx(0.4)
    push.down = False
    assert r.due(2.72) and r.reconcile(now_s=2.72)                 # no new input: only the retry
    assert [c[PID].stamp.revision for c in push.taken] == ["a" * 40, "b" * 40]
    st = r.status()
    assert st["undelivered_proxies"] == [] and st["delivery"]["failures"] == 0 and not r.due(100.0)


def test_status_never_shows_synced_for_a_proxy_whose_newest_config_is_undelivered() -> None:
    """The config service's proxy ACKed revision a; the reconciler rendered b and could not hand it
    over: the proxy is STALE, not SYNCED against the stale desired config."""
    dist = ConfigDistributor(epoch=1, clock=lambda: 0.0)
    dist.set_desired({PID: make_config(PID, "a" * 40)})
    s = dist.attach(PID, None)
    push = s.next_push(0.0, itertools.count())
    assert push is not None
    s.on_reply(push.nonce, False, "", 0.0)
    assert s.sync is SyncState.SYNCED
    rec = {"undelivered_proxies": [PID, "ztunnel/a/n2"], "delivery": {"last_error": "ConnectionError: down"}}
    st = queries.assemble_status(rec, {"proxies": dist.status()}, {}, {}, state_dir="/s", failover_events=0, trust=[],
                                 now_s=0.0)
    by = {p["proxy"]: p for p in st["proxies"]}
    assert by[PID]["sync"] == "STALE" and "ConnectionError: down" in by[PID]["last_failure"]
    assert by["ztunnel/a/n2"]["sync"] == "NOT SENT"   # rendered, never reached the config service


def sent(s: ProxySession, now_s: float, nonces: itertools.count[int]) -> str:
    push = s.next_push(now_s, nonces)
    assert push is not None
    return push.nonce


def test_a_nacked_push_is_retried_after_a_backoff_without_a_new_desired_config() -> None:
    """Before: a NACKed content was never sent again until the desired content changed, so a proxy
    that failed for a moment (e.g. fetching its certificates) stayed STALE forever."""
    nonces = itertools.count()
    s = ProxySession(PID, epoch=7)
    s.set_desired(make_config(PID, "r1", services=2), 0.0)
    s.attach(None)
    n1 = sent(s, 0.0, nonces)
    s.on_reply(n1, True, "data plane failed to apply: certificate service unavailable", 0.0)
    assert s.sync is SyncState.STALE and s.failures == 1
    delay = retry_delay_s(PID, 1)
    assert 0.5 <= delay < 1.0
    assert s.next_push(delay - 0.01, nonces) is None and not s.retry_due(delay - 0.01)
    assert s.retry_due(delay)
    n2 = sent(s, delay, nonces)
    assert s.in_flight is not None and s.in_flight.config.stamp == Stamp(7, "r1", 2) and s.retries == 1
    s.on_reply(n2, True, "still failing", delay)
    assert s.failures == 2 and s.retry_at_s == pytest.approx(delay + retry_delay_s(PID, 2))
    n3 = sent(s, s.retry_at_s, nonces)
    s.on_reply(n3, False, "", s.retry_at_s)
    assert s.sync is SyncState.SYNCED and s.failures == 0 and s.retry_at_s == 0.0


def test_a_new_desired_config_is_sent_at_once_even_during_a_backoff() -> None:
    nonces = itertools.count()
    s = ProxySession(PID, epoch=1)
    s.set_desired(make_config(PID, "r1"), 0.0)
    s.attach(None)
    s.on_reply(sent(s, 0.0, nonces), True, "bad", 0.0)
    s.set_desired(make_config(PID, "r2", services=3), 0.1)
    assert s.next_push(0.1, nonces) is not None and s.failures == 0


def test_a_push_without_an_answer_times_out_and_the_retry_is_a_full_state() -> None:
    d = ConfigDistributor(epoch=1, clock=lambda: 0.0)
    d.set_desired({PID: make_config(PID, "r1")})
    s = d.attach(PID, None)
    s.on_reply(sent(s, 0.0, itertools.count()), False, "", 0.0)          # the proxy runs r1
    d.set_desired({PID: make_config(PID, "r2", services=3)})
    assert d.build(s) and s.in_flight is not None
    assert d.tick(ACK_TIMEOUT_S - 1) == [] and s.in_flight is not None
    assert d.tick(ACK_TIMEOUT_S + 1) == [] and s.in_flight is None     # timed out; backoff starts
    assert s.ack_timeouts == 1 and s.acked is None                     # we no longer know what it runs
    due_at = s.retry_at_s
    assert d.tick(due_at) == [s]                                       # the adapter wakes its stream
    d.clock = lambda: due_at
    (msg,) = d.build(s)
    from ztunnel.api.proto import meshfed_pb2 as pb

    assert pb.ConfigResponse.FromString(msg).base_version == 0         # a full state


def test_a_reply_wakes_the_stream_only_when_it_leaves_a_push_to_make() -> None:
    """`ConfigDistributor.on_reply` says whether the stream's writer must wake: not for an ACK of
    the desired content, nor for a NACK whose retry waits for a backoff (`tick` wakes it then);
    yes for a resync NACK (a full state follows at once) and for an ACK that arrives after the
    desired content moved while the push was in flight."""
    from ztunnel.api.proto import meshfed_pb2 as pb

    d = ConfigDistributor(epoch=1, clock=lambda: 0.0)
    d.set_desired({PID: make_config(PID, "r1")})
    s = d.attach(PID, None)

    def reply(nack: bool = False, error: str = "") -> bool:
        assert s.in_flight is not None
        return d.on_reply(s, pb.ConfigRequest(response_nonce=s.in_flight.nonce, nack=nack, error_detail=error))

    assert d.build(s) and s.push_due(0.0) is False                      # in flight: nothing more
    assert reply() is False and s.sync is SyncState.SYNCED              # ACKed what we want
    d.set_desired({PID: make_config(PID, "r2", services=3)})
    assert d.build(s)
    d.set_desired({PID: make_config(PID, "r3", services=4)})            # moved while r2 is in flight
    assert s.push_due(0.0) is False                                     # one push in flight at most
    assert reply() is True                                              # r2 ACKed, r3 is due now
    assert d.build(s)
    assert reply(nack=True, error="bad route") is False                 # a backoff first: tick wakes it
    assert s.retry_at_s > 0 and d.tick(s.retry_at_s) == [s] and s.push_due(s.retry_at_s)
    d.clock = lambda: s.retry_at_s
    assert d.build(s)
    assert reply(nack=True, error="resync: unknown base version") is True   # a full state at once
    assert s.acked is None
    (msg,) = d.build(s)                                                 # earlier NACK or not
    assert pb.ConfigResponse.FromString(msg).base_version == 0


@pytest.mark.parametrize("proxy_id", ["ztunnel/a/n1", "gateway/b", "ztunnel/c/node-42"])
def test_backoff_doubles_is_capped_and_spread_per_proxy(proxy_id: str) -> None:
    delays = [retry_delay_s(proxy_id, n) for n in range(1, 15)]
    assert all(b == pytest.approx(2 * a) for a, b in itertools.pairwise(delays[:6]))
    assert max(delays) <= RETRY_MAX_S and delays[-1] >= RETRY_MAX_S / 2
    assert len({retry_delay_s(p, 1) for p in ("ztunnel/a/n1", "ztunnel/a/n2", "ztunnel/a/n3")}) == 3


def test_metrics_count_sync_states_as_status_shows_them() -> None:
    from federation.server import metrics

    dist = ConfigDistributor(epoch=1, clock=lambda: 0.0)
    dist.set_desired({PID: make_config(PID, "a" * 40)})
    s = dist.attach(PID, None)
    push = s.next_push(0.0, itertools.count())
    assert push is not None
    s.on_reply(push.nonce, False, "", 0.0)
    cs = {"proxies": dist.status(), "counts": dist.counts()}
    rec = {"undelivered_proxies": [PID], "undelivered": 1, "delivery": {"last_error": "down"}}
    st = queries.assemble_status(rec, cs, {}, {}, state_dir="/s", failover_events=0, trust=[], now_s=0.0)
    text = metrics.render(metrics.make_registry(lambda: st)).decode()
    assert 'meshfed_proxy_sync{state="SYNCED"} 0.0' in text and 'meshfed_proxy_sync{state="STALE"} 1.0' in text
    assert "meshfed_configs_undelivered 1.0" in text


def test_a_reconnect_on_the_acked_version_resumes_without_a_push() -> None:
    """A stream ended on purpose (its certificate expired) reconnects saying what it runs: nothing
    is resent, the proxy stays SYNCED, and the next change is a delta."""
    d = ConfigDistributor(epoch=1, clock=lambda: 0.0)
    d.set_desired({PID: make_config(PID, "r1")})
    s = d.attach(PID, None)
    s.on_reply(sent(s, 0.0, itertools.count()), False, "", 0.0)
    runs = s.acked_stamp
    d.detach(s)
    assert d.attach(PID, runs) is s and s.sync is SyncState.SYNCED and d.build(s) == []
    d.set_desired({PID: make_config(PID, "r2", services=3)})
    assert d.build(s) and s.in_flight is not None and s.acked is not None   # a delta from r1


def test_a_hello_naming_the_push_in_flight_is_its_ack() -> None:
    """Before: a stream cut after the proxy applied a push but before its ACK arrived reconnected
    naming that push's stamp, which matched nothing we knew, and got a full state it already ran
    (at 100k endpoints, seconds of work on both sides). The proxy's `have` moves only once its data
    plane applied a config, so the hello settles the push as ACKed (and announces it)."""
    acks: list[AckEvent] = []
    d = ConfigDistributor(epoch=1, clock=lambda: 0.0)
    d.listeners.append(acks.append)
    d.set_desired({PID: make_config(PID, "r1")})
    s = d.attach(PID, None)
    s.on_reply(sent(s, 0.0, itertools.count()), False, "", 0.0)
    d.set_desired({PID: make_config(PID, "r2", services=3)})
    assert d.build(s) and s.in_flight is not None
    applied = s.in_flight.config.stamp
    d.detach(s)                                                           # cut before the ACK came
    assert d.attach(PID, applied) is s
    assert s.in_flight is None and s.acked_stamp == applied and s.sync is SyncState.SYNCED
    assert d.build(s) == [] and [(e.stamp, e.nack) for e in acks][-1] == (applied, False)
    # a hello naming anything else is not an ACK: the proxy's content is unknown, a full state follows
    d.set_desired({PID: make_config(PID, "r3", services=4)})
    assert d.build(s) and s.in_flight is not None
    d.detach(s)
    d.attach(PID, Stamp(1, "r-other", 99))
    assert s.acked is None and s.sync is SyncState.STALE


def test_a_retry_lost_with_its_stream_is_sent_again_when_the_proxy_reconnects() -> None:
    """Before: the proxy NACKed X, the retry of X was in flight when the stream dropped, and the
    proxy reconnected on what it ACKed before X; nothing ever sent X again (STALE until the desired
    content changed)."""
    nonces = itertools.count()
    s = ProxySession(PID, epoch=1)
    s.set_desired(make_config(PID, "r1"), 0.0)
    s.attach(None)
    s.on_reply(sent(s, 0.0, nonces), False, "", 0.0)                     # runs r1
    s.set_desired(make_config(PID, "r2", services=2), 1.0)
    s.on_reply(sent(s, 1.0, nonces), True, "certificates not ready", 1.0)  # X = r2, NACKed
    assert s.in_flight is None and not s.push_due(1.0)                   # the backoff runs
    sent(s, s.retry_at_s, nonces)                                        # the retry leaves...
    assert s.acked is not None
    have = s.acked.stamp
    s.detach()                                                           # ...and its stream drops
    s.attach(have, 20.0)                                                 # back on r1
    assert s.push_due(20.0)
    push = s.next_push(20.0, nonces)
    assert push is not None and push.config.stamp.revision == "r2" and s.retries == 2


def test_a_nacked_content_that_comes_back_is_sent_again() -> None:
    """Before: the proxy NACKed X, the desired content moved to Y and back to X before Y was
    sent; X was never sent again."""
    nonces = itertools.count()
    s = ProxySession(PID, epoch=1)
    x, y = make_config(PID, "x", services=2), make_config(PID, "y", services=3)
    s.set_desired(x, 0.0)
    s.attach(None)
    s.on_reply(sent(s, 0.0, nonces), True, "bad", 0.0)
    s.set_desired(y, 0.1)                  # a new content: the backoff is reset...
    s.set_desired(x, 0.2)                  # ...and X is new again
    assert s.push_due(0.2)
    push = s.next_push(0.2, nonces)
    assert push is not None and push.config.stamp.revision == "x"


def test_resync_nacks_in_a_row_wait_for_the_backoff() -> None:
    """A full state has no base to mismatch: a proxy that answers every push with "resync" is
    broken or hostile, and gets one full state at once, then the backoff."""
    from ztunnel.api.proto import meshfed_pb2 as pb

    d = ConfigDistributor(epoch=1, clock=lambda: 0.0)
    d.set_desired({PID: make_config(PID, "r1", services=3)})
    s = d.attach(PID, None)

    def resync() -> bool:
        assert d.build(s) and s.in_flight is not None
        return d.on_reply(s, pb.ConfigRequest(response_nonce=s.in_flight.nonce, nack=True,
                                              error_detail="resync: delta is based on version 4"))

    assert resync() is True and s.retry_at_s == 0.0                    # the first: a full state at once
    assert resync() is False and s.retry_at_s > 0                     # the second: wait
    assert d.build(s) == [] and d.tick(s.retry_at_s) == [s]
    d.clock = lambda: s.retry_at_s
    assert d.build(s)                                                  # then one more try
    d.on_reply(s, pb.ConfigRequest(response_nonce=s.in_flight.nonce))  # type: ignore[union-attr]
    assert s.sync is SyncState.SYNCED and s.resyncs_in_a_row == 0 and s.failures == 0
