"""Predictor: exact source geometry, statistics, activations, progress, errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from inference_helpers import oblique_lps_affine

from medinfer.errors import InvalidImageError, ModelError
from medinfer.inference import Predictor
from medinfer.models import ModelCard
from medinfer.volume import Volume


def card(**over: Any) -> ModelCard:
    d: dict[str, Any] = {
        "name": "tiny",
        "version": "0.1",
        "labels": {0: {"name": "background"}, 1: {"name": "blob", "color": [255, 0, 0]},
                   2: {"name": "other"}},
        "input": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                  "normalization": {"method": "none"}},
        "inference": {"patch_size": [16, 16, 16], "overlap": 0.25, "blending": "gaussian"},
        "weights": {"format": "torchscript", "file": "unused.ts"},
    }
    for k, v in over.items():
        d[k] = v
    return ModelCard.from_dict(d)


def blob_model(x: torch.Tensor) -> torch.Tensor:
    """Logits: label 1 where the intensity is > 0, else background; label 2 never."""
    return torch.cat([-4 * x, 4 * x, torch.full_like(x, -10.0)], dim=1)


def sphere_volume() -> tuple[Volume, np.ndarray]:
    aff = oblique_lps_affine()
    shape = (28, 24, 11)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    centre = np.array([13.5, 11.5, 5.0]) @ aff[:3, :3].T + aff[:3, 3]
    inside = np.linalg.norm(xyz - centre, axis=-1) < 9.0
    arr = np.where(inside, 1.0, -1.0).astype(np.float32)
    return Volume(arr, aff, {"source": "sphere"}), inside


def test_exact_source_grid_and_labels_follow_world_geometry() -> None:
    vol, inside = sphere_volume()
    stages: list[tuple[str, float]] = []
    pred = Predictor(card(), blob_model, device="cpu", save_probabilities=True).predict(
        vol, progress=lambda s, f: stages.append((s, f)))
    assert pred.label.shape == (1, 28, 24, 11)
    assert np.array_equal(pred.label.affine, vol.affine)
    assert pred.label.array.dtype == np.uint8
    lab = pred.label.array[0]
    dice = 2 * np.sum((lab == 1) & inside) / (np.sum(lab == 1) + np.sum(inside))
    assert dice > 0.95, dice
    assert not np.any(lab == 2)
    # statistics: voxels and mL on the source grid
    s1 = {s.value: s for s in pred.statistics}
    assert set(s1) == {1, 2}
    assert s1[1].voxels == int(np.sum(lab == 1)) and s1[1].name == "blob"
    voxel_ml = 0.9 * 1.1 * 2.5 / 1000
    assert s1[1].volume_ml == pytest.approx(s1[1].voxels * voxel_ml, rel=1e-9)
    assert s1[2].voxels == 0
    # probabilities on the source grid, summing to one
    assert pred.probabilities is not None
    assert pred.probabilities.shape == (3, 28, 24, 11)
    np.testing.assert_allclose(pred.probabilities.array.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(pred.probabilities.affine, vol.affine)
    # progress: stages in order, fraction monotonic in [0, 1], ends at 1
    fracs = [f for _, f in stages]
    assert fracs == sorted(fracs) and fracs[0] == 0.0 and fracs[-1] == 1.0
    names = [s for s, _ in stages]
    assert names.index("inference") > names.index("preprocess")
    assert names[-1] == "postprocess"
    assert {"preprocess", "inference", "postprocess", "total"} <= set(pred.timings)
    assert pred.summary()["model"] == "tiny"


def test_random_weight_unet_returns_source_geometry() -> None:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    aff = oblique_lps_affine((1.2, 0.8, 3.0))
    vol = Volume(np.random.default_rng(0).normal(size=(1, 13, 17, 6)).astype(np.float32), aff)
    c = card(inference={"patch_size": [8, 8, 8], "overlap": 0.5, "tta_axes": [0, 2]},
             input={"orientation": "LPI", "spacing": [2.0, 1.0, 1.5],
                    "normalization": {"method": "zscore"}})
    pred = Predictor(c, net, device="cpu").predict(vol)
    assert pred.label.spatial_shape == (13, 17, 6)
    assert np.array_equal(pred.label.affine, aff)
    assert pred.probabilities is None
    assert set(np.unique(pred.label.array)) <= {0, 1, 2}


def test_sigmoid_threshold_and_detection_heatmap() -> None:
    vol, inside = sphere_volume()

    def one_channel(x: torch.Tensor) -> torch.Tensor:
        return 6 * x

    seg = card(labels={0: {"name": "bg"}, 3: {"name": "blob"}},
               output={"activation": "sigmoid", "threshold": 0.5})
    pred = Predictor(seg, one_channel, device="cpu").predict(vol)
    assert set(np.unique(pred.label.array)) == {0, 3}
    assert pred.heatmap is not None and pred.heatmap.shape == (1, 28, 24, 11)

    det = card(task="detection", labels={0: {"name": "bg"}, 1: {"name": "nodule"}},
               output={"activation": "sigmoid", "threshold": 0.7})
    pred = Predictor(det, one_channel, device="cpu").predict(vol)
    heat = pred.heatmap
    assert heat is not None and np.array_equal(heat.affine, vol.affine)
    assert heat.array.dtype == np.float32 and 0.0 <= heat.array.min() <= heat.array.max() <= 1.0
    np.testing.assert_array_equal(pred.label.array[0], (heat.array[0] >= 0.7).astype(np.uint8))
    assert pred.label.array[0][inside].mean() > 0.8


def test_large_label_values_give_uint16() -> None:
    vol, _ = sphere_volume()
    c = card(labels={0: {"name": "bg"}, 300: {"name": "blob"}},
             output={"activation": "sigmoid"})
    pred = Predictor(c, lambda x: 6 * x, device="cpu").predict(vol)
    assert pred.label.array.dtype == np.uint16
    assert set(np.unique(pred.label.array)) == {0, 300}


def test_channel_and_output_mismatch() -> None:
    vol, _ = sphere_volume()
    two = Volume(np.concatenate([vol.array, vol.array]), vol.affine)
    with pytest.raises(InvalidImageError, match="2 channel"):
        Predictor(card(), blob_model, device="cpu").predict(two)
    with pytest.raises(ModelError, match="output channel"):
        Predictor(card(), lambda x: torch.cat([x, x], 1), device="cpu").predict(vol)
