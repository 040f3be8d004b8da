"""nnU-Net v1 trained model folders: reading (safely), checkpoints and the v1 network.

A v1 model folder is ``<RESULTS_FOLDER>/nnUNet/<model>/<TaskXXX_Name>/<Trainer>__<Plans>/``
with ``plans.pkl`` and ``fold_<N>/model_final_checkpoint.model`` (+ ``.model.pkl``, the
trainer's description), or ``model_best``. The ``.pkl`` files are Python pickles and
are read only through :func:`medinfer.models.safe_pickle.load_pickle` (an allow-list of
numpy / collections / builtins types; a ``__reduce__`` payload is refused before it
runs). Checkpoints are read with ``torch.load(weights_only=True)`` (numpy scalar types
allow-listed as for v2).

The network is nnU-Net v1's ``Generic_UNet`` as ``nnUNetTrainerV2.initialize_network``
builds it (3-D: ``Conv3d``, ``InstanceNorm3d(eps=1e-5, affine=True)``, LeakyReLU 0.01,
no dropout, strided-convolution pooling, transposed-convolution upsampling, no bias in
the 1x1 segmentation heads), re-implemented here (:class:`GenericUNetV1`, same module
names, so a v1 ``state_dict`` loads with ``strict=True``) so that nnU-Net v1 need not be
installed; ``tests/nnunet`` proves it equal to ``nnunet.network_architecture.generic_UNet``.
Trainers named ``nnUNetTrainerV2_<variant>`` are assumed to build the nnUNetTrainerV2
network (the trainer class is not imported); weights that do not fit are an error.
:class:`NnUNetV1Ensemble` returns the mean over folds of the **softmax**
(v1 averages probabilities, v2 logits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medinfer.errors import ModelError
from medinfer.models.nnunet import _fold_dirs, fold_checkpoints
from medinfer.models.safe_pickle import load_pickle

if TYPE_CHECKING:
    import torch

__all__ = [
    "GenericUNetV1",
    "NnUNetV1Ensemble",
    "NnUNetV1Folder",
    "build_v1_network",
    "is_nnunet_v1_folder",
    "load_nnunet_v1_networks",
    "load_v1_checkpoint",
    "read_nnunet_v1_folder",
]

def is_nnunet_v1_folder(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` has ``plans.pkl`` and a ``fold_*/*.model`` checkpoint (v1 layout)."""
    p = Path(path)
    if not (p.is_dir() and (p / "plans.pkl").is_file()):
        return False
    return any(any(d.glob("*.model")) for d in _fold_dirs(p).values())


@dataclass
class NnUNetV1Folder:
    """A parsed nnU-Net v1 model folder.

    Attributes
    ----------
    path : the ``<Trainer>__<Plans>`` folder.
    plans : ``plans.pkl`` content (dict; numpy arrays as written by nnU-Net).
    checkpoints : the ``.model`` files of the chosen folds, in fold order.
    folds : the chosen fold names.
    trainer_info : ``<checkpoint>.model.pkl`` of the first fold (``name``, ``init``...),
        ``{}`` when absent.
    """

    path: Path
    plans: dict[str, Any]
    checkpoints: list[Path]
    folds: list[str]
    trainer_info: dict[str, Any]

    @property
    def stage(self) -> int:
        """Stage of ``plans_per_stage`` (the trainer's ``init`` args, else the last)."""
        init = self.trainer_info.get("init")
        stages = self.plans.get("plans_per_stage")
        if not isinstance(stages, dict) or not stages:
            raise ModelError(f"{self.path}/plans.pkl: no 'plans_per_stage'")
        if isinstance(init, (tuple, list)) and len(init) > 5 and isinstance(init[5], int):
            if init[5] in stages:
                return int(init[5])
        return int(max(stages))

    @property
    def stage_plans(self) -> dict[str, Any]:
        """``plans_per_stage[stage]`` (patch size, spacing, kernels)."""
        return dict(self.plans["plans_per_stage"][self.stage])

    @property
    def num_classes(self) -> int:
        """Network output channels (``num_classes`` of the plans + background)."""
        return int(self.plans["num_classes"]) + 1

    @property
    def num_input_channels(self) -> int:
        """``num_modalities`` of the plans."""
        return int(self.plans["num_modalities"])

    @property
    def label_names(self) -> dict[int, str]:
        """Label value -> name (``all_classes`` of the plans; names when the
        ``dataset.json`` of the task is not at hand are ``label_<v>``)."""
        out = {0: "background"}
        for v in range(1, self.num_classes):
            out[v] = f"label_{v}"
        return out


