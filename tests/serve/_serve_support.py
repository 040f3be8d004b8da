"""Helpers for the serving tests: tiny model cards, scans, a uvicorn server subprocess.

Everything is built inside the test's tmp folder in a second or two; nothing outside the
repository is read.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
SAMPLE_T1 = REPO / "samples" / "t1_sample.nii.gz"
DEMO_MODEL = "demo-brain"

TINY_UNET: dict[str, Any] = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 4,
    "channels": [4, 8], "strides": [2], "num_res_units": 0,
}


def oblique_affine(spacing: tuple[float, float, float] = (1.3, 0.9, 2.1),
                   angle_deg: float = 17.0) -> np.ndarray:
    """A non-RAS (LPS-like, axes flipped), oblique, anisotropic voxel->RAS affine."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0, 0, 1.0]])
    flip = np.diag([-1.0, -1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = rot @ flip @ np.diag(spacing)
    aff[:3, 3] = [40.0, -12.5, 7.25]
    return aff


def make_scan(path: Path, shape: tuple[int, int, int] = (22, 18, 12), seed: int = 0,
              dtype: type = np.int16) -> Path:
    """Write a small oblique, anisotropic NIfTI (.nii or .nii.gz by suffix): a bright
    ellipsoid in noise, values 0..1000."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = rng.uniform(-0.3, 0.3, size=3)[:, None, None, None]
    blob = (((grid - centre) / 0.6) ** 2).sum(axis=0) < 1.0
    data = (blob * 700 + rng.normal(150, 40, size=shape)).clip(0, 1000).astype(dtype)
    img = nib.Nifti1Image(data, oblique_affine())
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def make_tiny_model(folder: Path, name: str = "tiny-seg", patch: int = 16,
                    spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)) -> Path:
    """A random-weight (seeded) MONAI UNet segmentation model folder with its model.yaml."""
    import torch
    from monai.networks.nets import UNet

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1234)
    net = UNet(**TINY_UNET)
    torch.save(net.state_dict(), folder / "weights.pt")
    card = {
        "name": name,
        "version": "0.0.1",
        "task": "segmentation",
        "description": "random weights, for tests only",
        "labels": {0: {"name": "background", "color": [0, 0, 0]},
                   1: {"name": "cerebrospinal fluid", "color": [60, 120, 255]},
                   2: {"name": "grey matter", "color": [0, 255, 0]},
                   3: {"name": "white matter", "color": [255, 255, 0]}},
        "input": {"modality": "MR", "channels": 1, "orientation": "RAS",
                  "spacing": list(spacing) if spacing else None,
                  "normalization": {"method": "zscore", "nonzero": False}},
        "inference": {"mode": "sliding_window", "patch_size": [patch] * 3, "overlap": 0.25,
                      "blending": "gaussian", "batch_size": 2},
        "output": {"activation": "softmax"},
        "weights": {"format": "state_dict", "file": "weights.pt"},
        "architecture": {"network": "UNet", "kwargs": TINY_UNET},
        "license": "CC0-1.0",
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder


def make_dicom_zip(nifti: Path, out: Path, members: Mapping[str, bytes] | None = None) -> Path:
    """Write the NIfTI as an axial DICOM MR series (shuffled member order) inside a zip.

    Geometry: ImageOrientationPatient / ImagePositionPatient in LPS from the NIfTI affine
    (RAS -> LPS flips x and y). Extra raw ``members`` are added as given.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    img = nib.load(str(nifti))
    data = np.asanyarray(img.dataobj).astype(np.int16)
    aff = img.affine.copy()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    # DICOM rows run along the second in-plane axis: pixel (r, c) = voxel (i=c, j=r)
    row_dir = lps[:3, 0] / spacing[0]
    col_dir = lps[:3, 1] / spacing[1]
    series = generate_uid()
    study = generate_uid()
    frame = generate_uid()
    buf = io.BytesIO()
    order = np.random.default_rng(7).permutation(data.shape[2])
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, k in enumerate(order):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.FrameOfReferenceUID = frame
            ds.Modality = "MR"
            ds.PatientName, ds.PatientID = "Test^Serve", "SERVE01"
            ds.SeriesDescription = "serve test"
            ds.InstanceNumber = int(n + 1)
            ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
            ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
            ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
            ds.SliceThickness = float(spacing[2])
            ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 1
            ds.RescaleSlope, ds.RescaleIntercept = 1, 0
            ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
            b = io.BytesIO()
            ds.save_as(b, enforce_file_format=True)
            zf.writestr(f"series/IM{n:04d}", b.getvalue())
        for name, raw in (members or {}).items():
            zf.writestr(name, raw)
    out.write_bytes(buf.getvalue())
    return out


def zip_with_symlink(out: Path) -> Path:
    """A zip whose only member is a symbolic link (Unix mode 0o120777) to /etc/passwd."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("scan/link.dcm")
        info.create_system = 3
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    out.write_bytes(buf.getvalue())
    return out


def nifti_header_claiming(out: Path, shape: tuple[int, ...] = (10000, 10000, 10000)) -> Path:
    """A gzip NIfTI whose header claims ``shape`` (10^12 voxels) but holds a few bytes."""
    import gzip

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2, 2, 2))
    hdr.set_data_dtype(np.uint8)
    raw = bytearray(hdr.binaryblock)
    dims = np.array([len(shape), *shape, *([1] * (7 - len(shape)))], dtype="<i2")
    if max(shape) > 32767:
        raise ValueError("NIfTI-1 dims are int16")
    raw[40:56] = dims.tobytes()
    out.write_bytes(gzip.compress(bytes(raw) + b"\0" * 4 + b"\x01" * 64))
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A medinfer API server in a subprocess on 127.0.0.1 (uvicorn or ``medinfer serve``)."""

    def __init__(self, env: Mapping[str, str], log: Path, via_cli: bool = False,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = dict(os.environ)
        full.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MEDINFER_DEVICE": "cpu",
                     "PYTHONUNBUFFERED": "1"})
        full.update(env)
        if via_cli:
            cmd = [sys.executable, "-m", "medinfer.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning"]
        else:
            cmd = [sys.executable, "-m", "uvicorn", "medinfer.serve:app", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning"]
        self.log = log
        self._log_fh = open(log, "ab")
        self.proc = subprocess.Popen(cmd, env=full, stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, cwd=str(REPO))

    def wait_ready(self, timeout: float = 180.0, headers: Mapping[str, str] | None = None
                   ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): "
                                   f"{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(self.url + "/health/ready", timeout=2.0)
                if r.status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL, no clean-up: what a crash or OOM kill looks like."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_fh.close()


@contextlib.contextmanager
def running_server(env: Mapping[str, str], log: Path, via_cli: bool = False
                   ) -> Iterator[Server]:
    server = Server(env, log, via_cli=via_cli)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """Poll a job until it is terminal (bounded); return its last status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.get(f"/api/v1/inference/{job_id}").json()
        if st["status"] in ("succeeded", "failed", "cancelled", "expired"):
            return dict(st)
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} not finished in {timeout} s")


def assert_error_body(resp: httpx.Response, status: int, type_: str | None = None) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"}, body
    assert body["error"]["status"] == status
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if type_ is not None:
        assert body["error"]["type"] == type_, body
