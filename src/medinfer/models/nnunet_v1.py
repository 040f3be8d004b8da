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
        """``num_modalities`` of the plans (image channels of a case)."""
        return int(self.plans["num_modalities"])

    @property
    def trainer_name(self) -> str:
        """Trainer class (``name`` of the ``.model.pkl``, else the folder name's first part)."""
        name = self.trainer_info.get("name")
        return str(name) if isinstance(name, str) else self.path.name.split("__")[0]

    @property
    def is_cascade(self) -> bool:
        """True for the full-resolution stage of a cascade (``nnUNetTrainerV2CascadeFullRes``
        and other ``*CascadeFullRes`` trainers, or a ``3d_cascade_fullres`` model folder):
        the network also takes the one-hot previous-stage segmentation."""
        return "CascadeFullRes" in self.trainer_name or \
            self.path.parent.parent.name == "3d_cascade_fullres"

    @property
    def previous_trainer(self) -> str:
        """Trainer of the ``3d_lowres`` stage a cascade was trained on (``previous_trainer``
        of the trainer's ``init`` args, default ``nnUNetTrainerV2``)."""
        init = self.trainer_info.get("init")
        if isinstance(init, (tuple, list)) and len(init) > 8 and isinstance(init[8], str):
            return init[8]
        return "nnUNetTrainerV2"

    @property
    def regions(self) -> tuple[tuple[int, ...], ...] | None:
        """Regions of a region-based trainer (v1 defines them in the trainer class:
        :data:`V1_REGION_TRAINERS`), else None."""
        hit = _v1_regions(self.trainer_name)
        return hit[0] if hit is not None else None

    @property
    def regions_class_order(self) -> tuple[int, ...] | None:
        """Label painted for each region output, in order (v1's ``regions_class_order``)."""
        hit = _v1_regions(self.trainer_name)
        return hit[1] if hit is not None else None

    @property
    def network_input_channels(self) -> int:
        """Network input channels: modalities, plus ``num_classes`` one-hot channels of the
        previous stage for a cascade (``nnUNetTrainerV2CascadeFullRes.process_plans``)."""
        extra = int(self.plans["num_classes"]) if self.is_cascade else 0
        return self.num_input_channels + extra

    @property
    def num_heads(self) -> int:
        """Network output channels: one per region for region-based trainers, else
        :attr:`num_classes`."""
        regions = self.regions
        return len(regions) if regions is not None else self.num_classes

    @property
    def label_names(self) -> dict[int, str]:
        """Label value -> name (``all_classes`` of the plans; names when the
        ``dataset.json`` of the task is not at hand are ``label_<v>``; region-based
        models: the values of ``regions_class_order``)."""
        out = {0: "background"}
        rco = self.regions_class_order
        for v in (sorted(set(rco)) if rco is not None else range(1, self.num_classes)):
            out[int(v)] = f"label_{v}"
        return out


_BRATS_REGIONS = (((1, 2, 3), (2, 3), (3,)), (1, 2, 3))

#: Region-based nnU-Net v1 trainers (v1 sets ``regions`` and ``regions_class_order`` in the
#: trainer class, not in the plans): class name -> (regions, regions_class_order). Source:
#: ``nnunet/training/network_training/competitions_with_custom_Trainers/BraTS2020/``
#: (``get_brats_regions``: whole tumour 1+2+3, tumour core 2+3, enhancing tumour 3; sigmoid
#: outputs). ``nnUNetTrainerV2BraTSRegions_BN`` is not region-based (it subclasses
#: ``nnUNetTrainerV2``). The ``_BN`` variants use batch norm, which the re-implemented
#: network does not have: their weights do not load (``ModelError``).
V1_REGION_TRAINERS: dict[str, tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]] = {
    name: _BRATS_REGIONS for name in (
        "nnUNetTrainerV2BraTSRegions", "nnUNetTrainerV2BraTSRegions_Dice",
        "nnUNetTrainerV2BraTSRegions_DDP", "nnUNetTrainerV2BraTSRegions_DA3",
        "nnUNetTrainerV2BraTSRegions_DA3_BD", "nnUNetTrainerV2BraTSRegions_DA3_BN",
        "nnUNetTrainerV2BraTSRegions_DA3_BN_BD", "nnUNetTrainerV2BraTSRegions_DA4_BN",
        "nnUNetTrainerV2BraTSRegions_DA4_BN_BD")
}


def _v1_regions(trainer: str) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]] | None:
    return V1_REGION_TRAINERS.get(trainer)


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
def _triple(v: Any) -> tuple[int, ...]:
    """Kernel / stride entries as an int tuple (3 entries in 3-D, 2 in 2-D)."""
    return tuple(int(x) for x in v)


