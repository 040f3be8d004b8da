"""Open a model given as a *checkpoint*: a weights file, a model folder or a bundled name.

This is how ``--checkpoint`` (``medinfer detect``), ``model.checkpoint`` (detection
config) and the PIVOT compatibility layer name a model. A checkpoint is one of

- a model folder holding ``model.yaml``, a ``model.yaml`` path, or a bundled model name
  (``demo-nodules``): opened with :func:`medinfer.models.resolve_model` /
  :func:`medinfer.models.load_model`;
- a TorchScript archive (``torch.jit.save``; any suffix);
- a PyTorch state dict (``.pt`` / ``.pth`` / ``.ckpt``, read with ``weights_only=True``)
  plus an ``architecture`` naming a MONAI network (``unet``, ``basicunet``,
  ``segresnet``, ``dynunet``, ``unetr``, ``swinunetr``, case-insensitive) and its
  keyword arguments.

A weights file carries no model card; the card comes from the caller (``card``: its
input contract, inference defaults and labels are used, its ``weights`` are replaced) or,
for detection, :func:`default_detection_card` (the PIVOT defaults: CT, RAS, 1 mm, HU
window [-1000, 400] scaled to [0, 1], 128^3 windows, overlap 0.5, sigmoid heat map).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from medinfer.errors import ModelError
from medinfer.models.card import ModelCard, Network
from medinfer.models.loaders import (
    Model,
    load_model,
    load_state_dict_model,
    load_torchscript,
    resolve_model,
)

__all__ = ["default_detection_card", "is_weights_file", "open_checkpoint", "resolve_checkpoint"]

#: suffixes of weights files (anything else that is a file must be a model.yaml)
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".ts", ".torchscript", ".bin", ".tar")


def is_weights_file(path: str | os.PathLike[str]) -> bool:
    """True for an existing file that is not a ``.yaml`` / ``.yml`` model card."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() not in (".yaml", ".yml")


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip file holding ``<name>/code/`` and ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def default_detection_card(name: str = "checkpoint", **changes: Any) -> ModelCard:
    """The model card assumed for a bare detection checkpoint (PIVOT defaults).

    Input: 1 CT channel in HU, reoriented to RAS, resampled to 1 mm, clipped to
    [-1000, 400] HU and scaled to [0, 1]; sliding window 128^3, overlap 0.5, Gaussian
    blending (sigma 0.125 of the patch), batch 4; output: one sigmoid heat-map channel.
    ``changes`` replace top-level card sections (e.g. ``weights``, ``architecture``).
    """
    data: dict[str, Any] = {
        "name": name, "version": "0.0.0", "task": "detection",
        "description": "heat-map detector loaded from a bare checkpoint (PIVOT defaults)",
        "labels": {0: {"name": "background"}, 1: {"name": "nodule"}},
        "input": {"modality": "CT", "channels": 1, "orientation": "RAS",
                  "spacing": [1.0, 1.0, 1.0],
                  "normalization": {"method": "ct_window", "min_hu": -1000, "max_hu": 400}},
        "inference": {"mode": "sliding_window", "patch_size": [128, 128, 128], "overlap": 0.5,
                      "blending": "gaussian", "sigma_scale": 0.125, "batch_size": 4},
        "output": {"activation": "sigmoid", "threshold": 0.5},
        "weights": {"format": "torchscript", "file": "model.pt"},
    }
    data.update(changes)
    return ModelCard.from_dict(data)


def _with_weights(card: ModelCard, path: Path, fmt: str,
                  architecture: dict[str, Any] | None) -> ModelCard:
    data = card.model_dump(mode="json", exclude_none=True)
    data["weights"] = {"format": fmt, "file": path.name}
    if architecture is not None:
        data["architecture"] = architecture
    else:
        data.pop("architecture", None)
    return ModelCard.from_dict(data)


