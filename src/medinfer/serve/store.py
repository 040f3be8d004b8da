"""Durable job store: SQLite (WAL journal) for job records, folders for inputs and outputs.

Layout under the store folder::

    jobs.sqlite3            job records (one row per job)
    inputs/<job_id>/upload  the uploaded bytes (written atomically before the row exists)
    outputs/<job_id>/       result files; the folder appears by an atomic rename only
                            once every file in it is complete

Job life cycle: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``;
finished jobs become ``expired`` after the result TTL (their files are deleted).
:meth:`JobStore.recover` (called at start-up) re-queues jobs that were ``running`` when
the previous process died and removes half-written output folders.

All methods are thread-safe (one connection, one lock; SQLite in WAL mode with
``synchronous=FULL`` so a committed state survives SIGKILL and power loss).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class JobStatus(StrEnum):
    """States of a job; the last four are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass
class Job:
    """One job record (times are UNIX seconds, progress in percent 0-100)."""

    id: str
    status: JobStatus
    created: float
    updated: float
    progress: float = 0.0
    stage: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    input_name: str = ""
    started: float | None = None
    finished: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    result: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)
    attempts: int = 0
    cancel_requested: bool = False
    owner: str = ""

    def to_status(self) -> dict[str, Any]:
        """The JSON body of ``GET /api/v1/inference/{id}``."""
        out: dict[str, Any] = {
            "job_id": self.id,
            "status": self.status.value,
            "progress": round(self.progress, 2),
            "stage": self.stage,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "attempts": self.attempts,
        }
        if self.error_type:
            out["error"] = {"type": self.error_type, "message": self.error_message or ""}
        return out


class StoreLockedError(Exception):
    """The job store folder is owned by another running server."""


