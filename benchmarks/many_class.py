"""Benchmark: a many-class model end to end -- medinfer streaming vs full-volume paths.

Same random-weight network (conv 3^3 1->8, LeakyReLU, conv 1^3 8->K), same scan, same
model grid (the scan is resampled to 1.5 mm isotropic, medinfer ``to_model_grid``),
same windows (64^3, overlap 0.25, Gaussian), same work after the network: softmax ->
probabilities resampled back to the scan grid (trilinear) -> argmax label map.

Methods, each in a **fresh subprocess** (no allocator or import state shared):

- ``monai``: MONAI ``sliding_window_inference`` (full-volume logits) + MONAI
  post-processing ``Activations(softmax=True)`` -> ``SpatialResample`` (bilinear, to the
  scan's affine and shape) -> ``AsDiscrete(argmax=True)``;
- ``medinfer-full``: :meth:`medinfer.inference.Predictor.predict` (the exact full-volume
  path: full logits, softmax, ``to_source_grid``, argmax);
- ``medinfer-stream``: :func:`medinfer.inference.streaming.predict_streaming` (slab
  accumulation, slab-wise export; float32 accumulation, identical labels to
  ``medinfer-full``).

Peak memory = VmHWM - VmRSS baseline after building the input and a warm-up window
(``/proc/self/clear_refs`` = 5 resets the peak), as in ``benchmarks/sliding_window.py``.
Labels of every method are compared with ``medinfer-full`` (fraction of equal voxels).

Usage::

    .venv/bin/python benchmarks/many_class.py --size 128 --classes 100

256^3 x 100 classes needs 6.7 GB for the float32 logits alone (MONAI holds them and
the probabilities at once, > 14 GB): run it only on a machine that has the memory.
Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PATCH = (64, 64, 64)
OVERLAP = 0.25
MODEL_SPACING = (1.5, 1.5, 1.5)


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(key)


def _net(k: int) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.LeakyReLU(),
        torch.nn.Conv3d(8, k, 1),
    ).eval()


def _scan(size: int) -> Any:
    from medinfer.volume import Volume

    rng = np.random.default_rng(0)
    shape = (size, size, int(size * 0.75))
    arr = rng.normal(size=shape).astype(np.float32)
    aff = np.diag([1.2, 1.2, 1.6, 1.0])
    aff[:3, :3] = aff[:3, :3] @ np.diag([-1.0, -1.0, 1.0])  # LPS-like voxel axes
    return Volume(arr, aff, {})


def _card(k: int) -> Any:
    from medinfer.models import ModelCard

    return ModelCard.from_dict({
        "name": "many", "labels": {i: {"name": f"c{i}"} for i in range(k)},
        "input": {"orientation": "RAS", "spacing": list(MODEL_SPACING),
                  "normalization": {"method": "none"}},
        "inference": {"patch_size": list(PATCH), "overlap": OVERLAP, "blending": "gaussian"},
        "weights": {"format": "torchscript", "file": "unused.ts"},
    })


def child(method: str, size: int, k: int, out: Path) -> None:
    import torch

    from medinfer.inference import Predictor
    from medinfer.inference.streaming import predict_streaming

    torch.set_num_threads(max(1, int(os.environ.get("BENCH_THREADS", "2"))))
    net = _net(k)
    vol = _scan(size)
    card = _card(k)
    pred = Predictor(card, net, device="cpu", tta=False)
    with torch.inference_mode():
        net(torch.zeros(1, 1, *PATCH))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _kib("VmRSS")
    t0 = time.perf_counter()
    if method == "medinfer-stream":
        labels = predict_streaming(pred, vol).label.array[0]
    elif method == "medinfer-full":
        labels = pred.predict(vol).label.array[0]
    else:
        from monai.inferers import sliding_window_inference
        from monai.transforms import Activations, AsDiscrete, SpatialResample

        image, _ = pred.preprocess(vol)
        x = torch.from_numpy(image.array[None])
        with torch.no_grad():
            logits = sliding_window_inference(x, PATCH, 1, net, overlap=OVERLAP,
                                              mode="gaussian")[0]
            probs = Activations(softmax=True)(logits)
            del logits
            from monai.data import MetaTensor

            probs = MetaTensor(probs, affine=torch.as_tensor(image.affine))
            back = SpatialResample(mode="bilinear", padding_mode="border", align_corners=True)(
                probs, dst_affine=torch.as_tensor(vol.affine),
                spatial_size=vol.spatial_shape)
            del probs
            labels = AsDiscrete(argmax=True)(back)[0].numpy().astype(np.uint8)
    wall = time.perf_counter() - t0
    peak = _kib("VmHWM") - base
    np.save(out / f"{method}.npy", np.asarray(labels, dtype=np.uint8))
    print(json.dumps({"method": method, "wall_s": wall, "peak_mib": peak / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--methods", nargs="+",
                    default=["monai", "medinfer-full", "medinfer-stream"])
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.size, a.classes, Path(a.out))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in a.methods:
            res = subprocess.run([sys.executable, __file__, "--child", m, "--size", str(a.size),
                                  "--classes", str(a.classes), "--out", tmp],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{m} failed")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        ref = np.load(Path(tmp) / "medinfer-full.npy") if "medinfer-full" in a.methods else None
        for r in rows:
            lab = np.load(Path(tmp) / f"{r['method']}.npy")
            r["agree"] = float(np.mean(lab == ref)) if ref is not None else float("nan")
    shape = (a.size, a.size, int(a.size * 0.75))
    print(f"\n{a.classes} classes, scan {shape} (1.2x1.2x1.6 mm) -> model grid 1.5 mm, "
          f"patch {PATCH}, overlap {OVERLAP}, CPU, "
          f"{os.environ.get('BENCH_THREADS', '2')} torch threads\n")
    monai = next((r for r in rows if r["method"] == "monai"), None)
    print("| method | wall (s) | peak RSS (MiB) | wall / MONAI | peak / MONAI | "
          "labels = medinfer-full |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        rw = r["wall_s"] / monai["wall_s"] if monai else float("nan")
        rp = r["peak_mib"] / monai["peak_mib"] if monai else float("nan")
        print(f"| {r['method']} | {r['wall_s']:.1f} | {r['peak_mib']:.0f} | {rw:.2f} | "
              f"{rp:.3f} | {100 * r['agree']:.4f} % |")


if __name__ == "__main__":
    main()
