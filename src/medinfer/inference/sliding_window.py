"""medinfer's own sliding-window engine over ``(N, C, *spatial)`` tensors.

Numerically it reproduces MONAI's :func:`monai.inferers.sliding_window_inference`
(same window grid, same Gaussian importance map, same weighted-average blending), to
float32 rounding. It differs in how it spends memory and time:

- the importance map is computed once per call; there is no full-size normalisation
  map: each slab along axis 0 is divided by its own sum of weights (a slab-sized
  buffer) as soon as no later window touches it;
- the output ``(N, K, *spatial)`` is preallocated once at the **unpadded** size and
  every window is accumulated in place (``addcmul_``): no per-window products, no
  padded copy of the input (only windows that reach into the padding are padded);
- the whole run is under :func:`torch.inference_mode`, aggregation stays float32,
  the network runs under CUDA autocast (float16) on GPU;
- windows are scheduled in lexicographic order of their start, first spatial axis
  slowest (:class:`WindowPlan`), so that every voxel along axis 0 before
  ``WindowPlan.final_before(n)`` is final after the first ``n`` window rows; the
  ``on_slab`` callback reports each final slab -- the hook for slab-wise streaming
  (resample and argmax a slab as soon as no later window touches it).

Test-time augmentation mirrors each window (all 2^n combinations of the given axes,
as nnU-Net's mirroring) and averages the un-mirrored logits before blending.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from medinfer.errors import ConfigError, ModelError, parse_enum

if TYPE_CHECKING:
    import torch

#: smallest weight of the importance map (MONAI clamps at 1e-3 to avoid division by 0)
MIN_IMPORTANCE = 1e-3

ProgressFn = Callable[[float], None]
#: ``on_slab(image_index, start, stop, slab)``: ``slab`` = output[image, :, start:stop]
#: (a view, ``(K, stop - start, *spatial[1:])``) is final
SlabFn = Callable[[int, int, int, "torch.Tensor"], None]
_Index = tuple[Any, ...]


class BlendMode(StrEnum):
    """Weighting of overlapping windows."""

    GAUSSIAN = "gaussian"
    CONSTANT = "constant"


class RunMode(StrEnum):
    """Sliding window, or the whole (padded) volume in one network call."""

    SLIDING_WINDOW = "sliding_window"
    WHOLE_VOLUME = "whole_volume"


# ------------------------------------------------------------------ window plan
@dataclass(frozen=True)
class WindowPlan:
    """Window grid over a (padded) spatial size.

    Attributes
    ----------
    image_size : spatial size the windows tile (already padded to at least
        ``patch_size``), voxels.
    patch_size : window size, voxels.
    starts : per spatial axis, the sorted window start indices.

    Notes
    -----
    Step per axis is ``int(patch * (1 - overlap))`` (at least 1; a whole axis when the
    patch equals the image), the last window is shifted back to end at the border
    -- the rule of MONAI's ``dense_patch_slices`` / ``_get_scan_interval``.
    """

    image_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]

    @classmethod
    def build(
        cls, image_size: Sequence[int], patch_size: Sequence[int], overlap: Sequence[float]
    ) -> WindowPlan:
        """Plan windows; every ``image_size[d] >= patch_size[d]`` is required."""
        starts = []
        for size, patch, ov in zip(image_size, patch_size, overlap, strict=True):
            if patch > size:
                raise ConfigError(f"patch size {patch} larger than padded size {size}")
            step = patch if patch == size else max(int(patch * (1 - ov)), 1)
            num = 1
            while (num - 1) * step + patch < size:
                num += 1
            axis = sorted({min(i * step, size - patch) for i in range(num)})
            starts.append(tuple(axis))
        return cls(tuple(image_size), tuple(patch_size), tuple(starts))

    def __len__(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def windows(self) -> Iterator[tuple[int, ...]]:
        """Window start corners in lexicographic order (axis 0 slowest)."""
        return itertools.product(*self.starts)

    def final_before(self, rows_done: int) -> int:
        """Index along axis 0 below which all voxels are final after ``rows_done`` rows.

        A row is the set of windows sharing one axis-0 start. After the first
        ``rows_done`` rows no later window touches axis-0 indices below the start of
        row ``rows_done``; after the last row everything is final.
        """
        s0 = self.starts[0]
        return self.image_size[0] if rows_done >= len(s0) else s0[rows_done]


def importance_map(
    patch_size: Sequence[int],
    blending: BlendMode | str = BlendMode.GAUSSIAN,
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-window blending weights, shape ``patch_size``, float32.

    Gaussian: ``prod_d exp(-x_d^2 / (2 sigma_d^2))`` with ``x_d`` the offset from the
    window centre in voxels and ``sigma_d = sigma_scale * patch_d``, clamped below at
    1e-3. Constant: ones. Same values as MONAI ``compute_importance_map`` (nnU-Net's
    ``compute_gaussian`` uses the same sampled Gaussian with sigma = patch / 8).
    """
    import torch

    mode = parse_enum(BlendMode, blending, "blending")
    if mode is BlendMode.CONSTANT:
        return torch.ones(tuple(patch_size), dtype=torch.float32, device=device)
    scales = (
        [float(sigma_scale)] * len(patch_size)
        if isinstance(sigma_scale, (int, float))
        else [float(s) for s in sigma_scale]
    )
    w: torch.Tensor | None = None
    for i, (p, s) in enumerate(zip(patch_size, scales, strict=True)):
        sigma = p * s
        x = torch.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        x = torch.exp(x**2 / (-2 * sigma**2))
        w = x if w is None else w.unsqueeze(-1) * x[(None,) * i]
    assert w is not None  # patch_size is not empty (checked by the caller)
    return w.clamp_(min=max(float(w.min()), MIN_IMPORTANCE))


