"""Heat-map target of the trainer (issue 16, "Heat-map (detection) models"): a few steps on
synthetic-lesion patches rendered on the fly, resumption, export of a detection model
folder that ``medinfer predict`` runs, and the targets themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from training_toy import run_cli as _cli

from medinfer.errors import ConfigError
from medinfer.models import resolve_model
from medinfer.training import train
from medinfer.training.config import TrainConfig
from medinfer.training.heatmap import SyntheticPatches, heatmap_target
from medinfer.training.nodules_synth import SyntheticLesion

ATLAS = Path(__file__).resolve().parents[1] / "data" / "ct" / "ct_head_brain_atlas_1mm.nii.gz"


def _config(out: Path, **kw: object) -> dict:
    cfg = {
        "target": "heatmap", "name": "tiny-nodules", "out": str(out),
        "synthetic": {"atlas": str(ATLAS), "val_patches": 2, "low_contrast": 0.5,
                      "buffer": 2, "fresh_per_step": 1},
        "heatmap": {"kind": "mask"}, "labels_map": {0: "background", 1: "lesion"},
        "spacing": [1.5, 1.5, 1.5], "orientation": "RAS",
        "normalization": {"method": "ct_window", "min_hu": -20, "max_hu": 180},
        "network": "UNet",
        "network_kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0,
                           "norm": "batch"},
        "patch_size": [16, 16, 16], "batch_size": 2, "max_steps": 4, "val_every": 2,
        "checkpoint_every": 2, "ce_weight": 10.0, "dice_weight": 1.0, "seed": 3,
        "card": {"inference": {"patch_size": [32, 32, 32], "overlap": 0.25}},
    }
    cfg.update(kw)
    return cfg


def test_heatmap_targets_mask_and_gaussian() -> None:
    les = SyntheticLesion(np.array([0.0, 0.0, 0.0]), np.array([4.0, 4.0, 4.0]), np.eye(3), 100.0)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = -15.0
    cfg = TrainConfig.from_mapping(_config(Path("unused")))
    mask = heatmap_target([les], aff, (31, 31, 31), cfg)
    # occupancy fraction: sums to the lesion volume (4/3 pi 4^3 = 268 mm^3), centre 1
    assert mask.sum() == pytest.approx(les.volume_mm3, rel=0.02)
    assert mask[15, 15, 15] == pytest.approx(1.0)
    gcfg = TrainConfig.from_mapping(_config(Path("unused"), heatmap={"kind": "gaussian",
                                                                     "sigma_mm": 2.0}))
    g = heatmap_target([les], aff, (31, 31, 31), gcfg)
    assert g[15, 15, 15] == pytest.approx(1.0)
    assert g[17, 15, 15] == pytest.approx(np.exp(-4.0 / 8.0), rel=1e-5)  # 2 mm away
    with pytest.raises(ConfigError, match="heatmap.kind"):
        TrainConfig.from_mapping(_config(Path("unused"), heatmap={"kind": "box"}))


def test_synthetic_patches_are_seeded_and_hold_lesions() -> None:
    data = SyntheticPatches(TrainConfig.from_mapping(_config(Path("unused"))))
    x1, y1 = data.batch(np.random.default_rng([3, 7]), 3)
    x2, y2 = data.batch(np.random.default_rng([3, 7]), 3)
    assert x1.shape == y1.shape == (3, 1, 16, 16, 16) and x1.dtype == np.float32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert 0.0 <= x1.min() and x1.max() <= 1.0  # ct_window -> [0, 1]
    assert 0.0 <= y1.min() and y1.max() <= 1.0
    many = data.batch(np.random.default_rng(0), 12)[1]
    assert (many.reshape(12, -1).max(axis=1) > 0.5).sum() >= 6  # most patches hold a lesion


def test_heatmap_training_resumes_exports_and_predicts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    full = train(_config(out, max_steps=4), export=False)
    assert len(full.log) == 4
    losses = [r["loss"] for r in full.log]
    # a second run that dies after step 3 (last checkpoint: step 2) and is started again
    # gives the same loss sequence
    out2 = tmp_path / "run2"

    def die(step: int, loss: float, metric: float | None) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(out2, max_steps=4), callback=die, export=False)
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(out2, max_steps=4)))
    assert _cli(["train", "--config", str(cfg_file)]) == 0
    log = json.loads((out2 / "training_log.json").read_text())
    np.testing.assert_allclose([r["loss"] for r in log], losses, rtol=1e-6)
    assert all(r["val_metric"] is not None for r in log if r["step"] % 2 == 0)

    card, folder = resolve_model(out2)
    assert card.task.value == "detection"
    assert str(card.output.activation.value) == "sigmoid"
    assert card.architecture is not None and card.architecture.kwargs["out_channels"] == 1
    assert list(card.inference.patch_size) == [32, 32, 32]  # the config's card entries
    # medinfer predict --model <folder> runs the detection pipeline on an oblique scan
    from medinfer.io import save
    from medinfer.training.nodules_synth import LesionAtlas, make_heldout_scan

    atlas = LesionAtlas.from_file(ATLAS)
    scan = make_heldout_scan(atlas, np.random.default_rng(5), n_lesions=1,
                             spacing_range=(1.6, 2.0), extent_mm=(40.0, 44.0, 36.0))
    path = save(scan.image, tmp_path / "scan.nii.gz")
    pred = tmp_path / "pred"
    assert _cli(["predict", "--model", str(folder), "--device", "cpu", "-o", str(pred),
                 str(path)]) == 0
    doc = json.loads((pred / "scan_detections.json").read_text())
    assert doc["model"] == "tiny-nodules" and isinstance(doc["detections"], list)
    assert (pred / "scan_heatmap.nii.gz").is_file()


def test_heatmap_target_needs_a_synthetic_source(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "x")
    cfg.pop("synthetic")
    with pytest.raises(ConfigError, match="synthetic"):
        train(cfg)
    cfg = _config(tmp_path / "y", synthetic={"atlas": str(tmp_path / "missing.nii.gz")})
    with pytest.raises(ConfigError, match="missing.nii.gz"):
        train(cfg)
