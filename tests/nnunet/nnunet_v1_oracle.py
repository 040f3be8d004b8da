"""Test oracle: a tiny nnU-Net **v1** model folder made by nnU-Net v1's own code, and its
predictor ``nnUNet_predict``.

nnU-Net v1 (PyPI ``nnunet``) is never imported by medinfer or by the tests' process: it
is installed with ``pip install --no-deps --target .venv-nnunetv1/site nnunet==1.7.1
medpy==0.5.2`` (its declared pins do not resolve today: ``sklearn``) and run with the
python of the v2 oracle (:func:`nnunet_oracle.oracle_python`, which already holds torch,
batchgenerators, SimpleITK, scikit-image, scikit-learn...) with that folder on
``PYTHONPATH``. Cached under ``.venv-nnunetv1/cache/<hash of this file>/``.

Model: dataset ``Task991_BlobV1`` (the two-channel blob cases of :mod:`nnunet_oracle`,
modalities ``CT`` and ``MRI``), planned and preprocessed by ``nnUNet_plan_and_preprocess``
(v1's planner ``ExperimentPlanner3D_v21``: transpose, target spacing, normalisation
schemes, intensity properties), the 3d_fullres plans shrunk by hand (patch, pooling,
features) so that CPU inference takes seconds; the network is nnU-Net v1's own
``nnUNetTrainerV2`` network with its own initialisation (``InitWeights_He``), written
with the trainer's own checkpoint writer (``save_checkpoint``: ``.model`` + ``.model.pkl``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
from nnunet_oracle import REPO, blob_case, clean_env, oracle_python, save_nifti

TASK_ID = 991
TASK = f"Task{TASK_ID}_BlobV1"
PINS = ("nnunet==1.7.1", "medpy==0.5.2")
SPACING = (0.8, 3.0, 0.8)
SHAPE = (44, 14, 40)
N_TRAIN = 5
TRAINER = "nnUNetTrainerV2"
PLANS = "nnUNetPlansv2.1"

_MAKE = r"""
import pickle, shutil, sys
import numpy as np, torch
from batchgenerators.utilities.file_and_folder_operations import join, load_pickle, save_pickle
from nnunet.training.network_training.nnUNetTrainerV2 import nnUNetTrainerV2

pre, out_base, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
plans_file = join(pre, "nnUNetPlansv2.1_plans_3D.pkl")
plans = load_pickle(plans_file)
stage = len(plans["plans_per_stage"]) - 1
st = plans["plans_per_stage"][stage]
# small patch and network (plans edited by hand, as nnU-Net's documentation describes)
st["patch_size"] = np.array([8, 24, 24])
st["pool_op_kernel_sizes"] = [[1, 2, 2], [2, 2, 2]]
st["conv_kernel_sizes"] = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
st["num_pool_per_axis"] = [1, 2, 2]
plans["base_num_features"] = 8
save_pickle(plans, plans_file)
torch.manual_seed(seed)
tr = nnUNetTrainerV2(plans_file, 0, output_folder=out_base, dataset_directory=pre,
                     batch_dice=True, stage=stage, unpack_data=False, deterministic=False,
                     fp16=False)
tr.initialize(training=False)
with torch.no_grad():  # its own He initialisation; wider class margins (fewer near-ties)
    tr.network.seg_outputs[-1].weight.mul_(20.0)
