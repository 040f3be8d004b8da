"""Loaders for TorchScript, ONNX and state dict + MONAI architecture; resolve_model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from medinfer.errors import ModelError
from medinfer.models import (
    ModelCard,
    bundled_models,
    load_model,
    load_onnx,
    load_state_dict_model,
    load_torchscript,
    resolve_model,
)

UNET_KWARGS: dict[str, Any] = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
    "channels": [4, 8], "strides": [2], "num_res_units": 0,
}


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _write_card(folder: Path, fmt: str, file: str, **extra: Any) -> Path:
    card: dict[str, Any] = {
        "name": "tiny",
        "labels": {0: {"name": "bg"}, 1: {"name": "a"}, 2: {"name": "b"}},
        "weights": {"format": fmt, "file": file},
        **extra,
    }
    p = folder / "model.yaml"
    p.write_text(yaml.safe_dump(card))
    return p


@pytest.fixture()
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 1, 8, 8, 8)


def test_torchscript_scripted_and_traced(tmp_path: Path, x: torch.Tensor) -> None:
    net = TinyNet().eval()
    ref = net(x)
    torch.jit.save(torch.jit.script(net), str(tmp_path / "s.ts"))
    torch.jit.save(torch.jit.trace(net, x), str(tmp_path / "t.ts"))
    for name in ("s.ts", "t.ts"):
        model = load_torchscript(tmp_path / name, "cpu")
        torch.testing.assert_close(model(x), ref)
    _write_card(tmp_path, "torchscript", "s.ts")
    card, folder = resolve_model(tmp_path)
    torch.testing.assert_close(load_model(card, folder, "cpu")(x), ref)


def test_onnx(tmp_path: Path, x: torch.Tensor) -> None:
    net = TinyNet().eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (x,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "n", 2: "i", 3: "j", 4: "k"}}, dynamo=False)
    model = load_onnx(path)
    y = torch.randn(1, 1, 6, 10, 7)
    np.testing.assert_allclose(model(y).numpy(), net(y).detach().numpy(), atol=1e-5)
    _write_card(tmp_path, "onnx", "m.onnx")
    card, folder = resolve_model(tmp_path / "model.yaml")
    assert load_model(card, folder, "cpu")(y).shape == (1, 3, 6, 10, 7)


def test_state_dict_monai_unet(tmp_path: Path, x: torch.Tensor) -> None:
    from monai.networks.nets import UNet

    net = UNet(**UNET_KWARGS).eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    with torch.no_grad():
        ref = net(x)
    for name in ("w.pt", "ckpt.pt"):
        model = load_state_dict_model(tmp_path / name, "UNet", UNET_KWARGS, "cpu")
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref)
    _write_card(tmp_path, "state_dict", "w.pt",
                architecture={"network": "UNet", "kwargs": UNET_KWARGS})
    card, folder = resolve_model(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(load_model(card, folder, "cpu")(x), ref)


def test_state_dict_wrong_architecture(tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    torch.save(UNet(**UNET_KWARGS).state_dict(), tmp_path / "w.pt")
    other = dict(UNET_KWARGS, channels=[8, 16])
    with pytest.raises(ModelError, match="do not match architecture UNet"):
        load_state_dict_model(tmp_path / "w.pt", "UNet", other)
    with pytest.raises(ModelError, match="architecture.kwargs"):
        load_state_dict_model(tmp_path / "w.pt", "UNet", {"bogus": 1})


@pytest.mark.parametrize(
    "content", [b"hello, I am not a model\n", b"\x00" * 100, b"PK\x03\x04junk"]
)
def test_not_a_model_is_model_error(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "model.bin"
    p.write_bytes(content)
    with pytest.raises(ModelError, match="not a TorchScript model"):
        load_torchscript(p)
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        load_onnx(p)
    with pytest.raises(ModelError, match="not a PyTorch state dict"):
        load_state_dict_model(p, "UNet", UNET_KWARGS)


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    import pickle

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"x": Path("/")}))
    with pytest.raises(ModelError, match="not a PyTorch state dict"):
        load_state_dict_model(p, "UNet", UNET_KWARGS)


def test_sha256_mismatch_and_missing_weights(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(TinyNet()), str(tmp_path / "s.ts"))
    _write_card(tmp_path, "torchscript", "s.ts")
    card = ModelCard.from_yaml(tmp_path / "model.yaml")
    bad = card.model_copy(update={"weights": card.weights.model_copy(update={"sha256": "0" * 64})})
    with pytest.raises(ModelError, match="sha256"):
        load_model(bad, tmp_path, "cpu")
    with pytest.raises(ModelError, match="not found"):
        load_model(card, tmp_path / "elsewhere", "cpu")


def test_resolve_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model("no-such-model-name")
    with pytest.raises(ModelError, match="has no model.yaml"):
        resolve_model(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(ModelError, match="expected a model folder"):
        resolve_model(tmp_path / "w.pt")


def test_bundled_models_load() -> None:
    """Every bundled model's card validates and its weights load."""
    for name in bundled_models():
        card, folder = resolve_model(name)
        assert card.name
        model = load_model(card, folder, "cpu")
        assert callable(model)


def test_resolve_device() -> None:
    from medinfer.errors import ConfigError
    from medinfer.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("AUTO").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'auto', 'cpu', 'cuda'"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
