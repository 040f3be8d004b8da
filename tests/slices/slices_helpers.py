"""Shared helpers for tests/slices: test volumes in several frames and a polygon tracer.

The tracer stands in for a 2D model: for every exported label PNG it traces sub-pixel
contours at level 0.5 around each label's binary mask (contourpy, matplotlib's contour
engine; outer rings plus holes) and writes the prediction JSON files.
"""

from __future__ import annotations

import json
from pathlib import Path

import contourpy
import numpy as np
from PIL import Image

from medinfer import io
from medinfer.volume import Volume

DATA = Path(__file__).resolve().parents[1] / "data" / "slices"
CT = DATA / "ct_head_3mm.nii.gz"
LABELS = DATA / "ct_head_3mm_labels.nii.gz"


def _rot(axis: int, deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    a, b = [i for i in range(3) if i != axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def regrid(vol: Volume, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Volume:
    """Same physical image stored with permuted / flipped voxel axes.

    New axis n is old axis ``perm[n]``, reversed when ``flips[n]``.
    """
    arr = np.transpose(vol.channel(0), perm)
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for n, old in enumerate(perm):
        if flips[n]:
            arr = np.flip(arr, axis=n)
            m[old, n] = -1
            m[old, 3] = arr.shape[n] - 1
        else:
            m[old, n] = 1
    return Volume(np.ascontiguousarray(arr), vol.affine @ m, vol.meta)


def oblique(vol: Volume, spacing: tuple[float, float, float], rot: np.ndarray) -> Volume:
    """Same array with an oblique, anisotropic affine (a different physical placement)."""
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = [-71.25, 103.5, -12.75]
    return Volume(vol.array, aff, vol.meta)


#: frame name -> function(volume) -> volume
FRAMES = {
    # the real file as it is: RAS, 3 mm
    "RAS": lambda v: v,
    # DICOM-like LPS voxel order (i -> L, j -> P), same physical image
    "LPS": lambda v: regrid(v, (0, 1, 2), (True, True, False)),
    # permuted and flipped axes (sagittal-acquisition-like "SPL"/"IPR"-type order)
    "PERMUTED": lambda v: regrid(v, (2, 1, 0), (True, False, True)),
    # oblique (25 deg about z, 15 deg about x), anisotropic 2.5 x 3.5 x 4 mm
    "OBLIQUE": lambda v: oblique(v, (2.5, 3.5, 4.0), _rot(0, 15.0) @ _rot(2, 25.0)),
    # oblique + LPS-like flips + permutation, anisotropic
    "OBLIQUE_LPS": lambda v: regrid(
        oblique(v, (3.0, 2.0, 3.3), _rot(1, -20.0) @ _rot(2, 30.0)), (1, 0, 2), (True, True, False)
    ),
}


def load_pair(frame: str) -> tuple[Volume, Volume]:
    """(CT, labels) of the test head CT in ``frame``."""
    f = FRAMES[frame]
    return f(io.load(CT)), f(io.load(LABELS))


def save(vol: Volume, path: Path) -> Path:
    """Save a test volume (int16 / uint8 kept)."""
    return io.save(vol, path)


def trace_label_png(png: Path, normalized: bool = False) -> list[dict]:
    """Polygon predictions (with holes) of every non-zero label in a label PNG."""
    a = np.array(Image.open(png))
    h, w = a.shape
    preds = []
    for v in np.unique(a):
        if v == 0:
            continue
        gen = contourpy.contour_generator(z=(a == v).astype(np.float64), fill_type="OuterOffset")
        polys, offsets = gen.filled(0.5, 1.5)
        for pts, off in zip(polys, offsets, strict=True):
            rings = [pts[off[i] : off[i + 1]] for i in range(len(off) - 1)]
            if normalized:
                rings = [r / np.array([w, h]) for r in rings]
            preds.append(
                {
                    "class_id": int(v),
                    "confidence": 0.9,
                    "polygon": rings[0].tolist(),
                    "holes": [r.tolist() for r in rings[1:]],
                }
            )
    return preds


def write_predictions(
    label_pngs: list[Path], out_dir: Path, patient_id: str, normalized: bool = False
) -> list[Path]:
    """Trace each label PNG and write ``{patient_id}_slice{index:04d}.json`` files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for png in label_pngs:
        index = int(png.stem.rsplit("_slice", 1)[1])
        a = np.array(Image.open(png))
        doc = {
            "patient_id": patient_id,
            "slice_index": index,
            "image_width": int(a.shape[1]),
            "image_height": int(a.shape[0]),
            "predictions": trace_label_png(png, normalized),
        }
        if normalized:
            doc["normalized"] = True
        p = out_dir / f"{patient_id}_slice{index:04d}.json"
        p.write_text(json.dumps(doc))
        paths.append(p)
    return paths


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def write_json(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def small_volume(shape: tuple[int, int, int] = (14, 11, 6)) -> Volume:
    """Small int16 image on an oblique, anisotropic, LPS-like grid (built in-test)."""
    rng = np.random.default_rng(3)
    aff = np.eye(4)
    aff[:3, :3] = _rot(2, 12.0) @ np.diag([-0.8, -1.3, 2.5])
    aff[:3, 3] = [40.0, 60.0, -30.0]
    return Volume(rng.integers(-100, 300, shape).astype(np.int16), aff)


def prediction_doc(
    patient_id: str, index: int, width: int, height: int, predictions: list[dict], **extra: object
) -> dict:
    """A prediction file's content."""
    return {
        "patient_id": patient_id,
        "slice_index": index,
        "image_width": width,
        "image_height": height,
        "predictions": predictions,
        **extra,
    }


def rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    """Rectangle outline with corners (x0, y0), (x1, y1) in pixel coordinates."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
