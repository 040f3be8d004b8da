"""Helpers of the PACS tests: the Orthanc server handle, free ports, small CT series."""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                     "/usr/lib/orthanc/libOrthancDicomWeb.so")
USER, PASSWORD = "alice", "s3cret-pw"



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
