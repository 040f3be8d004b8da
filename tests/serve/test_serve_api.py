"""Acceptance 1, 4, 5: a real uvicorn server (``uvicorn medinfer.serve:app``) on loopback
with the bundled demo model; every endpoint, the WebSocket stream, the Python client, the
bad-input list, and a bounded schemathesis run against ``/openapi.json`` (no 5xx)."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest
from _serve_support import (
    DEMO_MODEL,
    SAMPLE_T1,
    Server,
    assert_error_body,
    make_dicom_zip,
    nifti_header_claiming,
    wait_job,
    zip_with_symlink,
)

from medinfer.serve.client import InferenceAPIError, InferenceClient

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_UPLOAD = 6_000_000


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-api")


@pytest.fixture(scope="module")
def scan(work: Path) -> Path:
    """A crop of the bundled T1 sample (oblique, anisotropic grid) to keep runs short."""
    img = nib.load(str(SAMPLE_T1))
    data = np.asanyarray(img.dataobj)
    lo = [s // 2 - 24 for s in data.shape]
    crop = data[lo[0]:lo[0] + 48, lo[1]:lo[1] + 56, lo[2]:lo[2] + 40]
    aff = img.affine.copy()
    aff[:3, 3] = (img.affine @ [*lo, 1])[:3]
    out = nib.Nifti1Image(np.ascontiguousarray(crop), aff)
    out.set_qform(aff, code=1)
    out.set_sform(aff, code=1)
    path = work / "t1_crop.nii.gz"
    nib.save(out, str(path))
    return path


@pytest.fixture(scope="module")
def server(work: Path) -> Iterator[Server]:
    env = {
        "MEDINFER_MODEL": DEMO_MODEL,
        "MEDINFER_JOB_STORE": str(work / "store"),
        "MEDINFER_API_KEYS": f"{KEY},another-key",
        "MEDINFER_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "MEDINFER_MAX_VOXELS": "40000000",
        "MEDINFER_WORKERS": "2",
        "MEDINFER_CORS_ORIGINS": "http://localhost:8501",
    }
    srv = Server(env, work / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def predicted(http: httpx.Client, scan: Path) -> dict[str, Any]:
    """JSON summary of one synchronous prediction (reused by several tests)."""
    r = http.post("/v1/predict", files={"file": ("t1.nii.gz", scan.read_bytes())})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _label_from_bytes(data: bytes, tmp: Path, name: str) -> nib.Nifti1Image:
    p = tmp / name
    p.write_bytes(data)
    img = nib.load(str(p))
    img.get_fdata()
    return img


# ------------------------------------------------------------------ health, docs, model
def test_health_docs_and_model_card(server: Server, http: httpx.Client) -> None:
    assert httpx.get(server.url + "/health/live").json() == {"status": "alive"}
    ready = httpx.get(server.url + "/health/ready")  # no key needed
    assert ready.status_code == 200 and ready.json()["model"] == DEMO_MODEL
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    redoc = httpx.get(server.url + "/redoc")
    assert redoc.status_code == 200 and "redoc" in redoc.text.lower()
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/predict", "/api/v1/inference", "/api/v1/inference/{job_id}",
                 "/api/v1/inference/{job_id}/results",
                 "/api/v1/inference/{job_id}/files/{name}", "/v1/models", "/metrics"):
        assert path in spec["paths"]
    card = http.get("/v1/models").json()["models"][0]
    assert card["name"] == DEMO_MODEL
    names = {v["name"].lower() for v in card["labels"].values()}
    assert {"background", "cerebrospinal fluid", "grey matter", "white matter"} <= names
    assert card["input"]["modality"] == "MR"
    cors = httpx.options(server.url + "/v1/models", headers={
        "Origin": "http://localhost:8501", "Access-Control-Request-Method": "GET"})
    assert cors.headers.get("access-control-allow-origin") == "http://localhost:8501"


# -------------------------------------------------------------------------- predict
def test_sync_predict_json_and_binary(http: httpx.Client, scan: Path, predicted: dict[str, Any],
                                      tmp_path: Path) -> None:
    src = nib.load(str(scan))
    assert predicted["model"] == DEMO_MODEL
    assert predicted["shape"] == list(src.shape)
    np.testing.assert_allclose(predicted["affine"], src.affine, atol=1e-4)
    by_name = {lab["name"].lower(): lab for lab in predicted["labels"]}
    assert {"cerebrospinal fluid", "grey matter", "white matter"} <= set(by_name)
    assert by_name["grey matter"]["voxels"] > 0 and by_name["white matter"]["voxels"] > 0
    assert "inference" in predicted["timings"]

    r = http.post("/v1/predict", params={"return_binary": "true", "threshold": 0.4},
                  files={"file": ("whatever.bin", scan.read_bytes())})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert 'filename="label.nii.gz"' in r.headers["content-disposition"]
    label = _label_from_bytes(r.content, tmp_path, "label.nii.gz")
    assert label.shape == src.shape
    np.testing.assert_allclose(label.affine, src.affine, atol=1e-4)
    arr = np.asarray(label.dataobj)
    assert arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 1, 2, 3}
    # a label map viewers recognise, with the source's xform codes (as the CLI writes it)
    assert label.header.get_intent()[0] == "label"
    assert [int(label.header[k]) for k in ("qform_code", "sform_code")] == [
        int(src.header[k]) for k in ("qform_code", "sform_code")]
    # the binary label map and the JSON summary describe the same segmentation
    for lab in predicted["labels"]:
        assert int((arr == lab["value"]).sum()) == lab["voxels"]


def test_predict_dicom_zip_matches_nifti(http: httpx.Client, scan: Path,
                                         predicted: dict[str, Any], tmp_path: Path) -> None:
    z = make_dicom_zip(scan, tmp_path / "series.zip")
    r = http.post("/v1/predict", params={"return_binary": "true"},
                  files={"file": ("series.zip", z.read_bytes(), "application/zip")})
    assert r.status_code == 200, r.text
    label = _label_from_bytes(r.content, tmp_path, "dcm_label.nii.gz")
    src = nib.load(str(scan))
    assert label.shape == src.shape
    np.testing.assert_allclose(label.affine, src.affine, atol=1e-3)
    arr = np.asarray(label.dataobj)
    for lab in predicted["labels"]:
        n = int((arr == lab["value"]).sum())
        assert abs(n - lab["voxels"]) <= 0.01 * lab["voxels"] + 5, (lab, n)


# ----------------------------------------------------------------------------- jobs
def test_job_lifecycle_with_config_files_and_metrics(http: httpx.Client, scan: Path,
                                                     predicted: dict[str, Any],
                                                     tmp_path: Path) -> None:
    r = http.post("/api/v1/inference", files={
        "file": ("../../etc/passwd", scan.read_bytes()),
        "config": ("c.yaml", b"save_probabilities: true\n", "application/yaml")})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.json()["status"] == "queued"
    final = wait_job(http, job_id)
    assert final["status"] == "succeeded" and final["progress"] == 100
    res = http.get(f"/api/v1/inference/{job_id}/results").json()
    names = [f["name"] for f in res["files"]]
    assert names == ["label.nii.gz", "probabilities.nii.gz", "summary.json"]
    assert res["summary"]["labels"] == predicted["labels"]
    lab = http.get(f"/api/v1/inference/{job_id}/files/label.nii.gz")
    assert lab.status_code == 200
    label = _label_from_bytes(lab.content, tmp_path, "job_label.nii.gz")
    assert label.shape == nib.load(str(scan)).shape
    assert label.header.get_intent()[0] == "label"
    probs = _label_from_bytes(
        http.get(f"/api/v1/inference/{job_id}/files/probabilities.nii.gz").content,
        tmp_path, "p.nii.gz")
    assert probs.shape[:3] == label.shape and probs.shape[3] == 4
    summary = http.get(f"/api/v1/inference/{job_id}/files/summary.json").json()
    assert summary["job_id"] == job_id
    # file names are looked up, never used as paths
    for bad in ("../../jobs.sqlite3", "..%2F..%2Fjobs.sqlite3", "input.nii.gz", "x" * 300):
        assert_error_body(http.get(f"/api/v1/inference/{job_id}/files/{bad}"), 404)
    # a finished job cannot be cancelled
    assert_error_body(http.delete(f"/api/v1/inference/{job_id}"), 409, "JobFinished")
    # nothing outside the job store folder was written under the client's file name
    assert not (tmp_path.parent / "etc").exists()

    metrics = http.get("/metrics").text
    assert 'medinfer_jobs_total{outcome="succeeded"}' in metrics
    assert "medinfer_job_queue_length" in metrics
    assert 'route="/v1/predict",status="200"' in metrics
    assert "medinfer_http_request_duration_seconds_bucket" in metrics


def test_cancel_a_job(http: httpx.Client, scan: Path) -> None:
    data = scan.read_bytes()
    ids = [http.post("/api/v1/inference", files={"file": ("s.nii.gz", data)}).json()["job_id"]
           for _ in range(3)]
    r = http.delete(f"/api/v1/inference/{ids[-1]}")  # 2 workers: the third waits
    assert r.status_code in (200, 202), r.text
    expected = "cancelled" if r.status_code == 200 else r.json()["status"]
    assert expected in ("cancelled", "cancelling")
    finals = [wait_job(http, i)["status"] for i in ids]
    assert finals[:2] == ["succeeded", "succeeded"]
    if r.status_code == 200:
        assert finals[2] == "cancelled"
    else:  # it was already running: it stops at its next progress report
        assert finals[2] in ("cancelled", "succeeded")
    if finals[2] == "cancelled":
        assert_error_body(http.get(f"/api/v1/inference/{ids[2]}/results"), 409,
                          "JobNotSucceeded")


# ------------------------------------------------------------------------ websocket
def _check_events(events: list[dict[str, Any]]) -> None:
    assert events, "no events"
    # the last event follows the PIVOT stream contract: status "completed", top-level
    # detections; the job status stays in job_status
    order = {"queued": 0, "running": 1, "succeeded": 2, "completed": 2}
    ranks = [order[e["status"]] for e in events]
    assert events[-1]["status"] == "completed" and events[-1]["job_status"] == "succeeded"
    assert isinstance(events[-1]["detections"], list)
    assert ranks == sorted(ranks), [e["status"] for e in events]
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress), progress
    assert all(0 <= p <= 100 for p in progress)
    assert events[-1]["event"] == "completed" and events[-1]["progress"] == 100
    assert {"preprocess", "inference", "postprocess"} <= {e["stage"] for e in events}
    assert sum(e["event"] == "completed" for e in events) == 1


def test_websocket_submit_and_subscribe(server: Server, http: httpx.Client, scan: Path,
                                        predicted: dict[str, Any]) -> None:
    client = InferenceClient(server.url, api_key=KEY)
    events = list(client.stream(scan, timeout=300))
    _check_events(events)
    result = events[-1]["result"]
    assert result["summary"]["labels"] == predicted["labels"]
    assert [f["name"] for f in result["files"]] == ["label.nii.gz", "summary.json"]
    # subscribing to a running job by id, from a second connection, while a third runs
    job_id = http.post("/api/v1/inference",
                       files={"file": ("s.nii.gz", scan.read_bytes())}).json()["job_id"]
    sub = list(client.stream(job_id, timeout=300))
    assert sub[-1]["event"] == "completed" and sub[-1]["job_id"] == job_id
    assert [e["progress"] for e in sub] == sorted(e["progress"] for e in sub)
    # after the end, subscribing gives the final event at once
    again = list(client.stream(job_id, timeout=60))
    assert len(again) == 1 and again[0]["event"] == "completed"
    # bad requests over the socket: error event, not a crash
    bad = list(client.stream("0" * 32, timeout=60))
    assert bad[-1]["event"] == "error" and bad[-1]["error"]["status"] == 404
    notes = scan.parent / "notes.txt"
    notes.write_text("not a scan\n" * 100)
    refused = list(client.stream(notes, timeout=60))
    assert len(refused) == 1 and refused[0]["event"] == "error"
    assert refused[0]["error"]["status"] == 415
    nokey = InferenceClient(server.url, api_key="wrong")
    denied = list(nokey.stream(job_id, timeout=60))
    assert denied[-1]["event"] == "error" and denied[-1]["error"]["status"] == 401


# ---------------------------------------------------------------------------- client
def test_python_client(server: Server, scan: Path, predicted: dict[str, Any],
                       tmp_path: Path) -> None:
    with InferenceClient(server.url, api_key=KEY) as client:
        assert client.health()["status"] == "ready"
        assert client.model_card()["name"] == DEMO_MODEL
        job_id = client.submit_inference(scan, config={"save_probabilities": False})
        assert len(job_id) == 32
        results = client.wait_for_results(timeout=300)
        assert results["summary"]["labels"] == predicted["labels"]
        paths = client.download_results(tmp_path / "out")
        assert sorted(p.name for p in paths) == ["label.nii.gz", "summary.json"]
        assert nib.load(str(tmp_path / "out" / "label.nii.gz")).shape == nib.load(
            str(scan)).shape
        assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
        out = client.predict(scan, return_binary=True, output_path=tmp_path / "sync.nii.gz")
        assert Path(out).is_file()
        assert client.predict(scan)["labels"] == predicted["labels"]
        with pytest.raises(InferenceAPIError) as err:
            client.status("f" * 32)
        assert err.value.status == 404 and err.value.type == "JobNotFound"
    with pytest.raises(InferenceAPIError) as err2:
        InferenceClient(server.url, api_key="nope").model_card()
    assert err2.value.status == 401


# ------------------------------------------------------------------------ bad input
def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    return buf.getvalue()


def test_bad_inputs_give_4xx_json_and_server_stays_healthy(server: Server, http: httpx.Client,
                                                           scan: Path, tmp_path: Path) -> None:
    good = scan.read_bytes()
    cases: list[tuple[str, bytes, int, str]] = [
        ("non-image", b"hello, this is a text file\n" * 50, 415, "UnsupportedFormatError"),
        ("truncated gzip", good[: len(good) // 3], 422, "InvalidImageError"),
        ("10^12 voxels", nifti_header_claiming(tmp_path / "bomb.nii.gz").read_bytes(), 413,
         "ResourceLimitError"),
        ("zip ../", _zip_bytes({"ok.dcm": b"x", "../../evil.dcm": b"x"}), 400,
         "UnsafeArchiveError"),
        ("zip symlink", zip_with_symlink(tmp_path / "l.zip").read_bytes(), 400,
         "UnsafeArchiveError"),
        ("empty", b"", 422, "InvalidImageError"),
    ]
    for endpoint in ("/v1/predict", "/api/v1/inference"):
        for what, data, status, type_ in cases:
            r = http.post(endpoint, files={"file": ("x.nii.gz", data)})
            assert r.status_code == status, (endpoint, what, r.text)
            assert_error_body(r, status, type_)
    # oversize upload: refused by size, streamed (no Content-Length) and declared
    big = b"\x1f\x8b" + b"\0" * (MAX_UPLOAD + 2_000_000)
    assert_error_body(http.post("/v1/predict", files={"file": ("big.nii.gz", big)}), 413)

    def chunks() -> Iterator[bytes]:
        boundary = b"--b0undary\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        for _ in range(MAX_UPLOAD // 1_000_000 + 3):
            yield b"\0" * 1_000_000
        yield b"\r\n--b0undary--\r\n"

    r = http.post("/api/v1/inference", content=chunks(),
                  headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert_error_body(r, 413)
    # bad query / config / missing file / unknown job / auth
    assert_error_body(http.post("/v1/predict", params={"threshold": 1.5},
                                files={"file": ("s.nii.gz", good)}), 422, "ValidationError")
    assert_error_body(http.post("/api/v1/inference", files={
        "file": ("s.nii.gz", good), "config": ("c.yaml", b"bogus_key: 1\n")}), 422,
        "ConfigError")
    assert_error_body(http.post("/v1/predict"), 422, "ValidationError")
    assert_error_body(http.post("/v1/predict", content=b"not multipart",
                                headers={"Content-Type": "application/json"}), 422)
    for path in ("/api/v1/inference/" + "0" * 32, "/api/v1/inference/not-a-job",
                 "/api/v1/inference/" + "0" * 32 + "/results",
                 "/api/v1/inference/" + "0" * 32 + "/files/label.nii.gz"):
        assert_error_body(http.get(path), 404, "JobNotFound")
    assert_error_body(http.delete("/api/v1/inference/" + "1" * 32), 404, "JobNotFound")
    assert_error_body(http.get("/no/such/route"), 404)
    assert_error_body(http.put("/v1/predict"), 405)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert_error_body(r, 401, "Unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(server.url + "/v1/predict", headers=headers,
                       files={"file": ("s.nii.gz", good)})
        assert_error_body(r, 401)
    assert httpx.get(server.url + "/v1/models",
                     headers={"Authorization": "Bearer another-key"}).status_code == 200

    # the server is still healthy and still answers correctly, also under parallel abuse
    def abuse(i: int) -> int:
        return httpx.post(server.url + "/v1/predict", headers=AUTH, timeout=60,
                          files={"file": ("x", cases[i % 4][1])}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(abuse, range(16)))
    assert all(400 <= c < 500 for c in codes), codes
    assert httpx.get(server.url + "/health/ready").status_code == 200
    assert server.proc.poll() is None
    r = http.post("/v1/predict", files={"file": ("s.nii.gz", good)})
    assert r.status_code == 200
    # the bad uploads left nothing behind in the store's scratch folder
    store = Path(json.loads(json.dumps(str(server.log.parent / "store"))))
    assert not list((store / "tmp").iterdir())


# ---------------------------------------------------------------------- schemathesis
def test_schemathesis_finds_no_server_errors(server: Server) -> None:
    """Positive and negative generation for every operation (10 + 10 examples each,
    about 200 requests); no 5xx, and every error has the JSON error body."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    api = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [r.ok() for r in api.get_all_operations()]
    assert len(operations) >= 10
    seen: list[int] = []
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                headers = AUTH if len(seen) % 5 else {}
                response = case.call(base_url=server.url, headers=headers, timeout=120)
                seen.append(response.status_code)
                assert response.status_code < 500, (case.method, case.formatted_path,
                                                    response.status_code, response.text[:500])
                if response.status_code >= 400:
                    body = response.json()
                    assert set(body) == {"error"}
                    assert body["error"]["status"] == response.status_code

            try:
                run()
            except Unsatisfiable:
                # no negative input exists for an operation without parameters / body
                assert mode is GenerationMode.NEGATIVE, op.label
    assert 50 <= len(seen) <= 400, len(seen)
    assert any(400 <= c < 500 for c in seen) and any(c < 300 for c in seen)
    assert httpx.get(server.url + "/health/ready").status_code == 200
    assert server.proc.poll() is None
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "ErrorResponse" in spec["components"]["schemas"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_non_finite_voxel_upload_is_422(http: httpx.Client, scan: Path, work: Path) -> None:
    """Issue 17 item 9a: one NaN voxel used to blank the segmentation, answered 200."""
    img = nib.load(str(scan))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[5, 6, 7] = np.nan
    bad = work / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), bad)
    r = http.post("/v1/predict", files={"file": ("nan.nii.gz", bad.read_bytes())})
    assert r.status_code == 422, r.text
    assert "NaN" in r.json()["error"]["message"]
