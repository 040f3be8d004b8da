"""MONAI bundles: same labels as ``python -m monai.bundle run``; config code needs consent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medinfer import io
from medinfer.errors import ModelError
from medinfer.formats.monai_bundle import MonaiBundle
from medinfer.models.monai_bundle import is_monai_bundle

pytestmark = pytest.mark.timeout(1200)

INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "ckpt_path": "$@bundle_root + '/models/model.pt'",
    "dataset_dir": "/nonexistent",
    "output_dir": "$@bundle_root + '/eval'",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
    "network_def": {
        "_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
        "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1,
    },
    "network": "$@network_def.to(@device)",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": False},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0],
             "mode": "bilinear"},
            {"_target_": "ScaleIntensityd", "keys": "image"},
            {"_target_": "EnsureTyped", "keys": "image", "device": "@device"},
        ],
    },
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                   "shuffle": False, "num_workers": 0},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [24, 24, 16],
                "sw_batch_size": 1, "overlap": 0.25, "mode": "gaussian"},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
             "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
             "output_postfix": "seg", "separate_folder": False, "resample": False,
             "output_dtype": "$np.uint8"},
        ],
    },
    # no ignite engine: plain expressions (MONAI's CLI runs "initialize" then "run")
    "initialize": [
        "$torch.set_grad_enabled(False)",
        "$@network.load_state_dict(torch.load(@ckpt_path, weights_only=True))",
        "$@network.eval()",
    ],
    "run": ["$[@postprocessing({**d, 'pred': @inferer(d['image'][None], @network)[0]}) "
            "for d in @dataset]"],
}

METADATA = {
    "version": "0.1.0", "name": "tiny_unet_bundle",
    "monai_version": "1.6.1", "pytorch_version": "2.13.0", "numpy_version": "2.0",
    "task": "test segmentation", "description": "random-weight 3-class UNet",
    "authors": "medinfer tests", "copyright": "none",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": 1,
                             "spatial_shape": [24, 24, 16], "dtype": "float32",
                             "value_range": [0, 1], "is_patch_data": True,
                             "channel_def": {"0": "image"}}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                             "spatial_shape": [24, 24, 16], "dtype": "float32",
                             "value_range": [0, 2], "is_patch_data": True,
                             "channel_def": {"0": "background", "1": "core", "2": "rim"}}},
    },
}


def oblique_affine() -> np.ndarray:
    a, b = np.deg2rad(14.0), np.deg2rad(11.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rx @ rz @ np.diag([-1.0, -1.0, 1.0]) @ np.diag([1.1, 0.9, 2.6])
    aff[:3, 3] = [20.0, -14.5, 3.0]
    return aff


def monai_cli(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "monai.bundle", *args], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle made with MONAI's tooling: init_bundle, then ckpt_export to TorchScript."""
    from monai.bundle import ConfigParser, init_bundle

    root = tmp_path_factory.mktemp("bundle")
    parser = ConfigParser(INFERENCE)
    torch.manual_seed(7)
    net = parser.get_parsed_content("network_def")
    ckpt = root / "weights.pt"
    torch.save(net.state_dict(), ckpt)
    b = root / "tiny_unet_bundle"
    init_bundle(str(b), ckpt_file=str(ckpt), metadata_str=json.dumps(METADATA),
                inference_str=json.dumps(INFERENCE))
    monai_cli("ckpt_export", "network_def", "--filepath", str(b / "models" / "model.ts"),
              "--ckpt_file", str(b / "models" / "model.pt"),
              "--meta_file", str(b / "configs" / "metadata.json"),
              "--config_file", str(b / "configs" / "inference.json"),
              "--bundle_root", str(b))
    return b


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(3)
    shape = (40, 34, 15)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    arr = 100.0 * np.exp(-np.sum(((ijk - [20, 15, 7]) / [9, 8, 4]) ** 2, -1))
    arr = (arr + rng.normal(0, 5, shape)).astype(np.float32)
    img = nib.Nifti1Image(arr, oblique_affine())
    img.set_qform(oblique_affine(), code=1)
    nib.save(img, str(d / "case1.nii.gz"))
    return d / "case1.nii.gz"


