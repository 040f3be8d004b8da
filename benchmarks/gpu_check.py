"""GPU check: CUDA / AMP results against CPU results, and engine speed on the GPU.

One prepared script for a CUDA machine (issue 17 item 17). Without CUDA it says so and
exits 0 (nothing to check).

1. **Labels**: each bundled model on a real scan of its kind -- ``demo-brain`` on the
   bundled T1 sample (``samples/t1_sample.nii.gz``), ``demo-nodules`` on the CT of
   ``tests/data/ct`` -- through :class:`medinfer.inference.Predictor` on CPU (float32),
   on CUDA in float32 (AMP off) and on CUDA with AMP (float16 autocast, the default on
   CUDA). Reported: fraction of voxels whose label differs from the CPU label map, Dice
   per foreground label against CPU, and the largest absolute difference of the
   probabilities / heat map.
2. **Speed**: the demo-brain network (MONAI UNet) on the sample's model grid, the
   engine (:func:`medinfer.inference.sliding_window_inference`) against MONAI's
   ``sliding_window_inference`` with the same patch (64^3), overlap (0.5), Gaussian
   blending and window batch (4), on CUDA, float32 and AMP. Median wall time of
   ``--repeats`` runs after one warm-up (``torch.cuda.synchronize`` around each run) and
   peak CUDA memory (``torch.cuda.max_memory_allocated``); the outputs are compared.
3. **nnU-Net**: timed only when ``nnunetv2`` is importable in this Python (it is not a
   medinfer dependency): nnU-Net's own ``predict_sliding_window_return_logits`` is not
   reachable without a trained model folder, so the row says "not installed" otherwise.

Usage::

    .venv/bin/python benchmarks/gpu_check.py [--repeats 3] [--json out.json]

Prints a Markdown table. Exit code 0 when the checks ran (or there is no CUDA), 1 when a
CUDA label map differs from the CPU one in more than ``--max-diff`` of the voxels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASES = (
    ("demo-brain", REPO / "samples" / "t1_sample.nii.gz"),
    ("demo-nodules", REPO / "tests" / "data" / "ct" / "ct_head_brain_atlas_1mm.nii.gz"),
)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def _scores(pred: Any) -> np.ndarray | None:
    vol = pred.probabilities if pred.probabilities is not None else pred.heatmap
    return None if vol is None else np.asarray(vol.array, dtype=np.float32)


def check_labels(max_diff: float) -> tuple[list[dict[str, Any]], bool]:
    """CPU vs CUDA float32 vs CUDA AMP on each bundled model."""
    import torch

    from medinfer.inference import Predictor
    from medinfer.io import load
    from medinfer.models import load_model, resolve_model

    rows: list[dict[str, Any]] = []
    ok = True
    for name, scan in CASES:
        card, model_dir = resolve_model(name)
        volume = load(scan)
        results = {}
        for run, device, amp in (("cpu", "cpu", False), ("cuda-fp32", "cuda", False),
                                 ("cuda-amp", "cuda", True)):
            predictor = Predictor(card, load_model(card, model_dir, device), device=device,
                                  save_probabilities=True, amp=amp)
            t0 = time.perf_counter()
            pred = predictor.predict(volume)
            if device == "cuda":
                torch.cuda.synchronize()
            results[run] = (pred, time.perf_counter() - t0)
        ref = results["cpu"][0].label.array[0]
        ref_scores = _scores(results["cpu"][0])
        for run in ("cuda-fp32", "cuda-amp"):
            pred, seconds = results[run]
            lab = pred.label.array[0]
            frac = float(np.mean(lab != ref))
            scores = _scores(pred)
            dice = {int(v): round(_dice(ref == v, lab == v), 5)
                    for v in card.labels if v != 0 and (np.any(ref == v) or np.any(lab == v))}
            rows.append({
                "model": name, "run": run, "voxels_differing": frac,
                "dice_vs_cpu": dice,
                "max_abs_score_diff": (None if scores is None or ref_scores is None
                                       else float(np.abs(scores - ref_scores).max())),
                "seconds": round(seconds, 3), "cpu_seconds": round(results["cpu"][1], 3),
            })
            ok = ok and frac <= max_diff
    return rows, ok


def time_engines(repeats: int) -> list[dict[str, Any]]:
    """medinfer engine vs MONAI sliding_window_inference on CUDA (demo-brain network)."""
    import torch
    from monai.inferers import sliding_window_inference as monai_swi

    from medinfer.inference import Predictor, sliding_window_inference
    from medinfer.io import load
    from medinfer.models import load_model, resolve_model

    card, model_dir = resolve_model("demo-brain")
    net = load_model(card, model_dir, "cuda")
    image, _ = Predictor(card, net, device="cuda").preprocess(load(CASES[0][1]))
    x = torch.from_numpy(np.ascontiguousarray(image.array[None], dtype=np.float32))
    patch = tuple(card.inference.patch_size)
    rows = []
    outputs: dict[str, torch.Tensor] = {}
    for amp in (False, True):
        def ours(amp: bool = amp) -> torch.Tensor:
            return sliding_window_inference(x, net, patch, overlap=0.5, blending="gaussian",
                                            batch_size=4, device="cuda", amp=amp)

        def monai(amp: bool = amp) -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                return monai_swi(x.cuda(), patch, 4, lambda t: net(t).float(), overlap=0.5,
                                 mode="gaussian", sigma_scale=0.125).float()

        for method, fn in (("medinfer", ours), ("monai", monai)):
            fn()  # warm-up (cuDNN kernel selection)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            outputs[f"{method}-{amp}"] = out.float().cpu()
            rows.append({"method": method, "amp": amp, "median_s": statistics.median(times),
                         "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20})
        diff = float((outputs[f"medinfer-{amp}"] - outputs[f"monai-{amp}"]).abs().max())
        rows[-1]["max_abs_diff_vs_medinfer"] = diff
    try:
        import nnunetv2  # noqa: F401
        rows.append({"method": "nnunet", "note": "nnunetv2 importable: time it with "
                     "benchmarks/nnunet_predict.py (needs a trained model folder)"})
    except ImportError:
        rows.append({"method": "nnunet", "note": "not installed here (not a medinfer "
                     "dependency); not timed"})
    return rows


def _table(labels: list[dict[str, Any]], speed: list[dict[str, Any]]) -> str:
    lines = ["| model | run | voxels differing from CPU | Dice vs CPU | max abs score diff "
             "| s (CPU s) |", "|---|---|---|---|---|---|"]
    for r in labels:
        lines.append(f"| {r['model']} | {r['run']} | {r['voxels_differing']:.2e} | "
                     f"{r['dice_vs_cpu']} | {r['max_abs_score_diff']} | "
                     f"{r['seconds']} ({r['cpu_seconds']}) |")
    lines += ["", "| engine | AMP | median s | peak CUDA MB | max abs diff vs medinfer |",
              "|---|---|---|---|---|"]
    for r in speed:
        if "note" in r:
            lines.append(f"| {r['method']} | - | - | - | {r['note']} |")
            continue
        lines.append(f"| {r['method']} | {r['amp']} | {r['median_s']:.3f} | "
                     f"{r['peak_cuda_mb']:.0f} | {r.get('max_abs_diff_vs_medinfer', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-diff", type=float, default=1e-3,
                        help="largest tolerated fraction of voxels whose label differs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.stdout.write("gpu_check: no CUDA device (torch.cuda.is_available() is False, "
                         f"torch {torch.__version__}); nothing to check\n")
        return 0
    sys.stdout.write(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
                     "\n")
    labels, ok = check_labels(args.max_diff)
    speed = time_engines(args.repeats)
    sys.stdout.write(_table(labels, speed) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps({"labels": labels, "speed": speed}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