class QueueFullError(Exception):
    """The queue holds ``queue_limit`` jobs; carries a suggested retry delay in seconds."""

    def __init__(self, queued: int, retry_after: int) -> None:
        super().__init__(f"the job queue is full ({queued} jobs waiting); retry later")
        self.queued = queued
        self.retry_after = retry_after


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL DEFAULT '{}',
    input_name TEXT NOT NULL DEFAULT '',
    error_type TEXT,
    error_message TEXT,
    result TEXT,
    files TEXT NOT NULL DEFAULT '[]',
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs(status, seq);
"""

_COLUMNS = ("id", "status", "created", "updated", "progress", "stage", "config", "input_name",
            "started", "finished", "error_type", "error_message", "result", "files",
            "attempts", "cancel_requested", "owner")


class JobStore:
    """SQLite-backed job records plus input/output folders (see module docstring).

    Parameters
    ----------
    root : store folder (created if missing).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.inputs = self.root / "inputs"
        self.outputs = self.root / "outputs"
        for d in (self.root, self.inputs, self.outputs):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.root / "jobs.sqlite3"), check_same_thread=False,
                                   isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        if "owner" not in cols:  # a store written by an older version
            self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        self._owner_fd: int | None = None

    # ---------------------------------------------------------------- ownership
    def acquire(self) -> None:
        """Become the one server that runs this store's jobs (an exclusive ``flock`` on
        ``server.lock``, held until :meth:`close` or process death).

        Two servers on one store would each re-queue the other's running jobs at start-up,
        run them twice and delete each other's outputs; the second one is refused.

        Raises
        ------
        StoreLockedError
            Another live process holds the store.
        """
        import fcntl
        import os

        if self._owner_fd is not None:
            return
        fd = os.open(self.root / "server.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreLockedError(
                f"job store {self.root.name!r} is in use by another medinfer server "
                "(MEDINFER_JOB_STORE must be one folder per server)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._owner_fd = fd

    # ------------------------------------------------------------------ basics
    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._owner_fd is not None:
                import os

                os.close(self._owner_fd)  # releases the flock
                self._owner_fd = None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def writable(self) -> bool:
        """True if the database accepts a write and the folders are writable."""
        try:
            with self._tx() as db:
                db.execute("CREATE TABLE IF NOT EXISTS _probe (x INTEGER)")
            probe = self.root / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except (sqlite3.Error, OSError):
            return False
        return True

    @staticmethod
    def _row(row: tuple[Any, ...]) -> Job:
        d = dict(zip(_COLUMNS, row, strict=True))
        return Job(
            id=d["id"], status=JobStatus(d["status"]), created=d["created"],
            updated=d["updated"], progress=d["progress"], stage=d["stage"],
            config=json.loads(d["config"]), input_name=d["input_name"], started=d["started"],
            finished=d["finished"], error_type=d["error_type"],
            error_message=d["error_message"],
            result=json.loads(d["result"]) if d["result"] else None,
            files=json.loads(d["files"]), attempts=d["attempts"],
            cancel_requested=bool(d["cancel_requested"]), owner=d["owner"] or "",
        )

    def input_dir(self, job_id: str) -> Path:
        return self.inputs / job_id

    def output_dir(self, job_id: str) -> Path:
        return self.outputs / job_id

    @staticmethod
    def new_id() -> str:
        """A fresh job id (32 lowercase hex digits)."""
        return uuid.uuid4().hex

    # ----------------------------------------------------------------- queries
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {','.join(_COLUMNS)} FROM jobs WHERE id=?",
                                   (job_id,)).fetchone()
        return self._row(row) if row else None

    def count(self, status: JobStatus) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status=?",
                                    (status.value,)).fetchone()
        return int(n)

    def list_jobs(self, limit: int = 100) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {','.join(_COLUMNS)} FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        return [self._row(r) for r in rows]

    # ---------------------------------------------------------------- updates
    def add(self, job_id: str, *, input_name: str, config: dict[str, Any], queue_limit: int,
            retry_after: int = 5, owner: str = "") -> Job:
        """Insert a queued job whose input is already on disk; ``owner`` identifies the
        API key that submitted it (empty when the server has no keys).

        Raises :class:`QueueFullError` (nothing inserted) if ``queue_limit`` jobs are queued.
        """
        now = time.time()
        with self._tx() as db:
            (queued,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()
            if queued >= queue_limit:
                raise QueueFullError(int(queued), retry_after)
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
            db.execute(
                "INSERT INTO jobs (id, seq, status, created, updated, config, input_name, "
                "owner) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, seq, now, now, json.dumps(config), input_name, owner),
            )
        job = self.get(job_id)
        if job is None:  # pragma: no cover - just inserted
            raise RuntimeError(f"job {job_id} vanished after insert")
        return job

    def claim_next(self) -> Job | None:
        """Atomically move the oldest queued job to ``running`` and return it."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status='running', started=?, updated=?, progress=0, stage='',"
                " attempts=attempts+1 WHERE id=?",
                (now, now, row[0]),
            )
        return self.get(row[0])

    def set_progress(self, job_id: str, progress: float, stage: str) -> None:
        """Record progress (percent; never lowered) and the stage name of a running job."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET progress=MAX(progress, ?), stage=?, updated=? "
                "WHERE id=? AND status='running'",
                (float(progress), stage, time.time(), job_id),
            )

    def finish(self, job_id: str, status: JobStatus, *, result: dict[str, Any] | None = None,
               files: list[str] | None = None, error_type: str | None = None,
               error_message: str | None = None) -> bool:
        """Move a running job to a terminal status; False if it was not running."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status=?, finished=?, updated=?, result=?, files=?, "
                "error_type=?, error_message=?, "
                "progress=CASE WHEN ?='succeeded' THEN 100 ELSE progress END, "
                "stage=CASE WHEN ?='succeeded' THEN 'done' ELSE stage END "
                "WHERE id=? AND status='running'",
                (status.value, now, now, json.dumps(result) if result is not None else None,
                 json.dumps(files or []), error_type, error_message, status.value,
                 status.value, job_id),
            )
            return cur.rowcount == 1

    def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a job: a queued job becomes ``cancelled`` at once; a running one gets
        ``cancel_requested`` (its worker stops at the next progress report).

        Returns the status after the call, or ``None`` for an unknown job.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            status = JobStatus(row[0])
            if status is JobStatus.QUEUED:
                db.execute(
                    "UPDATE jobs SET status='cancelled', finished=?, updated=?, "
                    "error_type='Cancelled', error_message='cancelled by the client' "
                    "WHERE id=?", (now, now, job_id))
                status = JobStatus.CANCELLED
            elif status is JobStatus.RUNNING:
                db.execute("UPDATE jobs SET cancel_requested=1, updated=? WHERE id=?",
                           (now, job_id))
        if status is JobStatus.CANCELLED:
            shutil.rmtree(self.input_dir(job_id), ignore_errors=True)
        return status

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT cancel_requested FROM jobs WHERE id=?",
                                   (job_id,)).fetchone()
        return bool(row and row[0])

    def recover(self) -> list[str]:
        """Start-up recovery after a crash; returns the ids of re-queued jobs.

        * ``running`` jobs go back to ``queued`` (keeping their order);
        * output folders of jobs that are not ``succeeded`` are removed, and so are
          temporary output folders (``.<id>.tmp*``) left by a killed writer;
        * input folders without a job row (the process died between saving the upload
          and inserting the row) are removed.
        """
        now = time.time()
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE status='running'")]
            db.execute("UPDATE jobs SET status='queued', progress=0, stage='requeued', "
                       "updated=? WHERE status='running'", (now,))
            known = {r[0]: r[1] for r in db.execute("SELECT id, status FROM jobs")}
        for d in self.outputs.iterdir():
            if d.name.startswith(".") or known.get(d.name) != JobStatus.SUCCEEDED.value:
                _remove(d)
        for d in self.inputs.iterdir():
            if d.name.startswith(".") or d.name not in known:
                _remove(d)
        return ids

    def expire(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Mark finished jobs older than ``ttl_s`` as ``expired`` and delete their files."""
        cutoff = (time.time() if now is None else now) - ttl_s
        with self._tx() as db:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM jobs WHERE status IN ('succeeded','failed','cancelled') "
                "AND finished IS NOT NULL AND finished < ?", (cutoff,))]
            db.executemany("UPDATE jobs SET status='expired', result=NULL, files='[]', "
                           "updated=? WHERE id=?", [(time.time(), i) for i in ids])
        for i in ids:
            _remove(self.output_dir(i))
            _remove(self.input_dir(i))
        return ids

    def outputs_complete(self, job: Job) -> bool:
        """True unless ``job`` succeeded and one of its result files is missing."""
        if job.status is not JobStatus.SUCCEEDED:
            return True
        folder = self.output_dir(job.id)
        return all((folder / name).is_file() for name in job.files)

    def mark_lost(self, job_id: str) -> None:
        """A succeeded job whose files disappeared becomes ``expired`` (never reported
        ``succeeded`` without its results)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status='expired', result=NULL, files='[]', updated=?, "
                       "error_type='ResultsLost', error_message='the result files are gone' "
                       "WHERE id=? AND status='succeeded'", (time.time(), job_id))

    def average_duration(self, default: float = 5.0, last: int = 20) -> float:
        """Mean wall time (s) of the last ``last`` succeeded jobs, for Retry-After."""
        with self._lock:
            rows = self._db.execute(
                "SELECT finished - started FROM jobs WHERE status='succeeded' AND "
                "started IS NOT NULL ORDER BY seq DESC LIMIT ?", (last,)).fetchall()
        vals = [r[0] for r in rows if r[0] is not None and r[0] >= 0]
        return sum(vals) / len(vals) if vals else default


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
