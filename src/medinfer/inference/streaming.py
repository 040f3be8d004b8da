"""Lean inference: streaming slab accumulation and slab-wise export.

The full-volume path (:func:`medinfer.inference.sliding_window_inference` followed by
:func:`medinfer.transforms.to_source_grid`) holds the blended logits of the whole model
grid, ``K x I' x J' x K'`` float32, and then the resampled probabilities of the whole
source grid. For many-class models on large scans that is tens of GB. This module does
the same arithmetic with memory that grows with **one slab**:

1. :func:`stream_logits` runs the windows in lexicographic order of their start (axis 0
   of the model grid slowest, as :class:`~medinfer.inference.sliding_window.WindowPlan`
   schedules them). After the last window of a *row* (all windows sharing one axis-0
   start) no later window touches model rows below the next row's start, so those rows
   are final: they are divided by the blending weight sum and handed to a sink, and the
   accumulator moves on. The accumulator holds ``K x patch[0] x J' x K'`` values.
2. :class:`SlabExporter` is such a sink. It keeps only the model rows still needed by
   source voxels not yet written, resamples each ready block of source voxels back to
   the source grid with :class:`medinfer.transforms.SlabResampler` (the very same plans,
   weights and pass code as :func:`~medinfer.transforms.to_source_grid`), turns the
   block into labels (argmax, threshold, regions) and writes them into the uint8/uint16
   label map. Probabilities are kept only on request.

Exactness: with ``accumulate_dtype=float32`` every voxel receives the same float32
operations in the same order as in the full-volume engine (same windows, same
``addcmul_``, same weight sums, same division), so the logits are bitwise identical; the
export uses the same 1-D interpolation plans, so labels are identical to the full path
(see ``tests/streaming``). ``float16`` accumulation (what nnU-Net does) halves the
accumulator; the measured difference is stated in ``docs/nnunet.md``.

Memory (float32, K classes, model grid ``I' x J' x K'``): accumulator ``K * p0 * J' * K'``,
retained export rows ``K * (rows between two window-row starts + 2) * J' * K'``, the
weight sum ``I' * J' * K'`` (one channel), the label map (1 byte per source voxel).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medinfer.errors import ConfigError, ModelError
from medinfer.inference.sliding_window import make_tta_runner

if TYPE_CHECKING:
    import torch

    from medinfer.transforms import SpatialRecord

__all__ = [
    "SlabExporter",
    "WindowRegion",
    "axis_plans_from_record",
    "make_tta_runner",
    "stream_logits",
    "window_regions",
]

#: largest slab handed to a sink / resampled at once (bytes of float32 values)
_SINK_BYTES = 32 * 2**20

#: ``sink(final_logits (K, r1 - r0, *rest) float32, r0, r1)``: rows r0..r1 of axis 0 final
Sink = Callable[["torch.Tensor", int, int], None]


@dataclass(frozen=True)
class WindowRegion:
    """One window: where it lands in the (unpadded) volume and which part of the patch.

    ``dst``: slices of the volume (unpadded coordinates); ``src``: matching slices of
    the patch; ``inp``: slices of the volume to read (same as ``dst``); ``start``: the
    window start in padded coordinates.
    """

    start: tuple[int, ...]
    dst: tuple[slice, ...]
    src: tuple[slice, ...]


def window_regions(
    size: Sequence[int], patch: Sequence[int], starts: Sequence[Sequence[int]],
    pads: Sequence[tuple[int, int]],
) -> list[WindowRegion]:
    """Windows in lexicographic order (axis 0 slowest), clipped to the unpadded volume.

    Parameters
    ----------
    size : unpadded spatial size (voxels).
    patch : window size.
    starts : per axis, the window starts in padded coordinates (sorted).
    pads : per axis ``(before, after)`` padding of the volume (centred padding of a
        volume smaller than the patch; MONAI and nnU-Net put the odd voxel after).
    """
    out = []
    for start in itertools.product(*starts):
        d_l, s_l = [], []
        for a, p, (b, _), s in zip(start, patch, pads, size, strict=True):
            lo, hi = a - b, a - b + p
            clo, chi = max(lo, 0), min(hi, s)
            d_l.append(slice(clo, chi))
            s_l.append(slice(clo - lo, chi - lo))
        out.append(WindowRegion(tuple(int(v) for v in start), tuple(d_l), tuple(s_l)))
    return out


def stream_logits(
    inputs: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    patch: Sequence[int],
    starts: Sequence[Sequence[int]],
    weight: torch.Tensor,
    sink: Sink,
    *,
    pads: Sequence[tuple[int, int]] | None = None,
    pad_value: float = 0.0,
    batch_size: int = 1,
    accumulate_dtype: torch.dtype | None = None,
    fused: bool = True,
    device: torch.device | None = None,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Sliding-window inference over one image, finalising slabs of axis 0 as they close.

    Parameters
    ----------
    inputs : ``(C, *spatial)`` float tensor on the model grid (CPU), unpadded.
    run : ``(B, C, *patch) -> (B, K, *patch)`` float32 logits (e.g. :func:`make_tta_runner`).
    patch : window size (voxels), one per spatial axis.
    starts : per axis, window starts in padded coordinates (sorted), e.g.
        ``WindowPlan.build(...).starts`` or nnU-Net's ``compute_steps_for_sliding_window``.
    weight : ``patch``-shaped importance map (float32 or float16).
    sink : called with ``(logits (K, r1 - r0, *rest) float32, r0, r1)`` for consecutive
        row ranges ``[r0, r1)`` of spatial axis 0, covering the whole axis once, in order.
    pads : ``(before, after)`` per axis when the volume is smaller than the patch
        (windows reaching into the padding read ``pad_value``); default none.
    batch_size : windows per ``run`` call.
    accumulate_dtype : ``torch.float32`` (default; bitwise equal to the full-volume
        engine) or ``torch.float16`` (nnU-Net's accumulation: product in float32, sum and
        weight sum in float16).
    fused : float32 accumulation with ``addcmul_`` (medinfer's full-volume engine) when
        True, ``prediction * weight`` then ``+=`` (nnU-Net) when False.
    device : where ``run`` is called (inputs are moved there window by window).
    progress : called with the fraction of windows done.

    Raises
    ------
    ModelError
        The network output does not have the window's spatial shape.
    """
    import torch

    acc_dtype = accumulate_dtype or torch.float32
    if acc_dtype not in (torch.float32, torch.float16):
        raise ConfigError(f"accumulate_dtype: float32 or float16, got {acc_dtype}")
    size = tuple(int(s) for s in inputs.shape[1:])
    nsp = len(size)
    patch = tuple(int(p) for p in patch)
    pads = list(pads) if pads is not None else [(0, 0)] * nsp
    regions = window_regions(size, patch, starts, pads)
    dev = device or inputs.device
    w = weight.to(acc_dtype)  # weight sum (and fused product) in the accumulator's dtype
    w_mul = weight  # unfused: float32 prediction times the weight as given (nnU-Net)
    needs_pad = any(b or a for b, a in pads)
    rest = size[1:]

    # weight sum per voxel (one channel), accumulated in the same order as the full engine
    with torch.inference_mode():
        count = torch.zeros(size, dtype=acc_dtype)
        for r in regions:
            count[r.dst].add_(w[r.src])

        # row structure along axis 0: window index ranges sharing one axis-0 start
        row_starts = sorted({r.dst[0].start for r in regions})
        p0 = max(r.dst[0].stop - r.dst[0].start for r in regions)
        acc: torch.Tensor | None = None
        base = 0  # model row held at acc[:, 0]
        done_rows = 0
        total = len(regions)
        done = 0

        def flush(upto: int) -> None:
            nonlocal base, done_rows
            assert acc is not None
            if upto <= done_rows:
                return
            a, b = done_rows - base, upto - base
            # final values in place: the same division as the full-volume engine
            acc[:, a:b].div_(count[done_rows:upto])
            k, rest_n = int(acc.shape[0]), math.prod(rest)
            step = max(1, _SINK_BYTES // max(k * rest_n * 4, 1))
            for r in range(a, b, step):
                r1 = min(b, r + step)
                piece = acc[:, r:r1]
                sink(piece if acc_dtype == torch.float32 else piece.to(torch.float32),
                     base + r, base + r1)
            done_rows = upto
            # move the still-open rows to the front (row by row: no full-size temporary)
            keep = int(acc.shape[1]) - b
            for i in range(max(keep, 0)):
                acc[:, i].copy_(acc[:, b + i])
            acc[:, max(keep, 0):] = 0
            base = upto

        idx = 0
        for r_i, row_start in enumerate(row_starts):
            row = []
            while idx < total and regions[idx].dst[0].start == row_start:
                row.append(regions[idx])
                idx += 1
            if acc is not None:
                flush(row_start)
            for j in range(0, len(row), batch_size):
                batch = row[j:j + batch_size]
                if needs_pad:
                    x = torch.full((len(batch), int(inputs.shape[0]), *patch), pad_value,
                                   dtype=torch.float32, device=dev)
                    for k, reg in enumerate(batch):
                        x[(k, slice(None), *reg.src)] = inputs[(slice(None), *reg.dst)]  # type: ignore[index]
                else:
                    x = torch.stack([inputs[(slice(None), *reg.dst)] for reg in batch])
                    x = x.to(dev, torch.float32)
                y = run(x).to("cpu")
                if y.ndim != 2 + nsp or tuple(y.shape[2:]) != patch:
                    raise ModelError(
                        f"model output shape {tuple(y.shape)} does not match the window "
                        f"{(len(batch), int(inputs.shape[0]), *patch)} (expected (B, K, *patch))"
                    )
                if acc is None:
                    acc = torch.zeros((int(y.shape[1]), p0, *rest), dtype=acc_dtype)
                for k, reg in enumerate(batch):
                    d0 = reg.dst[0]
                    dst = (slice(None), slice(d0.start - base, d0.stop - base), *reg.dst[1:])
                    if acc_dtype == torch.float32 and fused:
                        acc[dst].addcmul_(y[(k, slice(None), *reg.src)],  # type: ignore[index]
                                          w[reg.src])
                    else:
                        prod = y[(k, slice(None), *reg.src)] * w_mul[reg.src]  # type: ignore[index]
                        acc[dst] += prod
                done += len(batch)
                if progress is not None:
                    progress(done / total)
            del r_i
        if acc is None:
            raise ModelError("no window was run (empty volume?)")
        flush(size[0])


# =============================================================================== export
def axis_plans_from_record(
    record: SpatialRecord, model_affine: np.ndarray | None = None
) -> tuple[list[int], list[Any]] | None:
    """Per output (source) axis: the model axis it reads and the 1-D interpolation plan.

    The plans of :meth:`medinfer.transforms.SlabResampler.from_grids` for a linear
    resampling from the model grid back to the source grid, exactly those
    :func:`medinfer.transforms.to_source_grid` uses. Returns ``None`` when the voxel map
    is not separable (never the case for grids made by ``to_model_grid``).
    """
    from medinfer.transforms import SlabResampler

    src_affine = record.model_affine_array if model_affine is None else model_affine
    dst_affine = record.source_affine_array
    if not SlabResampler.is_separable(src_affine, record.source_shape, dst_affine):
        return None
    rs = SlabResampler.from_grids(record.model_shape, src_affine, record.source_shape,
                                  dst_affine, interpolation="linear")
    return list(rs.perm), list(rs.plans)


class SlabExporter:
    """Sink of :func:`stream_logits` that writes labels on the output grid slab by slab.

    Parameters
    ----------
    out_shape : output grid shape ``(I, J, K)`` (e.g. the source scan's grid).
    perm : ``perm[c]`` = model axis that output axis ``c`` is interpolated from.
    plans : per output axis, a :class:`medinfer.transforms.AxisPlan` sampling the
        model axis ``perm[c]`` (linear, nearest or exact gathers).
    to_values : applied to each final model-grid slab before resampling, e.g. softmax
        over channels (``(K, rows, ...)`` float32 -> float32); ``None`` = identity.
    to_labels : ``(K, *block) float32 -> (*block)`` integer labels of a resampled block.
    label_out : the label array to fill, shape ``out_shape`` (any integer dtype); the
        caller may pass a view (e.g. a crop of a larger array, transposed).
    prob_out : optional ``(K, *out_shape)`` float32 array for the resampled values
        (probabilities on request).
    to_probabilities : applied to a resampled block before it is written to
        ``prob_out`` (e.g. softmax of resampled logits); ``None`` = identity.
    model_rows : length of model axis 0 (the last slab flushes everything).

    Notes
    -----
    The resampling is :meth:`medinfer.transforms.SlabResampler.resample` (the public
    slab API of the transforms), so each block equals the matching part of
    :func:`~medinfer.transforms.to_source_grid` bitwise.
    """

    def __init__(
        self,
        out_shape: Sequence[int],
        perm: Sequence[int],
        plans: Sequence[Any],
        to_labels: Callable[[np.ndarray], np.ndarray],
        label_out: np.ndarray,
        *,
        to_values: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prob_out: np.ndarray | None = None,
        to_probabilities: Callable[[np.ndarray], np.ndarray] | None = None,
        model_rows: int,
    ) -> None:
        from medinfer.transforms import SlabResampler

        self.resampler = SlabResampler(out_shape, perm, plans)
        self.out_shape = self.resampler.out_shape
        self.perm = list(perm)
        self.plans = list(plans)
        self.c0 = self.perm.index(0)
        self.to_values = to_values
        self.to_labels = to_labels
        self.label_out = label_out
        self.prob_out = prob_out
        self.to_probabilities = to_probabilities
        p = self.plans[self.c0]
        self.need_hi = p.need_hi  # last model row needed per output index
        self.need_lo = p.need_lo
        self.emitted = np.zeros(self.out_shape[self.c0], dtype=bool)
        self.model_rows = int(model_rows)
        self.chunks: list[tuple[int, np.ndarray]] = []
        self.peak_buffer_bytes = 0

    def __call__(self, slab: torch.Tensor, r0: int, r1: int) -> None:
        """Take final model rows ``[r0, r1)`` (``(K, r1 - r0, *rest)`` float32).

        The values are copied (the caller may reuse ``slab``'s memory afterwards).
        """
        import torch

        vals = self.to_values(slab) if self.to_values is not None else slab
        arr = np.array(vals.detach().to("cpu", torch.float32).numpy(), dtype=np.float32,
                       copy=True)
        self.chunks.append((r0, arr))
        held = sum(c.nbytes for _, c in self.chunks)
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, held)
        ready = (~self.emitted) & (self.need_hi < r1)
        if r1 >= self.model_rows:
            ready = ~self.emitted
        idx = np.flatnonzero(ready)
        if idx.size:
            # contiguous runs (the map is monotonic, so normally one run), in pieces
            per_row = arr.shape[0] * math.prod(
                s for c, s in enumerate(self.out_shape) if c != self.c0) * 4
            step = max(1, _SINK_BYTES // max(per_row, 1))
            breaks = np.flatnonzero(np.diff(idx) != 1) + 1
            for run in np.split(idx, breaks):
                for t0 in range(int(run[0]), int(run[-1]) + 1, step):
                    self._emit(t0, min(int(run[-1]) + 1, t0 + step))
            self.emitted[idx] = True
        # drop model rows no longer needed
        left = np.flatnonzero(~self.emitted)
        keep_from = int(self.need_lo[left].min()) if left.size else r1
        self.chunks = [(c0, c) for c0, c in self.chunks if c0 + c.shape[1] > keep_from]

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        """Model rows ``[lo, hi)`` from the held chunks, ``(K, hi - lo, *rest)``."""
        parts = []
        for c0, c in self.chunks:
            a, b = max(lo, c0), min(hi, c0 + c.shape[1])
            if a < b:
                parts.append(c[:, a - c0:b - c0])
        if not parts or sum(p.shape[1] for p in parts) != hi - lo:
            raise RuntimeError(f"streaming export: model rows {lo}..{hi} not held")
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def _emit(self, t0: int, t1: int) -> None:
        """Resample output indices ``[t0, t1)`` along output axis ``c0`` and label them."""
        lo, hi = self.resampler.source_range(self.c0, t0, t1)
        out = self.resampler.resample(self._rows(lo, hi), axis=self.c0, start=t0, stop=t1,
                                      block_start=lo, out_dtype=np.float32)
        sl: list[slice] = [slice(None)] * 3
        sl[self.c0] = slice(t0, t1)
        self.label_out[tuple(sl)] = self.to_labels(out)
        if self.prob_out is not None:
            probs = self.to_probabilities(out) if self.to_probabilities is not None else out
            self.prob_out[(slice(None), *sl)] = probs


def slab_rows_estimate(k: int, patch0: int, rest: Sequence[int], itemsize: int = 4) -> int:
    """Bytes of the streaming accumulator: ``k * patch0 * prod(rest) * itemsize``."""
    return int(k * patch0 * math.prod(rest) * itemsize)


# ======================================================================= model cards
def predict_streaming(
    predictor: Any,
    volume: Any,
    progress: Callable[[str, float], None] | None = None,
    *,
    accumulate_dtype: torch.dtype | None = None,
) -> Any:
    """:meth:`Predictor.predict` with streaming accumulation and slab-wise export.

    Same inputs, same outputs (:class:`~medinfer.prediction.Prediction`, label map on the
    exact source grid) and -- with float32 accumulation -- the same label map as the
    full-volume :meth:`medinfer.inference.Predictor.predict`, with peak memory of one
    slab of logits instead of the whole volume times the classes.

    Parameters
    ----------
    predictor : a :class:`medinfer.inference.Predictor` (card, model, TTA, overlap, batch).
    volume : the scan, ``(C, I, J, K)``, affine voxel -> RAS+ mm.
    progress : ``progress(stage, fraction)`` as for ``Predictor.predict``.
    accumulate_dtype : ``torch.float32`` (default, exact) or ``torch.float16``.

    Returns
    -------
    Prediction
        Falls back to ``predictor.predict`` (full volume) for detection models,
        ``whole_volume`` mode and non-separable grids, where streaming does not apply.
    """
    import time

    import torch

    from medinfer.inference.predictor import label_statistics
    from medinfer.inference.sliding_window import (
        WindowPlan,
        importance_map,
        pad_spec,
        tta_flips,
    )
    from medinfer.models.card import Activation, InferenceMode, Task
    from medinfer.prediction import Prediction
    from medinfer.volume import Volume

    card = predictor.card
    inf = card.inference
    if card.task is not Task.SEGMENTATION or inf.mode is not InferenceMode.SLIDING_WINDOW:
        return predictor.predict(volume, progress=progress)

    def report(stage: str, frac: float) -> None:
        if progress is not None:
            span = {"preprocess": (0.0, 0.1), "inference": (0.1, 1.0)}[stage]
            progress(stage, span[0] + (span[1] - span[0]) * min(max(frac, 0.0), 1.0))

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    image, record = predictor.preprocess(volume)
    planned = axis_plans_from_record(record, image.affine)
    if planned is None:
        return predictor.predict(volume, progress=progress)
    perm, plans = planned
    timings["preprocess"] = time.perf_counter() - t0
    report("preprocess", 1.0)

    t1 = time.perf_counter()
    size = image.spatial_shape
    patch = tuple(int(p) for p in inf.patch_size)
    pads = pad_spec(size, patch)
    padded = tuple(s + b + a for s, (b, a) in zip(size, pads, strict=True))
    plan = WindowPlan.build(padded, patch, [predictor.overlap] * 3)
    weight = importance_map(patch, inf.blending.value, inf.sigma_scale)
    run = make_tta_runner(predictor.model, tta_flips(predictor.tta_axes),
                          amp=getattr(predictor, "amp", True) and predictor.device.type == "cuda")
    max_value = max(card.labels)
    dtype = np.uint8 if max_value <= 255 else np.uint16
    labels = np.zeros(volume.spatial_shape, dtype=dtype)
    k = card.num_classes
    probs = (np.zeros((k, *volume.spatial_shape), dtype=np.float32)
             if predictor.save_probabilities else None)
    softmax = card.output.activation is Activation.SOFTMAX
    values = np.array(sorted(card.labels) if softmax else card.foreground_values, dtype=dtype)
    threshold = card.output.threshold

    def to_values(x: torch.Tensor) -> torch.Tensor:
        if int(x.shape[0]) != k:
            raise ModelError(
                f"model {card.name!r}: network gives {int(x.shape[0])} output channel(s), the "
                f"card's labels and output.activation={card.output.activation.value} imply {k}"
            )
        if not softmax:
            return torch.sigmoid(x)
        # the same operations as Predictor.predict (max-shifted exp, divided by the sum)
        y = x.sub(x.max(dim=0, keepdim=True).values).exp_()
        return y.div_(y.sum(dim=0, keepdim=True))

    def to_labels(p: np.ndarray) -> np.ndarray:
        best = np.argmax(p, axis=0)
        if softmax:
            return values[best]
        best_p = np.take_along_axis(p, best[None], axis=0)[0]
        return np.where(best_p >= threshold, values[best], 0).astype(dtype)

    exporter = SlabExporter(record.source_shape, perm, plans, to_labels, labels,
                            to_values=to_values, prob_out=probs, model_rows=size[0])
    x = torch.from_numpy(np.ascontiguousarray(image.array, dtype=np.float32))
    stream_logits(x, run, patch, plan.starts, weight, exporter, pads=pads,
                  batch_size=predictor.batch_size, accumulate_dtype=accumulate_dtype,
                  device=predictor.device, progress=lambda f: report("inference", f))
    timings["inference"] = time.perf_counter() - t1  # with the slab-wise export
    t2 = time.perf_counter()
    label = Volume(labels[None], volume.affine, {"model": card.name,
                                                  "model_version": card.version})
    timings["postprocess"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    return Prediction(
        label=label,
        probabilities=Volume(probs, volume.affine, {}) if probs is not None else None,
        statistics=label_statistics(label, card),
        timings=timings,
        model_name=card.name,
        model_version=card.version,
    )
