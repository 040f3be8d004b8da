"""``medinfer pacs listen``: C-STORE SCP -> predict -> C-STORE of the SEG to Orthanc's DICOM port.

The node is killed with SIGKILL in the middle of a series: every acknowledged instance is
on disk after the restart, and the series is processed once.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from conftest import OrthancServer, ct_series, free_port


def _listen(tmp: Path, model: Path, port: int, orthanc: OrthancServer,
            log_name: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "medinfer.cli", "pacs", "listen", "--model", str(model),
           "--port", str(port), "--ae-title", "MEDINFER", "--allow-aet", "TESTSCU",
           "--allow-host", "127.0.0.1",
           "--forward", f"127.0.0.1:{orthanc.dicom_port}:ORTHANC",
           "--storage", str(tmp / "node"), "--idle-timeout", "2", "--device", "cpu"]
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
        time.sleep(3)  # longer than the idle timeout: the series is not processed again
        assert len(_segs(orthanc, study)) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert len(list((tmp_path / "node" / "incoming").rglob("*.dcm"))) == len(files)
