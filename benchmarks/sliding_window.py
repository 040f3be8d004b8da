"""Benchmark: medinfer's sliding-window engine vs MONAI ``sliding_window_inference`` (CPU).

Same network (random weights, fixed seed), same input volume, same patch size, overlap,
Gaussian blending and window batch size. Each method runs in a **fresh subprocess** so
that allocator state and import costs do not leak between them; in that process:

1. import, build the network, build the input ``(1, 1, *shape)`` float32;
2. one warm-up network call on a single window (oneDNN kernel selection);
3. reset the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5) and read the
   resident set size (VmRSS) as the baseline;
4. run the method once (wall time, ``time.perf_counter``; CPU time of all threads,
   ``getrusage``, which is less disturbed by other processes on a shared machine);
5. peak memory = VmHWM (peak RSS since the reset) - baseline. This counts everything
   the run allocates (output, normalisation map, windows, network activations), which
   ``tracemalloc`` cannot see for torch tensors.

MONAI runs under ``torch.no_grad()`` (its documented use); medinfer under its own
``torch.inference_mode``. The outputs are compared (max absolute difference).

Scenarios:

- ``unet``: the demo-brain architecture (MONAI UNet, channels 16-32-64-128, strides 2,
  no residual units, 4 classes; random weights) on 192x224x192 with its 64^3 windows:
  network-bound, the realistic case;
- ``many-classes``: a light 2-layer conv net with 64 output classes on the same volume:
  blending/aggregation-bound, shows the engine's own overhead.

Usage::

    .venv/bin/python benchmarks/sliding_window.py            # both scenarios
    .venv/bin/python benchmarks/sliding_window.py --scenario unet --overlap 0.25

Linux only (reads /proc). Prints a table with ratios ours / MONAI (< 1 is better).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _build_net(scenario: str) -> Any:
    import torch

    torch.manual_seed(0)
    if scenario == "unet":
        from monai.networks.nets import UNet

        return UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=(16, 32, 64, 128),
                    strides=(2, 2, 2), num_res_units=0).eval()
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 64, 1)
    ).eval()


def worker(args: argparse.Namespace) -> None:
    """Run one method once and print a JSON line with seconds and MiB."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    net = _build_net(args.scenario)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, *args.shape, generator=gen)
    patch = (args.patch,) * 3
    with torch.inference_mode():
        net(torch.zeros(1, 1, *patch))  # warm-up
    if args.method == "monai":
        from monai.inferers import sliding_window_inference as monai_swi

        def run() -> Any:
            with torch.no_grad():
                return monai_swi(x, patch, args.batch_size, net, overlap=args.overlap,
                                 mode="gaussian", sigma_scale=0.125)
    else:
        from medinfer.inference import sliding_window_inference

        def run() -> Any:
            return sliding_window_inference(x, net, patch, overlap=args.overlap,
                                            blending="gaussian", sigma_scale=0.125,
                                            batch_size=args.batch_size, device="cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = _status_kib("VmHWM") - base
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if args.save:
        np.save(args.save, out.numpy())
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak / 1024,
                      "shape": list(out.shape)}))


def _spawn(method: str, scenario: str, args: argparse.Namespace,
           save: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", method, "--scenario", scenario,
           "--shape", *map(str, args.shape), "--patch", str(args.patch),
           "--overlap", str(args.overlap), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]
    if save is not None:
        cmd += ["--save", str(save)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{method} worker failed:\n{res.stderr}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=["unet", "many-classes", "all"], default="all")
    p.add_argument("--shape", type=int, nargs=3, default=[192, 224, 192])
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default: on a shared machine several threads "
                   "spin-wait on each other and the timings become noise")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per method, alternating order; the minimum time is reported")
    p.add_argument("--worker", choices=["monai", "medinfer"], help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(argparse.Namespace(**{**vars(args), "method": args.worker}))
        return

    import numpy as np

    scenarios = ["unet", "many-classes"] if args.scenario == "all" else [args.scenario]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in scenarios:
            runs: dict[str, list[dict[str, Any]]] = {"monai": [], "medinfer": []}
            for r in range(args.repeats):
                order = ("monai", "medinfer") if r % 2 == 0 else ("medinfer", "monai")
                for method in order:
                    save = Path(tmp) / f"{method}.npy" if r == 0 else None
                    runs[method].append(_spawn(method, scenario, args, save))
            res = {
                m: {"seconds": min(x["seconds"] for x in v),
                    "cpu_seconds": min(x["cpu_seconds"] for x in v),
                    "peak_mib": statistics.median(x["peak_mib"] for x in v)}
                for m, v in runs.items()
            }
            diff = float(np.max(np.abs(np.load(Path(tmp) / "monai.npy")
                                       - np.load(Path(tmp) / "medinfer.npy"))))
            rows.append((scenario, res, diff))
    shape = "x".join(map(str, args.shape))
    print(f"\nsliding window, CPU ({args.threads} threads), volume 1x1x{shape}, patch "
          f"{args.patch}^3, overlap {args.overlap}, gaussian, window batch {args.batch_size}; "
          f"best of {args.repeats} alternating runs (wall and CPU time), median peak RSS "
          "growth\n")
    head = (f"| {'scenario':<13} | {'MONAI s':>8} | {'ours s':>8} | {'wall ratio':>10} | "
            f"{'MONAI cpu s':>11} | {'ours cpu s':>10} | {'cpu ratio':>9} | "
            f"{'MONAI peak MiB':>14} | {'ours peak MiB':>13} | {'memory ratio':>12} | "
            f"{'max abs diff':>12} |")
    print(head)
    print("|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|")
    for scenario, res, diff in rows:
        m, o = res["monai"], res["medinfer"]
        print(f"| {scenario:<13} | {m['seconds']:8.2f} | {o['seconds']:8.2f} | "
              f"{o['seconds'] / m['seconds']:10.2f} | {m['cpu_seconds']:11.2f} | "
              f"{o['cpu_seconds']:10.2f} | {o['cpu_seconds'] / m['cpu_seconds']:9.2f} | "
              f"{m['peak_mib']:14.0f} | "
              f"{o['peak_mib']:13.0f} | {o['peak_mib'] / max(m['peak_mib'], 1e-9):12.2f} | "
              f"{diff:12.1e} |")


if __name__ == "__main__":
    main()
