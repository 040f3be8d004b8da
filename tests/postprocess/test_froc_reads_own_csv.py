"""``evaluate-detections`` reads medinfer's own per-case detections CSV (issue 17 item 11;
it failed with "no value for 'scan_id'")."""

from __future__ import annotations

from pathlib import Path

import pytest

from medinfer.cli import main
from medinfer.postprocess.froc import read_candidates
from medinfer.reporting.detections import write_detections_csv


def _finding(n: int, ras: tuple[float, float, float], conf: float) -> dict:
    return {"id": n, "name": f"F{n + 1:02d}", "coordinates": list(ras),
            "coordinates_lps": [-ras[0], -ras[1], ras[2]], "coordinates_voxel": [3, 4, 5],
            "diameter_mm": 8.0, "confidence": conf,
            "properties": {"volume_mm3": 268.1, "mean_intensity": 60.0, "std_intensity": 9.0,
                           "sphericity": 0.9},
            "triage": {"malignancy_score": conf, "risk_category": "high"}}


def test_per_case_csv_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = write_detections_csv([_finding(0, (4.5, 162.0, 1219.0), 0.9),
                                     _finding(1, (-40.0, 10.0, 5.0), 0.4)],
                                    tmp_path / "case7_detections.csv", scan_id="case7")
    cands, scans = read_candidates(csv_path)
    assert scans == ["case7"]
    assert [(c.center, c.score) for c in cands] == [((4.5, 162.0, 1219.0), 0.9),
                                                   ((-40.0, 10.0, 5.0), 0.4)]
    ref = tmp_path / "ref.csv"
    ref.write_text("scan_id,x,y,z,diameter_mm\ncase7,4.5,162.0,1219.0,10\n")
    with pytest.raises(SystemExit) as info:
        main(["evaluate-detections", str(csv_path), "-r", str(ref), "-o",
              str(tmp_path / "froc")])
    assert info.value.code in (0, None)
    assert "1/1 reference findings hit" in " ".join(capsys.readouterr().out.split())
