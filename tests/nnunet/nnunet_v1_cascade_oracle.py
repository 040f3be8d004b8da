"""Test oracle: a tiny nnU-Net **v1** cascade (``3d_lowres`` + ``3d_cascade_fullres``) made
by nnU-Net v1's own code, and v1's own predictor ``nnUNet_predict`` for it.

nnU-Net v1 runs as in :mod:`nnunet_v1_oracle` (``nnunet==1.7.1`` with ``--no-deps`` on the
``PYTHONPATH`` of the v2 oracle's python, never imported by the tests' process).

Dataset ``Task992_BlobCascadeV1``: the two-channel blob cases of :mod:`nnunet_oracle`
(modalities ``CT`` and ``MRI``), a little larger than Task991's. Planning uses v1's own
steps of ``nnUNet_plan_and_preprocess`` (``crop``, ``DatasetAnalyzer``,
``ExperimentPlanner3D_v21.plan_experiment``) with one change: the planner's GPU memory
reference (``Generic_UNet.use_this_for_batch_size_computation_3D``) is lowered, so that
the patch it plans covers far less than a case and the planner itself adds a
``3d_lowres`` stage (stage 0, its own spacing, patch and pooling) to the ``3d_fullres``
stage 1: a real two-stage ``plans.pkl``. The preprocessing of training data is skipped
(prediction needs none). ``base_num_features`` is set to 8 afterwards (CPU speed).

Models, each with nnU-Net v1's own network and initialisation (``InitWeights_He``)
written by the trainer's own checkpoint writer (``save_checkpoint``: ``.model`` +
``.model.pkl``), on CPU:

- ``3d_lowres/<Task>/nnUNetTrainerV2__nnUNetPlansv2.1`` (``nnUNetTrainerV2``, stage 0);
- ``3d_cascade_fullres/<Task>/nnUNetTrainerV2CascadeFullRes__nnUNetPlansv2.1``
  (``nnUNetTrainerV2CascadeFullRes``, stage 1, input channels = modalities + the one-hot
  previous-stage classes; the first convolution's weights on those channels are scaled
  up so that the previous stage visibly steers the result).

Cached under ``.venv-nnunetv1/cache/<hash>/`` (with :mod:`nnunet_v1_oracle`'s cache).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from nnunet_oracle import REPO
from nnunet_v1_oracle import PINS, _run, v1_env, write_raw

TASK_ID = 992
TASK = f"Task{TASK_ID}_BlobCascadeV1"
SPACING = (0.8, 3.0, 0.8)
SHAPE = (64, 16, 60)
N_TRAIN = 4
TRAINER = "nnUNetTrainerV2"
CASCADE_TRAINER = "nnUNetTrainerV2CascadeFullRes"
PLANS = "nnUNetPlansv2.1"
#: the planner's memory reference (default 520000000), lowered for a small patch
VRAM_REFERENCE = 800_000

_PLAN = r"""
import shutil, sys
from batchgenerators.utilities.file_and_folder_operations import join, load_json, maybe_mkdir_p
from nnunet.experiment_planning.DatasetAnalyzer import DatasetAnalyzer
from nnunet.experiment_planning.experiment_planner_baseline_3DUNet_v21 import \
    ExperimentPlanner3D_v21
from nnunet.experiment_planning.utils import crop
from nnunet.network_architecture.generic_UNet import Generic_UNet
from nnunet.paths import nnUNet_cropped_data, nnUNet_raw_data, preprocessing_output_dir

task, ref = sys.argv[1], int(sys.argv[2])
Generic_UNet.use_this_for_batch_size_computation_3D = ref
crop(task, False, 1)
cropped = join(nnUNet_cropped_data, task)
out = join(preprocessing_output_dir, task)
DatasetAnalyzer(cropped, overwrite=False, num_processes=1).analyze_dataset(True)
maybe_mkdir_p(out)
shutil.copy(join(cropped, "dataset_properties.pkl"), out)
shutil.copy(join(nnUNet_raw_data, task, "dataset.json"), out)
planner = ExperimentPlanner3D_v21(cropped, out)
planner.plan_experiment()
"""

_MAKE = r"""
import shutil, sys
import numpy as np, torch
from batchgenerators.utilities.file_and_folder_operations import join, load_pickle, save_pickle
from nnunet.training.network_training.nnUNetTrainerV2 import nnUNetTrainerV2
from nnunet.training.network_training.nnUNetTrainerV2_CascadeFullRes import \
    nnUNetTrainerV2CascadeFullRes

