"""The FLAME analysis node end to end (issue 14, acceptance 1 and 3)."""

from __future__ import annotations

import importlib
import io
import sys
import types
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from fed_helpers import dicom_series, make_model, nifti_bytes, series_tar, tar_of

from medinfer.cli import main as cli_main
from medinfer.errors import ConfigError
from medinfer.federated.analyzer import NodeConfig, normalise_data, run_analysis
from medinfer.io import load, read_dicom


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fed")
    series = dicom_series(root / "series")
    nii = root / "scan_a.nii.gz"
    nii.write_bytes(nifti_bytes(1))
    return {"root": root, "model": make_model(root / "model"), "series": series, "nii": nii}


def _config(env: dict[str, Path], work: Path) -> NodeConfig:
    work.mkdir(exist_ok=True)
    return NodeConfig(model=str(env["model"]), device="cpu", work_dir=str(work))


def _predict(env: dict[str, Path], inp: Path, out: Path) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(["predict", str(inp), "-m", str(env["model"]), "-o", str(out), "--device",
                  "cpu", "--num-workers", "0"])
    assert info.value.code in (0, None)


def test_normalise_data_shapes() -> None:
    items, refused = normalise_data([{"a.nii.gz": b"1", "sub": {"b.dcm": b"2"}}, b"3",
                                     [[bytearray(b"4")]], None, "path/as/text"])
    assert [n for n, _ in items] == ["a.nii.gz", "sub/b.dcm", "input-3", "input-4"]
    assert [r.reason for r in refused] == ["not bytes (got NoneType)", "not bytes (got str)"]


def test_analyzer_two_tars_dict_and_raw_bytes(env: dict[str, Path], tmp_path: Path) -> None:
    work = tmp_path / "work"
    data = [  # the data_type="s3" shape: one dict per data source
        {"series.tar": series_tar(env["series"]),
         "nifti.tar.gz": tar_of({"scans/scan_b.nii": nifti_bytes(2, gz=False)}, "w:gz")},
        {"scan_a.nii.gz": env["nii"].read_bytes()},
        nifti_bytes(3),  # raw bytes, no name
        {"evil.tar": tar_of({"../../escape.nii.gz": b"x"})},
    ]
    result = run_analysis(data, _config(env, work))
    assert set(result) == {"status", "dicom_seg_bytes", "nifti_seg_bytes", "report"}
    assert result["status"] == "done"
    assert set(result["nifti_seg_bytes"]) == {"scan_a.nii.gz", "scan_b.nii.gz",
                                              "input-4.nii.gz"}
    assert list(result["dicom_seg_bytes"]) == ["CT_oblique.dcm"]
    assert all(isinstance(v, bytes) for k in ("dicom_seg_bytes", "nifti_seg_bytes")
               for v in result[k].values())
    refused = result["report"]["refused"]
    assert refused == [{"source": "evil.tar", "member": "../../escape.nii.gz",
                        "reason": "path contains a '..' component"}]
    cases = {c["case"]: c for c in result["report"]["cases"]}
    assert "mitklabel" in cases["CT_oblique"]["reason"]
    assert "no DICOM source headers" in cases["scan_a"]["reason"]
    assert list(work.iterdir()) == []  # the work folder is gone

    # the NIfTI equals `medinfer predict` on the same input, byte for byte
    out = tmp_path / "predict"
    _predict(env, env["nii"], out)
    assert result["nifti_seg_bytes"]["scan_a.nii.gz"] == (out / "scan_a_seg.nii.gz").read_bytes()

    # the SEG decodes with highdicom and overlays the series
    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(result["dicom_seg_bytes"]["CT_oblique.dcm"])
    seg = hd.seg.segread(seg_path)
    src = read_dicom(env["series"])
    assert seg.FrameOfReferenceUID == src.meta["frame_of_reference_uid"]
    names = {s.SegmentLabel for s in seg.SegmentSequence}
    assert names <= {"Liver (site label)", "Spleen (site label)"} and names
    overlay = load(seg_path, reference=env["series"])
    _predict(env, env["series"], tmp_path / "predict_dcm")
    expected = load(next((tmp_path / "predict_dcm").glob("*_seg.nii.gz")))
    assert np.allclose(overlay.affine, src.affine, atol=1e-4)
    assert np.array_equal(overlay.array[0], expected.array[0])


class _Boom:
    def predict(self, volume: Any, progress: Any = None) -> Any:
        raise RuntimeError("model exploded")


