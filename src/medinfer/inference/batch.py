"""Batch runs that overlap I/O with compute.

While case ``n`` is being inferred, case ``n + 1`` is read and case ``n - 1`` is written,
each in its own thread (one reader, one writer). At most three cases are in memory at a
time (being written, being inferred, read ahead): the queue between the stages holds one
item each. Reading (nibabel / pydicom / gzip), writing (gzip compression) and torch
inference release the GIL for most of their work, so the stages really run side by side.

Results come back in input order. If any stage fails, no new case is started, the
write of a case already inferred is still completed (so every finished case has its
outputs), and the first error is raised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

C = TypeVar("C")  # a case (e.g. an input path)
V = TypeVar("V")  # a loaded case (e.g. a Volume)
P = TypeVar("P")  # a prediction
R = TypeVar("R")  # what writing returns (e.g. output paths)

__all__ = ["BatchRunner", "run_batch"]


class BatchRunner(Generic[C, V, P, R]):
    """Three-stage pipeline: ``load(case) -> infer(case, loaded) -> write(case, loaded, pred)``.

    Parameters
    ----------
    load : reads one case (runs in the reader thread).
    infer : runs the model (runs in the calling thread, which keeps the device).
    write : writes the outputs of one case, returns e.g. the written paths (writer thread).
    on_done : optional callback ``(index, case, result)`` after each write, in order
        (called in the calling thread).
    """

    def __init__(
        self,
        load: Callable[[C], V],
        infer: Callable[[C, V], P],
        write: Callable[[C, V, P], R],
        on_done: Callable[[int, C, R], None] | None = None,
    ) -> None:
        self.load = load
        self.infer = infer
        self.write = write
        self.on_done = on_done

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
        with ThreadPoolExecutor(1, thread_name_prefix="medinfer-read") as rpool, \
                ThreadPoolExecutor(1, thread_name_prefix="medinfer-write") as wpool:
            next_load: Future[V] | None = rpool.submit(self.load, cases[0])
            pending: tuple[int, C, Future[R]] | None = None
            try:
                for i, case in enumerate(cases):
                    assert next_load is not None
                    loaded = next_load.result()
                    next_load = rpool.submit(self.load, cases[i + 1]) \
                        if i + 1 < len(cases) else None
                    pred = self.infer(case, loaded)
                    if pending is not None:
                        self._finish(pending, results)
                    pending = (i, case, wpool.submit(self.write, case, loaded, pred))
                    del loaded, pred
                if pending is not None:
                    p, pending = pending, None
                    self._finish(p, results)
            finally:
                if next_load is not None:
                    next_load.cancel()
                if pending is not None:  # an error happened: still finish that write
                    pending[2].exception()
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
) -> list[R]:
    """Shortcut for ``BatchRunner(load, infer, write, on_done).run(cases)``."""
    return BatchRunner(load, infer, write, on_done).run(cases)
