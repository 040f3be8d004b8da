"""PIVOT quick start, batch command, Python pipeline and ``optimize_model`` (issue 10).

The commands and the "Example Inference Pipeline" block of the PIVOT description run as
written with only module and file paths replaced (``docs/compat/pivot.md``), on a CT with
inserted lesions and the bundled ``demo-nodules`` model.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compat_data import small_ct

CSV_HEADER = ("scan_id,detection_id,coord_x,coord_y,coord_z,diameter_mm,confidence,"
              "malignancy_score,risk_category")

#: JSON Schema built from the description's example ``scan_detections.json`` (extra
#: fields allowed): the keys and value types it shows
DESCRIBED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["scan_id", "model", "timestamp", "metadata", "detections", "summary"],
    "properties": {
        "scan_id": {"type": "string"}, "model": {"type": "string"},
        "timestamp": {"type": "string"},
        "metadata": {"type": "object", "required": ["spacing", "shape"], "properties": {
            "spacing": {"type": "array", "items": {"type": "number"}, "minItems": 3,
                        "maxItems": 3},
            "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 3,
                      "maxItems": 3}}},
        "detections": {"type": "array", "items": {
            "type": "object",
            "required": ["id", "coordinates", "coordinates_voxel", "diameter_mm", "confidence",
                         "properties", "triage"],
            "properties": {
                "id": {"type": "integer"},
                "coordinates": {"type": "array", "items": {"type": "number"}, "minItems": 3,
                                "maxItems": 3},
                "coordinates_voxel": {"type": "array", "items": {"type": "integer"},
                                      "minItems": 3, "maxItems": 3},
                "diameter_mm": {"type": "number"}, "confidence": {"type": "number"},
                "properties": {"type": "object",
                               "required": ["volume_mm3", "mean_intensity", "std_intensity"],
                               "properties": {"volume_mm3": {"type": "number"},
                                              "mean_intensity": {"type": "number"},
                                              "std_intensity": {"type": "number"}}},
                "triage": {"type": "object", "required": ["malignancy_score", "risk_category"],
                           "properties": {"malignancy_score": {"type": "number"},
                                          "risk_category": {"type": "string"}}}}}},
        "summary": {"type": "object", "required": ["num_detections", "high_risk_count",
                                                   "low_risk_count", "processing_time_seconds"],
                    "properties": {"num_detections": {"type": "integer"},
                                   "high_risk_count": {"type": "integer"},
                                   "low_risk_count": {"type": "integer"},
                                   "processing_time_seconds": {"type": "number"}}}},
}


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("pivot")
    lesions = small_ct(folder / "scan.nii.gz")
    return {"dir": folder, "lesions": lesions}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False)


def _hits(dets: list[dict[str, Any]], lesions: list[Any]) -> int:
    c = np.array([d["coordinates"] for d in dets]).reshape(-1, 3)
    return sum(bool(len(c)) and float(np.linalg.norm(c - centre, axis=1).min()) <= diam / 2
               for centre, diam in lesions)


@pytest.fixture(scope="module")
def quickstart(scan: dict[str, Any]) -> dict[str, Any]:
    """``python -m src.inference.main --checkpoint ... --input scan.nii.gz --output results/``
    with the module path and checkpoint replaced."""
    r = _run(["-m", "medinfer", "detect", "--checkpoint", "demo-nodules",
              "--input", "scan.nii.gz", "--output", "results/", "--device", "cpu"],
             scan["dir"])
    assert r.returncode == 0, r.stderr
    return {"stdout": r.stdout, "out": scan["dir"] / "results"}


def test_quickstart_writes_the_three_files(scan: dict[str, Any],
                                           quickstart: dict[str, Any]) -> None:
    out = quickstart["out"]
    for name in ("scan_detections.json", "scan_heatmap.nii.gz", "scan_visualization.png"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "scan_detections.json").read_text())
    jsonschema.Draft202012Validator(DESCRIBED_SCHEMA).validate(doc)
    dets = doc["detections"]
    assert [d["id"] for d in dets] == list(range(len(dets)))
    assert doc["summary"]["num_detections"] == len(dets)
    assert _hits(dets, scan["lesions"]) == 2
    # the findings table and the count are printed
    assert "finding(s)" in quickstart["stdout"] and "Total detections" in quickstart["stdout"]
    for d in dets:
        assert f"{d['coordinates'][0]:.1f}" in quickstart["stdout"]


def test_batch_command_and_csv(scan: dict[str, Any], quickstart: dict[str, Any],
                               tmp_path: Path) -> None:
    """``--input-dir/--output-dir/--batch-size/--num-workers`` via
    ``python -m medinfer.compat.pivot.main`` (the description's flags, no sub-command),
    with a config asking for CSV too."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        shutil.copy(scan["dir"] / "scan.nii.gz", scans / f"{name}.nii.gz")
    cfg = tmp_path / "inference.yaml"
    cfg.write_text("output:\n  save_heatmap: false\n  save_visualization: false\n"
                   "  formats:\n    detections: both\n")
    r = _run(["-m", "medinfer.compat.pivot.main", "--checkpoint", "demo-nodules",
              "--input-dir", str(scans), "--output-dir", str(tmp_path / "results"),
              "--batch-size", "4", "--num-workers", "2", "--config", str(cfg),
              "--device", "cpu"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Processed 2 scans" in r.stdout
    res = tmp_path / "results"
    ref = json.loads((quickstart["out"] / "scan_detections.json").read_text())["detections"]
    summary = json.loads((res / "batch_summary.json").read_text())
    assert summary["num_scans"] == 2 and summary["total_detections"] == 2 * len(ref)
    for name in ("a", "b"):
        assert not (res / f"{name}_heatmap.nii.gz").exists()
        doc = json.loads((res / f"{name}_detections.json").read_text())
        assert doc["detections"] == ref
        lines = (res / f"{name}_detections.csv").read_text().splitlines()
        assert lines[0].startswith(CSV_HEADER + ",")
        rows = list(csv.DictReader(lines))
        assert [(r["scan_id"], int(r["detection_id"]), float(r["coord_x"]))
                for r in rows] == [(name, d["id"], d["coordinates"][0]) for d in ref]


def test_example_inference_pipeline(scan: dict[str, Any], quickstart: dict[str, Any],
                                    tmp_path: Path) -> None:
    """The "Example Inference Pipeline" block, module paths replaced."""
    from medinfer.compat.pivot import (
        InferencePipeline,
        generate_report,
        load_detections,
        load_scan,
        visualize_detections,
    )

    pipeline = InferencePipeline(checkpoint="demo-nodules", config=None, device="cpu")
    scan_path = str(scan["dir"] / "scan.nii.gz")
    arr, spacing = load_scan(scan_path)
    results = pipeline.predict(arr, spacing)
    output_dir = tmp_path / "patient_001"
    output_dir.mkdir(parents=True, exist_ok=True)
    pipeline.save_detections(results, output_dir / "detections.json")
    pipeline.save_heatmap(results["heatmap"], output_dir / "heatmap.nii.gz")
    visualize_detections(scan=arr, detections=results["detections"], spacing=spacing,
                         output_path=output_dir / "visualization.png")
    generate_report(scan_path=scan_path, detections=results["detections"],
                    output_path=output_dir / "report.pdf")
    ref = json.loads((quickstart["out"] / "scan_detections.json").read_text())["detections"]
    assert results["detections"] == ref  # same findings as the CLI, same RAS mm frame
    assert load_detections(output_dir / "detections.json") == ref
    assert results["heatmap"].shape == arr.shape
    for name in ("heatmap.nii.gz", "visualization.png", "report.pdf"):
        assert (output_dir / name).stat().st_size > 0


def test_post_processing_adapters(scan: dict[str, Any], quickstart: dict[str, Any]) -> None:
    from medinfer.compat.pivot import (
        detect_peaks,
        extract_properties,
        load_detections,
        load_scan,
        non_maximum_suppression,
    )
    from medinfer.io import load

    dets = load_detections(quickstart["out"] / "scan_detections.json")
    heat = load(quickstart["out"] / "scan_heatmap.nii.gz")
    arr, spacing = load_scan(scan["dir"] / "scan.nii.gz")
    from medinfer.compat.pivot import ScanArray

    peaks = detect_peaks(ScanArray(heat.array[0], heat.affine), threshold=0.5, min_distance=10,
                         spacing=spacing)
    assert peaks and peaks[0]["confidence"] >= peaks[-1]["confidence"]
    # a duplicate at the same place is suppressed; the originals are kept
    dup = dict(dets[0], id=99, confidence=dets[0]["confidence"] - 1e-3)
    assert non_maximum_suppression([*dets, dup], iou_threshold=0.3) == dets
    props = extract_properties(scan=arr, coordinates=dets[0]["coordinates"],
                               diameter=dets[0]["diameter_mm"], spacing=spacing)
    assert props["volume_mm3"] > 0 and 0 < props["sphericity"] <= 1
    assert 70 <= props["mean_intensity"] <= 200  # the inserted lesions are 70-140 HU


def test_optimize_model_equals_checkpoint(tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    from medinfer.compat.pivot import optimize_model
    from medinfer.errors import ModelError

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [4, 8],
              "strides": [2], "num_res_units": 1}
    net = UNet(**kwargs).eval()
    torch.save(net.state_dict(), tmp_path / "best_model.pth")
    optimized = optimize_model(checkpoint=tmp_path / "best_model.pth",
                               output_path=tmp_path / "optimized_model.pt",
                               example_input_shape=[1, 1, 16, 16, 16], architecture="unet",
                               architecture_kwargs=kwargs)
    model = torch.jit.load(str(tmp_path / "optimized_model.pt"))
    x = torch.randn(1, 1, 24, 16, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-5, rtol=0)
        assert torch.allclose(optimized(x), net(x), atol=1e-5, rtol=0)
    # a state dict without its architecture: one error listing what was tried
    with pytest.raises(ModelError, match="tried: TorchScript"):
        optimize_model(tmp_path / "best_model.pth", tmp_path / "x.pt", [1, 1, 16, 16, 16])


def test_state_dict_and_torchscript_checkpoints(scan: dict[str, Any], quickstart: dict[str, Any],
                                                tmp_path: Path) -> None:
    """``--checkpoint best_model.pth`` + ``model.architecture`` (the demo model's weights as
    a bare state dict), and its TorchScript export, give the bundled model's findings."""
    from medinfer.compat.pivot import InferencePipeline, optimize_model
    from medinfer.models import resolve_model

    card, folder = resolve_model("demo-nodules")
    assert card.architecture is not None
    kwargs = dict(card.architecture.kwargs)
    pth = tmp_path / "best_model.pth"
    shutil.copy(folder / "model.pt", pth)
    ref = json.loads((quickstart["out"] / "scan_detections.json").read_text())["detections"]
    cfg = {"model": {"name": "demo-nodules", "architecture": "unet",
                     "architecture_kwargs": kwargs}}
    pipe = InferencePipeline(checkpoint=pth, config=cfg, device="cpu")
    assert pipe.card.weights.file == "best_model.pth"
    assert pipe.predict(str(scan["dir"] / "scan.nii.gz"))["detections"] == ref
    ts = tmp_path / "optimized_model.pt"
    optimize_model(pth, ts, [1, 1, 32, 32, 32], architecture="unet", architecture_kwargs=kwargs)
    pipe = InferencePipeline(checkpoint=ts, config={"model": {"name": "demo-nodules"}},
                             device="cpu")
    got = pipe.predict(str(scan["dir"] / "scan.nii.gz"))["detections"]
    assert [d["coordinates_voxel"] for d in got] == [d["coordinates_voxel"] for d in ref]
    np.testing.assert_allclose([d["coordinates"] for d in got],
                               [d["coordinates"] for d in ref], atol=0.01)
