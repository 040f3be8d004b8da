"""Engine adapter (real models), settings parsing, CLI wiring, readiness without a model."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _serve_support import REPO, make_scan, make_tiny_model

from medinfer.errors import ConfigError
from medinfer.serve.application import create_app
from medinfer.serve.engine import ModelEngine, parse_job_config, write_outputs
from medinfer.serve.settings import load_settings

CT = REPO / "tests" / "data" / "ct" / "ct_head_brain_atlas_1mm.nii.gz"


def test_detection_model_summary_has_detections_and_heatmap(tmp_path: Path) -> None:
    """demo-nodules through the service engine: heat map + findings, fixed output names."""
    img = nib.load(str(CT))
    data = np.asanyarray(img.dataobj).astype(np.int16)
    c = [s // 2 for s in data.shape]
    crop = data[c[0] - 32:c[0] + 32, c[1] - 32:c[1] + 32, c[2] - 24:c[2] + 24].copy()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in crop.shape], indexing="ij"))
    blob = (((grid - np.array([32, 30, 24])[:, None, None, None]) ** 2).sum(0) < 6 ** 2)
    crop[blob] = 120  # a 12 mm lesion of 120 HU in brain tissue
    aff = img.affine.copy()
    aff[:3, 3] = (img.affine @ [c[0] - 32, c[1] - 32, c[2] - 24, 1])[:3]
    nib.save(nib.Nifti1Image(crop, aff), str(tmp_path / "ct.nii.gz"))
    from medinfer.io import load

    engine = ModelEngine("demo-nodules", "cpu")
    assert engine.card_json["task"] == "detection"
    # the card's calibration is a server-side file: named relative to the model folder
    assert engine.card_json["post_processing"]["calibration"] == "calibration.json"
    steps: list[float] = []
    pred = engine.predict(load(tmp_path / "ct.nii.gz"),
                          parse_job_config(b"threshold: 0.3\n"),
                          progress=lambda s, f: steps.append(f))
    assert steps and all(0 <= f <= 1 for f in steps) and steps == sorted(steps)
    assert pred.heatmap is not None and pred.heatmap.spatial_shape == crop.shape
    assert pred.detections, "the inserted lesion should be found"
    summary, files = write_outputs(pred, tmp_path / "out", parse_job_config(None),
                                   image=load(tmp_path / "ct.nii.gz"), scan_id="ct")
    assert files == ["label.nii.gz", "heatmap.nii.gz", "detections.json", "detections.csv",
                     "visualization.png", "report.pdf", "summary.json"]
    doc = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert summary["detections"] == doc["detections"]
    # the CLI's document: scan id, grid, summary with the PIVOT counts
    assert doc["scan_id"] == "ct" and doc["metadata"]["shape"] == list(crop.shape)
    assert doc["summary"]["num_detections"] == len(pred.detections)
    assert {"high_risk_count", "low_risk_count"} <= set(doc["summary"])
    near = min(np.linalg.norm(np.array(d["coordinates"]) - (aff @ [32, 30, 24, 1])[:3])
               for d in pred.detections)
    assert near < 3.0
    # the card's calibration applies: scores are the isotonic map of the confidence
    from medinfer.postprocess.calibration import Calibration

    cal = Calibration.load(engine.model_dir / "calibration.json")
    for d in pred.detections:
        assert d["triage"]["malignancy_score"] == pytest.approx(
            float(cal.score([d["confidence"]])[0]), abs=1e-4)


def test_detection_job_config_is_limited_to_safe_sections() -> None:
    with pytest.raises(ConfigError, match="detection.output"):
        parse_job_config(b"detection:\n  output:\n    formats: [json]\n")
    with pytest.raises(ConfigError, match="calibration"):
        parse_job_config(b"detection:\n  post_processing:\n    calibration: /etc/passwd\n")
    with pytest.raises(ConfigError, match="bogus"):
        parse_job_config(b"detection:\n  post_processing:\n    bogus: 1\n")
    cfg = parse_job_config(b"detection:\n  post_processing:\n    min_confidence: 0.2\n")
    assert cfg.detection == {"post_processing": {"min_confidence": 0.2}}


def test_threshold_and_probabilities_reach_the_predictor(tmp_path: Path) -> None:
    from medinfer.io import load

    model = make_tiny_model(tmp_path / "m")
    engine = ModelEngine(str(model), "cpu", threshold=0.3)
    assert engine.card.output.threshold == 0.3
    vol = load(make_scan(tmp_path / "s.nii.gz"))
    pred = engine.predict(vol, parse_job_config(b"save_probabilities: true\n"))
    assert pred.probabilities is not None and pred.probabilities.num_channels == 4
    assert pred.label.same_grid(vol)
    with pytest.raises(ConfigError, match="MEDINFER_CLIP_PERCENTILES"):
        ModelEngine(str(model), "cpu", clip_percentiles=(1.0, 99.0))  # card uses zscore


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDINFER_API_KEYS", "a, b ,c")
    monkeypatch.setenv("MEDINFER_CORS_ORIGINS", '["http://x", "http://y"]')
    monkeypatch.setenv("MEDINFER_CLIP_PERCENTILES", "0.5,99.5")
    monkeypatch.setenv("MEDINFER_WORKERS", "3")
    monkeypatch.setenv("MEDINFER_DEVICE", "cpu")
    s = load_settings(job_store=tmp_path)
    assert s.api_keys == ["a", "b", "c"] and s.cors_origins == ["http://x", "http://y"]
    assert s.clip_percentiles == (0.5, 99.5) and s.workers == 3 and s.job_store == tmp_path
    monkeypatch.setenv("MEDINFER_WORKERS", "0")
    with pytest.raises(ConfigError, match="MEDINFER_WORKERS"):
        load_settings()
    monkeypatch.setenv("MEDINFER_WORKERS", "1")
    monkeypatch.setenv("MEDINFER_CLIP_PERCENTILES", "99,1")
    with pytest.raises(ConfigError, match="MEDINFER_CLIP_PERCENTILES"):
        load_settings()


def test_cli_serve_bad_settings_exit_2(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from medinfer.cli import main

    monkeypatch.setenv("MEDINFER_QUEUE_LIMIT", "-4")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "1"])
    assert exc.value.code == 2
    assert "MEDINFER_QUEUE_LIMIT" in capsys.readouterr().err
    for cmd in (["serve", "--help"], ["ui", "--help"]):
        with pytest.raises(SystemExit) as ok:
            main(cmd)
        assert ok.value.code == 0


def test_not_ready_when_the_model_fails_to_load(tmp_path: Path) -> None:
    import warnings

    with warnings.catch_warnings():  # starlette's note about its httpx-based TestClient
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    settings = load_settings(model=str(tmp_path / "no-such-model"), job_store=tmp_path / "s")
    with TestClient(create_app(settings)) as client:
        assert client.get("/health/live").status_code == 200
        holder = client.app.state.engine_holder  # type: ignore[attr-defined]
        assert holder.loaded.wait(60)
        r = client.get("/health/ready")
        assert r.status_code == 503 and r.json()["error"]["type"] == "NotReady"
        assert "no-such-model" in r.json()["error"]["message"]
        r = client.post("/v1/predict", files={"file": ("a", b"x")})
        assert r.status_code == 503 and r.json()["error"]["type"] == "ModelUnavailable"


def test_summaries_are_json_safe() -> None:
    from medinfer.serve.engine import jsonable

    out = jsonable({"d": [{"std": float("nan"), "v": np.float32(2.5)}], 3: np.arange(2),
                    "inf": -np.inf})
    assert out == {"d": [{"std": None, "v": 2.5}], "3": [0, 1], "inf": None}
    json.dumps(out, allow_nan=False)