tr.save_checkpoint(join(tr.output_folder, "model_final_checkpoint.model"))
shutil.copy(plans_file, join(out_base, "plans.pkl"))
"""


def _key() -> str:
    h = hashlib.sha256(repr((PINS, TASK, SPACING, SHAPE, N_TRAIN, _MAKE)).encode())
    return h.hexdigest()[:16]


def site_dir() -> Path:
    """``PYTHONPATH`` entry holding nnU-Net v1 (installed on first use)."""
    site = REPO / ".venv-nnunetv1" / "site"
    if not (site / "nnunet" / "inference" / "predict_simple.py").is_file():
        py = oracle_python()
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(site), *PINS], check=True, env=clean_env())
    return site


def v1_env(root: Path) -> dict[str, str]:
    env = clean_env()
    env.update({
        "PYTHONPATH": str(site_dir()),
        "nnUNet_raw_data_base": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "RESULTS_FOLDER": str(root / "results"),
        "nnUNet_def_n_proc": "1",
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",  # v1's torch.load predates weights_only
    })
    return env


def _run(args: list[str], env: dict[str, str]) -> None:
    res = subprocess.run([str(oracle_python()), *args], env=env, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)[:300]} failed ({res.returncode}):\n"
                           f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def write_raw(root: Path, task: str = TASK, *, seed: int = 4321, name: str = "BlobV1",
              shape: tuple[int, int, int] = SHAPE,
              spacing: tuple[float, float, float] = SPACING, n_train: int = N_TRAIN) -> None:
    """nnU-Net v1 raw data of synthetic two-channel (CT, MRI) blob cases:
    ``<root>/raw/nnUNet_raw_data/<task>/{imagesTr,labelsTr,imagesTs}`` + ``dataset.json``."""
    raw = root / "raw" / "nnUNet_raw_data" / task
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    training = []
    for i in range(n_train):
        img, lab = blob_case(rng, shape, spacing)
        aff = np.diag([*spacing, 1.0])
        aff[:3, 3] = [-10.0 * i, 5.0, 3.0]
        for c in range(2):
            save_nifti(img[c], aff, raw / "imagesTr" / f"blob_{i:03d}_{c:04d}.nii.gz")
        save_nifti(lab, aff, raw / "labelsTr" / f"blob_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/blob_{i:03d}.nii.gz",
                         "label": f"./labelsTr/blob_{i:03d}.nii.gz"})
    (raw / "dataset.json").write_text(json.dumps({
        "name": name, "description": "synthetic", "tensorImageSize": "4D",
        "modality": {"0": "CT", "1": "MRI"},
        "labels": {"0": "background", "1": "bright", "2": "dark"},
        "numTraining": n_train, "numTest": 0, "training": training, "test": [],
    }, indent=2))


def build_v1_model() -> Path:
    """Plan, preprocess and initialise (or reuse) the v1 model; return its
    ``<RESULTS_FOLDER>/nnUNet/3d_fullres/<Task>/<Trainer>__<Plans>`` folder."""
    root = REPO / ".venv-nnunetv1" / "cache" / _key()
    folder = root / "results" / "nnUNet" / "3d_fullres" / TASK / f"{TRAINER}__{PLANS}"
    if (folder / "fold_0" / "model_final_checkpoint.model.pkl").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    env = v1_env(root)
    if not (root / "preprocessed" / TASK / "nnUNetPlansv2.1_plans_3D.pkl").is_file():
        write_raw(root)
        _run(["-m", "nnunet.experiment_planning.nnUNet_plan_and_preprocess", "-t",
              str(TASK_ID), "-tl", "1", "-tf", "1", "-pl2d", "None"], env)
    _run(["-c", _MAKE, str(root / "preprocessed" / TASK), str(folder), "0"], env)
    return folder


def v1_predict(folder: Path, in_dir: Path, out_dir: Path, *, tta: bool) -> None:
    """``nnUNet_predict -i in -o out -t <task> -tr nnUNetTrainerV2 -p nnUNetPlansv2.1
    -m 3d_fullres -f 0`` (v1's own predictor, CPU)."""
    root = folder.parents[4]
    args = ["-m", "nnunet.inference.predict_simple", "-i", str(in_dir), "-o", str(out_dir),
            "-t", TASK, "-tr", TRAINER, "-p", PLANS, "-m", "3d_fullres", "-f", "0",
            "--num_threads_preprocessing", "1", "--num_threads_nifti_save", "1"]
    if not tta:
        args.append("--disable_tta")
    _run(args, v1_env(root))
