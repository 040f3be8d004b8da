"""Run a detection (heat-map) model on a scan: Volume -> heat map -> findings.

The heat map is produced on the model grid with the engine's sliding-window function
(:func:`medinfer.inference.sliding_window_inference`) and brought back to the **source
grid** with one trilinear interpolation (:func:`medinfer.transforms.to_source_grid`).
On top of the engine this module adds what the detection configuration offers beyond it:

* ``blending: linear`` — each window's logits are weighted by a pyramid (tent) map
  ``prod_d (1 - |x_d| / (p_d / 2))`` (clamped at 1e-3) and normalised by the summed weights;
  implemented by wrapping the network so that it returns ``[w * y, w]`` to the engine run
  with constant blending, then dividing. ``average`` is the engine's constant blending.
* **TTA with 90-degree rotations**: the whole model-grid volume is flipped / rotated
  (``torch.rot90`` in the plane ``rotation_axes``), run, and the logits are transformed
  back and averaged (then the sigmoid is applied). The identity is always the first
  augmentation; ``num_augmentations`` keeps the first N of: identity, each flip, each
  rotation.
* ``stride`` (voxels) is converted to the engine's per-axis overlap
  ``1 - stride / patch_size``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from medinfer.errors import ConfigError, ModelError
from medinfer.postprocess.calibration import Calibration
from medinfer.postprocess.detection import Finding, detect_findings
from medinfer.postprocess.detection_config import (
    BlendingChoice,
    DetectionConfig,
    ModeChoice,
)
from medinfer.prediction import Prediction
from medinfer.volume import Volume

LOG = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


def _as_config(config: DetectionConfig | dict[str, Any] | None) -> DetectionConfig:
    if config is None:
        return DetectionConfig()
    if isinstance(config, DetectionConfig):
        return config
    return DetectionConfig.from_dict(config)


def inference_settings(card: Any, cfg: DetectionConfig) -> dict[str, Any]:
    """Effective inference settings: config values, else the model card's.

    Returns a dict with ``mode``, ``patch_size``, ``overlap`` (per axis), ``batch_size``,
    ``blending`` (gaussian | linear | average), ``sigma_scale``, ``size_divisible``.

    Raises
    ------
    ConfigError
        ``inference.stride`` larger than the patch size along an axis.
    """
    inf = cfg.inference
    ci = card.inference
    patch = tuple(int(p) for p in (inf.patch_size or ci.patch_size))
    if inf.stride is not None:
        if any(s > p for s, p in zip(inf.stride, patch, strict=True)):
            raise ConfigError(f"inference.stride: {list(inf.stride)} must not exceed "
                              f"inference.patch_size {list(patch)} (windows would leave gaps)")
        overlap = tuple(1.0 - s / p for s, p in zip(inf.stride, patch, strict=True))
    else:
        ov = inf.overlap if inf.overlap is not None else float(ci.overlap)
        overlap = (ov, ov, ov)
    if inf.blending is not None:
        blending = inf.blending
    else:
        blending = BlendingChoice.GAUSSIAN if str(ci.blending.value) == "gaussian" \
            else BlendingChoice.AVERAGE
    mode = inf.mode or ModeChoice(str(ci.mode.value))
    return {
        "mode": mode,
        "patch_size": patch,
        "overlap": overlap,
        "batch_size": int(inf.batch_size or ci.batch_size),
        "blending": blending,
        "sigma_scale": float(inf.sigma_scale or ci.sigma_scale),
        "size_divisible": int(getattr(ci, "size_divisible", 1)),
    }


def augmentations(cfg: DetectionConfig) -> list[tuple[tuple[int, ...], int]]:
    """TTA list of ``(flip_axes, rot90_k)``; identity first. Axes are model-grid axes."""
    tta = cfg.inference.tta
    out: list[tuple[tuple[int, ...], int]] = [((), 0)]
    if tta.enabled:
        out += [(tuple(sorted(f)), 0) for f in tta.flips if f]
        out += [((), int(k)) for k in tta.rotations]
    if tta.num_augmentations is not None:
        out = out[: tta.num_augmentations]
    return out


def _tent(shape: tuple[int, ...]) -> Any:
    import torch

    w: torch.Tensor | None = None
    for i, p in enumerate(shape):
        x = torch.arange(p, dtype=torch.float32) - (p - 1) / 2.0
        t = (1.0 - x.abs() / (p / 2.0)).clamp(min=1e-3)
        w = t if w is None else w.unsqueeze(-1) * t[(None,) * i]
    assert w is not None
    return w


def model_grid_logits(x: Any, model: Callable[[Any], Any], settings: dict[str, Any],
                      augs: list[tuple[tuple[int, ...], int]],
                      rotation_axes: tuple[int, int] = (0, 1),
                      progress: Callable[[float], None] | None = None) -> Any:
    """Logits ``(1, K, *spatial)`` on the model grid for input ``x`` ``(1, C, *spatial)``."""
    import torch

    from medinfer.inference import sliding_window_inference

    blending = settings["blending"]
    net: Callable[[Any], Any]
    if blending is BlendingChoice.LINEAR:
        def tent_net(t: torch.Tensor) -> torch.Tensor:
            y = model(t)
            w = _tent(tuple(int(s) for s in y.shape[2:])).to(y.device, y.dtype)
            w = w[None, None].expand(y.shape[0], 1, *y.shape[2:])
            return torch.cat([y * w, w], dim=1)
        net = tent_net
        engine_blend = "constant"
    else:
        net = model
        engine_blend = "gaussian" if blending is BlendingChoice.GAUSSIAN else "constant"
    rot_dims = [a + 2 for a in rotation_axes]
    acc = None
    for n, (flips, k) in enumerate(augs):
        xa = x
        if flips:
            xa = torch.flip(xa, [a + 2 for a in flips])
        if k:
            xa = torch.rot90(xa, k, rot_dims)

        def prog(f: float, n: int = n) -> None:
            if progress is not None:
                progress((n + f) / len(augs))

        y = sliding_window_inference(
            xa, net, settings["patch_size"], overlap=settings["overlap"],
            blending=engine_blend, sigma_scale=settings["sigma_scale"],
            batch_size=settings["batch_size"], mode=str(settings["mode"].value),
            size_divisible=settings["size_divisible"], progress=prog,
        )
        if blending is BlendingChoice.LINEAR:
            y = y[:, :-1] / y[:, -1:].clamp(min=1e-6)
        if k:
            y = torch.rot90(y, -k, rot_dims)
        if flips:
            y = torch.flip(y, [a + 2 for a in flips])
        acc = y if acc is None else acc + y
    assert acc is not None
    return acc / len(augs)


def run_heatmap(volume: Volume, card: Any, model: Callable[[Any], Any],
                config: DetectionConfig | dict[str, Any] | None = None,
                progress: Progress | None = None,
                timings: dict[str, float] | None = None) -> Volume:
    """Heat map of ``volume`` on its own (source) grid.

    Parameters
    ----------
    volume : the scan, ``(C, I, J, K)``, HU for CT.
    card : the :class:`medinfer.models.ModelCard` (task ``detection``, sigmoid output).
    model : callable from :func:`medinfer.models.load_model`.
    config : detection configuration (input / inference sections are used).
    progress : ``progress(stage, fraction)``.
    timings : filled with ``preprocess``, ``inference``, ``resample`` seconds.

    Returns
    -------
    Volume ``(1, I, J, K)`` float32 in [0, 1], exactly the source shape and affine.

    Raises
    ------
    ConfigError
        Invalid inference settings; ModelError: wrong channel count.
    """
    import torch

    from medinfer.transforms import normalize_intensity, to_model_grid, to_source_grid

    cfg = _as_config(config)
    t = timings if timings is not None else {}
    t0 = time.perf_counter()
    if volume.num_channels != card.input.channels:
        raise ModelError(f"scan has {volume.num_channels} channel(s); model {card.name} expects "
                         f"{card.input.channels}")
    arr = np.asarray(volume.array, dtype=np.float32)
    if cfg.input.hu_clip is not None:
        arr = np.clip(arr, cfg.input.hu_clip[0], cfg.input.hu_clip[1])
    src = volume.with_array(arr)
    spacing = cfg.input.target_spacing or card.input.spacing
    mv, record = to_model_grid(src, card.input.orientation, spacing)
    norm = cfg.input.normalization or card.input.normalization
    mv = normalize_intensity(mv, norm)
    if progress:
        progress("preprocess", 1.0)
    t["preprocess"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    settings = inference_settings(card, cfg)
    x = torch.from_numpy(np.ascontiguousarray(mv.array, dtype=np.float32))[None]
    logits = model_grid_logits(
        x, model, settings, augmentations(cfg), cfg.inference.tta.rotation_axes,
        progress=(lambda f: progress("inference", f)) if progress else None,
    )
    heat_m = torch.sigmoid(logits[:, :1]).numpy()[0]
    t["inference"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    heat = to_source_grid(mv.with_array(heat_m), record, interpolation="linear")
    out = np.clip(np.asarray(heat.array, dtype=np.float32), 0.0, 1.0)
    t["resample"] = time.perf_counter() - t2
    return Volume(out, volume.affine, {"kind": "heatmap", "model": card.name})


def load_calibration(cfg: DetectionConfig) -> Calibration:
    """The calibration named in ``post_processing.calibration`` (identity if none)."""
    if cfg.post_processing.calibration:
        return Calibration.load(cfg.post_processing.calibration)
    return Calibration()


def findings_from_heatmap(heat: Volume, image: Volume | None, cfg: DetectionConfig,
                          calibration: Calibration | None = None) -> list[Finding]:
    """Post-processing + triage on a source-grid heat map (see :mod:`.detection`)."""
    img = None if image is None else np.asarray(image.array[0])
    found = detect_findings(heat.array[0], heat.affine, img, cfg.post_processing)
    (calibration or load_calibration(cfg)).apply(found)
    return found


def run_detection_on_volume(volume: Volume, card: Any, model: Callable[[Any], Any],
                            config: DetectionConfig | dict[str, Any] | None = None,
                            progress: Progress | None = None) -> Prediction:
    """Detect findings in one scan (for the REST service and the CLI).

    Parameters
    ----------
    volume : the scan (HU for CT), any orientation / spacing.
    card, model : from :func:`medinfer.models.resolve_model` / :func:`load_model`.
    config : :class:`DetectionConfig`, a mapping of it, or None (defaults).
    progress : optional ``progress(stage, fraction)``.

    Returns
    -------
    Prediction
        ``heatmap`` float32 ``(1, I, J, K)`` on the source grid; ``label`` uint8 = heat map
        ``>= post_processing.segmentation_threshold``; ``detections`` = list of finding
        dicts exactly as in ``<case>_detections.json`` (``Finding.to_dict``); ``timings``.
    """
    cfg = _as_config(config)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    heat = run_heatmap(volume, card, model, cfg, progress, timings)
    t1 = time.perf_counter()
    found = findings_from_heatmap(heat, volume, cfg)
    timings["postprocess"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    if progress:
        progress("postprocess", 1.0)
    label = heat.with_array(
        (heat.array >= cfg.post_processing.segmentation_threshold).astype(np.uint8))
    pred = Prediction(label=label, heatmap=heat, detections=[f.to_dict() for f in found],
                      timings=timings, model_name=card.name, model_version=str(card.version))
    return pred
