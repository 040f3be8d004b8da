"""Derive the real-scan test/benchmark files of the data pipeline (run once, by hand).

Reads ``../shared/data`` (never at test time) and writes ``tests/data_pipeline/data/``:

- ``ct_head_1mm_air.nii.gz``: ``ct_head_brain_atlas_1mm.nii.gz`` (int16 HU, 1 mm, RAS)
  with the zero-valued background that touches the volume border set to -1024 HU (air),
  so that the file looks like a CT (air outside the head) rather than a masked image.
- ``mni152_t1_1mm.nii.gz``: copied unchanged.

Usage: ``.venv/bin/python tests/data_pipeline/derive_data.py [SHARED_DATA_DIR]``
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
    out = Path(__file__).resolve().parent / "data"
    out.mkdir(exist_ok=True)
    ct = nib.load(str(src / "ct_head_brain_atlas_1mm.nii.gz"))
    arr = np.asarray(ct.dataobj).astype(np.int16)
    zero = arr == 0
    labels, _ = ndimage.label(zero)
    border = np.unique(
        np.concatenate(
            [labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]
        )
    )
    air = np.isin(labels, border[border > 0])
    arr[air] = -1024
    img = nib.Nifti1Image(arr, ct.affine)
    img.set_qform(ct.affine, code=1)
    img.set_sform(ct.affine, code=1)
    img.set_data_dtype(np.int16)
    nib.save(img, str(out / "ct_head_1mm_air.nii.gz"))
    shutil.copyfile(src / "mni152_t1_1mm.nii.gz", out / "mni152_t1_1mm.nii.gz")


if __name__ == "__main__":
    main()
