"""Test oracle: a tiny nnU-Net v2 model folder made by nnU-Net's own tools, and its predictor.

nnunetv2 is never imported here: it lives in a separate virtual environment (it must
never be needed by medinfer at run time) and is driven through its command-line tools
(``nnUNetv2_plan_experiment``, ``nnUNetv2_preprocess``, ``nnUNetv2_train``,
``nnUNetv2_predict``) in subprocesses.

Environment: ``MEDINFER_NNUNET_PYTHON`` (a python with nnunetv2 installed) if set, else
``<repo>/.venv-nnunet/bin/python``, created on first use with
``python -m venv .venv-nnunet && .venv-nnunet/bin/pip install torch==2.13.0 nnunetv2==2.6.0``
(nnunetv2 >= 2.6.2 pulls timm -> a CUDA torchvision that breaks beside the CPU torch).
The trained model folder is cached in ``.venv-nnunet/cache/<hash of this file>/`` so
that later test sessions reuse it (the venv folder is ignored by git).

Dataset ``Dataset990_Blob``: two channels, ``CT`` (CT normalisation with the fingerprint's
foreground statistics) and ``T2`` (z-score; ``use_mask_for_norm`` becomes true because
the non-zero "body" ellipsoid fills well under 3/4 of the image), anisotropic spacing
(0.8, 3.0, 0.8) mm along the NIfTI voxel axes (so nnU-Net transposes the anisotropic axis
first and resamples with the separate-z rule), one bright blob per case as label 1 and a
dark blob as label 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATASET_ID = 990
DATASET = f"Dataset{DATASET_ID:03d}_Blob"
TRAINER = "nnUNetTrainer_1epoch"
CONFIG = "3d_fullres"
SPACING = (0.8, 3.0, 0.8)
SHAPE = (44, 14, 40)
N_TRAIN = 6
NNUNET_PINS = ("torch==2.13.0", "nnunetv2==2.6.0")
ITERATIONS = 60
SEEDS = (0, 1, 2, 3, 4)
_TRAIN = """
import random, sys, numpy, torch
from nnunetv2.run.run_training import get_trainer_from_args
seed = int(sys.argv[6])
random.seed(seed)
numpy.random.seed(seed)
torch.manual_seed(seed)
trainer = get_trainer_from_args(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4],
                                device=torch.device("cpu"))
trainer.num_iterations_per_epoch = int(sys.argv[5])
trainer.num_val_iterations_per_epoch = 5
trainer.run_training()
"""


_FOREIGN_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PIP_TARGET",
                "PIP_PREFIX", "PIP_USER", "PIP_REQUIRE_VIRTUALENV")


def clean_env() -> dict[str, str]:
    """The environment without variables that make another interpreter's packages visible.

    Some libraries (and tests) leave ``PYTHONPATH`` pointing at medinfer's own venv; pip
    in the oracle venv would then count torch and numpy as installed and skip them.
    """
    return {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}


def _venv_complete(py: Path) -> bool:
    if not py.is_file() or not (py.parent / "nnUNetv2_predict").exists():
        return False
    probe = subprocess.run([str(py), "-c", "import numpy, torch, nnunetv2"], env=clean_env(),
                           capture_output=True)
    return probe.returncode == 0


def oracle_python() -> Path:
    """Python of the nnU-Net environment (created on first use, see module docstring)."""
    env = os.environ.get("MEDINFER_NNUNET_PYTHON")
    if env:
        return Path(env)
    venv = REPO / ".venv-nnunet"
    py = venv / "bin" / "python"
    if not _venv_complete(py):
        cenv = clean_env()
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True,
                       env=cenv)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True,
                       env=cenv)
        subprocess.run([str(py), "-m", "pip", "install", "-q", NNUNET_PINS[0]], check=True,
                       env=cenv)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *NNUNET_PINS], check=True,
                       env=cenv)
        if not _venv_complete(py):
            raise RuntimeError(f"the nnU-Net oracle venv {venv} is incomplete after install")
    return py


def oracle_env(root: Path) -> dict[str, str]:
    env = clean_env()
    env.update({
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_compile": "f",
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
    })
    return env


def _tool(name: str) -> str:
    return str(oracle_python().parent / name)


def _run(cmd: list[str], env: dict[str, str]) -> None:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n"
                           f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def blob_case(rng: np.random.Generator, shape: tuple[int, int, int] = SHAPE,
              spacing: tuple[float, float, float] = SPACING
              ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: image ``(2, I, J, K)`` float32 (CT, T2) and label ``(I, J, K)``.

    Coordinates are in mm along the voxel axes, so shapes of the objects do not depend on
    the spacing: a body ellipsoid (zero outside, in both channels), a bright blob
    (label 1) and a dark blob (label 2) inside it.
    """
    sp = np.asarray(spacing)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp, strict=True)],
                        indexing="ij")
    ext = np.asarray(shape) * sp
    centre = ext / 2
    radii = ext * np.array([0.44, 0.46, 0.44])
    body = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1
    label = np.zeros(shape, np.uint8)
    ct = np.where(body, 40.0, 0.0) + rng.normal(0, 15, shape) * body
    t2 = np.where(body, 300.0, 0.0) + rng.normal(0, 30, shape) * body
    for value, ct_val, t2_val in ((1, 250.0, 900.0), (2, -150.0, 60.0)):
        c = centre + rng.uniform(-0.4, 0.4, 3) * radii * 0.6
        r = rng.uniform(3.5, 6.0)
        blob = sum((g - cc) ** 2 for g, cc in zip(grids, c, strict=True)) <= r * r
        blob &= body
        label[blob] = value
        ct[blob] = ct_val + rng.normal(0, 15, int(blob.sum()))
        t2[blob] = t2_val + rng.normal(0, 30, int(blob.sum()))
    return np.stack([ct, t2]).astype(np.float32), label


