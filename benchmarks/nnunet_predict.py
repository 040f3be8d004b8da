"""Benchmark: medinfer vs ``nnUNetv2_predict`` on the same nnU-Net v2 model folder and input.

Model: the tiny model that ``tests/nnunet`` trains with nnU-Net's own tools (two input
channels, CT + T2, anisotropic 0.8 x 3.0 x 0.8 mm), copied with its patch enlarged to
``16 x 64 x 64`` (the network is fully convolutional, both tools use the copy). With
``--classes K`` the copy gets K labels and a random-weight checkpoint written by
nnU-Net's own network builder (``get_network_from_plans``) in nnU-Net's checkpoint format
(memory scales with the classes; the weights do not matter for speed or memory).

Input: one synthetic case ``--shape`` at 0.9 x 2.6 x 0.9 mm, oblique (resampled by
both tools, separate-z rule).

Each run is a fresh process tree, timed from start to written output (wall), and its
memory sampled every 50 ms from /proc: the peak of the **sum** of RSS over the process
tree (nnU-Net starts worker processes for preprocessing and export: ``-npp 1 -nps 1``
here, the least it allows; each maps its own torch) and the peak RSS of the largest
single process (``ru_maxrss`` of the children). medinfer runs in one process:
``NnUNetPredictor`` (streaming) + ``medinfer.io`` read/write. Both on CPU, with the
same number of torch threads (``--threads``). The two label maps are compared (Dice per
label).

With ``--v1`` the rows compare nnU-Net **v1**: ``nnUNet_predict`` (nnU-Net 1.7.1, run as
``python -m nnunet.inference.predict_simple`` by the v1 oracle of
``tests/nnunet/nnunet_v1_oracle.py``) against ``medinfer-nnUNet_predict`` with the **same
flags** (``-i -o -t -tr -p -m -f 0 [--disable_tta]``), both as fresh process trees, on a
copy of the v1 test model with its patch enlarged to ``16 x 64 x 64``.

With ``--2d`` the models are the 2-D test models of ``tests/nnunet/nnunet_2d_oracle.py``
(v1 ``-m 2d``, v2 ``-c 2d``), copied with the patch enlarged to ``128 x 128``; nnU-Net
runs one 2-D window at a time slice by slice, medinfer stacks of slices.

Usage::

    MEDINFER_NNUNET_PYTHON=/path/to/python-with-nnunetv2 \\
        .venv/bin/python benchmarks/nnunet_predict.py --shape 160 48 160 --classes 3 60
    .venv/bin/python benchmarks/nnunet_predict.py --shape 160 48 160 --v1
    .venv/bin/python benchmarks/nnunet_predict.py --shape 160 48 160 --v1 --2d --tta off
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "nnunet"))

import nnunet_2d_oracle as oracle_2d  # noqa: E402
import nnunet_oracle as oracle  # noqa: E402
import nnunet_v1_oracle as oracle_v1  # noqa: E402

PATCH_3D = [16, 64, 64]
PATCH_2D = [128, 128]

_RANDOM_CKPT = """
import sys, torch, json
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
folder, k = sys.argv[1], int(sys.argv[2])
plans = json.load(open(folder + '/plans.json'))
arch = plans['configurations'][sys.argv[3]]['architecture']
torch.manual_seed(0)
net = get_network_from_plans(arch['network_class_name'], arch['arch_kwargs'],
                             arch['_kw_requires_import'], 2, k, deep_supervision=False)
p = folder + '/fold_0/checkpoint_final.pth'
ck = torch.load(p, weights_only=False)
ck['network_weights'] = net.state_dict()
torch.save(ck, p)
"""


def _tree_rss_kib(root: int) -> tuple[int, int]:
    """(sum of RSS, max RSS) in KiB over ``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            ppid = int(parts[1])
            with open(f"/proc/{d}/statm") as f:
                pages = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = pages * os.sysconf("SC_PAGE_SIZE") // 1024
    todo, total, biggest = [root], 0, 0
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        biggest = max(biggest, rss.get(p, 0))
        todo.extend(children.get(p, []))
    return total, biggest


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s, b = _tree_rss_kib(proc.pid)
            peak[0], peak[1] = max(peak[0], s), max(peak[1], b)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{err.decode()[-3000:]}")
    return {"wall_s": wall, "tree_peak_mib": peak[0] / 1024, "proc_peak_mib": peak[1] / 1024}


def model_copy(base: Path, work: Path, classes: int, config: str = "3d_fullres",
               patch: list[int] = PATCH_3D) -> Path:
    dst = work / f"m{classes}" / base.parents[0].name / base.name
    dst.parent.mkdir(parents=True)
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns("validation", "*.png",
                                                             "checkpoint_best.pth"))
    plans = json.loads((dst / "plans.json").read_text())
    plans["configurations"][config]["patch_size"] = patch
    (dst / "plans.json").write_text(json.dumps(plans))
    if classes != 3:
        ds = json.loads((dst / "dataset.json").read_text())
        ds["labels"] = {"background": 0, **{f"c{i}": i for i in range(1, classes)}}
        (dst / "dataset.json").write_text(json.dumps(ds))
        subprocess.run([str(oracle.oracle_python()), "-c", _RANDOM_CKPT, str(dst),
                        str(classes), config], check=True, capture_output=True)
    return dst


