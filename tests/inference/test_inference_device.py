"""Inputs follow the model's device, also through wrappers without ``.device``.

Issue 17 item 15: with ``blending: linear`` the detection pipeline hands the engine a
tent-weighting wrapper without ``.device``, so the windows stayed on the input's device
while the network sat on CUDA. CPU-only check: a fake network on the ``meta`` device
records the device of every input it receives.
"""

from __future__ import annotations

import torch

from medinfer.detection import model_grid_logits
from medinfer.inference import sliding_window_inference
from medinfer.models.card import InferenceMode
from medinfer.models.loaders import TorchModel
from medinfer.postprocess.detection_config import BlendingChoice


class DeviceTracker(torch.nn.Module):
    """Records the device of each input; answers with CPU zeros of 2 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.seen: list[torch.device] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.device)
        assert x.device == self.scale.device, "input not on the model's device"
        return torch.zeros((x.shape[0], 2, *x.shape[2:]))


def test_torch_model_moves_inputs_to_its_device() -> None:
    tracker = DeviceTracker()
    model = TorchModel(tracker, torch.device("meta"), "fake")
    x = torch.rand(1, 1, 12, 10, 9)
    # a plain wrapper (no .device): the engine keeps windows on the input's device
    y = sliding_window_inference(x, lambda t: model(t), (8, 8, 8), overlap=0.5)
    assert y.shape == (1, 2, 12, 10, 9)
    assert tracker.seen and set(tracker.seen) == {torch.device("meta")}


def test_detection_linear_blending_runs_windows_on_the_model_device() -> None:
    tracker = DeviceTracker()
    model = TorchModel(tracker, torch.device("meta"), "fake")
    settings = {"blending": BlendingChoice.LINEAR, "patch_size": (8, 8, 8), "overlap": 0.25,
                "sigma_scale": 0.125, "batch_size": 2, "mode": InferenceMode.SLIDING_WINDOW,
                "size_divisible": 1}
    y = model_grid_logits(torch.rand(1, 1, 11, 9, 13), model, settings, [((), 0, ())])
    assert y.shape == (1, 2, 11, 9, 13)
    assert tracker.seen and set(tracker.seen) == {torch.device("meta")}


def test_gpu_check_without_cuda_exits_cleanly(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert module.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