class GenericUNetV1:
    """Factory of nnU-Net v1's ``Generic_UNet`` (nnUNetTrainerV2 settings), 3-D or 2-D.

    The dimensionality follows the kernels (3 entries: ``Conv3d``, ``InstanceNorm3d``,
    ``ConvTranspose3d``, at most 320 features; 2 entries: ``Conv2d``, ``InstanceNorm2d``,
    ``ConvTranspose2d``, at most 480 features, as ``Generic_UNet.MAX_FILTERS_2D``).

    ``GenericUNetV1.build(in_channels, base_features, num_classes, pool_kernels,
    conv_kernels, conv_per_stage)`` returns a ``torch.nn.Module`` whose ``forward`` gives
    the full-resolution logits ``(N, num_classes, *patch)`` (deep supervision off) and
    whose ``state_dict`` names equal v1's. Source: ``nnunet/network_architecture/
    generic_UNet.py`` (nnU-Net 1.7.1), ``nnUNetTrainerV2.initialize_network``.
    """

    MAX_FEATURES_3D = 320
    MAX_FEATURES_2D = 480

    @staticmethod
    def build(in_channels: int, base_features: int, num_classes: int,
              pool_kernels: list[list[int]], conv_kernels: list[list[int]],
              conv_per_stage: int = 2) -> torch.nn.Module:
        import torch
        from torch import nn

        nd = len(conv_kernels[0]) if conv_kernels else 3
        if nd not in (2, 3) or any(len(k) != nd for k in [*pool_kernels, *conv_kernels]):
            raise ModelError(f"plans.pkl: kernel sizes {conv_kernels} / pooling {pool_kernels} "
                             "must all have 2 (2-D) or all 3 (3-D) entries")
        conv_op: Any = nn.Conv3d if nd == 3 else nn.Conv2d
        norm_op: Any = nn.InstanceNorm3d if nd == 3 else nn.InstanceNorm2d
        tconv_op: Any = nn.ConvTranspose3d if nd == 3 else nn.ConvTranspose2d
        max_features = (GenericUNetV1.MAX_FEATURES_3D if nd == 3
                        else GenericUNetV1.MAX_FEATURES_2D)
        ones = [1] * nd

        class _Block(nn.Module):  # ConvDropoutNormNonlin
            def __init__(self, cin: int, cout: int, kernel: Any, stride: Any) -> None:
                super().__init__()
                k = _triple(kernel)
                pad = _triple([1 if v == 3 else 0 for v in k])
                self.conv = conv_op(cin, cout, k, _triple(stride), pad, 1, bias=True)
                self.instnorm = norm_op(cout, eps=1e-5, affine=True)
                self.lrelu = nn.LeakyReLU(1e-2, inplace=True)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.lrelu(self.instnorm(self.conv(x)))

        class _Stack(nn.Module):  # StackedConvLayers
            def __init__(self, cin: int, cout: int, n: int, kernel: Any, first: Any) -> None:
                super().__init__()
                self.output_channels = cout
                self.blocks = nn.Sequential(
                    _Block(cin, cout, kernel, first or ones),
                    *[_Block(cout, cout, kernel, ones) for _ in range(n - 1)])

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
                    out_f = min(int(np.round(out_f * 2)), max_features)
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
                    tu.append(tconv_op(down, skip, pk, pk, bias=False))
                    loc.append(nn.Sequential(
                        stack(skip * 2, skip, conv_per_stage - 1, conv_kernels[-(u + 1)], None),
                        stack(skip, final_f, 1, conv_kernels[-(u + 1)], None)))
                self.conv_blocks_context = nn.ModuleList(context)
                self.conv_blocks_localization = nn.ModuleList(loc)
                self.td = nn.ModuleList()
                self.tu = nn.ModuleList(tu)
                self.seg_outputs = nn.ModuleList(
                    conv_op(loc_out[u], num_classes, 1, 1, 0, 1, 1, False)
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
    """The nnUNetTrainerV2 network of the folder's plans (3-D or 2-D configurations).

    Raises
    ------
    ModelError
        Missing plan entries; kernels of mixed or other dimensionality.
    """
    st = folder.stage_plans
    try:
        pools = [[int(v) for v in k] for k in st["pool_op_kernel_sizes"]]
        convs = [[int(v) for v in k] for k in st["conv_kernel_sizes"]]
        base = int(folder.plans["base_num_features"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{folder.path}/plans.pkl: missing or invalid entry ({exc})") from None
    return GenericUNetV1.build(folder.network_input_channels, base, folder.num_heads, pools,
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
    float32, the **mean of the softmax** over folds (nnU-Net v1 averages probabilities);
    with ``sigmoid=True`` (region-based trainers, ``inference_apply_nonlin = Sigmoid``) the
    mean of the sigmoid."""

    def __init__(self, networks: list[torch.nn.Module], device: torch.device,
                 sigmoid: bool = False) -> None:
        self.networks = [n.to(device).eval() for n in networks]
        self.device = device
        self.sigmoid = sigmoid

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for net in self.networks:
            y = net(x).float()
            y = y.sigmoid_() if self.sigmoid else torch_softmax(y)
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
    return NnUNetV1Ensemble(nets, device, sigmoid=folder.regions is not None)
