"""Model loaders behind one protocol, and model resolution (folder, card, bundled name).

Every loader returns a :class:`Model`: a callable that takes a float32 tensor of shape
``(N, C, *spatial)`` (channel first, spatial axes in model-grid order) and returns
logits ``(N, K, *spatial)`` (float32 or, under CUDA autocast, float16) on the same
device. Supported weight formats:

- ``torchscript``: :func:`torch.jit.load`;
- ``onnx``: onnxruntime with the CPU execution provider (the ``onnx`` extra);
- ``state_dict``: :func:`torch.load` with ``weights_only=True`` into a MONAI network
  (``UNet``, ``SegResNet``, ``DynUNet``, ``BasicUNet``, ``UNETR``, ``SwinUNETR``) built
  from the card's ``architecture``.

Model files are untrusted input: sizes are checked, checkpoints are never unpickled
beyond tensors and plain containers, the weights path must stay inside the model folder.
"""

from __future__ import annotations

import hashlib
import os
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from medinfer.errors import ModelError, parse_enum
from medinfer.models.card import ModelCard, Network, WeightFormat

if TYPE_CHECKING:
    import torch

#: bundled models live here, one folder per model name
ZOO_DIR = Path(__file__).resolve().parent / "zoo"
#: weight files larger than this are refused (4 GiB)
MAX_WEIGHTS_BYTES = 4 * 1024**3
CARD_NAME = "model.yaml"


class Device(StrEnum):
    """Where to run: ``auto`` picks CUDA when available, else CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@runtime_checkable
class Model(Protocol):
    """A loaded network.

    ``model(x)`` maps a float32 tensor ``(N, C, *spatial)`` to logits
    ``(N, K, *spatial)`` on ``x``'s device. ``device`` is where the weights live.
    """

    device: torch.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def resolve_device(device: Device | str | torch.device = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda`` (or a ``torch.device`` / ``"cuda:1"``) into a ``torch.device``.

    Raises
    ------
    ConfigError
        Unknown device name, or ``cuda`` requested on a machine without CUDA.
    """
    import torch

    from medinfer.errors import ConfigError

    if isinstance(device, torch.device):
        return device
    text = device.value if isinstance(device, Device) else str(device)
    if text.lower().startswith("cuda:"):
        base: Device = Device.CUDA
    else:
        base = parse_enum(Device, text, "device")
    if base is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base is Device.CUDA:
        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' was requested but no CUDA device is available")
        return torch.device(text.lower())
    return torch.device("cpu")


