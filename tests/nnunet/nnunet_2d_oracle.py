"""Test oracles for **2-D** nnU-Net configurations: a v1 ``2d`` and a v2 ``2d`` model folder,
each made by that nnU-Net version's own code, and their predictors.

* v1 (``Task992_BlobV1_2D``): the two-channel blob cases of :mod:`nnunet_v1_oracle`,
  planned and preprocessed by ``nnUNet_plan_and_preprocess -pl3d None`` (v1's
  ``ExperimentPlanner2D_v21``, ``PreprocessorFor2D``); the 2-D stage shrunk by hand
  (patch, pooling, features); the network is v1's own ``nnUNetTrainerV2`` 2-D network
  (``Conv2d``/``InstanceNorm2d``) with its own initialisation, written with the trainer's
  own checkpoint writer. Predicted with ``nnUNet_predict -m 2d``.
* v2 (``Dataset993_Blob2D``): the cases of :mod:`nnunet_oracle`, planned by
  ``nnUNetv2_plan_experiment`` (which plans a ``2d`` configuration for them), the ``2d``
  configuration shrunk by hand; the network is built and initialised by nnU-Net's own
  trainer (``nnUNetTrainer.initialize``), its mirroring axes set by the trainer's own
  ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``, plans/dataset copied and
  the checkpoint written as ``on_train_start`` / ``save_checkpoint`` do. Predicted with
  ``nnUNetv2_predict -c 2d``.

Each lives in its own cache folder (key: the scripts and settings here and the text of
the oracle module it builds on), next to the 3-D oracles', whose caches are untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import nnunet_oracle as v2o
import nnunet_v1_oracle as v1o
import numpy as np

V1_TASK_ID = 992
V1_TASK = f"Task{V1_TASK_ID}_BlobV1_2D"
V2_DATASET_ID = 993
V2_DATASET = f"Dataset{V2_DATASET_ID}_Blob2D"
V2_TRAINER = "nnUNetTrainer_1epoch"
PATCH_2D = (24, 24)

_MAKE_V1 = r"""
import shutil, sys
import numpy as np, torch
from batchgenerators.utilities.file_and_folder_operations import join, load_pickle, save_pickle
from nnunet.training.network_training.nnUNetTrainerV2 import nnUNetTrainerV2

pre, out_base, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
plans_file = join(pre, "nnUNetPlansv2.1_plans_2D.pkl")
plans = load_pickle(plans_file)
st = plans["plans_per_stage"][0]
# small patch and network (plans edited by hand, as nnU-Net's documentation describes)
st["patch_size"] = np.array([24, 24])
st["pool_op_kernel_sizes"] = [[2, 2], [2, 2]]
st["conv_kernel_sizes"] = [[3, 3], [3, 3], [3, 3]]
st["num_pool_per_axis"] = [2, 2]
plans["base_num_features"] = 8
save_pickle(plans, plans_file)
torch.manual_seed(seed)
tr = nnUNetTrainerV2(plans_file, 0, output_folder=out_base, dataset_directory=pre,
                     batch_dice=True, stage=0, unpack_data=False, deterministic=False,
                     fp16=False)
tr.initialize(training=False)
assert not tr.threeD
with torch.no_grad():  # its own He initialisation; wider class margins (fewer near-ties)
    tr.network.seg_outputs[-1].weight.mul_(20.0)
tr.save_checkpoint(join(tr.output_folder, "model_final_checkpoint.model"))
shutil.copy(plans_file, join(out_base, "plans.pkl"))
"""


_MAKE_V2 = r"""
import shutil, sys
import torch
from batchgenerators.utilities.file_and_folder_operations import join, save_json
from nnunetv2.run.run_training import get_trainer_from_args

torch.manual_seed(int(sys.argv[4]))
tr = get_trainer_from_args(sys.argv[1], sys.argv[2], 0, sys.argv[3], device=torch.device("cpu"))
tr.initialize()
da = tr.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
tr.inference_allowed_mirroring_axes = da[3]
assert tuple(tr.inference_allowed_mirroring_axes) == (0, 1)
with torch.no_grad():  # its own initialisation; wider class margins (fewer near-ties),
    tr.network.decoder.seg_layers[-1].weight.mul_(20.0)  # every label present on the
    tr.network.decoder.seg_layers[-1].bias.add_(torch.tensor([0.0, -4.0, 15.0]))  # test cases
