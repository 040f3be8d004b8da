"""Batch runs that overlap I/O with compute.

While case ``n`` is being inferred, case ``n + 1`` is read and case ``n - 1`` is written,
each in its own thread (one reader, one writer). At most three cases are in memory at a
time (being written, being inferred, read ahead): the queue between the stages holds one
item each. Reading (nibabel / pydicom / gzip), writing (gzip compression) and torch
inference release the GIL for most of their work, so the stages really run side by side.

Results come back in input order. If any stage fails, no new case is started, the
write of a case already inferred is still completed (so every finished case has its
outputs), and the first error is raised.

``workers`` sets the number of reader and of writer threads (and how many cases are read
ahead / wait to be written); ``0`` runs the three stages one after the other in the
calling thread (no overlap).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

C = TypeVar("C")  # a case (e.g. an input path)
V = TypeVar("V")  # a loaded case (e.g. a Volume)
P = TypeVar("P")  # a prediction
R = TypeVar("R")  # what writing returns (e.g. output paths)

__all__ = ["BatchRunner", "StreamingPredictor", "run_batch"]


class BatchRunner(Generic[C, V, P, R]):
    """Three-stage pipeline: ``load(case) -> infer(case, loaded) -> write(case, loaded, pred)``.

    Parameters
    ----------
    load : reads one case (runs in the reader thread).
    infer : runs the model (runs in the calling thread, which keeps the device).
    write : writes the outputs of one case, returns e.g. the written paths (writer thread).
    on_done : optional callback ``(index, case, result)`` after each write, in order
        (called in the calling thread).
    workers : reader threads and writer threads (default 1); 0 = no threads.
    """

    def __init__(
        self,
        load: Callable[[C], V],
        infer: Callable[[C, V], P],
        write: Callable[[C, V, P], R],
        on_done: Callable[[int, C, R], None] | None = None,
        workers: int = 1,
    ) -> None:
        from medinfer.errors import ConfigError

        if workers < 0:
            raise ConfigError(f"--num-workers: expected an integer >= 0, got {workers}")
        self.load = load
        self.infer = infer
        self.write = write
        self.on_done = on_done
        self.workers = workers

    def run(self, cases: Sequence[C]) -> list[R]:
        """Process ``cases`` in order; returns the ``write`` results in order.

        Raises
        ------
        Exception
            The first error of any stage (after the pending write has finished).
        """
        results: list[R] = []
        if not cases:
            return results
        if self.workers == 0:
            for i, case in enumerate(cases):
                loaded = self.load(case)
                pred = self.infer(case, loaded)
                res = self.write(case, loaded, pred)
                del loaded, pred
                results.append(res)
                if self.on_done is not None:
                    self.on_done(i, case, res)
            return results
        n = self.workers
        with ThreadPoolExecutor(n, thread_name_prefix="medinfer-read") as rpool, \
                ThreadPoolExecutor(n, thread_name_prefix="medinfer-write") as wpool:
            loads: deque[Future[V]] = deque()
            submitted = 0
            pending: deque[tuple[int, C, Future[R]]] = deque()
            try:
                for i, case in enumerate(cases):
                    while submitted < len(cases) and len(loads) < n:
                        loads.append(rpool.submit(self.load, cases[submitted]))
                        submitted += 1
                    loaded = loads.popleft().result()
                    if submitted < len(cases):  # keep n cases read ahead
                        loads.append(rpool.submit(self.load, cases[submitted]))
                        submitted += 1
                    pred = self.infer(case, loaded)
                    while len(pending) >= n:
                        self._finish(pending.popleft(), results)
                    pending.append((i, case, wpool.submit(self.write, case, loaded, pred)))
                    del loaded, pred
                while pending:
                    self._finish(pending.popleft(), results)
            finally:
                for f in loads:
                    f.cancel()
                for p in pending:  # an error happened: still finish those writes
                    p[2].exception()
        return results

    def _finish(self, pending: tuple[int, C, Future[R]], results: list[R]) -> None:
        i, case, fut = pending
        res = fut.result()
        results.append(res)
        if self.on_done is not None:
            self.on_done(i, case, res)


def run_batch(
    cases: Sequence[C],
    load: Callable[[C], V],
    infer: Callable[[C, V], P],
    write: Callable[[C, V, P], R],
    on_done: Callable[[int, C, R], None] | None = None,
    workers: int = 1,
) -> list[R]:
    """Shortcut for ``BatchRunner(load, infer, write, on_done, workers).run(cases)``."""
    return BatchRunner(load, infer, write, on_done, workers).run(cases)


class StreamingPredictor:
    """A :class:`~medinfer.inference.Predictor` whose ``predict`` streams.

    ``predict(volume, progress)`` is :func:`medinfer.inference.streaming.predict_streaming`
    (float32 accumulation: the same labels as the full-volume path, peak memory of one
    slab); detection and whole-volume models fall back to the full-volume path.
    """

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.card = predictor.card

    def predict(self, volume: Any, progress: Callable[[str, float], None] | None = None
                ) -> Any:
        from medinfer.inference.streaming import predict_streaming

        return predict_streaming(self.predictor, volume, progress)

