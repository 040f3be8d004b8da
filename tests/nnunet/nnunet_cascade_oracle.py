"""Test oracle: an nnU-Net **v2** cascade (``3d_lowres`` -> ``3d_cascade_fullres``) made by
nnunetv2's own trainer class, and ``nnUNetv2_predict`` with ``-prev_stage_predictions``.

The plans are the v2 oracle's (:mod:`nnunet_oracle`: planned by ``nnUNetv2_plan_experiment``
on ``Dataset990_Blob``, shrunk) with the two configurations nnU-Net's planner adds when it
plans a cascade (``ExperimentPlanner.plan_experiment``): ``3d_lowres`` (the ``3d_fullres``
configuration at a coarser in-plane spacing, its own ``data_identifier``, ``next_stage``
``3d_cascade_fullres``) and ``3d_cascade_fullres`` (``inherits_from`` ``3d_fullres``,
``previous_stage`` ``3d_lowres``). For each of the two configurations nnunetv2's own
``nnUNetTrainer`` is built and initialised (``initialize``: the network from the plans, for
the cascade with ``determine_num_input_channels`` = channels + foreground labels; nnU-Net's
own weight initialisation), its mirroring axes set by its own
``configure_rotation_dummyDA_mirroring_and_inital_patch_size``, and written with its own
``save_checkpoint``. No training (weights do not matter for equality; the training data
loader class, which ``initialize`` infers from preprocessed training data, is not looked
up); the segmentation
head is scaled up (wider class margins) and, for the cascade, the first convolution's
weights on the one-hot channels (the previous stage visibly steers the result).

nnunetv2 runs in the oracle venv (:func:`nnunet_oracle.oracle_python`); cached under
``.venv-nnunet/cache/cascade_<hash>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from nnunet_oracle import (
    DATASET,
    NNUNET_PINS,
    REPO,
    _run,
    build_model,
    oracle_env,
    oracle_python,
)

TRAINER = "nnUNetTrainer"
LOWRES_SPACING_FACTOR = 1.6  # in-plane spacing of 3d_lowres = 1.6 x that of 3d_fullres

_MAKE = r"""
import sys, torch
from batchgenerators.utilities.file_and_folder_operations import load_json
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as mod
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

