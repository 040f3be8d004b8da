"""Worker processes of :meth:`medinfer.data.CacheManager.build_cache`.

Why not ``multiprocessing``: its ``spawn`` and ``forkserver`` start methods re-import the
caller's ``__main__`` module in every worker, so a plain script that calls
``build_cache(num_workers=8)`` without ``if __name__ == "__main__":`` runs itself again in
each worker (which then fails: ``BrokenProcessPool``); ``fork`` is unsafe once torch or
BLAS threads exist. Here each worker is a fresh ``python -m medinfer.data._cache_worker``
interpreter that imports medinfer only. The parent sends one task per line (JSON) on the
worker's stdin and reads one result line from a private pipe (the worker's stdout is
redirected to its stderr, so stray prints cannot corrupt the protocol). A worker that dies
fails only the image it was working on; a new worker takes the next image. If no worker
can be started at all (no usable ``sys.executable``), the images are built in-process.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from medinfer.data.metadata import ImageEntry
from medinfer.data.prepare import PrepareConfig

log = logging.getLogger(__name__)


def config_from_dict(d: dict[str, Any]) -> PrepareConfig:
    """Inverse of :meth:`PrepareConfig.to_dict` (same :meth:`PrepareConfig.digest`)."""
    d = dict(d)
    d["ct_windows"] = {str(k): (float(v[0]), float(v[1])) for k, v in d["ct_windows"].items()}
    d["mri_percentiles"] = (float(d["mri_percentiles"][0]), float(d["mri_percentiles"][1]))
    return PrepareConfig(**d)


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the medinfer package
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = src if not old else src + os.pathsep + old
    return env


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medinfer.data._cache_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_worker_env(),
            text=True,
            bufsize=1,
        )
        self.stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        self.stdout: IO[str] = self.proc.stdout  # type: ignore[assignment]

    def ask(self, task: dict[str, Any]) -> dict[str, Any] | None:
        try:
            self.stdin.write(json.dumps(task) + "\n")
            self.stdin.flush()
            line = self.stdout.readline()
        except OSError:
            return None
        if not line:
            return None
        reply = json.loads(line)
        return reply if isinstance(reply, dict) else None

    def close(self) -> int:
        try:
            self.stdin.close()
        except OSError:
            pass
        return self.proc.wait()


def run_pool(
    data_dir: str,
    tasks: Sequence[tuple[ImageEntry, str]],
    config: PrepareConfig,
    force: bool,
    workers: int,
) -> Iterator[tuple[ImageEntry, str, str]]:
    """Build ``tasks`` (entry, file stem) in ``workers`` processes.

    Yields ``(entry, status, detail)`` in completion order, in the calling thread;
    status ``"built"``, ``"unusable"``, ``"up_to_date"`` or ``"failed"`` (detail = the
    error, e.g. ``"InvalidImageError: raw/a/T1.nii.gz: cannot read: ..."`` or the exit
    code of a worker that died).
    """
    todo: queue.Queue[tuple[ImageEntry, str]] = queue.Queue()
    for task in tasks:
        todo.put(task)
    results: queue.Queue[tuple[ImageEntry, str, str]] = queue.Queue()
    cfg = config.to_dict()

    def drive() -> None:
        worker: _Worker | None = None
        in_process = False
        while True:
            try:
                entry, stem = todo.get_nowait()
            except queue.Empty:
                break
            try:
                if worker is None and not in_process:
                    try:
                        worker = _Worker()
                    except OSError as exc:  # no interpreter to start: build here instead
                        log.warning("cannot start a cache worker (%s); building in-process", exc)
                        in_process = True
                if worker is None:
                    from medinfer.data.cache import build_one

                    results.put((entry, *build_one(data_dir, entry, config, force, stem)))
                    continue
                reply = worker.ask(
                    {
                        "data_dir": data_dir,
                        "entry": asdict(entry),
                        "stem": stem,
                        "config": cfg,
                        "force": force,
                    }
                )
                if reply is None:
                    code = worker.close()
                    worker = None
                    results.put((entry, "failed", f"worker process died (exit code {code})"))
                else:
                    results.put((entry, str(reply["status"]), str(reply.get("detail", ""))))
            except Exception as exc:  # never leave the consumer waiting
                results.put((entry, "failed", f"{type(exc).__name__}: {exc}"))
        if worker is not None:
            worker.close()

    threads = [threading.Thread(target=drive, daemon=True) for _ in range(max(1, workers))]
    for thread in threads:
        thread.start()
    for _ in range(len(tasks)):
        yield results.get()
    for thread in threads:
        thread.join()
