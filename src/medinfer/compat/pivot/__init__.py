"""PIVOT drop-in: the Python calls of the PIVOT inference guide (``docs/compat/pivot.md``).

Every function is a thin adapter over medinfer's core (no second implementation):
the pipeline is :mod:`medinfer.detection`, post-processing
:mod:`medinfer.postprocess.detection`, figures and reports :mod:`medinfer.reporting`.

**Arrays and coordinates.** A *scan* is a 3-D array ``(I, J, K)`` in the file's voxel
order (as :func:`load_scan` returns it), *spacing* the voxel size along ``I, J, K`` in mm.
:func:`load_scan` returns a :class:`ScanArray`, a NumPy array that also carries the
file's affine (voxel -> RAS+ mm), so detections from it are in the scan's **RAS+ mm**
world frame (NIfTI convention: x grows towards the patient's Right, y Anterior,
z Superior; DICOM LPS has x and y negated). A plain array has no
affine: then ``diag(spacing)`` is assumed (voxel ``(0, 0, 0)`` at the origin, axes I, J, K
along x, y, z), and ``coordinates`` are ``index * spacing`` mm. ``coordinates_voxel``
are integer indices ``(i, j, k)`` in either case. Detections are the dicts of
``<case>_detections.json`` (integer ``id``, ``coordinates``, ``coordinates_voxel``,
``diameter_mm``, ``confidence``, ``properties``, ``triage``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from medinfer.errors import ConfigError, InvalidImageError, ModelError
from medinfer.volume import Volume

if TYPE_CHECKING:
    from medinfer.serve.client import InferenceClient

__all__ = [
    "InferenceClient", "InferencePipeline", "ScanArray", "batch_inference", "calibrate_scores",
    "detect_peaks", "extract_properties", "generate_report", "load_detections", "load_scan",
    "non_maximum_suppression", "optimize_model", "plot_confidence_distribution",
    "render_3d_volume", "sliding_window_inference", "visualize_detections",
]


def __getattr__(name: str) -> Any:
    """``InferenceClient`` is imported on first use (httpx is in the ``serve`` extra, and
    this module is loaded by the ``medinfer`` command at start-up)."""
    if name == "InferenceClient":
        from medinfer.serve.client import InferenceClient

        return InferenceClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

PathLike = str | os.PathLike[str]


class ScanArray(np.ndarray):
    """A scan ``(I, J, K)`` that remembers its affine (4x4 voxel -> RAS+ mm)."""

    affine: np.ndarray

    def __new__(cls, array: npt.ArrayLike, affine: npt.ArrayLike) -> ScanArray:
        obj = np.asarray(array).view(cls)
        obj.affine = np.asarray(affine, dtype=np.float64)
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        self.affine = getattr(obj, "affine", None)  # type: ignore[assignment]


def _as_volume(scan: Any, spacing: Sequence[float] | None = None) -> Volume:
    """A :class:`Volume` from a path, a Volume, a :class:`ScanArray` or a plain array."""
    from medinfer.io import load

    if isinstance(scan, Volume):
        return scan
    if isinstance(scan, (str, os.PathLike)):
        return load(scan)
    arr = np.asarray(scan)
    if arr.ndim != 3:
        raise InvalidImageError(f"scan: expected a 3-D array (I, J, K), got shape {arr.shape}")
    affine = getattr(scan, "affine", None)
    if affine is None:
        if spacing is None:
            raise ConfigError("spacing: required for a plain array scan (voxel size along I, "
                              "J, K in mm)")
        sp = [float(s) for s in spacing]
        if len(sp) != 3 or not all(s > 0 for s in sp):
            raise ConfigError(f"spacing: expected three positive sizes in mm, got {list(spacing)}")
        affine = np.diag([*sp, 1.0])
    return Volume(np.asarray(arr)[None], np.asarray(affine, dtype=np.float64))


def load_scan(path: PathLike) -> tuple[ScanArray, tuple[float, float, float]]:
    """Read a scan (NIfTI, DICOM series folder, ...) with :func:`medinfer.io.load`.

    Returns
    -------
    (scan, spacing)
        ``scan``: :class:`ScanArray` ``(I, J, K)`` (HU for CT, file voxel order, with the
        affine); ``spacing``: mm along ``I, J, K``.

    Raises
    ------
    InvalidImageError
        Unreadable file, or more than one channel.
    """
    from medinfer.io import load

    vol = load(path)
    if vol.num_channels != 1:
        raise InvalidImageError(f"{path}: {vol.num_channels} channels; load_scan reads "
                                "single-channel scans")
    sp = tuple(float(s) for s in vol.spacing)
    return ScanArray(vol.array[0], vol.affine), (sp[0], sp[1], sp[2])


def load_detections(path: PathLike) -> list[dict[str, Any]]:
    """The ``detections`` list of a ``<case>_detections.json`` (or a REST job's
    ``detections.json``).

    Raises
    ------
    InvalidImageError
        Not a detections JSON file.
    """
    from medinfer._jsonio import read_json_object

    doc = read_json_object(Path(path), max_bytes=256 * 1024**2, error=InvalidImageError)
    dets = doc.get("detections")
    if not isinstance(dets, list):
        raise InvalidImageError(f"{path}: not a detections JSON (no 'detections' list)")
    return dets


def _detections(detections: Any) -> list[dict[str, Any]]:
    if isinstance(detections, (str, os.PathLike)):
        return load_detections(detections)
    return [dict(d) for d in detections]


class InferencePipeline:
    """Detection pipeline of one model (PIVOT ``InferencePipeline``).

    Parameters
    ----------
    checkpoint : TorchScript file, state dict (+ ``model.architecture`` in the config),
        model folder or bundled name (``demo-nodules``); see
        :func:`medinfer.models.checkpoint.open_checkpoint`.
    config : detection config file (PIVOT or native keys), a mapping, or None.
    device : ``cpu``, ``cuda``, ``auto``.
    """

    def __init__(self, checkpoint: PathLike | None = None,
                 config: PathLike | Mapping[str, Any] | None = None,
                 device: str = "auto") -> None:
        from medinfer.detection import open_detection_model
        from medinfer.postprocess.detection_config import DetectionConfig, load_detection_config

        if isinstance(config, Mapping):
            self.config = DetectionConfig.from_dict(dict(config))
        else:
            self.config = load_detection_config(config)
        self.card, self.model = open_detection_model(
            None if checkpoint is None else os.fspath(checkpoint), self.config, device)
        self._last: Volume | None = None

    def predict(self, scan: Any, spacing: Sequence[float] | None = None) -> dict[str, Any]:
        """Run the model on a scan.

        Parameters
        ----------
        scan : :class:`ScanArray` / array ``(I, J, K)`` (HU), a path or a Volume.
        spacing : mm along ``I, J, K`` (used for plain arrays, see the module doc).

        Returns
        -------
        dict
            ``heatmap``: :class:`ScanArray` ``(I, J, K)`` float32 in [0, 1] on the scan's
            grid; ``detections``: list of finding dicts; ``timings`` (s); ``scan_id``.
        """
        from medinfer.detection import run_detection_on_volume

        vol = _as_volume(scan, spacing)
        pred = run_detection_on_volume(vol, self.card, self.model, self.config)
        assert pred.heatmap is not None
        self._last = vol
        scan_id = Path(os.fspath(scan)).name.split(".")[0] \
            if isinstance(scan, (str, os.PathLike)) else "scan"
        return {"heatmap": ScanArray(pred.heatmap.array[0], pred.heatmap.affine),
                "detections": pred.detections, "timings": dict(pred.timings),
                "scan_id": scan_id}

    def save_detections(self, results: Mapping[str, Any], path: PathLike) -> Path:
        """Write ``results['detections']``: ``.csv`` -> the CSV, else the detections JSON
        (the document of ``<case>_detections.json``, scan grid from the last ``predict``)."""
        from medinfer.postprocess.calibration import Calibration
        from medinfer.reporting.detections import (
            detection_document,
            write_detections_csv,
            write_detections_json,
        )

        dets = list(results["detections"])
        scan_id = str(results.get("scan_id", Path(path).stem.replace("_detections", "")))
        if str(path).lower().endswith(".csv"):
            return write_detections_csv(dets, path, scan_id=scan_id)
        heat = results.get("heatmap")
        grid = self._last if self._last is not None else _as_volume(heat, None)
        doc = detection_document(
            scan_id, grid, dets, model=self.card.name, model_version=str(self.card.version),
            categories=Calibration().category_names,
            processing_time_seconds=float(results.get("timings", {}).get("total", 0.0)))
        return write_detections_json(doc, path)

    def save_heatmap(self, heatmap: Any, path: PathLike) -> Path:
        """Write a heat map: ``.npy`` -> NumPy array ``(I, J, K)``; else NIfTI with the scan's
        affine (that of ``heatmap`` if it is a :class:`ScanArray`)."""
        from medinfer.detection import write_npy_atomic
        from medinfer.io import save

        if str(path).lower().endswith(".npy"):
            return write_npy_atomic(Path(path), np.asarray(heatmap, dtype=np.float32))
        affine = getattr(heatmap, "affine", None)
        if affine is None and self._last is not None:
            affine = self._last.affine
        vol = _as_volume(ScanArray(np.asarray(heatmap, dtype=np.float32),
                                   affine if affine is not None else np.eye(4)))
        return save(vol, path)


def sliding_window_inference(model: Any, scan: Any, patch_size: Sequence[int],
                             stride: Sequence[int] | None = None, batch_size: int = 1,
                             device: str = "cpu", blending: str = "gaussian") -> np.ndarray:
    """Run ``model`` over ``scan`` in windows (medinfer's engine,
    :func:`medinfer.inference.sliding_window_inference`).

    ``scan``: array / tensor ``(I, J, K)``, ``(C, I, J, K)`` or ``(1, C, I, J, K)``;
    ``stride`` (voxels) becomes the engine's overlap ``1 - stride / patch_size``
    (default: half the patch). Returns the model output ``(K, I, J, K)`` float32 (NumPy),
    not activated.
    """
    import torch

    from medinfer.inference import sliding_window_inference as engine
    from medinfer.models.loaders import resolve_device

    x = torch.as_tensor(np.asarray(scan, dtype=np.float32))
    while x.ndim < 5:
        x = x[None]
    patch = tuple(int(p) for p in patch_size)
    st = tuple(int(s) for s in stride) if stride is not None else tuple(max(1, p // 2)
                                                                       for p in patch)
    overlap = tuple(1.0 - s / p for s, p in zip(st, patch, strict=True))
    dev = resolve_device(device)
    net = model.to(dev).eval() if isinstance(model, torch.nn.Module) else model
    with torch.no_grad():
        y = engine(x.to(dev), net, patch, overlap=overlap, blending=blending,
                   batch_size=int(batch_size))
    return np.asarray(y[0].float().cpu().numpy())


def _affine(heatmap: Any, spacing: Sequence[float] | None) -> np.ndarray:
    aff = getattr(heatmap, "affine", None)
    if aff is not None:
        return np.asarray(aff, dtype=np.float64)
    return np.diag([*(float(s) for s in (spacing or (1.0, 1.0, 1.0))), 1.0])


def detect_peaks(heatmap: Any, threshold: float = 0.5, min_distance: float = 10.0,
                 spacing: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Peaks of a heat map ``(I, J, K)`` (:func:`medinfer.postprocess.detection.find_peaks`),
    highest first; ``min_distance`` in mm. Each: ``coordinates_voxel`` (i, j, k),
    ``coordinates`` (mm, see the module doc), ``confidence``."""
    from medinfer.postprocess.detection import find_peaks

    aff = _affine(heatmap, spacing)
    peaks = find_peaks(np.asarray(heatmap, dtype=np.float32), aff, threshold=threshold,
                       min_distance_mm=min_distance)
    out = []
    for n, (pk, val) in enumerate(peaks):
        world = aff @ np.array([*pk, 1.0])
        out.append({"id": n, "coordinates_voxel": [int(v) for v in pk],
                    "coordinates": [round(float(v), 3) for v in world[:3]],
                    "confidence": float(val)})
    return out


