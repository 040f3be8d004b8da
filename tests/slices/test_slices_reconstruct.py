"""Reconstruction modes (batch, single patient, explicit original) and documented behaviour
for missing slices, clipping, unknown classes, malformed files and missing originals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from slices_helpers import (
    load_pair,
    prediction_doc,
    rect,
    save,
    small_volume,
    write_json,
    write_predictions,
)

from medinfer import io
from medinfer.errors import ConfigError, GeometryError, MedinferError
from medinfer.slices import (
    LabelTable,
    SliceReconstructionWarning,
    export_slices,
    reconstruct,
)
from medinfer.volume import Volume


def _crop(vol: Volume, n: int = 12) -> Volume:
    """A 12-slice slab of a test volume (keeps the tests fast)."""
    k0 = vol.spatial_shape[2] // 2 - n // 2
    aff = vol.affine.copy()
    aff[:3, 3] = vol.voxel_to_world([0, 0, k0])
    return Volume(np.ascontiguousarray(vol.channel(0)[:, :, k0 : k0 + n]), aff)


# ------------------------------------------------------------------ batch / modes
def test_batch_mixed_patients(tmp_path: Path) -> None:
    inference = tmp_path / "inference"
    pred = tmp_path / "predictions"
    refs = {}
    # alpha: RAS, axial, original found by its name
    _, lab = load_pair("RAS")
    lab = _crop(lab)
    save(lab, inference / "alpha.nii.gz")
    exp = export_slices(inference / "alpha.nii.gz", tmp_path / "exp_alpha", labels=True)
    write_predictions(list(exp.slice_paths), pred / "alpha", "alpha")
    refs["alpha"] = lab
    # beta_02: oblique LPS, coronal, nnU-Net style name in a sub-folder, metadata beside it
    _, lab = load_pair("OBLIQUE_LPS")
    lab = _crop(lab)
    save(lab, inference / "sub" / "beta_02_0000.nii.gz")
    exp = export_slices(
        inference / "sub" / "beta_02_0000.nii.gz",
        tmp_path / "exp_beta",
        axis="coronal",
        labels=True,
        patient_id="beta_02",
    )
    shutil.copy(exp.metadata_path, inference / "sub" / exp.metadata_path.name)
    write_predictions(list(exp.slice_paths), pred, "beta_02")
    refs["beta_02"] = lab
    # gamma: exported "elsewhere" (source path gone), file name unrelated to the id;
    # found through the metadata's source name inside the inference folder
    _, lab = load_pair("PERMUTED")
    lab = _crop(lab)
    elsewhere = save(lab, tmp_path / "elsewhere" / "scan_0042.nii.gz")
    exp = export_slices(
        elsewhere, inference / "gamma_png", axis="sagittal", labels=True, patient_id="gamma"
    )
    shutil.move(str(elsewhere), str(inference / "scan_0042.nii.gz"))
    write_predictions(list(exp.slice_paths), pred, "gamma")
    refs["gamma"] = lab
    (pred / "notes.json").write_text("{}")  # not a prediction file name: ignored

    results = reconstruct(pred, output=tmp_path / "out", inference_dir=inference)
    assert [r.patient_id for r in results] == ["alpha", "beta_02", "gamma"]
    assert results[1].original_image == inference / "sub" / "beta_02_0000.nii.gz"
    assert results[2].original_image == inference / "scan_0042.nii.gz"
    for r in results:
        assert r.mask_path == tmp_path / "out" / f"{r.patient_id}_pred_mask.nii.gz"
        mask = io.load(r.mask_path)
        np.testing.assert_array_equal(mask.channel(0), refs[r.patient_id].channel(0))
        np.testing.assert_allclose(mask.affine, io.load(r.original_image).affine, atol=1e-6)
        assert r.missing_slices == []
        for suffix in (".ctbl", "_labels.json", "_summary.json"):
            assert (tmp_path / "out" / f"{r.patient_id}_pred_mask{suffix}").is_file()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_patients"] == 3 and summary["num_failed"] == 0
    # the written header is a label map with the original's codes
    hdr = nib.load(str(results[0].mask_path)).header
    assert hdr.get_intent()[0] == "label"
    assert hdr.get_data_dtype() == np.int16


@pytest.fixture
def small_case(tmp_path: Path) -> dict:
    """One small oblique LPS-like patient 'p1': original, exported PNGs + metadata."""
    vol = small_volume()
    orig = save(vol, tmp_path / "inference" / "p1.nii.gz")
    exp = export_slices(orig, tmp_path / "png", axis="axial", window="bone")
    m = exp.mapping
    return {
        "tmp": tmp_path,
        "orig": orig,
        "mapping": m,
        "meta": exp.metadata_path,
        "pred": tmp_path / "pred",
        "w": m.width,
        "h": m.height,
        "n": m.num_slices,
    }


def _write(case: dict, index: int, preds: list[dict], pid: str = "p1", **extra: object) -> Path:
    doc = prediction_doc(pid, index, case["w"], case["h"], preds, **extra)
    return write_json(case["pred"] / f"{pid}_slice{index:04d}.json", doc)


def _all_slices(case: dict, preds: list[dict] | None = None, skip: tuple[int, ...] = ()) -> None:
    for i in range(case["n"]):
        if i not in skip:
            _write(case, i, preds if preds is not None else [])


def _expected(case: dict, slices: dict[int, np.ndarray]) -> np.ndarray:
    m = case["mapping"]
    stack = np.zeros((m.num_slices, m.height, m.width), np.int16)
    for i, a in slices.items():
        stack[i] = a
    return m.from_slices(stack)


def test_single_patient_and_output_file(small_case: dict) -> None:
    case = small_case
    _all_slices(case)
    _write(case, 2, [{"class_id": 3, "polygon": rect(1, 2, 4, 5)}])
    # another patient in the same folder must be left alone
    write_json(case["pred"] / "other_slice0000.json", {"broken": True})
    # a non-DICOM folder named like the patient is no candidate original
    write_json(case["tmp"] / "inference" / "p1" / "p1_slice0000.json", {})
    out = case["tmp"] / "single" / "p1_mask.nii.gz"
    (res,) = reconstruct(
        case["pred"], output=out, inference_dir=case["tmp"] / "inference", patient_id="p1"
    )
    assert res.mask_path == out and out.is_file()
    assert (case["tmp"] / "single" / "p1_mask.ctbl").is_file()
    sl = np.zeros((case["h"], case["w"]), np.int16)
    sl[2:6, 1:5] = 3
    np.testing.assert_array_equal(io.load(out).channel(0), _expected(case, {2: sl}))
    assert res.voxels_per_label[3] == 16
    with pytest.raises(MedinferError, match="no prediction files"):
        reconstruct(case["pred"], output=out, patient_id="nobody")


def test_explicit_original_overrides_search(small_case: dict) -> None:
    case = small_case
    _all_slices(case, [{"class_id": 1, "polygon": rect(0, 0, 2, 2)}])
    moved = case["tmp"] / "hidden" / "scan.nii.gz"
    moved.parent.mkdir()
    shutil.copy(case["orig"], moved)
    case["orig"].unlink()
    (res,) = reconstruct(
        case["pred"],
        output=case["tmp"] / "out",
        patient_id="p1",
        original_image=moved,
        metadata=case["meta"],
    )
    assert res.original_image == moved
    mask = io.load(res.mask_path)
    np.testing.assert_allclose(mask.affine, io.load(moved).affine, atol=1e-6)
    with pytest.raises(ConfigError, match="need --patient-id"):
        reconstruct(case["pred"], output=case["tmp"] / "o2", original_image=moved)


# ------------------------------------------------------------ documented behaviour
def test_missing_slices_reported_and_background(small_case: dict) -> None:
    case = small_case
    poly = [{"class_id": 2, "polygon": rect(0, 0, case["w"] - 1, case["h"] - 1)}]
    _all_slices(case, poly, skip=(1, 4))
    with pytest.warns(SliceReconstructionWarning, match=r"2 of 6 slices \(1, 4\)"):
        (res,) = reconstruct(
            case["pred"], output=case["tmp"] / "out", inference_dir=case["tmp"] / "inference"
        )
    assert res.missing_slices == [1, 4]
    summary = json.loads((case["tmp"] / "out" / "p1_pred_mask_summary.json").read_text())
    assert summary["missing_slices"] == [1, 4] and summary["num_missing_slices"] == 2
    full = np.full((case["h"], case["w"]), 2, np.int16)
    expected = _expected(case, {i: full for i in range(case["n"]) if i not in (1, 4)})
    np.testing.assert_array_equal(io.load(res.mask_path).channel(0), expected)


def test_polygon_outside_image_is_clipped_with_warning(small_case: dict) -> None:
    case = small_case
    _all_slices(case)
    _write(case, 0, [{"class_id": 1, "polygon": rect(-5, -5, 2, 3)}])
    with pytest.warns(SliceReconstructionWarning, match="clipped"):
        (res,) = reconstruct(
            case["pred"], output=case["tmp"] / "out", inference_dir=case["tmp"] / "inference"
        )
    sl = np.zeros((case["h"], case["w"]), np.int16)
    sl[0:4, 0:3] = 1
    np.testing.assert_array_equal(io.load(res.mask_path).channel(0), _expected(case, {0: sl}))
    assert any("clipped" in w for w in res.warnings)


def test_unknown_class_error_or_ignore(small_case: dict) -> None:
    case = small_case
    _all_slices(case)
    _write(case, 3, [{"class_id": 9, "polygon": rect(0, 0, 3, 3)}])
    with pytest.raises(MedinferError, match=r"p1_slice0003.json.*class_id 9"):
        reconstruct(case["pred"], output=case["tmp"] / "o", inference_dir=case["tmp"] / "inference")
    assert not (case["tmp"] / "o" / "p1_pred_mask.nii.gz").exists()
    with pytest.warns(SliceReconstructionWarning, match="class_id 9"):
        (res,) = reconstruct(
            case["pred"],
            output=case["tmp"] / "o",
            inference_dir=case["tmp"] / "inference",
            on_unknown_class="ignore",
        )
    assert not io.load(res.mask_path).channel(0).any()
    # a label table that knows class 9 accepts it
    table = case["tmp"] / "labels.yaml"
    table.write_text("9: {name: lesion core, color: [255, 0, 0]}\n")
    (res,) = reconstruct(
        case["pred"],
        output=case["tmp"] / "o3",
        inference_dir=case["tmp"] / "inference",
        labels=table,
    )
    assert res.voxels_per_label[9] == 16
    ctbl = (case["tmp"] / "o3" / "p1_pred_mask.ctbl").read_text().splitlines()
    assert "0 background 0 0 0 0" in ctbl and "9 lesion_core 255 0 0 255" in ctbl


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"patient_id": "p1", "slice_index": 0,', "malformed JSON"),
        ('{"patient_id": "p1", "slice_index": 0, "predictions": []}', "image_width"),
        (
            '{"patient_id": "p1", "slice_index": 0, "image_width": 14, "image_height": 11,'
            ' "predictions": [{"class_id": 1, "polygon": [[0, "a"], [1, 1], [2, 0]]}]}',
            "predictions/0/polygon/0/1",
        ),
        (
            '{"patient_id": "p2", "slice_index": 0, "image_width": 14, "image_height": 11,'
            ' "predictions": []}',
            "does not match the file name",
        ),
        (
            '{"patient_id": "p1", "slice_index": 0, "image_width": 11, "image_height": 14,'
            ' "predictions": []}',
            "does not match the exported slice grid",
        ),
    ],
)
def test_bad_prediction_files_name_the_file(small_case: dict, content: str, match: str) -> None:
    case = small_case
    _all_slices(case)
    (case["pred"] / "p1_slice0000.json").write_text(content)
    with pytest.raises(MedinferError, match=match) as info:
        reconstruct(case["pred"], output=case["tmp"] / "o", inference_dir=case["tmp"] / "inference")
    assert "p1_slice0000.json" in str(info.value)
    summary = json.loads((case["tmp"] / "o" / "summary.json").read_text())
    assert summary["num_failed"] == 1 and "p1_slice0000.json" in summary["patients"][0]["error"]


def test_slice_index_beyond_grid(small_case: dict) -> None:
    case = small_case
    _all_slices(case)
    _write(case, 40, [])
    with pytest.raises(MedinferError, match="slices 40"):
        reconstruct(case["pred"], output=case["tmp"] / "o", inference_dir=case["tmp"] / "inference")


def test_no_original_uses_metadata_with_warning(small_case: dict) -> None:
    case = small_case
    _all_slices(case, [{"class_id": 4, "polygon": rect(1, 1, 3, 3)}])
    expected_affine = io.load(case["orig"]).affine
    case["orig"].unlink()
    with pytest.warns(SliceReconstructionWarning, match="original image not found"):
        (res,) = reconstruct(
            case["pred"],
            output=case["tmp"] / "out",
            inference_dir=case["tmp"] / "png",  # holds the metadata only
        )
    assert res.original_image is None and "export metadata" in res.affine_source
    mask = io.load(res.mask_path)
    np.testing.assert_allclose(mask.affine, expected_affine, atol=1e-4)  # float32 sform
    assert mask.spatial_shape == case["mapping"].shape
    # neither original nor metadata: clear error
    case["meta"].unlink()
    with pytest.raises(MedinferError, match="neither the original image nor the export"):
        reconstruct(case["pred"], output=case["tmp"] / "o2", inference_dir=case["tmp"] / "png")


def test_original_that_disagrees_with_metadata(small_case: dict) -> None:
    case = small_case
    _all_slices(case)
    vol = io.load(case["orig"])
    shifted = vol.affine.copy()
    shifted[0, 3] += 5.0
    io.save(Volume(vol.array, shifted), case["orig"])
    with pytest.raises(GeometryError, match="does not match the export metadata"):
        reconstruct(
            case["pred"],
            output=case["tmp"] / "o",
            patient_id="p1",
            original_image=case["orig"],
            metadata=case["meta"],
        )


def test_wrong_axis_without_metadata(small_case: dict) -> None:
    case = small_case
    _all_slices(case)
    with pytest.raises(MedinferError, match="wrong --axis"):
        reconstruct(
            case["pred"],
            output=case["tmp"] / "o",
            inference_dir=case["tmp"] / "inference",
            axis="coronal",
        )


@pytest.mark.parametrize(
    ("preds", "winner"),
    [
        # higher confidence wins, whatever the class or order
        ([(1, 0.9), (2, 0.5)], 1),
        ([(2, 0.5), (1, 0.9)], 1),
        # equal confidence: later (higher) class id wins
        ([(2, 0.7), (1, 0.7)], 2),
        # no confidence (counts as 1.0): higher class id wins
        ([(3, None), (1, None)], 3),
        ([(1, None), (3, 0.99)], 1),
    ],
)
def test_overlap_rule(small_case: dict, preds: list, winner: int) -> None:
    case = small_case
    _all_slices(case)
    items = []
    for n, (cls, conf) in enumerate(preds):
        item: dict = {"class_id": cls, "polygon": rect(n, 0, n + 4, 4)}
        if conf is not None:
            item["confidence"] = conf
        items.append(item)
    _write(case, 0, items)
    (res,) = reconstruct(
        case["pred"], output=case["tmp"] / "o", inference_dir=case["tmp"] / "inference"
    )
    stack = case["mapping"].to_slices(io.load(res.mask_path).channel(0))
    assert stack[0, 2, 2] == winner  # pixel (x=2, y=2) lies in both polygons


def test_normalized_conventions(small_case: dict) -> None:
    case = small_case
    w, h = case["w"], case["h"]
    _all_slices(case)
    # pixel-centre rectangle 2..5 x 1..3, written normalised (centre convention)
    poly = (np.array(rect(2, 1, 5, 3)) / [w, h]).tolist()
    _write(case, 1, [{"class_id": 1, "polygon": poly}], normalized=True)
    (res,) = reconstruct(
        case["pred"], output=case["tmp"] / "c", inference_dir=case["tmp"] / "inference"
    )
    stack = case["mapping"].to_slices(io.load(res.mask_path).channel(0))
    exp = np.zeros((h, w), np.int16)
    exp[1:4, 2:6] = 1
    np.testing.assert_array_equal(stack[1], exp)
    # edge convention: x_px = x * W - 0.5 shifts the outline half a pixel up-left
    (res,) = reconstruct(
        case["pred"],
        output=case["tmp"] / "e",
        inference_dir=case["tmp"] / "inference",
        normalized_convention="edge",
    )
    stack = case["mapping"].to_slices(io.load(res.mask_path).channel(0))
    exp = np.zeros((h, w), np.int16)
    exp[1:3, 2:5] = 1  # centres with 1.5 <= x <= 4.5, 0.5 <= y <= 2.5
    np.testing.assert_array_equal(stack[1], exp)


def test_label_table_files_and_errors(tmp_path: Path) -> None:
    j = write_json(
        tmp_path / "t.json",
        {"labels": [{"value": 1, "name": "L1"}, {"value": 5, "name": "S1", "color": [1, 2, 3]}]},
    )
    t = LabelTable.from_file(j)
    assert t.values == [0, 1, 5] and t[5].color == (1, 2, 3)
    default = LabelTable.default()
    assert [lab.name for lab in default] == [
        "background",
        "vertebra",
        "intervertebral foramen",
        "sacrum",
        "spinal canal",
    ]
    for bad, match in [
        ({"1": "a", "01": "b"}, "given twice"),
        ({"x": "a"}, "not an integer"),
        ({"1": {"name": "a", "color": [300, 0, 0]}}, "colour"),
        ({"40000": "a"}, "int16"),
        ({"1": ""}, "non-empty name"),
        ([1, 2], "must be an object"),
    ]:
        with pytest.raises(ConfigError, match=match):
            LabelTable.from_mapping(bad)
    (tmp_path / "bad.yaml").write_text("1: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        LabelTable.from_file(tmp_path / "bad.yaml")


def test_metadata_search_prefers_image_exports(tmp_path: Path) -> None:
    from medinfer.slices.reconstruct import find_metadata

    write_json(tmp_path / "a" / "p9_export.json", {"content": "labels"})
    write_json(tmp_path / "a" / "deep" / "er" / "p9_export.json", {"content": "image"})
    assert find_metadata("p9", [None, tmp_path / "missing", tmp_path / "a"]) == (
        tmp_path / "a" / "deep" / "er" / "p9_export.json"
    )
    assert find_metadata("p8", [tmp_path]) is None


def test_option_conflicts(small_case: dict) -> None:
    case = small_case
    _all_slices(case)
    with pytest.raises(MedinferError, match="disagrees with the export metadata"):
        reconstruct(
            case["pred"],
            output=case["tmp"] / "o",
            inference_dir=case["tmp"] / "png",
            axis="sagittal",
        )
    with pytest.raises(ConfigError, match="needs --patient-id"):
        reconstruct(case["pred"], output=case["tmp"] / "o.nii.gz")
