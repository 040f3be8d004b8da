"""DICOM series: shuffled files, oracles (dcm2niix, SimpleITK, highdicom), bad series."""

from __future__ import annotations

import glob
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_helpers import GEOMETRIES, corners, max_corner_mismatch, random_volume
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medinfer.errors import (
    ConfigError,
    GeometryError,
    InvalidImageError,
    ResourceLimitError,
    SeriesSelectionError,
)
from medinfer.io import (
    affine_lps_to_ras,
    affine_ras_to_lps,
    list_series,
    load,
    read_dicom,
    write_dicom_series,
)
from medinfer.volume import Volume

RIGHT_HANDED = ["oblique_aniso", "lps_aniso"]
LEFT_HANDED = ["lpi_permuted_oblique", "las_oblique"]
PYDICOM_DATA = Path(get_testdata_file("CT_small.dcm")).parent


def _series(tmp_path: Path, name: str = "oblique_aniso", dtype: str = "int16", seed: int = 7,
            **kw: object) -> tuple[Volume, Path]:
    vol = random_volume(GEOMETRIES[name], dtype=dtype, seed=seed)
    folder = tmp_path / f"series_{name}_{dtype}_{seed}"
    write_dicom_series(vol, folder, shuffle_seed=seed, **kw)  # type: ignore[arg-type]
    return vol, folder


def test_lps_ras_flip() -> None:
    a = GEOMETRIES["oblique_aniso"]
    lps = affine_ras_to_lps(a)
    assert np.allclose(lps[0], -a[0]) and np.allclose(lps[1], -a[1])
    assert np.allclose(lps[2], a[2])
    assert np.allclose(affine_lps_to_ras(lps), a)


@pytest.mark.parametrize("name", RIGHT_HANDED)
@pytest.mark.parametrize("dtype", ["int16", "uint16", "uint8"])
def test_shuffled_series_round_trip(tmp_path: Path, name: str, dtype: str) -> None:
    vol, folder = _series(tmp_path, name, dtype, modality="CT")
    files = sorted(folder.iterdir())
    # file names and InstanceNumber really are out of slice order
    inst = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files]
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation) for f in files]
    assert inst == list(range(1, len(files) + 1))
    assert z != sorted(z) and z != sorted(z, reverse=True)
    back = load(folder)
    # the CT IOD stores 12 to 16 bits: uint8 comes back as uint16 with the same values
    assert back.array.dtype == (np.dtype(np.uint16) if dtype == "uint8" else vol.array.dtype)
    assert np.array_equal(back.array, vol.array)
    assert np.allclose(back.affine, vol.affine, atol=1e-6)
    assert back.meta["modality"] == "CT"
    assert back.meta["rescale_type"] == "HU"
    assert len(back.meta["sop_instance_uids"]) == vol.spatial_shape[2]


@pytest.mark.parametrize("name", LEFT_HANDED)
def test_left_handed_grid_comes_back_flipped_in_k(tmp_path: Path, name: str) -> None:
    vol, folder = _series(tmp_path, name)
    back = load(folder)
    # slices are ordered along the normal I x J; world geometry is unchanged
    assert np.array_equal(back.array, vol.array[..., ::-1])
    assert max_corner_mismatch(back.corners_world(), vol.corners_world()) < 1e-6
    assert np.allclose(back.affine[:3, :2], vol.affine[:3, :2])
    assert np.allclose(back.affine[:3, 2], -vol.affine[:3, 2])


