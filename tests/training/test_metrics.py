"""Acceptance 3: metrics equal hand-computed / MONAI / SimpleITK values on small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from medinfer.training.metrics import iou_along_z, segmentation_metrics, z_axis

SPACING = (0.9, 1.3, 2.0)


def _boxes() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((12, 10, 8), np.int64)
    pred = np.zeros_like(truth)
    truth[2:8, 2:7, 1:6] = 1      # 6*5*5 = 150 voxels
    pred[4:10, 2:7, 1:6] = 1      # shifted by 2 along I: overlap 4*5*5 = 100
    truth[9:11, 7:9, 6:8] = 2     # 8 voxels
    pred[9:11, 7:9, 6:7] = 2      # 4 voxels, all inside the truth
    return pred, truth


def test_dice_iou_by_hand_and_hd_surface_dice_equal_references():
    pred, truth = _boxes()
    m = segmentation_metrics(pred, truth, [1, 2, 3], SPACING, tolerance_mm=1.0)
    assert m[1]["dice"] == pytest.approx(2 * 100 / 300)
    assert m[1]["iou"] == pytest.approx(100 / 200)
    assert m[2]["dice"] == pytest.approx(2 * 4 / 12)
    assert m[2]["iou"] == pytest.approx(4 / 8)
    # class 3 absent from both: Dice/IoU 1 (MONAI ignore_empty=False), distances undefined
    assert m[3]["dice"] == 1.0 and m[3]["iou"] == 1.0
    assert math.isnan(m[3]["hd95"]) and math.isnan(m[3]["surface_dice"])
    # Hausdorff (100th percentile) of two boxes equals SimpleITK's on the same spacing
    full = segmentation_metrics(pred, truth, [1], SPACING, hd_percentile=100)[1]["hd95"]
    f = sitk.HausdorffDistanceImageFilter()
    imgs = []
    for a in (pred, truth):
        im = sitk.GetImageFromArray(np.ascontiguousarray((a == 1).astype(np.uint8).T))
        im.SetSpacing(SPACING)
        imgs.append(im)
    f.Execute(*imgs)
    assert full == pytest.approx(f.GetHausdorffDistance(), abs=1e-6)
    assert full == pytest.approx(2 * 0.9)  # shift of two voxels along I
    # HD95 and surface Dice are MONAI's numbers
    p = torch.from_numpy((pred == 1)[None, None].astype(np.float32))
    g = torch.from_numpy((truth == 1)[None, None].astype(np.float32))
    hd95 = float(compute_hausdorff_distance(p, g, percentile=95, spacing=list(SPACING)))
    sd = float(compute_surface_dice(p, g, [1.0], include_background=True,
                                    spacing=list(SPACING)))
    assert m[1]["hd95"] == pytest.approx(hd95)
    assert m[1]["surface_dice"] == pytest.approx(sd)
    assert 0.0 < m[1]["surface_dice"] < 1.0


def test_iou_along_z_one_value_per_slice_on_the_world_z_axis():
    pred, truth = _boxes()
    # oblique, LPS-like affine whose third voxel axis is closest to S
    a = np.diag([-0.9, -1.3, 2.0, 1.0])
    a[:3, :3] = a[:3, :3] @ np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)],
                                      [0, np.sin(0.3), np.cos(0.3)]])
    ax, v = iou_along_z(pred, truth, a, [1, 2])
    assert ax == 2 and v.shape == (8, 2)
    assert np.allclose(v[1:6, 0], 100 / 200)
    assert np.isnan(v[0, 0]) and np.isnan(v[7, 0])
    assert v[6, 1] == 1.0 and v[7, 1] == 0.0
    # permuted axes: the first voxel axis points to S
    perm = np.zeros((4, 4))
    perm[2, 0], perm[0, 1], perm[1, 2], perm[3, 3] = 2.0, 0.9, 1.3, 1.0
    assert z_axis(perm) == 0
    ax, v = iou_along_z(pred, truth, perm, [1])
    assert ax == 0 and v.shape == (12, 1)
    assert np.allclose(v[4:8, 0], 1.0) and np.allclose(v[[2, 3, 8, 9], 0], 0.0)
