"""nnU-Net v2 trained model folders: reading, checkpoints and networks (no nnunetv2 needed).

A model folder ``<Trainer>__<Plans>__<configuration>`` holds ``dataset.json``,
``plans.json`` and ``fold_<f>/checkpoint_final.pth`` (and/or ``checkpoint_best.pth``).
This module is the *loader* side: :func:`read_nnunet_folder` parses the folder,
:func:`load_nnunet_networks` returns the folds' networks as one callable
(``(N, C, *patch) -> (N, K, *patch)`` logits, mean over folds) and
:func:`nnunet_display_card` the label names. nnU-Net's own pipeline (pre-processing,
sliding window, export) that runs such a folder on a scan lives one layer up, in
:mod:`medinfer.formats.nnunet` (:class:`~medinfer.formats.nnunet.NnUNetPredictor`).

Networks are built from the plans' ``architecture`` entry with
``dynamic_network_architectures`` (the package nnU-Net itself uses; extra ``nnunet``).
Only classes under ``dynamic_network_architectures.`` and ``torch.nn.`` may be named
(plans are untrusted). Checkpoints are read with ``torch.load(weights_only=True)``, the
numpy scalar types that nnU-Net stores being allow-listed with
:func:`torch.serialization.safe_globals`.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medinfer._jsonio import read_json_object
from medinfer.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

__all__ = [
    "NnUNetEnsemble",
    "NnUNetFolder",
    "build_network",
    "display_card",
    "is_nnunet_folder",
    "load_checkpoint",
    "load_nnunet_networks",
    "nnunet_display_card",
    "read_nnunet_folder",
]

EXTRA_HINT = "install the extra: pip install 'medinfer[nnunet]'"
MAX_JSON_BYTES = 20_000_000
MAX_CHECKPOINT_BYTES = 8 * 1024**3
_CKPT = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
_FOLD_RE = re.compile(r"^fold_(\d+|all)$")
_ALLOWED_IMPORT_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")


# ====================================================================== folder reading
def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(
        path, max_bytes=MAX_JSON_BYTES, error=ModelError,
        missing=f"{path.parent}: nnU-Net model folder has no {path.name}",
    )


def _fold_dirs(path: Path) -> dict[str, Path]:
    out = {}
    for d in path.iterdir() if path.is_dir() else ():
        m = _FOLD_RE.match(d.name)
        if m and d.is_dir():
            out[m.group(1)] = d
    return out


def fold_checkpoints(path: Path, folds: Sequence[int | str] | None,
                     name: str) -> tuple[list[str], list[Path]]:
    """The chosen fold names and their ``fold_<f>/<name>`` checkpoint files (v1 and v2).

    ``folds`` None: every fold with the file, numeric folds in order then ``all``.

    Raises
    ------
    ModelError
        No fold has the file; a requested fold lacks it (the message lists the folds).
    """
    available = _fold_dirs(path)
    if folds is None:
        chosen = sorted((f for f, d in available.items() if (d / name).is_file()),
                        key=lambda f: (f == "all", int(f) if f.isdigit() else 0))
        if not chosen:
            raise ModelError(f"{path}: no fold_*/{name} found")
    else:
        chosen = [str(f) for f in folds]
    ckpts = []
    for f in chosen:
        c = path / f"fold_{f}" / name
        if not c.is_file():
            have = ", ".join(sorted(available)) or "none"
            raise ModelError(f"{path}: fold {f!r} has no {name} (folds present: {have})")
        ckpts.append(c)
    return chosen, ckpts


def is_nnunet_folder(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` looks like an nnU-Net v2 model folder.

    That is: a folder with ``dataset.json``, ``plans.json`` and at least one
    ``fold_*/checkpoint_*.pth``.
    """
    p = Path(path)
    if not (p.is_dir() and (p / "dataset.json").is_file() and (p / "plans.json").is_file()):
        return False
    return any(any(d.glob("checkpoint_*.pth")) for d in _fold_dirs(p).values())


