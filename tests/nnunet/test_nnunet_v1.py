"""nnU-Net v1 model folders: same labels as nnU-Net v1's own ``nnUNet_predict``.

The model folder is planned, preprocessed and initialised by nnU-Net v1's own code and
written by its own checkpoint writer (:mod:`nnunet_v1_oracle`, cached); nnU-Net v1 runs
in a separate process (python of the v2 oracle + ``.venv-nnunetv1/site``), its predictor
on CPU.
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
from nnunet_oracle import oracle_python, write_cases
from nnunet_v1_oracle import PLANS, TASK, TASK_ID, TRAINER, build_v1_model, v1_env, v1_predict

from medinfer import io
from medinfer.formats.nnunet_v1 import NnUNetV1Predictor
from medinfer.models.nnunet_v1 import build_v1_network, load_v1_checkpoint, read_nnunet_v1_folder
from medinfer.volume import Volume

pytestmark = pytest.mark.timeout(2400)

CASES = {
    # the training grid (axis-aligned)
    "aligned": ((44, 14, 40), (0.8, 3.0, 0.8), None),
    # oblique, LPS-like flips, another anisotropic spacing (separate-z from the target)
    "oblique": ((37, 18, 30), (0.95, 2.2, 1.1), 17.0),
}


@pytest.fixture(scope="module")
def v1_folder() -> Path:
    return build_v1_model()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("v1_in")
    return write_cases(d, CASES, 5)


#: nnU-Net v1's mirroring TTA is slow on CPU: the TTA-on comparison runs on the oblique case
TTA_CASES = {False: ("aligned", "oblique"), True: ("oblique",)}


@pytest.fixture(scope="module")
def oracle(v1_folder: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[bool, Path]:
    out = {}
    for tta, names in TTA_CASES.items():
        src = tmp_path_factory.mktemp(f"v1_in_tta{int(tta)}")
        for name in names:
            for f in inputs.glob(f"{name}_*.nii.gz"):
                (src / f.name).write_bytes(f.read_bytes())
        o = tmp_path_factory.mktemp(f"v1_out_tta{int(tta)}")
        v1_predict(v1_folder, src, o, tta=tta)
        out[tta] = o
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * float(np.sum(a & b)) / s


def _load(inputs: Path, name: str) -> Volume:
    chans = [io.load(inputs / f"{name}_{c:04d}.nii.gz") for c in range(2)]
    return Volume(np.concatenate([v.array for v in chans]), chans[0].affine, {})


@pytest.mark.parametrize("tta", [False, True])
def test_same_labels_as_nnunet_v1_predict(v1_folder: Path, inputs: Path,
                                          oracle: dict[bool, Path], tta: bool) -> None:
    predictor = NnUNetV1Predictor(v1_folder, device="cpu", tta=tta)
    for name in TTA_CASES[tta]:
        vol = _load(inputs, name)
        lab = predictor.predict(vol).label.array[0].astype(np.int64)
        ref_img = nib.load(str(oracle[tta] / f"{name}.nii.gz"))
        ref = np.asarray(ref_img.dataobj).astype(np.int64)
        assert lab.shape == ref.shape == vol.spatial_shape
        np.testing.assert_allclose(ref_img.affine, vol.affine, atol=1e-4)
        for v in (1, 2):
            assert np.any(ref == v), f"{name}: oracle predicts no label {v}"
            d = _dice(lab == v, ref == v)
            print(f"v1 {name} tta={tta} label {v}: Dice {d:.6f}, "
                  f"differing voxels {int(np.sum(lab != ref))}")
            assert d >= 0.999, (name, tta, v, d)


_FORWARD = r"""
import sys, numpy as np, torch
from nnunet.training.model_restore import restore_model
tr = restore_model(sys.argv[1] + ".pkl", sys.argv[1], train=False)
net = tr.network.eval()
net.do_ds = False
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], net(x).numpy())
"""


def test_network_equals_nnunet_v1_generic_unet(v1_folder: Path, tmp_path: Path) -> None:
    folder = read_nnunet_v1_folder(v1_folder)
    net = build_v1_network(folder)
    net.load_state_dict(load_v1_checkpoint(folder.checkpoints[0])["state_dict"], strict=True)
    x = np.random.default_rng(3).normal(size=(1, 2, 8, 24, 24)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = subprocess.run([str(oracle_python()), "-c", _FORWARD, str(folder.checkpoints[0]),
                          str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         env=v1_env(v1_folder.parents[4]), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    with torch.no_grad():
        ours = net.eval()(torch.from_numpy(x)).numpy()
    ref = np.load(tmp_path / "y.npy")
    assert ours.shape == ref.shape == (1, 3, 8, 24, 24)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_seed_command_line_with_prefix(v1_folder: Path, inputs: Path,
                                       oracle: dict[bool, Path], tmp_path: Path) -> None:
    """``nnUNet_predict -i <dir> -o <dir> -t <task> -tr nnUNetTrainerV2 -p nnUNetPlansv2.1
    -m 3d_fullres`` with the ``medinfer-`` prefix: ``<case>.nii.gz`` on the input grid."""
    script = str(Path(sys.executable).parent / "medinfer-nnUNet_predict")
    out = tmp_path / "out"
    env = {**os.environ, "RESULTS_FOLDER": str(v1_folder.parents[3]), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([script, "-i", str(inputs), "-o", str(out), "-t", TASK, "-tr", TRAINER,
                          "-p", PLANS, "-m", "3d_fullres", "--disable_tta", "--all_in_gpu",
                          "None", "--num_threads_preprocessing", "1"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert (out / "plans.pkl").is_file()
    for name in CASES:
        src = nib.load(str(inputs / f"{name}_0000.nii.gz"))
        got = nib.load(str(out / f"{name}.nii.gz"))
        assert got.shape == src.shape
        np.testing.assert_allclose(got.affine, src.affine, atol=1e-4)
        ref = np.asarray(nib.load(str(oracle[False] / f"{name}.nii.gz")).dataobj)
        assert np.array_equal(np.asarray(got.dataobj), ref), name
    # task id instead of the name; existing outputs are kept without --overwrite_existing
    stamp = (out / "aligned.nii.gz").stat().st_mtime_ns
    res = subprocess.run([script, "-i", str(inputs), "-o", str(out), "-t", str(TASK_ID),
                          "--disable_tta"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr
    assert (out / "aligned.nii.gz").stat().st_mtime_ns == stamp


def test_model_level_postprocessing_applies_fold_level_is_ignored(
        v1_folder: Path, inputs: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from scipy.ndimage import label

    plain = NnUNetV1Predictor(v1_folder, device="cpu", tta=False)
    vol = _load(inputs, "oblique")
    ref = plain.predict(vol).label.array[0]
    lmap, n = label(ref == 1)
    assert n > 1, "the test needs several label-1 components"
    folder = tmp_path / v1_folder.name
    shutil.copytree(v1_folder, folder)
    (folder / "postprocessing.json").write_text(json.dumps(
        {"for_which_classes": [1], "min_valid_object_sizes": "{1: None}"}))
    # a fold's own file (consolidate_folds leaves one per fold) is never read by v1's
    # predictor: even an unreadable one changes nothing
    (folder / "fold_0" / "postprocessing.json").write_text("{not json")
    pred = NnUNetV1Predictor(folder, device="cpu", tta=False).predict(vol)
    got = pred.label.array[0]
    biggest = np.argmax(np.bincount(lmap.ravel())[1:]) + 1
    assert np.array_equal(got == 1, lmap == biggest)
    assert np.array_equal(got == 2, ref == 2)
    assert np.all(got[(ref == 1) & (lmap != biggest)] == 0)
    stats = {s.value: s.voxels for s in pred.statistics}
    assert stats[1] == int(np.sum(lmap == biggest))


def test_open_predictor_opens_v1_folders(v1_folder: Path) -> None:
    from medinfer.errors import ConfigError
    from medinfer.formats import open_predictor

    card, pred = open_predictor(str(v1_folder), device="cpu", tta=False, folds=[0])
    assert isinstance(pred, NnUNetV1Predictor) and not pred.tta
    assert sorted(card.labels) == [0, 1, 2]
    with pytest.raises(ConfigError, match="checkpoint"):
        open_predictor(str(v1_folder), checkpoint="latest")
