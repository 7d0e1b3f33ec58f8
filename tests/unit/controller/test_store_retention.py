"""Issue 11 item 11: the store under months of use.

- the ACK/NACK flusher survives "database is locked" (another process holding the write lock):
  it counts, logs, retries with the next batch, and never blocks the event loop that serves the
  proxies' streams while it waits for the database;
- revisions, failover events and proxy records are pruned by a retention setting (the
  Federation's `historyRetention`, or the controller's `--history-retention`), keeping the last
  applied and attempted revision and the active failovers;
- counts are SQL (`COUNT(*)`), never a load of the rows.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest

from federation.controller.config_service import ConfigService
from federation.controller.distributor import AckEvent
from federation.controller.store import Store
from tests.unit.core.factory import fleet
from ztunnel.api.config import Stamp

DAY_S = 86400.0
NOW_S = 1_800_000_000.0


def ack(pid: str, version: int) -> AckEvent:
    return AckEvent(pid, Stamp(1, f"rev{version}", version), False, "", 0.01, 0.02)


async def test_the_flusher_survives_a_locked_database_without_blocking_the_event_loop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store.in_state_dir(tmp_path, busy_timeout_s=0.3)
    svc = ConfigService(tmp_path, store=store, flush_interval_s=0.05)
    other = sqlite3.connect(str(store.path), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")                      # e.g. a backup copying the file, or an operator
    ticks = 0

    async def heartbeat() -> None:                       # what the proxies' streams need: a live loop
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.ensure_future(heartbeat())
    with caplog.at_level("WARNING", logger="federation.controller.config_service"):
        svc.start_flushing()
        svc.on_ack(ack("ztunnel/a/n1", 1))
        t0 = time.monotonic()
        assert await _until(lambda: svc.flush_failures >= 2, 10.0)
        elapsed = time.monotonic() - t0
        assert svc.flush_failures >= 2 and "locked" in svc.last_flush_error
        assert ticks >= 0.5 * elapsed / 0.01             # the loop kept running while the flusher waited
        assert svc._flusher is not None and not svc._flusher.done()
        svc.on_ack(ack("ztunnel/a/n2", 1))
        other.execute("ROLLBACK")
        assert await _until(lambda: set(store.proxy_acks()) == {"ztunnel/a/n1", "ztunnel/a/n2"})
    beat.cancel()
    await svc.stop()
    msgs = [r.getMessage() for r in caplog.records]
    assert any("could not record" in m and "locked" in m for m in msgs)
    assert sum("could not record" in m for m in msgs) == 1     # rate-limited, not one line per round
    assert any("written again" in m for m in msgs)


async def _until(pred: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return bool(pred())  # type: ignore[operator]


def fill(store: Store) -> None:
    for day in range(60):
        at = NOW_S - (60 - day) * DAY_S
        store.record_attempt(f"{day:040d}", f"day {day}", ok=day % 7 != 3, at_s=at)
        store.record_failover("checkout.shop.svc.clusterset.local", "FailedOver" if day % 2 == 0 else "FailedBack",
                              from_cluster="east", to_cluster="west", at_s=at)
    # an old failover of another service that never failed back: still active, must be kept
    store.record_failover("cart.shop.svc.clusterset.local", "FailedOver", from_cluster="east", at_s=NOW_S - 90 * DAY_S)
    store.record_acks([("ztunnel/gone/n1", 1, 1, "r")], at_s=NOW_S - 45 * DAY_S)
    store.record_acks([("ztunnel/east/n1", 1, 1, "r")], at_s=NOW_S - DAY_S)


def test_prune_keeps_what_the_controller_still_needs(tmp_path: Path) -> None:
    store = Store.in_state_dir(tmp_path)
    fill(store)
    last_applied = store.last_applied()
    active = {(f.service, f.from_cluster) for f in store.active_failovers()}
    # make the last applied revision old: an applied revision never goes, however old
    store.record_attempt("f" * 40, "broken", ok=False, at_s=NOW_S)
    deleted = store.prune(NOW_S, retention_s=30 * DAY_S)
    assert deleted["revisions"] == 30 and deleted["failover_events"] == 30 and deleted["proxy_acks"] == 1
    assert store.revision_count() == 31 and store.failover_count() == 31
    assert store.last_applied() == last_applied and store.last_attempted().sha == "f" * 40  # type: ignore[union-attr]
    assert {(f.service, f.from_cluster) for f in store.active_failovers()} == active
    assert set(store.proxy_acks()) == {"ztunnel/east/n1"}
    # everything older than the retention, except the last applied revision
    store.record_attempt("e" * 40, "only failures since", ok=False, at_s=NOW_S + 100 * DAY_S)
    store.prune(NOW_S + 200 * DAY_S, retention_s=DAY_S)
    assert store.last_applied() == last_applied and store.revision_count() == 2


def test_prune_caps_each_table_newest_first(tmp_path: Path) -> None:
    store = Store.in_state_dir(tmp_path)
    fill(store)
    store.prune(NOW_S, retention_s=365 * DAY_S, max_rows=10)
    assert store.revision_count() <= 11 and store.failover_count() <= 12
    assert store.revisions(1)[0].sha == f"{59:040d}"


def test_the_config_service_prunes_with_the_federations_retention_or_the_flag(tmp_path: Path) -> None:
    now = [NOW_S]
    svc = ConfigService(tmp_path / "a", clock=lambda: now[0], history_clock=lambda: now[0], prune_interval_s=600.0)
    fill(svc.store)
    snap = fleet()
    snap = replace(snap, federation=replace(snap.federation, history_retention_s=10 * DAY_S))
    svc.ensure_cas(snap)
    assert svc.retention_s == 10 * DAY_S and svc.prune_due()
    svc.prune()
    assert svc.store.failover_count() == 11 and svc.pruned["failover_events"] == 50
    assert not svc.prune_due()
    now[0] += 601
    assert svc.prune_due()
    flagged = ConfigService(tmp_path / "b", clock=lambda: now[0], history_clock=lambda: now[0],
                            history_retention_s=40 * DAY_S)
    flagged.ensure_cas(snap)
    assert flagged.retention_s == 40 * DAY_S             # the flag wins over the Federation
    st = svc.status({})
    assert st["history"]["retention_s"] == 10 * DAY_S and st["history"]["pruned"]["failover_events"] == 50


def test_counting_is_sql(tmp_path: Path) -> None:
    store = Store.in_state_dir(tmp_path)
    with store._tx() as db:
        db.executemany("INSERT INTO failover_events(at_s, service, kind) VALUES (?,?,?)",
                       [(float(i), "s", "FailedOver") for i in range(20_000)])
    traced: list[str] = []
    store._db.set_trace_callback(traced.append)
    t0 = time.perf_counter()
    assert store.failover_count() == 20_000
    assert time.perf_counter() - t0 < 0.5
    assert traced == ["SELECT COUNT(*) FROM failover_events"]
