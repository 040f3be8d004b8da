"""Derive the small labelled head CT used by tests/slices (run once; not at test time).

Source: ct_head_brain_atlas_1mm.nii.gz (totalsegmentator wheel resources, Apache-2.0),
202x202x179, 1 mm, RAS, int16 HU, skull removed.

Steps: mean over 3x3x3 blocks (3 mm), crop to the brain's bounding box (+1 voxel),
Gaussian smoothing (sigma 0.7 voxel) for the labels only, then thresholded tissue
classes inside the brain mask: 1 = CSF-like (< 20 HU), 2 = low-density parenchyma
(20-35 HU, white-matter-like), 3 = high-density parenchyma (35-60 HU, grey-matter-like),
4 = hyperdense (>= 60 HU: vessels, calcification). Writes ct_head_3mm.nii.gz (int16) and
ct_head_3mm_labels.nii.gz (uint8) beside this script, with the source's RAS affine
scaled to 3 mm and shifted to the crop.

Usage: python tests/data/slices/make_data.py /work/shared/data/ct_head_brain_atlas_1mm.nii.gz
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def main(src: str) -> None:
    img = nib.load(src)
    a = np.asanyarray(img.dataobj).astype(np.float32)
    f = 3
    s = [d // f * f for d in a.shape]
    a = a[: s[0], : s[1], : s[2]]
    inside = (a != 0).reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean((1, 3, 5)) > 0.5
    b = a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean((1, 3, 5))
    idx = np.argwhere(inside)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, inside.shape)
    crop = tuple(slice(int(x), int(y)) for x, y in zip(lo, hi, strict=True))
    b, inside = b[crop], inside[crop]
    sm = ndimage.gaussian_filter(b, 0.7)
    lab = np.zeros(b.shape, np.uint8)
    lab[inside & (sm < 20)] = 1
    lab[inside & (sm >= 20) & (sm < 35)] = 2
    lab[inside & (sm >= 35) & (sm < 60)] = 3
    lab[inside & (sm >= 60)] = 4
    aff = img.affine.copy()
    aff[:3, :3] = aff[:3, :3] * f
    # centre of block (0,0,0) of the 3 mm grid is at 1 mm voxel (1, 1, 1); then the crop offset
    aff[:3, 3] = img.affine[:3, :3] @ (np.array([1.0, 1.0, 1.0]) + f * lo) + img.affine[:3, 3]
    out = Path(__file__).parent
    ct = np.rint(b).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, aff), out / "ct_head_3mm.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), out / "ct_head_3mm_labels.nii.gz")
    print(ct.shape, np.bincount(lab.ravel()))


if __name__ == "__main__":
    main(sys.argv[1])
