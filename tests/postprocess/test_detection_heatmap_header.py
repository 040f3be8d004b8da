"""The detection heat-map NIfTI carries the scan's qform/sform codes (issue 17 item 7)."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medinfer.detection import write_case_outputs
from medinfer.io import read_nifti
from medinfer.models.loaders import resolve_model
from medinfer.postprocess.detection_config import DetectionConfig
from medinfer.volume import Volume


def test_heatmap_has_the_source_codes(tmp_path: Path) -> None:
    aff = np.array([[-0.8, 0.0, 0.1, 12.0], [0.0, -0.9, 0.0, -4.0], [-0.02, 0.0, 2.0, 7.5],
                    [0.0, 0.0, 0.0, 1.0]])
    src = nib.Nifti1Image(np.zeros((8, 9, 5), np.int16), None)
    src.header.set_sform(aff, code=2)
    src.header.set_qform(aff, code=0)
    nib.save(src, str(tmp_path / "scan.nii.gz"))
    scan = read_nifti(tmp_path / "scan.nii.gz")
    # as the pipeline makes it: a fresh Volume on the scan's grid, no source header
    heat = Volume(np.random.default_rng(0).random((1, 8, 9, 5)).astype(np.float32),
                  scan.affine, {})
    card, _ = resolve_model("demo-nodules")
    cfg = DetectionConfig.from_dict({"output": {"formats": ["heatmap"]}})
    paths, _ = write_case_outputs(tmp_path / "out", "scan", scan, heat, [], cfg, card=card,
                                  categories=["low", "high"], started=time.perf_counter())
    out = nib.load(str(paths["heatmap"]))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (0, 2)
    np.testing.assert_allclose(out.affine, aff, atol=1e-5)
