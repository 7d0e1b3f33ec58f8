"""The controller's durable records: one sqlite file in the state directory.

What survives a controller (or actor) restart lives here: the controller epoch (bumped on every
start: the split-brain fence), revisions attempted, applying and applied (Flux's
lastAttemptedRevision vs lastAppliedRevision, with the problems of a failed attempt; a revision
that rendered is "applying" until the proxies' ACKs make it "applied", see
`federation.core.rollout`), per-proxy acknowledged versions and
NACKs, the failover history, and CA metadata (the keys themselves are 0600 files next to it,
written by the CA; only their fingerprints and expiry are recorded here). For staged root
rotation (`federation.core.rotation`) the store also keeps, per (trust domain, root name), the latest
not-after of every leaf that root signed (`record_leaf_issued`, one upsert keeping the max) and
the CA specs of the last applied revision (`applied_ca_specs`): the commit gate compares a new
commit with those, so a restarted controller cannot be talked into skipping a stage.

Everything else (observations, rendered configs) is recomputed after a restart from a fresh LIST
of every cluster and the Git revision: that is what prunes endpoints removed while we were down.

sqlite in WAL mode, one connection guarded by a lock (actors call in from several threads).
Timestamps are wall-clock seconds (`*_s`).

- **Epochs without local state.** An epoch is derived from the wall clock in milliseconds and is
  strictly above the last one this file handed out (`bump_epoch`). A controller rebuilt on an
  empty state directory therefore still starts above every epoch its predecessors used (their
  proxies persisted those and refuse anything older), unless the clock went back by more than the
  predecessor's whole run; proxies would then refuse it as a split brain, which `meshfed check` shows.
- **Origin.** `meta` records when the file was created and how: `fresh` (created empty by a
  controller) or `restored` (from a `meshfed controller backup`), plus the first epoch it handed
  out. A proxy that presents a stamp from before that epoch followed a controller whose state
  this one does not have; a fresh store that no proxy has ever acknowledged is how a lost state
  directory looks from the inside (`federation.controller.checks`).
- **Retention.** `prune(now_s, retention_s)` deletes revisions, failover events and proxy records
  older than the retention, keeping what the controller still needs: the last attempted and last
  applied revision and, per (service, client cluster), the latest FailedOver/FailedBack (the
  active failovers). Each table is also capped at `max_rows`, newest kept. Counting is SQL
  (`failover_count`), never a load of the rows.
- **Busy database.** Another process may hold the write lock for a moment (a `meshfed controller
  backup` copying the file): writers wait `BUSY_TIMEOUT_S` and then raise `sqlite3.OperationalError`
  ("database is locked"); callers on a loop retry with the next batch (`config_service`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel.api.secret_files import fsync_dir

BUSY_TIMEOUT_S = 2.0
DEFAULT_RETENTION_S = 30 * 86400.0
DEFAULT_MAX_ROWS = 100_000
ORIGIN_FRESH, ORIGIN_RESTORED = "fresh", "restored"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (
    sha TEXT NOT NULL, subject TEXT NOT NULL, attempted_at_s REAL NOT NULL,
    outcome TEXT NOT NULL,             -- 'applied' | 'applying' | 'failed'
    problems TEXT NOT NULL DEFAULT '[]',  -- JSON list of Problem.as_dict()
    PRIMARY KEY (sha, attempted_at_s));
CREATE TABLE IF NOT EXISTS proxy_acks (
    proxy_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, version INTEGER NOT NULL, revision TEXT NOT NULL,
    acked_at_s REAL NOT NULL, last_nack TEXT NOT NULL DEFAULT '', nack_at_s REAL);
CREATE TABLE IF NOT EXISTS failover_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at_s REAL NOT NULL, service TEXT NOT NULL, kind TEXT NOT NULL,
    from_cluster TEXT NOT NULL DEFAULT '', to_cluster TEXT NOT NULL DEFAULT '',
    trigger TEXT NOT NULL DEFAULT '', policy_file TEXT NOT NULL DEFAULT '', revision TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS failover_by_service ON failover_events (service, at_s);
CREATE TABLE IF NOT EXISTS ca_meta (
    trust_domain TEXT NOT NULL, root_name TEXT NOT NULL, fingerprint TEXT NOT NULL,
    not_after_s REAL NOT NULL, key_path TEXT NOT NULL DEFAULT '', signing INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (trust_domain, root_name));
CREATE TABLE IF NOT EXISTS ca_leaves (
    trust_domain TEXT NOT NULL, root_name TEXT NOT NULL,  -- the CaSpec root that signed (spec.ca.roots[].name)
    max_not_after_s REAL NOT NULL,     -- the latest not-after of any leaf that root signed
    issued INTEGER NOT NULL DEFAULT 0, last_issued_at_s REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (trust_domain, root_name));
CREATE TABLE IF NOT EXISTS proxy_certificates (
    proxy_id TEXT NOT NULL, identity TEXT NOT NULL,   -- the latest certificate issued to a proxy per identity
    issued_at_s REAL NOT NULL, not_after_s REAL NOT NULL,   -- calendar dates (`ztunnel.api.clock`)
    PRIMARY KEY (proxy_id, identity));
"""


