"""Helpers of the data-pipeline tests: synthetic heads in any frame, DICOM series."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medinfer.volume import Volume

#: RPI affine helper: voxel axes increase towards Right, Posterior, Inferior


def rpi_affine(spacing: tuple[float, float, float], origin=(-40.0, 50.0, 60.0)) -> np.ndarray:
    a = np.diag([spacing[0], -spacing[1], -spacing[2], 1.0])
    a[:3, 3] = origin
    return a


def head_phantom(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], marker_ras_offset=(25, 25, 20)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CT head in RPI: air -1000, ellipsoid brain 30 HU with a 1000 HU skull shell,
    and a 70 HU marker sphere (radius 6 mm) at ``centre + marker_ras_offset`` (mm, RAS).

    Returns (int16 array (I, J, K) in RPI, affine, marker position in RAS mm).
    """
    aff = rpi_affine(spacing)
    idx = np.indices(shape).reshape(3, -1).T.astype(float)
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    centre = (np.array(shape) - 1) / 2 @ aff[:3, :3].T + aff[:3, 3]
    rel = world - centre
    radii = np.array([0.36, 0.40, 0.36]) * np.array(shape) * np.array(spacing)
    r = np.sqrt(((rel / radii) ** 2).sum(axis=1))
    hu = np.full(len(world), -1000.0)
    hu[r < 1.0] = 1000.0
    hu[r < 0.85] = 30.0
    marker = centre + np.asarray(marker_ras_offset, dtype=float)
    hu[np.linalg.norm(world - marker, axis=1) < 6.0] = 70.0
    return hu.reshape(shape).astype(np.int16), aff, marker


def reframe(arr: np.ndarray, aff: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, ...]):
    """Store the same image with voxel axes permuted (new axis n = old axis perm[n]) and
    flipped (after permuting); returns (array, affine) describing the same world image."""
    out = np.transpose(arr, perm)
    a = aff[:, list(perm) + [3]].copy()
    for ax, f in enumerate(flips):
        if f:
            n = out.shape[ax]
            out = np.flip(out, axis=ax)
            a[:3, 3] = a[:3, 3] + a[:3, ax] * (n - 1)
            a[:3, ax] = -a[:3, ax]
    return np.ascontiguousarray(out), a


def rotation(deg_x: float, deg_y: float, deg_z: float) -> np.ndarray:
    x, y, z = np.deg2rad([deg_x, deg_y, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    r = np.eye(4)
    r[:3, :3] = rz @ ry @ rx
    return r


def save_nifti(arr: np.ndarray, aff: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(arr, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_ct_series_lps(arr_rpi: np.ndarray, aff_rpi: np.ndarray, folder: Path, seed: int = 0):
    """Write an RPI int16 HU volume as an axial CT DICOM series (LPS patient frame).

    Pixel (row r, column c) of slice n is RPI voxel (I-1-c, r, K-1-n): columns run to the
    patient's left, rows to posterior, slices from inferior to superior; files are named in
    a shuffled order. Stored value = HU + 1024 (RescaleIntercept -1024).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = arr_rpi[::-1, :, ::-1]  # axes (L, P, S)
    n_i, n_j, n_k = lps.shape
    a = aff_rpi.copy()
    # affine of the (L, P, S) array in RAS
    a[:3, 3] = aff_rpi[:3, 3] + aff_rpi[:3, 0] * (n_i - 1) + aff_rpi[:3, 2] * (n_k - 1)
    a[:3, 0] = -aff_rpi[:3, 0]
    a[:3, 2] = -aff_rpi[:3, 2]
    sp = np.linalg.norm(a[:3, :3], axis=0)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    row_dir = ras_to_lps @ (a[:3, 0] / sp[0])
    col_dir = ras_to_lps @ (a[:3, 1] / sp[1])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(seed).permutation(n_k)
    for n in range(n_k):
        pos = ras_to_lps @ (a[:3, 3] + a[:3, 2] * n)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientID = "phantom"
        ds.PatientName = "Phantom^Head"
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{sp[1]:.6f}", f"{sp[0]:.6f}"]
        ds.SliceThickness = f"{sp[2]:.6f}"
        ds.Rows, ds.Columns = n_j, n_i
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        pixels = (lps[:, :, n].T.astype(np.int32) + 1024).astype(np.int16)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        pydicom.dcmwrite(folder / f"slice_{order[n]:03d}.dcm", ds, enforce_file_format=True)
    return folder


def make_data_dir(root: Path, n_ct_studies: int = 3) -> Path:
    """raw/<study>/<image>: CT NIfTI studies (1-2 images), an MRI study, a DICOM study and
    an unusable 3-slice image. Small grids so a full build takes well under a second."""
    raw = root / "raw"
    for s in range(n_ct_studies):
        for i in range(1 + s % 2):
            arr, aff, _ = head_phantom(
                (44 + 4 * i, 48, 12 + s), (1.0, 1.0, 3.0), marker_ras_offset=(10 + 2 * s, 8, 4 * i)
            )
            save_nifti(arr, aff, raw / f"ct{s:02d}" / f"ct_{i}.nii.gz")
    arr, aff, _ = head_phantom((40, 44, 40), (1.0, 1.0, 1.0))
    mri = np.clip(arr.astype(np.float32) + 1000, 0, 1100) * 0.2 + 7.0
    save_nifti(mri.astype(np.float32), aff, raw / "mr00" / "t1.nii.gz")
    arr, aff, _ = head_phantom((40, 40, 12), (1.1, 1.1, 3.5))
    write_ct_series_lps(arr, aff, raw / "dcm00" / "series1", seed=1)
    thin = np.full((32, 32, 3), 40, dtype=np.int16)
    save_nifti(thin, rpi_affine((1, 1, 5)), raw / "ct99" / "ct_thin.nii.gz")
    return root


MODES = {"mr*": "mri", "*/t1*": "mri", "ct*": "ct"}


def make_volume(arr: np.ndarray, aff: np.ndarray) -> Volume:
    return Volume(arr, aff, {"source": "synthetic"})