def open_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    architecture: str | None = None,
    architecture_kwargs: dict[str, Any] | None = None,
    card: ModelCard | None = None,
    device: str = "auto",
) -> tuple[ModelCard, Model]:
    """Load the model named by ``checkpoint`` (see the module docstring).

    Parameters
    ----------
    checkpoint : weights file, model folder, ``model.yaml`` or bundled model name.
    architecture : MONAI network of a state-dict file (default: the card's architecture).
    architecture_kwargs : its keyword arguments (default: the card's, else
        ``spatial_dims=3, in_channels=1, out_channels=1`` plus the network's defaults).
    card : model card to use for a weights file (default :func:`default_detection_card`).
    device : ``auto``, ``cpu``, ``cuda``.

    Returns
    -------
    (ModelCard, Model)
        The card (its ``weights`` describe the file actually loaded) and the callable
        ``(N, C, *spatial) float32 -> (N, K, *spatial)`` logits.

    Raises
    ------
    ModelError
        Nothing found under that name; a file that is neither TorchScript nor a state dict
        matching the architecture (the message lists what was tried).
    """
    text = os.fspath(checkpoint)
    p = Path(text)
    if not is_weights_file(p):
        if p.suffix.lower() in WEIGHT_SUFFIXES and not p.exists():
            raise ModelError(f"checkpoint {text!r}: no such file")
        base, folder = resolve_model(text)
        return base, load_model(base, folder, device)
    base_card = card or default_detection_card(p.stem or "checkpoint")
    tried: list[str] = []
    if _is_torchscript(p):
        return _with_weights(base_card, p, "torchscript", None), load_torchscript(p, device)
    tried.append("TorchScript (not a torch.jit.save archive)")
    arch_name = architecture
    kwargs = architecture_kwargs
    if arch_name is None and base_card.architecture is not None:
        arch_name = str(base_card.architecture.network.value)
        kwargs = dict(base_card.architecture.kwargs) if kwargs is None else kwargs
    if arch_name is None:
        allowed = ", ".join(m.value.lower() for m in Network)
        raise ModelError(
            f"checkpoint {p}: cannot be matched to an architecture; tried: {'; '.join(tried)}; "
            f"a state dict needs model.architecture (one of {allowed}) and its kwargs "
            "(model.architecture_kwargs), or a model folder with model.yaml")
    if kwargs is None:
        kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1}
    try:
        model = load_state_dict_model(p, arch_name, kwargs, device)
    except ModelError as exc:
        tried.append(f"state dict into {arch_name}({_kw(kwargs)}): {exc}")
        raise ModelError(f"checkpoint {p}: cannot be matched to an architecture; tried: "
                         f"{'; '.join(tried)}") from None
    from medinfer.errors import parse_enum

    net = parse_enum(Network, arch_name, "model.architecture")
    arch = {"network": net.value, "kwargs": kwargs}
    return _with_weights(base_card, p, "state_dict", arch), model


def _kw(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def resolve_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    architecture: str | None = None,
    architecture_kwargs: dict[str, Any] | None = None,
) -> tuple[ModelCard, Path]:
    """Card and model folder for ``checkpoint``, for :func:`medinfer.models.load_model`.

    A model folder, ``model.yaml`` or bundled name: :func:`medinfer.models.resolve_model`.
    A weights file: the ``model.yaml`` in the same folder gives the card (its
    ``architecture`` builds a state dict unless ``architecture`` is given), else
    :func:`default_detection_card`; ``weights`` become that file (format detected:
    TorchScript archive or state dict); the folder is the file's folder.

    Raises
    ------
    ModelError
        No such file / name; a state dict with no architecture known (what was tried is
        listed); an invalid ``model.yaml`` beside the file.
    """
    text = os.fspath(checkpoint)
    p = Path(text)
    if not is_weights_file(p):
        if p.suffix.lower() in WEIGHT_SUFFIXES and not p.exists():
            raise ModelError(f"checkpoint {text!r}: no such file")
        return resolve_model(text)
    beside = p.parent / "model.yaml"
    base = ModelCard.from_yaml(beside) if beside.is_file() else default_detection_card(p.stem)
    if _is_torchscript(p):
        return _with_weights(base, p, "torchscript", None), p.parent.resolve()
    arch: dict[str, Any] | None = None
    if architecture is not None:
        from medinfer.errors import parse_enum

        net = parse_enum(Network, architecture, "model.architecture")
        arch = {"network": net.value, "kwargs": dict(architecture_kwargs or {})}
    elif base.architecture is not None:
        arch = {"network": base.architecture.network.value,
                "kwargs": dict(base.architecture.kwargs)}
    if arch is None:
        allowed = ", ".join(m.value.lower() for m in Network)
        card_note = "has no architecture" if beside.is_file() else "none found"
        raise ModelError(
            f"checkpoint {p}: cannot be matched to an architecture; tried: TorchScript (not a "
            f"torch.jit.save archive); model.yaml beside it ({card_note}); a state dict needs "
            f"an architecture (one of {allowed}) with its kwargs")
    return _with_weights(base, p, "state_dict", arch), p.parent.resolve()
