"""Shared settings and fixtures for inference tests (one torch thread: tiny nets, shared CPUs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from inference_helpers import UNET, card_dict

torch.set_num_threads(1)


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    d = tmp_path / "model"
    d.mkdir()
    torch.save(UNet(**UNET).state_dict(), d / "model.pt")
    (d / "model.yaml").write_text(yaml.safe_dump(card_dict()))
    return d
