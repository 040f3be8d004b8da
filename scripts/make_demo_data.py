"""Data preparation of the bundled ``demo-brain`` model: its training case, its
bundled sample and the geometry acceptance test's reference data.

Everything is derived from the MNI ICBM152 2009a template in ``../shared/data`` (see
``DATA_NOTICE.md``); this script is the only place that reads it (nothing reads it at run
or test time). Labels: 0 background (outside the brain mask), 1 CSF, 2 grey matter (GM),
3 white matter (WM):

- brain mask = ``T1 > 0`` with holes filled (the template is skull-stripped);
- CSF probability = ``clip(255 - GM - WM, 0, 255)`` inside the mask;
- label = ``1 + argmax(CSF, GM, WM)`` inside the mask, 0 outside.

Sub-commands:

``brain-train --out DIR``
    Writes the training data of ``configs/demo-brain.yaml`` in nnU-Net layout
    (``DIR/imagesTr/<case>_0000.nii.gz``, ``DIR/labelsTr/<case>.nii.gz``): case
    ``mni152`` (the T1 cropped to the brain + 4 voxels, 1 mm RAS, float32) for training,
    and case ``mni152val`` (the same anatomy acquired obliquely, 10 deg about (1, 0.3, 0.2),
    1.0 x 2.2 x 1.0 mm with slice-profile blur; labels nearest) for validation. The
    augmentation (simulated acquisitions) is done by the trainer
    (:mod:`medinfer.training.acquisition`)::

        .venv/bin/python scripts/make_demo_data.py brain-train --out ../data/demo-brain
        .venv/bin/medinfer train --config configs/demo-brain.yaml

``brain-samples``
    Writes the bundled sample ``samples/t1_sample.nii.gz`` (oblique, anisotropic,
    LPS-stored, intensity-scaled int16, NOT on the training grid), its reference label
    map and the cropped 1 mm T1 + reference labels used by the geometry acceptance test
    under ``tests/data/brain/``.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

LOG = logging.getLogger("make_demo_data")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


# ----------------------------------------------------------------------------- source
def load_source(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load the MNI152 T1 and build the reference label map.

    Returns
    -------
    t1 : float32 ``(I, J, K)`` = (197, 233, 189), template intensities 0..255.
    labels : uint8 ``(I, J, K)``, values 0 background, 1 CSF, 2 GM, 3 WM.
    affine : float64 (4, 4), voxel -> RAS+ mm (1 mm, RAS).
    """
    t1_img: Any = nib.load(str(data_dir / "mni152_t1_1mm.nii.gz"))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm_img: Any = nib.load(str(data_dir / "mni152_gm_prob_1mm.nii.gz"))
    wm_img: Any = nib.load(str(data_dir / "mni152_wm_prob_1mm.nii.gz"))
    gm = np.asarray(gm_img.dataobj, dtype=np.float32)
    wm = np.asarray(wm_img.dataobj, dtype=np.float32)
    mask = ndi.binary_fill_holes(t1 > 0)
    csf = np.clip(255.0 - gm - wm, 0.0, 255.0)
    labels = np.where(mask, 1 + np.argmax(np.stack([csf, gm, wm]), axis=0), 0).astype(np.uint8)
    return t1, labels, np.asarray(t1_img.affine, dtype=np.float64)


