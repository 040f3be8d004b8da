"""Bounded worker pool running durable jobs from the :class:`~medinfer.serve.store.JobStore`.

``workers`` threads each claim the oldest queued job, load its checked input, run the
engine with a progress callback, write the outputs atomically
(:func:`medinfer.serve.engine.write_outputs`) and only then mark the job ``succeeded``.
A process killed at any point leaves either a queued/running row (re-queued by
:meth:`JobStore.recover` at the next start) or a finished row with complete files.

Progress is reported in percent (0-100, never decreasing): 0-5 loading the scan, 5-95
the predictor's own ``progress(stage, fraction)`` scaled, 95-100 writing outputs.
Subscribers (the WebSocket endpoint) get every event through an ``asyncio.Queue``
fed thread-safely into their event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medinfer.errors import MedinferError
from medinfer.serve.engine import Engine, JobConfig, parse_job_config, write_outputs
from medinfer.serve.store import Job, JobStatus, JobStore
from medinfer.serve.uploads import Limits, check_upload, load_checked

log = logging.getLogger(__name__)

UPLOAD_NAME = "upload"


class JobCancelled(Exception):
    """Raised inside a running job when its cancellation was requested."""


class _ProgressState:
    def __init__(self) -> None:
        self.pct = 0.0
        self.stage = ""
        self.written = -100.0
        self.published = -100.0


class _Subscriber:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def put(self, event: dict[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # loop closed: the subscriber is gone
            pass


def _scan_id(input_name: str) -> str:
    """Case id of an uploaded file name, as the CLI names cases (``a.nii.gz`` -> ``a``)."""
    from medinfer.detection import case_name

    return case_name(Path(input_name or "scan")) or "scan"


class JobManager:
    """Runs queued jobs on a fixed number of threads and publishes their events.

    Parameters
    ----------
    store : the durable job store.
    engine : callable returning the loaded :class:`Engine` (blocks until loaded); called
        by workers, so jobs wait for the model rather than fail.
    limits : upload limits used when the job's input is loaded.
    workers : number of worker threads.
    queue_limit : most queued jobs; :meth:`submit` raises ``QueueFullError`` beyond it.
    result_ttl_s : seconds finished jobs keep their results.
    on_outcome : called with ``succeeded|failed|cancelled`` when a job ends (metrics).
    """

    def __init__(self, store: JobStore, engine: Callable[[], Engine], limits: Limits, *,
                 workers: int = 2, queue_limit: int = 100, result_ttl_s: float = 86400.0,
                 on_outcome: Callable[[str], None] | None = None) -> None:
        self.store = store
        self._engine = engine
        self.limits = limits
        self.workers = workers
        self.queue_limit = queue_limit
        self.result_ttl_s = result_ttl_s
        self._on_outcome = on_outcome
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._subs: dict[str, list[_Subscriber]] = {}
        self._subs_lock = threading.Lock()
        self._cancel: set[str] = set()
        self._running: set[str] = set()

    # ------------------------------------------------------------------ life cycle
    def start(self, recover: bool = True) -> list[str]:
        """Recover after a crash (unless done already), start the workers and the expiry
        thread. Returns the ids of jobs that were running when the last process died.

        Recovery must run before any submission of this process (it removes input
        folders that have no job row yet).
        """
        requeued = self.store.recover() if recover else []
        if requeued:
            log.warning("re-queued %d job(s) interrupted by a previous shutdown", len(requeued))
        self._stop.clear()
        for n in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"medinfer-job-{n}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._reaper, name="medinfer-expiry", daemon=True)
        t.start()
        self._threads.append(t)
        return requeued

    def stop(self, timeout: float = 5.0) -> None:
        """Ask workers to stop (running jobs stay ``running`` and resume at next start)."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    @property
    def running_count(self) -> int:
        return len(self._running)

    # --------------------------------------------------------------------- submit
    def retry_after(self) -> int:
        """Seconds a client should wait before re-submitting when the queue is full."""
        queued = self.store.count(JobStatus.QUEUED)
        avg = self.store.average_duration()
        return int(min(3600, max(1, math.ceil(avg * max(1, queued) / self.workers))))

    def submit(self, upload: Path, config: JobConfig, input_name: str = "",
               owner: str = "") -> Job:
        """Queue a job for an already *checked* upload file (moved into the store);
        ``owner`` identifies the submitting API key (empty without keys).

        Raises ``QueueFullError`` (the upload is deleted) when the queue is full.
        """
        from medinfer.serve.store import QueueFullError

        job_id = self.store.new_id()
        in_dir = self.store.input_dir(job_id)
        tmp_dir = self.store.inputs / f".{job_id}.tmp"
        tmp_dir.mkdir(parents=True)
        shutil.move(str(upload), tmp_dir / UPLOAD_NAME)
        tmp_dir.rename(in_dir)  # the input folder appears complete, then the row
        try:
            job = self.store.add(job_id, input_name=input_name,
                                 config=config.model_dump(mode="json"),
                                 queue_limit=self.queue_limit, retry_after=self.retry_after(),
                                 owner=owner)
        except QueueFullError:
            shutil.rmtree(in_dir, ignore_errors=True)
            raise
        self._publish(job_id, self._event(job, "accepted"))
        with self._wake:
            self._wake.notify()
        return job

    def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a queued job at once, or ask a running one to stop; see JobStore.cancel."""
        status = self.store.cancel(job_id)
        if status is JobStatus.RUNNING:
            self._cancel.add(job_id)
        elif status is JobStatus.CANCELLED:
            job = self.store.get(job_id)
            if job is not None:
                self._publish(job_id, self._event(job, "cancelled"))
                if self._on_outcome:
                    self._on_outcome("cancelled")
        return status

    # ----------------------------------------------------------------- subscribe
    def subscribe(self, job_id: str, loop: asyncio.AbstractEventLoop) -> _Subscriber:
        sub = _Subscriber(loop)
        with self._subs_lock:
            self._subs.setdefault(job_id, []).append(sub)
        return sub

    def unsubscribe(self, job_id: str, sub: _Subscriber) -> None:
        with self._subs_lock:
            subs = self._subs.get(job_id, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._subs.pop(job_id, None)

    def _publish(self, job_id: str, event: dict[str, Any]) -> None:
        with self._subs_lock:
            subs = list(self._subs.get(job_id, []))
        for sub in subs:
            sub.put(event)

    @staticmethod
    def _event(job: Job, kind: str, **extra: Any) -> dict[str, Any]:
        ev: dict[str, Any] = {"event": kind, "job_id": job.id, "status": job.status.value,
                              "stage": job.stage, "progress": round(job.progress, 2)}
        ev.update(extra)
        return ev

    # -------------------------------------------------------------------- workers
    def _worker(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim_next()
            if job is None:
                with self._wake:
                    self._wake.wait(timeout=0.5)
                continue
            self._running.add(job.id)
            try:
                self._run(job)
            finally:
                self._running.discard(job.id)
                self._cancel.discard(job.id)

    def _reaper(self) -> None:
        interval = max(0.5, min(60.0, self.result_ttl_s / 4))
        while not self._stop.wait(interval):
            try:
                expired = self.store.expire(self.result_ttl_s)
            except OSError as exc:  # keep the thread alive; report
                log.error("result expiry failed: %s", exc)
                continue
            if expired:
                log.info("expired %d job result(s)", len(expired))

    def _run(self, job: Job) -> None:
        state = _ProgressState()

        def report(stage: str, pct: float) -> None:
            if self._stop.is_set():
                raise JobCancelled("server shutting down")
            if job.id in self._cancel or self.store.cancel_requested(job.id):
                raise JobCancelled("cancelled by the client")
            pct = max(state.pct, min(100.0, pct))
            changed = stage != state.stage
            state.pct, state.stage = pct, stage
            if changed or pct - state.written >= 2.0:
                self.store.set_progress(job.id, pct, stage)
                state.written = pct
            if changed or pct - state.published >= 0.5:
                state.published = pct
                self._publish(job.id, {"event": "progress", "job_id": job.id,
                                       "status": "running", "stage": stage,
                                       "progress": round(pct, 2)})

        def predictor_progress(stage: str, fraction: float) -> None:
            f = 0.0 if not math.isfinite(fraction) else min(1.0, max(0.0, fraction))
            report(stage or "inference", 5.0 + 90.0 * f)

        try:
            report("loading", 0.0)
            config = parse_job_config(job.config, name="job config")
            scan = check_upload(self.store.input_dir(job.id) / UPLOAD_NAME,
                                self.store.input_dir(job.id) / "work", self.limits, name="input")
            report("loading", 2.0)  # a cancel during the checks stops here
            volume = load_checked(scan, self.limits, name="input")
            report("loading", 5.0)
            engine = self._engine()
            prediction = engine.predict(volume, config, progress=predictor_progress)
            report("writing", 95.0)
            summary, files = write_outputs(prediction, self.store.output_dir(job.id), config,
                                           extra={"job_id": job.id}, image=volume,
                                           scan_id=_scan_id(job.input_name))
        except JobCancelled as exc:
            if self._stop.is_set() and job.id not in self._cancel \
                    and not self.store.cancel_requested(job.id):
                return  # shutdown: stays 'running', re-queued at the next start
            self._end(job, JobStatus.CANCELLED, error=("Cancelled", str(exc)))
            return
        except MedinferError as exc:
            if self._cancel_asked(job.id):
                self._end(job, JobStatus.CANCELLED, error=("Cancelled", "cancelled by the client"))
                return
            self._end(job, JobStatus.FAILED, error=(type(exc).__name__, self._redact(str(exc))))
            return
        except Exception as exc:  # a bug or resource problem must not kill the worker
            log.exception("job %s failed", job.id)
            if self._cancel_asked(job.id):
                self._end(job, JobStatus.CANCELLED, error=("Cancelled", "cancelled by the client"))
                return
            self._end(job, JobStatus.FAILED, error=(
                "InternalError", self._redact(f"{type(exc).__name__}: {exc}")))
            return
        out_dir = self.store.output_dir(job.id)
        missing = [f for f in files if not (out_dir / f).is_file()]
        if missing:  # results are checked before the status flips
            self._end(job, JobStatus.FAILED, error=(
                "InternalError", f"result files missing after writing: {missing}"))
            return
        if not self.store.finish(job.id, JobStatus.SUCCEEDED, result=summary, files=files):
            return
        shutil.rmtree(self.store.input_dir(job.id), ignore_errors=True)
        done = self.store.get(job.id)
        if done is not None:
            self._publish(job.id, self._event(done, "completed",
                                              result=results_body(done)))
        if self._on_outcome:
            self._on_outcome("succeeded")

    def _cancel_asked(self, job_id: str) -> bool:
        return job_id in self._cancel or self.store.cancel_requested(job_id)

    def _redact(self, message: str) -> str:
        """Replace server paths (anything under the job store) by ``input``."""
        import re

        roots = {str(self.store.root), str(self.store.root.resolve())}
        for root in sorted(roots, key=len, reverse=True):
            message = re.sub(re.escape(root) + r"[^\s:'\",;)]*", "input", message)
        return message

    def _end(self, job: Job, status: JobStatus, error: tuple[str, str]) -> None:
        if not self.store.finish(job.id, status, error_type=error[0], error_message=error[1]):
            # another worker finished this row: its files are not ours to delete
            return
        shutil.rmtree(self.store.input_dir(job.id), ignore_errors=True)
        shutil.rmtree(self.store.output_dir(job.id), ignore_errors=True)
        done = self.store.get(job.id)
        if done is not None:
            kind = "cancelled" if status is JobStatus.CANCELLED else "failed"
            self._publish(job.id, self._event(
                done, kind, error={"type": error[0], "message": error[1]}))
        if self._on_outcome:
            self._on_outcome(status.value)


def results_body(job: Job, base_url: str = "") -> dict[str, Any]:
    """The JSON body of ``GET /api/v1/inference/{id}/results`` for a succeeded job."""
    return {
        "job_id": job.id,
        "status": job.status.value,
        "summary": job.result or {},
        "files": [{"name": f, "url": f"{base_url}/api/v1/inference/{job.id}/files/{f}"}
                  for f in job.files],
        "finished": job.finished,
        "duration_s": (job.finished - job.started) if job.finished and job.started else None,
        "created": job.created,
        "now": time.time(),
    }
