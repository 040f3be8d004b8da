"""Run hostile inputs through medinfer's readers in memory-limited worker subprocesses.

A few long-lived workers (``python fuzz_runner.py --worker``) each set ``RLIMIT_AS`` to
their start-up size plus ``mem_mb`` MiB, then read ``target<TAB>path`` lines and answer
one JSON line per input: ``outcome`` (``ok`` | ``clean`` = a ``medinfer.errors`` type |
``other`` = any other exception), ``type``, ``finite`` (the affine of an ``ok`` result is
finite, and so is its array unless the file stores floats: NaN stored in a float image
is content, passed through), ``seconds`` and ``maxrss_mb``. The parent gives each input
``timeout_s``; a worker that does not answer in time is killed (outcome ``hang``), one
that dies is restarted (outcome ``died``, e.g. killed by the memory limit). Targets:
``io`` (:func:`medinfer.io.load`) and ``data`` (:func:`medinfer.data.prepare.load_image`).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: environment of the workers: image / inflation limits well below the memory limit
WORKER_ENV = {
    "MEDINFER_MAX_IMAGE_BYTES": str(256 * 1024**2),
    "MEDINFER_MAX_UNPACKED_BYTES": str(256 * 1024**2),
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
}


@dataclass
class Result:
    name: str
    target: str
    size: int
    outcome: str  # ok | clean | other | hang | died
    type: str = ""
    message: str = ""
    finite: bool = True
    seconds: float = 0.0
    maxrss_mb: float = 0.0


class _Worker:
    def __init__(self, mem_mb: int) -> None:
        env = dict(os.environ)
        env.update(WORKER_ENV)
        src = Path(__file__).resolve().parents[2] / "src"
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(mem_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, bufsize=0,
        )
        self.buf = b""
        line = self._readline(120.0)  # wait for the imports
        if line is None or not line.startswith(b"ready"):
            self.kill()
            raise RuntimeError("fuzz worker did not start")

    def _readline(self, timeout: float) -> bytes | None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def ask(self, target: str, path: Path, timeout: float) -> dict[str, Any] | str:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{target}\t{path}\n".encode())
            line = self._readline(timeout)
        except (BrokenPipeError, EOFError):
            return "died"
        if line is None:
            return "hang"
        return dict(json.loads(line))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def run_inputs(
    files: Sequence[tuple[str, Path]],
    targets: Sequence[str] = ("io", "data"),
    *,
    workers: int = 2,
    timeout_s: float = 10.0,
    mem_mb: int = 1536,
) -> list[Result]:
    """Run every file through every target; one :class:`Result` per (file, target)."""
    tasks = [(name, path, t) for name, path in files for t in targets]
    results: list[Result | None] = [None] * len(tasks)
    lock = threading.Lock()
    next_i = [0]

    def loop() -> None:
        worker = _Worker(mem_mb)
        try:
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                if i >= len(tasks):
                    return
                name, path, target = tasks[i]
                size = path.stat().st_size
                t0 = time.monotonic()
                answer = worker.ask(target, path, timeout_s)
                if isinstance(answer, str):
                    results[i] = Result(name, target, size, answer,
                                        seconds=time.monotonic() - t0)
                    worker.kill()
                    worker = _Worker(mem_mb)
                    continue
                results[i] = Result(name, target, size, **answer)
                if answer["maxrss_mb"] > 1024:  # start fresh: maxrss only grows
                    worker.kill()
                    worker = _Worker(mem_mb)
        finally:
            worker.kill()

    threads = [threading.Thread(target=loop) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


# ------------------------------------------------------------------------------ worker
def _worker_main(mem_mb: int) -> None:
    import logging
    import resource
    import warnings

    import numpy as np

    from medinfer.data.prepare import load_image
    from medinfer.errors import MedinferError
    from medinfer.io import load

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    with open("/proc/self/status") as fh:
        vm_kb = int(fh.read().split("VmSize:")[1].split()[0])
    limit = vm_kb * 1024 + mem_mb * 1024**2
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        target, path = line.decode().rstrip("\n").split("\t", 1)
        t0 = time.monotonic()
        rec: dict[str, Any] = {"outcome": "ok", "type": "", "message": "", "finite": True}
        try:
            vol = load(path) if target == "io" else load_image(path)
            arr = np.asarray(vol.array)
            # NaN / inf stored in a float image are its content and pass through; any
            # non-finite value medinfer produced (scaling integers, geometry) counts
            stored = str(vol.meta.get("nifti", {}).get("datatype", ""))
            rec["finite"] = bool(np.all(np.isfinite(vol.affine))) and (
                arr.dtype.kind not in "fc" or stored.startswith("float")
                or bool(np.all(np.isfinite(arr)))
            )
            del vol, arr
        except MedinferError as exc:
            rec.update(outcome="clean", type=type(exc).__name__, message=str(exc)[:300])
        except BaseException as exc:
            rec.update(outcome="other", type=type(exc).__name__, message=str(exc)[:300])
        rec["seconds"] = time.monotonic() - t0
        rec["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.write(json.dumps(rec).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(int(sys.argv[2]))
