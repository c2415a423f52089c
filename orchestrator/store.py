"""The state store: every stage transition and action, journaled in SQLite (WAL).

A restarted bootorch rebuilds every node's timeline from here exactly
(:meth:`Store.transitions` replayed into :meth:`Tracker.restore`), and resumes
following logs from the saved offsets, so a crash mid-rollout loses no node's
state (Warewulf keeps status only in memory; xCAT loses status sent while its
server is down).

Durability: WAL mode with ``synchronous=NORMAL``. A committed transaction
survives a crash of the bootorch process (``kill -9``) at any moment: SQLite
only acknowledges a commit once the WAL frame is written, and the WAL is
replayed on the next open. Only an operating-system crash or power loss can
lose the last few commits, which costs a node's timeline a few seconds that the
next evidence restores. Writers batch: :meth:`Store.append` takes many
transitions in one transaction.

One process writes (the running orchestrator); the CLI (``bootorch status``)
may read at the same time: WAL readers never block the writer. A reader that
may not write the journal (an operator in the service's group, with the
files 0640: the systemd unit's ``UMask=0027``) opens it read-only
(``Store(path, readonly=True)``, chosen by itself when the file is not
writable): SQLite reads a WAL database without writing its ``-shm`` file.

Bounds: the journal holds a row per stage change and per action. A long-running
``serve`` keeps it bounded with :meth:`Store.compact` (``serve`` runs it
daily): per node, the transitions of its last :data:`KEEP_ATTEMPTS` attempts and
its last :data:`KEEP_ACTIONS` actions stay, everything older goes, then the WAL
is checkpointed and truncated. Every node's current stage, and so everything a
restart restores, is in the rows kept.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from orchestrator.tracker import Stage, Transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS transitions (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    mac       TEXT NOT NULL,
    node      TEXT NOT NULL,
    from_stage TEXT NOT NULL,
    to_stage  TEXT NOT NULL,
    time      REAL NOT NULL,
    attempt   INTEGER NOT NULL,
    evidence  TEXT NOT NULL,
    source    TEXT NOT NULL,
    flags     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS transitions_mac ON transitions (mac, id);
CREATE TABLE IF NOT EXISTS actions (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    time    REAL NOT NULL,
    node    TEXT NOT NULL,
    action  TEXT NOT NULL,
    reason  TEXT NOT NULL,
    result  TEXT NOT NULL,
    actor   TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS actions_node ON actions (node, id);
CREATE TABLE IF NOT EXISTS offsets (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Current:
    """Where a node is now: for ``bootorch status``."""

    mac: str
    node: str
    stage: Stage
    since: float
    attempt: int
    evidence: str
    flags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Action:
    time: float
    node: str
    action: str
    reason: str
    result: str
    actor: str
    detail: dict[str, Any]


#: What :meth:`Store.compact` keeps per node.
#: Bytes the write-ahead log is cut back to after a checkpoint (SQLite's ``journal_size_limit``).
WAL_LIMIT = 4 << 20
KEEP_ATTEMPTS = 20
KEEP_ACTIONS = 200


class Store:
    def __init__(self, path: str | Path, *, readonly: bool | None = None) -> None:
        self.path = Path(path)
        if readonly is None:
            readonly = self.path.exists() and not os.access(self.path, os.W_OK)
        self.readonly = readonly
        if readonly:
            from urllib.parse import quote

            self.db = sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro", uri=True, timeout=30,
                                      isolation_level=None, check_same_thread=False)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        # SQLite checkpoints the WAL at 1 000 pages but keeps the file at its high-water mark;
        # this cuts it back to WAL_LIMIT after each checkpoint, so a long-running serve's WAL stays bounded.
        self.db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        self.db.executescript(SCHEMA)

    # ---------------------------------------------------------------- transitions

    def append(self, transitions: Iterable[Transition]) -> int:
        rows = _rows(transitions)
        if not rows:
            return 0
        with self._tx():
            self.db.executemany(_INSERT_TRANSITION, rows)
        return len(rows)

    def append_with_offset(self, transitions: Iterable[Transition], key: str, offset: dict[str, Any]) -> None:
        """Transitions and the log position that produced them, in one transaction.

        After a crash either both are in the journal or neither is: a restart
        re-reads exactly the lines whose effects were lost.
        """
        rows = _rows(transitions)
        with self._tx():
            if rows:
                self.db.executemany(_INSERT_TRANSITION, rows)
            self.db.execute("INSERT OR REPLACE INTO offsets (key, value) VALUES (?, ?)", (key, json.dumps(offset)))

    def transitions(self, mac: str | None = None) -> list[Transition]:
        q = "SELECT mac, node, from_stage, to_stage, time, attempt, evidence, source, flags FROM transitions"
        args: tuple[Any, ...] = ()
        if mac is not None:
            q += " WHERE mac = ?"
            args = (mac,)
        q += " ORDER BY id"
        return [Transition(m, n, _stage(f), _stage(t), tm, a, e, s, _flags(fl))
                for m, n, f, t, tm, a, e, s, fl in self.db.execute(q, args)]

    def current(self) -> dict[str, Current]:
        """Each node's latest transition."""
        q = """SELECT t.mac, t.node, t.to_stage, t.time, t.attempt, t.evidence, t.flags FROM transitions t
               JOIN (SELECT mac, MAX(id) AS id FROM transitions GROUP BY mac) last ON t.id = last.id"""
        return {m: Current(m, n, _stage(s), tm, a, e, _flags(fl))
                for m, n, s, tm, a, e, fl in self.db.execute(q)}

    def stage_entered(self) -> dict[str, float]:
        """Per MAC, when the node entered its current stage (a same-stage restart within an attempt does not count)."""
        q = """SELECT mac, MAX(time) FROM (
                 SELECT mac, time, from_stage, to_stage, attempt,
                        LAG(attempt) OVER (PARTITION BY mac ORDER BY id) AS prev
                 FROM transitions)
               WHERE from_stage != to_stage OR prev IS NULL OR prev != attempt
               GROUP BY mac"""
        return {mac: t for mac, t in self.db.execute(q)}

    # ---------------------------------------------------------------- actions (audit)

    def record_action(self, node: str, action: str, reason: str, result: str, *, actor: str = "bootorch",
                      detail: dict[str, Any] | None = None, when: float | None = None) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO actions (time, node, action, reason, result, actor, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (when if when is not None else time.time(), node, action, reason, result, actor, json.dumps(detail or {})))

    def actions(self, node: str | None = None) -> list[Action]:
        q = "SELECT time, node, action, reason, result, actor, detail FROM actions"
        args: tuple[Any, ...] = ()
        if node is not None:
            q += " WHERE node = ?"
            args = (node,)
        return [Action(t, n, a, r, res, ac, json.loads(d)) for t, n, a, r, res, ac, d in self.db.execute(q + " ORDER BY id", args)]

    # ---------------------------------------------------------------- log offsets, meta

    def save_offset(self, key: str, value: dict[str, Any]) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO offsets (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def load_offset(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT value FROM offsets WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # ---------------------------------------------------------------- retention

    def compact(self, *, keep_attempts: int = KEEP_ATTEMPTS, keep_actions: int = KEEP_ACTIONS) -> tuple[int, int]:
        """Drop, per node, transitions older than its last ``keep_attempts`` attempts and actions
        beyond its last ``keep_actions``; checkpoint and truncate the WAL. Returns (transitions,
        actions) removed. Each node's latest transition is always kept (the restore needs it)."""
        with self._tx():
            t = self.db.execute(
                """DELETE FROM transitions WHERE id IN (
                     SELECT t.id FROM transitions t JOIN (SELECT mac, MAX(attempt) AS last, MAX(id) AS top
                                                           FROM transitions GROUP BY mac) m ON t.mac = m.mac
                     WHERE t.attempt <= m.last - ? AND t.id != m.top)""", (keep_attempts,)).rowcount
            a = self.db.execute(
                """DELETE FROM actions WHERE id IN (
                     SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY node ORDER BY id DESC) AS k FROM actions)
                     WHERE k > ?)""", (keep_actions,)).rowcount
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return t, a

    def close(self) -> None:
        self.db.close()

    def _tx(self):
        return _Tx(self.db)


_STAGES = {s.value: s for s in Stage}


def _stage(value: str) -> Stage:
    """``Stage(value)`` by a dict lookup (the enum call costs ~1 us: twice per row of a 10 000-node journal)."""
    s = _STAGES.get(value)
    return s if s is not None else Stage(value)  # an unknown value raises as before


def _flags(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x) if text else ()


_INSERT_TRANSITION = ("INSERT INTO transitions (mac, node, from_stage, to_stage, time, attempt, evidence, source, flags)"
                      " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _rows(transitions: Iterable[Transition]) -> list[tuple[Any, ...]]:
    return [(t.mac, t.node, t.from_stage.value, t.to_stage.value, t.time, t.attempt, t.evidence, t.source, ",".join(t.flags))
            for t in transitions]


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one transaction per batch."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