# ---------------------------------------------------------------------- wrappers
class TorchModel:
    """A ``torch.nn.Module`` (eager or TorchScript) in eval mode behind :class:`Model`.

    Inputs are moved to the model's ``device`` before the forward pass, so a caller that
    wraps the model (e.g. the detection pipeline's tent blending, which has no
    ``.device`` of its own) can hand in tensors from any device; the output stays on the
    model's device.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, fmt: str) -> None:
        self.module = module.to(device).eval()
        self.device = device
        self.format = fmt

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.device:
            x = x.to(self.device)
        out = self.module(x)
        if isinstance(out, (list, tuple)):  # deep supervision heads: the first is full-res
            out = out[0]
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return out

    def __repr__(self) -> str:
        name = type(self.module).__name__
        return f"TorchModel({name}, format={self.format}, device={self.device})"


class OnnxModel:
    """An onnxruntime session (CPU execution provider) behind :class:`Model`.

    Inputs on any device are copied to CPU float32 numpy; outputs come back as float32
    tensors on the input's device.
    """

    format = "onnx"

    def __init__(self, session: Any) -> None:
        import torch

        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.device = torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np
        import torch

        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)

    def __repr__(self) -> str:
        return f"OnnxModel(input={self.input_name!r})"


# ----------------------------------------------------------------------- loaders
def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path}: weights file is empty")
    if size > MAX_WEIGHTS_BYTES:
        raise ModelError(f"{path}: weights file is {size} bytes; at most {MAX_WEIGHTS_BYTES}")


def load_torchscript(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> TorchModel:
    """Load a TorchScript archive (``torch.jit.save``) as a :class:`Model`.

    Raises
    ------
    ModelError
        The file is missing, empty, too large, or not a TorchScript archive.
    """
    import torch

    p = Path(path)
    _check_file(p)
    dev = resolve_device(device)
    try:
        module = torch.jit.load(str(p), map_location=dev)
    except Exception as exc:  # torch.jit.load raises RuntimeError and others on junk input
        if isinstance(exc, MemoryError):
            raise
        raise ModelError(
            f"{p}: not a TorchScript model ({_first_line(exc)}); expected a file written "
            "by torch.jit.save"
        ) from None
    return TorchModel(module, dev, "torchscript")


def load_onnx(path: str | os.PathLike[str]) -> OnnxModel:
    """Load an ONNX model with onnxruntime (CPU execution provider).

    Raises
    ------
    ModelError
        The file is missing or not a valid ONNX model, or onnxruntime is not installed
        (``pip install medinfer[onnx]``).
    """
    p = Path(path)
    _check_file(p)
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError(
            f"{p}: ONNX models need onnxruntime; install the extra: pip install 'medinfer[onnx]'"
        ) from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(p), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped exceptions (Fail, InvalidGraph)
        raise ModelError(f"{p}: not a valid ONNX model ({_first_line(exc)})") from None
    return OnnxModel(session)


def build_network(network: Network | str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """Instantiate a MONAI network by name with ``kwargs``.

    Raises
    ------
    ModelError
        Unknown network or invalid keyword arguments (the message names them).
    """
    from monai.networks import nets

    net = parse_enum(Network, network, "architecture.network")
    cls = {Network.UNET: nets.UNet, Network.SEGRESNET: nets.SegResNet,
           Network.DYNUNET: nets.DynUNet, Network.BASICUNET: nets.BasicUNet,
           Network.UNETR: nets.UNETR, Network.SWINUNETR: nets.SwinUNETR}[net]
    try:
        module: torch.nn.Module = cls(**kwargs)
    except (TypeError, ValueError, AssertionError, IndexError, KeyError) as exc:
        raise ModelError(
            f"architecture.kwargs: cannot build {net.value} ({_first_line(exc)})"
        ) from None
    return module


def load_state_dict_model(
    path: str | os.PathLike[str],
    network: Network | str,
    kwargs: dict[str, Any],
    device: torch.device | str = "cpu",
) -> TorchModel:
    """Build a MONAI network and load a state dict saved with ``torch.save``.

    The file is read with ``torch.load(..., weights_only=True)`` (no arbitrary
    unpickling). It may hold the state dict itself, or a dict with the state dict under
    ``state_dict``, ``model``, ``model_state_dict`` or ``network_weights``. Keys with a
    ``module.`` prefix (DataParallel) are accepted. Loading is strict.

    Raises
    ------
    ModelError
        The file is not a PyTorch checkpoint, holds no state dict, or its tensors do
        not match the architecture (missing / unexpected keys, wrong shapes).
    """
    import torch

    p = Path(path)
    _check_file(p)
    dev = resolve_device(device)
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler raises many types on junk input
        if isinstance(exc, MemoryError):
            raise
        raise ModelError(
            f"{p}: not a PyTorch state dict ({_first_line(exc)}); expected a file written by "
            "torch.save(model.state_dict(), path)"
        ) from None
    state = _extract_state_dict(obj)
    if state is None:
        raise ModelError(f"{p}: the checkpoint holds no state dict of tensors")
    module = build_network(network, kwargs)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"{p}: weights do not match architecture "
            f"{parse_enum(Network, network, 'network').value} ({_first_line(exc, 300)})"
        ) from None
    return TorchModel(module, dev, "state_dict")


def _extract_state_dict(obj: Any) -> dict[str, Any] | None:
    import torch

    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "network_weights"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    return None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else exc.__class__.__name__
    return line[:limit]


# -------------------------------------------------------------- card + folder
def weights_path(card: ModelCard, model_dir: str | os.PathLike[str]) -> Path:
    """Absolute path of the card's weights file; it must lie inside ``model_dir``.

    Raises
    ------
    ModelError
        The path escapes the model folder (e.g. through a symbolic link).
    """
    root = Path(model_dir).resolve()
    p = (root / card.weights.file).resolve()
    if root != p and root not in p.parents:
        raise ModelError(
            f"weights.file: {card.weights.file!r} points outside the model folder {root}"
        )
    return p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(card: ModelCard, model_dir: str | os.PathLike[str],
               device: Device | str | torch.device = "auto") -> Model:
    """Load the network described by ``card`` from ``model_dir``.

    Parameters
    ----------
    card : the validated model card.
    model_dir : folder holding the card and the weights file.
    device : ``auto``, ``cpu``, ``cuda`` (or ``cuda:N``); ONNX models always run on CPU.

    Returns
    -------
    Model
        Callable ``(N, C, *spatial) float32 -> (N, K, *spatial)`` logits.

    Raises
    ------
    ModelError
        Missing / corrupt / mismatching weights, checksum mismatch.
    ConfigError
        Invalid device.
    """
    dev = resolve_device(device)
    from medinfer.models.monai_bundle import is_monai_bundle
    from medinfer.models.nnunet import is_nnunet_folder

    if is_nnunet_folder(model_dir):
        # the raw networks (all folds, mean of logits); nnU-Net's pre-processing, windows
        # and export: medinfer.formats.nnunet.NnUNetPredictor / `medinfer predict`
        from medinfer.models.nnunet import load_nnunet_networks, read_nnunet_folder

        return load_nnunet_networks(read_nnunet_folder(model_dir), dev)[0]
    if is_monai_bundle(model_dir):
        raise ModelError(f"{model_dir}: MONAI bundles run with their own config code: use "
                         "medinfer.formats.monai_bundle.MonaiBundle(..., trust_model_code=True) "
                         "or `medinfer predict --model BUNDLE --trust-model-code`")
    path = weights_path(card, model_dir)
    _check_file(path)
    if card.weights.sha256 is not None and _sha256(path) != card.weights.sha256.lower():
        raise ModelError(f"{path}: sha256 does not match weights.sha256 in the model card")
    fmt = card.weights.format
    if fmt is WeightFormat.TORCHSCRIPT:
        return load_torchscript(path, dev)
    if fmt is WeightFormat.ONNX:
        return load_onnx(path)
    if card.architecture is None:  # the card validator already requires it
        raise ModelError("architecture: required when weights.format is 'state_dict'")
    return load_state_dict_model(path, card.architecture.network, card.architecture.kwargs, dev)


def bundled_models() -> list[str]:
    """Names of the bundled models (folders in ``medinfer/models/zoo`` with a model.yaml)."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(d.name for d in ZOO_DIR.iterdir() if (d / CARD_NAME).is_file())