def test_same_labels_as_monai_bundle_run(bundle: Path, scan_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "oracle"
    monai_cli("run", "--config_file", str(bundle / "configs" / "inference.json"),
              "--meta_file", str(bundle / "configs" / "metadata.json"),
              "--bundle_root", str(bundle), "--dataset_dir", str(scan_file.parent),
              "--output_dir", str(out))
    ref_img = nib.load(str(out / "case1_seg.nii.gz"))
    ref = np.asarray(ref_img.dataobj).astype(np.int64).squeeze()
    vol = io.load(scan_file)
    pred = MonaiBundle(bundle, trust_model_code=True, device="cpu").predict(vol)
    lab = pred.label.array[0].astype(np.int64)
    assert lab.shape == vol.spatial_shape == ref.shape
    assert np.array_equal(pred.label.affine, vol.affine)
    np.testing.assert_allclose(ref_img.affine, vol.affine, atol=1e-4)
    present = [v for v in (1, 2) if np.any(ref == v)]
    assert present, "oracle output has no foreground; the test would be trivial"
    for v in present:
        dice = 2 * np.sum((lab == v) & (ref == v)) / (np.sum(lab == v) + np.sum(ref == v))
        assert dice >= 0.99, (v, dice)
    assert {s.name for s in pred.statistics} == {"core", "rim"}


def test_torchscript_only_bundle_gives_same_labels(bundle: Path, scan_file: Path,
                                                   tmp_path: Path) -> None:
    import shutil

    ts_only = tmp_path / "ts_only"
    shutil.copytree(bundle, ts_only)
    (ts_only / "models" / "model.pt").unlink()
    vol = io.load(scan_file)
    a = MonaiBundle(bundle, trust_model_code=True, device="cpu").predict(vol)
    b = MonaiBundle(ts_only, trust_model_code=True, device="cpu").predict(vol)
    assert np.array_equal(a.label.array, b.label.array)


def test_config_code_needs_trust(bundle: Path) -> None:
    assert is_monai_bundle(bundle)
    with pytest.raises(ModelError, match="can execute code.*trust-model-code"):
        MonaiBundle(bundle)


def test_not_a_bundle(tmp_path: Path) -> None:
    assert not is_monai_bundle(tmp_path)
    with pytest.raises(ModelError, match="not a MONAI bundle"):
        MonaiBundle(tmp_path, trust_model_code=True)


def test_weights_that_do_not_fit(bundle: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    torch.save({"nope": torch.zeros(2)}, bad / "models" / "model.pt")
    with pytest.raises(ModelError, match="do not match network_def"):
        MonaiBundle(bad, trust_model_code=True, device="cpu")


def _cli(args: list[str]) -> int:
    from medinfer.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


def test_cli_bundle_needs_trust_then_runs(bundle: Path, scan_file: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from medinfer.models import load_model, resolve_model

    out = tmp_path / "out"
    code = _cli(["predict", str(scan_file), "--model", str(bundle), "-o", str(out)])
    assert code == 2
    assert "--trust-model-code" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    code = _cli(["predict", str(scan_file), "--model", str(bundle), "--trust-model-code",
                 "--device", "cpu", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    seg = nib.load(str(out / "case1_seg.nii.gz"))
    np.testing.assert_allclose(seg.affine, oblique_affine(), atol=1e-5)
    ref = MonaiBundle(bundle, trust_model_code=True, device="cpu").predict(io.load(scan_file))
    assert np.array_equal(np.asarray(seg.dataobj), ref.label.array[0])
    card, d = resolve_model(bundle)  # display card from metadata.json only
    assert card.labels[1].name == "core"
    with pytest.raises(ModelError, match="trust_model_code"):
        load_model(card, d, "cpu")