_MEDINFER = """
import sys, numpy as np, torch
torch.set_num_threads(int(sys.argv[4]))
from medinfer import io
from medinfer.formats.nnunet import NnUNetPredictor
from medinfer.volume import Volume
from pathlib import Path
inp, out, model, tta = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[5] == "1"
p = NnUNetPredictor(model, device="cpu", tta=tta)
ch = [io.load(inp / f"case_{c:04d}.nii.gz") for c in range(2)]
vol = Volume(np.concatenate([v.array for v in ch]), ch[0].affine, {})
io.save(p.predict(vol).label, out / "case.nii.gz")
"""


def _dice_row(ln: np.ndarray, lm: np.ndarray) -> dict[str, float]:
    dices, sizes = [], []
    for v in np.unique(ln):
        if v == 0:
            continue
        s = np.sum(ln == v) + np.sum(lm == v)
        dices.append(2 * np.sum((ln == v) & (lm == v)) / s)
        sizes.append(int(np.sum(ln == v)))
    big = [d for d, n in zip(dices, sizes, strict=True) if n >= 100]
    return {"min_dice": min(big) if big else float("nan"),
            "mean_dice": float(np.average(dices, weights=sizes)) if dices else float("nan"),
            "same": float(np.mean(ln == lm))}


def run_v1(shape: tuple[int, int, int], threads: int, ttas: list[bool],
           two_d: bool = False) -> None:
    """v1 rows: ``nnUNet_predict`` vs ``medinfer-nnUNet_predict``, same flags."""
    import pickle

    import nibabel as nib

    base = oracle_2d.build_v1_2d_model() if two_d else oracle_v1.build_v1_model()
    task = oracle_2d.V1_TASK if two_d else oracle_v1.TASK
    patch = PATCH_2D if two_d else PATCH_3D
    spacing = (0.9, 2.6, 0.9)
    img, _ = oracle.blob_case(np.random.default_rng(5), shape, spacing)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inp = work / "in"
        inp.mkdir()
        aff = oracle.oblique_affine(spacing, 12.0)
        for c in range(2):
            oracle.save_nifti(img[c], aff, inp / f"case_{c:04d}.nii.gz")
        results = work / "results"
        model = results / base.relative_to(base.parents[3])
        shutil.copytree(base, model)
        for f in [model / "plans.pkl", *model.glob("fold_*/*.model.pkl")]:
            obj = pickle.loads(f.read_bytes())  # our own test model (trusted)
            plans = obj["plans"] if "plans" in obj else obj
            stage = max(plans["plans_per_stage"])
            plans["plans_per_stage"][stage]["patch_size"] = np.array(patch)
            f.write_bytes(pickle.dumps(obj))
        env = {**oracle_v1.v1_env(work), "RESULTS_FOLDER": str(results),
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        flags = ["-t", task, "-tr", oracle_v1.TRAINER, "-p", oracle_v1.PLANS,
                 "-m", "2d" if two_d else "3d_fullres", "-f", "0"]
        for tta in ttas:
            o_nn, o_mi = work / f"v1nn{tta}", work / f"v1mi{tta}"
            extra = [] if tta else ["--disable_tta"]
            r_nn = measure([str(oracle.oracle_python()), "-m", "nnunet.inference.predict_simple",
                            "-i", str(inp), "-o", str(o_nn), *flags, *extra], env)
            r_mi = measure([str(Path(sys.executable).parent / "medinfer-nnUNet_predict"),
                            "-i", str(inp), "-o", str(o_mi), *flags, *extra], env)
            ln = np.asarray(nib.load(str(o_nn / "case.nii.gz")).dataobj)
            lm = np.asarray(nib.load(str(o_mi / "case.nii.gz")).dataobj)
            rows.append({"tta": tta, "nn": r_nn, "mi": r_mi, **_dice_row(ln, lm)})
    print(f"\nnnU-Net v1 {'2d' if two_d else '3d_fullres'}: input {shape} at {spacing} mm, "
          f"oblique, 2 channels; patch {'x'.join(map(str, patch))}; "
          f"CPU, OMP_NUM_THREADS={threads}\n")
    print("| TTA | nnUNet_predict wall (s) | medinfer-nnUNet_predict wall (s) | speed-up | "
          "nnU-Net peak RSS, tree / largest proc (MiB) | medinfer peak RSS, tree (MiB) | "
          "memory ratio | min Dice | voxel-weighted Dice | equal voxels |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        nn, mi = r["nn"], r["mi"]
        print(f"| {'on' if r['tta'] else 'off'} | {nn['wall_s']:.1f} | {mi['wall_s']:.1f} | "
              f"{nn['wall_s'] / mi['wall_s']:.2f}x | {nn['tree_peak_mib']:.0f} / "
              f"{nn['proc_peak_mib']:.0f} | {mi['tree_peak_mib']:.0f} | "
              f"{mi['tree_peak_mib'] / nn['tree_peak_mib']:.2f} | {r['min_dice']:.4f} | "
              f"{r['mean_dice']:.4f} | {100 * r['same']:.3f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 48, 160])
    ap.add_argument("--classes", type=int, nargs="+", default=[3])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tta", choices=["on", "off", "both"], default="both")
    ap.add_argument("--v1", action="store_true", help="nnU-Net v1 rows instead of v2")
    ap.add_argument("--2d", dest="two_d", action="store_true",
                    help="2-D configurations (v1 -m 2d, v2 -c 2d) instead of 3d_fullres")
    a = ap.parse_args()
    if a.v1:
        run_v1((a.shape[0], a.shape[1], a.shape[2]), a.threads,
               {"on": [True], "off": [False], "both": [False, True]}[a.tta], a.two_d)
        return
    base = oracle_2d.build_v2_2d_model() if a.two_d else oracle.build_model()
    config, patch = ("2d", PATCH_2D) if a.two_d else ("3d_fullres", PATCH_3D)
    spacing = (0.9, 2.6, 0.9)
    rng = np.random.default_rng(5)
    img, _ = oracle.blob_case(rng, tuple(a.shape), spacing)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inp = work / "in"
        inp.mkdir()
        aff = oracle.oblique_affine(spacing, 12.0)
        for c in range(2):
            oracle.save_nifti(img[c], aff, inp / f"case_{c:04d}.nii.gz")
        ttas = {"on": [True], "off": [False], "both": [False, True]}[a.tta]
        for k in a.classes:
            model = model_copy(base, work, k, config, patch)
            env = {**oracle.oracle_env(model.parents[2]), "OMP_NUM_THREADS": str(a.threads),
                   "MKL_NUM_THREADS": str(a.threads)}
            for tta in ttas:
                o_nn, o_mi = work / f"nn{k}{tta}", work / f"mi{k}{tta}"
                o_nn.mkdir()
                o_mi.mkdir()
                cmd = [str(oracle.oracle_python().parent / "nnUNetv2_predict_from_modelfolder"),
                       "-i", str(inp), "-o", str(o_nn), "-m", str(model), "-f", "0",
                       "-device", "cpu", "-npp", "1", "-nps", "1"]
                if not tta:
                    cmd.append("--disable_tta")
                r_nn = measure(cmd, env)
                r_mi = measure([sys.executable, "-c", _MEDINFER, str(inp), str(o_mi), str(model),
                                str(a.threads), "1" if tta else "0"], env)
                import nibabel as nib

                ln = np.asarray(nib.load(str(o_nn / "case.nii.gz")).dataobj)
                lm = np.asarray(nib.load(str(o_mi / "case.nii.gz")).dataobj)
                dices, sizes = [], []
                for v in np.unique(ln):
                    if v == 0:
                        continue
                    s = np.sum(ln == v) + np.sum(lm == v)
                    dices.append(2 * np.sum((ln == v) & (lm == v)) / s)
                    sizes.append(int(np.sum(ln == v)))
                # random-weight many-class models give some labels a handful of voxels:
                # report the minimum over labels with >= 100 voxels and the weighted mean
                big = [d for d, n in zip(dices, sizes, strict=True) if n >= 100]
                rows.append({"classes": k, "tta": tta, "nn": r_nn, "mi": r_mi,
                             "min_dice": min(big) if big else float("nan"),
                             "mean_dice": float(np.average(dices, weights=sizes))
                             if dices else float("nan"),
                             "same": float(np.mean(ln == lm))})
    print(f"\n{config}: input {tuple(a.shape)} at {spacing} mm, oblique, 2 channels; "
          f"patch {'x'.join(map(str, patch))}; "
          f"CPU, {a.threads} torch threads; maxrss of children "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB\n")
    print("| classes | TTA | nnUNetv2_predict wall (s) | medinfer wall (s) | speed-up | "
          "nnU-Net peak RSS, tree / largest proc (MiB) | medinfer peak RSS (MiB) | "
          "memory ratio (medinfer / nnU-Net tree) | min Dice (labels >= 100 vox) | "
          "voxel-weighted Dice | equal voxels |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        nn, mi = r["nn"], r["mi"]
        print(f"| {r['classes']} | {'on' if r['tta'] else 'off'} | {nn['wall_s']:.1f} | "
              f"{mi['wall_s']:.1f} | {nn['wall_s'] / mi['wall_s']:.2f}x | "
              f"{nn['tree_peak_mib']:.0f} / {nn['proc_peak_mib']:.0f} | "
              f"{mi['tree_peak_mib']:.0f} | {mi['tree_peak_mib'] / nn['tree_peak_mib']:.2f} | "
              f"{r['min_dice']:.4f} | {r['mean_dice']:.4f} | {100 * r['same']:.3f} % |")


if __name__ == "__main__":
    main()
