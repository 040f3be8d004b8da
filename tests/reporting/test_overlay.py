"""Overlay PNG: file written atomically, label colours visible, radiological orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from medinfer.errors import GeometryError
from medinfer.reporting.overlay import display_planes, save_overlay_png
from medinfer.volume import Volume

COLORS = {1: (255, 0, 0), 2: (0, 200, 0), 3: (30, 60, 255)}


def _rotation(deg: float, axis: np.ndarray) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def _phantom() -> tuple[Volume, Volume]:
    """Oblique (15 deg), anisotropic (1.0 x 0.8 x 2.5 mm), LPS-stored head-like phantom.

    World (RAS) content: an ellipsoid 'head' (label 3) with a sphere of label 1 in the
    patient's right (+x) half and a sphere of label 2 in the anterior (+y) part.
    """
    spacing = np.array([1.0, 0.8, 2.5])
    shape = (90, 110, 40)
    rot = _rotation(15.0, np.array([1.0, 0.5, 0.3]))
    lps = np.diag([-1.0, -1.0, 1.0])  # voxel axes i -> L, j -> P (before rotation)
    affine = np.eye(4)
    affine[:3, :3] = rot @ lps * spacing[None, :]
    centre_vox = (np.array(shape) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre_vox  # world centre at (0, 0, 0)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    head = (x / 38) ** 2 + (y / 45) ** 2 + (z / 35) ** 2 <= 1
    lab = np.where(head, 3, 0).astype(np.uint8)
    lab[(x - 18) ** 2 + y**2 + z**2 <= 10**2] = 1  # patient's right
    lab[x**2 + (y - 28) ** 2 + z**2 <= 8**2] = 2  # anterior
    img = np.where(head, 400.0, 0.0) + 80.0 * (lab == 1) - 120.0 * (lab == 2)
    img = img + np.random.default_rng(0).normal(0, 5, size=shape)
    return Volume(img.astype(np.float32), affine), Volume(lab, affine)


def test_display_planes_use_world_radiological_orientation() -> None:
    image, label = _phantom()
    planes = display_planes(image, label)
    assert set(planes) == {"axial", "coronal", "sagittal"}
    for name, (plane, lab) in planes.items():
        assert lab is not None and lab.shape == plane.shape
        assert np.isfinite(plane).any(), name
    # axial: patient's right (label 1) on the screen's left half, anterior (label 2) on top
    _, ax_lab = planes["axial"]
    assert ax_lab is not None
    rows, cols = ax_lab.shape
    r1, c1 = np.argwhere(ax_lab == 1).mean(0)
    r2, c2 = np.argwhere(ax_lab == 2).mean(0)
    assert c1 < cols / 2 - 5
    assert r2 < rows / 2 - 5
    assert abs(c2 - cols / 2) < 3
    # coronal: label 1 (right) on the screen's left
    _, co_lab = planes["coronal"]
    assert co_lab is not None
    assert np.argwhere(co_lab == 1)[:, 1].mean() < co_lab.shape[1] / 2 - 5
    # sagittal: anterior (label 2) on the screen's left
    _, sa_lab = planes["sagittal"]
    assert sa_lab is not None
    assert np.argwhere(sa_lab == 2)[:, 1].mean() < sa_lab.shape[1] / 2 - 5
    # isotropic display: the round structures stay round despite 2.5 mm slices
    m = co_lab == 3
    height = np.ptp(np.argwhere(m)[:, 0]) + 1
    width = np.ptp(np.argwhere(m)[:, 1]) + 1
    assert abs(height / width - 35 / 38) < 0.1


def test_save_overlay_png_writes_colours(tmp_path: Path) -> None:
    image, label = _phantom()
    out = save_overlay_png(image, label, tmp_path / "sub" / "case_overlay.png", COLORS,
                           alpha=1.0, names={1: "one", 2: "two", 3: "three"}, title="case")
    assert out == tmp_path / "sub" / "case_overlay.png"
    assert out.stat().st_size > 10_000
    assert sorted(p.name for p in out.parent.iterdir()) == ["case_overlay.png"]  # no temp files
    rgb = np.rint(imread(str(out))[..., :3] * 255).astype(int)
    assert rgb.shape[0] > 200 and rgb.shape[1] > 400
    for value, color in COLORS.items():
        n = int(np.all(rgb == np.array(color), axis=-1).sum())
        assert n > 500, f"label {value} colour {color} found in {n} pixels only"


def test_alpha_blends_with_the_scan(tmp_path: Path) -> None:
    image, label = _phantom()
    out = save_overlay_png(image, label, tmp_path / "o.png", COLORS, alpha=0.4)
    rgb = np.rint(imread(str(out))[..., :3] * 255).astype(int)
    # pure label colours appear only in the legend patches; the blended overlay differs
    pure_red = int(np.all(rgb == np.array(COLORS[1]), axis=-1).sum())
    reddish = int(((rgb[..., 0] > rgb[..., 1] + 60) & (rgb[..., 0] > rgb[..., 2] + 60)).sum())
    assert reddish > pure_red + 300


def test_bad_alpha_and_colour_are_refused(tmp_path: Path) -> None:
    image, label = _phantom()
    with pytest.raises(GeometryError, match="alpha"):
        save_overlay_png(image, label, tmp_path / "a.png", COLORS, alpha=1.5)
    with pytest.raises(GeometryError, match=r"colors\[1\]"):
        save_overlay_png(image, label, tmp_path / "b.png", {1: (300, 0, 0)})
    assert list(tmp_path.iterdir()) == []