save_json(tr.plans_manager.plans, join(tr.output_folder_base, "plans.json"), sort_keys=False)
save_json(tr.dataset_json, join(tr.output_folder_base, "dataset.json"), sort_keys=False)
shutil.copy(join(tr.preprocessed_dataset_folder_base, "dataset_fingerprint.json"),
            join(tr.output_folder_base, "dataset_fingerprint.json"))
tr.save_checkpoint(join(tr.output_folder, "checkpoint_final.pth"))
"""


def _key(*parts: str) -> str:
    h = hashlib.sha256(repr((V1_TASK, V2_DATASET, V2_TRAINER, PATCH_2D)).encode())
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()[:16]


# ================================================================================ v1
def build_v1_2d_model() -> Path:
    """Plan (2-D), preprocess and initialise (or reuse) the v1 2-D model; return its
    ``<RESULTS_FOLDER>/nnUNet/2d/<Task>/nnUNetTrainerV2__nnUNetPlansv2.1`` folder."""
    root = v1o.REPO / ".venv-nnunetv1" / "cache" / (
        "2d_" + _key(_MAKE_V1, Path(v1o.__file__).read_text()))
    folder = root / "results" / "nnUNet" / "2d" / V1_TASK / f"{v1o.TRAINER}__{v1o.PLANS}"
    if (folder / "fold_0" / "model_final_checkpoint.model.pkl").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    env = v1o.v1_env(root)
    pre = root / "preprocessed" / V1_TASK
    if not (pre / "nnUNetPlansv2.1_plans_2D.pkl").is_file():
        _write_v1_raw(root)
        v1o._run(["-m", "nnunet.experiment_planning.nnUNet_plan_and_preprocess", "-t",
                  str(V1_TASK_ID), "-tl", "1", "-tf", "1", "-pl3d", "None"], env)
    v1o._run(["-c", _MAKE_V1, str(pre), str(folder), "0"], env)
    return folder


def _write_v1_raw(root: Path) -> None:
    """The v1 oracle's raw task, renamed to this task."""
    v1o.write_raw(root)
    raw = root / "raw" / "nnUNet_raw_data"
    src, dst = raw / v1o.TASK, raw / V1_TASK
    if dst.exists():
        return
    src.rename(dst)
    meta = json.loads((dst / "dataset.json").read_text())
    meta["name"] = "BlobV1_2D"
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))


def _cached(run: Callable[[Path], None], root: Path, in_dir: Path, out_dir: Path,
            flags: str) -> None:
    """Run an oracle predictor once per input set: its outputs are kept in
    ``<root>/predictions/<hash of the input voxels, affines and flags>/`` (each oracle call
    costs a minute of interpreter start-up on a busy 2-core machine) and copied to
    ``out_dir``."""
    h = hashlib.sha256(flags.encode())
    for f in sorted(in_dir.glob("*.nii.gz")):
        img = nib.load(str(f))
        h.update(f.name.encode())
        h.update(np.ascontiguousarray(np.asarray(img.dataobj)).tobytes())
        h.update(np.asarray(img.affine, dtype=np.float64).tobytes())
    cache = root / "predictions" / h.hexdigest()[:16]
    if not (cache / "done").is_file():
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run(tmp)
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
        (cache / "done").write_text("")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in cache.glob("*.nii.gz"):
        shutil.copy(f, out_dir / f.name)


def v1_predict_2d(folder: Path, in_dir: Path, out_dir: Path, *, tta: bool) -> None:
    """``nnUNet_predict -i in -o out -t <task> -tr nnUNetTrainerV2 -p nnUNetPlansv2.1 -m 2d
    -f 0`` (v1's own predictor, CPU; outputs cached per input set)."""
    root = folder.parents[4]
    args = ["-m", "nnunet.inference.predict_simple", "-i", str(in_dir), "-o", str(out_dir),
            "-t", V1_TASK, "-tr", v1o.TRAINER, "-p", v1o.PLANS, "-m", "2d", "-f", "0",
            "--num_threads_preprocessing", "1", "--num_threads_nifti_save", "1"]
    if not tta:
        args.append("--disable_tta")

    def run(out: Path) -> None:
        args[args.index(str(out_dir))] = str(out)
        v1o._run(args, v1o.v1_env(root))

    _cached(run, root, in_dir, out_dir, f"v1 2d tta={tta}")


_FORWARD_V1 = r"""
import sys, numpy as np, torch
from nnunet.training.model_restore import restore_model
tr = restore_model(sys.argv[1] + ".pkl", sys.argv[1], train=False)
net = tr.network.eval()
net.do_ds = False
assert isinstance(net.conv_blocks_context[0].blocks[0].conv, torch.nn.Conv2d)
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], net(x).numpy())
"""