@pytest.mark.parametrize("name", RIGHT_HANDED + LEFT_HANDED)
def test_geometry_agrees_with_dcm2niix(tmp_path: Path, name: str) -> None:
    _, folder = _series(tmp_path, name)
    ours = load(folder)
    out = tmp_path / "dcm2niix"
    out.mkdir()
    run = subprocess.run(
        ["dcm2niix", "-z", "n", "-f", "conv", "-o", str(out), str(folder)],
        capture_output=True, text=True, check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (nii,) = glob.glob(str(out / "conv*.nii"))
    img = nib.load(nii)
    assert sorted(img.shape[:3]) == sorted(ours.spatial_shape)
    theirs = corners(img.affine, img.shape)
    assert max_corner_mismatch(theirs, ours.corners_world()) < 0.01
    # same voxel values at the same world position (dcm2niix may flip/permute axes)
    data = np.asanyarray(img.dataobj)
    ijk = np.rint(ours.world_to_voxel(theirs)).astype(int)
    idx = np.array([[a, b, c] for a in (0, img.shape[0] - 1) for b in (0, img.shape[1] - 1)
                    for c in (0, img.shape[2] - 1)])
    for (a, b, c), (i, j, k) in zip(idx, ijk, strict=True):
        assert data[a, b, c] == ours.array[0, i, j, k]


def test_geometry_agrees_with_simpleitk(tmp_path: Path) -> None:
    vol, folder = _series(tmp_path, "oblique_aniso", dtype="float32")
    ours = load(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    assert np.allclose(affine_lps_to_ras(lps), ours.affine, atol=1e-4)
    arr = sitk.GetArrayFromImage(img)  # (K, J, I)
    assert np.allclose(arr.transpose(2, 1, 0), ours.array[0], atol=1e-3)


def test_float_data_rescaled(tmp_path: Path) -> None:
    vol, folder = _series(tmp_path, "oblique_aniso", dtype="float32")
    back = load(folder)
    assert back.array.dtype == np.float32
    slope = back.meta["rescale_slope"]
    assert 0 < slope < (vol.array.max() - vol.array.min()) / 60000
    assert np.max(np.abs(back.array - vol.array)) <= slope * 0.5 + 1e-4
    # float data holding whole numbers are stored exactly
    ints = vol.with_array(np.round(vol.array))
    write_dicom_series(ints, tmp_path / "ints")
    assert np.array_equal(load(tmp_path / "ints").array, ints.array)


def test_skips_dicomdir_non_dicom_hidden_and_nested(tmp_path: Path) -> None:
    vol, folder = _series(tmp_path, "oblique_aniso")
    files = sorted(folder.iterdir())
    (folder / "deep" / "er").mkdir(parents=True)
    for f in files[::2]:
        f.rename(folder / "deep" / "er" / f.name)
    (folder / "README.txt").write_text("scanner export\n")
    (folder / "notes.json").write_text('{"a": 1}')
    (folder / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    shutil.copy(PYDICOM_DATA / "dicomdirtests" / "DICOMDIR", folder / "DICOMDIR")
    shutil.copy(PYDICOM_DATA / "rtplan.dcm", folder / "plan.dcm")  # DICOM without an image
    back = load(folder)
    assert np.array_equal(back.array, vol.array)
    assert back.meta["n_files"] == vol.spatial_shape[2]
    assert [s.n_slices for s in list_series(folder)] == [vol.spatial_shape[2]]


def test_copy_of_same_instance_ignored(tmp_path: Path) -> None:
    vol, folder = _series(tmp_path)
    f = next(folder.iterdir())
    shutil.copy(f, folder / "copy_of_one.dcm")
    assert np.array_equal(load(folder).array, vol.array)


def test_two_series_need_a_choice(tmp_path: Path) -> None:
    root = tmp_path / "study"
    a = random_volume(GEOMETRIES["oblique_aniso"], seed=1)
    b = random_volume(GEOMETRIES["lps_aniso"], shape=(9, 8, 6), seed=2)
    write_dicom_series(a, root / "a", series_description="T1 axial", modality="MR",
                       shuffle_seed=1)
    write_dicom_series(b, root / "b", series_description="CT chest", modality="CT",
                       series_number=2, shuffle_seed=2)
    infos = list_series(root)
    assert len(infos) == 2
    with pytest.raises(SeriesSelectionError) as err:
        load(root)
    msg = str(err.value)
    for info in infos:
        assert info.series_instance_uid in msg
    assert "T1 axial" in msg and "CT chest" in msg and "MR" in msg and "CT," in msg
    assert "7 slices" in msg and "6 slices" in msg
    by_desc = {i.series_description: i for i in infos}
    got = load(root, series_uid=by_desc["CT chest"].series_instance_uid)
    assert np.array_equal(got.array, b.array)
    got = read_dicom(root, series_uid=by_desc["T1 axial"].series_instance_uid)
    assert np.array_equal(got.array, a.array)
    with pytest.raises(SeriesSelectionError, match="1.2.3.4.5"):
        load(root, series_uid="1.2.3.4.5")


def _edit(folder: Path, fn) -> None:  # type: ignore[no-untyped-def]
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        fn(ds)
        ds.save_as(f)


def _by_position(folder: Path) -> list[Path]:
    files = sorted(folder.iterdir())
    return sorted(files, key=lambda f: float(pydicom.dcmread(f).SliceLocation))


def test_gap_is_geometry_error(tmp_path: Path) -> None:
    _, folder = _series(tmp_path, "oblique_aniso")
    _by_position(folder)[3].unlink()
    with pytest.raises(GeometryError, match="non-uniform slice spacing"):
        load(folder)


def test_duplicate_position_is_geometry_error(tmp_path: Path) -> None:
    _, folder = _series(tmp_path)
    src = _by_position(folder)[2]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / "echo2.dcm")
    with pytest.raises(GeometryError, match="share a position"):
        load(folder)


def test_gantry_tilt_is_geometry_error(tmp_path: Path) -> None:
    vol, folder = _series(tmp_path, "lps_aniso")
    row = np.array(pydicom.dcmread(next(folder.iterdir())).ImageOrientationPatient[3:], float)

    def tilt(ds: pydicom.Dataset) -> None:
        ipp = np.array(ds.ImagePositionPatient, float)
        normal_pos = float(ds.SliceLocation)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp + row * 0.2 * normal_pos]

    _edit(folder, tilt)
    with pytest.raises(GeometryError, match="gantry tilt"):
        load(folder)


def test_mixed_orientations_is_geometry_error(tmp_path: Path) -> None:
    _, folder = _series(tmp_path)
    f = _by_position(folder)[1]
    ds = pydicom.dcmread(f)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(f)
    with pytest.raises(GeometryError, match="orientations"):
        load(folder)


def test_per_slice_rescale_float(tmp_path: Path) -> None:
    vol, folder = _series(tmp_path, "oblique_aniso", dtype="int16")
    files = _by_position(folder)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = f"{0.5 + k * 0.25}"
        ds.RescaleIntercept = "-3.5"
        ds.save_as(f)
    back = load(folder)
    assert back.array.dtype == np.float32
    expected = vol.array * (0.5 + 0.25 * np.arange(vol.spatial_shape[2])) - 3.5
    assert np.allclose(back.array, expected)
    assert isinstance(back.meta["rescale_slope"], list)


def test_empty_and_imageless_folders(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidImageError, match="no DICOM images"):
        load(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    shutil.copy(PYDICOM_DATA / "dicomdirtests" / "DICOMDIR", junk / "DICOMDIR")
    with pytest.raises(InvalidImageError, match=r"1 not DICOM, 1 DICOMDIR"):
        load(junk)


def test_truncated_pixel_data(tmp_path: Path) -> None:
    _, folder = _series(tmp_path)
    f = _by_position(folder)[4]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(InvalidImageError, match="cannot decode"):
        load(folder)


def test_huge_rows_columns_rejected_before_pixels(tmp_path: Path) -> None:
    _, folder = _series(tmp_path)

    def grow(ds: pydicom.Dataset) -> None:
        ds.Rows = 65535
        ds.Columns = 65535

    _edit(folder, grow)
    tracemalloc.start()
    try:
        with pytest.raises(ResourceLimitError, match="65535 x 65535 x 7"):
            load(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024**2


def test_writer_refuses_sheared_and_nonempty(tmp_path: Path) -> None:
    sheared = GEOMETRIES["oblique_aniso"].copy()
    sheared[:3, 2] += 0.3 * sheared[:3, 0]
    vol = random_volume(sheared)
    with pytest.raises(GeometryError, match="not perpendicular"):
        write_dicom_series(vol, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        write_dicom_series(random_volume(GEOMETRIES["lps_aniso"]), tmp_path / "full")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- real test files
def test_pydicom_ct_small() -> None:
    path = get_testdata_file("CT_small.dcm")
    vol = load(path)
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    assert vol.shape == (1, ds.Columns, ds.Rows, 1)
    assert vol.array.dtype == np.int16
    assert np.array_equal(vol.array[0, :, :, 0], hu.T)
    lps_origin = np.array(ds.ImagePositionPatient, float)
    assert np.allclose(vol.origin, lps_origin * [-1, -1, 1])
    assert np.allclose(vol.spacing[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    assert vol.meta["modality"] == "CT" and vol.meta["patient_id"] == str(ds.PatientID)
    assert vol.meta["series_instance_uid"] == ds.SeriesInstanceUID


def test_pydicom_dicomdirtests() -> None:
    root = PYDICOM_DATA / "dicomdirtests"
    infos = list_series(root)
    assert len(infos) >= 5
    with pytest.raises(SeriesSelectionError) as err:
        load(root)
    assert all(i.series_instance_uid in str(err.value) for i in infos)
    by_desc = {i.series_description: i for i in infos}
    # 5 CT slices, files numbered in the opposite direction of their positions
    ct = load(root, series_uid=by_desc["SmartScore - Gated 0.5 sec"].series_instance_uid)
    assert ct.spatial_shape == (16, 16, 5)
    assert np.allclose(ct.spacing, [0.488281, 0.488281, 2.5], atol=1e-5)
    zs = ct.voxel_to_world([[0, 0, k] for k in range(5)])[:, 2]
    assert np.all(np.diff(zs) > 0)
    # 4 CT slices with a 200 mm gap
    with pytest.raises(GeometryError, match="non-uniform"):
        load(root, series_uid=by_desc["Routine Brain"].series_instance_uid)
    # radial MR: one orientation per slice
    with pytest.raises(GeometryError, match="orientations"):
        load(root, series_uid=by_desc["ANGIO Projected from   C"].series_instance_uid)
    # computed radiograph: no 3-D geometry
    with pytest.raises(GeometryError, match="no 3-D patient"):
        load(root, series_uid=by_desc["Cervical LAT"].series_instance_uid)


def test_pydicom_rtdose_grid_frame_offsets() -> None:
    path = get_testdata_file("rtdose.dcm")
    vol = load(path)
    ds = pydicom.dcmread(path)
    assert vol.spatial_shape == (ds.Columns, ds.Rows, int(ds.NumberOfFrames))
    assert np.isclose(vol.spacing[2], 5.0)
    expected = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    assert np.allclose(vol.array[0], expected.transpose(2, 1, 0), rtol=1e-6)


def test_pydicom_truncated_file() -> None:
    with pytest.raises(InvalidImageError):
        load(get_testdata_file("MR_truncated.dcm"))


# ---------------------------------------------------------------- enhanced multi-frame
def test_legacy_converted_enhanced_from_highdicom(tmp_path: Path) -> None:
    vol, folder = _series(tmp_path, "oblique_aniso", dtype="uint16")
    datasets = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=hd.UID(), series_number=9,
        sop_instance_uid=hd.UID(), instance_number=1,
    )
    out = tmp_path / "mf" / "enhanced.dcm"
    out.parent.mkdir()
    mf.save_as(out)
    back = load(out)
    assert np.array_equal(back.array, vol.array)
    assert np.allclose(back.affine, vol.affine, atol=1e-6)
    assert sorted(back.meta["frame_numbers"]) == list(range(1, vol.spatial_shape[2] + 1))
    assert load(out.parent).same_grid(back)


def _enhanced_by_hand(vol: Volume, path: Path, order: np.ndarray) -> None:
    """A minimal Enhanced MR object, frames stored in ``order``, per-frame rescale."""
    lps = affine_ras_to_lps(vol.affine)
    sx, sy, sz = vol.spacing
    row, col = lps[:3, 0] / sx, lps[:3, 1] / sy
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    n_i, n_j, n_k = vol.spatial_shape
    ds.Rows, ds.Columns, ds.NumberOfFrames = n_j, n_i, n_k
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = pydicom.Dataset()
    ori = pydicom.Dataset()
    ori.ImageOrientationPatient = [f"{v:.10f}" for v in (*row, *col)]
    meas = pydicom.Dataset()
    meas.PixelSpacing = [f"{sy:.10f}", f"{sx:.10f}"]
    meas.SliceThickness = f"{sz:.10f}"
    shared.PlaneOrientationSequence = [ori]
    shared.PixelMeasuresSequence = [meas]
    ds.SharedFunctionalGroupsSequence = [shared]
    per, frames = [], []
    raw = vol.array[0].astype(np.uint16)
    for k in order:
        item = pydicom.Dataset()
        pos = pydicom.Dataset()
        pos.ImagePositionPatient = [f"{v:.10f}" for v in lps[:3, :3] @ [0, 0, k] + lps[:3, 3]]
        pvt = pydicom.Dataset()
        pvt.RescaleSlope = f"{1 + k}"
        pvt.RescaleIntercept = "0.5"
        pvt.RescaleType = "US"
        item.PlanePositionSequence = [pos]
        item.PixelValueTransformationSequence = [pvt]
        per.append(item)
        frames.append(raw[:, :, k].T)
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = np.stack(frames).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_mr_by_hand_shuffled_frames(tmp_path: Path) -> None:
    vol = random_volume(GEOMETRIES["oblique_aniso"], dtype="uint16", seed=11)
    order = np.random.default_rng(3).permutation(vol.spatial_shape[2])
    path = tmp_path / "emr.dcm"
    _enhanced_by_hand(vol, path, order)
    back = load(path)
    assert back.array.dtype == np.float32
    k = np.arange(vol.spatial_shape[2])
    assert np.allclose(back.array, vol.array * (1 + k) + 0.5)
    assert np.allclose(back.affine, vol.affine, atol=1e-6)
    assert back.meta["frame_numbers"] == [int(np.flatnonzero(order == i)[0]) + 1 for i in k]


def test_unreadable_file_named_in_gap_error(tmp_path: Path) -> None:
    _, folder = _series(tmp_path)
    f = _by_position(folder)[3]
    f.write_bytes(f.read_bytes()[:200])  # header cut short: unreadable
    with pytest.raises(InvalidImageError, match=f"{f}: a file of the chosen DICOM series"):
        load(folder)
    # allowed to leave it out, the gap it leaves is still refused, naming the file
    with pytest.raises(GeometryError, match=r"unreadable file\(s\) were skipped"):
        load(folder, allow_missing_slices=True)


def test_single_frame_enhanced_object(tmp_path: Path) -> None:
    vol = random_volume(GEOMETRIES["lps_aniso"], shape=(6, 5, 1), dtype="uint16", seed=4)
    path = tmp_path / "one.dcm"
    _enhanced_by_hand(vol, path, np.array([0]))
    back = load(path)
    assert np.allclose(back.array, vol.array * 1 + 0.5)
    assert np.allclose(back.affine[:3, :2], vol.affine[:3, :2], atol=1e-6)


def test_huge_number_of_frames_rejected_early(tmp_path: Path) -> None:
    vol = random_volume(GEOMETRIES["lps_aniso"], shape=(6, 5, 3), dtype="uint16", seed=4)
    path = tmp_path / "many.dcm"
    _enhanced_by_hand(vol, path, np.arange(3))
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2_000_000_000
    del ds.PerFrameFunctionalGroupsSequence
    ds.save_as(path)
    with pytest.raises(ResourceLimitError, match="6 x 5 x 2000000000"):
        load(path)
