"""Config shards without Ray: the partition is pure and stable, a shard applies only its own
proxies' deltas and knows whom it still waits on, and the sharded outbox never loses a push
when one shard fails (issue 11 item 7: SYNCED means ACKed the latest desired content)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest

from benchmarks.simproxy import make_config
from federation.controller.distributor import ConfigDistributor, SyncState
from federation.controller.reconcile_service import DeltaOutbox, ShardDeliveryError, ShardedOutbox
from federation.controller.shard import ConfigShard, apply_config_deltas, partition, shard_of
from federation.controller.wire import decode_shard_configs, encode_shard_configs
from ztunnel.api.config import ProxyConfig, Stamp
from ztunnel.api.proto import meshfed_pb2 as pb

IDS = [f"ztunnel/c{c}/node-{n}" for c in range(10) for n in range(100)] + [f"gateway/c{c}" for c in range(10)]


def cfg(pid: str, rev: str, version: int, services: int = 2) -> ProxyConfig:
    return replace(make_config(pid, rev, services=services), stamp=Stamp(1, rev, version))


# --- the partition ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 8])
def test_the_partition_covers_every_proxy_once_and_is_balanced(shards: int) -> None:
    parts = partition(IDS, shards)
    assert sorted(p for part in parts for p in part) == sorted(IDS)
    assert all(shard_of(p, shards) == k for k, part in enumerate(parts) for p in part)
    fair = len(IDS) / shards   # binomial: within 4 standard deviations of a fair share
    assert all(abs(len(part) - fair) < 4 * fair ** 0.5 for part in parts), [len(p) for p in parts]


def test_the_partition_is_stable_and_one_more_shard_moves_only_what_it_wins() -> None:
    four, five = partition(IDS, 4), partition(IDS, 5)
    assert partition(list(reversed(IDS)), 4) == [list(reversed(p)) for p in four]   # order-free
    moved = [p for p in IDS if shard_of(p, 4) != shard_of(p, 5)]
    assert all(shard_of(p, 5) == 4 for p in moved)                # only to the new shard
    assert abs(len(moved) - len(IDS) / 5) < 4 * (len(IDS) / 5) ** 0.5 and len(five[4]) == len(moved)


@pytest.mark.parametrize("shards", [0, -1, 257])
def test_a_shard_count_out_of_range_is_refused(shards: int) -> None:
    with pytest.raises(ValueError, match="shards must be"):
        shard_of("ztunnel/a/n1", shards)


# --- one shard -----------------------------------------------------------------------------------


def reply(nonce: str, nack: bool = False) -> pb.ConfigRequest:
    return pb.ConfigRequest(response_nonce=nonce, nack=nack, error_detail="bad" if nack else "")


def mine(shards: int, index: int, count: int) -> list[str]:
    return [p for p in IDS if shard_of(p, shards) == index][:count]


def test_a_shard_waits_for_the_proxies_whose_content_moved_until_they_ack_it() -> None:
    now = [10.0]
    shard = ConfigShard(1, 3, epoch=7, clock=lambda: now[0])
    a, b = mine(3, 1, 2)
    assert shard.apply(encode_shard_configs({a: cfg(a, "r1", 1), b: cfg(b, "r1", 1)}, full=True)) == "ok"
    assert shard.waiting == {a, b} and not shard.settled()
    sa = shard.dist.attach(a, None)
    push = shard.dist.build(sa)
    assert push and sa.in_flight is not None and sa.in_flight.config.stamp.epoch == 7
    shard.dist.on_reply(sa, reply(sa.in_flight.nonce, nack=True))      # a NACK is not an ACK
    assert shard.waiting == {a, b} and shard.nacks == 1
    now[0] = sa.retry_at_s                                            # the backoff is over: sent again
    assert shard.dist.tick() == [sa]
    shard.dist.build(sa)
    assert sa.in_flight is not None
    shard.dist.on_reply(sa, reply(sa.in_flight.nonce))
    sb = shard.dist.attach(b, None)
    shard.dist.build(sb)
    assert sb.in_flight is not None
    assert shard.waiting == {b}
    now[0] += 0.5
    shard.dist.on_reply(sb, reply(sb.in_flight.nonce))
    assert shard.settled() and shard.take_settled() == (now[0], 2) and shard.take_settled() == (now[0], 0)
    # the same content again (a newer revision of it) moves nothing: nothing to wait for
    assert shard.apply(encode_shard_configs({a: cfg(a, "r1", 1)})) == "ok"
    assert shard.settled() and shard.take_settled()[1] == 0
    assert [f["state"] for f in shard.rollout("r1", [a, b])] == ["acked", "acked"]
    assert shard.dist.sessions[a].sync is SyncState.SYNCED


def test_a_shard_refuses_configs_of_proxies_it_does_not_serve() -> None:
    shard = ConfigShard(0, 2, epoch=1)
    stranger = mine(2, 1, 1)[0]
    with pytest.raises(ValueError, match="does not serve"):
        shard.apply(encode_shard_configs({stranger: cfg(stranger, "r1", 1)}, full=True))
    assert stranger not in shard.dist.sessions


def test_a_restarted_shard_asks_for_everything_in_full_and_a_full_set_forgets_the_rest() -> None:
    shard = ConfigShard(0, 1, epoch=2)
    assert shard.apply(encode_shard_configs({IDS[0]: cfg(IDS[0], "r2", 2)})) == "resync"
    assert not shard.dist.sessions
    assert shard.apply(encode_shard_configs({p: cfg(p, "r2", 2) for p in IDS[:3]}, full=True)) == "ok"
    assert shard.apply(encode_shard_configs({p: cfg(p, "r3", 3) for p in IDS[1:3]}, full=True)) == "ok"
    assert set(shard.dist.sessions) == set(IDS[1:3])


# --- the sharded outbox ------------------------------------------------------------------------------


class Shards:
    """Each shard a real `ConfigShard`; `down` shards raise as a dead actor would."""

    def __init__(self, count: int) -> None:
        self.shards = [ConfigShard(k, count, epoch=1) for k in range(count)]
        self.down: set[int] = set()
        self.calls: list[dict[int, int]] = []   # per exchange: shard -> proxies in its blob

    def send_all(self, blobs: Mapping[int, bytes]) -> dict[int, str | BaseException]:
        self.calls.append({k: len(decode_shard_configs(b).configs) for k, b in blobs.items()})
        return {k: ConnectionError(f"shard {k} died") if k in self.down else self.shards[k].apply(b)
                for k, b in blobs.items()}

    def desired(self, pid: str) -> ProxyConfig | None:
        s = self.shards[shard_of(pid, len(self.shards))].dist.sessions.get(pid)
        return s.desired if s is not None else None


def test_each_shard_gets_only_its_proxies_in_one_exchange() -> None:
    fleet = Shards(3)
    box = ShardedOutbox(fleet.send_all, 3)
    configs = {p: cfg(p, "r1", 1) for p in IDS[:60]}
    box.push(configs)
    assert len(fleet.calls) == 1 and sum(fleet.calls[0].values()) == 60
    for k, shard in enumerate(fleet.shards):
        assert set(shard.dist.sessions) == {p for p in configs if shard_of(p, 3) == k}
    assert box.last_sent == configs


def test_a_failed_shard_keeps_its_push_for_the_retry_and_the_others_are_not_resent() -> None:
    fleet = Shards(3)
    box = ShardedOutbox(fleet.send_all, 3)
    ids = IDS[:60]
    box.push({p: cfg(p, "r1", 1) for p in ids})
    v2 = {p: cfg(p, "r2", 2, services=3) for p in ids}
    fleet.down = {1}
    with pytest.raises(ConnectionError, match="shard 1 died"):
        box.push(v2)
    on_1 = [p for p in ids if shard_of(p, 3) == 1]
    assert all(box.sent[1][p].stamp.revision == "r1" for p in on_1)            # nothing recorded for shard 1
    assert all(fleet.desired(p).stamp.revision == ("r1" if p in on_1 else "r2") for p in ids)  # type: ignore[union-attr]
    fleet.down = set()
    box.push(v2)                                                  # the reconciler's retry: the same configs
    assert fleet.calls[-1] == {1: len(on_1)}                      # only the shard that missed them
    assert all(fleet.desired(p).stamp.revision == "r2" for p in ids)  # type: ignore[union-attr]
    assert box.last_sent == v2


def test_two_failed_shards_are_named_together() -> None:
    fleet = Shards(3)
    box = ShardedOutbox(fleet.send_all, 3)
    fleet.down = {0, 2}
    with pytest.raises(ShardDeliveryError, match=r"2 config shards.*shard 0.*shard 2"):
        box.push({p: cfg(p, "r1", 1) for p in IDS[:60]})
    assert not box.sent[0] and not box.sent[2] and box.sent[1]


def test_a_shard_that_restarted_gets_its_proxies_in_full_and_the_others_deltas() -> None:
    fleet = Shards(2)
    box = ShardedOutbox(fleet.send_all, 2)
    ids = IDS[:20]
    box.push({p: cfg(p, "r1", 1) for p in ids})
    fleet.shards[0] = ConfigShard(0, 2, epoch=2)                  # restarted: holds nothing
    changed = {p: cfg(p, "r2", 2, services=3) for p in ids[:4]}
    box.push(changed)
    on_0 = [p for p in ids if shard_of(p, 2) == 0]
    assert set(fleet.shards[0].dist.sessions) == set(on_0) and box.resyncs == 1
    assert all(fleet.desired(p) is not None for p in ids)
    assert {p: fleet.desired(p).stamp.revision for p in changed} == {p: "r2" for p in changed}  # type: ignore[union-attr]


def test_removals_go_to_the_proxies_shards() -> None:
    fleet = Shards(2)
    box = ShardedOutbox(fleet.send_all, 2)
    ids = IDS[:10]
    box.push({p: cfg(p, "r1", 1) for p in ids})
    box.remove(ids[:3])
    assert all(p not in fleet.shards[shard_of(p, 2)].dist.sessions for p in ids[:3])
    assert set(box.last_sent) == set(ids[3:])


def test_the_single_service_outbox_is_the_one_shard_case() -> None:
    dist = ConfigDistributor(1)

    def send(blob: bytes) -> str:
        answer, changed = apply_config_deltas(dist, blob)
        dist.set_desired(changed)
        return answer

    box = DeltaOutbox(send)
    box.push({IDS[0]: cfg(IDS[0], "r1", 1)})
    assert box.sent == [box.last_sent] and dist.sessions[IDS[0]].desired is not None


def test_a_shard_shares_the_objects_of_a_shared_view_after_the_hop() -> None:
    """Proxies with the same view get the same Service objects on the shard (one copy in the
    blob), so the shard's distributor encodes the view once for all of them."""
    shared = cfg(IDS[0], "r1", 1, services=5)
    ids = [p for p in IDS if shard_of(p, 1) == 0][:50]
    blob = encode_shard_configs({p: replace(shared, proxy_id=p) for p in ids}, full=True)
    shard = ConfigShard(0, 1, epoch=1)
    assert shard.apply(blob) == "ok"
    first = shard.dist.sessions[ids[0]].desired
    assert first is not None and all(
        s.desired is not None and all(x is y for x, y in zip(s.desired.services, first.services, strict=True))
        for s in shard.dist.sessions.values())
    assert len(blob) < 3 * len(encode_shard_configs({ids[0]: shared}))
