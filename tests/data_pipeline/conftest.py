"""Fixtures of the data-pipeline tests: a small data folder with CT, MRI and DICOM images."""

from pathlib import Path

import pytest
from dp_helpers import MODES, make_data_dir

from medinfer.data import DatasetMetadata


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = make_data_dir(tmp_path / "data")
    DatasetMetadata.from_directory(root, MODES).save(root)
    return root