def oblique_affine(spacing: tuple[float, float, float], angle_deg: float = 17.0,
                   flip: bool = True) -> np.ndarray:
    """Voxel -> RAS affine: rotated about an oblique axis, anisotropic, LPS-like flips."""
    ax = np.array([0.3, 0.5, 0.81])
    ax /= np.linalg.norm(ax)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    rot = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)
    if flip:
        rot = rot @ np.diag([-1.0, -1.0, 1.0])
    a = np.eye(4)
    a[:3, :3] = rot * np.asarray(spacing)[None, :]
    a[:3, 3] = [12.5, -30.25, 7.0]
    return a


def save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _write_raw(root: Path) -> None:
    raw = root / "raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    for i in range(N_TRAIN):
        img, lab = blob_case(rng)
        aff = np.diag([*SPACING, 1.0])
        aff[:3, 3] = [-10.0 * i, 5.0, 3.0]
        for c in range(2):
            save_nifti(img[c], aff, raw / "imagesTr" / f"blob_{i:03d}_{c:04d}.nii.gz")
        save_nifti(lab, aff, raw / "labelsTr" / f"blob_{i:03d}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "T2"},
        "labels": {"background": 0, "bright": 1, "dark": 2},
        "numTraining": N_TRAIN,
        "file_ending": ".nii.gz",
    }, indent=2))


def _shrink_plans(plans_file: Path) -> None:
    """Small patch and network so that CPU training takes seconds (plans edited by hand,
    as nnU-Net's documentation describes for custom configurations)."""
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"][CONFIG]
    arch = cfg["architecture"]["arch_kwargs"]
    n = 3
    cfg["batch_size"] = 2
    # nnU-Net array axes: the anisotropic axis first (after transpose_forward)
    cfg["patch_size"] = [8, 16, 16]
    arch["n_stages"] = n
    arch["features_per_stage"] = [8, 16, 32]
    arch["kernel_sizes"] = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    arch["strides"] = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    arch["n_conv_per_stage"] = [1, 1, 1]
    arch["n_conv_per_stage_decoder"] = [1, 1]
    plans_file.write_text(json.dumps(plans, indent=2))


# The inputs the tests predict (test_nnunet.py, test_nnunet_cli.py): name -> shape, spacing
# (mm), oblique angle (deg) or None, drawn in order from one default_rng(seed).
TEST_CASES: dict[str, tuple[tuple[int, int, int], tuple[float, float, float], float | None]] = {
    # on the training grid (axis-aligned, the training spacing)
    "aligned": ((44, 14, 40), SPACING, None),
    # oblique, LPS-like flips, other anisotropic spacing: resampling with separate z
    "oblique": ((37, 18, 30), (0.95, 2.2, 1.1), 17.0),
}
TEST_SEED, TEST_ORIGIN = 99, (4.0, -7.0, 11.0)
CLI_CASES: dict[str, tuple[tuple[int, int, int], tuple[float, float, float], float | None]] = {
    "case_a": ((40, 13, 36), (0.8, 3.0, 0.8), None),
    "case_b": ((33, 16, 29), (0.95, 2.2, 1.1), 17.0),
    "case_c": ((30, 12, 30), (1.0, 3.3, 0.9), -23.0),
}
CLI_SEED = 7