def _to_finding(d: Mapping[str, Any]) -> Any:
    from medinfer.postprocess.detection import Finding

    vox = d.get("coordinates_voxel_continuous", d.get("coordinates_voxel", (0, 0, 0)))
    props = d.get("properties", {})
    tri = d.get("triage", {})
    return Finding(peak_voxel=np.asarray(d.get("coordinates_voxel", vox), dtype=int),
                   center_voxel=np.asarray(vox, dtype=float),
                   center_ras=np.asarray(d["coordinates"], dtype=float),
                   diameter_mm=float(d.get("diameter_mm", 0.0)),
                   volume_mm3=float(props.get("volume_mm3", 0.0)),
                   confidence=float(d.get("confidence", 0.0)),
                   mean_intensity=props.get("mean_intensity"),
                   std_intensity=props.get("std_intensity"),
                   sphericity=props.get("sphericity"),
                   malignancy_score=tri.get("malignancy_score"),
                   risk_category=tri.get("risk_category"), extra={"source": dict(d)})


def non_maximum_suppression(detections: Sequence[Mapping[str, Any]],
                            iou_threshold: float = 0.3) -> list[dict[str, Any]]:
    """Greedy 3-D NMS of detection dicts by the IoU of their spheres (``coordinates`` mm,
    ``diameter_mm``): :func:`medinfer.postprocess.detection.nms`. Returns the kept dicts,
    most confident first."""
    from medinfer.postprocess.detection import nms

    kept = nms([_to_finding(d) for d in detections], float(iou_threshold))
    return [dict(f.extra["source"]) for f in kept]


