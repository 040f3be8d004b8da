"""Shared settings and fixtures for inference tests (one torch thread: tiny nets, shared CPUs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_seg_model

torch.set_num_threads(1)


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return make_tiny_seg_model(tmp_path / "model", ("csf", "tissue"))
