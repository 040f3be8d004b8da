"""The detection pipeline: scan -> heat map -> findings -> result files (one module).

This is the only implementation of the detection pipeline; the ``medinfer predict`` CLI
(:mod:`medinfer.inference.cli`), the REST service (:mod:`medinfer.serve.engine`) and the
PIVOT compatibility layer (:mod:`medinfer.compat.pivot`) all call it.

**Heat map.** The heat map is produced on the model grid with the engine's sliding-window
function (:func:`medinfer.inference.sliding_window_inference`) and brought back to the
**source grid** with one trilinear interpolation (:func:`medinfer.transforms.to_source_grid`).
On top of the engine this module adds what the detection configuration offers beyond it:

* ``blending: linear`` -- each window's logits are weighted by a pyramid (tent) map
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

**Findings** come from :func:`medinfer.postprocess.detection.detect_findings` (peaks, NMS,
filters, properties; coordinates RAS+ mm) and the calibration of
:mod:`medinfer.postprocess.calibration`.

**Files.** Per scan ``<case>`` (file name without ``.nii.gz`` / ``.nii`` ...),
:func:`predict_detection` writes, as selected by ``output.formats``:
``<case>_detections.json`` (validated against ``detections.schema.json``),
``<case>_detections.csv``, ``<case>_heatmap.nii.gz`` (float32, source grid and affine),
``<case>_visualization.png``, ``<case>_3d.html``, ``<case>_report.pdf``;
and for the batch: ``confidence_distribution.png`` and ``batch_summary.json`` / ``.csv``
(scans, findings per scan and risk category, average processing time).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import write_text_atomic
from medinfer.errors import ConfigError, InvalidImageError, ModelError
from medinfer.postprocess.calibration import Calibration
from medinfer.postprocess.detection import Finding, detect_findings
from medinfer.postprocess.detection_config import (
    BlendingChoice,
    DetectionConfig,
    ModeChoice,
    OutputFormat,
    load_detection_config,
)
from medinfer.prediction import Prediction
from medinfer.volume import Volume

__all__ = ["augmentations", "case_name", "collect_inputs", "findings_from_heatmap",
           "inference_settings", "load_calibration", "model_grid_logits", "predict_detection",
           "run_detection_on_volume", "run_heatmap", "with_card_defaults", "write_case_outputs"]

LOG = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


def _as_config(config: DetectionConfig | dict[str, Any] | None) -> DetectionConfig:
    if config is None:
        return DetectionConfig()
    if isinstance(config, DetectionConfig):
        return config
    return DetectionConfig.from_dict(config)


def with_card_defaults(cfg: DetectionConfig, card: Any) -> DetectionConfig:
    """``cfg`` with the model card's post-processing defaults under the keys it left unset.

    Precedence, lowest first: the section's built-in defaults; the card's
    ``output.threshold`` as the detection ``threshold``; the card's ``post_processing``
    (e.g. the model's own ``calibration`` file, its ``confidence`` method); the keys the
    config file or the flags set explicitly (pydantic's ``model_fields_set``). Idempotent.
    """
    card_post: dict[str, Any] = dict(getattr(card, "post_processing", None) or {})
    output = getattr(card, "output", None)
    if output is not None and getattr(output, "threshold", None) is not None:
        card_post.setdefault("threshold", float(output.threshold))
    if not card_post:
        return cfg
    post = cfg.post_processing
    given = post.model_dump(mode="json", include=post.model_fields_set)
    merged = post.model_validate({**card_post, **given})
    merged.model_fields_set.clear()  # so that a second call keeps the same precedence
    merged.model_fields_set.update(post.model_fields_set)
    return cfg.model_copy(update={"post_processing": merged})


def inference_settings(card: Any, cfg: DetectionConfig) -> dict[str, Any]:
    """Effective inference settings: config values, else the model card's.

    Returns a dict with ``mode``, ``patch_size``, ``overlap`` (per axis), ``batch_size``,
    ``blending`` (gaussian | linear | average), ``sigma_scale``, ``size_divisible``.

    Raises
    ------
    ConfigError
        ``inference.stride`` larger than the patch size along an axis, or ``stride`` and
        ``overlap`` both given and inconsistent (``stride != round(patch * (1 - overlap))``).
    """
    from medinfer.postprocess.detection_config import check_stride_overlap

    inf = cfg.inference
    ci = card.inference
    patch = tuple(int(p) for p in (inf.patch_size or ci.patch_size))
    if inf.stride is not None:
        if any(s > p for s, p in zip(inf.stride, patch, strict=True)):
            raise ConfigError(f"inference.stride: {list(inf.stride)} must not exceed "
                              f"inference.patch_size {list(patch)} (windows would leave gaps)")
        if inf.overlap is not None:
            try:
                check_stride_overlap(inf.stride, inf.overlap, patch)
            except ValueError as exc:
                raise ConfigError(f"inference: {exc}") from None
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


Augmentation = tuple[tuple[int, ...], int, tuple[int, int]]

#: the named (PIVOT) augmentations: x, y, z = model-grid axes 0, 1, 2
_NAMED_AUGS: dict[str, Augmentation] = {
    "flip_x": ((0,), 0, (0, 1)), "flip_y": ((1,), 0, (0, 1)), "flip_z": ((2,), 0, (0, 1)),
    "rotate_90_xy": ((), 1, (0, 1)), "rotate_90_xz": ((), 1, (0, 2)),
    "rotate_90_yz": ((), 1, (1, 2)),
}


def augmentations(cfg: DetectionConfig) -> list[Augmentation]:
    """TTA list of ``(flip_axes, rot90_k, rotation_axes)``; identity first.

    Axes are model-grid axes (0, 1, 2 = x, y, z of the named augmentations ``flip_x`` ...
    ``rotate_90_yz``; for a card with ``orientation: RAS``: R, A, S). With
    ``tta.augmentations`` the named list is used; otherwise ``flips`` then ``rotations``
    (in the plane ``rotation_axes``). ``num_augmentations`` keeps the first N, identity
    included.
    """
    tta = cfg.inference.tta
    rot_axes = tuple(tta.rotation_axes)
    out: list[Augmentation] = [((), 0, (0, 1))]
    if tta.enabled:
        if tta.augmentations is not None:
            out += [_NAMED_AUGS[str(a.value)] for a in tta.augmentations]
        else:
            out += [(tuple(sorted(f)), 0, (0, 1)) for f in tta.flips if f]
            out += [((), int(k), (rot_axes[0], rot_axes[1])) for k in tta.rotations]
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
                      augs: list[Augmentation],
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
    acc = None
    for n, (flips, k, rotation_axes) in enumerate(augs):
        rot_dims = [a + 2 for a in rotation_axes]
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
            device=getattr(model, "device", None),  # the tent wrapper has no .device
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


def performance_notice(cfg: DetectionConfig, device: str) -> str | None:
    """One line naming the performance keys that do nothing on ``device`` (None if none).

    On CUDA: ``mixed_precision`` runs the network under ``torch.autocast`` (float16),
    ``cudnn_benchmark`` sets ``torch.backends.cudnn.benchmark``, ``clear_cache`` empties
    the CUDA cache after each scan. ``num_workers`` is the number of threads reading and
    writing scans in a batch (any device). ``prefetch_factor`` has no effect (scans are
    read whole, one per worker). On CPU all but ``num_workers`` are no-ops.
    """
    inf = cfg.inference
    asked = {"mixed_precision": cfg.model.mixed_precision, "cudnn_benchmark": inf.cudnn_benchmark,
             "clear_cache": inf.clear_cache, "prefetch_factor": inf.prefetch_factor}
    cuda = str(device).startswith("cuda")
    noop = [k for k, v in asked.items() if v and (not cuda or k == "prefetch_factor")]
    if not noop:
        return None
    return f"detection config: {', '.join(noop)} ha{'s' if len(noop) == 1 else 've'} no " \
        f"effect on device {device} (see docs/compat/pivot.md)"


class PerformanceContext:
    """Apply the performance keys of ``cfg`` around a network run (see
    :func:`performance_notice`); logs the notice once per run."""

    def __init__(self, cfg: DetectionConfig, model: Any) -> None:
        self.cfg = cfg
        self.device = str(getattr(model, "device", "cpu"))
        self._stack: Any = None

    def __enter__(self) -> PerformanceContext:
        import contextlib

        import torch

        note = performance_notice(self.cfg, self.device)
        if note:
            LOG.warning(note)
        self._stack = contextlib.ExitStack()
        if self.device.startswith("cuda"):
            if self.cfg.inference.cudnn_benchmark is not None:
                torch.backends.cudnn.benchmark = bool(self.cfg.inference.cudnn_benchmark)
            if self.cfg.model.mixed_precision:
                self._stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self._stack.close()
        if self.device.startswith("cuda") and self.cfg.inference.clear_cache:
            torch.cuda.empty_cache()


def run_heatmap(volume: Volume, card: Any, model: Callable[[Any], Any],
                config: DetectionConfig | dict[str, Any] | None = None,
                progress: Progress | None = None,
                timings: dict[str, float] | None = None, *, force: bool = False) -> Volume:
    """Heat map of ``volume`` on its own (source) grid.

    Parameters
    ----------
    volume : the scan, ``(C, I, J, K)``, HU for CT.
    card : the :class:`medinfer.models.ModelCard` (task ``detection``, sigmoid output).
    model : callable from :func:`medinfer.models.load_model`.
    config : detection configuration (input / inference sections are used).
    progress : ``progress(stage, fraction)``.
    timings : filled with ``preprocess``, ``inference``, ``resample`` seconds.
    force : run a scan that does not fit the card's input contract even where the card
        refuses it (:func:`medinfer.inference.contract.check_input_contract`; a warning
        is logged either way).

    Returns
    -------
    Volume ``(1, I, J, K)`` float32 in [0, 1], exactly the source shape and affine.

    Raises
    ------
    ConfigError
        Invalid inference settings; ModelError: wrong channel count.
    InvalidImageError
        NaN / infinite voxels; a scan the card refuses (``input.mismatch: refuse``).
    """
    import torch

    from medinfer.inference.contract import check_input_contract
    from medinfer.transforms import (
        check_finite,
        normalize_intensity,
        to_model_grid,
        to_source_grid,
    )

    cfg = _as_config(config)
    t = timings if timings is not None else {}
    t0 = time.perf_counter()
    if volume.num_channels != card.input.channels:
        raise ModelError(f"scan has {volume.num_channels} channel(s); model {card.name} expects "
                         f"{card.input.channels}")
    check_finite(volume)
    check_input_contract(volume, card, force=force)  # e.g. an MR through a CT model
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
    with PerformanceContext(cfg, model):
        logits = model_grid_logits(
            x, model, settings, augmentations(cfg),
            progress=(lambda f: progress("inference", f)) if progress else None,
        ).float().cpu()
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
    cfg = with_card_defaults(_as_config(config), card)
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


#: ``predict`` flags that only concern segmentation outputs (the heat map NIfTI and the
#: visualization PNG are always written as selected by ``output.formats``)
_PREDICT_ONLY_FLAGS = ("save_probabilities", "overlay", "verbose")

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".dcm")


def case_name(path: Path) -> str:
    """Case id from a scan path: the name without image suffixes (``a.nii.gz`` -> ``a``)."""
    name = path.name
    for suf in _IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)] or name
    return name


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Expand the inputs: files as given; a folder holding image files gives each file
    (sorted; ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``); any other folder is one
    scan (a DICOM series folder).

    Raises
    ------
    InvalidImageError
        A path that does not exist, or no inputs at all.
    """
    out: list[Path] = []
    for p in map(Path, inputs):
        if not p.exists():
            raise InvalidImageError(f"{p}: no such file or folder")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                           and any(f.name.lower().endswith(s) for s in _IMAGE_SUFFIXES[:5]))
            out.extend(files if files else [p])
        else:
            out.append(p)
    if not out:
        raise InvalidImageError("predict: no input scans given")
    return out


def write_case_outputs(
    output_dir: Path,
    case: str,
    image: Volume,
    heatmap: Volume,
    detections: list[dict[str, Any]],
    cfg: DetectionConfig,
    *,
    card: Any,
    categories: Sequence[str],
    started: float,
    shared_plotlyjs: bool = False,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write the per-scan files selected in ``cfg.output.formats``.

    ``shared_plotlyjs`` (batches): the 3-D HTML pages load one ``plotly.min.js`` in the
    output folder instead of each inlining plotly.js.

    ``started`` is the :func:`time.perf_counter` value when reading the scan began; the
    JSON's ``summary.processing_time_seconds`` runs from it to the end of writing the other
    files (the JSON is written last, the PDF that quotes it after it).

    Returns
    -------
    (paths, document)
        kind -> path of each written file, and the detections document.
    """
    from medinfer.inference.outputs import compact_probabilities
    from medinfer.io import save
    from medinfer.reporting.detections import (
        detection_document,
        write_detections_csv,
        write_detections_json,
    )

    fmts = set(cfg.output.formats)
    vis = cfg.visualization
    out: dict[str, Path] = {}
    output_dir.mkdir(parents=True, exist_ok=True)
    if OutputFormat.CSV in fmts:
        out["csv"] = write_detections_csv(detections, output_dir / f"{case}_detections.csv",
                                          scan_id=case)
    if OutputFormat.HEATMAP in fmts:
        # uint8 + scl_slope 1/255 (readers see values within 1/510); the .npy is float32
        from medinfer.io.nifti import derived_from  # the source's qform/sform codes

        out["heatmap"] = save(compact_probabilities(derived_from(heatmap, image)),
                              output_dir / f"{case}_heatmap.nii.gz")
    if OutputFormat.HEATMAP_NPY in fmts:
        out["heatmap_npy"] = write_npy_atomic(output_dir / f"{case}_heatmap.npy",
                                              np.asarray(heatmap.array[0], dtype=np.float32))
    png = output_dir / f"{case}_visualization.png"
    if OutputFormat.PNG in fmts or OutputFormat.PDF in fmts:
        from medinfer.reporting.detection_figures import write_visualization_png

        write_visualization_png(png, image, heatmap, detections, colormap=vis.colormap,
                                alpha=vis.alpha, num_slices=vis.num_slices,
                                window_hu=vis.window_hu, dpi=vis.dpi,
                                title=f"{case}: {len(detections)} finding(s)")
        out["png"] = png
    if OutputFormat.HTML in fmts:
        from medinfer.reporting.detection_html import write_detection_html

        out["html"] = write_detection_html(
            output_dir / f"{case}_3d.html", image, heatmap, detections,
            title=f"{case}: {len(detections)} finding(s) ({card.name})",
            threshold=cfg.post_processing.segmentation_threshold, window_hu=vis.window_hu,
            max_points=vis.html_max_points,
            plotlyjs="shared" if shared_plotlyjs else "inline")
    doc = detection_document(case, image, detections, model=card.name,
                             model_version=str(card.version), categories=categories,
                             processing_time_seconds=time.perf_counter() - started)
    if OutputFormat.JSON in fmts:
        out["json"] = write_detections_json(doc, output_dir / f"{case}_detections.json")
    if OutputFormat.PDF in fmts:
        from medinfer.reporting.detection_pdf import write_detection_pdf

        out["pdf"] = write_detection_pdf(output_dir / f"{case}_report.pdf", doc, image,
                                         overview_png=png, card=card,
                                         window_hu=vis.window_hu)
    if OutputFormat.PNG not in fmts and png.exists() and "pdf" in out:
        png.unlink()
        out.pop("png", None)
    return out, doc


def write_npy_atomic(path: Path, array: np.ndarray) -> Path:
    """Save ``array`` with :func:`numpy.save` atomically (``medinfer._atomic``)."""
    from medinfer._atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return path


def _batch_summary(output_dir: Path, rows: list[dict[str, Any]], categories: Sequence[str],
                   confidences: list[float], cfg: DetectionConfig) -> dict[str, Any]:
    total = sum(r["num_detections"] for r in rows)
    times = [r["processing_time_seconds"] for r in rows]
    per_cat = {c: sum(r["risk_categories"].get(c, 0) for r in rows) for c in categories}
    avg = sum(times) / len(times) if times else 0.0
    summary = {
        "num_scans": len(rows),
        "total_detections": total,
        "avg_time": avg,
        "num_detections": total,
        "scans_with_detections": sum(1 for r in rows if r["num_detections"] > 0),
        "detections_per_scan": total / len(rows) if rows else 0.0,
        "risk_categories": per_cat,
        "average_processing_time_seconds": avg,
        "scans": rows,
    }
    if cfg.output.batch_summary:
        write_text_atomic(output_dir / "batch_summary.json", json.dumps(summary, indent=2) + "\n")
        buf = io.StringIO()
        cols = ["scan_id", "source", "num_detections", *categories, "processing_time_seconds"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({"scan_id": r["scan_id"], "source": r["source"],
                        "num_detections": r["num_detections"],
                        **{c: r["risk_categories"].get(c, 0) for c in categories},
                        "processing_time_seconds": r["processing_time_seconds"]})
        write_text_atomic(output_dir / "batch_summary.csv", buf.getvalue())
    if cfg.output.confidence_distribution:
        from medinfer.reporting.detection_figures import write_confidence_distribution

        write_confidence_distribution(output_dir / "confidence_distribution.png", confidences,
                                      threshold=cfg.post_processing.threshold,
                                      dpi=cfg.visualization.dpi)
    return summary


def open_detection_model(model: str | None, cfg: DetectionConfig,
                         device: str = "auto") -> tuple[Any, Callable[[Any], Any]]:
    """The detection model named by ``model`` (wins), ``model.checkpoint`` or ``model.name``.

    A checkpoint file is opened with :func:`medinfer.models.checkpoint.open_checkpoint`
    (``model.architecture`` / ``architecture_kwargs`` for a state dict; card: ``model.name``'s
    card if given, else the PIVOT defaults). ``device`` overrides ``model.device`` unless
    empty or ``auto``.

    Raises
    ------
    ConfigError
        No model named. ModelError: not loadable, or not a detection model.
    """
    from medinfer.models import resolve_model
    from medinfer.models.checkpoint import is_weights_file, open_checkpoint

    name = model or cfg.model.checkpoint or cfg.model.name
    if not name:
        raise ConfigError("model.name: no model given; pass --model / --checkpoint or set "
                          "model.checkpoint or model.name in the config (e.g. demo-nodules)")
    dev = cfg.model.device if device in (None, "", "auto") else device
    base = None
    if is_weights_file(name) and cfg.model.name:
        base = resolve_model(cfg.model.name)[0]
    card, net = open_checkpoint(name, architecture=cfg.model.architecture,
                                architecture_kwargs=cfg.model.architecture_kwargs, card=base,
                                device=dev)
    if str(card.task.value) != "detection":
        raise ModelError(f"model {card.name!r}: task is {card.task.value!r}; detection "
                         "outputs need a model card with task: detection")
    return card, net


def predict_detection(
    inputs: list[Path],
    model: str | None,
    config: Path | DetectionConfig | None,
    output_dir: Path,
    device: str,
    overrides: dict[str, Any] | None = None,
    progress: Callable[[str, float], None] | None = None,
    *,
    num_workers: int | None = None,
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Detect findings in every input scan and write all outputs (see module doc).

    Parameters
    ----------
    inputs : scan files and/or folders (a folder of NIfTI files is a batch; another folder
        is one DICOM series).
    model : bundled model name, model folder or checkpoint file; None = ``model.checkpoint``
        or ``model.name`` of the config.
    config : detection YAML (``docs/detection.md``; PIVOT spelling accepted), an already
        validated :class:`DetectionConfig`, or None for defaults.
    output_dir : folder for the results (created).
    device : ``cpu``, ``cuda``...; overrides ``model.device`` unless empty or ``auto``.
    overrides : CLI flags (see :func:`medinfer.postprocess.detection_config.apply_overrides`);
        ``series_uid`` selects a DICOM series; ``save_probabilities``, ``overlay`` and
        ``verbose`` are ignored (outputs follow ``output.formats``).
    num_workers : threads that read and write scans while the network runs (default
        ``inference.num_workers``, else 1); the network runs one scan at a time.
    on_case : called with each case's row (``scan_id``, ``num_detections``, ``outputs``,
        ``detections``...) when its files are written.

    Returns
    -------
    dict
        The batch summary (``num_scans``, ``total_detections``, ``avg_time`` (s),
        ``risk_categories``, ``scans`` ...), also written to ``batch_summary.json``.

    Raises
    ------
    ConfigError
        Invalid config or overrides; no model named.
    ModelError
        The model cannot be loaded or is not a detection model.
    InvalidImageError
        An input cannot be read.
    """
    from concurrent.futures import ThreadPoolExecutor

    from medinfer.io import load

    ov = dict(overrides or {})
    series_uid = ov.pop("series_uid", None)
    force = bool(ov.pop("force", False))
    for key in _PREDICT_ONLY_FLAGS:  # flags of the segmentation path with no meaning here
        ov.pop(key, None)
    if isinstance(config, DetectionConfig):
        from medinfer.postprocess.detection_config import apply_overrides

        cfg = DetectionConfig.from_dict(apply_overrides(
            config.model_dump(mode="json", exclude_none=True, exclude_unset=True), ov))
    else:
        cfg = load_detection_config(config, ov)
    card, net = open_detection_model(model, cfg, device)
    cfg = with_card_defaults(cfg, card)
    calibration = load_calibration(cfg)
    categories = calibration.category_names
    files = collect_inputs(inputs)
    output_dir = Path(output_dir)
    cases: list[str] = []
    seen: dict[str, int] = {}
    for f in files:
        case = case_name(f)
        if case in seen:  # same name from two folders: keep both
            seen[case] += 1
            case = f"{case}_{seen[case]}"
        else:
            seen[case] = 0
        cases.append(case)
    workers = max(1, int(num_workers or cfg.inference.num_workers or 1))

    def read(f: Path) -> tuple[float, Volume]:
        t0 = time.perf_counter()
        return t0, (load(f, series_uid=series_uid) if series_uid else load(f))

    def write(case: str, f: Path, t0: float, image: Volume, heat: Volume,
              dets: list[dict[str, Any]]) -> dict[str, Any]:
        paths, _ = write_case_outputs(output_dir, case, image, heat, dets, cfg, card=card,
                                      categories=categories, started=t0,
                                      shared_plotlyjs=len(files) > 1)
        counts = {c: 0 for c in categories}
        for d in dets:
            cat = d["triage"]["risk_category"]
            if cat is not None:
                counts[cat] = counts.get(cat, 0) + 1
        row = {"scan_id": case, "source": str(f), "num_detections": len(dets),
               "risk_categories": counts,
               "processing_time_seconds": round(time.perf_counter() - t0, 3)}
        LOG.info("%s: %d finding(s) in %.1f s", case, len(dets), time.perf_counter() - t0)
        if on_case is not None:
            on_case({**row, "outputs": {k: str(v) for k, v in paths.items()},
                     "detections": dets})
        return row

    rows: list[dict[str, Any]] = []
    confidences: list[float] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reads = [pool.submit(read, f) for f in files[:workers]]
        writes = []
        for n, (f, case) in enumerate(zip(files, cases, strict=True)):
            t0, image = reads[n].result()
            if n + workers < len(files):  # keep `workers` scans being read ahead
                reads.append(pool.submit(read, files[n + workers]))

            def prog(stage: str, frac: float, n: int = n) -> None:
                if progress is not None:
                    progress(stage, (n + frac) / len(files))

            heat = run_heatmap(image, card, net, cfg, prog, force=force)
            dets = [x.to_dict() for x in findings_from_heatmap(heat, image, cfg, calibration)]
            confidences += [d["confidence"] for d in dets]
            writes.append(pool.submit(write, case, f, t0, image, heat, dets))
        rows = [w.result() for w in writes]
    return _batch_summary(output_dir, rows, categories, confidences, cfg)