def calibrate_scores(detections: Any, calibration_file: PathLike) -> list[dict[str, Any]]:
    """Fill ``triage.malignancy_score`` / ``risk_category`` with a calibration file
    (:class:`medinfer.postprocess.calibration.Calibration`); returns new dicts."""
    from medinfer.postprocess.calibration import Calibration

    dets = _detections(detections)
    found = [_to_finding(d) for d in dets]
    Calibration.load(calibration_file).apply(found)
    out = []
    for d, f in zip(dets, found, strict=True):
        d = dict(d)
        d["triage"] = {"malignancy_score": f.malignancy_score, "risk_category": f.risk_category}
        out.append(d)
    return out


def extract_properties(scan: Any, coordinates: Sequence[float], diameter: float,
                       spacing: Sequence[float] | None = None) -> dict[str, Any]:
    """Properties of the ball of ``diameter`` mm centred at ``coordinates`` (mm, the
    scan's frame; see the module doc) measured on ``scan`` with the core's
    :func:`medinfer.postprocess.detection.finding_properties`: ``volume_mm3``,
    ``diameter_mm``, ``mean_intensity`` / ``std_intensity`` (HU), ``sphericity``.

    Raises
    ------
    InvalidImageError
        The centre lies outside the scan.
    """
    import cc3d

    from medinfer.postprocess.detection import finding_properties

    vol = _as_volume(scan, spacing)
    img = np.asarray(vol.array[0], dtype=np.float32)
    centre = vol.world_to_voxel(np.asarray(coordinates, dtype=float)[None])[0]
    if np.any(centre < -0.5) or np.any(centre > np.array(img.shape) - 0.5):
        raise InvalidImageError(f"coordinates {list(coordinates)}: outside the scan")
    # work in the box around the ball: |A d| <= r bounds d_i by r * |row i of A^-1|
    radius = float(diameter) / 2.0
    inv = np.linalg.inv(vol.affine[:3, :3])
    half = np.ceil(radius * np.linalg.norm(inv, axis=1)).astype(int) + 1
    c = np.clip(np.round(centre).astype(int), 0, np.array(img.shape) - 1)
    lo = np.maximum(c - half, 0)
    hi = np.minimum(c + half + 1, img.shape)
    crop = img[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    shift = np.eye(4)
    shift[:3, 3] = lo
    aff = vol.affine @ shift
    idx = np.indices(crop.shape).reshape(3, -1).T
    world = (aff @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    inside = (np.linalg.norm(world - np.asarray(coordinates, float), axis=1)
              <= radius).reshape(crop.shape)
    pi, pj, pk = (int(v) for v in c - lo)
    peak = (pi, pj, pk)
    inside[peak] = True
    heat = inside.astype(np.float32)
    labels = cc3d.connected_components(inside, connectivity=26)
    f = finding_properties(heat, labels, peak, 1.0, aff, np.ascontiguousarray(crop),
                           volume_method="binary")
    return {"volume_mm3": float(f.volume_mm3), "diameter_mm": float(f.diameter_mm),
            "mean_intensity": f.mean_intensity, "std_intensity": f.std_intensity,
            "sphericity": f.sphericity}


def visualize_detections(scan: Any, detections: Any, spacing: Sequence[float] | None = None,
                         output_path: PathLike = "visualization.png", num_slices: int = 5,
                         colormap: str = "hot", alpha: float = 0.5,
                         heatmap: Any = None) -> Path:
    """The slice figure of ``<case>_visualization.png``
    (:func:`medinfer.reporting.detection_figures.write_visualization_png`)."""
    from medinfer.reporting.detection_figures import write_visualization_png

    vol = _as_volume(scan, spacing)
    heat = vol.with_array(np.zeros_like(vol.array, dtype=np.float32)) if heatmap is None \
        else vol.with_array(np.asarray(_as_volume(heatmap, spacing).array, dtype=np.float32))
    dets = _detections(detections)
    return write_visualization_png(output_path, vol, heat, dets, colormap=colormap,
                                   alpha=alpha, num_slices=num_slices,
                                   title=f"{len(dets)} finding(s)")


def render_3d_volume(scan: Any, heatmap: Any, detections: Any,
                     output_path: PathLike = "3d_rendering.html", interactive: bool = True,
                     spacing: Sequence[float] | None = None) -> Path:
    """The interactive 3-D HTML view (:func:`medinfer.reporting.detection_html.
    write_detection_html`); ``interactive`` is always true (a self-contained HTML page)."""
    from medinfer.reporting.detection_html import write_detection_html

    vol = _as_volume(scan, spacing)
    heat = vol.with_array(np.asarray(_as_volume(heatmap, spacing).array, dtype=np.float32))
    dets = _detections(detections)
    return write_detection_html(output_path, vol, heat, dets,
                                title=f"{len(dets)} finding(s)")


def plot_confidence_distribution(detections: Any,
                                 output_path: PathLike = "confidence_distribution.png") -> Path:
    """Histogram of the findings' confidences
    (:func:`medinfer.reporting.detection_figures.write_confidence_distribution`)."""
    from medinfer.reporting.detection_figures import write_confidence_distribution

    return write_confidence_distribution(
        output_path, [float(d["confidence"]) for d in _detections(detections)])


def generate_report(scan_path: PathLike, detections: Any, output_path: PathLike,
                    model: str = "unknown") -> Path:
    """The PDF report of ``<case>_report.pdf``
    (:func:`medinfer.reporting.detection_pdf.write_detection_pdf`)."""
    import tempfile

    from medinfer.io import load
    from medinfer.postprocess.calibration import Calibration
    from medinfer.reporting.detection_figures import write_visualization_png
    from medinfer.reporting.detection_pdf import write_detection_pdf
    from medinfer.reporting.detections import detection_document

    vol = load(scan_path)
    dets = _detections(detections)
    scan_id = Path(scan_path).name.split(".")[0] or "scan"
    doc = detection_document(scan_id, vol, dets, model=model, model_version="",
                             categories=Calibration().category_names,
                             processing_time_seconds=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "overview.png"
        write_visualization_png(png, vol, vol.with_array(np.zeros_like(vol.array, np.float32)),
                                dets, title=f"{scan_id}: {len(dets)} finding(s)")
        return write_detection_pdf(output_path, doc, vol, overview_png=png)


def batch_inference(checkpoint: PathLike | None, input_dir: PathLike, output_dir: PathLike,
                    config: PathLike | None = None, num_workers: int = 1, batch_size: int = 4,
                    device: str = "auto") -> dict[str, Any]:
    """Detect findings in every scan of ``input_dir``
    (:func:`medinfer.detection.predict_detection`); writes per-scan files and
    ``batch_summary.json`` in ``output_dir``.

    Returns
    -------
    dict
        ``num_scans``, ``total_detections``, ``avg_time`` (s per scan), and medinfer's
        ``risk_categories``, ``scans`` (one row per scan) ...
    """
    from medinfer.detection import predict_detection

    return predict_detection(
        [Path(input_dir)], None if checkpoint is None else os.fspath(checkpoint),
        None if config is None else Path(config), Path(output_dir), device,
        {"batch_size": int(batch_size)}, num_workers=int(num_workers))


def optimize_model(checkpoint: PathLike, output_path: PathLike,
                   example_input_shape: Sequence[int] = (1, 1, 128, 128, 128),
                   architecture: str | None = None,
                   architecture_kwargs: Mapping[str, Any] | None = None,
                   atol: float = 1e-5) -> Any:
    """Export a checkpoint to TorchScript (``torch.jit.trace``) and verify it.

    The checkpoint is opened as :func:`medinfer.models.checkpoint.open_checkpoint` does
    (state dict + ``architecture``, TorchScript, model folder, bundled name). The traced
    module is saved atomically to ``output_path``, loaded back with ``torch.jit.load`` and
    run on a seeded random input of ``example_input_shape`` ``(N, C, *spatial)``; its output
    must equal the checkpoint's within ``atol`` (absolute).

    Returns
    -------
    torch.jit.ScriptModule
        The reloaded TorchScript module (CPU, eval mode).

    Raises
    ------
    ModelError
        The checkpoint cannot be opened, or the exported model's output differs.
    """
    import warnings

    import torch

    from medinfer._atomic import atomic_path
    from medinfer.models.checkpoint import open_checkpoint

    _, model = open_checkpoint(checkpoint, architecture=architecture,
                               architecture_kwargs=dict(architecture_kwargs or {}) or None,
                               device="cpu")
    module = getattr(model, "module", None)
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"{checkpoint}: not a PyTorch model (ONNX models cannot be exported)")
    module = module.eval()
    shape = tuple(int(s) for s in example_input_shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with warnings.catch_warnings():  # shape checks frozen by tracing: verified below
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(module, x, check_trace=False)
        with atomic_path(output_path) as tmp:
            torch.jit.save(traced, str(tmp))
        loaded = torch.jit.load(str(output_path), map_location="cpu").eval()
        ref, out = model(x), loaded(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
    diff = float((ref - out).abs().max())
    if diff > atol:
        Path(output_path).unlink(missing_ok=True)
        raise ModelError(f"{checkpoint}: TorchScript output differs from the checkpoint by "
                         f"{diff:.3g} > {atol}; not written")
    return loaded
