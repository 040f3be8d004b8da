"""The model behind the service: one loaded model, called by jobs and sync requests.

:class:`ModelEngine` resolves and loads the model named in the settings once
(:func:`medinfer.models.resolve_model`, :func:`medinfer.models.load_model`) and runs
:class:`medinfer.inference.Predictor` (segmentation) or
:func:`medinfer.detection.run_detection_on_volume` (``task: detection``)
per request. Settings that change the model card's defaults (threshold, pad multiple,
clip percentiles) are applied as a modified copy of the card; nothing is re-implemented
here. Outputs of a job are written by :func:`write_outputs` under fixed file names.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medinfer.errors import ConfigError
from medinfer.prediction import Prediction
from medinfer.volume import Volume

#: progress(stage, fraction in [0, 1]) as in :class:`medinfer.inference.Predictor`
ProgressFn = Callable[[str, float], None]

#: the only file names a job can produce (never taken from user input)
OUTPUT_FILES = ("label.nii.gz", "summary.json", "probabilities.nii.gz", "heatmap.nii.gz",
                "detections.json", "detections.csv", "visualization.png", "report.pdf")

MAX_CONFIG_BYTES = 64 * 1024


class JobConfig(BaseModel):
    """Per-job options (the optional config YAML of ``POST /api/v1/inference``).

    Attributes
    ----------
    threshold : probability threshold in (0, 1) for sigmoid / heat-map models; ``None``
        uses the service default (``MEDINFER_THRESHOLD``) or the model card's.
    save_probabilities : also write ``probabilities.nii.gz`` (float32, source grid).
    detection : options passed to the detection pipeline (``task: detection`` models
        only), in the format of its ``--config`` file.
    """

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    save_probabilities: bool = False
    detection: dict[str, Any] = Field(default_factory=dict)


def parse_job_config(data: bytes | str | Mapping[str, Any] | None,
                     name: str = "config") -> JobConfig:
    """Parse a job config from YAML text/bytes or a mapping.

    Raises
    ------
    ConfigError
        Too large (> 64 KiB), not YAML, not a mapping, or an unknown / invalid key (the
        message names it).
    """
    import yaml

    if data is None:
        return JobConfig()
    if isinstance(data, (bytes, str)):
        raw = data.encode() if isinstance(data, str) else data
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{name}: {len(raw)} bytes; at most {MAX_CONFIG_BYTES} accepted")
        try:
            parsed = yaml.safe_load(raw.decode("utf-8")) if raw.strip() else {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{name}: not valid YAML ({type(exc).__name__})") from None
        except RecursionError:
            raise ConfigError(f"{name}: nested too deeply to be a job config") from None
    elif isinstance(data, Mapping):
        parsed = dict(data)
    else:
        raise ConfigError(f"{name}: expected a mapping (threshold, save_probabilities, "
                          f"detection), got {type(data).__name__}")
    if parsed is None:
        parsed = {}
    if not isinstance(parsed, dict):
        raise ConfigError(f"{name}: expected a mapping at the top level, got "
                          f"{type(parsed).__name__}")
    if parsed and set(parsed) <= set(_DETECTION_CONFIG_SECTIONS):
        parsed = {"detection": detection_file_as_job(parsed, name)}
    try:
        cfg = JobConfig.model_validate(parsed)
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to be a job config") from None
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{name}: " + "; ".join(parts)
                          + " (accepted keys: threshold, save_probabilities, detection)") \
            from None
    if cfg.detection:
        try:
            checked = safe_detection_config(cfg.detection)
            try:
                from medinfer.postprocess.detection_config import DetectionConfig
            except ImportError:  # detection pipeline not installed: checked when it runs
                return cfg
            DetectionConfig.from_dict(checked, source=f"{name}: detection")
        except RecursionError:
            raise ConfigError(f"{name}: detection is nested too deeply") from None
    return cfg


class Engine(Protocol):
    """What the service needs from a model (a fake implements it in unit tests)."""

    @property
    def card_json(self) -> dict[str, Any]:
        """The model card as JSON (``GET /v1/models``)."""
        ...

    @property
    def name(self) -> str: ...

    def predict(self, volume: Volume, config: JobConfig,
                progress: ProgressFn | None = None) -> Prediction:
        """Run the model on ``volume``; the Prediction is on the source grid."""
        ...


class ModelEngine:
    """The real engine: a model card plus a loaded model (see module docstring).

    Parameters
    ----------
    model : bundled model name or path to a model folder / ``model.yaml``.
    device : ``auto`` | ``cuda`` | ``cpu``.
    threshold, pad_multiple, clip_percentiles : service-wide overrides of the card
        (``None`` keeps the card's value).

    Raises
    ------
    ModelError, ConfigError
        The model cannot be resolved or loaded.
    """

    def __init__(self, model: str, device: str = "auto", *, threshold: float | None = None,
                 pad_multiple: int | None = None,
                 clip_percentiles: tuple[float, float] | None = None) -> None:
        from medinfer.models import load_model, resolve_device
        from medinfer.models.checkpoint import resolve_checkpoint

        # a model folder / model.yaml / bundled name, or a weights file (TorchScript, or a
        # state dict built from the model.yaml beside it): UNET3D_MODEL_PATH
        card, model_dir = resolve_checkpoint(model)
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.card = _override_card(card, threshold=threshold, pad_multiple=pad_multiple,
                                   clip_percentiles=clip_percentiles)
        self.model = load_model(self.card, self.model_dir, self.device)
        self._predictors: dict[tuple[float | None, bool], Any] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self.card.name)

    @property
    def card_json(self) -> dict[str, Any]:
        data: dict[str, Any] = self.card.model_dump(mode="json")
        data["device"] = str(self.device)
        cal = (data.get("post_processing") or {}).get("calibration")
        if cal:  # a server-side path: shown relative to the model folder, never absolute
            path, folder = Path(cal), self.model_dir.resolve()
            data["post_processing"]["calibration"] = (
                path.relative_to(folder).as_posix() if path.is_relative_to(folder) else path.name)
        return data

    def _predictor(self, threshold: float | None, save_probabilities: bool) -> Any:
        from medinfer.inference import Predictor

        key = (threshold, save_probabilities)
        with self._lock:
            pred = self._predictors.get(key)
            if pred is None:
                card = _override_card(self.card, threshold=threshold)
                pred = Predictor(card, self.model, device=str(self.device),
                                 save_probabilities=save_probabilities)
                self._predictors[key] = pred
            return pred

    def predict(self, volume: Volume, config: JobConfig,
                progress: ProgressFn | None = None) -> Prediction:
        """Run the model; ``config.threshold`` overrides the card's output threshold.

        Detection models go through the detection pipeline (heat map, findings).
        Raises the input errors of the layers below (:class:`medinfer.errors.MedinferError`).
        """
        from medinfer.models import Task

        if self.card.task is Task.DETECTION:
            return self._detect(volume, config, progress)
        predictor = self._predictor(config.threshold, config.save_probabilities)
        return predictor.predict(volume, progress=progress)

    def _detect(self, volume: Volume, config: JobConfig,
                progress: ProgressFn | None) -> Prediction:
        from medinfer.detection import run_detection_on_volume

        det_config = safe_detection_config(config.detection)
        if config.threshold is not None:  # else the config's, then the card's threshold
            post = dict(det_config.get("post_processing") or {})
            post.setdefault("threshold", float(config.threshold))
            det_config["post_processing"] = post
        card = _override_card(self.card, threshold=config.threshold)
        overall: ProgressFn | None = None
        if progress is not None:
            report = progress

            def overall(stage: str, fraction: float) -> None:
                # the detection pipeline reports per-stage fractions; make them overall
                lo, hi = _DETECTION_SPANS.get(stage, (0.0, 1.0))
                report(stage, lo + (hi - lo) * min(1.0, max(0.0, fraction)))

        out = run_detection_on_volume(volume, card, self.model, det_config, progress=overall)
        if not isinstance(out, Prediction):
            raise TypeError(f"run_detection_on_volume returned {type(out).__name__}, "
                            "expected a Prediction")
        return out


#: overall-progress span of each detection stage
_DETECTION_SPANS = {"preprocess": (0.0, 0.1), "inference": (0.1, 0.85),
                    "postprocess": (0.85, 1.0)}

#: detection-config sections a client may set per job (no file paths, no outputs)
_CLIENT_DETECTION_SECTIONS = ("input", "inference", "post_processing")
_DETECTION_CONFIG_SECTIONS = ("model", "input", "inference", "post_processing", "output",
                              "visualization")


def detection_file_as_job(data: Mapping[str, Any], name: str = "config") -> dict[str, Any]:
    """A whole detection config file (medinfer or PIVOT ``inference.yaml`` keys) as a job's
    ``detection`` options.

    The file is validated as ``--config`` would be (unknown keys fail with the dotted
    key); its ``input``, ``inference`` and ``post_processing`` sections apply to the job.
    ``model`` (the server serves one model), ``output`` and ``visualization`` (a job always
    writes the same files) are validated and left aside.

    Raises
    ------
    ConfigError
        An invalid key or value (the message names it).
    """
    from medinfer.postprocess.detection_config import (
        DetectionConfig,
        translate_described_keys,
    )

    translated = translate_described_keys(dict(data), name)
    DetectionConfig.from_dict(translated, source=name)
    return {k: v for k, v in translated.items() if k in _CLIENT_DETECTION_SECTIONS}


def safe_detection_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of a client's detection config limited to what is safe on a server.

    Only the sections ``input``, ``inference`` and ``post_processing`` are accepted, and
    no key naming a server-side file (``post_processing.calibration``); the detection
    pipeline validates the values.

    Raises
    ------
    ConfigError
        Another section, or a file key; the message names it.
    """
    out: dict[str, Any] = {}
    for key, value in dict(data).items():
        if key not in _CLIENT_DETECTION_SECTIONS:
            raise ConfigError(f"config: detection.{key}: not accepted by the service; "
                              f"allowed sections: {', '.join(_CLIENT_DETECTION_SECTIONS)}")
        if not isinstance(value, Mapping):
            raise ConfigError(f"config: detection.{key}: expected a mapping")
        section = dict(value)
        if key == "post_processing" and "calibration" in section:
            raise ConfigError("config: detection.post_processing.calibration: server-side "
                              "files cannot be chosen by a client; configure the model's "
                              "calibration on the server")
        out[key] = section
    return out


def _override_card(card: Any, *, threshold: float | None = None,
                   pad_multiple: int | None = None,
                   clip_percentiles: tuple[float, float] | None = None) -> Any:
    """A copy of the (frozen) model card with service / request overrides applied."""
    if threshold is not None:
        card = card.model_copy(update={
            "output": card.output.model_copy(update={"threshold": float(threshold)})})
    if pad_multiple is not None:
        card = card.model_copy(update={
            "inference": card.inference.model_copy(update={"size_divisible": int(pad_multiple)})})
    if clip_percentiles is not None:
        norm = dict(card.input.normalization)
        if norm.get("method") != "percentile":
            raise ConfigError(
                f"MEDINFER_CLIP_PERCENTILES: the model normalises with {norm.get('method')!r}, "
                "not 'percentile'; unset it for this model"
            )
        norm["lower"], norm["upper"] = float(clip_percentiles[0]), float(clip_percentiles[1])
        card = card.model_copy(update={
            "input": card.input.model_copy(update={"normalization": norm})})
    return card


def label_names(card_json: Mapping[str, Any]) -> dict[int, str]:
    """Label value -> name from a model card JSON."""
    labels = card_json.get("labels") or {}
    return {int(k): str(v.get("name", k)) for k, v in labels.items()}


def result_volume(output: Volume, source: Volume | None, *, label_map: bool = False) -> Volume:
    """``output`` with the NIfTI header hints of a result on ``source``'s grid.

    Label maps get ``intent_code`` NIFTI_INTENT_LABEL (viewers then show them as
    segmentations); the source's ``qform_code`` / ``sform_code`` are carried when the
    source is known (:func:`medinfer.io.nifti.derived_from`, as the CLI writes them).
    """
    from medinfer.io.nifti import derived_from

    if source is not None:
        return derived_from(output, source, label_map=label_map)
    if not label_map:
        return output
    return Volume(output.array, output.affine, {**output.meta, "intent": "label"})


def write_outputs(prediction: Prediction, out_dir: Path, config: JobConfig,
                  extra: Mapping[str, Any] | None = None, *, image: Volume | None = None,
                  scan_id: str = "scan") -> tuple[dict[str, Any], list[str]]:
    """Write a job's results under ``out_dir`` all-or-nothing; return (summary, file names).

    Files are first written into a hidden sibling folder ``.<name>.tmp`` and the folder is
    renamed onto ``out_dir`` at the end (POSIX rename is atomic), so ``out_dir`` either
    does not exist or holds complete files. Names are fixed (:data:`OUTPUT_FILES`):
    ``label.nii.gz`` (label map, uint8/uint16, source grid), ``summary.json``,
    ``probabilities.nii.gz`` (only with ``config.save_probabilities``),
    ``heatmap.nii.gz``, ``detections.json`` (the document of ``<case>_detections.json``
    with ``scan_id``, ``metadata``, ``summary``), ``detections.csv`` and, given the scan
    ``image``, ``visualization.png`` and ``report.pdf`` (detection models).
    """
    from medinfer.io import save

    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = ["label.nii.gz"]
    save(result_volume(prediction.label, image, label_map=True), tmp / "label.nii.gz")
    if config.save_probabilities and prediction.probabilities is not None:
        save(result_volume(prediction.probabilities, image), tmp / "probabilities.nii.gz")
        files.append("probabilities.nii.gz")
    if prediction.heatmap is not None:
        save(prediction.heatmap, tmp / "heatmap.nii.gz")
        files.append("heatmap.nii.gz")
    summary = prediction.summary()
    if extra:
        summary.update(extra)
    summary = jsonable(summary)
    if prediction.heatmap is not None:
        files += _write_detection_files(prediction, tmp, image, scan_id)
    _write_json(tmp / "summary.json", summary)
    files.append("summary.json")
    _fsync_dir(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    return summary, files


def _write_detection_files(prediction: Prediction, tmp: Path, image: Volume | None,
                           scan_id: str) -> list[str]:
    """The detection model's result files, as :func:`medinfer.detection.write_case_outputs`
    writes them for the CLI (same document, same CSV)."""
    from medinfer.postprocess.calibration import Calibration
    from medinfer.reporting.detections import (
        detection_document,
        write_detections_csv,
        write_detections_json,
    )

    assert prediction.heatmap is not None
    dets = list(prediction.detections or [])
    grid = image if image is not None else prediction.heatmap
    doc = detection_document(scan_id, grid, dets, model=prediction.model_name,
                             model_version=str(prediction.model_version),
                             categories=Calibration().category_names,
                             processing_time_seconds=float(prediction.timings.get("total", 0.0)))
    write_detections_json(doc, tmp / "detections.json")
    write_detections_csv(dets, tmp / "detections.csv", scan_id=scan_id)
    files = ["detections.json", "detections.csv"]
    if image is not None:
        from medinfer.reporting.detection_figures import write_visualization_png
        from medinfer.reporting.detection_pdf import write_detection_pdf

        png = tmp / "visualization.png"
        write_visualization_png(png, image, prediction.heatmap, dets,
                                title=f"{scan_id}: {len(dets)} finding(s)")
        write_detection_pdf(tmp / "report.pdf", doc, image, overview_png=png)
        files += ["visualization.png", "report.pdf"]
    return files


def _write_json(path: Path, data: Any) -> None:
    from medinfer._atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default))


def jsonable(obj: Any) -> Any:
    """A JSON-safe copy: numpy scalars / arrays to Python, NaN and +-inf to ``None``."""
    import math

    import numpy as np

    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
