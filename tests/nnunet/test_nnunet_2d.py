"""2-D nnU-Net configurations: same labels as nnU-Net's own ``nnUNet_predict -m 2d`` (v1) and
``nnUNetv2_predict -c 2d`` (v2) on an axis-aligned and an oblique LPS anisotropic case,
TTA on and off.

The model folders are planned, preprocessed and initialised / trained by each nnU-Net
version's own code (:mod:`nnunet_2d_oracle`, cached); nnU-Net runs in separate processes on
CPU. The 2-D network is also compared with nnU-Net v1's own ``Generic_UNet``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nnunet_2d_oracle import (
    V1_TASK,
    V2_DATASET_ID,
    V2_TRAINER,
    build_v1_2d_model,
    build_v2_2d_model,
    v1_forward_2d,
    v1_predict_2d,
    v2_predict_2d,
)
from nnunet_oracle import write_cases
from nnunet_v1_oracle import PLANS, TRAINER

from medinfer import io
from medinfer.formats.nnunet import NnUNetPredictor
from medinfer.formats.nnunet_v1 import NnUNetV1Predictor
from medinfer.models.nnunet_v1 import build_v1_network, load_v1_checkpoint, read_nnunet_v1_folder
from medinfer.volume import Volume

pytestmark = pytest.mark.timeout(2400)

CASES = {
    # the training grid (axis-aligned): no resampling
    "aligned": ((44, 14, 40), (0.8, 3.0, 0.8), None),
    # oblique, LPS-like flips, another anisotropic spacing: in-plane resampling only
    "oblique": ((37, 18, 30), (0.95, 2.2, 1.1), 17.0),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("in2d")
    return write_cases(d, CASES, 11, origin=(4.0, -7.0, 11.0))


@pytest.fixture(scope="module")
def v1_folder() -> Path:
    return build_v1_2d_model()


@pytest.fixture(scope="module")
def v2_folder() -> Path:
    return build_v2_2d_model()


@pytest.fixture(scope="module")
def v1_oracle(v1_folder: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[bool, Path]:
    out = {}
    for tta in (False, True):
        o = tmp_path_factory.mktemp(f"v1_2d_out_tta{int(tta)}")
        v1_predict_2d(v1_folder, inputs, o, tta=tta)
        out[tta] = o
    return out


@pytest.fixture(scope="module")
def v2_oracle(v2_folder: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[bool, Path]:
    out = {}
    for tta in (False, True):
        o = tmp_path_factory.mktemp(f"v2_2d_out_tta{int(tta)}")
        v2_predict_2d(v2_folder, inputs, o, tta=tta)
        out[tta] = o
    return out


def _load(inputs: Path, name: str) -> Volume:
    chans = [io.load(inputs / f"{name}_{c:04d}.nii.gz") for c in range(2)]
    return Volume(np.concatenate([v.array for v in chans]), chans[0].affine, {})


def _compare(lab: np.ndarray, ref_file: Path, vol: Volume, what: str,
             min_dice: float = 0.999) -> None:
    ref_img = nib.load(str(ref_file))
    ref = np.asarray(ref_img.dataobj).astype(np.int64)
    assert lab.shape == ref.shape == vol.spatial_shape
    np.testing.assert_allclose(ref_img.affine, vol.affine, atol=1e-4)
    for v in (1, 2):
        assert np.any(ref == v), f"{what}: the oracle predicts no label {v}"
        a, b = lab == v, ref == v
        dice = 2.0 * float(np.sum(a & b)) / (int(a.sum()) + int(b.sum()))
        print(f"{what} label {v}: Dice {dice:.6f}, differing voxels {int(np.sum(lab != ref))} "
              f"of {lab.size}")
        assert dice >= min_dice, (what, v, dice)


@pytest.mark.parametrize("tta", [False, True])
def test_v1_2d_same_labels_as_nnunet_predict(v1_folder: Path, inputs: Path,
                                             v1_oracle: dict[bool, Path], tta: bool) -> None:
    predictor = NnUNetV1Predictor(v1_folder, device="cpu", tta=tta)
    assert predictor.mirror_axes == (0, 1)
    for name in CASES:
        vol = _load(inputs, name)
        lab = predictor.predict(vol).label.array[0].astype(np.int64)
        _compare(lab, v1_oracle[tta] / f"{name}.nii.gz", vol, f"v1 2d {name} tta={tta}")


@pytest.mark.parametrize("tta", [False, True])
def test_v2_2d_same_labels_as_nnunetv2_predict(v2_folder: Path, inputs: Path,
                                               v2_oracle: dict[bool, Path], tta: bool) -> None:
    # nnU-Net's own precision: logits accumulated in float16 (medinfer's CPU default,
    # float32, differs at a few near-tie voxels: the command-line check below)
    predictor = NnUNetPredictor(v2_folder, device="cpu", tta=tta, accumulate="float16")
    assert predictor.folder.configuration_name == "2d"
    assert tuple(predictor.mirror_axes) == (0, 1)
    for name in CASES:
        vol = _load(inputs, name)
        lab = predictor.predict(vol).label.array[0].astype(np.int64)
        _compare(lab, v2_oracle[tta] / f"{name}.nii.gz", vol, f"v2 2d {name} tta={tta}")


def test_slice_stacks_do_not_change_the_labels(v2_folder: Path, inputs: Path) -> None:
    """One slice per network call (as nnU-Net) and stacks of many slices per call: same
    labels, probabilities equal up to float rounding of the convolutions."""
    vol = _load(inputs, "oblique")
    one = NnUNetPredictor(v2_folder, device="cpu", tta=True, voxel_budget=1,
                          save_probabilities=True).predict(vol)
    many = NnUNetPredictor(v2_folder, device="cpu", tta=True,
                           save_probabilities=True).predict(vol)
    assert np.array_equal(one.label.array, many.label.array)
    assert one.probabilities is not None and many.probabilities is not None
    np.testing.assert_allclose(one.probabilities.array, many.probabilities.array, atol=1e-4)


def test_v1_2d_network_equals_nnunet_v1_generic_unet(v1_folder: Path) -> None:
    folder = read_nnunet_v1_folder(v1_folder)
    net = build_v1_network(folder)
    assert isinstance(net.seg_outputs[-1], torch.nn.Conv2d)
    net.load_state_dict(load_v1_checkpoint(folder.checkpoints[0])["state_dict"], strict=True)
    x = np.random.default_rng(3).normal(size=(3, 2, 24, 24)).astype(np.float32)
    ref = v1_forward_2d(folder.checkpoints[0], x, v1_folder.parents[4])
    with torch.no_grad():
        ours = net.eval()(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape == (3, 3, 24, 24)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_command_lines_run_2d_models(v1_folder: Path, v2_folder: Path, inputs: Path,
                                     v1_oracle: dict[bool, Path], v2_oracle: dict[bool, Path],
                                     tmp_path: Path) -> None:
    """``medinfer-nnUNet_predict ... -m 2d`` and ``medinfer-nnUNetv2_predict ... -c 2d``
    write the oracle's labels on the input grid (``<case>.nii.gz``, input affine)."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "RESULTS_FOLDER": str(v1_folder.parents[3]),
           "nnUNet_results": str(v2_folder.parents[1]), "OMP_NUM_THREADS": "1"}
    runs = {  # v2 on CPU: float32 accumulation (nnU-Net: float16), near ties may differ
        "v1": ([str(bindir / "medinfer-nnUNet_predict"), "-t", V1_TASK, "-tr", TRAINER, "-p",
                PLANS, "-m", "2d", "--disable_tta"], v1_oracle[False], 0.999),
        "v2": ([str(bindir / "medinfer-nnUNetv2_predict"), "-d", str(V2_DATASET_ID), "-c", "2d",
                "-tr", V2_TRAINER, "-f", "0", "--disable_tta", "-device", "cpu"],
               v2_oracle[False], 0.99),
    }
    for what, (cmd, ref_dir, min_dice) in runs.items():
        out = tmp_path / what
        res = subprocess.run([*cmd, "-i", str(inputs), "-o", str(out)], env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr
        for name in CASES:
            vol = _load(inputs, name)
            got = nib.load(str(out / f"{name}.nii.gz"))
            np.testing.assert_allclose(got.affine, vol.affine, atol=1e-4)
            _compare(np.asarray(got.dataobj).astype(np.int64), ref_dir / f"{name}.nii.gz", vol,
                     f"{what} command line {name}", min_dice)