# the last step of initialize() picks the training-data loader class from the preprocessed
# training data, which is not made here (no training)
mod.infer_dataset_class = lambda folder: None
plans, ds, cfg, out = load_json(sys.argv[1]), load_json(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.manual_seed(int(sys.argv[5]))
tr = nnUNetTrainer(plans, cfg, 0, ds, device=torch.device("cpu"))
tr.initialize()
axes = tr.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[-1]
tr.inference_allowed_mirroring_axes = axes
with torch.no_grad():
    tr.network.decoder.seg_layers[-1].weight.mul_(20.0)
    if cfg == "3d_cascade_fullres":
        conv = tr.network.encoder.stages[0][0].convs[0].conv
        conv.weight[:, len(ds["channel_names"]):].mul_(6.0)
tr.save_checkpoint(out)
"""


def _key(base: Path) -> str:
    h = hashlib.sha256(repr((NNUNET_PINS, LOWRES_SPACING_FACTOR, _MAKE)).encode())
    h.update((base / "plans.json").read_bytes())
    return h.hexdigest()[:16]


def cascade_results() -> Path:
    """``nnUNet_results`` holding ``Dataset990_Blob/nnUNetTrainer__nnUNetPlans__3d_lowres``
    and ``...__3d_cascade_fullres`` (built on first use, then cached)."""
    base = build_model()
    cache = Path(os.environ.get("MEDINFER_NNUNET_CACHE", REPO / ".venv-nnunet" / "cache"))
    root = cache / f"cascade_{_key(base)}"
    results = root / "results"
    ds_dir = results / DATASET
    if (ds_dir / f"{TRAINER}__nnUNetPlans__3d_cascade_fullres" / "fold_0" /
            "checkpoint_final.pth").is_file():
        return results
    plans = json.loads((base / "plans.json").read_text())
    full = plans["configurations"]["3d_fullres"]
    low = json.loads(json.dumps(full))
    low["spacing"] = [full["spacing"][0]] + [s * LOWRES_SPACING_FACTOR
                                             for s in full["spacing"][1:]]
    low["data_identifier"] = "nnUNetPlans_3d_lowres"
    low["batch_dice"] = False
    low["next_stage"] = "3d_cascade_fullres"
    plans["configurations"]["3d_lowres"] = low
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres",
                                                    "previous_stage": "3d_lowres"}
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "plans.json").write_text(json.dumps(plans, indent=2))
    shutil.copyfile(base / "dataset.json", work / "dataset.json")
    env = oracle_env(root)
    for seed, cfg in enumerate(("3d_lowres", "3d_cascade_fullres")):
        folder = ds_dir / f"{TRAINER}__nnUNetPlans__{cfg}"
        (folder / "fold_0").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "plans.json", folder / "plans.json")
        shutil.copyfile(work / "dataset.json", folder / "dataset.json")
        _run([str(oracle_python()), "-c", _MAKE, str(work / "plans.json"),
              str(work / "dataset.json"), cfg, str(folder / "fold_0" / "checkpoint_final.pth"),
              str(seed)], env)
    return results


def nnunet_predict_cascade(results: Path, cfg: str, in_dir: Path, out_dir: Path, *,
                           tta: bool, prev: Path | None = None) -> None:
    """``nnUNetv2_predict -i in -o out -d 990 -c <cfg> -tr nnUNetTrainer -f 0 -device cpu
    [-prev_stage_predictions prev]`` (nnunetv2's own predictor)."""
    cmd = [str(oracle_python().parent / "nnUNetv2_predict"), "-i", str(in_dir), "-o",
           str(out_dir), "-d", DATASET, "-c", cfg, "-tr", TRAINER, "-f", "0", "-device", "cpu",
           "-npp", "1", "-nps", "1"]
    if prev is not None:
        cmd += ["-prev_stage_predictions", str(prev)]
    if not tta:
        cmd.append("--disable_tta")
    _run(cmd, {**oracle_env(results.parent), "nnUNet_results": str(results)})


def cached_cascade_predictions(in_dir: Path) -> dict[str, Path]:
    """nnUNetv2_predict outputs on ``in_dir``, cached under a hash of the input content:
    ``lowres`` (``-c 3d_lowres``, TTA off), ``cascade`` (``-c 3d_cascade_fullres
    -prev_stage_predictions <lowres>``, TTA off) and ``cascade_tta`` (same, TTA on)."""
    import tempfile

    from nnunet_v1_cascade_oracle import content_key

    results = cascade_results()
    out = results.parent / "predictions" / content_key(in_dir, "v2 cascade")
    names = {k: out / k for k in ("lowres", "cascade", "cascade_tta")}
    if (out / "done").is_file():
        return names
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    nnunet_predict_cascade(results, "3d_lowres", in_dir, tmp / "lowres", tta=False)
    for key, tta in (("cascade", False), ("cascade_tta", True)):
        nnunet_predict_cascade(results, "3d_cascade_fullres", in_dir, tmp / key, tta=tta,
                               prev=tmp / "lowres")
    (tmp / "done").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return names


# ======================================================================= regions (v2)
REGION_LABELS = {"background": 0, "blobs": [1, 2], "dark": [2]}
REGION_CLASS_ORDER = [1, 2]


def region_results() -> Path:
    """``nnUNet_results`` with a region-based v2 model: ``Dataset990_Blob/nnUNetTrainer__
    nnUNetPlans__3d_fullres`` whose ``dataset.json`` has region labels (``blobs`` = 1 + 2,
    ``dark`` = 2) and ``regions_class_order`` [1, 2] (sigmoid heads); nnunetv2's own
    trainer builds and initialises it (as :func:`cascade_results`). Cached."""
    base = build_model()
    cache = Path(os.environ.get("MEDINFER_NNUNET_CACHE", REPO / ".venv-nnunet" / "cache"))
    h = hashlib.sha256(repr((_key(base), REGION_LABELS, REGION_CLASS_ORDER)).encode())
    root = cache / f"regions_{h.hexdigest()[:16]}"
    folder = root / "results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    if (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return root / "results"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    ds = json.loads((base / "dataset.json").read_text())
    ds["labels"] = REGION_LABELS
    ds["regions_class_order"] = REGION_CLASS_ORDER
    (folder / "dataset.json").write_text(json.dumps(ds, indent=2))
    shutil.copyfile(base / "plans.json", folder / "plans.json")
    _run([str(oracle_python()), "-c", _MAKE, str(folder / "plans.json"),
          str(folder / "dataset.json"), "3d_fullres",
          str(folder / "fold_0" / "checkpoint_final.pth"), "7"], oracle_env(root))
    return root / "results"


def cached_region_predictions(in_dir: Path) -> Path:
    """``nnUNetv2_predict -c 3d_fullres`` (TTA off) of the region model on ``in_dir``,
    cached under a hash of the input content."""
    from nnunet_v1_cascade_oracle import content_key

    results = region_results()
    out = results.parent / "predictions" / content_key(in_dir, "v2 regions")
    if not (out / "done").is_file():
        shutil.rmtree(out, ignore_errors=True)
        nnunet_predict_cascade(results, "3d_fullres", in_dir, out, tta=False)
        (out / "done").write_text("ok")
    return out