def resolve_model(name_or_path: str | os.PathLike[str]) -> tuple[ModelCard, Path]:
    """Find and validate a model card.

    ``name_or_path`` is a folder holding ``model.yaml``, the path of a model card
    (any ``.yaml`` file; the model folder is its parent), or the name of a bundled
    model (``demo-brain``) in ``medinfer/models/zoo/<name>/``. An nnU-Net v2 model
    folder or a MONAI bundle gives a display card (label names and colours from
    ``dataset.json`` / ``metadata.json``; run them with
    :func:`medinfer.formats.open_predictor`).

    Returns
    -------
    (ModelCard, Path)
        The card and the absolute model folder.

    Raises
    ------
    ModelError
        Nothing found under that name or path, or an invalid card.
    """
    text = os.fspath(name_or_path)
    p = Path(text)
    if p.is_dir():
        card_path = p / CARD_NAME
        if not card_path.is_file():
            from medinfer.models.monai_bundle import bundle_display_card, is_monai_bundle
            from medinfer.models.nnunet import is_nnunet_folder, nnunet_display_card

            if is_nnunet_folder(p):  # display card (labels) of an nnU-Net v2 model folder
                return nnunet_display_card(p), p.resolve()
            if is_monai_bundle(p):  # display card from metadata.json (no config code runs)
                return bundle_display_card(p), p.resolve()
            from medinfer.models.nnunet_v1 import is_nnunet_v1_folder

            if is_nnunet_v1_folder(p):
                raise ModelError(f"{p}: nnU-Net v1 model folder (plans.pkl); `medinfer predict` "
                                 "does not take v1 folders: run it with `medinfer-nnUNet_predict` "
                                 "(nnUNet_predict's flags) or "
                                 "medinfer.formats.nnunet_v1.NnUNetV1Predictor")
            raise ModelError(f"{p}: model folder has no {CARD_NAME} (and is neither an nnU-Net "
                             "v2 model folder nor a MONAI bundle)")
        return ModelCard.from_yaml(card_path), p.resolve()
    if p.is_file():
        if p.suffix.lower() not in (".yaml", ".yml"):
            raise ModelError(
                f"{p}: expected a model folder or its model.yaml, got a {p.suffix or 'plain'} file "
                "(weights files are named inside model.yaml)"
            )
        return ModelCard.from_yaml(p), p.resolve().parent
    names = bundled_models()
    if text in names:
        return ModelCard.from_yaml(ZOO_DIR / text / CARD_NAME), (ZOO_DIR / text).resolve()
    listed = ", ".join(names) if names else "none installed"
    raise ModelError(f"model {text!r}: no such folder, model.yaml or bundled model ({listed})")
