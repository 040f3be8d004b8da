"""``medinfer federated run-local`` and the node image's entrypoint, run without Docker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fed_helpers import dicom_series, make_model, nifti_bytes, series_tar

from medinfer.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]

FAKE_STAR = '''
import json, os, pathlib
class StarAnalyzer:
    def __init__(self, flame):
        self.flame = flame
class StarAggregator:
    def __init__(self, flame):
        self.flame = flame
class StarModel:
    def __init__(self, analyzer, aggregator, data_type, simple_analysis, output_type, **kw):
        data = [{"scan.nii.gz": pathlib.Path(os.environ["FAKE_FLAME_DATA"]).read_bytes()}]
        res = aggregator(None).aggregation_method([analyzer(None).analysis_method(data, None)])
        doc = {"args": [data_type, simple_analysis, output_type, sorted(kw)],
               "bases": [issubclass(analyzer, StarAnalyzer),
                         issubclass(aggregator, StarAggregator)],
               "status": res[0]["status"], "nifti": sorted(res[0]["nifti_seg_bytes"]),
               "converged": aggregator(None).has_converged(res, None)}
        pathlib.Path(os.environ["FAKE_FLAME_OUT"]).write_text(json.dumps(doc))
'''


def _image_spec() -> tuple[list[str], dict[str, str]]:
    text = (REPO / "Dockerfile.federated").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    env_block = re.search(r"^ENV ((?:.*\\\n)*.*)$", text, re.M).group(1)  # type: ignore[union-attr]
    env = dict(re.findall(r"(MEDINFER_FEDERATED_\w+)=(\S+)", env_block))
    return entry, env


def test_image_entrypoint_without_docker(tmp_path: Path) -> None:
    entry, image_env = _image_spec()
    assert entry[:2] == ["python", "-m"] and image_env["MEDINFER_FEDERATED_MODEL"] == "demo-brain"
    cmd = [sys.executable, *entry[1:]]
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, **image_env, "PYTHONPATH": str(REPO / "src"),
           "MEDINFER_FEDERATED_MODEL": str(make_model(tmp_path / "model")),
           "MEDINFER_FEDERATED_DEVICE": "cpu", "MEDINFER_FEDERATED_WORK_DIR": str(work)}
    # no SDK: one clear line, exit 2
    fake_root = tmp_path / "site"
    (fake_root / "flame").mkdir(parents=True)
    absent = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert absent.returncode == 2
    assert "FLAME SDK is not installed" in absent.stderr and "'flame'" in absent.stderr
    assert "Traceback" not in absent.stderr
    # with a fake SDK providing the published interface: StarModel runs one round
    (fake_root / "flame" / "__init__.py").write_text("")
    (fake_root / "flame" / "star.py").write_text(FAKE_STAR)
    (tmp_path / "scan.nii.gz").write_bytes(nifti_bytes(4))
    env.update(PYTHONPATH=f"{fake_root}{os.pathsep}{REPO / 'src'}",
               FAKE_FLAME_DATA=str(tmp_path / "scan.nii.gz"),
               FAKE_FLAME_OUT=str(tmp_path / "flame.json"))
    ran = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    doc = json.loads((tmp_path / "flame.json").read_text())
    assert doc == {"args": ["s3", True, "bytes", []], "bases": [True, True], "status": "done",
                   "nifti": ["scan.nii.gz"], "converged": True}
    assert list(work.iterdir()) == []


def test_run_local(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model(tmp_path / "model")
    tar = tmp_path / "series.tar"
    tar.write_bytes(series_tar(dicom_series(tmp_path / "series")))
    nii = tmp_path / "a.nii.gz"
    nii.write_bytes(nifti_bytes(5))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli_main(["federated", "run-local", "--data", str(tar), str(nii), "--model", str(model),
                  "-o", str(out), "--device", "cpu", "--work-dir", str(tmp_path)])
    assert info.value.code in (0, None)
    doc = json.loads((out / "result.json").read_text())
    assert doc["status"] == "done"
    assert doc["dicom_seg_bytes"] == {"CT_oblique.dcm": "dicom_seg/CT_oblique.dcm"}
    assert doc["nifti_seg_bytes"] == {"a.nii.gz": "nifti_seg/a.nii.gz"}
    assert (out / "dicom_seg" / "CT_oblique.dcm").read_bytes()[128:132] == b"DICM"
    assert (out / "nifti_seg" / "a.nii.gz").stat().st_size > 0
    assert [c["status"] for c in doc["report"]["cases"]] == ["done", "done"]
    assert not list(tmp_path.glob("medinfer-fed-*"))
    # nothing usable: exit 2, one message, result.json still written
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(SystemExit) as info:
        cli_main(["federated", "run-local", "--data", str(junk), "-o", str(tmp_path / "o2"),
                  "--model", str(model)])
    assert info.value.code == 2
    assert "nothing could be processed" in capsys.readouterr().err
    assert json.loads((tmp_path / "o2" / "result.json").read_text())["status"] == "failed"
