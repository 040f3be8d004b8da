"""Predictor: a scan (:class:`~medinfer.volume.Volume`) in, a :class:`Prediction` out.

Pipeline (each stage timed):

1. ``preprocess``: check the channel count, bring the scan onto the model grid
   (:func:`medinfer.transforms.to_model_grid`: reorient to the card's orientation code,
   resample to its spacing, linear) and normalise intensities
   (:func:`medinfer.transforms.normalize_intensity` with the card's spec);
2. ``inference``: :func:`medinfer.inference.sliding_window_inference` with the card's
   defaults (patch, overlap, blending, TTA axes, batch) unless overridden;
3. ``postprocess``: softmax / sigmoid on the model grid, probabilities carried to the
   **source** grid in one linear interpolation (:func:`medinfer.transforms.to_source_grid`),
   then argmax (softmax) or threshold (sigmoid, detection heat map), label map as
   uint8 (uint16 when a label value exceeds 255) with exactly the source shape and
   affine, per-label statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from medinfer.errors import InvalidImageError, ModelError
from medinfer.models.card import Activation, ModelCard, Task
from medinfer.prediction import LabelStatistics, Prediction
from medinfer.volume import Volume

if TYPE_CHECKING:
    import torch

    from medinfer.models.loaders import Model
    from medinfer.transforms import SpatialRecord

#: ``progress(stage, fraction)``: stage name and overall fraction done in [0, 1]
StageProgress = Callable[[str, float], None]

#: slices along axis 0 per argmax chunk
_ARGMAX_SLAB = 16

#: share of the overall progress bar per stage (start, end)
_SPAN = {"preprocess": (0.0, 0.1), "inference": (0.1, 0.9), "postprocess": (0.9, 1.0)}


def channel_mismatch_message(volume: Volume, model_name: str, expected: int) -> str:
    """The message for a scan whose channel count is not the model's ``input.channels``.

    The fourth axis of a 4-D NIfTI (``meta["nifti"]["dim"]`` of length 4) holds time
    points (fMRI, DWI, perfusion), not channels: the message says so and how to pick one.
    """
    source = volume.meta.get("source", "input")
    n = volume.num_channels
    dim = (volume.meta.get("nifti") or {}).get("dim")
    if dim is not None and len(dim) == 4 and int(dim[3]) == n > 1:
        return (
            f"{source}: 4-D NIfTI with {n} time points (volumes along dim[4]); model "
            f"{model_name!r} takes one {expected}-channel 3-D scan: extract one time "
            f"point first (e.g. fslroi {source} out.nii.gz 0 1, or nibabel "
            f"img.slicer[..., 0])"
        )
    return f"{source}: scan has {n} channel(s); model {model_name!r} expects {expected}"


def label_statistics(label: Volume, card: ModelCard) -> list[LabelStatistics]:
    """Voxel count and volume (mL) of every non-background label of ``card``.

    ``volume_ml = voxels * prod(spacing_mm) / 1000``; labels absent from the map get 0.
    """
    counts = np.bincount(label.array.ravel(), minlength=max(card.labels) + 1)
    voxel_ml = float(np.prod(label.spacing)) / 1000.0
    return [
        LabelStatistics(value=v, name=spec.name, voxels=int(counts[v]),
                        volume_ml=float(counts[v]) * voxel_ml)
        for v, spec in card.labels.items()
        if v != 0
    ]


class Predictor:
    """Run a model described by a :class:`ModelCard` on scans.

    Parameters
    ----------
    card : the model card (input contract, inference defaults, output contract).
    model : the loaded network (:func:`medinfer.models.load_model`).
    device : ``auto``, ``cpu`` or ``cuda``: where the windows run (AMP on CUDA).
    tta : ``None`` = the card's ``inference.tta_axes``; ``False`` = none; ``True`` = the
        card's axes, or all three spatial axes if the card names none; a sequence of
        axes (subset of 0, 1, 2 of the model grid) = those.
    overlap : window overlap in ``[0, 1)``; ``None`` = the card's.
    batch_size : windows per network call; ``None`` = the card's.
    save_probabilities : keep the float32 probability Volume ``(K, I, J, K)`` on the
        source grid in ``Prediction.probabilities``.
    amp : float16 autocast for the network on CUDA (default on; no effect on CPU).
    force : run scans that do not fit the card's input contract even when the card says
        ``input.mismatch: refuse`` (:mod:`medinfer.inference.contract`; a warning is
        logged either way).

    Raises
    ------
    ConfigError
        Invalid device, overlap, batch size or TTA axes.
    """

    def __init__(
        self,
        card: ModelCard,
        model: Model | Callable[[torch.Tensor], torch.Tensor],
        device: str = "auto",
        tta: bool | Sequence[int] | None = None,
        overlap: float | None = None,
        batch_size: int | None = None,
        save_probabilities: bool = False,
        force: bool = False,
        amp: bool = True,
    ) -> None:
        from medinfer.errors import ConfigError
        from medinfer.models.loaders import resolve_device

        self.card = card
        self.model = model
        self.device = resolve_device(device)
        inf = card.inference
        if tta is None:
            axes: tuple[int, ...] = inf.tta_axes
        elif isinstance(tta, bool):
            axes = (inf.tta_axes or (0, 1, 2)) if tta else ()
        else:
            axes = tuple(sorted(set(int(a) for a in tta)))
        if any(a not in (0, 1, 2) for a in axes):
            raise ConfigError(f"tta: expected spatial axes from 0, 1, 2, got {list(axes)}")
        self.tta_axes = axes
        self.overlap = inf.overlap if overlap is None else float(overlap)
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap: expected 0 <= overlap < 1, got {self.overlap}")
        self.batch_size = inf.batch_size if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {self.batch_size}")
        self.save_probabilities = save_probabilities
        self.force = force
        self.amp = amp

    # ------------------------------------------------------------------ stages
    def preprocess(self, volume: Volume) -> tuple[Volume, SpatialRecord]:
        """Channel check, model grid, normalisation; returns (model-grid Volume, record).

        Raises
        ------
        InvalidImageError
            The scan has another number of channels than the card's ``input.channels``
            (a 4-D NIfTI's fourth axis is named as time points), or NaN / infinite
            voxels (:func:`medinfer.transforms.check_finite`), or a channel without
            intensity range, or (card ``input.mismatch: refuse``, no ``force``) a scan
            that does not fit the input contract
            (:func:`medinfer.inference.contract.check_input_contract`).
        """
        from medinfer.inference.contract import check_input_contract
        from medinfer.transforms import check_finite, normalize_intensity, to_model_grid

        spec = self.card.input
        if volume.num_channels != spec.channels:
            raise InvalidImageError(channel_mismatch_message(volume, self.card.name,
                                                             spec.channels))
        check_finite(volume)
        check_input_contract(volume, self.card, force=self.force)
        on_grid, record = to_model_grid(volume, spec.orientation, spec.spacing)
        return normalize_intensity(on_grid, spec.normalization), record

    def infer(self, image: Volume, progress: Callable[[float], None] | None = None
              ) -> torch.Tensor:
        """Blended logits ``(K, I', J', K')`` float32 (CPU) of a model-grid Volume."""
        import torch

        from medinfer.inference.sliding_window import sliding_window_inference

        inf = self.card.inference
        x = torch.from_numpy(np.ascontiguousarray(image.array, dtype=np.float32))[None]
        logits = sliding_window_inference(
            x, self.model, inf.patch_size, overlap=self.overlap, blending=inf.blending.value,
            sigma_scale=inf.sigma_scale, batch_size=self.batch_size, mode=inf.mode.value,
            tta_axes=self.tta_axes, device=self.device, size_divisible=inf.size_divisible,
            progress=progress, amp=self.amp,
        )
        k = int(logits.shape[1])
        if k != self.card.num_classes:
            raise ModelError(
                f"model {self.card.name!r}: network gives {k} output channel(s), the card's "
                f"labels and output.activation={self.card.output.activation.value} imply "
                f"{self.card.num_classes}"
            )
        return logits[0]

    def predict(self, volume: Volume, progress: StageProgress | None = None) -> Prediction:
        """Segment (or detect on) ``volume``; every output is on its exact grid.

        Parameters
        ----------
        volume : the scan, ``(C, I, J, K)``, affine voxel -> RAS+ mm, any orientation.
        progress : optional ``progress(stage, fraction)``; stage is ``preprocess``,
            ``inference`` or ``postprocess``; fraction is the overall fraction done,
            in [0, 1] and never decreasing.

        Returns
        -------
        Prediction
            ``label``: ``(1, I, J, K)`` uint8/uint16, source affine; ``probabilities``
            (if requested) ``(K, I, J, K)`` float32; ``heatmap`` for detection/sigmoid
            models ``(1, I, J, K)`` float32 in [0, 1]; ``statistics`` per label;
            ``timings`` in seconds per stage.

        Raises
        ------
        InvalidImageError, GeometryError
            Channel mismatch, invalid geometry.
        ModelError
            The network's output channel count contradicts the card.
        """
        import torch

        from medinfer.transforms import to_source_grid

        last = [0.0]

        def report(stage: str, frac: float) -> None:
            if progress is None:
                return
            lo, hi = _SPAN[stage]
            value = max(last[0], min(1.0, lo + (hi - lo) * min(max(frac, 0.0), 1.0)))
            last[0] = value
            progress(stage, value)

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        report("preprocess", 0.0)
        image, record = self.preprocess(volume)
        timings["preprocess"] = time.perf_counter() - t0
        report("preprocess", 1.0)

        t1 = time.perf_counter()
        logits = self.infer(image, lambda f: report("inference", f))
        timings["inference"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        out = self.card.output
        with torch.inference_mode():  # in place: no second K-channel buffer
            if out.activation is Activation.SOFTMAX:
                logits.sub_(logits.max(dim=0, keepdim=True).values).exp_()
                logits.div_(logits.sum(dim=0, keepdim=True))
            else:
                logits.sigmoid_()
        probs_model = Volume(logits.numpy(), image.affine, {})
        del logits
        report("postprocess", 0.2)
        probs = to_source_grid(probs_model, record, interpolation="linear")
        del probs_model
        report("postprocess", 0.7)
        p = probs.array.astype(np.float32, copy=False)
        max_value = max(self.card.labels)
        dtype = np.uint8 if max_value <= 255 else np.uint16
        heatmap: Volume | None = None
        if self.card.task is Task.DETECTION:
            heat = (1.0 - p[0]) if out.activation is Activation.SOFTMAX else p.max(axis=0)
            heat = np.clip(heat, 0.0, 1.0).astype(np.float32)
            fg = self.card.foreground_values[0] if self.card.foreground_values else 1
            labels = np.where(heat >= out.threshold, fg, 0).astype(dtype)
            heatmap = probs.with_array(heat[None])
        elif out.activation is Activation.SOFTMAX:
            values = np.array(sorted(self.card.labels), dtype=dtype)
            labels = np.empty(p.shape[1:], dtype=dtype)
            for a in range(0, p.shape[1], _ARGMAX_SLAB):  # no full-size int64 index array
                labels[a:a + _ARGMAX_SLAB] = values[np.argmax(p[:, a:a + _ARGMAX_SLAB], axis=0)]
        else:
            values = np.array(self.card.foreground_values, dtype=dtype)
            best = np.argmax(p, axis=0)
            best_p = np.take_along_axis(p, best[None], axis=0)[0]
            labels = np.where(best_p >= out.threshold, values[best], 0).astype(dtype)
            if p.shape[0] == 1:
                heatmap = probs.with_array(p[:1].copy())
        label = Volume(labels[None], volume.affine, {"model": self.card.name,
                                                     "model_version": self.card.version})
        stats = label_statistics(label, self.card)
        probabilities = probs if self.save_probabilities else None
        timings["postprocess"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        report("postprocess", 1.0)
        return Prediction(
            label=label,
            probabilities=probabilities,
            heatmap=heatmap,
            statistics=stats,
            timings=timings,
            model_name=self.card.name,
            model_version=self.card.version,
        )
