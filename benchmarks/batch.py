"""Benchmark of cohort runs: cases/minute sequential vs pipelined vs Ray (2 workers).

Builds ``--cases`` small synthetic NIfTI scans (oblique, anisotropic, int16) and a model
(default: a small MONAI UNet written to a temporary folder; ``--model`` for any other),
then runs the same cases three ways into fresh output folders:

- ``sequential``: ``medinfer.batch.run(..., num_workers=0)`` - read, infer, write one
  after the other;
- ``pipelined``: ``num_workers=2`` - reading and writing in threads beside inference;
- ``ray``: :func:`medinfer.distributed.distributed_inference` on a local
  ``ray.init(num_cpus=2)`` with 2 CPU workers (actor start-up included; the workers
  read and write their own cases).

It prints a Markdown table: wall time, cases/minute, and where a case's time goes (mean
seconds of load, preprocess + inference + postprocess, export, from the run manifests),
and checks that all three runs wrote identical label maps.

Usage::

    .venv/bin/python benchmarks/batch.py [--cases 16] [--shape 64 64 40] [--threads 1]
        [--model PATH_OR_NAME] [--no-ray]

Numbers depend on the machine and its load; compare the rows of one table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _affine() -> np.ndarray:
    a = np.deg2rad(12.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-1.0, -1.0, 1.0]) @ np.diag([1.2, 1.2, 2.5])
    aff[:3, 3] = [40.0, -20.0, 5.0]
    return aff


def make_cases(folder: Path, n: int, shape: tuple[int, int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = (rng.normal(size=shape) * 80 + 400).astype(np.int16)
        p = folder / f"case{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(arr, _affine()), str(p))
        paths.append(p)
    return paths


def make_model(folder: Path) -> Path:
    import torch
    import yaml
    from monai.networks.nets import UNet

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
              "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(UNet(**kwargs).state_dict(), folder / "model.pt")
    card = {
        "name": "bench-seg", "version": "0.1",
        "labels": {0: {"name": "background"}, 1: {"name": "a"}, 2: {"name": "b"}},
        "input": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                  "normalization": {"method": "zscore"}},
        "inference": {"patch_size": [32, 32, 32], "overlap": 0.25},
        "weights": {"format": "state_dict", "file": "model.pt"},
        "architecture": {"network": "UNet", "kwargs": kwargs},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(card))
    return folder


def where_time_goes(out: Path) -> dict[str, float]:
    cases = json.loads((out / "run.json").read_text())["cases"]
    t = [c["timings_s"] for c in cases if c["status"] == "ok"]
    infer = [c.get("total", 0.0) for c in t]
    return {"load": statistics.mean(c.get("load", 0.0) for c in t),
            "infer": statistics.mean(infer),
            "export": statistics.mean(c.get("export", 0.0) for c in t)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 64, 40])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model")
    ap.add_argument("--model", default=None)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from medinfer.batch import run

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="medinfer-bench-batch-"))
    try:
        inputs = make_cases(work / "in", args.cases, tuple(args.shape))
        model = args.model or str(make_model(work / "model"))
        rows: list[tuple[str, float, dict[str, float], Path]] = []
        common: dict[str, Any] = {"model": model, "device": "cpu"}
        for name, workers in (("sequential", 0), ("pipelined (--num-workers 2)", 2)):
            out = work / f"out-{workers}"
            t0 = time.perf_counter()
            s = run(inputs, output_dir=out, num_workers=workers, **common)
            wall = time.perf_counter() - t0
            assert s["exit_code"] == 0, s["counts"]
            rows.append((name, wall, where_time_goes(out), out))
        if not args.no_ray:
            import ray

            from medinfer.distributed import distributed_inference

            tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     _temp_dir=tmp)
            try:
                out = work / "out-ray"
                t0 = time.perf_counter()
                s = distributed_inference(model, inputs, output_dir=out, num_workers=2,
                                          cpus_per_worker=args.threads)
                wall = time.perf_counter() - t0
                assert s["exit_code"] == 0, s["counts"]
                rows.append(("Ray, 2 workers (incl. start-up)", wall, where_time_goes(out),
                             out))
            finally:
                ray.shutdown()
                shutil.rmtree(tmp, ignore_errors=True)
        ref = rows[0][3]
        for _, _, _, out in rows[1:]:
            for p in inputs:
                name = p.name.replace(".nii.gz", "_seg.nii.gz")
                a = np.asarray(nib.load(str(ref / name)).dataobj)
                b = np.asarray(nib.load(str(out / name)).dataobj)
                if not np.array_equal(a, b):
                    sys.stderr.write(f"label maps differ: {out / name}\n")
                    return 1
        print(f"{args.cases} cases of {tuple(args.shape)} voxels, torch threads "
              f"{args.threads}, model {Path(model).name}; label maps identical in all runs\n")
        print("| run | wall (s) | cases/min | load (s/case) | infer (s/case) "
              "| export (s/case) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, wall, t, _ in rows:
            print(f"| {name} | {wall:.1f} | {60 * args.cases / wall:.1f} | {t['load']:.2f} "
                  f"| {t['infer']:.2f} | {t['export']:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
