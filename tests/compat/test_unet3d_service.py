"""UNet3D suite users: quickstart env vars, /health, the two curl calls, model.yaml (issue 10).

A real uvicorn server on loopback (``uvicorn medinfer.serve:app``, the quickstart's app
path replaced) serves a state-dict ``.pt`` of a MONAI UNet named by ``UNET3D_MODEL_PATH``;
the architecture comes from the ``model.yaml`` beside it, which carries the UNet3D card's
sections (maintainers, serving, training with early-stopping patience, licence).
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medinfer.errors import ConfigError
from medinfer.serve.env_aliases import unet3d_settings
from medinfer.serve.settings import load_settings

SERVE_TESTS = Path(__file__).resolve().parents[1] / "serve"
sys.path.insert(0, str(SERVE_TESTS))
from _serve_support import make_scan, make_tiny_model, running_server  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``/models/unet3d_best.pt`` (a state dict) with a model.yaml in the UNet3D style."""
    folder = make_tiny_model(tmp_path_factory.mktemp("models"), name="unet3d-segmentation")
    card = yaml.safe_load((folder / "model.yaml").read_text())
    card.pop("license")
    card["weights"]["file"] = "unet3d_best.pt"
    card.update({
        "licence": "MIT",
        "maintainers": [{"name": "UNet3D maintainers", "email": "unet3d@example.org"}],
        "serving": {"app": "src.api.main:app", "port": 8000, "endpoint": "/v1/predict"},
        "training": {"epochs": 100, "early_stopping": {"patience": 15}},
    })
    (folder / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    (folder / "weights.pt").rename(folder / "unet3d_best.pt")
    return folder / "unet3d_best.pt"


def test_aliases_and_their_errors(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MEDINFER_MODEL", "MEDINFER_DEVICE", "MEDINFER_THRESHOLD",
                "MEDINFER_CORS_ORIGINS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("UNET3D_MODEL_PATH", str(checkpoint))
    monkeypatch.setenv("UNET3D_DEVICE", "cpu")
    monkeypatch.setenv("UNET3D_DEFAULT_THRESHOLD", "0.4")
    monkeypatch.setenv("UNET3D_PAD_MULTIPLE", "16")
    monkeypatch.setenv("UNET3D_CLIP_PERCENTILES", "1,99")
    monkeypatch.setenv("UNET3D_ALLOW_ORIGINS", "http://a.example,http://b.example")
    s = load_settings()
    assert (s.model, s.device.value, s.threshold, s.pad_multiple) == (str(checkpoint), "cpu",
                                                                      0.4, 16)
    assert s.clip_percentiles == (1.0, 99.0)
    assert s.cors_origins == ["http://a.example", "http://b.example"]
    monkeypatch.setenv("MEDINFER_DEVICE", "cpu")  # the same value under both names is fine
    assert load_settings().device.value == "cpu"
    monkeypatch.setenv("MEDINFER_THRESHOLD", "0.6")
    with pytest.raises(ConfigError, match="UNET3D_DEFAULT_THRESHOLD.*MEDINFER_THRESHOLD"):
        load_settings()
    monkeypatch.delenv("MEDINFER_THRESHOLD")
    monkeypatch.setenv("UNET3D_PAD_MULTIPLE", "sixteen")
    with pytest.raises(ConfigError, match="UNET3D_PAD_MULTIPLE"):
        load_settings()
    with pytest.raises(ConfigError, match="no such file"):
        unet3d_settings({"UNET3D_MODEL_PATH": "/nonexistent"})
    # a state dict with no model.yaml beside it and no architecture: what was tried
    lone = checkpoint.parent.parent / "lone.pt"
    torch.save({"w": torch.zeros(1)}, lone)
    with pytest.raises(ConfigError, match="cannot be matched to an architecture; tried"):
        unet3d_settings({"UNET3D_MODEL_PATH": str(lone)})


def test_nonexistent_model_path_stops_uvicorn(tmp_path: Path) -> None:
    env = {"UNET3D_MODEL_PATH": "/nonexistent", "PATH": "/usr/bin:/bin",
           "MEDINFER_JOB_STORE": str(tmp_path / "jobs")}
    r = subprocess.run([sys.executable, "-m", "uvicorn", "medinfer.serve:app", "--port", "1"],
                       env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0
    assert "UNET3D_MODEL_PATH='/nonexistent': no such file" in r.stderr
    r = subprocess.run([sys.executable, "-m", "medinfer", "serve", "--port", "1"], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "UNET3D_MODEL_PATH='/nonexistent'" in r.stderr


def test_quickstart_health_and_the_two_curl_calls(checkpoint: Path, tmp_path: Path) -> None:
    scan = make_scan(tmp_path / "volume.nii.gz")
    env = {"UNET3D_MODEL_PATH": str(checkpoint), "UNET3D_DEVICE": "cpu",
           "UNET3D_ALLOW_ORIGINS": "*", "MEDINFER_JOB_STORE": str(tmp_path / "jobs"),
           "MEDINFER_DEVICE": "cpu"}
    with running_server(env, tmp_path / "server.log") as server, \
            httpx.Client(base_url=server.url, timeout=120) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["model"] == "unet3d-segmentation"
        card = http.get("/v1/models").json()["models"][0]
        assert card["license"] == "MIT" and card["maintainers"][0]["name"]
        assert card["serving"]["endpoint"] == "/v1/predict"
        assert card["training"]["early_stopping"]["patience"] == 15
        assert card["weights"] == {"format": "state_dict", "file": "unet3d_best.pt",
                                   "sha256": None}
        # curl -X POST /v1/predict -H "accept: application/json" -F file=@volume.nii.gz
        with scan.open("rb") as fh:
            r = http.post("/v1/predict", headers={"accept": "application/json",
                                                  "Origin": "http://x.example"},
                          files={"file": ("volume.nii.gz", fh)})
        assert r.status_code == 200, r.text
        assert r.headers.get("access-control-allow-origin") in ("*", "http://x.example")
        labels = r.json()["labels"]
        # curl -X POST "/v1/predict?return_binary=true" -H "accept: application/octet-stream"
        with scan.open("rb") as fh:
            r = http.post("/v1/predict?return_binary=true",
                          headers={"accept": "application/octet-stream"},
                          files={"file": ("volume.nii.gz", fh)})
        assert r.status_code == 200, r.text
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    src = nib.load(str(scan))
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine, atol=1e-4)
    # the served model is that checkpoint: the engine opened on the file gives this mask
    from medinfer.io import load
    from medinfer.serve.engine import JobConfig, ModelEngine

    local = ModelEngine(str(checkpoint), "cpu").predict(load(scan), JobConfig())
    assert np.array_equal(np.asarray(mask.dataobj), local.label.array[0])
    assert sum(x["voxels"] for x in labels) > 0


def test_docker_entrypoint_with_unet3d_model_path(checkpoint: Path, tmp_path: Path) -> None:
    """``docker run -e UNET3D_MODEL_PATH=/models/unet3d_best.pt -v ...:/models`` without
    Docker: the Dockerfile's CMD and ENV (job store moved to a temporary folder, port
    free) with the mounted checkpoint's path."""
    import json
    import os
    import re
    import time

    from _serve_support import free_port

    docker = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    env = dict(re.findall(r"\b(MEDINFER_[A-Z_]+)=(\S+)", docker))
    assert "MEDINFER_MODEL" not in env  # would conflict with UNET3D_MODEL_PATH
    env["MEDINFER_JOB_STORE"] = str(tmp_path / "jobs")
    cmd = json.loads(re.findall(r"^CMD (\[.*\])$", docker, re.M)[-1])
    assert cmd[0] == "medinfer"
    port = free_port()
    args = [sys.executable, "-m", *cmd]
    args[args.index("--port") + 1] = str(port)
    full = {**os.environ, **env, "UNET3D_MODEL_PATH": str(checkpoint), "UNET3D_DEVICE": "cpu",
            "OMP_NUM_THREADS": "1"}
    for var in ("MEDINFER_MODEL", "MEDINFER_DEVICE"):
        full.pop(var, None)
    log = tmp_path / "docker.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(args, env=full, stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            status = 0
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                    status = r.status_code
                    if status == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            assert status == 200, log.read_text()[-2000:]
            assert r.json()["model"] == "unet3d-segmentation"
        finally:
            proc.terminate()
            proc.wait(30)
