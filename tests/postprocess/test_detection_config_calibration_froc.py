"""Acceptance 5 (FROC / CPM hand example) and 6 (config errors name the key); calibration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medinfer.errors import ConfigError
from medinfer.postprocess.calibration import (
    Calibration,
    fit_calibration,
    fit_platt,
    parse_categories,
    pav,
)
from medinfer.postprocess.detection_config import (
    DetectionConfig,
    apply_overrides,
    load_detection_config,
)
from medinfer.postprocess.froc import Candidate, Reference, froc, read_candidates

# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("post_processing:\n  treshold: 0.3\n", "post_processing.treshold", "unknown key"),
        ("inference:\n  overlap: 1.0\n", "inference.overlap", "< 1"),
        ("inference:\n  overlap: 1.5\n", "inference.overlap", "< 1"),
        ("inference:\n  stride: [-8, 32, 32]\n", "inference.stride", "positive"),
        ("inference:\n  stride: [0, 32, 32]\n", "inference.stride", "positive"),
        ("post_processing:\n  threshold: high\n", "post_processing.threshold", "number"),
        ("inference:\n  patch_size: [64, 64]\n", "inference.patch_size", ""),
        ("inference:\n  blending: cubic\n", "inference.blending", "gaussian"),
        ("inference:\n  tta:\n    rotations: [5]\n", "inference.tta.rotations", "90-degree"),
        ("visualization:\n  alpha: 2\n", "visualization.alpha", "less than or equal"),
        ("output:\n  formats: [json, docx]\n", "output.formats.1", "json"),
        ("modle:\n  name: x\n", "modle", "unknown key"),
        ("post_processing:\n  min_distance_mm: -1\n", "post_processing.min_distance_mm", ""),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    p = tmp_path / "detection.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_detection_config(p)
    msg = str(ei.value)
    assert key in msg and str(p) in msg
    assert words in msg


def test_config_defaults_file_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "d.yaml"
    p.write_text("model:\n  name: demo-nodules\ninference:\n  stride: [16, 16, 16]\n"
                 "  tta:\n    enabled: true\n    rotations: [1, 2]\n"
                 "post_processing:\n  threshold: 0.4\n")
    cfg = load_detection_config(p, {"threshold": 0.6, "post_processing.min_diameter_mm": 3,
                                    "overlap": None, "tta": False})
    assert cfg.model.name == "demo-nodules"
    assert cfg.post_processing.threshold == 0.6  # the flag wins
    assert cfg.post_processing.min_diameter_mm == 3.0
    assert cfg.inference.stride == (16, 16, 16)
    assert cfg.inference.tta.enabled is False and cfg.inference.tta.rotations == [1, 2]
    assert DetectionConfig().post_processing.threshold == 0.5
    with pytest.raises(ConfigError, match="'nonsense'"):
        apply_overrides({}, {"nonsense": 1})
    with pytest.raises(ConfigError, match="unknown section"):
        apply_overrides({}, {"foo.bar": 1})
    # both stride and overlap: accepted when they mean the same windows, else an error
    assert load_detection_config(p, {"overlap": 0.5, "patch_size": [32, 32, 32]})
    with pytest.raises(ConfigError, match="inconsistent"):
        load_detection_config(p, {"overlap": 0.25, "patch_size": [32, 32, 32]})
    with pytest.raises(ConfigError, match="not found"):
        load_detection_config(tmp_path / "missing.yaml")


def test_stride_larger_than_patch_is_refused() -> None:
    from medinfer.detection import inference_settings
    from medinfer.models.card import ModelCard

    card = ModelCard.from_dict({"name": "x", "task": "detection", "labels": {0: {"name": "bg"},
                                1: {"name": "lesion"}}, "output": {"activation": "sigmoid"},
                                "weights": {"format": "torchscript", "file": "m.pt"}})
    cfg = DetectionConfig.from_dict({"inference": {"patch_size": [32, 32, 32],
                                                   "stride": [16, 8, 40]}})
    with pytest.raises(ConfigError, match="inference.stride"):
        inference_settings(card, cfg)
    cfg = DetectionConfig.from_dict({"inference": {"patch_size": [32, 32, 32],
                                                   "stride": [16, 8, 32]}})
    s = inference_settings(card, cfg)
    assert s["overlap"] == pytest.approx((0.5, 0.75, 0.0))


# ------------------------------------------------------------------------- calibration
def test_pav_hand_example() -> None:
    xs, ys = pav([5, 1, 2, 3, 4], [1, 0, 1, 0, 1])
    np.testing.assert_allclose(xs, [1, 2, 3, 4, 5])
    np.testing.assert_allclose(ys, [0, 0.5, 0.5, 1, 1])
    xs, ys = pav([0.1, 0.2, 0.2, 0.3], [1, 0, 0, 1])  # ties pooled first
    np.testing.assert_allclose(ys, [1 / 3, 1 / 3, 1.0])


def test_platt_recovers_logistic_parameters() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-(2.0 * x - 1.0)))).astype(float)
    a, b = fit_platt(x, y)
    assert a == pytest.approx(-2.0, abs=0.2) and b == pytest.approx(1.0, abs=0.15)
    with pytest.raises(ConfigError, match="positives"):
        fit_platt([0.1, 0.2], [0, 0])


def test_calibration_file_round_trip_and_categories(tmp_path: Path) -> None:
    cats = parse_categories("low,mid,high", "0.25,0.75")
    cal = fit_calibration([0.1, 0.4, 0.6, 0.9], [0, 0, 1, 1], "isotonic", categories=cats)
    for name in ("c.json", "c.yaml"):
        cal.save(tmp_path / name)
        back = Calibration.load(tmp_path / name)
        assert back.score([0.1, 0.5, 0.9]).tolist() == pytest.approx([0.0, 0.5, 1.0])
        assert [back.category(s) for s in (0.0, 0.25, 0.5, 0.8)] == ["low", "mid", "mid", "high"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "platt", "feature": "confidence"}))
    with pytest.raises(ConfigError, match="a and b"):
        Calibration.load(bad)
    with pytest.raises(ConfigError, match="thresholds"):
        parse_categories("low,high", "0.3,0.7")


def test_calibrate_cli(tmp_path: Path) -> None:
    from medinfer.cli import _register_plugins, app

    _register_plugins()
    csv = tmp_path / "labelled.csv"
    csv.write_text("id,confidence,label\nF01,0.9,1\nF02,0.8,1\nF03,0.3,0\nF04,0.6,0\n"
                   "F05,0.7,1\n")
    out = tmp_path / "cal.json"
    r = CliRunner().invoke(app, ["calibrate", str(csv), "-o", str(out), "--method", "platt"])
    assert r.exit_code == 0, r.output
    cal = Calibration.load(out)
    assert cal.method.value == "platt" and cal.n_samples == 5 and cal.n_positive == 3
    s = cal.score([0.3, 0.9])
    assert s[1] > s[0]


# -------------------------------------------------------------------------------- FROC
def _hand_example() -> tuple[list[Candidate], list[Reference], list[str]]:
    refs = [Reference("A", (0, 0, 0), 10.0), Reference("A", (50, 0, 0), 6.0),
            Reference("B", (0, 0, 0), 8.0)]
    cands = [
        Candidate("A", (1, 0, 0), 0.9),    # hits A1
        Candidate("A", (2, 0, 0), 0.8),    # hits A1 again: neither TP nor FP
        Candidate("A", (100, 0, 0), 0.7),  # FP
        Candidate("A", (52, 0, 0), 0.4),   # hits A2 (2 mm <= 3 mm)
        Candidate("B", (0, 0, 5), 0.6),    # 5 mm > 4 mm: FP
        Candidate("B", (0, 3, 0), 0.3),    # hits B1
        Candidate("C", (0, 0, 0), 0.5),    # scan without references: FP
    ]
    return cands, refs, ["A", "B", "C"]


def test_froc_cpm_hand_computed() -> None:
    cands, refs, scans = _hand_example()
    r = froc(cands, refs, scans)
    # thresholds 0.9, 0.7, 0.6, 0.5, 0.4, 0.3 over 3 scans and 3 references
    np.testing.assert_allclose(r.fps_per_scan, [0, 0, 1 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(r.sensitivity, [0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    assert r.sensitivity_at == pytest.approx({0.125: 1 / 3, 0.25: 1 / 3, 0.5: 1 / 3, 1.0: 1.0,
                                              2.0: 1.0, 4.0: 1.0, 8.0: 1.0})
    assert r.cpm == pytest.approx(5 / 7)
    assert r.num_detected == 3 and r.num_candidates == 7


def test_froc_linear_interpolation_on_ties() -> None:
    refs = [Reference("A", (0, 0, 0), 10.0)]
    cands = [Candidate("A", (0, 0, 0), 0.5), Candidate("A", (40, 0, 0), 0.5)]
    r = froc(cands, refs, ["A", "B"])
    np.testing.assert_allclose(r.fps_per_scan, [0, 0.5])
    np.testing.assert_allclose(r.sensitivity, [0, 1])
    assert r.sensitivity_at[0.125] == pytest.approx(0.25)
    assert r.sensitivity_at[0.25] == pytest.approx(0.5)
    assert r.cpm == pytest.approx((0.25 + 0.5 + 5) / 7)
    with pytest.raises(ConfigError, match="no findings"):
        froc(cands, [], ["A"])


def test_evaluate_detections_cli(tmp_path: Path) -> None:
    from medinfer.cli import _register_plugins, app

    _register_plugins()
    cands, refs, _ = _hand_example()
    ref_csv = tmp_path / "ref.csv"
    ref_csv.write_text("scan_id,x,y,z,diameter_mm\n" + "".join(
        f"{r.scan_id},{r.center[0]},{r.center[1]},{r.center[2]},{r.diameter_mm}\n"
        for r in refs))
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for sid in ("A", "B", "C"):
        dets = [{"coordinates": list(c.center), "confidence": c.score}
                for c in cands if c.scan_id == sid]
        (pred_dir / f"{sid}_detections.json").write_text(
            json.dumps({"scan_id": sid, "detections": dets}))
    out = tmp_path / "froc"
    r = CliRunner().invoke(app, ["evaluate-detections", str(pred_dir), "-r", str(ref_csv),
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "froc.json").read_text())
    assert res["cpm"] == pytest.approx(5 / 7)
    assert (out / "froc.png").stat().st_size > 1000
    got, scans = read_candidates(pred_dir)
    assert scans == ["A", "B", "C"] and len(got) == 7
    # LPS CSV input: x and y negate
    lps = tmp_path / "p.csv"
    lps.write_text("seriesuid,coordX,coordY,coordZ,probability\nA,-1,0,0,0.9\n")
    (c,) = read_candidates(lps, "LPS")[0]
    assert c.center == (1.0, -0.0, 0.0) and c.score == 0.9
