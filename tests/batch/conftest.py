"""Fixtures of the cohort-run tests (one torch thread: tiny nets, shared CPUs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from batch_helpers import make_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))
