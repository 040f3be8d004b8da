"""Benchmark of ``POST /v1/predict``: throughput and latency on loopback vs a direct call.

Starts ``uvicorn medinfer.serve:app`` in a subprocess on 127.0.0.1 with the given model,
then measures, for 1, 4 and 16 concurrent clients (threads, one httpx client each),
requests/s and p50 / p95 latency of the synchronous JSON prediction of one scan. The
peer is the same work done in this process without HTTP: ``medinfer.io.load`` +
``Predictor.predict`` + ``Prediction.summary()``, with the same model and the same torch
thread count. The HTTP overhead (target: at most 10 %) is reported three ways: 1-client
p50 vs direct p50, the median ratio of back-to-back pairs (direct and HTTP alternating,
so machine-load drift hits both), and the time each path spends outside
``Predictor.predict`` (upload, checks, load, JSON) relative to a direct call, which does
not depend on how loaded the CPU is.

Usage::

    .venv/bin/python benchmarks/serve.py [--model demo-brain] [--scan samples/t1_sample.nii.gz]
        [--repeats 5] [--per-client 2] [--workers 2]

Prints a Markdown table. Numbers depend on the machine and on its load; compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _shape(scan: Path) -> str:
    import nibabel as nib

    return "x".join(str(d) for d in nib.load(str(scan)).shape)


def _crop(scan: Path, n: int, out: Path) -> Path:
    """Central ``n``^3 block of ``scan`` with its affine moved accordingly (same frame)."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(scan))
    data = np.asanyarray(img.dataobj)
    lo = [max(0, s // 2 - n // 2) for s in data.shape[:3]]
    block = np.ascontiguousarray(data[lo[0]:lo[0] + n, lo[1]:lo[1] + n, lo[2]:lo[2] + n])
    aff = img.affine.copy()
    aff[:3, 3] = (img.affine @ [*lo, 1])[:3]
    nib.save(nib.Nifti1Image(block, aff), str(out))
    return out


class Direct:
    """The peer: load + ``Predictor.predict`` + ``summary()`` in this process."""

    def __init__(self, model: str, threads: int) -> None:
        import torch

        from medinfer.inference import Predictor
        from medinfer.models import load_model, resolve_model

        torch.set_num_threads(threads)
        card, folder = resolve_model(model)
        self.predictor = Predictor(card, load_model(card, folder, "cpu"), device="cpu")

    def __call__(self, scan: Path) -> tuple[float, float]:
        """(wall seconds, seconds inside Predictor.predict)."""
        from medinfer.io import load

        t0 = time.perf_counter()
        summary = self.predictor.predict(load(scan)).summary()
        return time.perf_counter() - t0, float(summary["timings"]["total"])


def http_once(url: str, scan: Path) -> tuple[float, float]:
    """(wall seconds of the request, seconds inside Predictor.predict on the server)."""
    with httpx.Client(base_url=url, timeout=3600) as c:
        t0 = time.perf_counter()
        r = c.post("/v1/predict", files={"file": (scan.name, scan.read_bytes())})
        dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    return dt, float(r.json()["timings"]["total"])


def http_level(url: str, scan: Path, clients: int, per_client: int) -> tuple[float, list[float]]:
    """(requests/s, latencies) for ``clients`` concurrent clients, ``per_client`` each."""
    data = scan.read_bytes()

    def worker(_: int) -> list[float]:
        out = []
        with httpx.Client(base_url=url, timeout=3600) as c:
            for _ in range(per_client):
                t0 = time.perf_counter()
                r = c.post("/v1/predict", files={"file": (scan.name, data)})
                out.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = [x for part in pool.map(worker, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    return len(lat) / wall, lat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo-brain")
    ap.add_argument("--scan", type=Path, default=REPO / "samples" / "t1_sample.nii.gz")
    ap.add_argument("--crop", type=int, default=0,
                    help="use the central N^3 voxels of the scan (0 = whole scan)")
    ap.add_argument("--warmup", type=int, default=8, help="unmeasured calls of each path")
    ap.add_argument("--repeats", type=int, default=6, help="paired direct / 1-client calls")
    ap.add_argument("--per-client", type=int, default=2, help="requests per client at 4, 16")
    ap.add_argument("--workers", type=int, default=2, help="MEDINFER_WORKERS of the server")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS",
                                                                      os.cpu_count() or 1)))
    args = ap.parse_args(argv)
    # same thread settings for the peer (this process) and the server (set before torch loads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)

    store = Path(tempfile.mkdtemp(prefix="medinfer-bench-"))
    if args.crop:
        args.scan = _crop(args.scan, args.crop, store / f"crop{args.crop}.nii.gz")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MEDINFER_MODEL=args.model, MEDINFER_DEVICE="cpu",
               MEDINFER_JOB_STORE=str(store), MEDINFER_WORKERS=str(args.workers),
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "medinfer.serve:app",
                             "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], env=env, cwd=str(REPO))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise SystemExit("server exited during start-up")
            time.sleep(0.3)
        else:
            raise SystemExit("server not ready after 300 s")
        peer = Direct(args.model, args.threads)
        for _ in range(args.warmup):  # PyTorch CPU kernels get faster over the first calls
            peer(args.scan)
            http_once(url, args.scan)
        # paired, alternating order: machine-load drift hits both paths alike
        base_pairs: list[tuple[float, float]] = []
        single_pairs: list[tuple[float, float]] = []
        for i in range(args.repeats):
            if i % 2:
                single_pairs.append(http_once(url, args.scan))
                base_pairs.append(peer(args.scan))
            else:
                base_pairs.append(peer(args.scan))
                single_pairs.append(http_once(url, args.scan))
        base = [w for w, _ in base_pairs]
        single = [w for w, _ in single_pairs]
        rows = [(1, len(single), len(single) / sum(single), _percentile(single, 50),
                 _percentile(single, 95))]
        for clients in (4, 16):
            rps, lat = http_level(url, args.scan, clients, args.per_client)
            rows.append((clients, len(lat), rps, _percentile(lat, 50), _percentile(lat, 95)))
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        if proc.poll() is None:
            proc.kill()
            proc.wait(20)
        scan_shape = _shape(args.scan)
        shutil.rmtree(store, ignore_errors=True)
    d50 = statistics.median(base)
    print(f"model {args.model}, scan {args.scan.name} ({scan_shape}), "
          f"server workers {args.workers}, "
          f"torch threads {args.threads}, CPU count {os.cpu_count()}")
    print()
    print("| path | clients | requests | requests/s | p50 latency (s) | p95 latency (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| direct `Predictor.predict` (+ load, summary) | 1 | {len(base)} | "
          f"{len(base) / sum(base):.3f} | "
          f"{d50:.3f} | {_percentile(base, 95):.3f} |")
    for clients, n, rps, p50, p95 in rows:
        print(f"| HTTP `POST /v1/predict` | {clients} | {n} | {rps:.3f} | {p50:.3f} | "
              f"{p95:.3f} |")
    overhead = rows[0][3] / d50 - 1.0
    paired = statistics.median(h / d for h, d in zip(single, base, strict=True)) - 1.0
    # load-independent: time outside the model in each request vs in each direct call,
    # relative to the direct call (the model time itself is identical work)
    extra_http = statistics.median(w - m for w, m in single_pairs)
    extra_direct = statistics.median(w - m for w, m in base_pairs)
    model_time = statistics.median(m for _, m in base_pairs)
    added = (extra_http - extra_direct) / (model_time + extra_direct)
    print()
    print("HTTP overhead at 1 client (target <= +10 %):")
    print(f"- p50 latency vs direct p50: {overhead * 100:+.1f} %")
    print(f"- median of paired (back-to-back) ratios: {paired * 100:+.1f} %")
    print(f"- time outside Predictor.predict: HTTP {extra_http:.3f} s, direct "
          f"{extra_direct:.3f} s per call; added by HTTP: {added * 100:+.1f} % of a direct "
          f"call ({model_time:.3f} s in the model)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