def v1_forward_2d(checkpoint: Path, x: np.ndarray, root: Path) -> np.ndarray:
    """nnU-Net v1's own network (``restore_model`` of the checkpoint, deep supervision off)
    on ``x`` ``(N, C, Y, X)``; the output is cached per checkpoint and input."""
    h = hashlib.sha256(checkpoint.read_bytes())
    h.update(np.ascontiguousarray(x).tobytes() + repr(x.shape).encode())
    cache = root / "forward" / f"{h.hexdigest()[:16]}.npy"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache.with_name(cache.stem + "_x.npy"), x)
        tmp = cache.with_name(cache.stem + "_tmp.npy")
        v1o._run(["-c", _FORWARD_V1, str(checkpoint), str(cache.with_name(cache.stem + "_x.npy")),
                  str(tmp)], v1o.v1_env(root))
        tmp.rename(cache)
    return np.load(cache)


# ================================================================================ v2
def _shrink_2d(plans_file: Path) -> None:
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"]["2d"]
    arch = cfg["architecture"]["arch_kwargs"]
    cfg["batch_size"] = 4
    cfg["patch_size"] = list(PATCH_2D)
    arch["n_stages"] = 3
    arch["features_per_stage"] = [8, 16, 32]
    arch["kernel_sizes"] = [[3, 3], [3, 3], [3, 3]]
    arch["strides"] = [[1, 1], [2, 2], [2, 2]]
    arch["n_conv_per_stage"] = [1, 1, 1]
    arch["n_conv_per_stage_decoder"] = [1, 1]
    plans_file.write_text(json.dumps(plans, indent=2))


def build_v2_2d_model() -> Path:
    """Plan and initialise (or reuse) the v2 2-D model; return its
    ``<Trainer>__nnUNetPlans__2d`` folder."""
    py = v2o.oracle_python()
    root = v2o.REPO / ".venv-nnunet" / "cache" / (
        "2d_" + _key(_MAKE_V2, repr(_shrink_2d.__code__.co_consts),
                     Path(v2o.__file__).read_text(), " ".join(v2o.NNUNET_PINS)))
    folder = root / "results" / V2_DATASET / f"{V2_TRAINER}__nnUNetPlans__2d"
    if (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    env = v2o.oracle_env(root)
    v2o._write_raw(root)
    raw = root / "raw"
    if not (raw / V2_DATASET).exists():
        (raw / v2o.DATASET).rename(raw / V2_DATASET)
    d = str(V2_DATASET_ID)
    v2o._run([v2o._tool("nnUNetv2_extract_fingerprint"), "-d", d, "-np", "1"], env)
    v2o._run([v2o._tool("nnUNetv2_plan_experiment"), "-d", d], env)
    plans_file = root / "preprocessed" / V2_DATASET / "nnUNetPlans.json"
    if "2d" not in json.loads(plans_file.read_text())["configurations"]:
        raise RuntimeError("nnUNetv2_plan_experiment planned no 2d configuration")
    _shrink_2d(plans_file)
    # the trainer's constructor looks at the preprocessed data (none is trained on)
    v2o._run([v2o._tool("nnUNetv2_preprocess"), "-d", d, "-c", "2d", "-np", "1"], env)
    v2o._run([str(py), "-c", _MAKE_V2, d, "2d", V2_TRAINER, "0"], env)
    return folder


def v2_predict_2d(folder: Path, in_dir: Path, out_dir: Path, *, tta: bool) -> None:
    """``nnUNetv2_predict -i in -o out -d <id> -c 2d -tr <trainer> -f 0 -device cpu``
    (outputs cached per input set)."""
    cmd = [v2o._tool("nnUNetv2_predict"), "-i", str(in_dir), "-o", str(out_dir),
           "-d", str(V2_DATASET_ID), "-c", "2d", "-tr", V2_TRAINER, "-f", "0",
           "-device", "cpu", "-npp", "1", "-nps", "1"]
    if not tta:
        cmd.append("--disable_tta")
    root = folder.parents[2]

    def run(out: Path) -> None:
        cmd[cmd.index(str(out_dir))] = str(out)
        v2o._run(cmd, v2o.oracle_env(root))

    _cached(run, root, in_dir, out_dir, f"v2 2d tta={tta}")


if __name__ == "__main__":
    import sys

    which = sys.argv[1] if len(sys.argv) > 1 else "both"
    if which in ("v1", "both"):
        print(build_v1_2d_model())
    if which in ("v2", "both"):
        print(build_v2_2d_model())
