"""RTSTRUCT and TID 1500 SR writers: dciodvfy clean, read back equal (Dice, 0.01 mm)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from io_helpers import GEOMETRIES, random_volume

from medinfer.errors import ConfigError, GeometryError
from medinfer.io import load, read_dicom
from medinfer.io.dicom_sr import read_dicom_sr, write_dicom_sr
from medinfer.io.dicom_writer import write_dicom_series
from medinfer.io.rtstruct import read_rtstruct, write_rtstruct
from medinfer.models import resolve_model
from medinfer.volume import Volume


def _series(tmp: Path, geometry: str, shape: tuple[int, int, int]) -> Volume:
    folder = tmp / f"series_{geometry}"
    write_dicom_series(random_volume(GEOMETRIES[geometry], shape), folder, modality="CT",
                       shuffle_seed=11)
    return read_dicom(folder)


def _dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]


@pytest.mark.parametrize("geometry", ["oblique_aniso", "lps_aniso"])
def test_rtstruct_valid_and_rasterises_back(tmp_path, geometry):  # type: ignore[no-untyped-def]
    card = resolve_model("demo-brain")[0]
    src = _series(tmp_path, geometry, (36, 30, 8))
    g = np.indices(src.spatial_shape)
    lab = np.zeros(src.spatial_shape, np.uint8)
    disc = (g[0] - 14) ** 2 + (g[1] - 14) ** 2
    lab[disc < 70] = 1
    lab[disc < 12] = 2  # a hole in ROI 1 filled by ROI 2
    lab[28:34, 4:24, 2:7] = 3
    lab[:, :, 0] = 0
    out = write_rtstruct(src.with_array(lab[None]), src.meta["source"], card,
                         tmp_path / "rt.dcm")
    assert _dciodvfy_errors(out) == []
    ds = pydicom.dcmread(out)
    assert ds.StudyInstanceUID == src.meta["study_instance_uid"]
    rois = {int(r.ROINumber): r.ROIName for r in ds.StructureSetROISequence}
    assert rois == {1: "cerebrospinal fluid", 2: "grey matter", 3: "white matter"}
    colors = {int(r.ReferencedROINumber): list(r.ROIDisplayColor) for r in ds.ROIContourSequence}
    assert colors[2] == list(card.labels[2].color)
    for rc in ds.ROIContourSequence:
        for c in rc.ContourSequence:
            ref = c.ContourImageSequence[0].ReferencedSOPInstanceUID
            assert ref in src.meta["sop_instance_uids"]
    back = load(out, reference=src.meta["source"])
    assert np.allclose(back.affine, src.affine)
    for v in (1, 2, 3):
        a, b = lab == v, back.array[0] == v
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.95
    with pytest.raises(ConfigError, match="reference"):
        load(out)
    other = _series(tmp_path, "las_oblique", (36, 30, 8))
    with pytest.raises(GeometryError, match="slice"):
        read_rtstruct(out, reference=other)


def test_sr_points_and_measurements(tmp_path):  # type: ignore[no-untyped-def]
    card = resolve_model("demo-nodules")[0]
    src = _series(tmp_path, "oblique_aniso", (20, 16, 6))
    centre = src.voxel_to_world([10.3, 7.6, 2.2])
    dets = [
        {"name": "F1", "coordinates": [float(v) for v in centre],
         "coordinates_lps": [-float(centre[0]), -float(centre[1]), float(centre[2])],
         "diameter_mm": 8.5, "confidence": 0.91, "properties": {"volume_mm3": 321.5},
         "triage": {"malignancy_score": 0.3, "risk_category": "intermediate"}},
        {"name": "F2", "coordinates_lps": [-123.456, 78.901, 234.567], "diameter_mm": 5.0,
         "confidence": 0.6, "properties": {"volume_mm3": 65.4},
         "triage": {"malignancy_score": None, "risk_category": None}},
    ]
    out = write_dicom_sr(dets, src.meta["source"], card, tmp_path / "sr.dcm")
    assert _dciodvfy_errors(out) == []
    ds = pydicom.dcmread(out)
    assert ds.StudyInstanceUID == src.meta["study_instance_uid"]
    assert ds.Modality == "SR"
    found = read_dicom_sr(out)
    assert [f["name"] for f in found] == ["F1", "F2"]
    for f, d in zip(found, dets, strict=True):
        assert np.abs(np.array(f["point_lps"]) - np.array(d["coordinates_lps"])).max() < 0.01
        assert f["frame_of_reference_uid"] == src.meta["frame_of_reference_uid"]
        assert f["measurements"]["Diameter"] == {"value": d["diameter_mm"], "unit": "mm"}
        assert f["measurements"]["Volume"]["value"] == pytest.approx(
            d["properties"]["volume_mm3"])
        assert f["measurements"]["Certainty of Finding"]["value"] == pytest.approx(
            d["confidence"])
    assert found[0]["evaluations"] == {"Risk category": "intermediate"}
    assert "Probability of cancer" not in found[1]["measurements"]
    marks = load(out, reference=src.meta["source"])
    assert marks.array[0, 10, 8, 2] == 1 and int((marks.array > 0).sum()) == 1
