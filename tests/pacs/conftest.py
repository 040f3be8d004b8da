"""A real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on loopback for the PACS tests."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from pacs_helpers import (
    ORTHANC,
    PASSWORD,
    PLUGIN_CANDIDATES,
    USER,
    OrthancServer,
    free_port,
)
from tiny_models import make_tiny_seg_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    plugin = next((p for p in PLUGIN_CANDIDATES if Path(p).is_file()), None)
    assert plugin is not None, "orthanc-dicomweb plugin missing (scripts/ensure_test_tools.sh)"
    root = tmp_path_factory.mktemp("orthanc")
    server = OrthancServer(free_port(), free_port(), root / "db")
    config = {
        "Name": "medinfer-test", "StorageDirectory": str(server.storage),
        "IndexDirectory": str(server.storage), "HttpPort": server.http_port,
        "DicomPort": server.dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
        "HttpDescribeErrors": True, "ConcurrentJobs": 1, "HttpThreadsCount": 8,
        "StableAge": 1,
    }
    cfg = root / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                if requests.get(server.rest + "/system", auth=(USER, PASSWORD),
                                timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, (root / "orthanc.log").read_text()[-2000:]
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny seeded segmentation model (labels 1 'liver', 2 'spleen')."""
    return make_tiny_seg_model(tmp_path_factory.mktemp("model"))


