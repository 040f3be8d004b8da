"""Region-based nnU-Net v1 models (``nnUNetTrainerV2BraTSRegions``): same labels as nnU-Net
v1's own ``nnUNet_predict``.

The model is initialised by v1's own region trainer class and written by its checkpoint
writer on the plans of ``Task991_BlobV1`` (:func:`nnunet_v1_cascade_oracle.region_model`,
cached); v1's predictor runs in its own process on CPU (outputs cached per input).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nnunet_oracle import blob_case, oblique_affine, save_nifti
from nnunet_v1_cascade_oracle import cached_v1_region_predictions, region_model

from medinfer import io
from medinfer.formats.nnunet_v1 import NnUNetV1Predictor
from medinfer.volume import Volume

pytestmark = pytest.mark.timeout(2400)


def test_region_model_same_labels_as_nnunet_v1_predict(tmp_path: Path) -> None:
    shape, spacing = (37, 18, 30), (0.95, 2.2, 1.1)  # oblique, LPS-like, anisotropic
    img, _ = blob_case(np.random.default_rng(11), shape, spacing)
    aff = oblique_affine(spacing, 17.0)
    for c in range(2):
        save_nifti(img[c], aff, tmp_path / f"oblique_{c:04d}.nii.gz")
    ref = np.asarray(nib.load(str(cached_v1_region_predictions(tmp_path, tta=False)
                                  / "oblique.nii.gz")).dataobj).astype(np.int64)
    predictor = NnUNetV1Predictor(region_model(), device="cpu", tta=False)
    assert predictor.v1.regions == ((1, 2, 3), (2, 3), (3,))
    assert predictor.v1.num_heads == 3 and sorted(predictor.card.labels) == [0, 1, 2, 3]
    vol = Volume(np.concatenate([io.load(tmp_path / f"oblique_{c:04d}.nii.gz").array
                                 for c in range(2)]), aff, {})
    lab = predictor.predict(vol).label.array[0].astype(np.int64)
    assert lab.shape == ref.shape == shape
    diff = int(np.sum(lab != ref))
    for v in (1, 2, 3):
        assert np.any(ref == v), f"oracle paints no label {v}"
        dice = 2.0 * float(np.sum((lab == v) & (ref == v))) / (np.sum(lab == v) + np.sum(ref == v))
        print(f"v1 regions label {v}: Dice {dice:.6f}, differing voxels {diff}")
        assert dice >= 0.999, (v, dice)
