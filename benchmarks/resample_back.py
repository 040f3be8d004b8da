"""Benchmark: model grid -> source grid (``to_source_grid``) against peers.

Case: 4-channel float32 probabilities on a 160^3 RAS model grid (1 mm) carried back to
an oblique (15 deg), LPS, 200^3 source grid (0.8 mm), trilinear, border clamp. Peers:
``scipy.ndimage.affine_transform`` (order=1, mode="nearest", one call per channel) and
MONAI ``SpatialResample`` (torch ``grid_sample``). Each method runs in a fresh child
process; peak memory is the rise of the child's peak RSS over its RSS just before the
first call (inputs already built), wall and CPU time the best of ``--repeats``
further calls (CPU time is less disturbed by a loaded machine; MONAI/torch may use
several threads). Also: a
pure reorientation (same spacing; MONAI still interpolates), and 1-channel
512x512x600 outputs (probabilities, linear; labels, nearest) against scipy (MONAI needs
~4 GB and ~30 s there, so it is left out of those rows).

Usage: ``.venv/bin/python benchmarks/resample_back.py [--quick]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _case(name: str, quick: bool):  # type: ignore[no-untyped-def]
    from scipy.spatial.transform import Rotation

    from medinfer.transforms import to_model_grid
    from medinfer.volume import Volume

    rot = Rotation.from_euler("xyz", [15.0, -10.0, 5.0], degrees=True).as_matrix()
    if name == "probs":
        n_src, sp, n_ch, target = (100 if quick else 200), 0.8, 4, 1.0
    elif name == "reorient":
        n_src, sp, n_ch, target = (100 if quick else 200), 1.0, 4, 1.0
    else:  # big-labels, big-probs
        n_src, sp, n_ch, target = 0, 0.0, 1, 1.0
    if name.startswith("big"):
        shape = (256, 256, 300) if quick else (512, 512, 600)
        spacing = np.array([0.7, 0.7, 0.5])
    else:
        shape = (n_src,) * 3
        spacing = np.array([sp] * 3)
    a = np.eye(4)
    a[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag(spacing)
    a[:3, 3] = [90.0, 100.0, -80.0]
    src = Volume(np.zeros((1, *shape), dtype=np.uint8), a)
    dummy, record = to_model_grid(src, "RAS", [target] * 3, interpolation="nearest")
    mshape = dummy.spatial_shape
    rng = np.random.default_rng(0)
    if name == "big-labels":
        arr = rng.integers(0, 4, size=(1, *mshape), dtype=np.uint8)
        interp = "nearest"
    else:
        arr = rng.random((n_ch, *mshape), dtype=np.float32)
        interp = "linear"
    return Volume(arr, dummy.affine), record, interp


def _run(method: str, name: str, quick: bool, repeats: int) -> dict[str, float]:
    vol, record, interp = _case(name, quick)
    src_aff = np.asarray(record.source_affine)
    shape = tuple(record.source_shape)
    m = np.linalg.solve(vol.affine, src_aff)
    if method == "monai":
        import torch
        from monai.transforms import SpatialResample

        t_in = torch.from_numpy(vol.array)
        from monai.data import MetaTensor

        mt = MetaTensor(t_in, affine=torch.from_numpy(vol.affine))
        sr = SpatialResample(
            mode="bilinear" if interp == "linear" else "nearest",
            padding_mode="border",
            align_corners=True,
            dtype=torch.float32,
        )
    def call() -> np.ndarray:
        if method == "medinfer":
            from medinfer.transforms import to_source_grid

            return to_source_grid(vol, record, interpolation=interp).array
        if method == "scipy":
            from scipy.ndimage import affine_transform

            order = 1 if interp == "linear" else 0
            return np.stack(
                [
                    affine_transform(
                        vol.array[c], m[:3, :3], m[:3, 3], output_shape=shape, order=order,
                        mode="nearest",
                    )
                    for c in range(vol.num_channels)
                ]
            )
        res = sr(mt, dst_affine=torch.from_numpy(src_aff), spatial_size=shape)
        return np.asarray(res)

    # peak memory: the first call, over the RSS with the inputs built
    base = _rss_mb()
    out = call()
    peak = max(0.0, _peak_mb() - base)
    checksum = float(np.mean(out, dtype=np.float64))
    del out
    # time: best of `repeats` further calls (first-touch page faults and machine load
    # inflate single timings on a shared machine)
    times, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = call()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        del out
    return {"time_s": min(times), "cpu_s": min(cpus), "peak_mb": peak, "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="half-size volumes")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per method (best)")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = _run(args.child[0], args.child[1], args.quick, args.repeats)
        sys.stdout.write(json.dumps(res) + "\n")
        return
    cases = {
        "probs": ("4x160^3 float32 RAS 1 mm -> 200^3 oblique LPS 0.8 mm, linear",
                  ("medinfer", "scipy", "monai")),
        "reorient": ("4x200^3 float32 RAS 1 mm -> 200^3 oblique LPS 1 mm, linear "
                     "(permutation + flips only)", ("medinfer", "scipy", "monai")),
        "big-probs": ("1x358x358x300 float32 RAS 1 mm -> 512x512x600 oblique LPS "
                      "0.7x0.7x0.5 mm, linear", ("medinfer", "scipy")),
        "big-labels": ("1x358x358x300 uint8 labels, same grids, nearest",
                       ("medinfer", "scipy")),
    }
    lines = ["| case | method | wall s | CPU s | peak MiB | wall / ours | CPU / ours | "
             "peak / ours |", "|---|---|---|---|---|---|---|---|"]
    for case, (desc, methods) in cases.items():
        results: dict[str, dict[str, float]] = {}
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, case, "--repeats",
                   str(args.repeats)]
            if args.quick:
                cmd.append("--quick")
            outp = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[method] = json.loads(outp.strip().splitlines()[-1])
        ours = results["medinfer"]
        for method, r in results.items():
            lines.append(
                f"| {case} | {method} | {r['time_s']:.2f} | {r['cpu_s']:.2f} | "
                f"{r['peak_mb']:.0f} | {r['time_s'] / ours['time_s']:.1f}x | "
                f"{r['cpu_s'] / ours['cpu_s']:.1f}x | "
                f"{r['peak_mb'] / max(ours['peak_mb'], 1.0):.1f}x |"
            )
            if abs(r["checksum"] - ours["checksum"]) > 1e-5 * max(1.0, abs(ours["checksum"])):
                lines.append(f"| {case} | {method} | results differ from ours: mean "
                             f"{r['checksum']:.6g} vs {ours['checksum']:.6g} | | | | | |")
        sys.stdout.write(f"{case}: {desc}\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
