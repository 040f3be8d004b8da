"""PIVOT REST API, Python client and WebSocket loop against a real server (issue 10).

``uvicorn medinfer.serve:app`` on loopback with ``demo-nodules``; the curl lines (as
httpx calls with the same multipart fields), the "Python API" block and the "WebSocket
Streaming" loop of the PIVOT description run as written (module paths replaced). The
REST job's ``detections.json`` equals the CLI's for the same scan and config.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

SERVE_TESTS = Path(__file__).resolve().parents[1] / "serve"
sys.path.insert(0, str(SERVE_TESTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compat_data import small_ct  # noqa: E402
from _serve_support import running_server, wait_job  # noqa: E402

#: a PIVOT-spelled config (described keys only)
CONFIG = """\
inference:
  blending:
    method: gaussian
    sigma: 0.125
post_processing:
  peak_detection:
    threshold: 0.5
    min_distance: 5
  nms:
    enabled: true
    iou_threshold: 0.3
  size_filter:
    min_diameter: 3.0
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A crop of the head CT with inserted lesions, and the config."""
    folder = tmp_path_factory.mktemp("pivot-service")
    small_ct(folder / "scan.nii.gz")
    (folder / "inference.yaml").write_text(CONFIG)
    return {"scan": folder / "scan.nii.gz", "config": folder / "inference.yaml",
            "dir": folder}


@pytest.fixture(scope="module")
def cli_doc(files: dict[str, Path]) -> dict[str, Any]:
    from medinfer.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["detect", "--checkpoint", "demo-nodules", "--input", str(files["scan"]),
              "--output", str(files["dir"] / "cli"), "--config", str(files["config"]),
              "--device", "cpu"])
    assert ei.value.code == 0
    doc: dict[str, Any] = json.loads((files["dir"] / "cli" / "scan_detections.json").read_text())
    assert doc["detections"], "the inserted lesion should be found"
    return doc


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("pivot-server")
    # `medinfer serve` (the same app as `uvicorn medinfer.serve:app`, which the UNet3D tests
    # run): it sets the WebSocket frame limit to the upload limit
    with running_server({"MEDINFER_MODEL": "demo-nodules", "MEDINFER_JOB_STORE": str(tmp)},
                        tmp / "server.log", via_cli=True) as srv:
        yield srv


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Equal detections documents, apart from when they were made and how long it took."""
    strip = ("timestamp", "summary")
    assert {k: v for k, v in a.items() if k not in strip} == \
        {k: v for k, v in b.items() if k not in strip}
    sa, sb = dict(a["summary"]), dict(b["summary"])
    sa.pop("processing_time_seconds")
    sb.pop("processing_time_seconds")
    assert sa == sb


def test_rest_curl_lines_give_the_cli_document(server: Any, files: dict[str, Path],
                                               cli_doc: dict[str, Any]) -> None:
    # curl -X POST /api/v1/inference -F "file=@scan.nii.gz" -F "config=@configs/inference.yaml"
    with httpx.Client(base_url=server.url, timeout=120) as http:
        with files["scan"].open("rb") as scan, files["config"].open("rb") as cfg:
            r = http.post("/api/v1/inference", files={"file": ("scan.nii.gz", scan),
                                                       "config": ("inference.yaml", cfg)})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert wait_job(http, job_id, timeout=300)["status"] == "succeeded"
        # curl http://localhost:8000/api/v1/inference/{job_id}/results
        res = http.get(f"/api/v1/inference/{job_id}/results").json()
        names = {f["name"] for f in res["files"]}
        assert {"detections.json", "detections.csv", "visualization.png", "report.pdf",
                "heatmap.nii.gz"} <= names
        doc = http.get(f"/api/v1/inference/{job_id}/files/detections.json").json()
        csv_text = http.get(f"/api/v1/inference/{job_id}/files/detections.csv").text
        assert http.get("/health").status_code == 200
    _same(doc, cli_doc)
    assert csv_text.splitlines()[0].startswith(
        "scan_id,detection_id,coord_x,coord_y,coord_z,diameter_mm,confidence,"
        "malignancy_score,risk_category")
    # an unknown described key is refused with the dotted key named
    with httpx.Client(base_url=server.url, timeout=60) as http, files["scan"].open("rb") as s:
        r = http.post("/api/v1/inference", files={
            "file": ("scan.nii.gz", s),
            "config": ("c.yaml", b"post_processing:\n  nms:\n    iou: 0.3\n")})
    assert r.status_code == 422 and "post_processing.nms.iou" in r.text


def test_python_client_block(server: Any, files: dict[str, Path], cli_doc: dict[str, Any],
                             tmp_path: Path) -> None:
    from medinfer.compat.pivot import InferenceClient

    # Initialize client
    client = InferenceClient(base_url=server.url)
    # Submit inference
    job_id = client.submit_inference(scan_path=str(files["scan"]),
                                     config=str(files["config"]))
    # Wait for completion
    results = client.wait_for_results(job_id, timeout=300)
    # Download outputs
    client.download_results(job_id, output_dir=str(tmp_path / "results"))
    assert results["status"] == "succeeded"
    doc = json.loads((tmp_path / "results" / "detections.json").read_text())
    _same(doc, cli_doc)
    # the medinfer call style keeps working
    assert client.wait_for_results(timeout=300)["job_id"] == job_id
    assert {p.name for p in client.download_results(tmp_path / "again", job_id)} >= {
        "detections.json", "report.pdf"}


def test_websocket_loop(server: Any, files: dict[str, Path], cli_doc: dict[str, Any],
                        capsys: pytest.CaptureFixture[str]) -> None:
    import websockets

    scan_bytes = files["scan"].read_bytes()
    seen: list[dict[str, Any]] = []

    async def stream_inference() -> None:
        uri = server.url.replace("http", "ws") + "/api/v1/inference/stream"
        async with websockets.connect(uri) as websocket:
            # Send scan data
            await websocket.send(scan_bytes)

            # Receive progress updates
            async for message in websocket:
                data = json.loads(message)
                seen.append(data)
                print(f"Progress: {data['progress']}%")
                if data['status'] == 'completed':
                    print(f"Detections: {data['detections']}")
                    break

    asyncio.run(stream_inference())
    out = capsys.readouterr().out
    assert "Progress: 100" in out and "Detections: [" in out
    assert all("status" in m and 0 <= m["progress"] <= 100 for m in seen)
    # the stream ran without a config (the card's defaults): its most confident finding is
    # the CLI's (same heat map; the configs differ only in NMS and size filtering)
    assert seen[-1]["status"] == "completed" and seen[-1]["detections"]
    centres = [d["coordinates"] for d in cli_doc["detections"]]
    assert seen[-1]["detections"][0]["coordinates"] in centres


def test_websocket_takes_a_scan_over_16_mib_in_one_message(server: Any) -> None:
    """uvicorn's default frame limit (16 MiB) would close the socket (1009); the server
    reads the whole message and answers with a JSON error event (not a scan)."""
    import websockets

    blob = np.random.default_rng(0).integers(0, 255, 17 * 1024 * 1024, dtype=np.uint8)

    async def send() -> dict[str, Any]:
        uri = server.url.replace("http", "ws") + "/api/v1/inference/stream"
        async with websockets.connect(uri, max_size=None) as websocket:
            await websocket.send(blob.tobytes())
            return dict(json.loads(await websocket.recv()))

    event = asyncio.run(send())
    assert event["status"] == "failed" and event["progress"] == 0.0
    assert event["error"]["type"] != "PayloadTooLarge"
