"""Display mapping: derived from the affine, exactly invertible, radiological view."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slices_helpers import FRAMES, _rot, load_pair, regrid, save

from medinfer.errors import ConfigError, GeometryError
from medinfer.slices import SliceMapping, export_slices, mapping_from_affine
from medinfer.volume import Volume

ALL_ORIENTATIONS = [
    (perm, flips)
    for perm in itertools.permutations(range(3))
    for flips in itertools.product((False, True), repeat=3)
]


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_same_picture_for_every_storage_order(axis: str) -> None:
    """All 48 axis orders / flips of one physical image give identical pictures.

    The slice index stays the array index, so slices come in reverse order when the
    slicing array axis runs the other way (recorded as slice_increase_direction).
    """
    _, labels = load_pair("RAS")
    ref = None
    ref_dir = None
    for perm, flips in ALL_ORIENTATIONS:
        vol = regrid(labels, perm, flips)
        m = mapping_from_affine(vol.affine, vol.spatial_shape, axis)
        stack = m.to_slices(vol.channel(0))
        np.testing.assert_array_equal(m.from_slices(stack), vol.channel(0))
        direction = m.to_dict(vol.affine)["slice_increase_direction"]
        if ref is None:
            ref, ref_dir = stack, direction
        if direction != ref_dir:
            stack = stack[::-1]
        np.testing.assert_array_equal(stack, ref, err_msg=f"{perm} {flips}")


@pytest.mark.parametrize("frame", list(FRAMES))
@pytest.mark.parametrize(
    ("axis", "corner"),
    [
        # world corner that must appear at the top-left pixel (row 0, col 0)
        ("axial", (1, 1, None)),  # patient right (+x), anterior (+y)
        ("coronal", (1, None, 1)),  # patient right, superior
        ("sagittal", (None, 1, 1)),  # anterior, superior
    ],
)
def test_top_left_pixel_is_right_anterior_superior(
    frame: str, axis: str, corner: tuple[int | None, ...]
) -> None:
    _, labels = load_pair(frame)
    world = labels.voxel_to_world(np.argwhere(np.ones(labels.spatial_shape, bool)))
    score = sum(world[:, n] for n, c in enumerate(corner) if c is not None)
    m = mapping_from_affine(labels.affine, labels.spatial_shape, axis)
    # voxel of each display pixel, for the middle slice
    s = m.num_slices // 2
    rows, cols = np.meshgrid(np.arange(m.height), np.arange(m.width), indexing="ij")
    pix = np.stack([cols.ravel(), rows.ravel(), np.full(rows.size, s), np.ones(rows.size)])
    vox = (m.pixel_to_voxel() @ pix)[:3].T.astype(int)
    flat = np.ravel_multi_index(vox.T, labels.spatial_shape)
    pixel_score = score[flat].reshape(m.height, m.width)
    # moving right or down on the image moves away from the named corner, so the
    # top-left pixel is the one nearest to it
    assert np.all(np.diff(pixel_score, axis=0) < 0.0)
    assert np.all(np.diff(pixel_score, axis=1) < 0.0)


def test_radiological_letters_in_metadata(tmp_path: Path) -> None:
    ct, _ = load_pair("LPS")
    path = save(ct, tmp_path / "lps.nii.gz")
    expected = {
        "axial": ("L", "P"),
        "coronal": ("L", "I"),
        "sagittal": ("P", "I"),
    }
    for axis, (right, down) in expected.items():
        res = export_slices(path, tmp_path / axis, axis=axis)
        sl = res.metadata["slicing"]
        assert (sl["image_right_direction"], sl["image_down_direction"]) == (right, down)
        # pixel -> world matrix agrees with the affine and the pixel -> voxel matrix
        p2w = np.array(sl["pixel_to_world_ras"])
        np.testing.assert_allclose(p2w, ct.affine @ np.array(sl["pixel_to_voxel"]), atol=1e-9)


def test_png_pixels_follow_pixel_to_voxel(tmp_path: Path) -> None:
    _, labels = load_pair("OBLIQUE_LPS")
    path = save(labels, tmp_path / "lab.nii.gz")
    res = export_slices(path, tmp_path / "out", axis="coronal", labels=True)
    meta = json.loads(res.metadata_path.read_text())
    p2v = np.array(meta["slicing"]["pixel_to_voxel"])
    rng = np.random.default_rng(1)
    arr = labels.channel(0)
    for s in rng.integers(0, res.mapping.num_slices, 5):
        png = np.array(Image.open(res.slice_paths[s]))
        assert png.shape == (meta["slicing"]["image_height"], meta["slicing"]["image_width"])
        rows = rng.integers(0, png.shape[0], 20)
        cols = rng.integers(0, png.shape[1], 20)
        for r, c in zip(rows, cols, strict=True):
            i, j, k = (p2v @ [c, r, s, 1])[:3].astype(int)
            assert png[r, c] == arr[i, j, k]


def test_mapping_dict_round_trip_and_errors() -> None:
    _, labels = load_pair("PERMUTED")
    m = mapping_from_affine(labels.affine, labels.spatial_shape, "sagittal")
    assert SliceMapping.from_dict(m.to_dict()) == m
    with pytest.raises(GeometryError, match="invalid slice mapping"):
        SliceMapping.from_dict({"axis": "axial"})
    with pytest.raises(ConfigError, match="axial"):
        mapping_from_affine(labels.affine, labels.spatial_shape, "transverse")
    with pytest.raises(GeometryError, match="stack shape"):
        m.from_slices(np.zeros((1, 2, 3)))


def test_oblique_uses_nearest_axes() -> None:
    """45 deg +/- epsilon oblique grids pick the closer world axis."""
    aff = np.eye(4)
    aff[:3, :3] = _rot(2, 40.0) @ np.diag([1.0, 2.0, 3.0])
    v = Volume(np.zeros((4, 5, 6)), aff)
    m = mapping_from_affine(v.affine, v.spatial_shape, "axial")
    assert (m.slice_axis, m.col_axis, m.row_axis) == (2, 0, 1)
    assert (m.flip_cols, m.flip_rows) == (True, True)
    aff[:3, :3] = _rot(2, 50.0) @ np.diag([1.0, 2.0, 3.0])
    m = mapping_from_affine(aff, (4, 5, 6), "axial")
    # i now points mostly to +y (anterior), j mostly to -x (left)
    assert (m.col_axis, m.row_axis) == (1, 0)
    assert (m.flip_cols, m.flip_rows) == (False, True)
