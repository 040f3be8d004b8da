"""Restart-safe node state in SQLite: received instances, processed series, touched studies."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

__all__ = ["NodeState"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT, folder TEXT, status TEXT NOT NULL,
    received INTEGER NOT NULL DEFAULT 0, last_instance REAL, started REAL, finished REAL,
    outputs INTEGER, error TEXT, stale INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, path TEXT NOT NULL, received REAL);
"""


class NodeState:
    """Series and instance bookkeeping of a PACS node (one SQLite file, thread-safe).

    Series ``status``: ``receiving`` -> ``processing`` -> ``done`` | ``failed``. A series is
    processed once: ``claim`` moves it to ``processing`` atomically; after a crash during
    processing it is claimed again on restart (``reset_interrupted``). An instance of the
    series that was not received before (a new SOP Instance UID) arriving later reopens it:
    a ``done`` / ``failed`` series goes back to ``receiving`` (processed again, whole, once
    idle); during ``processing`` it is marked ``stale`` and reopened when that run finishes.
    A re-sent instance (known SOP Instance UID) reopens nothing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(series)")}
        if "stale" not in cols:  # a state file written before the column existed
            self._db.execute("ALTER TABLE series ADD COLUMN stale INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def status(self, series_uid: str) -> str | None:
        """The series' status, or None when it was never seen."""
        with self._lock:
            row = self._db.execute("SELECT status FROM series WHERE series_uid=?",
                                   (series_uid,)).fetchone()
        return None if row is None else str(row[0])

    def add_instance(self, sop_uid: str, series_uid: str, study_uid: str, path: Path,
                     folder: Path) -> None:
        """Record a received instance (already on disk); new series start ``receiving``; a new
        instance of a finished series reopens it (see the class doc)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            new = self._db.execute("SELECT 1 FROM instances WHERE sop_uid=?",
                                   (sop_uid,)).fetchone() is None
            self._db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?)",
                             (sop_uid, series_uid, str(path), now))
            self._db.execute(
                "INSERT INTO series (series_uid, study_uid, folder, status, received, "
                "last_instance) VALUES (?, ?, ?, 'receiving', 1, ?) ON CONFLICT(series_uid) "
                "DO UPDATE SET received=received+1, last_instance=excluded.last_instance",
                (series_uid, study_uid, str(folder), now))
            if new:
                self._db.execute(
                    "UPDATE series SET status=CASE WHEN status IN ('done', 'failed') "
                    "THEN 'receiving' ELSE status END, stale=CASE WHEN status='processing' "
                    "THEN 1 ELSE stale END WHERE series_uid=?", (series_uid,))
            self._db.execute("COMMIT")

    def touch(self, series_uid: str, study_uid: str, folder: str = "") -> None:
        """Register a series seen by a watcher (status ``receiving``) if new."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO series (series_uid, study_uid, folder, status, "
                "last_instance) VALUES (?, ?, ?, 'receiving', ?)",
                (series_uid, study_uid, folder, time.time()))

    def idle_series(self, idle_s: float) -> list[tuple[str, str, str]]:
        """``(series_uid, study_uid, folder)`` of series still receiving and idle >= idle_s."""
        with self._lock:
            rows = self._db.execute(
                "SELECT series_uid, study_uid, folder FROM series WHERE status='receiving' "
                "AND last_instance <= ?", (time.time() - idle_s,)).fetchall()
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def claim(self, series_uid: str) -> bool:
        """Move a ``receiving`` series to ``processing``; False if someone else did."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE series SET status='processing', started=? WHERE series_uid=? AND "
                "status='receiving'", (time.time(), series_uid))
        return cur.rowcount == 1

    def finish(self, series_uid: str, *, outputs: int = 0, error: str | None = None) -> bool:
        """Mark a series ``done`` (or ``failed`` with ``error``); a series that received new
        instances while it was processed goes back to ``receiving`` instead (returns False)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT stale FROM series WHERE series_uid=?",
                                   (series_uid,)).fetchone()
            stale = bool(row and row[0])
            status = "receiving" if stale else ("failed" if error else "done")
            self._db.execute(
                "UPDATE series SET status=?, finished=?, outputs=?, error=?, stale=0 "
                "WHERE series_uid=?", (status, time.time(), outputs, error, series_uid))
            self._db.execute("COMMIT")
        return not stale

    def reset_interrupted(self) -> int:
        """After a restart: series left ``processing`` go back to ``receiving``, and every
        ``receiving`` series gets a fresh idle clock (a sender interrupted by the crash gets
        the whole idle timeout to resume before the series counts as complete)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE series SET status='receiving' WHERE status='processing'")
            self._db.execute("UPDATE series SET last_instance=? WHERE status='receiving'",
                             (time.time(),))
        return cur.rowcount

    def instance_count(self, series_uid: str) -> int:
        """Number of recorded instances of a series."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM instances WHERE series_uid=?",
                                   (series_uid,)).fetchone()
        return int(row[0])

    def rows(self) -> list[dict[str, object]]:
        """All series rows (for logs and tests)."""
        with self._lock:
            cur = self._db.execute("SELECT * FROM series")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