pre, lowres_dir, cascade_dir = sys.argv[1], sys.argv[2], sys.argv[3]
plans_file = join(pre, "nnUNetPlansv2.1_plans_3D.pkl")
plans = load_pickle(plans_file)
assert len(plans["plans_per_stage"]) == 2, plans["plans_per_stage"]
plans["base_num_features"] = 8
save_pickle(plans, plans_file)
for cls, out, stage, seed in ((nnUNetTrainerV2, lowres_dir, 0, 0),
                              (nnUNetTrainerV2CascadeFullRes, cascade_dir, 1, 1)):
    torch.manual_seed(seed)
    tr = cls(plans_file, 0, output_folder=out, dataset_directory=pre, batch_dice=True,
             stage=stage, unpack_data=False, deterministic=False, fp16=False)
    tr.initialize(training=False)
    with torch.no_grad():  # wider class margins (fewer near-ties)
        tr.network.seg_outputs[-1].weight.mul_(20.0)
        if stage == 1:  # the previous stage's one-hot channels steer the result
            first = tr.network.conv_blocks_context[0].blocks[0].conv.weight
            first[:, plans["num_modalities"]:].mul_(6.0)
    tr.save_checkpoint(join(tr.output_folder, "model_final_checkpoint.model"))
    shutil.copy(plans_file, join(out, "plans.pkl"))
"""


def _key() -> str:
    h = hashlib.sha256(repr((PINS, TASK, SPACING, SHAPE, N_TRAIN, VRAM_REFERENCE, _PLAN,
                             _MAKE)).encode())
    return h.hexdigest()[:16]


def results_root() -> Path:
    """``RESULTS_FOLDER`` of the cascade models (built on first use, then cached)."""
    root = REPO / ".venv-nnunetv1" / "cache" / _key()
    base = root / "results" / "nnUNet"
    lowres = base / "3d_lowres" / TASK / f"{TRAINER}__{PLANS}"
    cascade = base / "3d_cascade_fullres" / TASK / f"{CASCADE_TRAINER}__{PLANS}"
    if (cascade / "fold_0" / "model_final_checkpoint.model.pkl").is_file():
        return root / "results"
    root.mkdir(parents=True, exist_ok=True)
    env = v1_env(root)
    pre = root / "preprocessed" / TASK
    if not (pre / "nnUNetPlansv2.1_plans_3D.pkl").is_file():
        write_raw(root, TASK, seed=992, name="BlobCascadeV1", shape=SHAPE, spacing=SPACING,
                  n_train=N_TRAIN)
        _run(["-c", _PLAN, TASK, str(VRAM_REFERENCE)], env)
    _run(["-c", _MAKE, str(pre), str(lowres), str(cascade)], env)
    return root / "results"


def v1_predict_cascade(results: Path, in_dir: Path, out_dir: Path, *, tta: bool,
                       model: str = "3d_cascade_fullres", lowres: Path | None = None) -> None:
    """``nnUNet_predict -i in -o out -t <task> -m <model> -f 0`` (v1's own predictor, CPU;
    for the cascade without ``-l`` it predicts the ``3d_lowres`` stage first)."""
    args = ["-m", "nnunet.inference.predict_simple", "-i", str(in_dir), "-o", str(out_dir),
            "-t", TASK, "-tr", TRAINER, "-ctr", CASCADE_TRAINER, "-p", PLANS, "-m", model,
            "-f", "0", "--num_threads_preprocessing", "1", "--num_threads_nifti_save", "1"]
    if lowres is not None:
        args += ["-l", str(lowres)]
    if not tta:
        args.append("--disable_tta")
    _run(args, v1_env(results.parent))


def cached_v1_predictions(in_dir: Path, *, tta: bool) -> Path:
    """Output folder of :func:`v1_predict_cascade` on ``in_dir`` (cascade without ``-l``:
    ``<case>.nii.gz`` and ``3d_lowres_predictions/<case>.nii.gz``), cached next to the
    models under a hash of the input files (v1 on CPU takes minutes with TTA)."""
    results = results_root()
    return _cached(results.parent / "predictions", in_dir, repr(tta),
                   lambda o: v1_predict_cascade(results, in_dir, o, tta=tta))


def content_key(in_dir: Path, tag: str) -> str:
    """Hash of the images in ``in_dir`` (voxels and affines, not the gzip bytes, which
    hold a time stamp) and ``tag``."""
    h = hashlib.sha256(tag.encode())
    for f in sorted(in_dir.iterdir()):
        img = nib.load(str(f))
        h.update(f.name.encode())
        h.update(np.ascontiguousarray(img.get_fdata()).tobytes())
        h.update(np.asarray(img.affine).tobytes())
    return h.hexdigest()[:16]


def _cached(base: Path, in_dir: Path, tag: str, make: Callable[[Path], None]) -> Path:
    import shutil
    import tempfile

    out = base / content_key(in_dir, tag)
    if (out / "done").is_file():
        return out
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base))
    make(tmp / "out")
    (tmp / "out" / "done").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    (tmp / "out").rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


# ============================================================== region-based v1 model
REGION_TRAINER = "nnUNetTrainerV2BraTSRegions"

_MAKE_REGIONS = r"""
import shutil, sys
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunet.training.network_training.competitions_with_custom_Trainers.BraTS2020.\
nnUNetTrainerV2BraTSRegions import nnUNetTrainerV2BraTSRegions