def write_cases(d: Path, cases: dict[str, tuple[tuple[int, int, int],
                                              tuple[float, float, float], float | None]],
                seed: int, origin: tuple[float, float, float] | None = None) -> Path:
    """Write each case of ``cases`` (name -> shape, spacing mm, oblique angle deg or None) as two
    channel files ``NAME_0000/0001.nii.gz`` in ``d``: blob images drawn in order from one
    ``default_rng(seed)``; axis-aligned cases get ``origin`` (mm) when given. Returns ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (shape, spacing, angle) in cases.items():
        img, _ = blob_case(rng, shape, spacing)
        if angle is None:
            aff = np.diag([*spacing, 1.0])
            if origin is not None:
                aff[:3, 3] = origin
        else:
            aff = oblique_affine(spacing, angle)
        for c in range(2):
            save_nifti(img[c], aff, d / f"{name}_{c:04d}.nii.gz")
    return d


def _paints_every_label(folder: Path, root: Path) -> bool:
    """Whether nnU-Net's own prediction (TTA off and on) of every test input holds labels 1
    and 2: a model that misses one makes the comparisons trivial. Training is seeded, but
    CPU kernels differ between machines, so a short run can end near such a model."""
    check = root / "check"
    write_cases(check / "in", TEST_CASES, TEST_SEED, TEST_ORIGIN)
    write_cases(check / "in", CLI_CASES, CLI_SEED)
    for tta in (False, True):
        out = check / f"out_tta{int(tta)}"
        nnunet_predict(folder, check / "in", out, tta=tta)
        for name in (*TEST_CASES, *CLI_CASES):
            lab = np.asarray(nib.load(str(out / f"{name}.nii.gz")).dataobj)
            if not all(np.any(lab == v) for v in (1, 2)):
                return False
    return True


def _cache_key() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(" ".join(NNUNET_PINS).encode())
    return h.hexdigest()[:16]


def build_model(work: Path | None = None) -> Path:
    """Train (or reuse) the tiny model; return its ``<Trainer>__<Plans>__<config>`` folder."""
    py = oracle_python()
    cache = Path(os.environ.get("MEDINFER_NNUNET_CACHE", REPO / ".venv-nnunet" / "cache"))
    root = cache / _cache_key() if work is None else work
    folder = root / "results" / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIG}"
    if (root / "validated").is_file() and (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    env = oracle_env(root)
    _write_raw(root)
    d = str(DATASET_ID)
    _run([_tool("nnUNetv2_extract_fingerprint"), "-d", d, "-np", "1"], env)
    _run([_tool("nnUNetv2_plan_experiment"), "-d", d], env)
    _shrink_plans(root / "preprocessed" / DATASET / "nnUNetPlans.json")
    _run([_tool("nnUNetv2_preprocess"), "-d", d, "-c", CONFIG, "-np", "1"], env)
    # nnU-Net's own trainer class, driven like nnUNetv2_train (run_training: network and
    # plans from nnU-Net, its data loader, augmentation, loss, optimiser and checkpoint
    # writer), with fewer iterations per epoch so that it takes about a minute on CPU;
    # no data-augmentation worker processes (single-threaded augmenter) on 2-core machines.
    # Seeded; the model must paint both labels on every test input, else the next seed.
    for seed in SEEDS:
        _run([str(py), "-c", _TRAIN, d, CONFIG, "0", TRAINER, str(ITERATIONS), str(seed)],
             {**env, "nnUNet_n_proc_DA": "0"})
        if _paints_every_label(folder, root):
            (root / "validated").write_text(f"seed {seed}\n")
            return folder
        (folder / "fold_0" / "checkpoint_final.pth").unlink()
    raise RuntimeError(f"nnU-Net's {ITERATIONS}-iteration training with seeds {SEEDS} never gave "
                       f"a model that paints labels 1 and 2 on every test input ({folder})")


def nnunet_predict(model_folder: Path, in_dir: Path, out_dir: Path, *, tta: bool,
                   folds: tuple[str, ...] = ("0",)) -> None:
    """Run ``nnUNetv2_predict_from_modelfolder`` on a folder of ``<case>_<ch>.nii.gz``."""
    cmd = [_tool("nnUNetv2_predict_from_modelfolder"), "-i", str(in_dir), "-o", str(out_dir),
           "-m", str(model_folder), "-f", *folds, "-device", "cpu", "-npp", "1", "-nps", "1"]
    if not tta:
        cmd.append("--disable_tta")
    _run(cmd, oracle_env(model_folder.parents[2]))


if __name__ == "__main__":
    print(build_model(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
