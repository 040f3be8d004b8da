"""``medinfer pacs listen``: C-STORE SCP -> predict -> C-STORE of the SEG to Orthanc's DICOM port.

The node is killed with SIGKILL in the middle of a series: every acknowledged instance is
on disk after the restart, and the series is processed once; a re-sent instance changes
nothing, a new slice arriving later reopens the series (a second SEG over all slices).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from pacs_helpers import OrthancServer, ct_series, free_port


def _listen(tmp: Path, model: Path, port: int, orthanc: OrthancServer,
            log_name: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "medinfer.cli", "pacs", "listen", "--model", str(model),
           "--port", str(port), "--ae-title", "MEDINFER", "--allow-aet", "TESTSCU",
           "--allow-host", "127.0.0.1",
           "--forward", f"127.0.0.1:{orthanc.dicom_port}:ORTHANC",
           "--storage", str(tmp / "node"), "--idle-timeout", "6", "--device", "cpu"]
    log = open(tmp / log_name, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / log_name).read_text()[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("pacs listen did not start: " + (tmp / log_name).read_text()[-3000:])


def _storescu(port: int, files: list[Path], aet: str = "TESTSCU") -> int:
    res = subprocess.run([sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(port),
                          *map(str, files), "-aet", aet, "-aec", "MEDINFER"],
                         capture_output=True, timeout=120)
    return res.returncode


def _text_sr(folder: Path) -> Path:
    """A Basic Text SR instance: a non-image SOP class the node must refuse to run on."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "SR", "X", "X^"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir()
    path = folder / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _late_instance(files: list[Path], folder: Path) -> Path:
    """One more slice of the series (new SOP Instance UID), one slice step past the last."""
    import numpy as np
    from pydicom.uid import generate_uid

    def along_normal(d: pydicom.Dataset) -> float:
        o = np.asarray(d.ImageOrientationPatient, float)
        return float(np.cross(o[:3], o[3:]) @ np.asarray(d.ImagePositionPatient, float))

    dss = sorted((pydicom.dcmread(f) for f in files), key=along_normal)
    last, before = dss[-1], dss[-2]
    step = [float(a) - float(b) for a, b in zip(last.ImagePositionPatient,
                                                before.ImagePositionPatient, strict=True)]
    last.ImagePositionPatient = [float(a) + d for a, d in zip(last.ImagePositionPatient, step,
                                                              strict=True)]
    last.InstanceNumber = max(int(d.InstanceNumber) for d in dss) + 1
    last.SOPInstanceUID = generate_uid()
    last.file_meta.MediaStorageSOPInstanceUID = last.SOPInstanceUID
    folder.mkdir()
    path = folder / "late.dcm"
    last.save_as(path, enforce_file_format=True)
    return path


def _segs(orthanc: OrthancServer, study: str) -> list[dict[str, object]]:
    tags = [orthanc.tags(i) for i in orthanc.find("Instance", {"StudyInstanceUID": study})]
    return [t for t in tags if t["Modality"] == "SEG"]


def test_listen_survives_sigkill_and_forwards_one_seg(tmp_path, orthanc, seg_model):  # type: ignore[no-untyped-def]
    files = sorted(ct_series(tmp_path / "ct", seed=7, shape=(48, 48, 12)).iterdir())
    head = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
    port = free_port()
    proc = _listen(tmp_path, seg_model, port, orthanc, "listen1.log")
    try:
        # a calling AE title that is not allowed: association rejected, nothing kept
        _storescu(port, files[:1], aet="INTRUDER")
        assert not list((tmp_path / "node" / "incoming").rglob("*.dcm"))
        assert _storescu(port, files[:6]) == 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    received = list((tmp_path / "node" / "incoming").rglob("*.dcm"))
    assert len(received) == 6  # every acknowledged instance is on disk
    proc = _listen(tmp_path, seg_model, port, orthanc, "listen2.log")
    try:
        sr = _text_sr(tmp_path / "sr")
        assert _storescu(port, [sr]) == 0  # accepted and kept, but no image to run on
        assert _storescu(port, files[6:]) == 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not _segs(orthanc, study):
            assert proc.poll() is None, (tmp_path / "listen2.log").read_text()[-3000:]
            time.sleep(0.5)
        segs = _segs(orthanc, study)
        assert len(segs) == 1, (tmp_path / "listen2.log").read_text()[-3000:]
        ref = segs[0]["ReferencedSeriesSequence"][0]  # type: ignore[index]
        assert ref["SeriesInstanceUID"] == series
        assert len(ref["ReferencedInstanceSequence"]) == len(files)
        assert _storescu(port, files[:1]) == 0  # re-sent: reopens nothing
        time.sleep(7)  # longer than the idle timeout: the series is not processed again
        assert len(_segs(orthanc, study)) == 1
        # a new instance of the series after it was processed: predicted again, whole
        assert _storescu(port, [_late_instance(files, tmp_path / "late")]) == 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(_segs(orthanc, study)) < 2:
            assert proc.poll() is None, (tmp_path / "listen2.log").read_text()[-3000:]
            time.sleep(0.5)
        counts = sorted(len(s["ReferencedSeriesSequence"][0]["ReferencedInstanceSequence"])  # type: ignore[index]
                        for s in _segs(orthanc, study))
        assert counts == [len(files), len(files) + 1], counts
        sr_series = str(pydicom.dcmread(sr).SeriesInstanceUID)
        log = (tmp_path / "listen2.log").read_text()
        assert f"series {sr_series} failed" in log and "Traceback" not in log
        assert proc.poll() is None  # the node stays up
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # every instance ever acknowledged is kept (the CT series, the late slice and the SR)
    assert len(list((tmp_path / "node" / "incoming").rglob("*.dcm"))) == len(files) + 2