@dataclass
class NnUNetFolder:
    """A parsed nnU-Net v2 model folder.

    Attributes
    ----------
    path : the folder.
    dataset : ``dataset.json`` content.
    plans : ``plans.json`` content.
    configuration_name : e.g. ``3d_fullres`` (from the folder name, else the checkpoint).
    configuration : the configuration dict with ``inherits_from`` resolved.
    checkpoints : the checkpoint files of the chosen folds, in fold order.
    folds : the chosen fold names (``"0"``..., or ``"all"``).
    """

    path: Path
    dataset: dict[str, Any]
    plans: dict[str, Any]
    configuration_name: str
    configuration: dict[str, Any]
    checkpoints: list[Path]
    folds: list[str]
    labels: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ labels
    @property
    def regions_class_order(self) -> list[int] | None:
        """``regions_class_order`` of dataset.json when the labels are regions, else None."""
        if any(isinstance(v, (list, tuple)) and len(v) > 1 for k, v in self.labels.items()
               if k != "background"):
            rco = self.dataset.get("regions_class_order")
            if not isinstance(rco, list):
                raise ModelError(f"{self.path}/dataset.json: region labels need "
                                 "'regions_class_order'")
            return [int(v) for v in rco]
        return None

    @property
    def label_names(self) -> dict[int, str]:
        """Label value -> name of the output label map (background 0 included)."""
        rco = self.regions_class_order
        if rco is not None:
            names = [k for k in self.labels if k not in ("background", "ignore")]
            return {0: "background", **{int(v): n for v, n in zip(rco, names, strict=False)}}
        out = {}
        for name, v in self.labels.items():
            if name == "ignore":
                continue
            val = v[0] if isinstance(v, (list, tuple)) else v
            out[int(val)] = str(name)
        return dict(sorted(out.items()))

    @property
    def num_heads(self) -> int:
        """Number of network output channels (``num_segmentation_heads``)."""
        if self.regions_class_order is not None:
            return len([k for k in self.labels if k not in ("background", "ignore")])
        return len(self.label_names)

    @property
    def previous_stage(self) -> str | None:
        """``previous_stage`` of the configuration (cascades: e.g. ``3d_lowres``), else None."""
        prev = self.configuration.get("previous_stage")
        return str(prev) if prev else None

    @property
    def foreground_labels(self) -> list[int]:
        """Sorted label values except background 0 and ``ignore`` (region members
        included): nnU-Net's ``LabelManager.foreground_labels``, the one-hot channels of a
        cascade's previous-stage input."""
        values: set[int] = set()
        for name, v in self.labels.items():
            if name == "ignore":
                continue
            values.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
        return sorted(values - {0})

    @property
    def network_input_channels(self) -> int:
        """Network input channels: the image channels, plus one per foreground label for a
        cascade (``determine_num_input_channels``)."""
        extra = len(self.foreground_labels) if self.previous_stage else 0
        return self.num_input_channels + extra

    @property
    def num_input_channels(self) -> int:
        """Input channels (``channel_names`` or legacy ``modality`` of dataset.json)."""
        names = self.dataset.get("channel_names", self.dataset.get("modality"))
        if not isinstance(names, dict) or not names:
            raise ModelError(f"{self.path}/dataset.json: 'channel_names' missing or empty")
        return len(names)


def _resolve_configuration(plans: dict[str, Any], name: str, source: Path) -> dict[str, Any]:
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or name not in configs:
        known = sorted(configs) if isinstance(configs, dict) else []
        raise ModelError(f"{source}: configuration {name!r} not in plans.json ({known})")
    chain = []
    cur: str | None = name
    while cur is not None:
        if cur in chain:
            raise ModelError(f"{source}: circular 'inherits_from' in plans.json at {cur!r}")
        chain.append(cur)
        c = configs.get(cur)
        if not isinstance(c, dict):
            raise ModelError(f"{source}: configuration {cur!r} missing in plans.json")
        cur = c.get("inherits_from")
    out: dict[str, Any] = {}
    for n in reversed(chain):
        out.update(configs[n])
    return out


