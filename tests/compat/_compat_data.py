"""Small test scans for the compat tests: a crop of the head CT with inserted lesions."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

CT = Path(__file__).resolve().parents[1] / "data" / "ct" / "ct_head_brain_atlas_1mm.nii.gz"

#: lesions inserted into the crop: (voxel centre in the crop, radius in voxels = mm)
LESIONS = (((32, 30, 24), 6.0), ((14, 46, 20), 4.5))


def small_ct(path: Path) -> list[tuple[np.ndarray, float]]:
    """Write a 64 x 64 x 48 mm crop of the head CT (1 mm, stored with the first axis
    flipped, i.e. not RAS) with two solid lesions of 120 HU (12 and 9 mm) in brain tissue.

    Returns the lesions as (centre RAS mm, diameter mm).
    """
    img = nib.load(str(CT))
    data = np.asanyarray(img.dataobj).astype(np.int16)
    c = [s // 2 for s in data.shape]
    crop = data[c[0] - 32:c[0] + 32, c[1] - 32:c[1] + 32, c[2] - 24:c[2] + 24].copy()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in crop.shape], indexing="ij"))
    aff = img.affine.copy()
    aff[:3, 3] = (img.affine @ [c[0] - 32, c[1] - 32, c[2] - 24, 1])[:3]
    out = []
    for centre, r in LESIONS:
        crop[((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0) < r * r] = 120
        out.append(((aff @ [*centre, 1.0])[:3], 2 * r))
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, crop.shape[0] - 1
    nib.save(nib.Nifti1Image(crop[::-1], aff @ flip), str(path))
    return out