pre, out = sys.argv[1], sys.argv[2]
plans_file = join(pre, "nnUNetPlansv2.1_plans_3D.pkl")
torch.manual_seed(3)
tr = nnUNetTrainerV2BraTSRegions(plans_file, 0, output_folder=out, dataset_directory=pre,
                                 batch_dice=True, stage=0, unpack_data=False,
                                 deterministic=False, fp16=False)
tr.initialize(training=False)
with torch.no_grad():  # wider margins around the 0.5 threshold
    tr.network.seg_outputs[-1].weight.mul_(20.0)
tr.save_checkpoint(join(tr.output_folder, "model_final_checkpoint.model"))
shutil.copy(plans_file, join(out, "plans.pkl"))
"""


def region_model() -> Path:
    """A region-based v1 model (``nnUNetTrainerV2BraTSRegions``: sigmoid outputs for the
    regions (1, 2, 3), (2, 3), (3,), ``regions_class_order`` (1, 2, 3)) on the plans of
    :mod:`nnunet_v1_oracle`'s ``Task991_BlobV1``, initialised by the trainer and written by
    its checkpoint writer; returns its ``<RESULTS_FOLDER>/nnUNet/3d_fullres/<Task>/
    nnUNetTrainerV2BraTSRegions__nnUNetPlansv2.1`` folder (cached)."""
    from nnunet_v1_oracle import TASK as TASK991
    from nnunet_v1_oracle import build_v1_model

    base = build_v1_model()
    pre = base.parents[4] / "preprocessed" / TASK991
    h = hashlib.sha256(repr((PINS, _MAKE_REGIONS)).encode())
    h.update((base / "plans.pkl").read_bytes())
    root = REPO / ".venv-nnunetv1" / "cache" / f"regions_{h.hexdigest()[:16]}"
    folder = root / "results" / "nnUNet" / "3d_fullres" / TASK991 / f"{REGION_TRAINER}__{PLANS}"
    if (folder / "fold_0" / "model_final_checkpoint.model.pkl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    _run(["-c", _MAKE_REGIONS, str(pre), str(folder)], v1_env(root))
    return folder


def v1_predict_regions(folder: Path, in_dir: Path, out_dir: Path, *, tta: bool) -> None:
    """``nnUNet_predict -t Task991_BlobV1 -tr nnUNetTrainerV2BraTSRegions -m 3d_fullres``."""
    from nnunet_v1_oracle import TASK as TASK991

    args = ["-m", "nnunet.inference.predict_simple", "-i", str(in_dir), "-o", str(out_dir),
            "-t", TASK991, "-tr", REGION_TRAINER, "-p", PLANS, "-m", "3d_fullres", "-f", "0",
            "--num_threads_preprocessing", "1", "--num_threads_nifti_save", "1"]
    if not tta:
        args.append("--disable_tta")
    _run(args, v1_env(folder.parents[4]))


def cached_v1_region_predictions(in_dir: Path, *, tta: bool) -> Path:
    """Output folder of :func:`v1_predict_regions` on ``in_dir``, cached per input."""
    folder = region_model()
    return _cached(folder.parents[4] / "predictions", in_dir, repr(tta),
                   lambda o: v1_predict_regions(folder, in_dir, o, tta=tta))
