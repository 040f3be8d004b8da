"""A real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on loopback for the PACS tests."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                     "/usr/lib/orthanc/libOrthancDicomWeb.so")
USER, PASSWORD = "alice", "s3cret-pw"

UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8],
        "strides": [2], "num_res_units": 0}

torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OrthancServer:
    http_port: int
    dicom_port: int
    storage: Path

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    def get(self, path: str) -> object:
        r = requests.get(self.rest + path, auth=(USER, PASSWORD), timeout=30)
        r.raise_for_status()
        return r.json()

    def find(self, level: str, query: dict[str, str]) -> list[str]:
        r = requests.post(self.rest + "/tools/find", auth=(USER, PASSWORD), timeout=30,
                          data=json.dumps({"Level": level, "Query": query}))
        r.raise_for_status()
        return list(r.json())

    def tags(self, instance_id: str) -> dict[str, object]:
        return dict(self.get(f"/instances/{instance_id}/tags?simplify"))  # type: ignore[arg-type]


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
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    torch.save(UNet(**UNET).state_dict(), d / "model.pt")
    card = {
        "name": "tiny-seg", "version": "0.1",
        "labels": {0: {"name": "background", "color": [0, 0, 0]},
                   1: {"name": "liver", "color": [0, 0, 255]},
                   2: {"name": "spleen", "color": [0, 255, 0]}},
        "input": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0],
                  "normalization": {"method": "zscore"}},
        "inference": {"patch_size": [8, 8, 8], "overlap": 0.25},
        "weights": {"format": "state_dict", "file": "model.pt"},
        "architecture": {"network": "UNet", "kwargs": UNET},
    }
    (d / "model.yaml").write_text(yaml.safe_dump(card))
    return d


def ct_series(folder: Path, seed: int = 0, shape: tuple[int, int, int] = (64, 64, 20),
              study_uid: str | None = None, description: str = "CT head") -> Path:
    """A small oblique CT series (HU-like values with a bright blob), shuffled file order."""
    from scipy.spatial.transform import Rotation

    from medinfer.io.dicom_writer import write_dicom_series
    from medinfer.volume import Volume

    rng = np.random.default_rng(seed)
    g = np.indices(shape).astype(np.float32)
    blob = ((g[0] - 30) ** 2 + (g[1] - 28) ** 2 + ((g[2] - 10) * 2.5) ** 2) < 64
    arr = (rng.normal(30, 8, size=shape) + 80 * blob).astype(np.int16)
    aff = np.eye(4)
    rot = Rotation.from_euler("xyz", (8, -5, 12), degrees=True).as_matrix()
    aff[:3, :3] = rot @ np.diag([-0.9, -0.9, 2.5])
    aff[:3, 3] = (20.0, 15.0, -30.0)
    write_dicom_series(Volume(arr, aff), folder, modality="CT", shuffle_seed=seed,
                       study_instance_uid=study_uid, series_description=description)
    return folder