def read_nnunet_folder(
    path: str | os.PathLike[str],
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "final",
) -> NnUNetFolder:
    """Read ``dataset.json``, ``plans.json`` and locate the checkpoints.

    Parameters
    ----------
    path : the ``<Trainer>__<Plans>__<configuration>`` folder.
    folds : fold numbers (or ``"all"``) to use; default every fold with the checkpoint.
    checkpoint : ``final`` (``checkpoint_final.pth``) or ``best`` (``checkpoint_best.pth``).

    Raises
    ------
    ModelError
        Missing / invalid files, unknown configuration, no checkpoint, a requested fold
        missing, a patch size of other than 2 or 3 entries.
    ConfigError
        ``checkpoint`` not ``final`` or ``best``.
    """
    p = Path(path)
    if checkpoint not in _CKPT:
        raise ConfigError(f"checkpoint: {checkpoint!r} is not allowed; choose 'final' or 'best'")
    dataset = _read_json(p / "dataset.json")
    plans = _read_json(p / "plans.json")
    chosen, ckpts = fold_checkpoints(p, folds, _CKPT[checkpoint])
    parts = p.name.split("__")
    cfg_name = parts[2] if len(parts) == 3 else ""
    if not cfg_name:
        ck = load_checkpoint(ckpts[0])
        cfg_name = str(ck.get("init_args", {}).get("configuration", ""))
    config = _resolve_configuration(plans, cfg_name, p)
    if len(config.get("patch_size", [])) not in (2, 3):
        raise ModelError(f"{p}: configuration {cfg_name!r} has patch_size "
                         f"{config.get('patch_size')}; expected 2 (2-D) or 3 (3-D) entries")
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or "background" not in labels:
        raise ModelError(f"{p}/dataset.json: 'labels' must map names to values, with background")
    return NnUNetFolder(p, dataset, plans, cfg_name, config, ckpts, chosen, dict(labels))


# ======================================================================== checkpoints
def _numpy_safe_globals() -> list[Any]:
    """numpy types found in nnU-Net checkpoints (scalars in logs, init args, EMA)."""
    import numpy.dtypes as ndt

    items: list[Any] = [np.dtype, np.ndarray, np.float64, np.float32, np.int64, np.int32,
                        np.bool_]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    items += [scalar, _reconstruct]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType",
                 "Float16DType", "UInt8DType", "Int8DType", "Int16DType", "UInt16DType"):
        if hasattr(ndt, name):
            items.append(getattr(ndt, name))
    return items


