"""Acceptance 2 of the foundation issue: the label map fits the input in any frame.

T1 inputs in seven frames -- RAS, LPS, LPI, permuted axes, oblique (15 deg), anisotropic
0.9 x 1.1 x 2.5 mm, and the bundled oblique LPS sample -- are segmented by the real
:class:`medinfer.inference.Predictor` with the bundled ``demo-brain`` model (card
defaults, test-time augmentation off to save time). The label map must have exactly
the input's shape and affine, and its Dice against the reference labels carried through
the same transform (nearest neighbour) must reach ``MIN_DICE``, issue 16's targets: grey
and white matter >= 0.92, CSF >= 0.75. The bundled 2.2.0 (``configs/demo-brain.yaml``
then ``configs/demo-brain-finetune.yaml``, 1.0 mm model grid) reaches CSF 0.759-0.805,
GM 0.935-0.944, WM 0.929-0.943; the anisotropic frame is the lowest. Perfect labels
pushed through the 1.0 mm model grid and back reach CSF 0.977-1.0 in these frames
(``benchmarks/brain_ceiling.py``).

The frames are built here from ``tests/data/brain`` with numpy / scipy only (an oracle
independent of ``medinfer.transforms``): exact axis flips and permutations, and
resampling with ``scipy.ndimage.map_coordinates`` (linear for the T1 after a
slice-profile Gaussian, nearest for the labels).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from medinfer.volume import Volume

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "brain"
SAMPLE = REPO / "samples" / "t1_sample.nii.gz"
CSF, GM, WM = 1, 2, 3
MIN_DICE = {CSF: 0.75, GM: 0.92, WM: 0.92}
FRAME_NAMES = (
    "RAS",
    "LPS",
    "LPI",
    "permuted (SLA)",
    "oblique 15 deg",
    "anisotropic 0.9x1.1x2.5",
    "bundled sample (oblique LPS 1.2x1.2x1.5)",
)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def _flip(arr: np.ndarray, affine: np.ndarray, axes: tuple[int, ...]
          ) -> tuple[np.ndarray, np.ndarray]:
    """Reverse voxel ``axes``; the affine changes so that world positions stay put."""
    t = np.eye(4)
    for a in axes:
        t[a, a] = -1.0
        t[a, 3] = arr.shape[a] - 1
    return np.ascontiguousarray(np.flip(arr, axes)), affine @ t


def _permute(arr: np.ndarray, affine: np.ndarray, order: tuple[int, int, int]
             ) -> tuple[np.ndarray, np.ndarray]:
    """New voxel axis n = old axis ``order[n]``; world positions stay put."""
    t = np.zeros((4, 4))
    for n, old in enumerate(order):
        t[old, n] = 1.0
    t[3, 3] = 1.0
    return np.ascontiguousarray(np.transpose(arr, order)), affine @ t


def _rotation(deg: float, axis: tuple[float, float, float]) -> np.ndarray:
    u = np.asarray(axis, dtype=np.float64)
    u /= np.linalg.norm(u)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def _resample_pair(t1: np.ndarray, lab: np.ndarray, affine: np.ndarray, rot: np.ndarray,
                   spacing: tuple[float, float, float]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1 (linear, after a slice-profile blur) and labels (nearest) on a new grid.

    The new grid has direction ``rot``, voxel size ``spacing`` (mm), the same world
    centre as the source and covers the source's rotated bounding box.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    src_shape = np.asarray(t1.shape)
    centre = affine[:3, :3] @ ((src_shape - 1) / 2) + affine[:3, 3]
    half = np.abs(rot.T @ affine[:3, :3]) @ ((src_shape - 1) / 2)
    shape = (np.floor(2 * half / sp) + 1).astype(int)
    new = np.eye(4)
    new[:3, :3] = rot * sp[None, :]
    new[:3, 3] = centre - new[:3, :3] @ ((shape - 1) / 2)
    m = np.linalg.inv(affine) @ new
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape],
                               indexing="ij"))
    coords = np.einsum("ab,b...->a...", m[:3, :3].astype(np.float32), ijk)
    coords += m[:3, 3].astype(np.float32)[:, None, None, None]
    # blur = slice profile: a voxel of size s mm integrates ~s mm of the 1 mm source
    sigma_world = np.sqrt(np.maximum(sp**2 - 1.0, 0.0)) / 2.355
    sigma_src = np.abs(np.linalg.inv(affine[:3, :3]) @ rot) @ sigma_world
    src = ndi.gaussian_filter(t1.astype(np.float32), sigma=sigma_src) if np.any(
        sigma_src > 0.05) else t1.astype(np.float32)
    t1_new = ndi.map_coordinates(src, coords, order=1, mode="constant", cval=0.0,
                                 output=np.float32, prefilter=False)
    lab_new = ndi.map_coordinates(lab, coords, order=0, mode="constant", cval=0,
                                  output=np.uint8, prefilter=False)
    return t1_new, lab_new, new


@cache
def frames() -> dict[str, tuple[Volume, np.ndarray]]:
    """Name -> (T1 Volume, reference label array on the same grid)."""
    t1, aff = _load(DATA / "mni152_t1_1mm_crop.nii.gz")
    lab, lab_aff = _load(DATA / "mni152_labels_1mm_crop.nii.gz")
    assert np.allclose(aff, lab_aff) and t1.shape == lab.shape
    lab = lab.astype(np.uint8)
    out: dict[str, tuple[Volume, np.ndarray]] = {}

    def add(name: str, img: np.ndarray, ref: np.ndarray, affine: np.ndarray) -> None:
        out[name] = (Volume(img, affine, {"source": name}), ref)

    add("RAS", t1, lab, aff)
    a_lps, aff_lps = _flip(t1, aff, (0, 1))
    add("LPS", a_lps, _flip(lab, aff, (0, 1))[0], aff_lps)
    a_lpi, aff_lpi = _flip(t1, aff, (0, 1, 2))
    add("LPI", a_lpi, _flip(lab, aff, (0, 1, 2))[0], aff_lpi)
    a_p, aff_p = _permute(t1, aff, (2, 0, 1))
    a_p, aff_p2 = _flip(a_p, aff_p, (1,))
    lab_p = _flip(_permute(lab, aff, (2, 0, 1))[0], aff_p, (1,))[0]
    add("permuted (SLA)", a_p, lab_p, aff_p2)
    rot = _rotation(15.0, (0.4, 1.0, 0.3))
    t_o, l_o, aff_o = _resample_pair(t1, lab, aff, rot, (1.0, 1.0, 1.0))
    # scanner-like storage of the oblique frame: int16, scaled and offset intensities
    add("oblique 15 deg", np.rint(t_o * 2.3 + 11).astype(np.int16), l_o, aff_o)
    t_a, l_a, aff_a = _resample_pair(t1, lab, aff, np.eye(3), (0.9, 1.1, 2.5))
    add("anisotropic 0.9x1.1x2.5", t_a, l_a, aff_a)
    s_img, s_aff = _load(SAMPLE)
    s_lab, s_lab_aff = _load(DATA / "t1_sample_labels.nii.gz")
    assert np.allclose(s_aff, s_lab_aff)
    add("bundled sample (oblique LPS 1.2x1.2x1.5)", s_img, s_lab.astype(np.uint8), s_aff)
    assert tuple(out) == FRAME_NAMES
    return out


def dice(pred: np.ndarray, ref: np.ndarray, value: int) -> float:
    """Dice coefficient of ``value`` between two label arrays of equal shape."""
    a, b = pred == value, ref == value
    denom = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / denom if denom else 1.0


def test_frames_are_what_they_claim() -> None:
    got = {name: vol.orientation for name, (vol, _) in frames().items()}
    assert got["RAS"] == "RAS"
    assert got["LPS"] == "LPS"
    assert got["LPI"] == "LPI"
    assert got["permuted (SLA)"] == "SLA"
    assert got["bundled sample (oblique LPS 1.2x1.2x1.5)"] == "LPS"
    oblique = frames()["oblique 15 deg"][0]
    cos = np.abs(oblique.direction).max(axis=0)
    assert np.all(np.degrees(np.arccos(np.clip(cos, -1, 1))) > 5.0)
    np.testing.assert_allclose(frames()["anisotropic 0.9x1.1x2.5"][0].spacing, [0.9, 1.1, 2.5])
    # the flips and permutation carry the world geometry exactly: same world corners set
    ras = frames()["RAS"][0]
    for name in ("LPS", "LPI", "permuted (SLA)"):
        c1 = np.sort(np.round(frames()[name][0].corners_world(), 6), axis=0)
        np.testing.assert_allclose(c1, np.sort(np.round(ras.corners_world(), 6), axis=0))
    # the references carry the anatomy: GM and WM volumes agree within 5 %
    vox_ml = {n: float(np.prod(v.spacing)) / 1000 for n, (v, _) in frames().items()}
    for value in (GM, WM):
        ml = [int((r == value).sum()) * vox_ml[n] for n, (_, r) in frames().items()]
        assert max(ml) / min(ml) < 1.05


@pytest.fixture(scope="module")
def predictor() -> Iterator[object]:
    from medinfer.inference import Predictor
    from medinfer.models import load_model, resolve_model

    card, model_dir = resolve_model("demo-brain")
    model = load_model(card, model_dir, "cpu")
    # TTA off keeps the file within about two minutes on 2 cores; the card's other
    # defaults (1.0 mm RAS grid, percentile normalisation, 64^3 windows, overlap 0.5,
    # Gaussian blending) are used as they are
    yield Predictor(card, model, device="cpu", tta=False)


@pytest.mark.parametrize("name", FRAME_NAMES)
def test_label_map_on_input_grid_with_dice(predictor: object, name: str) -> None:
    volume, ref = frames()[name]
    prediction = predictor.predict(volume)  # type: ignore[attr-defined]
    label = prediction.label
    assert label.spatial_shape == volume.spatial_shape
    assert label.num_channels == 1
    np.testing.assert_array_equal(label.affine, volume.affine)
    pred = np.asarray(label.array[0])
    assert np.issubdtype(pred.dtype, np.integer)
    assert set(np.unique(pred).tolist()) <= {0, 1, 2, 3}
    got = {value: dice(pred, ref, value) for value in MIN_DICE}
    assert all(got[v] >= MIN_DICE[v] for v in MIN_DICE), (
        f"{name}: Dice CSF {got[CSF]:.3f}, GM {got[GM]:.3f}, WM {got[WM]:.3f}; "
        f"required {MIN_DICE}")
