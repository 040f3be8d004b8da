"""The detection inference wrapper: blending (gaussian / linear / average), TTA with flips and
90-degree rotations, stride, and the heat map on the source grid.

A point-wise "network" (logits = input) is equivariant to flips and rotations and needs no
context, so every blending and augmentation must reproduce ``sigmoid(input)`` exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medinfer.detection import augmentations, run_detection_on_volume, run_heatmap
from medinfer.models.card import ModelCard
from medinfer.postprocess.detection_config import DetectionConfig
from medinfer.volume import Volume


def _card(orientation: str | None = None, spacing: list[float] | None = None) -> ModelCard:
    return ModelCard.from_dict({
        "name": "pointwise", "version": "1", "task": "detection",
        "labels": {0: {"name": "background"}, 1: {"name": "lesion"}},
        "input": {"modality": "CT", "orientation": orientation, "spacing": spacing,
                  "normalization": {"method": "none"}},
        "inference": {"patch_size": [8, 8, 8], "overlap": 0.5},
        "output": {"activation": "sigmoid"},
        "weights": {"format": "torchscript", "file": "unused.pt"},
    })


def _pointwise(x: torch.Tensor) -> torch.Tensor:
    return x[:, :1] * 1.0


def _volume() -> Volume:
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 2, size=(13, 11, 9)).astype(np.float32)
    aff = np.array([[0, -0.8, 0, 5], [0, 0, 2.5, -3], [1.2, 0, 0, 7], [0, 0, 0, 1]], float)
    return Volume(arr, aff)


@pytest.mark.parametrize("blending", ["gaussian", "linear", "average"])
@pytest.mark.parametrize("tta", [None, {"enabled": True, "flips": [[0], [1, 2]],
                                         "rotations": [1, 2, 3], "rotation_axes": [0, 2]}])
def test_blending_and_tta_are_exact_for_a_pointwise_model(blending: str, tta: dict | None
                                                           ) -> None:
    vol = _volume()
    inf: dict = {"blending": blending, "stride": [3, 4, 5]}
    if tta:
        inf["tta"] = tta
    cfg = DetectionConfig.from_dict({"inference": inf})
    heat = run_heatmap(vol, _card(), _pointwise, cfg)
    assert heat.same_grid(vol) and heat.array.dtype == np.float32
    expected = 1.0 / (1.0 + np.exp(-vol.array.astype(np.float64)))
    np.testing.assert_allclose(heat.array, expected, atol=2e-6)


def test_augmentation_list_and_limit() -> None:
    cfg = DetectionConfig.from_dict({"inference": {"tta": {
        "enabled": True, "flips": [[0], [2]], "rotations": [1, 3], "num_augmentations": 4}}})
    assert augmentations(cfg) == [((), 0, (0, 1)), ((0,), 0, (0, 1)), ((2,), 0, (0, 1)),
                                  ((), 1, (0, 1))]
    assert augmentations(DetectionConfig()) == [((), 0, (0, 1))]
    named = DetectionConfig.from_dict({"inference": {"tta": {
        "enabled": True, "augmentations": ["flip_z", "rotate_90_xz", "rotate_90_yz"]}}})
    assert augmentations(named) == [((), 0, (0, 1)), ((2,), 0, (0, 1)), ((), 1, (0, 2)),
                                    ((), 1, (1, 2))]


def test_heatmap_returns_to_the_source_grid_after_resampling() -> None:
    """Model grid RAS 1.5 mm: a linear ramp comes back to the oblique source grid."""
    vol = _volume()
    world = vol.voxel_to_world(np.argwhere(np.ones(vol.spatial_shape)))
    ramp = (0.05 * world[:, 0] - 0.03 * world[:, 2]).reshape(vol.spatial_shape)
    vol = vol.with_array(ramp.astype(np.float32))
    heat = run_heatmap(vol, _card("RAS", [1.5, 1.5, 1.5]), _pointwise,
                       DetectionConfig.from_dict({"inference": {"mode": "whole_volume"}}))
    assert heat.same_grid(vol)
    # trilinear resampling of a linear function is exact away from the border
    inner = (slice(2, -2), slice(2, -2), slice(2, -2))
    expected = 1.0 / (1.0 + np.exp(-ramp))
    np.testing.assert_allclose(heat.array[0][inner], expected[inner], atol=1e-4)


def test_run_detection_on_volume_fills_prediction() -> None:
    vol = _volume()
    arr = np.full(vol.spatial_shape, -8.0, np.float32)
    arr[4:7, 3:6, 2:5] = 8.0  # one 27-voxel blob of heat ~1
    vol = vol.with_array(arr)
    pred = run_detection_on_volume(vol, _card(), _pointwise,
                                   {"post_processing": {"min_distance_mm": 2.0,
                                                        "volume_method": "binary"}})
    assert len(pred.detections) == 1
    d = pred.detections[0]
    assert d["id"] == 0 and d["name"] == "F01" and d["coordinates_voxel"] == [5, 4, 3]
    assert d["properties"]["volume_mm3"] == pytest.approx(27 * 0.8 * 2.5 * 1.2, rel=1e-5)
    assert d["triage"]["risk_category"] == "high"
    assert pred.heatmap is not None and pred.heatmap.same_grid(vol)
    assert int(pred.label.array.sum()) == 27
    assert pred.model_name == "pointwise" and "inference" in pred.timings


def _card_yaml(folder: Path, post: dict | None, task: str = "detection") -> Path:
    import yaml

    data = {
        "name": "pointwise", "version": "1", "task": task,
        "labels": {0: {"name": "background"}, 1: {"name": "lesion"}},
        "input": {"modality": "CT", "orientation": None, "spacing": None,
                  "normalization": {"method": "none"}},
        "inference": {"patch_size": [8, 8, 8], "overlap": 0.5},
        "output": {"activation": "sigmoid", "threshold": 0.4},
        "weights": {"format": "torchscript", "file": "unused.pt"},
    }
    if post is not None:
        data["post_processing"] = post
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(data))
    return folder / "model.yaml"


def test_card_post_processing_defaults_and_calibration_beside_the_card(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The card's ``post_processing`` are defaults (config keys win), its relative calibration
    path is relative to the model folder whatever the working directory."""
    from medinfer.detection import with_card_defaults
    from medinfer.postprocess.calibration import Calibration

    (tmp_path / "m").mkdir()
    Calibration(method="platt", a=-10.0, b=5.0).save(tmp_path / "m" / "cal.json")
    card = ModelCard.from_yaml(_card_yaml(tmp_path / "m", {
        "calibration": "cal.json", "min_distance_mm": 2.0, "volume_method": "binary"}))
    assert card.post_processing["calibration"] == str((tmp_path / "m" / "cal.json").resolve())
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    vol = _volume()
    arr = np.full(vol.spatial_shape, -8.0, np.float32)
    arr[4:7, 3:6, 2:5] = 8.0
    vol = vol.with_array(arr)
    pred = run_detection_on_volume(vol, card, _pointwise, None)
    (d,) = pred.detections
    conf = d["confidence"]
    assert d["triage"]["malignancy_score"] == pytest.approx(
        1.0 / (1.0 + np.exp(-10.0 * conf + 5.0)), abs=1e-5)
    assert d["properties"]["volume_mm3"] == pytest.approx(27 * 0.8 * 2.5 * 1.2, rel=1e-5)
    # precedence: section defaults < card output.threshold < card post_processing < config
    cfg = with_card_defaults(DetectionConfig(), card)
    assert cfg.post_processing.threshold == 0.4  # the card's output.threshold
    assert cfg.post_processing.min_distance_mm == 2.0
    cfg = with_card_defaults(DetectionConfig.from_dict(
        {"post_processing": {"min_distance_mm": 7.0, "calibration": None}}), card)
    assert cfg.post_processing.min_distance_mm == 7.0 and cfg.post_processing.calibration is None
    assert cfg.post_processing.volume_method.value == "binary"
    assert with_card_defaults(cfg, card) == cfg  # idempotent
    pred = run_detection_on_volume(vol, card, _pointwise, {"post_processing": {
        "calibration": None}})
    assert pred.detections[0]["triage"]["malignancy_score"] == pytest.approx(conf, abs=1e-5)


@pytest.mark.parametrize("post, task, words", [
    ({"threshold": 2.0}, "detection", "post_processing"),
    ({"no_such_key": 1}, "detection", "no_such_key"),
    ({"threshold": 0.3}, "segmentation", "only a task: detection"),
])
def test_card_post_processing_is_checked(tmp_path: Path, post: dict, task: str,
                                         words: str) -> None:
    from medinfer.errors import ModelError

    with pytest.raises(ModelError, match=words):
        ModelCard.from_yaml(_card_yaml(tmp_path, post, task))
