"""Acceptance 2: post-processing on analytic heat maps with exact expected values.

Geometries are anisotropic and non-RAS (axes permuted and flipped) or oblique (rotated
and sheared), so any confusion of voxel and world space shows up.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from medinfer.errors import ConfigError, GeometryError
from medinfer.postprocess.detection import (
    FACE_AREA_CORRECTION,
    Finding,
    box_iou,
    detect_findings,
    distance_footprint,
    equivalent_diameter_mm,
    find_peaks,
    nms,
    sphere_iou,
    surface_area_mm2,
    voxel_volume_mm3,
)
from medinfer.postprocess.detection_config import PostProcessingSection

# axis i -> -z (1 mm), axis j -> -x (2 mm), axis k -> +y (0.5 mm): "PIL"-like, anisotropic
PERMUTED = np.array([
    [0.0, -2.0, 0.0, 10.0],
    [0.0, 0.0, 0.5, -20.0],
    [-1.0, 0.0, 0.0, 30.0],
    [0.0, 0.0, 0.0, 1.0],
])


def oblique_affine() -> np.ndarray:
    """Rotated by 30 degrees about z and 20 degrees about x, spacing (0.8, 1.3, 2.1), shear."""
    a, b = math.radians(30), math.radians(20)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    lin = rz @ rx @ np.diag([0.8, 1.3, 2.1])
    lin[:, 2] += 0.3 * lin[:, 0]  # shear: the k axis leans towards i
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = [-40.0, 12.5, 7.0]
    return out


def world(affine: np.ndarray, ijk: tuple[float, float, float]) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(ijk, dtype=float) + affine[:3, 3]


# ------------------------------------------------------------------------------ peaks
def test_footprint_is_world_ball_on_anisotropic_grid() -> None:
    fp = distance_footprint(PERMUTED, 2.0)
    # spacing along i, j, k = 1, 2, 0.5 mm -> half widths 2, 1, 4 voxels
    assert fp.shape == (5, 3, 9)
    assert fp[2, 1, 4] and fp[0, 1, 4] and fp[2, 0, 4] and fp[2, 1, 0]
    assert not fp[0, 0, 4]  # (2, 1, 0) voxels = sqrt(4 + 4) mm > 2 mm


def test_peaks_min_distance_uses_mm_not_voxels() -> None:
    heat = np.zeros((20, 20, 40), np.float32)
    # pair A: 2 voxels apart along j (2 mm spacing) -> 4 mm apart
    heat[5, 5, 10], heat[5, 7, 10] = 0.9, 0.8
    # pair B: 2 voxels apart along k (0.5 mm spacing) -> 1 mm apart
    heat[15, 15, 30], heat[15, 15, 32] = 0.7, 0.6
    got = find_peaks(heat, PERMUTED, threshold=0.5, min_distance_mm=3.0)
    assert got == [((5, 5, 10), pytest.approx(0.9)), ((5, 7, 10), pytest.approx(0.8)),
                   ((15, 15, 30), pytest.approx(0.7))]
    got = find_peaks(heat, PERMUTED, threshold=0.5, min_distance_mm=4.0)  # 4 mm: suppressed
    assert [p for p, _ in got] == [(5, 5, 10), (15, 15, 30)]
    got = find_peaks(heat, PERMUTED, threshold=0.5, min_distance_mm=0.9)
    assert len(got) == 4
    assert find_peaks(heat, PERMUTED, threshold=0.95, min_distance_mm=1.0) == []


def test_peaks_local_maxima_vs_nms_on_a_wide_blob() -> None:
    """A wide Gaussian: local_maxima gives the top only, nms also picks shoulders."""
    shape = (30, 30, 30)
    ii, jj, kk = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    heat = np.exp(-((ii - 15) ** 2 + (jj - 15) ** 2 + (kk - 15) ** 2) / (2 * 6.0**2))
    lm = find_peaks(heat, aff, threshold=0.5, min_distance_mm=3.0, method="local_maxima")
    assert [p for p, _ in lm] == [(15, 15, 15)]
    nm = find_peaks(heat, aff, threshold=0.5, min_distance_mm=3.0, method="nms")
    assert nm[0][0] == (15, 15, 15) and len(nm) > 1
    # every nms peak is farther than 3 mm from all others
    pts = np.array([p for p, _ in nm], float)
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts)) * 99
    assert d.min() > 3.0


def test_plateau_gives_one_peak() -> None:
    heat = np.zeros((10, 10, 10), np.float32)
    heat[3:6, 3:6, 3:6] = 0.8
    got = find_peaks(heat, PERMUTED, threshold=0.5, min_distance_mm=5.0)
    assert len(got) == 1 and got[0][0] == (3, 3, 3)


def test_bad_peak_method_names_allowed_values() -> None:
    with pytest.raises(ConfigError, match="local_maxima"):
        find_peaks(np.zeros((3, 3, 3)), np.eye(4), method="watershed")
    with pytest.raises(GeometryError):
        find_peaks(np.zeros((3, 3)), np.eye(4))


# ------------------------------------------------------------------------- properties
def test_box_component_properties_permuted_affine() -> None:
    heat = np.zeros((12, 14, 30), np.float32)
    heat[2:6, 3:6, 10:18] = 1.0  # 4 x 3 x 8 voxels, uniform
    heat[3, 4, 13] = 1.0  # the peak value is the same; first in flat order is the peak
    image = np.full(heat.shape, 20.0, np.float32)
    image[2:6, 3:6, 10:18] = 100.0
    image[2, 3, 10] = 196.0  # one hot voxel: mean and std change exactly
    params = PostProcessingSection(threshold=0.5, min_distance_mm=1.0, volume_method="binary")
    (f,) = detect_findings(heat, PERMUTED, image, params)
    n = 4 * 3 * 8
    vox = 1.0 * 2.0 * 0.5
    assert f.volume_mm3 == pytest.approx(n * vox)
    assert f.diameter_mm == pytest.approx((6 * n * vox / math.pi) ** (1 / 3))
    center = (3.5, 4.0, 13.5)
    np.testing.assert_allclose(f.center_voxel, center)
    np.testing.assert_allclose(f.center_ras, world(PERMUTED, center))
    d = f.to_dict()
    assert d["coordinates"] == pytest.approx(list(world(PERMUTED, center)), abs=1e-3)
    lps = world(PERMUTED, center) * [-1, -1, 1]
    assert d["coordinates_lps"] == pytest.approx(list(lps), abs=1e-3)
    assert d["coordinates_voxel_continuous"] == pytest.approx(list(center))
    assert d["coordinates_voxel"] == [4, 4, 14]  # nearest voxel, halves rounded up
    vals = np.full(n, 100.0)
    vals[0] = 196.0
    assert f.mean_intensity == pytest.approx(vals.mean())
    assert f.std_intensity == pytest.approx(vals.std())
    # faces normal to i: 2*(3*8) of 2*0.5 mm2; to j: 2*(4*8) of 1*0.5; to k: 2*(4*3) of 1*2
    area = (48 * 1.0 + 64 * 0.5 + 24 * 2.0) * FACE_AREA_CORRECTION
    expected = math.pi ** (1 / 3) * (6 * n * vox) ** (2 / 3) / area
    assert f.sphericity == pytest.approx(min(expected, 1.0))
    assert f.confidence == pytest.approx(1.0)


def test_single_voxel_sphericity_formula() -> None:
    m = np.zeros((3, 3, 3), bool)
    m[1, 1, 1] = True
    a = np.diag([1.0, 2.0, 3.0, 1.0])
    area = surface_area_mm2(m, a)
    assert area == pytest.approx(2 * (6 + 3 + 2) * 2 / 3)


def test_soft_volume_and_weighted_centroid_oblique() -> None:
    aff = oblique_affine()
    heat = np.zeros((20, 20, 20), np.float32)
    heat[8:11, 9:11, 10] = 0.9  # core above the segmentation threshold (6 voxels)
    heat[7, 9, 10] = 0.3  # edge voxel below it, touching (soft margin counts it)
    heat[12, 9, 10] = 0.2  # 2 voxels from the core: inside a 2-voxel margin
    heat[17, 9, 10] = 0.4  # far away: not counted
    p = PostProcessingSection(threshold=0.5, min_distance_mm=1.0, volume_method="soft")
    (f,) = detect_findings(heat, aff, None, p)
    det = abs(np.linalg.det(aff[:3, :3]))
    assert voxel_volume_mm3(aff) == pytest.approx(det)
    assert f.volume_mm3 == pytest.approx((6 * 0.9 + 0.3 + 0.2) * det, rel=1e-6)
    w = {(8, 9, 10): .9, (9, 9, 10): .9, (10, 9, 10): .9, (8, 10, 10): .9, (9, 10, 10): .9,
         (10, 10, 10): .9, (7, 9, 10): .3, (12, 9, 10): .2}
    c = sum(np.array(k, float) * v for k, v in w.items()) / sum(w.values())
    np.testing.assert_allclose(f.center_voxel, c, atol=1e-6)
    np.testing.assert_allclose(f.center_ras, world(aff, c), atol=1e-6)
    # binary volume: 6 voxels
    # refine=peak: plateau corners 2.1 mm apart would stay separate findings; 3 mm merges
    p2 = PostProcessingSection(threshold=0.5, min_distance_mm=3.0, volume_method="binary",
                               refine="peak")
    (g,) = detect_findings(heat, aff, None, p2)
    assert g.volume_mm3 == pytest.approx(6 * det)
    np.testing.assert_allclose(g.center_voxel, (8, 9, 10))
    assert g.mean_intensity is None and g.std_intensity is None


# -------------------------------------------------------------------------------- NMS
def test_sphere_and_box_iou_exact() -> None:
    # two unit spheres 1 mm apart: lens = 5 pi / 12, IoU = 5 / 27
    assert sphere_iou((0, 0, 0), 2.0, (1, 0, 0), 2.0) == pytest.approx(5 / 27)
    assert sphere_iou((0, 0, 0), 2.0, (2, 0, 0), 2.0) == 0.0
    assert sphere_iou((0, 0, 0), 4.0, (0.5, 0, 0), 2.0) == pytest.approx(1 / 8)
    assert box_iou((0, 0, 0), 2.0, (1, 0, 0), 2.0) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0), 2.0, (1, 1, 1), 2.0) == pytest.approx(1 / 15)


def _f(c: tuple[float, float, float], d: float, conf: float) -> Finding:
    return Finding(np.zeros(3, int), np.zeros(3), np.asarray(c, float), d, 0.0, conf)


def test_nms_keeps_highest_and_drops_overlaps() -> None:
    fs = [_f((0, 0, 0), 2.0, 0.6), _f((1, 0, 0), 2.0, 0.9), _f((10, 0, 0), 2.0, 0.5)]
    kept = nms(fs, 0.1)
    assert [k.confidence for k in kept] == [0.9, 0.5]
    kept = nms(fs, 0.2)  # IoU 5/27 = 0.185 < 0.2: both kept
    assert [k.confidence for k in kept] == [0.9, 0.6, 0.5]
    kept = nms(fs, 0.2, "box")  # box IoU 1/3 > 0.2
    assert [k.confidence for k in kept] == [0.9, 0.5]


# ---------------------------------------------------------------------------- filters
def _two_blobs() -> np.ndarray:
    heat = np.zeros((30, 30, 60), np.float32)
    heat[5:9, 5:9, 10:26] = 0.95  # 4*4*16 = 256 voxels * 1 mm3 -> d = 7.88 mm
    heat[20:22, 20:22, 40:44] = 0.7  # 16 voxels -> d = 3.13 mm
    return heat


def test_size_and_confidence_filters_and_ids() -> None:
    heat = _two_blobs()
    base = {"threshold": 0.5, "min_distance_mm": 2.0, "volume_method": "binary"}
    fs = detect_findings(heat, PERMUTED, None, PostProcessingSection(**base))
    assert [f.id for f in fs] == ["F01", "F02"]
    assert fs[0].diameter_mm == pytest.approx(equivalent_diameter_mm(256.0))
    assert fs[1].diameter_mm == pytest.approx(equivalent_diameter_mm(16.0))
    fs = detect_findings(heat, PERMUTED, None,
                         PostProcessingSection(**base, min_diameter_mm=4.0))
    assert len(fs) == 1 and fs[0].confidence == pytest.approx(0.95)
    fs = detect_findings(heat, PERMUTED, None,
                         PostProcessingSection(**base, max_diameter_mm=4.0))
    assert len(fs) == 1 and fs[0].confidence == pytest.approx(0.7)
    fs = detect_findings(heat, PERMUTED, None,
                         PostProcessingSection(**base, min_confidence=0.8))
    assert len(fs) == 1 and fs[0].confidence == pytest.approx(0.95)
    fs = detect_findings(heat, PERMUTED, None, PostProcessingSection(**base, max_detections=1))
    assert len(fs) == 1
    assert detect_findings(np.zeros((5, 5, 5)), PERMUTED) == []