def crop_to_labels(t1: np.ndarray, labels: np.ndarray, affine: np.ndarray, margin: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop both arrays to the bounding box of ``labels > 0`` plus ``margin`` voxels."""
    idx = np.argwhere(labels > 0)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, labels.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return t1[sl], labels[sl], new_affine


# --------------------------------------------------------------------------- geometry
def resample(src: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray,
             dst_shape: tuple[int, int, int], mode: str = "bilinear") -> torch.Tensor:
    """Sample ``src`` ``(C, I, J, K)`` at the voxel centres of another grid.

    Trilinear (``mode="bilinear"``) or nearest; points outside ``src`` get 0. Both
    affines map voxel indices to RAS+ mm. Returns float32 ``(C, *dst_shape)``.
    """
    m = np.linalg.inv(src_affine) @ dst_affine
    size = np.asarray(src.shape[1:], dtype=np.float64)
    axes = [torch.arange(n, dtype=torch.float32) for n in dst_shape]
    grid = torch.empty((*dst_shape, 3), dtype=torch.float32)
    for a in range(3):  # grid_sample wants (x, y, z) = (K, J, I), normalised to [-1, 1]
        row = m[a] * (2.0 / (size[a] - 1.0))
        c = (axes[0] * float(row[0]))[:, None, None] + (axes[1] * float(row[1]))[None, :, None]
        c = c + (axes[2] * float(row[2]))[None, None, :] + float(row[3] - 1.0)
        grid[..., 2 - a] = c
    out = F.grid_sample(src[None].float(), grid[None], mode=mode, padding_mode="zeros",
                        align_corners=True)
    return out[0]


def rotation_about(axis: tuple[float, float, float], deg: float) -> np.ndarray:
    """Rotation matrix of ``deg`` degrees about ``axis`` (Rodrigues)."""
    u = np.asarray(axis, dtype=np.float64)
    u /= np.linalg.norm(u)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    theta = np.deg2rad(deg)
    return np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * (k @ k)


def acquire(t1: np.ndarray, labels: np.ndarray, affine: np.ndarray, rot: np.ndarray,
            spacing: np.ndarray, fov: float = 1.0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1 (slice-profile blur, linear) and labels (nearest) on a grid with direction
    ``rot`` and voxel size ``spacing`` (mm) around the source's centre; the grid covers
    ``fov`` times the source's extent along each of its axes."""
    shape = np.asarray(t1.shape)
    centre = affine[:3, :3] @ ((shape - 1) / 2) + affine[:3, 3]
    out_shape = np.ceil(shape * fov / spacing).astype(int)
    s_aff = np.eye(4)
    s_aff[:3, :3] = rot * spacing[None, :]
    s_aff[:3, 3] = centre - s_aff[:3, :3] @ ((out_shape - 1) / 2)
    fine = ndi.gaussian_filter(t1.astype(np.float32),
                               sigma=np.sqrt(np.maximum(spacing**2 - 1, 0)) / 2.355)
    t = resample(torch.from_numpy(fine)[None], affine, s_aff, tuple(out_shape))[0].numpy()
    lab = resample(torch.from_numpy(labels.astype(np.float32))[None], affine, s_aff,
                   tuple(out_shape), mode="nearest")[0].numpy()
    return t, np.rint(lab).astype(np.uint8), s_aff


def make_brain_train(args: argparse.Namespace) -> None:
    """Write the nnU-Net-layout training data of ``configs/demo-brain.yaml``."""
    t1, labels, affine = load_source(Path(args.data))
    t1, labels, affine = crop_to_labels(t1, labels, affine, margin=4)
    out = Path(args.out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    _save(t1.astype(np.float32), affine, out / "imagesTr" / "mni152_0000.nii.gz")
    _save(labels, affine, out / "labelsTr" / "mni152.nii.gz")
    t, lab, v_aff = acquire(t1, labels, affine, rotation_about((1.0, 0.3, 0.2), 10.0),
                            np.array([1.0, 2.2, 1.0]), fov=1.1)
    _save(t.astype(np.float32), v_aff, out / "imagesTr" / "mni152val_0000.nii.gz")
    _save(lab, v_aff, out / "labelsTr" / "mni152val.nii.gz")
    for p in sorted(out.glob("*/*.nii.gz")):
        LOG.info("%s: %d bytes", p, p.stat().st_size)


# ------------------------------------------------------------------------------ data
def lps_reorder(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Store an RAS-ish array in LPS voxel order (flip axes 0 and 1), affine adjusted."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    shape = arr.shape
    flip[0, 3] = shape[0] - 1
    flip[1, 3] = shape[1] - 1
    return np.ascontiguousarray(arr[::-1, ::-1]), affine @ flip


def make_data(args: argparse.Namespace) -> None:
    """Write the bundled sample and the test reference data (see module docstring)."""
    t1, labels, affine = load_source(Path(args.data))
    repo = Path(args.repo)
    tdir = repo / "tests" / "data" / "brain"
    tdir.mkdir(parents=True, exist_ok=True)

    # 1) cropped 1 mm T1 and reference labels for the geometry acceptance test
    ct1, clab, caff = crop_to_labels(t1, labels, affine, margin=3)
    _save(ct1.astype(np.uint8), caff, tdir / "mni152_t1_1mm_crop.nii.gz")
    _save(clab, caff, tdir / "mni152_labels_1mm_crop.nii.gz")

    # 2) the bundled sample: 12 deg about the oblique axis (1, 1, 0.5), 1.2 x 1.2 x 1.5 mm,
    #    LPS storage, x3.7 + 20 int16
    axis = np.array([1.0, 1.0, 0.5])
    axis /= np.linalg.norm(axis)
    theta = np.deg2rad(12.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * (k @ k)
    spacing = np.array([1.2, 1.2, 1.5])
    shape = np.asarray(ct1.shape)
    centre = caff[:3, :3] @ ((shape - 1) / 2) + caff[:3, 3]
    out_shape = np.ceil(shape * 1.08 / spacing).astype(int)
    s_aff = np.eye(4)
    s_aff[:3, :3] = rot * spacing[None, :]
    s_aff[:3, 3] = centre - s_aff[:3, :3] @ ((out_shape - 1) / 2)
    fine = ndi.gaussian_filter(ct1.astype(np.float32),
                               sigma=np.sqrt(np.maximum(spacing**2 - 1, 0)) / 2.355)
    t = resample(torch.from_numpy(fine)[None], caff, s_aff, tuple(out_shape))[0].numpy()
    lab = resample(torch.from_numpy(clab.astype(np.float32))[None], caff, s_aff,
                   tuple(out_shape), mode="nearest")[0].numpy()
    t = np.rint(t * 3.7 + 20.0).astype(np.int16)
    lab = np.rint(lab).astype(np.uint8)
    t, s_aff_lps = lps_reorder(t, s_aff)
    lab, _ = lps_reorder(lab, s_aff)
    (repo / "samples").mkdir(exist_ok=True)
    _save(t, s_aff_lps, repo / "samples" / "t1_sample.nii.gz")
    _save(lab, s_aff_lps, tdir / "t1_sample_labels.nii.gz")
    for p in sorted(tdir.glob("*.nii.gz")) + [repo / "samples" / "t1_sample.nii.gz"]:
        LOG.info("%s: %d bytes", p, p.stat().st_size)


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tmp = path.with_name("." + path.name + ".part.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("brain-train", help="write the demo-brain training data")
    tr.add_argument("--data", default=str(DEFAULT_DATA), help="folder with the MNI152 files")
    tr.add_argument("--out", required=True, help="output folder (imagesTr/, labelsTr/)")
    da = sub.add_parser("brain-samples",
                        help="write the bundled sample and the test reference data")
    da.add_argument("--data", default=str(DEFAULT_DATA))
    da.add_argument("--repo", default=str(REPO))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "brain-train":
        make_brain_train(args)
    else:
        make_data(args)


if __name__ == "__main__":
    main()
