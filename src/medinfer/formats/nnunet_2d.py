"""2-D nnU-Net configurations (v1 ``-m 2d``, v2 ``-c 2d``) on medinfer's 3-D engine.

Both nnU-Net versions run a 2-D model on a 3-D scan the same way: the scan is
preprocessed as a volume (model axis 0, after ``transpose_forward``, is the slice axis;
its spacing is kept, only the in-plane axes are resampled), then every slice along model
axis 0 gets its own 2-D sliding window: in-plane padding to at least the patch (centred,
odd voxel after, zeros), the in-plane window starts of ``compute_steps_for_sliding_window``,
the 2-D Gaussian importance map, mirroring TTA over the 2-D axes ``(0, 1)``, blended
per slice (v2 ``predict_sliding_window_return_logits`` with a patch one entry shorter than
the image, ``_internal_get_sliding_window_slicers``; v1 ``predict_3D`` ->
``_internal_predict_3D_2Dconv_tiled`` -> ``_internal_predict_2D_2Dconv_tiled``). The
export is the 3-D one.

Here the slices are batched without changing the arithmetic: a window is a *stack* of
``d`` consecutive slices, ``(1, py, px)`` windows become ``(d, py, px)`` windows whose
stacks tile model axis 0 without overlap (the last stack reaches into zero padding whose
outputs are dropped), the 2-D network sees the stack as ``d`` batch items
(:class:`SliceStackModel`), and the importance map is the 2-D map repeated along the
stack. Each voxel therefore receives exactly the in-plane windows, weights and sums of
its own slice, as in nnU-Net (up to float rounding of the convolutions, which may differ
with the batch size). The streaming accumulation
(:func:`medinfer.inference.stream_logits`) and export are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medinfer.errors import ModelError

if TYPE_CHECKING:
    import torch

__all__ = ["SliceStackModel", "SliceWindows", "slice_windows"]


class SliceStackModel:
    """A 2-D network run on stacks of slices.

    ``model(x (B, C, d, Y, X)) -> (B, K, d, Y, X)`` float32: the ``B * d`` slices go
    through the wrapped 2-D callable (``(N, C, Y, X) -> (N, K, Y, X)``) as one batch.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ModelError(f"2-D nnU-Net model: expected (B, C, d, Y, X) stacks, got shape "
                             f"{tuple(x.shape)}")
        b, c, d, h, w = (int(v) for v in x.shape)
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        y = self.model(flat)
        if y.ndim != 4 or int(y.shape[0]) != b * d:
            raise ModelError(f"2-D nnU-Net model: output shape {tuple(y.shape)} for input "
                             f"{(b * d, c, h, w)}")
        k = int(y.shape[1])
        return y.reshape(b, d, k, *y.shape[2:]).permute(0, 2, 1, 3, 4).contiguous()


@dataclass(frozen=True)
class SliceWindows:
    """Window geometry of a 2-D configuration on the 3-D model grid.

    Attributes
    ----------
    patch : ``(d, py, px)``: a stack of ``d`` slices of the 2-D patch.
    pads : ``(before, after)`` per model axis: axis 0 ``(0, stacks * d - D)``, the
        in-plane axes centred as nnU-Net's ``pad_nd_image``.
    starts : per model axis, window starts in padded coordinates (axis 0: ``0, d, 2d...``).
    weight : ``patch``-shaped importance map, the 2-D map repeated ``d`` times.
    mirror_axes : TTA axes on the 3-D model grid (2-D axis ``a`` -> ``a + 1``).
    model : :class:`SliceStackModel` around the 2-D network.
    """

    patch: tuple[int, int, int]
    pads: list[tuple[int, int]]
    starts: list[list[int]]
    weight: torch.Tensor
    mirror_axes: tuple[int, ...]
    model: SliceStackModel


def slice_windows(
    size: Sequence[int],
    patch_2d: Sequence[int],
    step_size: float,
    weight_2d: torch.Tensor,
    mirror_axes_2d: Sequence[int],
    voxel_budget: int,
    model: Callable[[torch.Tensor], torch.Tensor],
) -> SliceWindows:
    """Plan the slice-stack windows of a 2-D configuration (see the module docstring).

    Parameters
    ----------
    size : model grid shape ``(D, Y, X)`` (after preprocessing; axis 0 = slices).
    patch_2d : the configuration's 2-D patch ``(py, px)``.
    step_size : window step as a fraction of the patch (nnU-Net's ``step_size``).
    weight_2d : ``(py, px)`` importance map of the nnU-Net version (v1 or v2 Gaussian).
    mirror_axes_2d : TTA mirror axes of the 2-D patch (``()`` = no TTA), each 0 or 1.
    voxel_budget : input voxels per network call (all mirrored copies of a stack
        together); sets the stack depth ``d`` (at least 1, at most ``D``).
    model : the 2-D network(s): ``(N, C, py, px) -> (N, K, py, px)``.

    Raises
    ------
    ModelError
        A patch that is not 2-D, a grid that is not 3-D, mirror axes outside ``(0, 1)``.
    """
    from medinfer.formats.nnunet import compute_steps
    from medinfer.inference import pad_spec

    if len(patch_2d) != 2 or len(size) != 3:
        raise ModelError(f"2-D nnU-Net configuration: patch {tuple(patch_2d)} on model grid "
                         f"{tuple(size)}; expected a 2-D patch and a 3-D grid")
    bad = [a for a in mirror_axes_2d if int(a) not in (0, 1)]
    if bad:
        raise ModelError(f"2-D nnU-Net configuration: mirror axes {tuple(mirror_axes_2d)}; "
                         "only 0 and 1 exist in 2-D")
    py, px = (int(p) for p in patch_2d)
    n_slices = int(size[0])
    n_flips = 2 ** len(set(int(a) for a in mirror_axes_2d))
    depth_max = max(1, min(n_slices, int(voxel_budget) // max(n_flips * py * px, 1)))
    stacks = math.ceil(n_slices / depth_max)
    depth = math.ceil(n_slices / stacks)  # balanced: fewer padded slices
    inplane_pads = pad_spec(size[1:], (py, px))
    padded = [s + b + a for s, (b, a) in zip(size[1:], inplane_pads, strict=True)]
    inplane_starts = compute_steps(padded, (py, px), step_size)
    return SliceWindows(
        patch=(depth, py, px),
        pads=[(0, stacks * depth - n_slices), *inplane_pads],
        starts=[[i * depth for i in range(stacks)], *inplane_starts],
        weight=weight_2d[None].repeat(depth, 1, 1),
        mirror_axes=tuple(sorted({int(a) + 1 for a in mirror_axes_2d})),
        model=SliceStackModel(model),
    )
