"""Fixtures of the training tests (helpers in ``training_toy``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_toy import write_dataset


@pytest.fixture
def toy_data(tmp_path: Path) -> tuple[Path, Path]:
    return write_dataset(tmp_path / "data")