@dataclass(frozen=True, slots=True)
class RevisionRecord:
    sha: str
    subject: str
    attempted_at_s: float
    outcome: str
    problems: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class FailoverRecord:
    at_s: float
    service: str
    kind: str
    from_cluster: str
    to_cluster: str
    trigger: str
    policy_file: str
    revision: str
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"at_s": self.at_s, "service": self.service, "kind": self.kind, "from_cluster": self.from_cluster,
                "to_cluster": self.to_cluster, "trigger": self.trigger, "policy_file": self.policy_file,
                "revision": self.revision, "detail": self.detail}


class Store:
    """Invariants: `bump_epoch()` returns a value greater than any it returned before for this
    file; `last_applied()` is never a revision whose attempt failed or is still applying."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = BUSY_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.created = _create_private(self.path)   # this call created the file (an empty store)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                   timeout=busy_timeout_s)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        os.chmod(self.path, 0o600)
        if self.created:
            self._set_meta({"created_at_s": str(clock()), "origin": ORIGIN_FRESH})

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str], busy_timeout_s: float = BUSY_TIMEOUT_S,
                     clock: Callable[[], float] = time.time) -> Store:
        d = Path(state_dir)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        return cls(d / "controller.sqlite", busy_timeout_s, clock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, tuple(args)).fetchall())

    def _set_meta(self, values: dict[str, str]) -> None:
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(values.items()))

    def _meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return str(rows[0][0]) if rows else None

    # --- epoch and origin -------------------------------------------------------------------------

    def bump_epoch(self, now_s: float | None = None) -> int:
        """The next epoch: the wall clock in milliseconds, or the last epoch + 1 when that is not
        above it (see the module docstring: epochs stay monotonic without local state)."""
        now_ms = int((time.time() if now_s is None else now_s) * 1000)
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            epoch = max((int(row[0]) if row else 0) + 1, now_ms)
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('epoch', ?)", (str(epoch),))
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('first_epoch', ?)", (str(epoch),))
        return epoch

    def epoch(self) -> int:
        return int(self._meta("epoch") or 0)

    def origin(self) -> dict[str, Any]:
        """How this store came to be: `origin` (fresh | restored), `created_at_s`, `first_epoch`
        (the first epoch handed out on this state), `restored_at_s` when restored."""
        rows = dict(self._query("SELECT key, value FROM meta WHERE key IN "
                                "('origin', 'created_at_s', 'first_epoch', 'restored_at_s', 'restored_from')"))
        return {"origin": rows.get("origin", ORIGIN_FRESH), "created_at_s": float(rows.get("created_at_s", 0) or 0),
                "first_epoch": int(rows.get("first_epoch", 0) or 0),
                "restored_at_s": float(rows.get("restored_at_s", 0) or 0),
                "restored_from": rows.get("restored_from", "")}

    def mark_restored(self, at_s: float, source: str) -> None:
        self._set_meta({"origin": ORIGIN_RESTORED, "restored_at_s": str(at_s), "restored_from": source})

    # --- revisions ----------------------------------------------------------------------------------

    def record_attempt(self, sha: str, subject: str, ok: bool, problems: Sequence[dict[str, Any]] = (),
                       at_s: float | None = None, applying: bool = False) -> None:
        """One attempt: failed (`ok=False`), rendered and waiting for the proxies' ACKs
        (`applying=True`, see `mark_applied`), or applied."""
        outcome = "failed" if not ok else "applying" if applying else "applied"
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO revisions VALUES (?,?,?,?,?)",
                       (sha, subject, at_s if at_s is not None else time.time(), outcome,
                        json.dumps(list(problems), default=str)))

    def mark_applied(self, sha: str) -> bool:
        """The newest attempt of `sha`, if it is applying, becomes applied. True when it changed."""
        with self._tx() as db:
            cur = db.execute("UPDATE revisions SET outcome='applied' WHERE rowid = (SELECT rowid FROM revisions "
                             "WHERE sha=? ORDER BY attempted_at_s DESC, rowid DESC LIMIT 1) AND outcome='applying'",
                             (sha,))
            return bool(cur.rowcount)

    def _revision(self, where: str) -> RevisionRecord | None:
        rows = self._query(f"SELECT sha, subject, attempted_at_s, outcome, problems FROM revisions {where} "
                           "ORDER BY attempted_at_s DESC, rowid DESC LIMIT 1")
        if not rows:
            return None
        sha, subject, at, outcome, problems = rows[0]
        return RevisionRecord(sha, subject, at, outcome, tuple(json.loads(problems)))

    def last_attempted(self) -> RevisionRecord | None:
        return self._revision("")

    def last_applied(self) -> RevisionRecord | None:
        return self._revision("WHERE outcome='applied'")

    def revisions(self, limit: int = 20, sha: str | None = None) -> list[RevisionRecord]:
        """The newest `limit` attempts, newest first; with `sha` (a full SHA or a prefix of at least
        4 hex digits) only the attempts of that commit."""
        where, args = "", []
        if sha is not None:
            if not is_sha_prefix(sha):
                raise ValueError(f"{sha!r} is not a commit SHA (4 to 40 hex digits)")
            where, args = "WHERE sha LIKE ? ", [sha.lower() + "%"]
        rows = self._query(f"SELECT sha, subject, attempted_at_s, outcome, problems FROM revisions {where}"
                           "ORDER BY attempted_at_s DESC, rowid DESC LIMIT ?", (*args, limit))
        return [RevisionRecord(r[0], r[1], r[2], r[3], tuple(json.loads(r[4]))) for r in rows]

    def revision_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM revisions")[0][0])

    # --- proxies ------------------------------------------------------------------------------------

    def record_ack(self, proxy_id: str, epoch: int, version: int, revision: str, at_s: float | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO proxy_acks(proxy_id, epoch, version, revision, acked_at_s) VALUES (?,?,?,?,?) "
                       "ON CONFLICT(proxy_id) DO UPDATE SET epoch=excluded.epoch, version=excluded.version, "
                       "revision=excluded.revision, acked_at_s=excluded.acked_at_s, last_nack=''",
                       (proxy_id, epoch, version, revision, at_s if at_s is not None else time.time()))

    def record_acks(self, acks: Sequence[tuple[str, int, int, str]], at_s: float | None = None) -> None:
        """Batch form of `record_ack` (one transaction for a whole push)."""
        now = at_s if at_s is not None else time.time()
        with self._tx() as db:
            db.executemany("INSERT INTO proxy_acks(proxy_id, epoch, version, revision, acked_at_s) VALUES (?,?,?,?,?) "
                           "ON CONFLICT(proxy_id) DO UPDATE SET epoch=excluded.epoch, version=excluded.version, "
                           "revision=excluded.revision, acked_at_s=excluded.acked_at_s, last_nack=''",
                           [(p, e, v, r, now) for p, e, v, r in acks])

    def record_nack(self, proxy_id: str, error: str, at_s: float | None = None) -> None:
        now = at_s if at_s is not None else time.time()
        with self._tx() as db:
            db.execute("INSERT INTO proxy_acks(proxy_id, epoch, version, revision, acked_at_s, last_nack, nack_at_s) "
                       "VALUES (?,0,0,'',0,?,?) ON CONFLICT(proxy_id) DO UPDATE SET last_nack=excluded.last_nack, "
                       "nack_at_s=excluded.nack_at_s", (proxy_id, error, now))

    def forget_proxies(self, proxy_ids: Sequence[str]) -> None:
        """Drop the records of proxies that are no longer rendered (a removed cluster's)."""
        with self._tx() as db:
            db.executemany("DELETE FROM proxy_acks WHERE proxy_id=?", [(p,) for p in proxy_ids])
            db.executemany("DELETE FROM proxy_certificates WHERE proxy_id=?", [(p,) for p in proxy_ids])

    def ever_acked(self) -> bool:
        """Has any proxy ever acknowledged a config recorded in this store?"""
        return bool(self._query("SELECT 1 FROM proxy_acks WHERE epoch > 0 LIMIT 1"))

    def proxy_acks(self) -> dict[str, dict[str, Any]]:
        rows = self._query("SELECT proxy_id, epoch, version, revision, acked_at_s, last_nack FROM proxy_acks")
        return {r[0]: {"epoch": r[1], "version": r[2], "revision": r[3], "acked_at_s": r[4], "last_nack": r[5]}
                for r in rows}

    # --- failover history ---------------------------------------------------------------------------

    def record_failover(self, service: str, kind: str, *, from_cluster: str = "", to_cluster: str = "",
                        trigger: str = "", policy_file: str = "", revision: str = "",
                        detail: dict[str, Any] | None = None, at_s: float | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO failover_events(at_s, service, kind, from_cluster, to_cluster, trigger, "
                       "policy_file, revision, detail) VALUES (?,?,?,?,?,?,?,?,?)",
                       (at_s if at_s is not None else time.time(), service, kind, from_cluster, to_cluster,
                        trigger, policy_file, revision, json.dumps(detail or {}, default=str)))

    def failover_history(self, service: str | None = None, since_s: float | None = None,
                         limit: int = 500) -> list[FailoverRecord]:
        where: list[str] = []
        args: list[Any] = []
        if service:
            # as the CLI takes it elsewhere: "checkout", "shop/checkout" or the full hostname
            where.append("(service = ? OR service LIKE ? ESCAPE '\\')")
            args.extend([service, _hostname_pattern(service)])
        if since_s is not None:
            where.append("at_s >= ?")
            args.append(since_s)
        # the newest `limit` events, oldest first (a long-running controller has more than anyone reads)
        sql = (_FAILOVER_SELECT + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY at_s DESC, id DESC LIMIT ?")
        return [_failover_record(r) for r in reversed(self._query(sql, [*args, limit]))]

    def failover_count(self) -> int:
        rows = self._query("SELECT COUNT(*) FROM failover_events")
        return int(rows[0][0])

    def active_failovers(self) -> list[FailoverRecord]:
        """Per (service, client cluster), the last FailedOver not yet followed by a FailedBack."""
        sql = (_FAILOVER_SELECT + " f WHERE kind = 'FailedOver' AND id = ("
               "  SELECT MAX(id) FROM failover_events g WHERE g.service = f.service"
               "  AND g.from_cluster = f.from_cluster AND g.kind IN ('FailedOver', 'FailedBack'))"
               " ORDER BY at_s, id")
        return [_failover_record(r) for r in self._query(sql, [])]

    # --- retention ----------------------------------------------------------------------------

    def prune(self, now_s: float, retention_s: float = DEFAULT_RETENTION_S,
              max_rows: int = DEFAULT_MAX_ROWS) -> dict[str, int]:
        """Delete history older than `retention_s` (and beyond `max_rows` per table, oldest first),
        keeping the last attempted and last applied revision and the active failover state (see the
        module docstring). Returns the rows deleted per table."""
        cutoff = now_s - retention_s
        keep_revisions = ("SELECT rowid FROM (SELECT rowid FROM revisions ORDER BY attempted_at_s DESC, rowid DESC "
                          "LIMIT 1) UNION SELECT rowid FROM (SELECT rowid FROM revisions WHERE outcome='applied' "
                          "ORDER BY attempted_at_s DESC, rowid DESC LIMIT 1)")
        keep_events = ("SELECT MAX(id) FROM failover_events WHERE kind IN ('FailedOver', 'FailedBack') "
                       "GROUP BY service, from_cluster")
        out: dict[str, int] = {}
        with self._tx() as db:
            out["revisions"] = db.execute(
                f"DELETE FROM revisions WHERE rowid NOT IN ({keep_revisions}) AND (attempted_at_s < ? OR rowid NOT IN "
                "(SELECT rowid FROM revisions ORDER BY attempted_at_s DESC, rowid DESC LIMIT ?))",
                (cutoff, max_rows)).rowcount
            out["failover_events"] = db.execute(
                f"DELETE FROM failover_events WHERE id NOT IN ({keep_events}) AND (at_s < ? OR id NOT IN "
                "(SELECT id FROM failover_events ORDER BY at_s DESC, id DESC LIMIT ?))", (cutoff, max_rows)).rowcount
            out["proxy_acks"] = db.execute(
                "DELETE FROM proxy_acks WHERE max(acked_at_s, coalesce(nack_at_s, 0)) < ?", (cutoff,)).rowcount
        return out

    # --- CA metadata ---------------------------------------------------------------------------

    def record_ca_root(self, trust_domain: str, root_name: str, fingerprint: str, not_after_s: float,
                       key_path: str = "", signing: bool = False) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO ca_meta VALUES (?,?,?,?,?,?)",
                       (trust_domain, root_name, fingerprint, not_after_s, key_path, int(signing)))

    def ca_roots(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT trust_domain, root_name, fingerprint, not_after_s, key_path, signing FROM ca_meta "
                           "ORDER BY trust_domain, root_name")
        return [{"trust_domain": r[0], "root": r[1], "fingerprint": r[2], "not_after_s": r[3], "key_path": r[4],
                 "signing": bool(r[5])} for r in rows]


    # --- leaves issued, for staged root rotation ---------------------------------------------------

    def record_leaf_issued(self, trust_domain: str, root_name: str, not_after_s: float,
                           at_s: float | None = None) -> None:
        """One leaf signed by `root_name` of `trust_domain`: keep the latest not-after (an upsert)."""
        now = at_s if at_s is not None else time.time()
        with self._tx() as db:
            db.execute("INSERT INTO ca_leaves(trust_domain, root_name, max_not_after_s, issued, last_issued_at_s) "
                       "VALUES (?,?,?,1,?) ON CONFLICT(trust_domain, root_name) DO UPDATE SET "
                       "max_not_after_s=max(max_not_after_s, excluded.max_not_after_s), issued=issued+1, "
                       "last_issued_at_s=excluded.last_issued_at_s",
                       (trust_domain, root_name, not_after_s, now))

    def record_proxy_certificate(self, proxy_id: str, identity: str, issued_at_s: float, not_after_s: float) -> None:
        """The latest certificate issued to `proxy_id` for `identity` (`meshfed check`: expiry per proxy)."""
        with self._tx() as db:
            db.execute("INSERT INTO proxy_certificates(proxy_id, identity, issued_at_s, not_after_s) VALUES (?,?,?,?) "
                       "ON CONFLICT(proxy_id, identity) DO UPDATE SET issued_at_s=excluded.issued_at_s, "
                       "not_after_s=excluded.not_after_s", (proxy_id, identity, issued_at_s, not_after_s))

    def proxy_certificates(self) -> dict[str, dict[str, tuple[float, float]]]:
        """proxy id -> identity -> (issued at, not after) of the latest certificate issued to it."""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for pid, identity, issued, not_after in self._query(
                "SELECT proxy_id, identity, issued_at_s, not_after_s FROM proxy_certificates"):
            out.setdefault(str(pid), {})[str(identity)] = (float(issued), float(not_after))
        return out

    def leaf_not_after(self, trust_domain: str) -> dict[str, float]:
        """Root name -> latest not-after of the leaves it signed, for one trust domain."""
        rows = self._query("SELECT root_name, max_not_after_s FROM ca_leaves WHERE trust_domain=?", (trust_domain,))
        return {str(r[0]): float(r[1]) for r in rows}

    def record_applied_ca_specs(self, specs: dict[str, Any]) -> None:
        """The CA specs (JSON-able, see `federation.core.rotation.ca_spec_to_dict`) of the applied revision."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('applied_ca_specs', ?)",
                       (json.dumps(specs, sort_keys=True),))

    def applied_ca_specs(self) -> dict[str, Any] | None:
        rows = self._query("SELECT value FROM meta WHERE key='applied_ca_specs'")
        return dict(json.loads(rows[0][0])) if rows else None

    # --- fleet membership: the applied revision's clusters and the ones draining -------------------

    def record_applied_clusters(self, clusters: Sequence[str]) -> None:
        self._set_meta({"applied_clusters": json.dumps(sorted(clusters))})

    def applied_clusters(self) -> list[str] | None:
        raw = self._meta("applied_clusters")
        return list(json.loads(raw)) if raw is not None else None

    def record_drains(self, drains: Sequence[dict[str, Any]]) -> None:
        """The clusters draining (`federation.core.removal.Drain.as_dict`), so a restart resumes them."""
        self._set_meta({"drains": json.dumps(list(drains), sort_keys=True, default=str)})

    def drains(self) -> list[dict[str, Any]]:
        raw = self._meta("drains")
        return list(json.loads(raw)) if raw else []


_SHA_DIGITS = frozenset("0123456789abcdef")


def is_sha_prefix(text: str) -> bool:
    """4 to 40 hex digits: safe inside a LIKE pattern (no wildcard can hide in it)."""
    return 4 <= len(text) <= 40 and set(text.lower()) <= _SHA_DIGITS


_FAILOVER_SELECT = ("SELECT at_s, service, kind, from_cluster, to_cluster, trigger, policy_file, revision, detail "
                    "FROM failover_events")


def _create_private(path: Path) -> bool:
    """Create `path` empty and 0600 unless it exists (never through a link). True if created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    fsync_dir(path.parent)
    return True


def _failover_record(r: Any) -> FailoverRecord:
    return FailoverRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8]))


def _hostname_pattern(service: str) -> str:
    """SQL LIKE pattern for a service named "name" or "namespace/name": <name>.<ns>.svc.<domain>."""
    def esc(part: str) -> str:
        return part.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

    namespace, _, name = service.rpartition("/")
    return f"{esc(name)}.{esc(namespace) if namespace else '%'}.svc.%"