def test_model_error_fails_cleanly(env: dict[str, Path], tmp_path: Path) -> None:
    work = tmp_path / "work"
    cfg = _config(env, work)
    from medinfer.models.card import ModelCard

    card = ModelCard.from_yaml(env["model"] / "model.yaml")
    result = run_analysis({"scan_a.nii.gz": env["nii"].read_bytes()}, cfg, model=(card, _Boom()))
    assert result["status"] == "failed" and "model exploded" in result["reason"]
    assert result["dicom_seg_bytes"] == {} and result["nifti_seg_bytes"] == {}
    assert list(work.iterdir()) == []
    nothing = run_analysis([{"x.txt": b"hello"}], cfg)
    assert nothing["status"] == "failed" and "no NIfTI file or DICOM series" in nothing["reason"]
    assert list(work.iterdir()) == []


def _fake_flame(calls: list[dict[str, Any]], data: Any) -> None:
    flame = types.ModuleType("flame")
    star = types.ModuleType("flame.star")

    class StarAnalyzer:
        def __init__(self, flame: Any) -> None:
            self.flame = flame

    class StarAggregator:
        def __init__(self, flame: Any) -> None:
            self.flame = flame

    class StarModel:  # runs one round the way the SDK's tester does
        def __init__(self, **kwargs: Any) -> None:
            calls.append(kwargs)
            analyzer = kwargs["analyzer"]("flame-core")
            aggregator = kwargs["aggregator"]("flame-core")
            results = [analyzer.analysis_method(data, None)]
            self.result = aggregator.aggregation_method(results)
            assert aggregator.has_converged(self.result, None) is True

    star.StarAnalyzer, star.StarAggregator, star.StarModel = (StarAnalyzer, StarAggregator,
                                                              StarModel)
    flame.star = star  # type: ignore[attr-defined]
    sys.modules["flame"] = flame
    sys.modules["flame.star"] = star


def test_main_without_and_with_the_sdk(env: dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import medinfer.federated.star as node

    monkeypatch.setitem(sys.modules, "flame", None)  # absent: import fails
    with pytest.raises(ConfigError, match="FLAME SDK is not installed.*'flame'"):
        node.main()
    calls: list[dict[str, Any]] = []
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("MEDINFER_FEDERATED_MODEL", str(env["model"]))
    monkeypatch.setenv("MEDINFER_FEDERATED_DEVICE", "cpu")
    monkeypatch.setenv("MEDINFER_FEDERATED_WORK_DIR", str(work))
    try:
        _fake_flame(calls, [{"scan_a.nii.gz": env["nii"].read_bytes()}])
        model = node.main()
        star = sys.modules["flame.star"]
        assert len(calls) == 1
        kw = calls[0]
        assert {k: v for k, v in kw.items() if k not in ("analyzer", "aggregator")} == {
            "data_type": "s3", "simple_analysis": True, "output_type": "bytes"}
        assert kw["analyzer"].__name__ == "NnUNetAnalyzer"
        assert kw["aggregator"].__name__ == "PassThroughAggregator"
        assert issubclass(kw["analyzer"], star.StarAnalyzer)  # type: ignore[attr-defined]
        assert issubclass(kw["aggregator"], star.StarAggregator)  # type: ignore[attr-defined]
        (result,) = model.result
        assert result["status"] == "done" and list(result["nifti_seg_bytes"]) == [
            "scan_a.nii.gz"]
        assert list(work.iterdir()) == []
    finally:
        sys.modules.pop("flame", None)
        sys.modules.pop("flame.star", None)
        importlib.reload(node)  # back to our own bases
    assert not issubclass(node.NnUNetAnalyzer, io.IOBase)
    assert node.FROM_SDK is False


SIGTERM_SCRIPT = """
import sys, time, pathlib
from medinfer.federated.analyzer import NodeConfig, run_analysis
from medinfer.models.card import ModelCard

ready = pathlib.Path(sys.argv[3])

class Slow:
    def predict(self, volume, progress=None):
        ready.write_text("running")
        time.sleep(120)

card = ModelCard.from_yaml(sys.argv[2] + "/model.yaml")
data = {"scan.nii.gz": pathlib.Path(sys.argv[4]).read_bytes()}
run_analysis(data, NodeConfig(work_dir=sys.argv[1]), model=(card, Slow()))
"""


def test_sigterm_removes_the_work_folder(env: dict[str, Path], tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    work = tmp_path / "work"
    work.mkdir()
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(work), str(env["model"]),
                             str(ready), str(env["nii"])], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # wait (up to 120 s) until the model runs inside the work folder
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), proc.stderr.read() if proc.stderr else ""
        assert [p.name for p in work.iterdir()][0].startswith("medinfer-fed-")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(work.iterdir()) == []
