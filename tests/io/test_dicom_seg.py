"""DICOM SEG writer and reader: dciodvfy, dcmqi and highdicom as independent oracles.

Source series are oblique / LPS / anisotropic, written in shuffled file order.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from io_helpers import GEOMETRIES, random_volume

from medinfer.errors import ConfigError, GeometryError
from medinfer.io import load, read_dicom
from medinfer.io.dicom_seg import (
    find_label_metadata,
    read_dicom_seg,
    read_label_metadata,
    segment_infos,
    write_dicom_seg,
)
from medinfer.io.dicom_writer import write_dicom_series
from medinfer.models import resolve_model
from medinfer.volume import Volume

#: dcmqi's reader (PyPI ``dcmqi``, a dev dependency) next to the venv's python
DCMQI_BIN = Path(shutil.which("segimage2itkimage")
                 or Path(sys.executable).parent / "segimage2itkimage")


@pytest.fixture(scope="module")
def card():  # type: ignore[no-untyped-def]
    return resolve_model("demo-brain")[0]


def _series(tmp: Path, geometry: str, shape: tuple[int, int, int] = (24, 18, 10)) -> Volume:
    folder = tmp / f"series_{geometry}"
    write_dicom_series(random_volume(GEOMETRIES[geometry], shape), folder, modality="CT",
                       shuffle_seed=7)
    return read_dicom(folder)


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[3:11, 4:9, 2:6] = 1
    lab[13:20, 2:7, 5:9] = 3  # label 2 absent: its segment is omitted
    lab[6:9, 10:15, 1:3] = 5  # not in the card: generic code
    return lab


def _dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]


@pytest.mark.parametrize("geometry", ["oblique_aniso", "lps_aniso"])
def test_binary_seg_valid_and_equal_for_dcmqi_and_highdicom(tmp_path, card, geometry):  # type: ignore[no-untyped-def]
    src = _series(tmp_path, geometry)
    lab = _labels(src.spatial_shape)
    label = src.with_array(lab[None])
    seg_path = write_dicom_seg(label, src.meta["source"], card, tmp_path / "seg.dcm")

    assert _dciodvfy_errors(seg_path) == []
    ds = pydicom.dcmread(seg_path)
    assert ds.StudyInstanceUID == src.meta["study_instance_uid"]
    assert ds.FrameOfReferenceUID == src.meta["frame_of_reference_uid"]
    assert ds.SeriesInstanceUID != src.meta["series_instance_uid"]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.meta["series_instance_uid"]
    assert "demo-brain" in ds.SeriesDescription
    names = [s.SegmentLabel for s in ds.SegmentSequence]
    assert names == ["cerebrospinal fluid", "white matter", "label 5"]
    csf = ds.SegmentSequence[0]
    assert csf.SegmentedPropertyTypeCodeSequence[0].CodeValue == "65216001"
    assert csf.SegmentAlgorithmName == "demo-brain"
    assert csf.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[
        0].CodeMeaning == "Artificial Intelligence"
    # only frames where a segment is present
    expected_frames = sum(int((lab == v).any(axis=(0, 1)).sum()) for v in (1, 3, 5))
    assert int(ds.NumberOfFrames) == expected_frames
    for item in ds.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in src.meta["sop_instance_uids"]

    # highdicom reading, on the reference grid
    back = read_dicom_seg(seg_path, reference=src.meta["source"])
    assert np.array_equal(back.array[0], lab)
    assert np.allclose(back.affine, src.affine)
    via_load = load(seg_path, reference=src.meta["source"])
    assert np.array_equal(via_load.array[0], lab)

    # dcmqi: one NIfTI per segment; compare in world space with our label map
    out = tmp_path / "dcmqi"
    out.mkdir()
    subprocess.run([str(DCMQI_BIN), "--inputDICOM", str(seg_path), "--outputDirectory",
                    str(out), "-t", "nifti"], check=True, capture_output=True, timeout=120)
    meta = json.loads((out / "meta.json").read_text())
    seg_of_label = {s["SegmentLabel"]: s["labelID"] for g in meta["segmentAttributes"]
                    for s in g}
    assert sorted(seg_of_label) == sorted(names)
    for number, value in zip((1, 2, 3), (1, 3, 5), strict=True):
        img = nib.load(str(out / f"{number}.nii.gz"))
        mask = np.asarray(img.dataobj) > 0
        # map each dcmqi voxel centre into our grid and compare
        idx = np.argwhere(np.ones(mask.shape, bool))
        world = nib.affines.apply_affine(img.affine, idx)
        ours = np.rint(src.world_to_voxel(world)).astype(int)
        inside = np.all((ours >= 0) & (ours < np.array(src.spatial_shape)), axis=1)
        assert np.abs(src.world_to_voxel(world) - ours).max() < 1e-3
        dq = mask.reshape(-1)
        assert not dq[~inside].any()
        o = ours[inside]
        assert np.array_equal(dq[inside], lab[o[:, 0], o[:, 1], o[:, 2]] == value)
        assert int(dq.sum()) == int((lab == value).sum())


def test_labelmap_fractional_and_compression_read_back(tmp_path, card):  # type: ignore[no-untyped-def]
    src = _series(tmp_path, "las_oblique", (16, 12, 7))
    lab = _labels(src.spatial_shape)
    label = src.with_array(lab[None])
    folder = src.meta["source"]
    for comp in ("none", "rle", "jpegls"):
        p = write_dicom_seg(label, folder, card, tmp_path / f"lm_{comp}.dcm", seg_type="labelmap",
                            compression=comp)
        assert np.array_equal(read_dicom_seg(p, reference=folder).array[0], lab)
    with pytest.raises(ConfigError, match="BINARY"):
        write_dicom_seg(label, folder, card, tmp_path / "b.dcm", compression="rle")
    # JPEG 2000: written when its codec is installed, else refused naming the codec
    from pydicom.pixels import get_encoder

    if get_encoder("1.2.840.10008.1.2.4.90").is_available:
        p = write_dicom_seg(label, folder, card, tmp_path / "j2k.dcm", seg_type="labelmap",
                            compression="jpeg2000")
        assert np.array_equal(read_dicom_seg(p, reference=folder).array[0], lab)
    else:
        with pytest.raises(ConfigError, match="pylibjpeg"):
            write_dicom_seg(label, folder, card, tmp_path / "j2k.dcm", seg_type="labelmap",
                            compression="jpeg2000")
        assert not (tmp_path / "j2k.dcm").exists()
    prob = np.zeros((4, *src.spatial_shape), np.float32)
    for v in (1, 3):
        prob[v][lab == v] = 0.8
    prob[0] = 0.2
    p = write_dicom_seg(label, folder, card, tmp_path / "frac.dcm", seg_type="fractional",
                        probabilities=src.with_array(prob))
    assert _dciodvfy_errors(p) == []
    ds = pydicom.dcmread(p)
    assert ds.SegmentationType == "FRACTIONAL" and len(ds.SegmentSequence) == 2
    assert np.array_equal(read_dicom_seg(p, reference=folder).array[0],
                          np.where(lab == 5, 0, lab))


def test_grid_mismatch_and_permuted_grid(tmp_path, card):  # type: ignore[no-untyped-def]
    src = _series(tmp_path, "oblique_aniso", (16, 12, 7))
    lab = _labels(src.spatial_shape)
    # same grid with axes permuted and flipped (as a NIfTI from another tool): accepted
    flipped = Volume(np.ascontiguousarray(lab[::-1].transpose(2, 0, 1))[None],
                     src.affine @ _perm_flip(src.spatial_shape[0]))
    p = write_dicom_seg(flipped, src.meta["source"], card, tmp_path / "p.dcm")
    assert np.array_equal(read_dicom_seg(p, reference=src.meta["source"]).array[0], lab)
    shifted = src.affine.copy()
    shifted[:3, 3] += 0.4
    with pytest.raises(GeometryError, match="grid"):
        write_dicom_seg(Volume(lab[None], shifted), src.meta["source"], card, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def _perm_flip(n_i: int) -> np.ndarray:
    """Affine from index (k, i', j) with i' = n_i - 1 - i to (i, j, k)."""
    m = np.zeros((4, 4))
    m[0, 1] = -1.0
    m[0, 3] = n_i - 1
    m[1, 2] = 1.0
    m[2, 0] = 1.0
    m[3, 3] = 1.0
    return m


def test_label_metadata_mitk_and_dcmqi(tmp_path, card):  # type: ignore[no-untyped-def]
    mitk = tmp_path / "case1.mitklabel.json"
    mitk.write_text(json.dumps([{"labels": [
        {"value": 1, "name": "Liver", "color": {"type": "ColorProperty", "value": [1, 0, 0]}},
    ]}]))
    (tmp_path / "case1.nii.gz").write_bytes(b"")
    assert find_label_metadata(tmp_path / "case1.nii.gz") == mitk
    infos = segment_infos(card, read_label_metadata(mitk))
    assert infos[1].name == "Liver" and infos[1].color == (255, 0, 0)
    assert infos[1].type[0] == "10200004"
    dq = tmp_path / "seg-metadata.json"
    dq.write_text(json.dumps({"segmentAttributes": [[{
        "labelID": 3, "SegmentLabel": "WM", "recommendedDisplayRGBValue": [1, 2, 3],
        "SegmentedPropertyCategoryCodeSequence": {
            "CodeValue": "85756007", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Tissue"},
        "SegmentedPropertyTypeCodeSequence": {
            "CodeValue": "389079003", "CodingSchemeDesignator": "SCT",
            "CodeMeaning": "White matter"}}]]}))
    infos = segment_infos(card, read_label_metadata(dq))
    assert infos[3].name == "WM" and infos[3].color == (1, 2, 3)
    bad = tmp_path / "bad.mitklabel.json"
    bad.write_text(json.dumps([{"labels": [{"value": 0, "name": "x"}]}]))
    with pytest.raises(ConfigError, match="value"):
        read_label_metadata(bad)
