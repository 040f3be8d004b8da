"""``init_weights`` (fine-tuning start) is honoured by the segmentation loop."""

from __future__ import annotations

import pytest
import torch
from training_toy import tiny_config

from medinfer.errors import ConfigError
from medinfer.training import train


def _weights(out):
    state = torch.load(str(out / "checkpoints" / "last.pt"), map_location="cpu",
                       weights_only=True)
    return state["model"]


def test_segmentation_run_starts_from_init_weights(toy_data, tmp_path):
    images, labels = toy_data
    a = tmp_path / "a"
    train(tiny_config(images, labels, a, max_steps=3, checkpoint_every=1), export=False)
    trained = _weights(a)
    init = tmp_path / "init.pt"
    torch.save(trained, str(init))
    # a fresh run with a different seed and a negligible learning rate: after one step
    # its weights are (almost) the ones it started from
    b = tmp_path / "b"
    train(tiny_config(images, labels, b, max_steps=1, checkpoint_every=1, seed=7, lr=1e-12,
                      weight_decay=0.0, init_weights=str(init)), export=False)
    got = _weights(b)
    for key, value in trained.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


def test_init_weights_missing_file_is_config_error(toy_data, tmp_path):
    images, labels = toy_data
    cfg = tiny_config(images, labels, tmp_path / "c", max_steps=1,
                      init_weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="init_weights"):
        train(cfg, export=False)
