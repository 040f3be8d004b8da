"""BatchRunner with N reader/writer threads: input order, bounded memory, first error."""

from __future__ import annotations

import threading
import time

import pytest

from medinfer.errors import ConfigError
from medinfer.inference.batch import BatchRunner


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_order_and_bounded_read_ahead(workers: int) -> None:
    lock = threading.Lock()
    alive: set[int] = set()
    peak = [0]
    done: list[int] = []

    def load(c: int) -> int:
        time.sleep(0.001 * (c % 3))  # out-of-order completion of the reads
        with lock:
            alive.add(c)
            peak[0] = max(peak[0], len(alive))
        return c * 10

    def write(c: int, loaded: int, pred: int) -> int:
        time.sleep(0.001 * ((c + 1) % 2))
        with lock:
            alive.discard(c)
        return pred

    res = BatchRunner(load, lambda c, v: v + 1, write,
                      on_done=lambda i, c, r: done.append(c), workers=workers).run(range(20))
    assert res == [c * 10 + 1 for c in range(20)] and done == list(range(20))
    # read ahead + being inferred + waiting to be written
    assert peak[0] <= max(1, 2 * workers + 1)


def test_first_error_after_pending_writes() -> None:
    written: list[int] = []

    def infer(c: int, v: int) -> int:
        if c == 4:
            raise RuntimeError("case 4")
        return v

    def write(c: int, loaded: int, pred: int) -> int:
        time.sleep(0.01)
        written.append(c)
        return c

    with pytest.raises(RuntimeError, match="case 4"):
        BatchRunner(lambda c: c, infer, write, workers=2).run(list(range(10)))
    assert sorted(written) == [0, 1, 2, 3]  # every case inferred before the error is written
    with pytest.raises(ConfigError, match="--num-workers"):
        BatchRunner(lambda c: c, infer, write, workers=-1)
