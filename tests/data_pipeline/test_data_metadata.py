"""DatasetMetadata: scanning raw/<study>/<image>, modes, JSON round trip, validation."""

import json

import pytest
from dp_helpers import MODES, make_data_dir

from medinfer.data import DatasetMetadata
from medinfer.errors import ConfigError


def test_from_directory_finds_nifti_and_dicom_and_modes(tmp_path):
    root = make_data_dir(tmp_path)
    (root / "raw" / "ct00" / "notes.txt").write_text("not an image")
    (root / "raw" / "ct00" / ".hidden.nii.gz").write_bytes(b"")
    meta = DatasetMetadata.from_directory(root, MODES)
    keys = [(e.study, e.image, e.mode, e.kind) for e in meta.images]
    assert keys == [
        ("ct00", "ct_0.nii.gz", "ct", "nifti"),
        ("ct01", "ct_0.nii.gz", "ct", "nifti"),
        ("ct01", "ct_1.nii.gz", "ct", "nifti"),
        ("ct02", "ct_0.nii.gz", "ct", "nifti"),
        ("ct99", "ct_thin.nii.gz", "ct", "nifti"),
        ("dcm00", "series1", "ct", "dicom_folder"),  # DICOM Modality CT, no pattern
        ("mr00", "t1.nii.gz", "mri", "nifti"),
    ]
    assert meta.images[0].path == "raw/ct00/ct_0.nii.gz"
    path = meta.save(root)
    assert path.name == "metadata.json"
    assert DatasetMetadata.load(root).images == meta.images


def test_unmatched_image_and_bad_modes_are_config_errors(tmp_path):
    root = make_data_dir(tmp_path)
    with pytest.raises(ConfigError, match="no pattern matches image 'mr00/t1.nii.gz'"):
        DatasetMetadata.from_directory(root, {"ct*": "ct"})
    with pytest.raises(ConfigError, match="'pet' is not allowed"):
        DatasetMetadata.from_directory(root, "pet")
    with pytest.raises(ConfigError, match="no 'raw/'"):
        DatasetMetadata.from_directory(tmp_path / "nowhere", "ct")


def test_load_rejects_paths_leaving_the_data_folder(tmp_path):
    doc = {
        "format": "medinfer.data.metadata",
        "version": 1,
        "images": [
            {"study": "a", "image": "b", "path": "../../etc/passwd", "mode": "ct", "kind": "nifti"}
        ],
    }
    (tmp_path / "metadata.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="leaves the data folder"):
        DatasetMetadata.load(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        DatasetMetadata.load(tmp_path / "missing")


def test_single_dicom_files_with_and_without_suffix(tmp_path):
    import shutil

    from pydicom.data import get_testdata_file

    for name in ("slice.dcm", "IM0001"):
        dst = tmp_path / "raw" / "one" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(get_testdata_file("CT_small.dcm"), dst)
    meta = DatasetMetadata.from_directory(tmp_path)  # no mapping: DICOM Modality CT
    assert [(e.image, e.kind, e.mode) for e in meta.images] == [
        ("IM0001", "dicom_file", "ct"),
        ("slice.dcm", "dicom_file", "ct"),
    ]
