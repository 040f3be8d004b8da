"""Issue 11, acceptance 4: the slice tool's documented command lines, run as written.

A working folder laid out as the slice-model workflow documents it::

    data/inference/patient_test001.nii.gz     oblique, anisotropic, LPS-like voxel order
    data/inference/john-smith/                an oblique DICOM series (LPS at the boundary)
    outputs/inference/predictions/{id}_slice{index}.json   unpadded and padded indices

The predictions are label slices traced into polygons. Every documented command line
(script path replaced by the medinfer command) must rebuild masks that overlay the
original exactly: Dice 1.0 per label, same grid, same affine; and write QC overlays.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slices_helpers import dice, load_pair, save, write_predictions

from medinfer import io
from medinfer.io.dicom_writer import write_dicom_series
from medinfer.slices import export_slices
from medinfer.volume import Volume

P1, P2 = "patient_test001", "john-smith"


def _labels_of(vol: Volume) -> Volume:
    """Tissue classes of a head CT by HU (on the scan's own grid): 1 bone, 2 brain, 4 fat."""
    hu = vol.channel(0).astype(np.float32)
    lab = np.zeros(hu.shape, dtype=np.int16)
    lab[(hu > -150) & (hu < -20)] = 4
    lab[(hu >= 0) & (hu < 80)] = 2
    lab[hu >= 300] = 1
    return Volume(lab[None], vol.affine, {})


def _predictions(label_vol: Volume, work: Path, pid: str, pad: int) -> None:
    """Export the label slices, trace them, and name the files with ``pad`` digits."""
    lab_path = save(label_vol, work / "ref" / f"{pid}.nii.gz")
    exp = export_slices(lab_path, work / "ref_png" / pid, axis="axial", labels=True)
    pred_dir = work / "outputs" / "inference" / "predictions"
    for p in write_predictions(list(exp.slice_paths), work / "tmp_pred", pid):
        index = int(p.stem.rsplit("_slice", 1)[1])
        p.rename(pred_dir / f"{pid}_slice{index:0{pad}d}.json")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slice_workflow")
    (root / "outputs" / "inference" / "predictions").mkdir(parents=True)
    ct, labels = load_pair("OBLIQUE_LPS")
    save(ct, root / "data" / "inference" / f"{P1}.nii.gz")
    _predictions(labels, root, P1, pad=1)  # patient_test001_slice90.json style
    ct2, _ = load_pair("OBLIQUE")
    write_dicom_series(ct2, root / "data" / "inference" / P2, modality="CT", shuffle_seed=4)
    scan2 = io.load(root / "data" / "inference" / P2)
    _predictions(_labels_of(scan2), root, P2, pad=3)
    return root


def _run(work: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), cwd=work, capture_output=True, text=True, timeout=300, check=False
    )


def _check_mask(mask_path: Path, original: Path, reference: Path) -> None:
    mask, orig, ref = io.load(mask_path), io.load(original), io.load(reference)
    assert mask.array.dtype == np.int16
    assert mask.spatial_shape == orig.spatial_shape
    np.testing.assert_allclose(mask.affine, orig.affine, atol=1e-6, rtol=0)
    got, want = mask.channel(0), ref.channel(0)
    for v in np.unique(want):
        if v:
            assert dice(got == v, want == v) == 1.0, (mask_path, int(v))


def _check_qc(folder: Path, pid: str) -> None:
    pngs = sorted(folder.glob(f"{pid}_*.png"))
    assert 1 <= len(pngs) <= 3, pngs
    rgb = np.asarray(Image.open(pngs[0]).convert("RGB")).astype(int)
    colour = (np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])) > 30
    assert colour.any()  # labels and polygon outlines are drawn in colour over grey


def _fresh(work: Path) -> None:
    for d in ("outputs/masks", "outputs/custom_masks"):
        shutil.rmtree(work / d, ignore_errors=True)


def test_batch_mode_defaults_console_script(work: Path) -> None:
    """``python scripts/run_predictions_to_nifti.py`` -> ``medinfer slices reconstruct``."""
    _fresh(work)
    exe = Path(sys.executable).with_name("medinfer")
    r = _run(work, str(exe), "slices", "reconstruct")
    assert r.returncode == 0, r.stderr
    masks = work / "outputs" / "masks"
    _check_mask(
        masks / f"{P1}_pred_mask.nii.gz",
        work / "data" / "inference" / f"{P1}.nii.gz",
        work / "ref" / f"{P1}.nii.gz",
    )
    _check_mask(
        masks / f"{P2}_pred_mask.nii.gz",
        work / "data" / "inference" / P2,
        work / "ref" / f"{P2}.nii.gz",
    )
    _check_qc(masks / "qc", P1)
    _check_qc(masks / "qc", P2)


@pytest.mark.parametrize(
    "argv",
    [
        ["--patient_id", P1],
        ["--patient-id", P1, "--original-image", f"data/inference/{P1}.nii.gz"],
    ],
)
def test_single_patient_lines(work: Path, argv: list[str]) -> None:
    _fresh(work)
    r = _run(work, sys.executable, "-m", "medinfer.slices", "reconstruct", *argv)
    assert r.returncode == 0, r.stderr
    masks = work / "outputs" / "masks"
    assert sorted(p.name for p in masks.glob("*.nii.gz")) == [f"{P1}_pred_mask.nii.gz"]
    _check_mask(
        masks / f"{P1}_pred_mask.nii.gz",
        work / "data" / "inference" / f"{P1}.nii.gz",
        work / "ref" / f"{P1}.nii.gz",
    )
    _check_qc(masks / "qc", P1)


def test_custom_paths_line(work: Path) -> None:
    """``... --predictions ... --output outputs/custom_masks --inference_dir data/inference``
    through ``python -m medinfer slices reconstruct``."""
    _fresh(work)
    r = _run(
        work, sys.executable, "-m", "medinfer", "slices", "reconstruct",
        "--predictions", "outputs/inference/predictions", "--output", "outputs/custom_masks",
        "--inference_dir", "data/inference",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = work / "outputs" / "custom_masks"
    _check_mask(
        out / f"{P2}_pred_mask.nii.gz",
        work / "data" / "inference" / P2,
        work / "ref" / f"{P2}.nii.gz",
    )
    _check_qc(out / "qc", P2)


def test_module_level_line(work: Path) -> None:
    """``python -m src.yolo.predictions_to_nifti ...`` ->
    ``python -m medinfer.slices.reconstruct ...`` (the same options)."""
    _fresh(work)
    mask = f"outputs/masks/{P1}_pred_mask.nii.gz"
    r = _run(
        work, sys.executable, "-m", "medinfer.slices.reconstruct",
        "--predictions", "outputs/inference/predictions", "--patient_id", P1,
        "--output", mask, "--original_image", f"data/inference/{P1}.nii.gz",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" not in r.stderr
    _check_mask(
        work / mask, work / "data" / "inference" / f"{P1}.nii.gz", work / "ref" / f"{P1}.nii.gz"
    )
    _check_qc(work / "outputs" / "masks" / "qc", P1)


def test_bad_input_exit_2_one_line(work: Path) -> None:
    r = _run(work, sys.executable, "-m", "medinfer.slices.reconstruct", "--patient_id", "nobody")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "patient 'nobody'" in r.stderr
