"""Acceptance 3 and 4: every output of ``medinfer predict --model demo-nodules`` for a scan
with findings and a scan without; JSON schema, CSV = JSON, heat map on the source grid;
PDF text, PNG slices, HTML in headless Chromium.

The scans are synthetic (lesions inserted into the bundled test copy of the head CT) on
oblique, anisotropic 2 mm grids, written as NIfTI into one folder (a batch).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medinfer.io import save
from medinfer.reporting.detections import CSV_COLUMNS, detection_schema, validate_detections
from medinfer.training.nodules_synth import (
    LesionAtlas,
    SyntheticLesion,
    random_grid,
    render_scan,
)

CT = Path(__file__).resolve().parents[1] / "data" / "ct" / "ct_head_brain_atlas_1mm.nii.gz"


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from medinfer.cli import main

    atlas = LesionAtlas.from_file(CT)
    rng = np.random.default_rng(7)
    centre = atlas.brain_center()
    lesions = atlas.sample_lesions(rng, 3, diameter_range=(12.0, 18.0), region=(centre, 40.0))
    lesions = [SyntheticLesion(les.center, les.radii, les.rotation, 130.0) for les in lesions]
    scans = tmp_path_factory.mktemp("scans")
    out = tmp_path_factory.mktemp("out")
    # the empty scan: a 70 mm field of view far from the host CT's lesion-like calcifications
    far = ndimage.distance_transform_edt(~atlas.lesion_like_mask())
    depth = far[tuple(atlas._cand_vox.T)]
    quiet = atlas._cand_world[int(np.argmax(depth))]
    geoms = {}
    for name, les, c, ext in (("with", lesions, centre, (130.0, 150.0, 120.0)),
                              ("none", [], quiet, (70.0, 70.0, 70.0))):
        aff, shape = random_grid(rng, c, ext, (1.8, 2.2))
        sc = render_scan(atlas, les, aff, shape, rng, noise_sigma_hu=4.0)
        save(sc.image, scans / f"{name}.nii.gz")
        geoms[name] = (aff, shape)
    with pytest.raises(SystemExit) as ei:
        main(["predict", str(scans), "--model", "demo-nodules", "-o", str(out),
              "--device", "cpu"])
    assert ei.value.code == 0
    return {"out": out, "lesions": lesions, "geoms": geoms, "scans": scans}


def _doc(batch: dict[str, Any], case: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((batch["out"] / f"{case}_detections.json").read_text())
    return doc


@pytest.mark.parametrize("case", ["with", "none"])
def test_all_outputs_exist_and_json_validates(batch: dict[str, Any], case: str) -> None:
    out = batch["out"]
    for suffix in ("_detections.json", "_detections.csv", "_heatmap.nii.gz",
                   "_visualization.png", "_3d.html", "_report.pdf"):
        p = out / f"{case}{suffix}"
        assert p.is_file() and p.stat().st_size > 0, p
    doc = _doc(batch, case)
    validate_detections(doc)
    import jsonschema

    jsonschema.Draft202012Validator(detection_schema()).validate(doc)
    assert doc["scan_id"] == case and doc["model"] == "demo-nodules"
    assert doc["timestamp"].endswith("Z")
    aff, shape = batch["geoms"][case]
    assert doc["metadata"]["shape"] == list(shape)
    np.testing.assert_allclose(doc["metadata"]["affine"], aff, atol=1e-5)
    assert doc["summary"]["num_detections"] == len(doc["detections"])
    assert sum(doc["summary"]["risk_categories"].values()) == len(doc["detections"])


def test_scan_with_lesions_has_findings_and_empty_scan_none(batch: dict[str, Any]) -> None:
    with_doc, none_doc = _doc(batch, "with"), _doc(batch, "none")
    assert none_doc["detections"] == []
    found = np.array([d["coordinates"] for d in with_doc["detections"]])
    assert len(found) >= len(batch["lesions"])
    for les in batch["lesions"]:
        assert np.min(np.linalg.norm(found - les.center, axis=1)) < les.diameter_mm / 2


def test_schema_rejects_wrong_keys(batch: dict[str, Any]) -> None:
    from medinfer.errors import MedinferError

    doc = _doc(batch, "with")
    bad = json.loads(json.dumps(doc))
    bad["detections"][0]["coords"] = bad["detections"][0].pop("coordinates")
    with pytest.raises(MedinferError, match="coords"):
        validate_detections(bad)
    bad = json.loads(json.dumps(doc))
    del bad["summary"]["processing_time_seconds"]
    with pytest.raises(MedinferError):
        validate_detections(bad)


@pytest.mark.parametrize("case", ["with", "none"])
def test_csv_equals_json(batch: dict[str, Any], case: str) -> None:
    doc = _doc(batch, case)
    with (batch["out"] / f"{case}_detections.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == len(doc["detections"])
    for row, d in zip(rows, doc["detections"], strict=True):
        assert row["scan_id"] == case and int(row["detection_id"]) == d["id"]
        assert row["name"] == d["name"]
        assert [float(row[k]) for k in ("coord_x", "coord_y", "coord_z")] == d["coordinates"]
        assert [float(row[k]) for k in ("x_lps", "y_lps", "z_lps")] == d["coordinates_lps"]
        assert [int(row[k]) for k in ("i", "j", "k")] == d["coordinates_voxel"]
        assert float(row["diameter_mm"]) == d["diameter_mm"]
        assert float(row["confidence"]) == d["confidence"]
        for k in ("volume_mm3", "mean_intensity", "std_intensity", "sphericity"):
            assert float(row[k]) == d["properties"][k]
        assert float(row["malignancy_score"]) == d["triage"]["malignancy_score"]
        assert row["risk_category"] == d["triage"]["risk_category"]
        # LPS is RAS with x and y negated
        assert d["coordinates_lps"] == pytest.approx(
            [-d["coordinates"][0], -d["coordinates"][1], d["coordinates"][2]])


@pytest.mark.parametrize("case", ["with", "none"])
def test_heatmap_on_source_grid(batch: dict[str, Any], case: str) -> None:
    src = nib.load(str(batch["scans"] / f"{case}.nii.gz"))
    hm = nib.load(str(batch["out"] / f"{case}_heatmap.nii.gz"))
    assert hm.shape == src.shape
    np.testing.assert_allclose(hm.affine, src.affine, atol=1e-5)
    data = np.asarray(hm.dataobj)
    # stored compactly: uint8 with scl_slope 1/255 (issue 17 item 14), read as 0..1
    assert hm.get_data_dtype() == np.uint8 and hm.dataobj.slope == pytest.approx(1 / 255)
    assert data.dtype.kind == "f" and data.min() >= 0.0 and data.max() <= 1.0
    if case == "with":  # the heat map is high at the finding centres
        doc = _doc(batch, case)
        for d in doc["detections"]:
            ijk = np.round(d["coordinates_voxel"]).astype(int)
            assert data[tuple(ijk)] > 0.4


def test_batch_summary_and_confidence_distribution(batch: dict[str, Any]) -> None:
    out = batch["out"]
    s = json.loads((out / "batch_summary.json").read_text())
    assert s["num_scans"] == 2
    n_with = len(_doc(batch, "with")["detections"])
    assert s["num_detections"] == n_with
    assert {r["scan_id"] for r in s["scans"]} == {"with", "none"}
    assert s["average_processing_time_seconds"] > 0
    assert (out / "batch_summary.csv").read_text().count("\n") == 3
    from PIL import Image

    with Image.open(out / "confidence_distribution.png") as im:
        assert im.size[0] > 300


# ---------------------------------------------------------------------- acceptance 4
def test_pdf_text_contains_each_finding_id(batch: dict[str, Any]) -> None:
    from pypdf import PdfReader

    for case in ("with", "none"):
        doc = _doc(batch, case)
        text = "\n".join(p.extract_text() for p in PdfReader(
            str(batch["out"] / f"{case}_report.pdf")).pages)
        assert f"Detection report: {case}" in text
        assert "demo-nodules" in text and "Model provenance" in text
        for d in doc["detections"]:
            assert d["name"] in text
        if not doc["detections"]:
            assert "No findings" in text


def test_png_shows_the_finding_slices(batch: dict[str, Any]) -> None:
    from PIL import Image

    from medinfer.io import load
    from medinfer.reporting.detection_figures import visualization_planes

    for case in ("with", "none"):
        doc = _doc(batch, case)
        vol = load(batch["scans"] / f"{case}.nii.gz")
        panels = visualization_planes(vol, doc["detections"], 6)
        with Image.open(batch["out"] / f"{case}_visualization.png") as im:
            desc = im.info["Description"]
            arr = np.asarray(im.convert("RGB"))
        assert desc == "; ".join(f"{fid or '-'}:axial:S={z:.2f}" for z, fid in panels)
        assert arr.std() > 10  # not a blank image
        if case == "with":
            assert [fid for _, fid in panels] == [d["name"] for d in doc["detections"][:6]]
            for (z_mm, fid), d in zip(panels, doc["detections"], strict=False):
                assert fid == d["name"]
                assert z_mm == d["coordinates"][2]  # the axial plane through the finding
            # the heat-map overlay (hot colormap: red-dominant pixels, not the yellow
            # orientation letters) is visible
            rgb = arr.astype(np.int16)
            red = (rgb[..., 0] - rgb[..., 1] > 60) & (rgb[..., 0] - rgb[..., 2] > 60)
            assert red.sum() > 50


def test_html_loads_in_headless_chromium(batch: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    html = batch["out"] / "with_3d.html"
    text = html.read_text()
    assert "<script src=\"http" not in text  # plotly.js inline: works offline
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(html.as_uri())
            page.wait_for_selector(".js-plotly-plot", timeout=60000)
            n_traces = page.evaluate(
                "() => document.querySelector('.js-plotly-plot').data.length")
            names = page.evaluate(
                "() => document.querySelector('.js-plotly-plot').data.map(t => t.name)")
        finally:
            browser.close()
    assert errors == []
    ids = [d["name"] for d in _doc(batch, "with")["detections"]]
    assert n_traces >= len(ids) + 1
    assert set(ids) <= set(names)
