"""Issue 18, server: a real uvicorn on loopback attacked with the smallest reproducers."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))

from _serve_support import Server, assert_error_body, make_scan, make_tiny_model, wait_job
from fuzz_corpus import (
    corrupt_deflate,
    dicom_slice,
    edit_dicom,
    enhanced_shared_only,
)
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medinfer.serve.store import JobStatus, JobStore, StoreLockedError

KEY_A, KEY_B, ADMIN = "key-a-123", "key-b-456", "admin-789"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile_serve")


@pytest.fixture(scope="module")
def env(work: Path) -> dict[str, str]:
    model = make_tiny_model(work / "model", spacing=(2.0, 2.0, 2.0))
    return {
        "MEDINFER_MODEL": str(model),
        "MEDINFER_JOB_STORE": str(work / "store"),
        "MEDINFER_API_KEYS": f"{KEY_A},{KEY_B}",
        "MEDINFER_ADMIN_API_KEYS": ADMIN,
        "MEDINFER_MAX_UPLOAD_BYTES": str(8 * 1024**2),
        "MEDINFER_WORKERS": "1",
    }


@pytest.fixture(scope="module")
def server(env: dict[str, str], work: Path) -> Iterator[Server]:
    srv = Server(env, work / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _client(server: Server, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_18_5_401_before_the_body_is_read(server: Server) -> None:
    # headers announce 6 MB, no body byte is sent: the 401 must come anyway
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /api/v1/inference HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"multipart/form-data; boundary=zz\r\nContent-Length: 6000000\r\n\r\n")
        s.settimeout(10)
        raw = b""
        while b"}}" not in raw:  # the status line and headers, then the JSON body
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    reply = raw.decode("latin-1")
    assert reply.startswith("HTTP/1.1 401"), reply[:200]
    body = json.loads(reply.split("\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "Unauthorized"


def test_18_5_websocket_refused_before_reading(server: Server) -> None:
    from websockets.sync.client import connect

    url = server.url.replace("http", "ws") + "/api/v1/inference/stream"
    with connect(url, additional_headers={"Authorization": "Bearer wrong"}) as ws:
        event = json.loads(ws.recv(timeout=10))  # nothing sent by us
    assert event["event"] == "error" and event["error"]["status"] == 401


def test_18_16_jobs_belong_to_their_key(server: Server, work: Path) -> None:
    scan = make_scan(work / "own.nii.gz", seed=3)
    with _client(server, KEY_A) as a, _client(server, KEY_B) as b, \
            _client(server, ADMIN) as admin:
        r = a.post("/api/v1/inference", files={"file": ("s.nii.gz", scan.read_bytes())})
        assert r.status_code == 202, r.text
        job = r.json()["job_id"]
        assert wait_job(a, job)["status"] == "succeeded"
        assert_error_body(b.get(f"/api/v1/inference/{job}"), 404, "JobNotFound")
        assert_error_body(b.get(f"/api/v1/inference/{job}/results"), 404, "JobNotFound")
        assert_error_body(b.get(f"/api/v1/inference/{job}/files/label.nii.gz"), 404)
        assert_error_body(b.delete(f"/api/v1/inference/{job}"), 404)
        assert admin.get(f"/api/v1/inference/{job}").json()["status"] == "succeeded"
        assert a.get(f"/api/v1/inference/{job}/results").status_code == 200

        # 18.11: a succeeded job whose files vanished is never reported 'succeeded'
        shutil.rmtree(Path(server_env_store(work)) / "outputs" / job)
        st = a.get(f"/api/v1/inference/{job}").json()
        assert st["status"] == "expired", st
        assert a.get(f"/api/v1/inference/{job}/results").status_code == 410


def server_env_store(work: Path) -> Path:
    return work / "store"


def test_18_17_dicom_without_preamble_is_accepted(server: Server) -> None:
    raw = dicom_slice(preamble=False, rows=16, cols=16)
    with _client(server, KEY_A) as a:
        r = a.post("/api/v1/inference", files={"file": ("scan", raw)})
    assert r.status_code == 202, r.text


@pytest.mark.parametrize("name,data,status", [
    ("corrupt_deflate", corrupt_deflate(dicom_slice(ts=DeflatedExplicitVRLittleEndian)), 422),
    ("slope_1e308", edit_dicom(dicom_slice(), RescaleSlope="1e308"), 422),
    ("million_frames", enhanced_shared_only(1_000_000), 422),
])
def test_18_1_6_7_tiny_hostile_dicom_is_a_4xx(server: Server, name: str, data: bytes,
                                               status: int) -> None:
    with _client(server, KEY_A) as a:
        r = a.post("/v1/predict", files={"file": (name, data)})
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert "/" not in r.json()["error"]["message"].replace(" / ", " "), r.text  # 18.15
        zipped = a.post("/v1/predict", files={"file": ("z.zip", _zip({"a.dcm": data}))})
        assert 400 <= zipped.status_code < 500, (zipped.status_code, zipped.text)


def test_18_15_job_errors_name_the_input_not_server_paths(server: Server, work: Path
                                                          ) -> None:
    bad = edit_dicom(dicom_slice(), RescaleSlope="1e308")  # passes the upload checks
    with _client(server, KEY_A) as a:
        r = a.post("/api/v1/inference", files={"file": ("bad.dcm", bad)})
        assert r.status_code == 202, r.text
        st = wait_job(a, r.json()["job_id"])
    assert st["status"] == "failed", st
    msg = st["error"]["message"]
    assert str(work) not in msg and "/store/" not in msg, msg
    assert msg.startswith("input: RescaleSlope"), msg


def test_18_8_deep_configs_and_bad_websocket_messages(server: Server) -> None:
    from websockets.sync.client import connect

    scan_bytes = dicom_slice(rows=16, cols=16)
    with _client(server, KEY_A) as a:
        r = a.post("/api/v1/inference", files={"file": ("s.dcm", scan_bytes),
                                               "config": ("c.yaml", b"[" * 20000)})
        assert_error_body(r, 422, "ConfigError")
    url = server.url.replace("http", "ws") + "/api/v1/inference/stream"
    for first, status in ((json.dumps({"action": "submit", "size": 10, "config": [1, 2]}), 422),
                          ("[" * 100_000 + "]" * 100_000, 400)):
        with connect(url, additional_headers={"Authorization": f"Bearer {KEY_A}"},
                     max_size=None) as ws:
            ws.send(first)
            event = json.loads(ws.recv(timeout=30))
        assert event["event"] == "error" and event["error"]["status"] == status, event


def test_18_10_second_server_on_the_store_refuses_to_start(server: Server, env: dict[str, str],
                                                           work: Path) -> None:
    second = Server(env, work / "second.log")
    try:
        code = second.proc.wait(120)
    except subprocess.TimeoutExpired:
        second.stop()
        pytest.fail("a second server on the same job store started")
    assert code != 0
    assert "in use by another medinfer server" in (work / "second.log").read_text()


def test_18_10_store_lock_unit(tmp_path: Path) -> None:
    one = JobStore(tmp_path / "s")
    one.acquire()
    two = JobStore(tmp_path / "s")
    with pytest.raises(StoreLockedError):
        two.acquire()
    one.close()
    two.acquire()  # released with the first owner
    two.close()


def test_18_1_cancel_of_a_running_job_ends_cancelled(tmp_path: Path) -> None:
    """A job that fails after its cancellation was asked ends 'cancelled', not 'failed'."""
    from medinfer.errors import InvalidImageError
    from medinfer.serve.engine import JobConfig
    from medinfer.serve.jobs import UPLOAD_NAME, JobManager
    from medinfer.serve.uploads import Limits

    store = JobStore(tmp_path / "store")
    started = threading.Event()

    class SlowEngine:
        name = "slow"
        card_json: dict[str, Any] = {}

        def predict(self, volume: Any, config: Any, progress: Any = None) -> Any:
            started.set()
            deadline = time.monotonic() + 30
            while not store.cancel_requested(job.id) and time.monotonic() < deadline:
                time.sleep(0.02)
            raise InvalidImageError("the work was interrupted")  # no progress call first

    limits = Limits(max_upload_bytes=1 << 24, max_voxels=1 << 24,
                    max_unpacked_bytes=1 << 24, max_archive_members=10)
    manager = JobManager(store, lambda: SlowEngine(), limits, workers=1)  # type: ignore[arg-type,return-value]
    up = tmp_path / UPLOAD_NAME
    make_scan(up.with_suffix(".nii.gz"), seed=1).rename(up)
    job = manager.submit(up, JobConfig())
    manager.start()
    try:
        assert started.wait(60)
        assert manager.cancel(job.id) is JobStatus.RUNNING
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not store.get(job.id).status.terminal:  # type: ignore[union-attr]
            time.sleep(0.05)
        assert store.get(job.id).status is JobStatus.CANCELLED  # type: ignore[union-attr]
    finally:
        manager.stop()
        store.close()


def test_18_4_zip_bomb_refused_from_declared_sizes_before_writing(tmp_path: Path) -> None:
    from medinfer.errors import UnsafeArchiveError
    from medinfer.serve.uploads import Limits, extract_zip

    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(_zip({"a.dcm": b"\0" * 3_000_000, "b.dcm": b"\0" * 3_000_000}))
    assert bomb.stat().st_size < 50_000
    limits = Limits(max_upload_bytes=1 << 20, max_voxels=1 << 20,
                    max_unpacked_bytes=4_000_000, max_archive_members=10)
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="declare 6000000"):
        extract_zip(bomb, target, limits)
    assert not target.exists() or not any(target.iterdir())  # nothing written


def test_18_10_outputs_of_a_row_finished_by_another_worker_are_kept(tmp_path: Path) -> None:
    from medinfer.serve.jobs import JobManager
    from medinfer.serve.uploads import Limits

    store = JobStore(tmp_path / "store")
    limits = Limits(max_upload_bytes=1 << 20, max_voxels=1 << 20,
                    max_unpacked_bytes=1 << 20, max_archive_members=10)
    manager = JobManager(store, lambda: None, limits, workers=1)  # type: ignore[arg-type,return-value]
    job_id = store.new_id()
    store.input_dir(job_id).mkdir(parents=True)
    store.add(job_id, input_name="", config={}, queue_limit=10)
    job = store.claim_next()
    assert job is not None and job.id == job_id
    out = store.output_dir(job_id)
    out.mkdir(parents=True)
    (out / "label.nii.gz").write_bytes(b"result of the other worker")
    assert store.finish(job_id, JobStatus.SUCCEEDED, files=["label.nii.gz"])  # other worker
    manager._end(job, JobStatus.FAILED, error=("InternalError", "this worker failed"))
    assert (out / "label.nii.gz").read_bytes() == b"result of the other worker"
    assert store.get(job_id).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
    store.close()


def test_18_1_delete_interrupts_a_running_inference(server: Server, work: Path) -> None:
    """DELETE during the sliding-window inference stops it at the next window batch.

    A 540 KB upload (80x80x64 voxels of 4 mm, oblique) is resampled to the model's 2 mm
    grid: about 900 window batches, seconds of work (~7 s on one free core). The job is
    cancelled as soon as its stage is ``inference``; it must end ``cancelled`` in that
    stage with most windows never run (progress < 50 %; a cancel honoured only at the next
    stage boundary ends at ~86 %), with no output folder, and the single worker must then
    run the next job normally.
    """
    import nibabel as nib
    import numpy as np
    from _serve_support import oblique_affine

    rng = np.random.default_rng(11)
    data = rng.normal(300, 50, size=(80, 80, 64)).clip(0, 1000).astype(np.int16)
    long_scan = work / "long_job.nii.gz"
    nib.save(nib.Nifti1Image(data, oblique_affine(spacing=(4.0, 4.0, 4.0))), str(long_scan))
    small = make_scan(work / "after_cancel.nii.gz", seed=12)
    with _client(server, KEY_A) as a:
        r = a.post("/api/v1/inference", files={"file": ("long.nii.gz", long_scan.read_bytes())})
        assert r.status_code == 202, r.text
        job = r.json()["job_id"]
        deadline = time.monotonic() + 120
        st = a.get(f"/api/v1/inference/{job}").json()
        while st["status"] in ("queued", "running") and st["stage"] != "inference" \
                and time.monotonic() < deadline:
            time.sleep(0.05)
            st = a.get(f"/api/v1/inference/{job}").json()
        assert st["status"] == "running" and st["stage"] == "inference", st
        r = a.delete(f"/api/v1/inference/{job}")
        assert r.status_code == 202 and r.json()["status"] == "cancelling", r.text
        final = wait_job(a, job, timeout=120)
        assert final["status"] == "cancelled", final
        # interrupted within the inference, not at its end (86 %) or a later stage: the
        # DELETE was sent as the inference began (~14 %); half its windows never ran
        assert final["stage"] == "inference" and final["progress"] < 50.0, (st, final)
        assert final["error"]["type"] == "Cancelled", final
        assert not (server_env_store(work) / "outputs" / job).exists()  # no partial output
        assert_error_body(a.get(f"/api/v1/inference/{job}/results"), 409, "JobNotSucceeded")
        # the worker slot is free: the next job runs to the end
        r = a.post("/api/v1/inference", files={"file": ("s.nii.gz", small.read_bytes())})
        assert r.status_code == 202, r.text
        nxt = r.json()["job_id"]
        assert wait_job(a, nxt)["status"] == "succeeded"
        assert a.get(f"/api/v1/inference/{nxt}/files/label.nii.gz").status_code == 200