def read_nnunet_v1_folder(path: str | os.PathLike[str], folds: list[str] | None = None,
                          checkpoint: str = "model_final_checkpoint") -> NnUNetV1Folder:
    """Read ``plans.pkl`` (restricted unpickler) and locate the fold checkpoints.

    Parameters
    ----------
    path : the ``<Trainer>__<Plans>`` folder.
    folds : fold names; default every fold with ``<checkpoint>.model``.
    checkpoint : checkpoint name without ``.model`` (``model_final_checkpoint``,
        ``model_best``), as ``nnUNet_predict -chk``.

    Raises
    ------
    ModelError
        Missing or unsafe ``plans.pkl``, no checkpoint, a requested fold missing.
    """
    p = Path(path)
    plans = load_pickle(p / "plans.pkl")
    if not isinstance(plans, dict):
        raise ModelError(f"{p}/plans.pkl: expected a dict, got {type(plans).__name__}")
    name = f"{checkpoint}.model"
    chosen, ckpts = fold_checkpoints(p, folds, name)
    info_file = ckpts[0].with_name(name + ".pkl")
    info = load_pickle(info_file) if info_file.is_file() else {}
    if not isinstance(info, dict):
        raise ModelError(f"{info_file}: expected a dict, got {type(info).__name__}")
    return NnUNetV1Folder(p, plans, ckpts, chosen, info)


# ======================================================================== network
def _triple(v: Any) -> tuple[int, int, int]:
    a, b, c = (int(x) for x in v)
    return (a, b, c)


class GenericUNetV1:
    """Factory of nnU-Net v1's ``Generic_UNet`` (nnUNetTrainerV2 settings), 3-D.

    ``GenericUNetV1.build(in_channels, base_features, num_classes, pool_kernels,
    conv_kernels, conv_per_stage)`` returns a ``torch.nn.Module`` whose ``forward`` gives
    the full-resolution logits ``(N, num_classes, *patch)`` (deep supervision off) and
    whose ``state_dict`` names equal v1's. Source: ``nnunet/network_architecture/
    generic_UNet.py`` (nnU-Net 1.7.1), ``nnUNetTrainerV2.initialize_network``.
    """

    MAX_FEATURES_3D = 320

    @staticmethod
    def build(in_channels: int, base_features: int, num_classes: int,
              pool_kernels: list[list[int]], conv_kernels: list[list[int]],
              conv_per_stage: int = 2) -> torch.nn.Module:
        import torch
        from torch import nn

        class _Block(nn.Module):  # ConvDropoutNormNonlin
            def __init__(self, cin: int, cout: int, kernel: Any, stride: Any) -> None:
                super().__init__()
                k = _triple(kernel)
                pad = _triple([1 if v == 3 else 0 for v in k])
                self.conv = nn.Conv3d(cin, cout, k, _triple(stride), pad, 1, bias=True)
                self.instnorm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
                self.lrelu = nn.LeakyReLU(1e-2, inplace=True)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.lrelu(self.instnorm(self.conv(x)))

        class _Stack(nn.Module):  # StackedConvLayers
            def __init__(self, cin: int, cout: int, n: int, kernel: Any, first: Any) -> None:
                super().__init__()
                self.output_channels = cout
                self.blocks = nn.Sequential(
                    _Block(cin, cout, kernel, first or [1, 1, 1]),
                    *[_Block(cout, cout, kernel, [1, 1, 1]) for _ in range(n - 1)])

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.blocks(x)

        stack = _Stack

        num_pool = len(pool_kernels)
        if len(conv_kernels) != num_pool + 1:
            raise ModelError(f"plans.pkl: {len(conv_kernels)} conv kernel sizes for {num_pool} "
                             "pooling steps (expected one more)")

        class _Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                context: list[nn.Module] = []
                out_f, in_f = base_features, in_channels
                for d in range(num_pool):
                    stride = pool_kernels[d - 1] if d != 0 else None
                    context.append(stack(in_f, out_f, conv_per_stage, conv_kernels[d], stride))
                    in_f = out_f
                    out_f = min(int(np.round(out_f * 2)), GenericUNetV1.MAX_FEATURES_3D)
                final_f = out_f
                context.append(nn.Sequential(
                    stack(in_f, out_f, conv_per_stage - 1, conv_kernels[num_pool],
                          pool_kernels[-1]),
                    stack(out_f, final_f, 1, conv_kernels[num_pool], None)))
                tu: list[nn.Module] = []
                loc: list[nn.Sequential] = []
                loc_out: list[int] = []
                for u in range(num_pool):
                    down = final_f
                    skip = int(context[-(2 + u)].output_channels)  # type: ignore[arg-type]
                    final_f = skip
                    loc_out.append(final_f)
                    pk = _triple(pool_kernels[-(u + 1)])
                    tu.append(nn.ConvTranspose3d(down, skip, pk, pk, bias=False))
                    loc.append(nn.Sequential(
                        stack(skip * 2, skip, conv_per_stage - 1, conv_kernels[-(u + 1)], None),
                        stack(skip, final_f, 1, conv_kernels[-(u + 1)], None)))
                self.conv_blocks_context = nn.ModuleList(context)
                self.conv_blocks_localization = nn.ModuleList(loc)
                self.td = nn.ModuleList()
                self.tu = nn.ModuleList(tu)
                self.seg_outputs = nn.ModuleList(
                    nn.Conv3d(loc_out[u], num_classes, 1, 1, 0, 1, 1, False)
                    for u in range(num_pool))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                skips = []
                for d in range(len(self.conv_blocks_context) - 1):
                    x = self.conv_blocks_context[d](x)
                    skips.append(x)
                x = self.conv_blocks_context[-1](x)
                for u in range(len(self.tu)):
                    x = self.tu[u](x)
                    x = torch.cat((x, skips[-(u + 1)]), dim=1)
                    x = self.conv_blocks_localization[u](x)
                return self.seg_outputs[-1](x)

        return _Net()