def tta_flips(axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """All subsets of ``axes`` (spatial indices), the empty one first: 2^n flips."""
    ax = sorted(set(axes or ()))
    return [c for r in range(len(ax) + 1) for c in itertools.combinations(ax, r)]



def make_tta_runner(
    model: Callable[[torch.Tensor], torch.Tensor], flips: Sequence[tuple[int, ...]],
    *, amp: bool = False, batch_flips: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(x (B, C, *patch)) -> (B, K, *patch)`` float32: mean of mirrored predictions.

    ``flips``: spatial axis tuples, the empty tuple first (no flip), e.g. from
    :func:`tta_flips`. The sum is taken in that order and divided
    once, exactly like the full-volume engine and nnU-Net's
    ``_internal_maybe_mirror_and_predict``. With ``batch_flips`` all mirrored copies go
    through the network in one call (batch ``B * len(flips)``: better CPU/GPU use for
    small windows; results equal up to float rounding of the convolution kernels).
    """
    import torch

    def run(x: torch.Tensor) -> torch.Tensor:
        acc: torch.Tensor | None = None

        def add(dims: tuple[int, ...], y: torch.Tensor) -> None:
            nonlocal acc
            if dims:
                y = torch.flip(y, [d + 2 for d in dims])
            if acc is None:
                acc = y if len(flips) == 1 else y.clone()
            else:
                acc.add_(y)

        if batch_flips and len(flips) > 1:
            xs = torch.cat([torch.flip(x, [d + 2 for d in f]) if f else x for f in flips])
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                ys = model(xs).float()
            for dims, y in zip(flips, torch.split(ys, int(x.shape[0])), strict=True):
                add(dims, y)
        else:
            for dims in flips:
                xin = torch.flip(x, [d + 2 for d in dims]) if dims else x
                with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                    add(dims, model(xin).float())
        if acc is None:
            raise ConfigError("tta: at least the identity flip () is required")
        if len(flips) > 1:
            acc.div_(len(flips))
        return acc

    return run


def _tuple(value: int | float | Sequence[int] | Sequence[float], n: int, name: str) -> tuple:
    if isinstance(value, (int, float)):
        return (value,) * n
    t = tuple(value)
    if len(t) != n:
        raise ConfigError(f"{name}: expected {n} values (one per spatial axis), got {list(t)}")
    return t


# ---------------------------------------------------------------------- engine
def sliding_window_inference(
    inputs: torch.Tensor,
    model: Callable[[torch.Tensor], torch.Tensor],
    patch_size: int | Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.25,
    blending: BlendMode | str = BlendMode.GAUSSIAN,
    sigma_scale: float | Sequence[float] = 0.125,
    batch_size: int = 1,
    mode: RunMode | str = RunMode.SLIDING_WINDOW,
    tta_axes: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    amp: bool = True,
    size_divisible: int = 1,
    pad_value: float = 0.0,
    progress: ProgressFn | None = None,
    on_slab: SlabFn | None = None,
) -> torch.Tensor:
    """Run ``model`` over ``inputs`` window by window and blend the logits.

    Parameters
    ----------
    inputs : tensor ``(N, C, *spatial)`` (any float dtype, any device; used as
        float32). Spatial axes in model-grid order.
    model : callable ``(B, C, *patch) -> (B, K, *patch)`` logits (a
        :class:`medinfer.models.Model`).
    patch_size : window size in voxels (one int for all axes, or one per axis).
    overlap : fraction ``0 <= overlap < 1`` of the window shared with the neighbour.
    blending : ``gaussian`` or ``constant``.
    sigma_scale : Gaussian sigma as a fraction of the window size.
    batch_size : windows per network call.
    mode : ``sliding_window`` or ``whole_volume`` (one call on the volume padded to at
        least ``patch_size`` and to a multiple of ``size_divisible``).
    tta_axes : spatial axes (0-based, e.g. ``(0, 1, 2)``) to mirror; all 2^n flip
        combinations are run and their un-flipped logits averaged. ``None``/empty: none.
    device : where the network runs: ``auto``, ``cpu``, ``cuda`` or a
        ``torch.device``; ``None`` = the model's ``device`` attribute, else the input's.
    amp : use float16 autocast when running on CUDA.
    size_divisible, pad_value : padding of the whole volume / of windows that reach
        beyond a volume smaller than the patch (centred, as MONAI).
    progress : called with the fraction of windows done (0..1, increasing).
    on_slab : sliding-window mode only: called as ``on_slab(n, start, stop, slab)`` as
        soon as ``slab = output[n, :, start:stop]`` (a view ``(K, stop - start, ...)``;
        slabs in order along axis 0) is final, i.e. no later window touches it -- the
        hook for slab-wise post-processing (streaming). Do not modify ``slab``.

    Returns
    -------
    torch.Tensor
        Blended logits ``(N, K, *spatial)``, float32, on ``inputs.device``, same spatial
        size as ``inputs``.

    Raises
    ------
    ConfigError
        Invalid patch size, overlap, batch size, blending, mode or TTA axes.
    """
    import torch

    from medinfer.models.loaders import resolve_device

    if inputs.ndim < 3:
        raise ConfigError(f"inputs: expected (N, C, *spatial), got shape {tuple(inputs.shape)}")
    nsp = inputs.ndim - 2
    patch = tuple(int(p) for p in _tuple(patch_size, nsp, "patch_size"))
    if any(p < 1 for p in patch):
        raise ConfigError(f"patch_size: expected positive sizes, got {list(patch)}")
    ovl = tuple(float(o) for o in _tuple(overlap, nsp, "overlap"))
    if any(not 0.0 <= o < 1.0 for o in ovl):
        raise ConfigError(f"overlap: expected 0 <= overlap < 1, got {list(ovl)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
    if size_divisible < 1:
        raise ConfigError(f"size_divisible: expected >= 1, got {size_divisible}")
    run_mode = parse_enum(RunMode, mode, "mode")
    blend = parse_enum(BlendMode, blending, "blending")
    if tta_axes and any(a not in range(nsp) for a in tta_axes):
        raise ConfigError(f"tta_axes: expected axes in 0..{nsp - 1}, got {list(tta_axes)}")
    flips = tta_flips(tta_axes)

    if device is None:
        dev = getattr(model, "device", inputs.device)
        dev = dev if isinstance(dev, torch.device) else inputs.device
    else:
        dev = resolve_device(device)
    use_amp = amp and dev.type == "cuda"

    run = make_tta_runner(model, flips, amp=use_amp)

    with torch.inference_mode():
        if run_mode is RunMode.WHOLE_VOLUME:
            return _whole_volume(inputs, run, patch, size_divisible, pad_value, batch_size,
                                 dev, progress)
        return _sliding(inputs, run, patch, ovl, blend, sigma_scale, batch_size, dev,
                        pad_value, progress, on_slab)


def pad_spec(size: Sequence[int], target: Sequence[int]) -> list[tuple[int, int]]:
    """Padding ``(before, after)`` per axis that brings ``size`` up to at least ``target``.

    Centred as MONAI's ``sliding_window_inference`` and nnU-Net (the odd voxel goes
    after); axes already at least ``target`` get ``(0, 0)``. Voxel counts, same axis
    order as the inputs.
    """
    out = []
    for s, t in zip(size, target, strict=True):
        diff = max(t - s, 0)
        out.append((diff // 2, diff - diff // 2))
    return out


def _whole_volume(
    inputs: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    patch: tuple[int, ...],
    size_divisible: int,
    pad_value: float,
    batch_size: int,
    dev: torch.device,
    progress: ProgressFn | None,
) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    size = tuple(int(s) for s in inputs.shape[2:])
    target = [
        math.ceil(max(s, p) / size_divisible) * size_divisible
        for s, p in zip(size, patch, strict=True)
    ]
    pads = pad_spec(size, target)
    flat = [v for b, a in reversed(pads) for v in (b, a)]
    outs = []
    n = int(inputs.shape[0])
    for i in range(0, n, batch_size):
        x = inputs[i:i + batch_size].to(dev, torch.float32)
        if any(flat):
            x = F.pad(x, flat, mode="constant", value=pad_value)
        y = run(x)
        crop = tuple(slice(b, b + s) for (b, _), s in zip(pads, size, strict=True))
        outs.append(y[(slice(None), slice(None), *crop)].to(inputs.device))
        if progress is not None:
            progress(min(i + batch_size, n) / n)
    with torch.inference_mode(False):
        return torch.cat(outs).clone() if len(outs) > 1 else outs[0].clone()


def _sliding(
    inputs: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    patch: tuple[int, ...],
    overlap: tuple[float, ...],
    blend: BlendMode,
    sigma_scale: float | Sequence[float],
    batch_size: int,
    dev: torch.device,
    pad_value: float,
    progress: ProgressFn | None,
    on_slab: SlabFn | None = None,
) -> torch.Tensor:
    import torch

    n = int(inputs.shape[0])
    size = tuple(int(s) for s in inputs.shape[2:])
    pads = pad_spec(size, patch)
    padded = tuple(s + b + a for s, (b, a) in zip(size, pads, strict=True))
    plan = WindowPlan.build(padded, patch, overlap)
    weight = importance_map(patch, blend, sigma_scale, device="cpu")
    out_dev = inputs.device
    weight_out = weight.to(out_dev)

    # per window: region in the output (unpadded coords) and matching slice of the patch
    regions: list[tuple[_Index, _Index, _Index]] = []
    for start in plan.windows():
        d_l: list[slice] = []
        s_l: list[slice] = []
        i_l: list[slice] = []
        for a, p, (b, _), s in zip(start, patch, pads, size, strict=True):
            lo, hi = a - b, a - b + p  # window in unpadded coordinates
            clo, chi = max(lo, 0), min(hi, s)
            d_l.append(slice(clo, chi))
            s_l.append(slice(clo - lo, chi - lo))
            i_l.append(slice(clo, chi))
        regions.append((tuple(d_l), tuple(s_l), tuple(i_l)))

    # slabs along axis 0 (unpadded coordinates): slab r is final once row r is done
    nwin = len(regions)
    per_row = nwin // len(plan.starts[0])
    b0 = pads[0][0]
    bounds = [0] + [min(max(plan.final_before(r + 1) - b0, 0), size[0])
                    for r in range(len(plan.starts[0]))]

    def normalise_slab(i: int, r: int) -> None:
        """Divide output slab r of image i by its sum of weights (slab-sized buffer only)."""
        lo, hi = bounds[r], bounds[r + 1]
        if hi <= lo or out is None:
            return
        count = torch.zeros((hi - lo, *size[1:]), dtype=torch.float32, device=out_dev)
        for dst, src, _ in regions[: (r + 1) * per_row]:
            a, b = max(dst[0].start, lo), min(dst[0].stop, hi)
            if a >= b:
                continue
            s0 = src[0].start + (a - dst[0].start)
            count[(slice(a - lo, b - lo), *dst[1:])].add_(
                weight_out[(slice(s0, s0 + b - a), *src[1:])])
        slab = out[i, :, lo:hi]
        slab.div_(count)
        if on_slab is not None:
            on_slab(i, lo, hi, slab)

    needs_pad = any(b or a for b, a in pads)
    out: torch.Tensor | None = None
    total = n * len(regions)
    done = 0
    next_row = 0  # next (image, row) pair to finalise, flattened
    jobs = [(i, r) for i in range(n) for r in regions]
    for j in range(0, total, batch_size):
        batch = jobs[j:j + batch_size]
        if needs_pad:
            x = torch.full((len(batch), int(inputs.shape[1]), *patch), pad_value,
                           dtype=torch.float32, device=dev)
            for k, (i, (_, src, inp)) in enumerate(batch):
                x[(k, slice(None), *src)] = inputs[(i, slice(None), *inp)]
        elif len(batch) == 1:
            i, (_, _, inp) = batch[0]
            x = inputs[(slice(i, i + 1), slice(None), *inp)].to(dev, torch.float32)
        else:
            x = torch.stack([inputs[(i, slice(None), *inp)] for i, (_, _, inp) in batch])
            x = x.to(dev, torch.float32)
        y = run(x).to(out_dev)
        if out is None:
            if y.ndim != inputs.ndim or tuple(y.shape[2:]) != patch:
                raise ModelError(
                    f"model output shape {tuple(y.shape)} does not match the window "
                    f"{(len(batch), int(inputs.shape[1]), *patch)} (expected (B, K, *patch))"
                )
            with torch.inference_mode(False):
                out = torch.zeros((n, int(y.shape[1]), *size), dtype=torch.float32,
                                  device=out_dev)
        for k, (i, (dst, src, _)) in enumerate(batch):
            out[(i, slice(None), *dst)].addcmul_(y[(k, slice(None), *src)], weight_out[src])
        done += len(batch)
        # finalise every row whose last window is done (rows are contiguous in `jobs`)
        while next_row < n * len(plan.starts[0]):
            i, r = divmod(next_row, len(plan.starts[0]))
            if i * nwin + (r + 1) * per_row > done:
                break
            normalise_slab(i, r)
            next_row += 1
        if progress is not None:
            progress(done / total)
    assert out is not None
    return out
