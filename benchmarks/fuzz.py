"""Long fuzz run of the readers (issue 18): n hostile inputs, one summary table.

Generates ``--n`` inputs with the corpus of ``tests/fuzz/fuzz_corpus.py`` (the issue-18
reproducers, valid NIfTI / DICOM files and seeded mutations of them: NIfTI header
fields, gzip / deflate corruption, DICOM tag edits, byte flips, truncation) and runs
each through :func:`medinfer.io.load` and :func:`medinfer.data.prepare.load_image` in
``--workers`` memory-limited worker subprocesses (``tests/fuzz/fuzz_runner.py``:
``RLIMIT_AS`` = start-up size + ``--mem-mb``; ``--timeout`` seconds per input, then the
worker is killed and the input counted as a hang).

Columns of the table (one row per target): inputs, clean results (success or a
``medinfer.errors`` type), other exceptions (incl. MemoryError under the limit and
killed workers), hangs (over the timeout), peak RSS > 2 GB from < 1 MB inputs (worker
max RSS after the input), non-finite results (successful loads with NaN/inf voxels or
affine). The target is all zeros but the first two columns.

Usage::

    .venv/bin/python benchmarks/fuzz.py [--n 10000] [--seed 0] [--workers 2]
        [--timeout 10] [--mem-mb 2560] [--show 20]

Prints a Markdown table and the first ``--show`` unclean outcomes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fuzz"))

from fuzz_corpus import generate  # noqa: E402
from fuzz_runner import Result, run_inputs  # noqa: E402

_BIG_RSS_MB = 2048.0
_SMALL_INPUT = 1024 * 1024


def table(results: list[Result]) -> str:
    """The Markdown summary table, one row per target and a total."""
    rows = ["| target | inputs | clean | other exceptions | hangs | peak RSS > 2 GB "
            "from < 1 MB | non-finite results |", "|---|---|---|---|---|---|---|"]
    for target in sorted({r.target for r in results}) + ["all"]:
        sel = [r for r in results if target in ("all", r.target)]
        clean = sum(r.outcome in ("ok", "clean") for r in sel)
        other = sum(r.outcome in ("other", "died") for r in sel)
        hangs = sum(r.outcome == "hang" for r in sel)
        big = sum(r.size < _SMALL_INPUT and r.maxrss_mb > _BIG_RSS_MB for r in sel)
        nonfinite = sum(r.outcome == "ok" and not r.finite for r in sel)
        rows.append(f"| {target} | {len(sel)} | {clean} | {other} | {hangs} | {big} | "
                    f"{nonfinite} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--mem-mb", type=int, default=2560)
    ap.add_argument("--show", type=int, default=20)
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="medinfer-fuzz-"))
    try:
        t0 = time.perf_counter()
        files = []
        for i, (name, data) in enumerate(generate(args.n, seed=args.seed)):
            p = folder / f"{i:06d}"
            p.write_bytes(data)
            files.append((name, p))
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = run_inputs(files, ("io", "data"), workers=args.workers,
                             timeout_s=args.timeout, mem_mb=args.mem_mb)
        t_run = time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.write(f"fuzz: {args.n} inputs (seed {args.seed}), generated in {t_gen:.0f} s, "
                     f"run in {t_run:.0f} s with {args.workers} workers, "
                     f"limit {args.mem_mb} MiB over start-up, {args.timeout:g} s per input\n\n")
    sys.stdout.write(table(results) + "\n")
    unclean = [r for r in results if r.outcome not in ("ok", "clean") or not r.finite
               or (r.size < _SMALL_INPUT and r.maxrss_mb > _BIG_RSS_MB)]
    slowest = sorted(results, key=lambda r: -r.seconds)[:5]
    sys.stdout.write("\nslowest: " + ", ".join(f"{r.name} [{r.target}] {r.seconds:.1f} s"
                                               for r in slowest) + "\n")
    for r in unclean[: args.show]:
        sys.stdout.write(f"- {r.name} [{r.target}] {r.outcome} {r.type}: {r.message[:200]}\n")
    return 1 if unclean else 0


if __name__ == "__main__":
    raise SystemExit(main())