def build_v1_network(folder: NnUNetV1Folder) -> torch.nn.Module:
    """The nnUNetTrainerV2 network of the folder's plans (3-D configurations).

    Raises
    ------
    ModelError
        Missing plan entries, 2-D plans (not supported).
    """
    st = folder.stage_plans
    try:
        pools = [[int(v) for v in k] for k in st["pool_op_kernel_sizes"]]
        convs = [[int(v) for v in k] for k in st["conv_kernel_sizes"]]
        base = int(folder.plans["base_num_features"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{folder.path}/plans.pkl: missing or invalid entry ({exc})") from None
    if any(len(k) != 3 for k in pools + convs):
        raise ModelError(f"{folder.path}/plans.pkl: 2-D nnU-Net v1 plans are not supported")
    return GenericUNetV1.build(folder.num_input_channels, base, folder.num_classes, pools,
                               convs, int(folder.plans.get("conv_per_stage", 2)))


def load_v1_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A v1 ``.model`` file with ``torch.load(weights_only=True)``; returns the dict with
    ``state_dict`` (``module.`` prefixes of DataParallel removed).

    Raises
    ------
    ModelError
        Missing / too large / non-checkpoint file, no ``state_dict``.
    """
    from medinfer.models.nnunet import safe_torch_load

    p = Path(path)
    obj = safe_torch_load(p, "nnU-Net v1")
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise ModelError(f"{p}: checkpoint has no 'state_dict'")
    obj["state_dict"] = {(k[7:] if k.startswith("module.") else k): v
                         for k, v in obj["state_dict"].items()}
    return obj


class NnUNetV1Ensemble:
    """The folds' v1 networks behind one callable: ``(N, C, *patch) -> (N, K, *patch)``
    float32, the **mean of the softmax** over folds (nnU-Net v1 averages probabilities)."""

    def __init__(self, networks: list[torch.nn.Module], device: torch.device) -> None:
        self.networks = [n.to(device).eval() for n in networks]
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for net in self.networks:
            y = torch_softmax(net(x).float())
            out = y if out is None else out.add_(y)
        if out is None:
            raise ModelError("nnU-Net v1 ensemble without networks")
        if len(self.networks) > 1:
            out.div_(len(self.networks))
        return out


def torch_softmax(t: torch.Tensor) -> torch.Tensor:
    """Softmax over the channel axis 1 (v1's ``softmax_helper``)."""
    import torch

    return torch.softmax(t, 1)


def load_nnunet_v1_networks(folder: NnUNetV1Folder, device: torch.device) -> NnUNetV1Ensemble:
    """Build one network per fold and load its ``state_dict`` (strict).

    Raises
    ------
    ModelError
        Weights that do not fit the plans' network (names the checkpoint).
    """
    nets = []
    for ck_path in folder.checkpoints:
        ck = load_v1_checkpoint(ck_path)
        net = build_v1_network(folder)
        try:
            net.load_state_dict(ck["state_dict"], strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise ModelError(f"{ck_path}: weights do not match the plans' nnUNetTrainerV2 network "
                             f"({first})") from None
        nets.append(net)
    return NnUNetV1Ensemble(nets, device)
