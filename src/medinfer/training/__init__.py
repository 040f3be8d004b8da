"""medinfer.training: train, evaluate, search and export segmentation models.

``train(config)`` (alias ``train_uneted``, the name of the UNet3D suite) trains a MONAI
network on paired images and label maps and writes a medinfer model folder. Also here:
support code for the bundled demo models (``nodules_synth``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["EarlyStopping", "TrainConfig", "TrainResult", "train", "train_uneted"]


def __getattr__(name: str) -> Any:
    if name in ("train", "train_uneted", "EarlyStopping", "TrainResult"):
        from medinfer.training import loop

        return loop.train if name == "train_uneted" else getattr(loop, name)
    if name == "TrainConfig":
        from medinfer.training.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'medinfer.training' has no attribute {name!r}")
