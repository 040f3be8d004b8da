"""Acceptance 2: the same anatomy lands at the same token coordinates in any input frame.

One synthetic head CT (axial 0.9 x 0.9 x 3 mm, a 70 HU marker sphere right-anterior-
superior of the centre) is stored in six frames: RPI, LAS, SLP (permuted axes), two
oblique frames (the patient and the slices tilted together, as in an oblique
acquisition), and an axial DICOM series (LPS, shuffled file order). Every frame must give
the same prepared arrays, mask and token coordinates of the marker.
"""

import numpy as np
import pytest
from dp_helpers import head_phantom, make_volume, reframe, rotation, save_nifti, write_ct_series_lps

from medinfer.data import load_image, prepare_volume

SHAPE, SPACING = (80, 90, 24), (0.9, 0.9, 3.0)


@pytest.fixture(scope="module")
def phantom():
    arr, aff, marker = head_phantom(SHAPE, SPACING)
    return arr, aff, marker


def _frames(arr, aff, marker, tmp_path):
    """(name, Volume, marker position in that frame's world)."""
    out = [("RPI", make_volume(arr, aff), marker)]
    a, f = reframe(arr, aff, (0, 1, 2), (True, True, True))
    out.append(("LAS", make_volume(a, f), marker))
    a, f = reframe(arr, aff, (2, 0, 1), (True, True, False))
    out.append(("SLP", make_volume(a, f), marker))
    for name, perm, flips, rot in (
        ("oblique LPS", (0, 1, 2), (True, False, True), rotation(12, -8, 18)),
        ("oblique PIR", (1, 2, 0), (False, False, False), rotation(-25, 20, 30)),
    ):
        a, f = reframe(arr, aff, perm, flips)
        moved = (rot @ np.append(marker, 1.0))[:3]
        path = save_nifti(a, rot @ f, tmp_path / f"{name.replace(' ', '_')}.nii.gz")
        out.append((name, load_image(path, preprocess=False), moved))
    folder = write_ct_series_lps(arr, aff, tmp_path / "dicom", seed=3)
    out.append(("DICOM", load_image(folder, preprocess=False), marker))
    return out


def test_same_anatomy_same_tokens_in_six_frames(phantom, tmp_path):
    arr, aff, marker = phantom
    frames = _frames(arr, aff, marker, tmp_path)
    assert {v.orientation for _, v, _ in frames} >= {"RPI", "LAS", "SLP", "LPS"}
    ref = prepare_volume(frames[0][1], "ct")
    assert ref is not None and ref.view == "axial"
    seen_coords = set()
    for name, vol, world_marker in frames:
        prepared = prepare_volume(vol, "ct")
        assert prepared is not None, name
        assert prepared.view == "axial", name
        assert prepared.shape == ref.shape, name
        assert np.array_equal(prepared.background, ref.background), name
        for ch in ref.channels:
            np.testing.assert_allclose(
                prepared.channels[ch], ref.channels[ch], atol=1e-4, err_msg=f"{name} {ch}"
            )
        # the marker's world position, through this frame's prepared affine
        dhw = (np.linalg.inv(prepared.affine) @ np.append(world_marker, 1.0))[:3]
        token = tuple(int(v) for v in np.floor(dhw / np.array([4, 16, 16])))
        seen_coords.add(token)
        centre = tuple(int(round(v)) for v in dhw)
        assert prepared.channels["brain"][centre] == pytest.approx(70 / 80, abs=0.05), name
    assert len(seen_coords) == 1


def test_rpi_axes_meaning(phantom):
    """Marker right-anterior-superior of the centre: w large, h small, d small (axial)."""
    arr, aff, marker = phantom
    prepared = prepare_volume(make_volume(arr, aff), "ct")
    assert prepared is not None
    dhw = (np.linalg.inv(prepared.affine) @ np.append(marker, 1.0))[:3]
    centre = (np.array(prepared.shape) - 1) / 2
    d, h, w = dhw - centre
    assert w > 15 and h < -15 and d < -3
    # d runs superior -> inferior, h anterior -> posterior, w left -> right (RAS columns)
    cols = prepared.affine[:3, :3] / np.linalg.norm(prepared.affine[:3, :3], axis=0)
    np.testing.assert_allclose(cols, [[0, 0, 1], [0, -1, 0], [-1, 0, 0]], atol=1e-9)


@pytest.mark.parametrize(
    ("spacing", "shape", "view", "signs"),
    [
        # coronal: d anterior->posterior, h superior->inferior, w left->right
        ((0.9, 4.5, 0.9), (80, 20, 80), "coronal", (-1, -1, 1)),
        # sagittal: d left->right, h superior->inferior, w anterior->posterior
        ((4.5, 0.9, 0.9), (20, 90, 80), "sagittal", (1, -1, -1)),
    ],
)
def test_coronal_and_sagittal_axes(spacing, shape, view, signs):
    arr, aff, marker = head_phantom(shape, spacing)
    prepared = prepare_volume(make_volume(arr, aff), "ct")
    assert prepared is not None and prepared.view == view
    dhw = (np.linalg.inv(prepared.affine) @ np.append(marker, 1.0))[:3]
    offset = dhw - (np.array(prepared.shape) - 1) / 2
    assert tuple(int(np.sign(v)) for v in offset) == signs
    assert prepared.channels["brain"][tuple(int(round(v)) for v in dhw)] == pytest.approx(
        70 / 80, abs=0.05
    )
