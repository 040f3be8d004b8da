"""nnU-Net v2 model folders: same masks as ``nnUNetv2_predict`` on the same inputs.

The model folder is made by nnU-Net's own planner, preprocessor and trainer
(:mod:`nnunet_oracle`), cached between sessions; nnunetv2 runs in its own environment.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nnunet_oracle import (
    TEST_CASES,
    TEST_ORIGIN,
    TEST_SEED,
    build_model,
    nnunet_predict,
    save_nifti,
    write_cases,
)

from medinfer import io
from medinfer.errors import ConfigError, InvalidImageError, ModelError
from medinfer.formats.nnunet import NnUNetPredictor, compute_steps
from medinfer.models.nnunet import (
    is_nnunet_folder,
    load_checkpoint,
    read_nnunet_folder,
)
from medinfer.volume import Volume

# first run on a fresh machine: creates the nnU-Net environment and trains the model
pytestmark = pytest.mark.timeout(2400)

CASES = TEST_CASES


@pytest.fixture(scope="session")
def model_folder() -> Path:
    return build_model()


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("nn_in")
    return write_cases(d, CASES, TEST_SEED, origin=TEST_ORIGIN)


@pytest.fixture(scope="session")
def oracle(model_folder: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[bool, Path]:
    out = {}
    for tta in (False, True):
        o = tmp_path_factory.mktemp(f"nn_out_tta{int(tta)}")
        nnunet_predict(model_folder, inputs, o, tta=tta)
        out[tta] = o
    return out


def load_case(inputs: Path, name: str) -> Volume:
    chans = [io.load(inputs / f"{name}_{c:04d}.nii.gz") for c in range(2)]
    return Volume(np.concatenate([v.array for v in chans]), chans[0].affine, {})


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * float(np.sum(a & b)) / s


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_masks_as_nnunetv2_predict(model_folder: Path, inputs: Path,
                                        oracle: dict[bool, Path], name: str, tta: bool) -> None:
    vol = load_case(inputs, name)
    pred = NnUNetPredictor(model_folder, device="cpu", tta=tta).predict(vol)
    ref_img = nib.load(str(oracle[tta] / f"{name}.nii.gz"))
    ref = np.asarray(ref_img.dataobj).astype(np.int64)
    lab = pred.label.array[0].astype(np.int64)
    assert lab.shape == vol.spatial_shape == ref.shape
    assert np.array_equal(pred.label.affine, vol.affine)
    np.testing.assert_allclose(ref_img.affine, vol.affine, atol=1e-4)
    for v in (1, 2):
        assert np.any(ref == v), f"oracle predicts no label {v}: the comparison is trivial"
        d = dice(lab == v, ref == v)
        print(f"{name} tta={tta} label {v}: Dice {d:.5f}, voxels {int((ref == v).sum())}")
        assert d >= 0.99, (name, tta, v, d)


def test_float32_accumulation_and_probabilities(model_folder: Path, inputs: Path,
                                                oracle: dict[bool, Path]) -> None:
    vol = load_case(inputs, "oblique")
    p16 = NnUNetPredictor(model_folder, device="cpu", tta=False,
                          accumulate="float16").predict(vol)
    p32 = NnUNetPredictor(model_folder, device="cpu", tta=False, accumulate="float32",
                          save_probabilities=True).predict(vol)
    changed = int(np.sum(p16.label.array != p32.label.array))
    assert changed <= 0.001 * p16.label.array.size, changed
    assert p32.probabilities is not None
    probs = p32.probabilities.array
    assert probs.shape == (3, *vol.spatial_shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(np.argmax(probs, 0), p32.label.array[0])


def test_folder_reading_and_checkpoint(model_folder: Path) -> None:
    assert is_nnunet_folder(model_folder)
    f = read_nnunet_folder(model_folder)
    assert f.folds == ["0"] and f.configuration_name == "3d_fullres"
    assert f.num_heads == 3 and f.num_input_channels == 2
    assert f.label_names == {0: "background", 1: "bright", 2: "dark"}
    ck = load_checkpoint(f.checkpoints[0])  # numpy scalars inside, weights_only=True
    assert all(isinstance(t, torch.Tensor) for t in ck["network_weights"].values())
    best = read_nnunet_folder(model_folder, checkpoint="best")
    assert best.checkpoints[0].name == "checkpoint_best.pth"
    with pytest.raises(ModelError, match="fold '3' has no checkpoint_final.pth"):
        read_nnunet_folder(model_folder, folds=[3])
    with pytest.raises(ConfigError, match="'final' or 'best'"):
        read_nnunet_folder(model_folder, checkpoint="latest")


def test_bad_folders(model_folder: Path, tmp_path: Path) -> None:
    assert not is_nnunet_folder(tmp_path)
    bad = tmp_path / "m"
    shutil.copytree(model_folder, bad)
    plans = json.loads((bad / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]["architecture"]
    cfg["network_class_name"] = "os.system"
    (bad / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="not allowed"):
        NnUNetPredictor(bad, device="cpu")
    (bad / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a loadable nnU-Net checkpoint"):
        load_checkpoint(bad / "fold_0" / "checkpoint_final.pth")
    (bad / "dataset.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_nnunet_folder(bad)


def test_wrong_channel_count(model_folder: Path) -> None:
    vol = Volume(np.ones((1, 10, 10, 10), np.float32), np.eye(4), {})
    with pytest.raises(InvalidImageError, match="expects 2"):
        NnUNetPredictor(model_folder, device="cpu").predict(vol)


def test_steps_match_nnunet_rule() -> None:
    # the example of nnU-Net's compute_steps_for_sliding_window docstring
    assert compute_steps([110], [64], 0.5) == [[0, 23, 46]]
    assert compute_steps([64, 20], [64, 20], 0.5) == [[0], [0]]


def test_open_predictor_dispatch(model_folder: Path, inputs: Path) -> None:
    from medinfer.formats import open_predictor

    card, pred = open_predictor(str(model_folder), device="cpu", tta=False, folds=[0])
    assert isinstance(pred, NnUNetPredictor) and not pred.tta
    assert {v: s.name for v, s in card.labels.items()} == {0: "background", 1: "bright",
                                                           2: "dark"}
    out = pred.predict(load_case(inputs, "aligned"))
    assert {s.name for s in out.statistics} == {"bright", "dark"}
    with pytest.raises(ConfigError, match="nnU-Net model folders only"):
        open_predictor("demo-nodules", folds=[0])


def _cli(args: list[str]) -> int:
    from medinfer.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


def test_cli_predict_nnunet_folder(model_folder: Path, inputs: Path, oracle: dict[bool, Path],
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a two-channel case as one 4-D NIfTI (channel = 4th axis)
    vol = load_case(inputs, "oblique")
    four_d = tmp_path / "in" / "oblique.nii.gz"
    four_d.parent.mkdir()
    save_nifti(np.moveaxis(vol.array, 0, -1), vol.affine, four_d)
    out = tmp_path / "out"
    code = _cli(["predict", str(four_d), "--model", str(model_folder), "--folds", "0",
                 "--checkpoint", "final", "--no-tta", "--device", "cpu", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    seg = nib.load(str(out / "oblique_seg.nii.gz"))
    ref = nib.load(str(oracle[False] / "oblique.nii.gz"))
    np.testing.assert_allclose(seg.affine, vol.affine, atol=1e-5)
    a, b = np.asarray(seg.dataobj), np.asarray(ref.dataobj)
    assert a.shape == b.shape
    for v in (1, 2):
        assert dice(a == v, b == v) >= 0.99
    stats = json.loads((out / "oblique_stats.json").read_text())
    assert [lab["name"] for lab in stats["labels"]] == ["bright", "dark"]
    # bad fold: exit code 2, one message, no output
    code = _cli(["predict", str(four_d), "--model", str(model_folder), "--folds", "7",
                 "-o", str(tmp_path / "bad")])
    assert code == 2
    assert "fold '7'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_resolve_and_load_model_recognise_nnunet(model_folder: Path) -> None:
    from medinfer.models import load_model, resolve_model

    card, d = resolve_model(model_folder)
    assert card.labels[2].name == "dark" and d == model_folder.resolve()
    net = load_model(card, d, "cpu")  # the raw networks: windows -> mean logits over folds
    with torch.inference_mode():
        y = net(torch.zeros(1, 2, 8, 16, 16))
    assert tuple(y.shape) == (1, 3, 8, 16, 16)