def safe_torch_load(p: Path, what: str) -> Any:
    """``torch.load(p, weights_only=True)`` with the numpy allow-list, size-capped.

    Shared by the v2 (:func:`load_checkpoint`) and v1
    (:func:`medinfer.models.nnunet_v1.load_v1_checkpoint`) checkpoint readers; ``what``
    names the format in the error message.

    Raises
    ------
    ModelError
        Missing, empty or larger than ``MAX_CHECKPOINT_BYTES``; not loadable by the
        restricted unpickler.
    """
    import torch

    size = p.stat().st_size if p.is_file() else 0
    if size == 0 or size > MAX_CHECKPOINT_BYTES:
        raise ModelError(f"{p}: checkpoint size {size} bytes; expected 1..{MAX_CHECKPOINT_BYTES}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler raises many types on junk input
        if isinstance(exc, MemoryError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelError(f"{p}: not a loadable {what} checkpoint ({first})") from None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an nnU-Net checkpoint with ``torch.load(weights_only=True)``.

    Only tensors, plain containers and the allow-listed numpy scalar/dtype types are
    unpickled (never ``weights_only=False``).

    Returns
    -------
    dict with at least ``network_weights`` (state dict of tensors).

    Raises
    ------
    ModelError
        Missing / too large / non-checkpoint file, or no ``network_weights``.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: checkpoint not found")
    obj = safe_torch_load(p, "nnU-Net")
    if not isinstance(obj, dict) or not isinstance(obj.get("network_weights"), dict):
        raise ModelError(f"{p}: checkpoint has no 'network_weights' state dict")
    return obj


def _locate(name: Any, what: str) -> Any:
    if name is None:
        return None
    if not isinstance(name, str) or not name.startswith(_ALLOWED_IMPORT_PREFIXES):
        raise ModelError(
            f"plans.json: {what} {name!r} is not allowed; only classes under "
            f"{', '.join(_ALLOWED_IMPORT_PREFIXES)} may be named"
        )
    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except ImportError as exc:
        if name.startswith("dynamic_network_architectures"):
            raise ModelError(
                f"nnU-Net networks need the package dynamic_network_architectures; {EXTRA_HINT}"
            ) from None
        raise ModelError(f"plans.json: cannot import {what} {name!r} ({exc})") from None
    except AttributeError:
        raise ModelError(f"plans.json: {what} {name!r} does not exist") from None


def build_network(config: dict[str, Any], in_channels: int, num_heads: int) -> torch.nn.Module:
    """Build the network of a configuration (``architecture`` entry of plans.json).

    Mirrors ``nnunetv2.utilities.get_network_from_plans.get_network_from_plans`` with
    ``deep_supervision=False``.

    Raises
    ------
    ModelError
        Missing architecture, a class outside the allowed packages, invalid kwargs, or
        dynamic_network_architectures not installed (the message names the extra).
    """
    arch = config.get("architecture")
    if not isinstance(arch, dict) or "network_class_name" not in arch:
        raise ModelError("plans.json: configuration has no 'architecture.network_class_name' "
                         "(plans from nnU-Net < 2.4 are not supported)")
    kwargs = dict(arch.get("arch_kwargs", {}))
    for key in arch.get("_kw_requires_import", ()):
        kwargs[key] = _locate(kwargs.get(key), f"arch_kwargs.{key}")
    cls = _locate(arch["network_class_name"], "network_class_name")
    if "deep_supervision" not in kwargs:
        kwargs["deep_supervision"] = False
    try:
        net = cls(input_channels=in_channels, num_classes=num_heads, **kwargs)
    except (TypeError, ValueError, AssertionError, IndexError, KeyError) as exc:
        raise ModelError(f"plans.json: cannot build {arch['network_class_name']} ({exc})") from None
    return net


class NnUNetEnsemble:
    """The networks of the chosen folds behind the :class:`medinfer.models.Model` protocol.

    ``model(x (N, C, *patch)) -> (N, K, *patch)`` float32 logits, the mean over folds
    (nnU-Net averages the folds' logits).
    """

    def __init__(self, networks: list[torch.nn.Module], device: torch.device) -> None:
        self.networks = [n.to(device).eval() for n in networks]
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for net in self.networks:
            y = net(x)
            if isinstance(y, (list, tuple)):
                y = y[0]
            out = y.float() if out is None else out.add_(y.float())
        assert out is not None
        if len(self.networks) > 1:
            out.div_(len(self.networks))
        return out


def load_nnunet_networks(folder: NnUNetFolder, device: torch.device
                         ) -> tuple[NnUNetEnsemble, tuple[int, ...]]:
    """Build one network per fold and load its weights; also the TTA axes.

    Returns
    -------
    (ensemble, mirror_axes)
        ``mirror_axes``: the first checkpoint's ``inference_allowed_mirroring_axes``
        (model-grid axes), ``()`` if absent.

    Raises
    ------
    ModelError
        Weights that do not fit the architecture (names the checkpoint).
    """
    nets = []
    axes: tuple[int, ...] = ()
    for i, ck_path in enumerate(folder.checkpoints):
        ck = load_checkpoint(ck_path)
        if i == 0:
            ax = ck.get("inference_allowed_mirroring_axes")
            axes = tuple(int(a) for a in ax) if ax is not None else ()
        net = build_network(folder.configuration, folder.network_input_channels,
                            folder.num_heads)
        try:
            net.load_state_dict(ck["network_weights"], strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise ModelError(f"{ck_path}: weights do not match the plans' network ({first})"
                             ) from None
        nets.append(net)
    return NnUNetEnsemble(nets, device), axes


def _palette(v: int) -> list[int]:
    """A distinct display colour per label value (golden-angle hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((v * 0.618033988749895) % 1.0, 0.75, 0.95)
    return [int(r * 255), int(g * 255), int(b * 255)]


def nnunet_display_card(path: str | os.PathLike[str]) -> Any:
    """Display card of an nnU-Net model folder (label names from ``dataset.json``)."""
    folder = read_nnunet_folder(path)
    return display_card(folder.path.name, folder.label_names, "dataset.json",
                        str(folder.dataset.get("name", "")))


def display_card(name: str, labels: dict[int, str], source: str, version: str = "") -> Any:
    """A :class:`~medinfer.models.ModelCard` describing an external model's outputs.

    Used by front doors that show or write label names and colours (statistics tables,
    overlays, ``<case>_stats.json``); the weights entry names ``source`` and is not
    loaded. Softmax activation when the label values are ``0..K-1``, else sigmoid.
    """
    from medinfer.models.card import ModelCard

    values = sorted(labels)
    consecutive = values == list(range(len(values)))
    return ModelCard.from_dict({
        "name": name[:100] or "model", "version": version[:50] or "0",
        "labels": {v: {"name": labels[v][:200] or f"label {v}", "color": _palette(v)}
                   for v in values},
        "input": {"orientation": None, "normalization": {"method": "none"}},
        "output": {"activation": "softmax" if consecutive else "sigmoid"},
        "weights": {"format": "torchscript", "file": source},
        "provenance": {"external": source},
    }, source=source)

