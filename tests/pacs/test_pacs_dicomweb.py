"""``medinfer pacs run`` against a real Orthanc with the DICOMweb plugin."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pacs_helpers import PASSWORD, USER, OrthancServer, ct_series, free_port

from medinfer.cli import main
from medinfer.errors import GeometryError, InvalidImageError
from medinfer.pacs import PacsError
from medinfer.pacs.dicomweb import PacsAuth, connect, pull, push, run_study
from medinfer.pacs.node import default_options


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


def _pacs(orthanc: OrthancServer):  # type: ignore[no-untyped-def]
    return connect(orthanc.dicomweb, PacsAuth(USER, PASSWORD))


def _upload(orthanc: OrthancServer, folder: Path) -> tuple[str, str]:
    files = sorted(folder.iterdir())
    assert push(_pacs(orthanc), files) == len(files)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _instances_of_study(orthanc: OrthancServer, study: str) -> list[dict[str, object]]:
    return [orthanc.tags(i) for i in orthanc.find("Instance", {"StudyInstanceUID": study})]


def test_run_puts_seg_into_the_study(tmp_path, orthanc, seg_model, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    study, series = _upload(orthanc, ct_series(tmp_path / "ct", seed=1))
    monkeypatch.setenv("MEDINFER_PACS_USER", USER)
    monkeypatch.setenv("MEDINFER_PACS_PASSWORD", PASSWORD)
    assert _run(["pacs", "run", "--url", orthanc.dicomweb, "--study", study, "--model",
                 str(seg_model), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert PASSWORD not in captured.out + captured.err
    segs = [t for t in _instances_of_study(orthanc, study) if t["Modality"] == "SEG"]
    assert len(segs) == 1
    seg = segs[0]
    assert seg["StudyInstanceUID"] == study
    ref = seg["ReferencedSeriesSequence"][0]  # type: ignore[index]
    assert ref["SeriesInstanceUID"] == series
    source_sops = {t["SOPInstanceUID"] for t in _instances_of_study(orthanc, study)
                   if t["Modality"] == "CT"}
    assert {i["ReferencedSOPInstanceUID"] for i in ref["ReferencedInstanceSequence"]} \
        <= source_sops


def test_run_demo_nodules_stores_an_sr(tmp_path, orthanc):  # type: ignore[no-untyped-def]
    study, series = _upload(orthanc, ct_series(tmp_path / "ct", seed=2))
    res = run_study(_pacs(orthanc), study, "demo-nodules", default_options("demo-nodules"),
                    device="cpu")
    assert res["stored"] == 1 and res["series"] == [series]
    srs = [t for t in _instances_of_study(orthanc, study) if t["Modality"] == "SR"]
    assert len(srs) == 1
    evidence = srs[0]["CurrentRequestedProcedureEvidenceSequence"][0]  # type: ignore[index]
    assert evidence["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == series


def test_pull_streams_the_series(tmp_path, orthanc):  # type: ignore[no-untyped-def]
    study, series = _upload(orthanc, ct_series(tmp_path / "ct", seed=3, shape=(32, 32, 6)))
    folders = pull(_pacs(orthanc), study, tmp_path / "pulled")
    assert list(folders) == [series] and len(list(folders[series].glob("*.dcm"))) == 6


def test_bad_input_clear_errors_and_nothing_stored(tmp_path, orthanc, seg_model, capsys):  # type: ignore[no-untyped-def]
    study, series = _upload(orthanc, ct_series(tmp_path / "ct", seed=4, shape=(32, 32, 8)))
    opts = default_options(str(seg_model))
    # unreachable
    with pytest.raises(PacsError, match="unreachable"):
        run_study(connect(f"http://127.0.0.1:{free_port()}/dicom-web"), study, str(seg_model),
                  opts)
    # 401, and the password never in the message
    assert _run(["pacs", "run", "--url", orthanc.dicomweb, "--study", study, "--model",
                 str(seg_model), "--user", USER, "--password", "wrong-pw"]) == 2
    err = capsys.readouterr().err
    assert "401" in err and "wrong-pw" not in err and "Traceback" not in err
    # 404 study
    assert _run(["pacs", "run", "--url", orthanc.dicomweb, "--study", "1.2.3.404",
                 "--model", str(seg_model), "--user", USER, "--password", PASSWORD]) == 2
    assert "not found" in capsys.readouterr().err
    # a non-image series: the SEG medinfer stored before
    run_study(_pacs(orthanc), study, str(seg_model), opts, device="cpu")
    seg_series = [t["SeriesInstanceUID"] for t in _instances_of_study(orthanc, study)
                  if t["Modality"] == "SEG"]
    with pytest.raises(InvalidImageError, match="no image"):
        run_study(_pacs(orthanc), study, str(seg_model), opts, series=str(seg_series[0]))
    # mixed geometry: two slices of another size in the series -> nothing stored
    bad = ct_series(tmp_path / "bad", seed=5, shape=(32, 32, 8))
    other = ct_series(tmp_path / "other", seed=6, shape=(24, 24, 2))
    ds0 = pydicom.dcmread(next(bad.iterdir()), stop_before_pixels=True)
    for i, f in enumerate(sorted(other.iterdir())):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = ds0.StudyInstanceUID, ds0.SeriesInstanceUID
        ds.FrameOfReferenceUID = ds0.FrameOfReferenceUID
        ds.save_as(bad / f"odd{i}.dcm")
    bad_study, _ = _upload(orthanc, bad)
    before = len(_instances_of_study(orthanc, bad_study))
    with pytest.raises((GeometryError, InvalidImageError)):
        run_study(_pacs(orthanc), bad_study, str(seg_model), opts, device="cpu")
    assert len(_instances_of_study(orthanc, bad_study)) == before


def test_watch_processes_each_series_once_and_survives_bad_ones(tmp_path, orthanc, seg_model,  # type: ignore[no-untyped-def]
                                                                 caplog):
    from medinfer.pacs.dicomweb import watch
    from medinfer.pacs.state import NodeState

    study, series = _upload(orthanc, ct_series(tmp_path / "ct", seed=8, shape=(32, 32, 8),
                                               description="WATCH me"))
    bad = ct_series(tmp_path / "bad", seed=9, shape=(32, 32, 6), description="WATCH bad")
    ds0 = pydicom.dcmread(next(bad.iterdir()), stop_before_pixels=True)
    ds = pydicom.dcmread(sorted(bad.iterdir())[0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # mixed orientation in one series
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(bad / "tilted.dcm")
    bad_study, bad_series = _upload(orthanc, bad)
    assert ds0.SeriesInstanceUID == bad_series
    state_file = tmp_path / "watch.sqlite"
    opts = default_options(str(seg_model))
    for _ in range(2):  # the second run is a restart: nothing is processed again
        watch(_pacs(orthanc), str(seg_model), opts, state_file, modality="CT",
              description="^WATCH", max_polls=1, device="cpu", sleep=lambda s: None)
    segs = [t for t in _instances_of_study(orthanc, study) if t["Modality"] == "SEG"]
    assert len(segs) == 1
    assert not [t for t in _instances_of_study(orthanc, bad_study) if t["Modality"] == "SEG"]
    state = NodeState(state_file)
    rows = {r["series_uid"]: r for r in state.rows()}
    state.close()
    assert rows[series]["status"] == "done"
    assert rows[bad_series]["status"] == "failed" and rows[bad_series]["error"]
    assert any(bad_series in r.getMessage() for r in caplog.records)
